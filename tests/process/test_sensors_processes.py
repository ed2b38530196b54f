"""Sensors with real processes on 127.0.0.1 (issue 14, acceptance): an edge node and a
register, each its own ``storemesh node`` process; the test plays the store's sensor
gateway, posting noisy shelf-scale and RFID readings over HTTP.

Shrink (units vanish without a sale) is caught and auto-adjusted when the scale and the
RFID reader agree, sent to review when only the scale sees it; the review item reaches
the register, staff accept it there, and the edge follows; a drifting scale is flagged,
not believed."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from tests import meshkit as mk

pytestmark = [pytest.mark.asyncio, pytest.mark.slow]
cluster = mk.cluster  # the fixture: every process started is stopped after the test

UNIT_G = {"MILK": 1030.0, "BREAD": 410.0, "EGGS": 620.0}


async def call(http: aiohttp.ClientSession, method: str, url: str, body: Any = None,
               headers: dict[str, str] | None = None) -> tuple[int, Any]:
    async with http.request(method, url, data=None if body is None else orjson.dumps(body),
                            headers={"Content-Type": "application/json",
                                     **(headers or {})}) as resp:
        return resp.status, orjson.loads(await resp.read())


class Gateway:
    """The store's sensor gateway: scales on MILK, BREAD and EGGS shelves, one RFID
    reader on the MILK and EGGS shelves; readings with noise, posted in batches."""

    def __init__(self, http: aiohttp.ClientSession, edge: str) -> None:
        self.http, self.edge = http, edge
        self.rng = random.Random(14)
        self.shelf = {"MILK": 12, "BREAD": 9, "EGGS": 20}
        self.drift_g = 0.0  # the EGGS scale's growing error
        self.n = 0

    async def register(self) -> None:
        cal = mk.now_ms() - 86_400_000
        sensors: dict[str, dict[str, Any]] = {
            f"scale-{s}": {"kind": "weight", "skus": [s], "unit_grams": g, "zone": "aisle-3"}
            for s, g in UNIT_G.items()}
        sensors["rfid-aisle-3"] = {"kind": "rfid", "skus": ["MILK", "EGGS"], "zone": "aisle-3"}
        for sid, entry in sensors.items():
            st, body = await call(self.http, "PUT", f"{self.edge}/v1/sensors/{sid}",
                                  {**entry, "calibrated_ms": cal, "txn_id": f"reg-{sid}"})
            assert st == 201, body

    async def report(self) -> None:
        rows = []
        for sku, units in self.shelf.items():
            self.n += 1
            grams = units * UNIT_G[sku] + self.rng.gauss(0, 8)
            if sku == "EGGS":
                grams += self.drift_g
            rows.append({"id": f"w{self.n}", "sensor": f"scale-{sku}", "value": round(grams, 1),
                         "at_ms": mk.now_ms(), "calibration": "ok"})
            if sku != "BREAD":
                self.n += 1
                rows.append({"id": f"t{self.n}", "sensor": "rfid-aisle-3", "sku": sku,
                             "value": units, "at_ms": mk.now_ms()})
        st, body = await call(self.http, "POST", f"{self.edge}/v1/sensors/readings",
                              {"readings": rows})
        assert st == 200 and body["accepted"] == len(rows), body


async def test_shrink_review_and_drift_with_real_processes(cluster: mk.Cluster,
                                                           tmp_path: Path) -> None:
    t = mk.tag()
    edge_id = mk.new_store(tmp_path, f"store-{t}", f"edge-{t}")
    reg_id = mk.enrol_direct(tmp_path, edge_id, f"reg-{t}")
    till = mk.issue_token(edge_id, "till-1", role="pos")
    roster = mk.add_staff(edge_id, "anna", "supervisor")
    edge = await cluster.start("edge", edge_id.data_dir, discovery=False)
    reg = await cluster.start("reg", reg_id.data_dir, discovery=False, peers=[edge.url])
    async with mk.client() as http:
        gw = Gateway(http, edge.url)
        for sku, qty in gw.shelf.items():
            await mk.post_ok(http, edge.url, "/v1/receipts",
                             {"sku": sku, "qty": qty, "txn_id": f"po-{sku}"})
        await gw.register()
        await gw.report()
        st, done = await call(http, "POST", f"{edge.url}/v1/sensors/reconcile")
        assert st == 200 and not done["auto"] and not done["review"], done  # all agree

        # shrink: 3 MILK (scale and RFID see it) and 2 BREAD (only a scale there) vanish
        gw.shelf["MILK"] -= 3
        gw.shelf["BREAD"] -= 2
        await gw.report()
        st, done = await call(http, "POST", f"{edge.url}/v1/sensors/reconcile")
        assert [(a["sku"], a["delta"]) for a in done["auto"]] == [("MILK", -3)], done
        assert done["auto"][0]["score"] >= 950
        assert [(r["sku"], r["delta"]) for r in done["review"]] == [("BREAD", -2)], done

        async def reg_sees() -> bool:
            milk = await mk.get_json(http, reg.url, "/v1/stock/MILK")
            reviews = await mk.get_json(http, reg.url, "/v1/reviews?sku=BREAD")
            return milk["on_hand"] == 9 and len(reviews["reviews"]) == 1
        await mk.until(reg_sees, within=20, what="the adjustment and the review at the register")
        audit = await mk.get_json(http, reg.url, "/v1/audit?sku=MILK")
        adj = next(e for e in audit["entries"] if e["kind"] == "adjust")
        assert adj["reason"] == "sensor_reconcile" and adj["origin"] == edge.node_id
        assert len(adj["evidence"]["readings"]) == 2

        # staff accept the BREAD item at the register; the edge follows
        item = (await mk.get_json(http, reg.url, "/v1/reviews?sku=BREAD"))["reviews"][0]
        anna = await mk.login(http, reg.url, till, "anna", roster=roster)
        st, body = await call(http, "POST", f"{reg.url}/v1/reviews/{item['id']}/resolve",
                              {"resolution": "accept", "txn_id": "rv-accept-1"}, anna)
        assert st == 201, body

        async def edge_follows() -> bool:
            bread = await mk.get_json(http, edge.url, "/v1/stock/BREAD")
            open_items = await mk.get_json(http, edge.url, "/v1/reviews")
            return bread["on_hand"] == 7 and open_items["reviews"] == []
        await mk.until(edge_follows, within=20, what="the accepted review at the edge")

        # the EGGS scale drifts (+40 % of a unit per report, 4.8 units after 12); the RFID
        # count stays right: past its tolerance plus both kinds' errors (2.5 units) for the
        # last 3 readings, it is flagged
        for _ in range(12):
            gw.drift_g += 0.4 * UNIT_G["EGGS"]
            await gw.report()
        st, done = await call(http, "POST", f"{edge.url}/v1/sensors/reconcile")
        assert done["drift"] == ["scale-EGGS"] and done["auto"] == [], done
        eggs = await mk.get_json(http, edge.url, "/v1/stock/EGGS")
        assert eggs["on_hand"] == 20  # not believed
        flagged = await mk.get_json(http, edge.url, "/v1/reviews?why=sensor_drift")
        assert [r["evidence"] for r in flagged["reviews"]] == [["scale-EGGS"]]

        # the register takes no readings, and the edge counted what it refused
        st, body = await call(http, "POST", f"{reg.url}/v1/sensors/readings",
                              {"readings": [{"id": "x", "sensor": "scale-MILK", "value": 1,
                                             "at_ms": mk.now_ms()}]})
        assert st == 403 and body["error"]["field"] == "role"
        st, body = await call(http, "POST", f"{edge.url}/v1/sensors/readings",
                              {"readings": [{"id": "x", "sensor": "scale-MILK", "value": -1,
                                             "at_ms": mk.now_ms()}]})
        assert st == 400 and body["error"]["field"] == "readings[0].value"
        families = await mk.metric_families(http, edge.url)
        refused = {s.labels["reason"]: s.value
                   for s in families["storemesh_sensor_readings_refused"].samples}
        assert refused == {"negative": 1.0}


async def test_readings_survive_a_kill_of_the_edge_process(cluster: mk.Cluster,
                                                           tmp_path: Path) -> None:
    """Shrink seen by two sensors just before the edge is killed (SIGKILL, no flush): the
    restarted edge still settles it from the readings taken before (mesh.store.sensorstore),
    and the gateway's retry of the same batch is a duplicate."""
    t = mk.tag()
    edge_id = mk.new_store(tmp_path, f"store-{t}", f"edge-{t}")
    edge = await cluster.start("edge", edge_id.data_dir, discovery=False)
    async with mk.client() as http:
        gw = Gateway(http, edge.url)
        for sku, qty in gw.shelf.items():
            await mk.post_ok(http, edge.url, "/v1/receipts",
                             {"sku": sku, "qty": qty, "txn_id": f"po-{sku}"})
        await gw.register()
        await asyncio.sleep(0.05)  # readings after the receipts
        gw.shelf["MILK"] -= 3
        await gw.report()
    cluster.kill(edge)
    cluster.restart(edge)
    await cluster.wait_ready(edge)
    async with mk.client() as http:
        gw.http, gw.n = http, 0
        replay = [{"id": "w1", "sensor": "scale-MILK", "value": 1.0, "at_ms": mk.now_ms()}]
        st, body = await call(http, "POST", f"{edge.url}/v1/sensors/readings",
                              {"readings": replay})
        assert st == 200 and body == {"accepted": 0, "duplicates": 1}, body
        st, done = await call(http, "POST", f"{edge.url}/v1/sensors/reconcile")
        assert [(a["sku"], a["delta"]) for a in done["auto"]] == [("MILK", -3)], done

"""Sensors end to end (issue 14, acceptance): a store's edge reconciles shelf scales and
an RFID reader, a cooler alert reaches the cloud's dashboard (rendered by headless
Chromium), and raw readings never cross the WAN: only adjustments, review items,
summaries and alerts do, in signed envelopes.

A cloud peer and one store (edge + register) run in this process on 127.0.0.1
(``tests.node.test_analytics.Fleet``), linked by a real WAN session."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import pytest_asyncio

from mesh.core.envelope import decode
from mesh.http.sensor_routes import SENSORS_KEY
from tests.meshkit import add_staff, client, issue_token, login, now_ms
from tests.node.test_analytics import Fleet, until
from tests.process.test_dashboard_e2e import chromium, logged_in_dashboard, open_browser

pytestmark = [pytest.mark.asyncio, pytest.mark.slow]
__all__ = ["chromium"]  # the fixture


@pytest_asyncio.fixture
async def fleet(tmp_path: Path) -> AsyncIterator[Fleet]:
    f = Fleet(tmp_path, ["s1"])
    try:
        yield f
    finally:
        await f.close()


async def call(http: aiohttp.ClientSession, method: str, url: str, body: Any = None,
               headers: dict[str, str] | None = None) -> tuple[int, Any]:
    async with http.request(method, url, data=None if body is None else orjson.dumps(body),
                            headers={"Content-Type": "application/json",
                                     **(headers or {})}) as resp:
        return resp.status, orjson.loads(await resp.read())


async def test_alert_reaches_the_dashboard_raw_readings_stay_at_the_edge(
        fleet: Fleet, chromium: str, tmp_path: Path) -> None:
    # the distribution centre's reorder point for BREAD, in the cloud's rules
    (fleet.cloud_root / "s1" / "sensor_rules.json").write_bytes(orjson.dumps({
        "version": 1, "reorder": {"default": {}, "skus": {"BREAD": {"point": 8,
                                                                    "target": 30}}}}))
    await fleet.start_cloud()
    await fleet.start_stores()
    edge = fleet.edges["s1"].url
    await fleet.receive("s1", "MILK", 10)
    await fleet.receive("s1", "BREAD", 10)
    t = now_ms()
    async with client() as http:  # the store's back-office integration (and gateway)
        for sid, entry in {
            "scale-MILK": {"kind": "weight", "skus": ["MILK"], "unit_grams": 1000},
            "rfid-dairy": {"kind": "rfid", "skus": ["MILK"]},
            "scale-BREAD": {"kind": "weight", "skus": ["BREAD"], "unit_grams": 400},
        }.items():
            st, body = await call(http, "PUT", f"{edge}/v1/sensors/{sid}", {
                **entry, "zone": "dairy", "calibrated_ms": t - 3_600_000, "txn_id": sid})
            assert st == 201, body
        # shrink: 3 MILK and 2 BREAD vanish without a sale (read after the receipts: a
        # reading older than the last stock movement is no signal, reconcile inv. 5)
        readings = [{"id": f"g{i}-{s}", "sensor": s, "value": v, "at_ms": now_ms() + i}
                    for i, (s, v) in enumerate([("scale-MILK", 7012.375), ("rfid-dairy", 7),
                                                ("scale-BREAD", 3195.625)])]
        st, body = await call(http, "POST", f"{edge}/v1/sensors/readings",
                              {"readings": readings})
        assert st == 200 and body["accepted"] == 3, body
        st, done = await call(http, "POST", f"{edge}/v1/sensors/reconcile")
        assert [(a["sku"], a["delta"]) for a in done["auto"]] == [("MILK", -3)], done
        assert [(r["sku"], r["delta"]) for r in done["review"]] == [("BREAD", -2)], done
        # a cooler above 5 °C for 10 minutes: one alert, sent at once
        t0 = now_ms() - 12 * 60_000
        rows = [{"device": "cooler-1", "metric": "cooler_temp_c", "value": 6.0 + (i % 2) / 10,
                 "at_ms": t0 + i * 10_000} for i in range(72)]
        st, body = await call(http, "POST", f"{edge}/v1/telemetry", {"readings": rows})
        assert st == 200 and [a["rule"] for a in body["alerts"]] == ["cooler_warm"], body

    assert fleet.cloud is not None
    cloud_node = fleet.cloud.nodes["s1"]
    cloud_svc = cloud_node.app[SENSORS_KEY]

    async def at_cloud() -> bool:
        return (cloud_node.replica.on_hand("MILK") == 7 and bool(cloud_svc.alerts)
                and len(cloud_node.replica.reviews.open_items()) == 1)
    await until(at_cloud, within=20, what="adjustment, review item and alert at the cloud")

    # raw readings did not cross the WAN: the cloud holds none, and no envelope it
    # received carries a reading's value or a raw telemetry row
    assert cloud_svc.state.accepted == 0 and not cloud_svc.state.readings
    envs = [decode(raw) for _, raw in cloud_node.durable.ledger.scan(0, page=10_000)]
    kinds = sorted({e.meta["kind"] for e in envs})
    assert kinds == ["adjust", "catalog", "receipt", "review", "telemetry"], kinds
    blob = b"".join(e.raw for e in envs)
    assert b"7012.375" not in blob and b"3195.625" not in blob
    tm = [op for e in envs for op in e.ops if op["t"] == "tm"]
    # 72 readings in: the closed 5-minute windows' summaries (at most 3) and one alert out
    summaries = [row for op in tm for row in op["s"]]
    assert 1 <= len(summaries) <= 3 and sum(row[3] for row in summaries) <= 72, summaries
    assert [a["rule"] for op in tm for a in op["a"]] == ["cooler_warm"]
    tm_bytes = sum(len(e.raw) for e in envs if e.meta["kind"] == "telemetry")
    assert tm_bytes < len(orjson.dumps(rows)) / 5, (tm_bytes, len(orjson.dumps(rows)))
    adj = next(e for e in envs if e.meta["kind"] == "adjust")
    assert adj.meta["reason"] == "sensor_reconcile"
    assert sorted(adj.meta["evidence"]["readings"]) == ["g0-scale-MILK", "g1-rfid-dairy"]

    # the cloud suggests replenishment from the distribution centre once the review is
    # accepted (BREAD 8 <= its point 8), and every node sees the one suggestion
    item = cloud_node.replica.reviews.open_items("BREAD")[0]
    till = issue_token(fleet.base / "s1" / "edge", "till-1", role="pos")
    roster = add_staff(fleet.base / "s1" / "edge", "ole", "supervisor")
    async with client() as http:
        ole = await login(http, edge, till, "ole", roster=roster)  # at the till
        st, body = await call(http, "POST", f"{edge}/v1/reviews/{item.id}/resolve",
                              {"resolution": "accept", "txn_id": "acc-1"}, ole)
        assert st == 201, body
        store = f"{fleet.url}/stores/s1"

        async def bread_at_cloud() -> bool:
            return cloud_node.replica.on_hand("BREAD") == 8
        await until(bread_at_cloud, within=20, what="the accepted review at the cloud")
        st, done = await call(http, "POST", f"{store}/v1/sensors/reconcile")
        assert st == 200 and [(r["sku"], r["source"], r["suggested_qty"])
                              for r in done["replenish"]] == [("BREAD", "dc", 22)], done
        st, body = await call(http, "GET", f"{store}/v1/replenishment")
        assert [i["sku"] for i in body["open"]] == ["BREAD"]

    pin = fleet.cloud.hq.cert_path if fleet.cloud.hq is not None else None
    async with open_browser(chromium, tmp_path / "profile", pin) as browser:
        page = await logged_in_dashboard(browser, f"{fleet.url}/")  # HQ logs in first
    assert page.by_id.get("conn") == "live", page.by_id.get("conn")
    assert page.cells[("sensors", "s1", "review_open")] == "1"  # the replenishment
    assert page.cells[("sensors", "s1", "replenish")] == "BREAD"
    assert page.cells[("sensors", "s1", "auto_share")] == "50 %"
    assert "cooler-1 cooler_warm" in page.cells[("sensors", "s1", "alerts")]

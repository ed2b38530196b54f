"""Sensors over real HTTP against a real in-process Node (issue 14): the registry, the
readings endpoint's refusals, reconciliation into adjustments and review items, staff
resolution, telemetry alerts, replenishment, /metrics."""

from __future__ import annotations

import asyncio
import io
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import pytest_asyncio
from prometheus_client.parser import text_string_to_metric_families

from mesh import config
from mesh.http.sensor_routes import SENSORS_KEY as SENSORS_KEY_
from mesh.node.node import Node
from mesh.store.datadir import init_store
from tests.meshkit import add_staff, bearer, issue_token, login, now_ms, running_node, wait_until

pytestmark = pytest.mark.asyncio

Json = Any


#: Device credentials of the store of the ``node`` fixture: a back-office integration
#: (the sensor gateway and the scripts; every command) and a till.
TOKENS: dict[str, str] = {}


@pytest_asyncio.fixture
async def node(tmp_path: Path) -> AsyncIterator[Node]:
    edge = tmp_path / "edge"
    init_store(edge, "store-1", now_ms=now_ms(), node_id="edge")
    (edge / "sensor_rules.json").write_bytes(orjson.dumps({
        "version": 1, "reorder": {"default": {"point": 3, "target": 12}, "skus": {}}}))
    TOKENS.update(svc=issue_token(edge), till=issue_token(edge, "till-1", role="pos"))
    version = add_staff(edge, "anna", "supervisor")
    async with running_node(edge) as n:
        await wait_until(lambda: n.identity.trust.roster_version >= version, 10, "roster")
        yield n


@pytest_asyncio.fixture
async def http(node: Node) -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(base_url=node.url,
                                     headers=bearer(TOKENS["svc"])) as session:
        yield session


async def call(http: aiohttp.ClientSession, method: str, path: str, body: Json = None, *,
               raw: bytes | None = None, headers: dict[str, str] | None = None
               ) -> tuple[int, Json]:
    data = raw if raw is not None else (None if body is None else orjson.dumps(body))
    async with http.request(method, path, data=data,
                            headers={"Content-Type": "application/json",
                                     **(headers or {})}) as resp:
        assert resp.content_type == "application/json", await resp.text()
        return resp.status, orjson.loads(await resp.read())


async def setup_shelf(http: aiohttp.ClientSession, sku: str = "MILK", qty: int = 10) -> None:
    now = now_ms()
    st, body = await call(http, "POST", "/v1/receipts", {"sku": sku, "qty": qty,
                                                         "txn_id": f"rcv-{sku}"})
    assert st == 201, body
    for sid, entry in {
        f"scale-{sku}": {"kind": "weight", "zone": "dairy", "skus": [sku], "unit_grams": 100,
                         "calibrated_ms": now - 86_400_000},
        f"rfid-{sku}": {"kind": "rfid", "zone": "dairy", "skus": [sku],
                        "calibrated_ms": now - 86_400_000},
    }.items():
        st, body = await call(http, "PUT", f"/v1/sensors/{sid}",
                              {**entry, "txn_id": f"reg-{sid}"})
        assert st == 201, body


def reading(rid: str, sensor: str, value: float, at: int | None = None, **kw: Any) -> Json:
    return {"id": rid, "sensor": sensor, "value": value,
            "at_ms": now_ms() if at is None else at, **kw}


async def post_readings(http: aiohttp.ClientSession, *rows: Json) -> tuple[int, Json]:
    return await call(http, "POST", "/v1/sensors/readings", {"readings": list(rows)})


async def metric(http: aiohttp.ClientSession, name: str, **labels: str) -> float:
    async with http.get("/metrics") as resp:
        text = await resp.text()
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    return 0.0


async def test_registry_is_audited_and_listed(http: aiohttp.ClientSession) -> None:
    await setup_shelf(http)
    st, body = await call(http, "GET", "/v1/sensors")
    assert st == 200
    assert [s["id"] for s in body["sensors"]] == ["rfid-MILK", "scale-MILK"]
    st, audit = await call(http, "GET", "/v1/audit")
    notes = [e["note"] for e in audit["entries"] if e["kind"] == "catalog"]
    assert any(n.startswith("sensor:scale-MILK") for n in notes)
    st, body = await call(http, "PUT", "/v1/sensors/bad", {"kind": "weight", "zone": "z",
                                                            "skus": ["A"], "txn_id": "x"})
    assert st == 400 and body["error"]["field"] == "unit_grams"


@pytest.mark.parametrize(("row", "status", "field", "reason"), [
    (reading("r1", "nope", 1), 422, "readings[0].sensor", "unknown_sensor"),
    (reading("r1", "scale-MILK", -5), 400, "readings[0].value", "negative"),
    (reading("r1", "scale-MILK", "Infinity"), 400, None, "malformed"),
    (reading("r1", "scale-MILK", "NaN"), 400, None, "malformed"),
    (reading("r1", "scale-MILK", "1e999"), 400, None, "malformed"),
    (reading("r1", "scale-MILK", "12"), 400, "readings[0].value", "not_finite"),
    (reading("r1", "scale-MILK", 100, at=10**13), 400, "readings[0].at_ms", "future"),
    (reading("r1", "scale-MILK", 100, kind="rfid"), 422, "readings[0].kind", "wrong_kind"),
    (reading("r1", "rfid-MILK", 3, sku="BREAD"), 422, "readings[0].sku", "unmapped_sku"),
    (reading("r1", "uncal", 3), 422, "readings[0].sensor", "uncalibrated_sensor"),
    (reading("r1", "gone", 3), 422, "readings[0].sensor", "revoked_sensor"),
])
async def test_bad_readings_are_refused_and_change_nothing(
        http: aiohttp.ClientSession, node: Node, row: Json, status: int, field: str,
        reason: str) -> None:
    await setup_shelf(http)
    for sid, extra in (("uncal", {"calibrated_ms": None}),
                       ("gone", {"calibrated_ms": now_ms(), "status": "revoked"})):
        st, _ = await call(http, "PUT", f"/v1/sensors/{sid}", {
            "kind": "rfid", "zone": "z", "skus": ["MILK"], "txn_id": f"r-{sid}", **extra})
        assert st == 201
    ledger = node.durable.ledger.count()
    good = reading("ok1", "rfid-MILK", 10)
    raw = orjson.dumps({"readings": [good, row]})
    if field is None:  # NaN and infinities as a client's JSON encoder writes them
        raw = raw.replace(f'"{row["value"]}"'.encode(), row["value"].encode())
    st, body = await call(http, "POST", "/v1/sensors/readings", raw=raw)
    assert st == status, body
    if field is None:  # JSON has no NaN nor infinity: the body does not parse
        assert body["error"]["message"].startswith("malformed JSON")
    else:
        assert body["error"]["field"] == field.replace("[0]", "[1]")
    assert node.durable.ledger.count() == ledger
    from mesh.http.sensor_routes import SENSORS_KEY
    svc = node.app[SENSORS_KEY]
    assert svc.state.accepted == 0 and not svc.state.readings  # the good one too
    assert await metric(http, "storemesh_sensor_readings_refused_total", reason=reason) == 1


async def test_oversized_batches_are_refused(http: aiohttp.ClientSession) -> None:
    await setup_shelf(http)
    rows = [reading(f"r{i}", "rfid-MILK", 1) for i in range(config.SENSOR_MAX_BATCH + 1)]
    st, body = await post_readings(http, *rows[: config.SENSOR_MAX_BATCH + 1])
    assert st == 413 and body["error"]["field"] == "readings"
    big = b'{"readings": [' + b'"x",' * (10 * 1024 * 1024 // 4) + b'"x"]}'
    async with http.post("/v1/sensors/readings", data=io.BytesIO(big),
                         headers={"Content-Type": "application/json"}) as resp:
        assert resp.status == 413
    assert await metric(http, "storemesh_sensor_readings_refused_total",
                        reason="batch_too_large") == 1


async def test_two_agreeing_signals_auto_adjust_with_evidence(
        http: aiohttp.ClientSession) -> None:
    await setup_shelf(http)
    st, body = await post_readings(http, reading("s1", "scale-MILK", 700),
                                   reading("f1", "rfid-MILK", 7))
    assert st == 200 and body == {"accepted": 2, "duplicates": 0}
    st, done = await call(http, "POST", "/v1/sensors/reconcile")
    assert st == 200 and [a["delta"] for a in done["auto"]] == [-3]
    st, stock = await call(http, "GET", "/v1/stock/MILK")
    assert stock["on_hand"] == 7
    st, audit = await call(http, "GET", "/v1/audit?sku=MILK")
    adj = next(e for e in audit["entries"] if e["kind"] == "adjust")
    assert adj["reason"] == "sensor_reconcile"
    assert sorted(adj["evidence"]["readings"]) == ["f1", "s1"]
    assert adj["evidence"]["score"] >= 950
    # A rerun on the same readings changes nothing; a replayed batch is a duplicate.
    st, done = await call(http, "POST", "/v1/sensors/reconcile")
    assert done["auto"] == []
    st, body = await post_readings(http, reading("s1", "scale-MILK", 700))
    assert body == {"accepted": 0, "duplicates": 1}
    assert await metric(http, "storemesh_reconcile_actions_total", action="auto") == 1


async def test_one_signal_opens_a_review_that_staff_accept(
        http: aiohttp.ClientSession) -> None:
    await setup_shelf(http)
    await post_readings(http, reading("s1", "scale-MILK", 800))
    st, done = await call(http, "POST", "/v1/sensors/reconcile")
    assert done["auto"] == [] and [r["delta"] for r in done["review"]] == [-2]
    st, done = await call(http, "POST", "/v1/sensors/reconcile")
    assert done["review"] == []  # one open item per SKU
    st, body = await call(http, "GET", "/v1/reviews?sku=MILK")
    [item] = body["reviews"]
    assert item["why"] == "sensor_disagree" and item["evidence"] == ["s1"]
    rid = item["id"]
    st, body = await call(http, "POST", f"/v1/reviews/{rid}/resolve",
                          {"resolution": "bogus", "txn_id": "res-1"})
    assert st == 400 and body["error"]["field"] == "resolution"
    anna = await login(http, "", TOKENS["till"], "anna")  # a supervisor at the till
    st, body = await call(http, "POST", f"/v1/reviews/{rid}/resolve",
                          {"resolution": "accept", "txn_id": "res-1"}, headers=anna)
    assert st == 201 and body["open"] is False, body
    assert body["resolutions"][0]["staff_id"] == "anna"
    st, stock = await call(http, "GET", "/v1/stock/MILK")
    assert stock["on_hand"] == 8
    st, body = await call(http, "POST", f"/v1/reviews/{rid}/resolve",
                          {"resolution": "accept", "txn_id": "res-1", "staff_id": "anna"},
                          headers=anna)
    assert st == 200 and body["duplicate"] is True  # a replay
    st, body = await call(http, "POST", f"/v1/reviews/{rid}/resolve",
                          {"resolution": "reject", "txn_id": "res-2"})
    assert st == 409 and body["error"]["field"] == "review_id"
    st, stock = await call(http, "GET", "/v1/stock/MILK")
    assert stock["on_hand"] == 8


async def test_count_request_and_reject(http: aiohttp.ClientSession) -> None:
    await setup_shelf(http)
    await post_readings(http, reading("s1", "scale-MILK", 500))
    await call(http, "POST", "/v1/sensors/reconcile")
    st, body = await call(http, "GET", "/v1/reviews")
    rid = body["reviews"][0]["id"]
    st, body = await call(http, "POST", f"/v1/reviews/{rid}/resolve",
                          {"resolution": "count", "txn_id": "cnt-1"})
    assert st == 201
    st, body = await call(http, "GET", "/v1/reviews")
    [item] = body["reviews"]
    assert item["why"] == "count_requested" and item["evidence"] == [rid]
    st, body = await call(http, "POST", f"/v1/reviews/{item['id']}/resolve",
                          {"resolution": "reject", "txn_id": "rej-1"})
    assert st == 201
    st, body = await call(http, "GET", "/v1/reviews")
    assert body["reviews"] == []
    st, stock = await call(http, "GET", "/v1/stock/MILK")
    assert stock["on_hand"] == 10


async def test_drifting_scale_is_flagged_not_believed(http: aiohttp.ClientSession) -> None:
    await setup_shelf(http)
    t = now_ms() - 5_000
    for i in range(3):
        await post_readings(http, reading(f"f{i}", "rfid-MILK", 10, at=t + i * 1000),
                            reading(f"s{i}", "scale-MILK", 1300 + 50 * i, at=t + i * 1000 + 1))
    _, done = await call(http, "POST", "/v1/sensors/reconcile")
    assert done["drift"] == ["scale-MILK"] and done["auto"] == [] and done["review"] == []
    _, stock = await call(http, "GET", "/v1/stock/MILK")
    assert stock["on_hand"] == 10
    _, out = await call(http, "GET", "/v1/sensors/outcomes?sku=MILK")
    assert out["outcomes"][0]["drifting"] == ["scale-MILK"]
    _st, body = await call(http, "GET", "/v1/reviews?why=sensor_drift")
    assert [r["evidence"] for r in body["reviews"]] == [["scale-MILK"]]


async def test_phantom_stock_sale_of_absent_sku(http: aiohttp.ClientSession) -> None:
    await setup_shelf(http)
    t = now_ms() - 3_000
    await post_readings(http, reading("s1", "scale-MILK", 0, at=t),
                        reading("f1", "rfid-MILK", 0, at=t))
    st, _body = await call(http, "POST", "/v1/sales", {"sku": "MILK", "qty": 1,
                                                      "txn_id": "sale-1"})
    assert st == 201
    await asyncio.sleep(0.05)  # the listener sees the durable sale
    st, done = await call(http, "POST", "/v1/sensors/reconcile")
    assert [p["why"] for p in done["phantom"]] == ["absent_sale"]


async def test_replenishment_and_telemetry_alert(http: aiohttp.ClientSession,
                                                 node: Node) -> None:
    st, _ = await call(http, "POST", "/v1/receipts", {"sku": "EGGS", "qty": 2,
                                                      "txn_id": "rcv-eggs"})
    st, done = await call(http, "POST", "/v1/sensors/reconcile")
    assert [(s["sku"], s["suggested_qty"]) for s in done["replenish"]] == [("EGGS", 10)]
    st, done = await call(http, "POST", "/v1/sensors/reconcile")
    assert done["replenish"] == []  # deduplicated: one open suggestion per SKU
    st, body = await call(http, "GET", "/v1/replenishment")
    assert [i["sku"] for i in body["open"]] == ["EGGS"]
    assert await metric(http, "storemesh_replenishment_suggestions") == 1
    t0 = now_ms() - 11 * 60_000
    rows = [{"device": "cooler-1", "metric": "cooler_temp_c", "value": 6.5,
             "at_ms": t0 + i * 60_000} for i in range(11)]
    st, body = await call(http, "POST", "/v1/telemetry", {"readings": rows})
    assert st == 200 and [a["rule"] for a in body["alerts"]] == ["cooler_warm"]
    await asyncio.sleep(0.05)
    st, body = await call(http, "GET", "/v1/telemetry/alerts")
    assert [a["rule"] for a in body["alerts"]] == ["cooler_warm"]
    st, body = await call(http, "POST", "/v1/telemetry", {"readings": [
        {"device": "c", "metric": "m", "value": 1, "at_ms": 10**13}]})
    assert st == 400 and body["error"]["field"] == "readings[0].at_ms"


async def test_a_manual_count_settles_a_count_request(http: aiohttp.ClientSession,
                                                      node: Node) -> None:
    await setup_shelf(http)
    st, body = await call(http, "PUT", "/v1/sensors/count-staff", {
        "kind": "count", "zone": "dairy", "skus": ["MILK"], "calibrated_ms": now_ms(),
        "txn_id": "reg-count"})
    assert st == 201, body
    await post_readings(http, reading("s1", "scale-MILK", 600))
    await call(http, "POST", "/v1/sensors/reconcile")
    _, body = await call(http, "GET", "/v1/reviews")
    await call(http, "POST", f"/v1/reviews/{body['reviews'][0]['id']}/resolve",
               {"resolution": "count", "txn_id": "cnt-1"})
    st, body = await post_readings(http, reading("c1", "count-staff", 6))
    assert st == 200
    _, done = await call(http, "POST", "/v1/sensors/reconcile")
    assert [(a["sku"], a["delta"]) for a in done["auto"]] == [("MILK", -4)], done
    _, body = await call(http, "GET", "/v1/reviews")
    assert body["reviews"] == []  # the count request was settled by the count
    _, stock = await call(http, "GET", "/v1/stock/MILK")
    assert stock["on_hand"] == 6


async def test_the_registry_is_parsed_again_only_when_it_changed(
        http: aiohttp.ClientSession, node: Node) -> None:
    from mesh.http.sensor_routes import SENSORS_KEY

    await setup_shelf(http)
    svc = node.app[SENSORS_KEY]
    first = svc.sensors()
    assert svc.sensors() is first and sorted(first) == ["rfid-MILK", "scale-MILK"]
    await post_readings(http, reading("s1", "scale-MILK", 1000))
    assert svc.sensors() is first
    st, _ = await call(http, "PUT", "/v1/sensors/cam-1", {
        "kind": "vision", "zone": "dairy", "skus": ["MILK"], "calibrated_ms": now_ms(),
        "txn_id": "reg-cam"})
    assert st == 201
    assert "cam-1" in svc.sensors()


async def test_a_body_staff_id_on_a_resolution_is_refused_and_changes_nothing(
        http: aiohttp.ClientSession) -> None:
    """Who resolved an item is the staff session's, never the body's (DESIGN.md §7)."""
    await setup_shelf(http)
    await post_readings(http, reading("s1", "scale-MILK", 800))
    await call(http, "POST", "/v1/sensors/reconcile")
    _, body = await call(http, "GET", "/v1/reviews?sku=MILK")
    rid = body["reviews"][0]["id"]
    anna = await login(http, "", TOKENS["till"], "anna")
    for headers in (anna, None):  # at a till as someone else; a gateway naming anyone
        st, body = await call(http, "POST", f"/v1/reviews/{rid}/resolve",
                              {"resolution": "accept", "txn_id": "res-x",
                               "staff_id": "bob" if headers else "anna"}, headers=headers)
        assert st == 403 and body["error"]["field"] == "staff_id", body
    _, view = await call(http, "GET", f"/v1/reviews/{rid}")
    assert view["open"] is True and view["resolutions"] == []
    _, stock = await call(http, "GET", "/v1/stock/MILK")
    assert stock["on_hand"] == 10
    st, body = await call(http, "POST", f"/v1/reviews/{rid}/resolve",
                          {"resolution": "reject", "txn_id": "res-y"}, headers=anna)
    assert st == 201 and body["resolutions"][0]["staff_id"] == "anna"


async def test_a_manual_count_at_a_till_is_recorded_as_the_session_staffs(
        http: aiohttp.ClientSession) -> None:
    await setup_shelf(http)
    st, body = await call(http, "PUT", "/v1/sensors/count-dairy", {
        "kind": "count", "zone": "dairy", "skus": ["MILK"], "calibrated_ms": now_ms(),
        "txn_id": "reg-count"})
    assert st == 201, body
    anna = await login(http, "", TOKENS["till"], "anna")
    # the body cannot say who counted; a till posts counts only; a till needs a session
    st, body = await post_readings(http, reading("c0", "count-dairy", 7, staff_id="bob"))
    assert st == 400 and body["error"]["field"] == "readings[0].staff_id", body
    st, body = await call(http, "POST", "/v1/sensors/readings",
                          {"readings": [reading("s0", "scale-MILK", 700)]}, headers=anna)
    assert st == 403 and body["error"]["field"] == "readings", body
    st, body = await call(http, "POST", "/v1/sensors/readings",
                          {"readings": [reading("c1", "count-dairy", 7)]},
                          headers=bearer(TOKENS["till"]))
    assert st == 401 and body["error"]["field"] == "X-Staff-Session", body
    assert await metric(http, "storemesh_sensor_readings_total", outcome="accepted") == 0
    st, body = await call(http, "POST", "/v1/sensors/readings",
                          {"readings": [reading("c1", "count-dairy", 7)]}, headers=anna)
    assert st == 200 and body["accepted"] == 1, body
    _, done = await call(http, "POST", "/v1/sensors/reconcile")
    assert [(a["sku"], a["delta"]) for a in done["auto"]] == [("MILK", -3)], done
    _, audit = await call(http, "GET", "/v1/audit?sku=MILK")
    [adj] = [e for e in audit["entries"] if e["reason"] == "sensor_reconcile"]
    assert adj["staff_id"] == "anna" and adj["evidence"]["readings"] == ["c1"], adj


async def test_readings_and_reservation_times_survive_a_restart(tmp_path: Path) -> None:
    """The edge is closed and started again on its data dir: readings taken before (two
    signals agreeing on shrink) still settle the shelf, a replayed batch is still a
    duplicate, and a reservation made before is still caught past its pick window."""
    edge = tmp_path / "edge"
    init_store(edge, "store-1", now_ms=now_ms(), node_id="edge")
    (edge / "sensor_rules.json").write_bytes(orjson.dumps({
        "version": 1, "phantom": {"pick_window_ms": 1_000, "zone_shrink_repeat": 3,
                                  "zone_shrink_window_ms": 86_400_000}}))
    token = issue_token(edge)
    async with running_node(edge) as n, aiohttp.ClientSession(
            base_url=n.url, headers=bearer(token)) as http:
        await setup_shelf(http)
        await asyncio.sleep(0.01)  # readings after the receipt (reconcile invariant 5)
        before = [reading("s1", "scale-MILK", 700), reading("f1", "rfid-MILK", 7)]
        st, body = await post_readings(http, *before)
        assert body == {"accepted": 2, "duplicates": 0}
        st, body = await call(http, "POST", "/v1/reservations", {
            "sku": "MILK", "qty": 1, "channel": "web", "txn_id": "res-1"})
        assert st == 201, body
        await wait_until(lambda: len(n.app[SENSORS_KEY_].reserved_at) == 1, 5, "reserve")
    assert (edge / "sensors.sqlite").exists()
    await asyncio.sleep(1.1)  # past the pick window
    async with running_node(edge) as n, aiohttp.ClientSession(
            base_url=n.url, headers=bearer(token)) as http:
        st, body = await post_readings(http, *before)
        assert body == {"accepted": 0, "duplicates": 2}
        _, done = await call(http, "POST", "/v1/sensors/reconcile")
        assert [(a["sku"], a["delta"]) for a in done["auto"]] == [("MILK", -3)], done
        assert [p["why"] for p in done["phantom"]] == ["phantom_reservation"], done
        _, audit = await call(http, "GET", "/v1/audit?sku=MILK")
        [adj] = [e for e in audit["entries"] if e["reason"] == "sensor_reconcile"]
        assert sorted(adj["evidence"]["readings"]) == ["f1", "s1"]
        assert await metric(http, "storemesh_sensor_store_errors_total") == 0
        # the SKU's last stock movement was kept too (reconcile invariant 5)
        assert n.app[SENSORS_KEY_].moved["MILK"] >= max(r["at_ms"] for r in before) - 5


async def test_a_sale_after_the_readings_makes_them_no_signal(
        http: aiohttp.ClientSession) -> None:
    """Reconcile invariant 5 at the node: readings taken before a sale did not see it; a
    run then adjusts nothing, and new readings settle the shelf."""
    await setup_shelf(http)
    await asyncio.sleep(0.01)
    await post_readings(http, reading("s1", "scale-MILK", 700), reading("f1", "rfid-MILK", 7))
    await asyncio.sleep(0.01)
    st, _ = await call(http, "POST", "/v1/sales", {"sku": "MILK", "qty": 1, "txn_id": "s-1"})
    assert st == 201
    await asyncio.sleep(0.05)  # the listener sees the durable sale
    _, done = await call(http, "POST", "/v1/sensors/reconcile")
    assert done["auto"] == [] and done["review"] == [], done
    await post_readings(http, reading("s2", "scale-MILK", 700), reading("f2", "rfid-MILK", 7))
    _, done = await call(http, "POST", "/v1/sensors/reconcile")
    assert [(a["sku"], a["delta"]) for a in done["auto"]] == [("MILK", -2)], done


async def test_the_sensor_store_is_bounded(tmp_path: Path) -> None:
    from mesh.core.sensors import Reading
    from mesh.store.sensorstore import SensorStore

    store = SensorStore(tmp_path)
    now = now_ms()
    rows = [Reading(f"r{i}", "s", "weight", "A", float(i), now - 1000 + i) for i in range(40)]
    store.add_readings(rows[:20])
    store.add_readings(rows[20:]).result()
    store.add_recent([("sale", f"k{i}", "A", now + i, -1) for i in range(5)]).result()
    store.close()
    store = SensorStore(tmp_path)
    kept, recent = store.load(now - 1000 + 30 + config.SENSOR_MAX_AGE_MS)
    store.close()
    # the newest KEPT, less those now older than SENSOR_MAX_AGE_MS
    assert [r.id for r in kept] == [f"r{i}" for i in range(40 - config.SENSOR_READINGS_KEPT, 40)
                                    if i >= 30]
    assert [k for _, k, *_ in recent] == [f"k{i}" for i in range(5)]

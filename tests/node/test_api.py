"""The HTTP API over real HTTP against a real Node on 127.0.0.1 (ephemeral ports)."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import pytest_asyncio
from prometheus_client.parser import text_string_to_metric_families

from mesh.http import api
from mesh.http import common as http_common
from mesh.node.node import Node
from mesh.store.datadir import enrol_node, init_store
from tests.meshkit import client, issue_token, now_ms, running_node, use_token, wait_until

pytestmark = pytest.mark.asyncio

Json = Any




@pytest_asyncio.fixture
async def node(tmp_path: Path) -> AsyncIterator[Node]:
    init_store(tmp_path / "edge", "store-1", now_ms=now_ms(), node_id="edge")
    async with running_node(tmp_path / "edge") as n:
        yield n


@pytest_asyncio.fixture
async def http(node: Node) -> AsyncIterator[aiohttp.ClientSession]:
    use_token(issue_token(node.identity))
    async with client(base_url=node.url) as session:
        yield session


async def call(http: aiohttp.ClientSession, method: str, path: str, body: Json = None, *,
               raw: bytes | None = None, headers: dict[str, str] | None = None
               ) -> tuple[int, Json]:
    data = raw if raw is not None else (None if body is None else orjson.dumps(body))
    hdrs = {"Content-Type": "application/json", **(headers or {})}
    async with http.request(method, path, data=data, headers=hdrs) as resp:
        assert resp.content_type == "application/json", await resp.text()
        return resp.status, orjson.loads(await resp.read())


async def post(http: aiohttp.ClientSession, path: str, body: Json = None, **kw: Any
               ) -> tuple[int, Json]:
    return await call(http, "POST", path, body, **kw)


async def get(http: aiohttp.ClientSession, path: str) -> tuple[int, Json]:
    return await call(http, "GET", path)


async def receive(http: aiohttp.ClientSession, sku: str, qty: int, txn: str) -> Json:
    status, body = await post(http, "/v1/receipts", {"sku": sku, "qty": qty, "txn_id": txn})
    assert status == 201, body
    return body


async def snapshot(http: aiohttp.ClientSession, node: Node, sku: str) -> tuple[Json, int]:
    """What must not change when a request is refused: the SKU's stock and the ledger."""
    status, stock = await get(http, f"/v1/stock/{sku}")
    assert status == 200, stock
    stock.pop("staleness_ms")
    return stock, await asyncio.to_thread(node.durable.ledger.count)


# --- commands ------------------------------------------------------------------------------


async def test_receipt_sale_return_adjustment(http: aiohttp.ClientSession, node: Node) -> None:
    body = await receive(http, "SKU-1", 10, "t-rcv")
    assert body == {"txn_id": "t-rcv", "origin": "edge", "seq": 1, "duplicate": False,
                    "sku": "SKU-1", "on_hand": 10, "reserved": 0, "available": 10}

    status, body = await post(http, "/v1/sales", {"sku": "SKU-1", "qty": 3, "txn_id": "t-sale",
                                                  "note": "till 2"})
    assert (status, body["seq"], body["on_hand"], body["available"]) == (201, 2, 7, 7)

    status, body = await post(http, "/v1/returns", {"sku": "SKU-1", "qty": 1, "txn_id": "t-ret",
                                                    "reason": "unwanted"})
    assert (status, body["on_hand"]) == (201, 8)

    status, body = await post(http, "/v1/adjustments", {"sku": "SKU-1", "delta": -2,
                                                        "reason": "damaged", "txn_id": "t-adj"})
    assert (status, body["seq"], body["on_hand"]) == (201, 4, 6)

    status, stock = await get(http, "/v1/stock/SKU-1")
    assert status == 200
    assert stock["on_hand"] == 6 and stock["reserved"] == 0 and stock["available"] == 6
    assert abs(stock["last_change_ms"] - now_ms()) < 60_000
    assert stock["staleness_ms"] is None  # no peers
    assert await asyncio.to_thread(node.durable.ledger.count) == 4


async def test_strict_sale_refuses_what_is_not_there_and_plain_sale_oversells(
        http: aiohttp.ClientSession, node: Node) -> None:
    await receive(http, "S", 2, "r")
    before = await snapshot(http, node, "S")
    status, body = await post(http, "/v1/sales", {"sku": "S", "qty": 3, "txn_id": "web-1",
                                                  "strict": True})
    assert status == 409 and body["error"]["field"] == "qty"
    assert "available" in body["error"]["message"]
    assert await snapshot(http, node, "S") == before

    status, body = await post(http, "/v1/sales", {"sku": "S", "qty": 3, "txn_id": "till-1"})
    assert status == 201 and body["available"] == -1

    status, exc = await get(http, "/v1/exceptions")
    assert status == 200
    assert exc["totals"] == {"count": 1, "short_units": 1,
                             "by_sku": {"S": {"count": 1, "short_units": 1}}}
    [item] = exc["exceptions"]
    assert item["sku"] == "S" and item["origin"] == "edge" and item["seq"] == 2
    assert item["kind"] == "sale" and item["short"] == 1 and item["at_ms"] == item["hlc"] >> 16
    status, none = await get(http, "/v1/exceptions?sku=OTHER")
    assert status == 200 and none["exceptions"] == [] and none["totals"]["count"] == 0


async def test_reservation_lifecycle(http: aiohttp.ClientSession, node: Node) -> None:
    await receive(http, "BOPIS", 5, "r")
    status, res = await post(http, "/v1/reservations", {
        "sku": "BOPIS", "qty": 2, "txn_id": "order-77", "channel": "web", "order": "W-77",
        "expires_ms": now_ms() + 3_600_000})
    assert status == 201, res
    rid = res["reservation_id"]
    assert rid == "edge:test-svc:order-77"
    assert (res["on_hand"], res["reserved"], res["available"]) == (5, 2, 3)

    status, listing = await get(http, "/v1/reservations?sku=BOPIS")
    assert status == 200
    [rec] = listing["reservations"]
    assert rec["reservation_id"] == rid and rec["qty"] == 2 and rec["channel"] == "web"
    assert rec["order"] == "W-77" and listing["next"] is None
    status, listing = await get(http, "/v1/reservations?sku=OTHER")
    assert listing["reservations"] == []

    status, res2 = await post(http, "/v1/reservations", {
        "sku": "BOPIS", "qty": 1, "txn_id": "order-78", "channel": "web"})
    assert status == 201
    status, rel = await post(http, f"/v1/reservations/{res2['reservation_id']}/release",
                             {"txn_id": "cancel-78", "reason": "customer_cancelled"})
    assert status == 201, rel
    assert (rel["reservation_id"], rel["reserved"], rel["available"]) == (
        res2["reservation_id"], 2, 3)

    status, ful = await post(http, f"/v1/reservations/{rid}/fulfil", {"txn_id": "pickup-77"})
    assert status == 201, ful
    assert (ful["on_hand"], ful["reserved"], ful["available"]) == (3, 0, 3)
    status, listing = await get(http, "/v1/reservations")
    assert listing["reservations"] == []


async def test_reservation_refusals_change_nothing(http: aiohttp.ClientSession,
                                                   node: Node) -> None:
    await receive(http, "R", 2, "r")
    status, res = await post(http, "/v1/reservations", {"sku": "R", "qty": 1, "txn_id": "o1",
                                                        "channel": "web"})
    assert status == 201
    rid = res["reservation_id"]
    status, _ = await post(http, f"/v1/reservations/{rid}/release", {"txn_id": "c1"})
    assert status == 201
    before = await snapshot(http, node, "R")

    cases: list[tuple[str, Json, int, str | None]] = [
        # more than is available: a promise we cannot keep
        ("/v1/reservations", {"sku": "R", "qty": 3, "txn_id": "o2", "channel": "web"},
         409, "qty"),
        ("/v1/reservations", {"sku": "NOPE", "qty": 1, "txn_id": "o3", "channel": "web"},
         404, "sku"),
        ("/v1/reservations", {"sku": "R", "qty": 1, "txn_id": "o4"}, 400, "channel"),
        ("/v1/reservations", {"sku": "R", "qty": 1, "txn_id": "o5", "channel": "web",
                              "expires_ms": -5}, 400, "expires_ms"),
        ("/v1/reservations", {"sku": "R", "qty": 1, "txn_id": "o6", "channel": "web",
                              "order": "x" * 513}, 400, "order"),
        # already released (a different txn): it exists but is not active
        (f"/v1/reservations/{rid}/release", {"txn_id": "c2"}, 409, "reservation_id"),
        (f"/v1/reservations/{rid}/fulfil", {"txn_id": "f1"}, 409, "reservation_id"),
        ("/v1/reservations/edge:never/release", {"txn_id": "c3"}, 404, "reservation_id"),
        ("/v1/reservations/edge:never/fulfil", {"txn_id": "f2"}, 404, "reservation_id"),
        (f"/v1/reservations/{rid}/fulfil", {"txn_id": "f3", "qty": 1}, 400, "qty"),
    ]
    for path, body, want_status, want_field in cases:
        status, err = await post(http, path, body)
        assert (status, err["error"]["field"]) == (want_status, want_field), (path, body, err)
        assert err["error"]["message"]
    assert await snapshot(http, node, "R") == before


# --- idempotency -----------------------------------------------------------------------------


async def test_replay_returns_the_original_and_changes_nothing(
        http: aiohttp.ClientSession, node: Node) -> None:
    await receive(http, "I", 10, "r")
    sale = {"sku": "I", "qty": 4, "txn_id": "till-9-0001"}
    status, first = await post(http, "/v1/sales", sale)
    assert status == 201 and first["duplicate"] is False
    before = await snapshot(http, node, "I")

    status, again = await post(http, "/v1/sales", sale)
    assert status == 200
    assert again["duplicate"] is True
    assert (again["origin"], again["seq"]) == (first["origin"], first["seq"])
    assert again["on_hand"] == 6
    assert await snapshot(http, node, "I") == before

    # the key may come in the Idempotency-Key header instead of the body
    body = {"sku": "I", "qty": 1}
    status, h1 = await post(http, "/v1/sales", body, headers={"Idempotency-Key": "k-1"})
    assert status == 201 and h1["txn_id"] == "k-1"
    status, h2 = await post(http, "/v1/sales", body, headers={"Idempotency-Key": "k-1"})
    assert status == 200 and h2["duplicate"] is True and h2["seq"] == h1["seq"]
    status, h3 = await post(http, "/v1/sales", {**body, "txn_id": "k-1"},
                            headers={"Idempotency-Key": "k-1"})
    assert status == 200 and h3["seq"] == h1["seq"]

    # a reservation replay returns the same reservation id, even once stock ran out
    status, r1 = await post(http, "/v1/reservations", {"sku": "I", "qty": 5, "txn_id": "o-1",
                                                       "channel": "web"})
    assert status == 201
    status, r2 = await post(http, "/v1/reservations", {"sku": "I", "qty": 5, "txn_id": "o-1",
                                                       "channel": "web"})
    assert status == 200 and r2["reservation_id"] == r1["reservation_id"]
    assert r2["seq"] == r1["seq"] and r2["reserved"] == 5


async def test_idempotency_key_misuse_is_refused(http: aiohttp.ClientSession,
                                                 node: Node) -> None:
    await receive(http, "K", 10, "r")
    status, _ = await post(http, "/v1/sales", {"sku": "K", "qty": 1, "txn_id": "t1"})
    assert status == 201
    before = await snapshot(http, node, "K")

    # the same key for different content: refused, the original stands
    status, err = await post(http, "/v1/sales", {"sku": "K", "qty": 2, "txn_id": "t1"})
    assert status == 422 and err["error"]["field"] == "txn_id"
    status, err = await post(http, "/v1/returns", {"sku": "K", "qty": 1, "txn_id": "t1"})
    assert status == 422 and err["error"]["field"] == "txn_id"
    # header and body disagree
    status, err = await post(http, "/v1/sales", {"sku": "K", "qty": 1, "txn_id": "t2"},
                             headers={"Idempotency-Key": "t3"})
    assert status == 400 and err["error"]["field"] == "txn_id"
    # no key at all
    status, err = await post(http, "/v1/sales", {"sku": "K", "qty": 1})
    assert status == 400 and err["error"]["field"] == "txn_id"
    status, err = await post(http, "/v1/sales", {"sku": "K", "qty": 1},
                             headers={"Idempotency-Key": "x" * 129})
    assert status == 400 and err["error"]["field"] == "txn_id"
    assert await snapshot(http, node, "K") == before


# --- bad input ---------------------------------------------------------------------------------

OK_SALE = {"sku": "B", "qty": 1, "txn_id": "bad-1"}
BAD_BODIES: list[tuple[str, str, Json, int, str | None]] = [
    ("not an object", "/v1/sales", [1, 2], 400, None),
    ("a string", "/v1/sales", "sale", 400, None),
    ("missing sku", "/v1/sales", {"qty": 1, "txn_id": "x"}, 400, "sku"),
    ("missing qty", "/v1/sales", {"sku": "B", "txn_id": "x"}, 400, "qty"),
    ("unknown field", "/v1/sales", {**OK_SALE, "colour": "red"}, 400, "colour"),
    ("qty string", "/v1/sales", {**OK_SALE, "qty": "3"}, 400, "qty"),
    ("qty bool", "/v1/sales", {**OK_SALE, "qty": True}, 400, "qty"),
    ("qty float", "/v1/sales", {**OK_SALE, "qty": 1.5}, 400, "qty"),
    ("qty zero", "/v1/sales", {**OK_SALE, "qty": 0}, 400, "qty"),
    ("qty negative", "/v1/sales", {**OK_SALE, "qty": -1}, 400, "qty"),
    ("qty huge", "/v1/sales", {**OK_SALE, "qty": 10**7}, 400, "qty"),
    ("qty null", "/v1/sales", {**OK_SALE, "qty": None}, 400, "qty"),
    ("sku empty", "/v1/sales", {**OK_SALE, "sku": ""}, 400, "sku"),
    ("sku too long", "/v1/sales", {**OK_SALE, "sku": "S" * 129}, 400, "sku"),
    ("sku number", "/v1/sales", {**OK_SALE, "sku": 12}, 400, "sku"),
    ("txn too long", "/v1/sales", {**OK_SALE, "txn_id": "t" * 129}, 400, "txn_id"),
    ("staff too long", "/v1/sales", {**OK_SALE, "staff_id": "s" * 129}, 400, "staff_id"),
    ("note too long", "/v1/sales", {**OK_SALE, "note": "n" * 513}, 400, "note"),
    ("strict not bool", "/v1/sales", {**OK_SALE, "strict": "yes"}, 400, "strict"),
    ("reason on a sale", "/v1/sales", {**OK_SALE, "reason": "x"}, 400, "reason"),
    ("unknown sku", "/v1/sales", {**OK_SALE, "sku": "NEVER"}, 404, "sku"),
    ("return unknown sku", "/v1/returns", {**OK_SALE, "sku": "NEVER"}, 404, "sku"),
    ("receipt qty zero", "/v1/receipts", {**OK_SALE, "qty": 0}, 400, "qty"),
    ("return reason empty", "/v1/returns", {**OK_SALE, "reason": ""}, 400, "reason"),
    ("delta zero", "/v1/adjustments", {"sku": "B", "delta": 0, "reason": "r", "txn_id": "x"},
     400, "delta"),
    ("delta bool", "/v1/adjustments", {"sku": "B", "delta": False, "reason": "r",
                                       "txn_id": "x"}, 400, "delta"),
    ("adjust no reason", "/v1/adjustments", {"sku": "B", "delta": 1, "txn_id": "x"},
     400, "reason"),
    ("adjust with qty", "/v1/adjustments", {"sku": "B", "qty": 1, "delta": 1, "reason": "r",
                                            "txn_id": "x"}, 400, "qty"),
]


@pytest.mark.parametrize(("case", "path", "body", "status", "field"), BAD_BODIES,
                         ids=[c[0] for c in BAD_BODIES])
async def test_bad_input_is_refused_naming_the_field_and_changes_nothing(
        http: aiohttp.ClientSession, node: Node, case: str, path: str, body: Json,
        status: int, field: str | None) -> None:
    await receive(http, "B", 5, "r")
    before = await snapshot(http, node, "B")
    got_status, err = await post(http, path, body)
    assert got_status == status, err
    assert set(err) == {"error"} and err["error"]["field"] == field
    assert isinstance(err["error"]["message"], str) and err["error"]["message"]
    assert await snapshot(http, node, "B") == before


async def test_unparseable_and_oversized_bodies(http: aiohttp.ClientSession,
                                                node: Node) -> None:
    await receive(http, "B", 5, "r")
    before = await snapshot(http, node, "B")
    for raw in (b"{not json", b"", b"   ", b'{"sku": "B", "qty": 1,', b"\xff\xfe"):
        status, err = await post(http, "/v1/sales", raw=raw)
        assert status == 400 and err["error"]["field"] is None, (raw, err)

    big = orjson.dumps({**OK_SALE, "note": "n" * (http_common.MAX_BODY_BYTES + 10)})
    status, err = await post(http, "/v1/sales", raw=big)
    assert status == 413 and err["error"]["field"] is None
    assert str(http_common.MAX_BODY_BYTES) in err["error"]["message"]

    async def chunked() -> AsyncIterator[bytes]:  # no Content-Length: caught while reading
        for _ in range(5):
            yield b" " * (20 * 1024)
        yield orjson.dumps(OK_SALE)

    async with http.post("/v1/sales", data=chunked()) as resp:
        assert resp.status == 413
        assert (await resp.json())["error"]["field"] is None
    assert await snapshot(http, node, "B") == before


async def test_an_unexpected_failure_is_a_logged_500_and_the_server_keeps_serving(
        http: aiohttp.ClientSession, node: Node, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    await receive(http, "U", 1, "r")

    def broken(sku: str | None = None) -> list[Any]:
        raise RuntimeError("injected fault")

    monkeypatch.setattr(node.replica, "exceptions", broken)
    with caplog.at_level(logging.ERROR, logger="mesh.http.api"):
        status, err = await get(http, "/v1/exceptions")
    assert status == 500 and err["error"]["field"] is None
    assert any(r.exc_info and "injected fault" in str(r.exc_info[1]) for r in caplog.records)
    status, stock = await get(http, "/v1/stock/U")
    assert status == 200 and stock["on_hand"] == 1


async def test_unknown_routes_and_methods_answer_json(http: aiohttp.ClientSession) -> None:
    status, err = await get(http, "/v1/nothing-here")
    assert status == 404 and "/v1/nothing-here" in err["error"]["message"]
    status, err = await call(http, "DELETE", "/v1/sales")
    assert status == 405 and err["error"]["field"] is None


async def set_disk_quota(node: Node, *, full: bool) -> None:
    """Simulate a full disk: cap the ledger at its current size (or lift the cap)."""
    def quota(conn: sqlite3.Connection) -> None:
        pages = conn.execute("PRAGMA page_count").fetchone()[0]
        conn.execute(f"PRAGMA max_page_count={pages if full else 1 << 30}")
    await asyncio.to_thread(node.durable.ledger._job, quota, "quota")


async def test_disk_full_is_507_and_a_retry_with_the_same_key_counts_once(
        http: aiohttp.ClientSession, node: Node) -> None:
    await receive(http, "F", 1, "r0")
    await set_disk_quota(node, full=True)
    failed: Json = None
    for i in range(1, 50):  # each receipt takes ~1 KB: a new page is needed within a few
        body = {"sku": "F", "qty": 1, "txn_id": f"r{i}", "note": "n" * 500}
        status, reply = await post(http, "/v1/receipts", body)
        if status != 201:
            failed = body
            break
    assert status == 507, reply
    assert reply["error"]["field"] is None and "disk is full" in reply["error"]["message"]
    status, health = await get(http, "/v1/health")
    assert status == 503 and health["status"] == "degraded"
    assert "disk full" in health["reason"]
    durable = await asyncio.to_thread(node.durable.ledger.count)

    await set_disk_quota(node, full=False)
    status, reply = await post(http, "/v1/receipts", failed)
    assert status == 201 and reply["duplicate"] is False  # it was not recorded before
    assert reply["on_hand"] == durable + 1
    assert await asyncio.to_thread(node.durable.ledger.count) == durable + 1
    status, health = await get(http, "/v1/health")
    assert status == 200 and health["status"] == "ok"


# --- queries ---------------------------------------------------------------------------------


async def test_stock_queries(http: aiohttp.ClientSession) -> None:
    status, err = await get(http, "/v1/stock/NEVER-SEEN")
    assert status == 404 and err["error"]["field"] == "sku"
    status, err = await get(http, "/v1/stock/" + "x" * 129)
    assert status == 400 and err["error"]["field"] == "sku"

    for sku in ("C", "A", "B"):
        await receive(http, sku, 1, f"r-{sku}")
    await receive(http, "10/20 blue", 1, "r-slash")  # a SKU with a slash: percent-encode
    status, body = await get(http, "/v1/stock/10%2F20%20blue")
    assert status == 200 and body["sku"] == "10/20 blue"
    status, body = await get(http, "/v1/stock")
    assert status == 200
    assert [s["sku"] for s in body["stock"]] == ["10/20 blue", "A", "B", "C"]
    assert body["next"] is None
    assert set(body["stock"][0]) == {"sku", "on_hand", "reserved", "available",
                                     "last_change_ms", "staleness_ms"}
    status, page = await get(http, "/v1/stock?limit=2&after=10%2F20%20blue")
    assert [s["sku"] for s in page["stock"]] == ["A", "B"] and page["next"] == "B"
    status, page = await get(http, "/v1/stock?limit=2&after=B")
    assert [s["sku"] for s in page["stock"]] == ["C"] and page["next"] is None
    status, err = await get(http, "/v1/stock?limit=0")
    assert status == 400 and err["error"]["field"] == "limit"
    status, err = await get(http, "/v1/stock?limit=ten")
    assert status == 400 and err["error"]["field"] == "limit"


async def test_health_and_peers(http: aiohttp.ClientSession, node: Node) -> None:
    await receive(http, "H", 1, "r")
    status, health = await get(http, "/v1/health")
    assert status == 200
    assert health["status"] == "ok"
    assert (health["node_id"], health["store_id"], health["role"]) == ("edge", "store-1", "edge")
    assert health["peers_up"] == 0 and health["envelopes"] == 1
    assert 0 <= health["uptime_s"] < 120

    status, peers = await get(http, "/v1/peers")
    assert status == 200
    assert peers == {"node_id": "edge", "store_id": "store-1", "role": "edge", "peers": []}


async def test_audit_shows_who_when_why_newest_first(http: aiohttp.ClientSession,
                                                     node: Node) -> None:
    await receive(http, "A1", 10, "r-a1")
    await receive(http, "A2", 10, "r-a2")
    await post(http, "/v1/sales", {"sku": "A1", "qty": 1, "txn_id": "s1"})
    await post(http, "/v1/adjustments", {"sku": "A1", "delta": -1, "reason": "shrink",
                                         "txn_id": "adj", "note": "found torn"})
    status, res = await post(http, "/v1/reservations", {"sku": "A1", "qty": 2, "txn_id": "o",
                                                        "channel": "web"})
    await post(http, f"/v1/reservations/{res['reservation_id']}/release",
               {"txn_id": "rel"})

    status, audit = await get(http, "/v1/audit?limit=3")
    assert status == 200
    entries = audit["entries"]
    assert [e["kind"] for e in entries] == ["release", "reserve", "adjust"]
    assert [e["seq"] for e in entries] == [6, 5, 4]
    assert audit["next_before"] == entries[-1]["row"]
    rel, _, adj = entries
    # who: the device (txn keys are scoped to it); a service device has no staff login
    assert rel["device_id"] == "test-svc" and rel["staff_id"] is None
    assert rel["reservation_id"] == "edge:test-svc:o"
    assert (adj["origin"], adj["reason"], adj["note"], adj["qty"]) == (
        "edge", "shrink", "found torn", -1)
    assert abs(adj["at_ms"] - now_ms()) < 60_000 and adj["at_ms"] == adj["hlc"] >> 16
    assert len(adj["hash"]) == 64

    status, rest = await get(http, f"/v1/audit?before={audit['next_before']}")
    assert [e["seq"] for e in rest["entries"]] == [3, 2, 1] and rest["next_before"] is None

    # the SKU filter includes the release, which names only the reservation
    status, a1 = await get(http, "/v1/audit?sku=A1")
    assert [e["txn_id"] for e in a1["entries"]] == ["rel", "o", "adj", "s1", "r-a1"]
    assert a1["entries"][3]["device_id"] == "test-svc"

    for bad in ("limit=0", "limit=1001", "before=0", "sku=" + "x" * 129):
        status, err = await get(http, f"/v1/audit?{bad}")
        assert status == 400 and err["error"]["field"] == bad.split("=")[0], bad


# --- live events -------------------------------------------------------------------------------


async def read_event(resp: aiohttp.ClientResponse) -> tuple[str | None, Json]:
    """The next SSE event (skips comments and retry lines)."""
    name: str | None = None
    while True:
        line = (await asyncio.wait_for(resp.content.readline(), 5)).decode()
        if line.startswith("event: "):
            name = line[7:].strip()
        elif line.startswith("data: "):
            return name, orjson.loads(line[6:])


async def test_events_stream_a_sale_made_after_subscribing(http: aiohttp.ClientSession,
                                                           node: Node) -> None:
    await receive(http, "E", 5, "r")
    async with http.get("/v1/events") as resp:
        assert resp.status == 200
        assert resp.content_type == "text/event-stream"
        assert await asyncio.wait_for(resp.content.readline(), 5) == b"retry: 2000\n"
        assert node.subscriber_count == 1
        status, _ = await post(http, "/v1/sales", {"sku": "E", "qty": 2, "txn_id": "s"})
        assert status == 201
        name, event = await read_event(resp)
        assert name is None
        assert {k: event[k] for k in ("sku", "on_hand", "reserved", "available", "origin",
                                      "seq", "kind")} == {
            "sku": "E", "on_hand": 3, "reserved": 0, "available": 3, "origin": "edge",
            "seq": 2, "kind": "sale"}
        assert event["at_ms"] == event["hlc"] >> 16
    # the client went away: the stream notices on its next write and unsubscribes
    await wait_until(lambda: node.subscriber_count == 0, 20, "the stream to unsubscribe")


async def test_events_keepalive_and_unsubscribe(http: aiohttp.ClientSession, node: Node,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(api, "SSE_KEEPALIVE_S", 0.05)
    async with http.get("/v1/events") as resp:
        lines = [await asyncio.wait_for(resp.content.readline(), 5) for _ in range(5)]
        assert b": keepalive\n" in lines
    await wait_until(lambda: node.subscriber_count == 0, 5, "the stream to unsubscribe")


async def test_a_slow_subscriber_is_told_it_overflowed(http: aiohttp.ClientSession,
                                                       node: Node) -> None:
    await receive(http, "O", 5, "r")
    async with http.get("/v1/events") as resp:
        await asyncio.wait_for(resp.content.readline(), 5)
        # A burst the stream cannot drain in time: make a durable sale, fill the queue,
        # and publish the sale before the stream task gets to run (no await between).
        [queue] = list(node._subscribers)
        result, fut = node.durable.execute(
            lambda r: r.sell("O", 1, txn="s", now_ms=node.now_ms()))
        await asyncio.wrap_future(fut)
        while not queue.full():
            queue.put_nowait({"sku": "O", "filler": True})
        assert result.envelope is not None
        node._publish([result.envelope])
        while True:
            name, event = await read_event(resp)
            if name is not None:
                break
        assert (name, event) == ("overflow", {"type": "overflow"})
        assert await asyncio.wait_for(resp.content.read(), 5) == b"\n"  # then the end
    assert node.subscriber_count == 0


async def test_closing_the_node_ends_open_streams(tmp_path: Path) -> None:
    init_store(tmp_path / "n", "store-1", now_ms=now_ms(), node_id="edge")
    n = Node(tmp_path / "n", insecure_plaintext=True,
             http_host="127.0.0.1", http_port=0, discovery=False)
    await n.start()
    use_token(issue_token(n.identity))
    async with client(base_url=n.url) as http:
        async with http.get("/v1/events") as resp:
            await asyncio.wait_for(resp.content.readline(), 5)
            t0 = time.monotonic()
            await asyncio.wait_for(n.close(), 10)
            assert time.monotonic() - t0 < 5  # not held up by the open stream
            name, _ = await read_event(resp)
            assert name == "shutdown"


# --- metrics ---------------------------------------------------------------------------------


async def scrape(http: aiohttp.ClientSession) -> dict[tuple[str, tuple[tuple[str, str], ...]],
                                                       float]:
    async with http.get("/metrics") as resp:
        assert resp.status == 200
        assert resp.content_type == "text/plain"
        text = await resp.text()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


async def test_metrics_parse_and_count_a_refused_session(http: aiohttp.ClientSession,
                                                         node: Node) -> None:
    await receive(http, "M", 3, "r")
    await post(http, "/v1/sales", {"sku": "M", "qty": 5, "txn_id": "s"})  # oversells 2
    m = await scrape(http)
    for name in ("storemesh_envelopes_received_total", "storemesh_envelopes_sent_total",
                 "storemesh_peers_up", "storemesh_pending_envelopes", "storemesh_subscribers"):
        assert m[(name, ())] == 0, name
    assert m[("storemesh_ledger_envelopes", ())] == 2
    assert m[("storemesh_ledger_bytes", ())] > 0
    assert m[("storemesh_oversold_units", ())] == 2
    assert m[("storemesh_sync_bytes_total", (("direction", "in"),))] == 0
    assert not [k for k in m if k[0] == "storemesh_envelopes_rejected_total"]

    # a node of another store knocks: the handshake refuses it, and it is counted
    async with http.ws_connect("/v1/sync") as ws:
        await ws.send_str(orjson.dumps({"t": "hello", "proto": 1, "store": "store-2",
                                        "node": "intruder", "nonce": "00" * 32}).decode())
        msg = await asyncio.wait_for(ws.receive(), 5)
        assert msg.type == aiohttp.WSMsgType.CLOSE
    m = await scrape(http)
    rejected = m[("storemesh_envelopes_rejected_total", (("reason", "session_wrong_store"),))]
    assert rejected == 1


async def test_metrics_registries_are_per_node(tmp_path: Path, http: aiohttp.ClientSession,
                                               node: Node) -> None:
    init_store(tmp_path / "other", "store-9", now_ms=now_ms(), node_id="other")
    other = Node(tmp_path / "other", insecure_plaintext=True,
                 http_host="127.0.0.1", http_port=0, discovery=False)
    await other.start()  # a second node in this process registers its own collector
    try:
        await receive(http, "P", 1, "r")
        async with aiohttp.ClientSession(base_url=other.url) as http2:
            m2 = await scrape(http2)
        assert m2[("storemesh_ledger_envelopes", ())] == 0
        assert (await scrape(http))[("storemesh_ledger_envelopes", ())] == 1
    finally:
        await other.close()


# --- two nodes ---------------------------------------------------------------------------------


async def test_peers_staleness_and_lag_with_a_live_peer(tmp_path: Path,
                                                        http: aiohttp.ClientSession,
                                                        node: Node) -> None:
    store_key = node.identity.store_key
    assert store_key is not None
    enrol_node(tmp_path / "r1", store_key, "store-1", "register", now_ms=now_ms(),
               node_id="r1")
    reg = Node(tmp_path / "r1", insecure_plaintext=True,
               http_host="127.0.0.1", http_port=0, discovery=False,
               peers=[node.url])
    await reg.start()
    try:
        await wait_until(lambda: any(p["up"] for p in node.peer_status()), 10, "a session")
        await receive(http, "X", 4, "r")
        await wait_until(lambda: reg.replica.on_hand("X") == 4, 10, "replication")

        status, peers = await get(http, "/v1/peers")
        assert status == 200
        [p] = peers["peers"]
        assert p["node_id"] == "r1" and p["up"] is True and p["role"] == "register"

        status, stock = await get(http, "/v1/stock/X")
        assert isinstance(stock["staleness_ms"], int) and 0 <= stock["staleness_ms"] < 10_000
        status, health = await get(http, "/v1/health")
        assert health["peers_up"] == 1

        async with aiohttp.ClientSession(base_url=reg.url) as http2:
            status, stock2 = await get(http2, "/v1/stock/X")
            assert status == 200
            assert stock2["on_hand"] == 4 and stock2["staleness_ms"] is not None
            m = await scrape(http2)
        assert m[("storemesh_peers_up", ())] == 1
        assert m[("storemesh_envelopes_received_total", ())] == 1
        assert m[("storemesh_peer_lag_envelopes", (("peer", "edge"),))] >= 0
        assert m[("storemesh_sync_bytes_total", (("direction", "in"),))] > 0
    finally:
        await reg.close()

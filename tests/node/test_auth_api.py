"""Credentials, staff roles and PINs at a real Node over real HTTPS (mesh.http.gate,
mesh.core.auth): the node serves TLS as in production and the client pins the store's CA."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import pytest_asyncio
from click.testing import CliRunner

from mesh import config
from mesh.app.cli import main as cli
from mesh.core.auth import pin_limit
from mesh.core.identity import NodeKey, TrustStore, issue_certificate
from mesh.http.gate import GATE
from mesh.node.node import Node
from mesh.store import authdir
from mesh.store.datadir import enrol_node, init_store
from tests.meshkit import PIN_COST, TEST_SSL, now_ms, trust_ca

pytestmark = pytest.mark.asyncio


@pytest_asyncio.fixture
async def store(tmp_path: Path) -> AsyncIterator[tuple[Node, dict[str, str]]]:
    d = tmp_path / "edge"
    init_store(d, "store-1", now_ms=now_ms(), node_id="edge")
    trust_ca(d)
    toks = {name: authdir.issue_device_credential(d, device_id=name, role=role,
                                                  now_ms=now_ms(), ttl_ms=3_600_000)
            for name, role in (("till-1", "pos"), ("till-2", "pos"), ("svc", "service"),
                               ("web", "online"))}
    for sid, role, pin in (("ann", "cashier", "1111"), ("max", "manager", "9999")):
        authdir.add_staff(d, staff_id=sid, name=sid, role=role, pin=pin, now_ms=now_ms(),
                          pin_cost=PIN_COST)
    n = Node(d, http_host="127.0.0.1", http_port=0, discovery=False)
    await n.start()
    try:
        for _ in range(50):  # the gate picks up auth.json within AUTH_RELOAD_S
            if n.identity.trust.roster_version >= 1:
                break
            await asyncio.sleep(0.1)
        yield n, toks
    finally:
        await n.close()


def pinned(source: str = "127.0.0.1") -> aiohttp.ClientSession:
    """A client that trusts only the store CAs of this test process, from ``source``
    (another loopback address is another source for the per-source throttle)."""
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(
        ssl=TEST_SSL, local_addr=(source, 0)))


async def call(n: Node, method: str, path: str, body: Any = None,
               headers: dict[str, str] | None = None, source: str = "127.0.0.1"
               ) -> tuple[int, Any]:
    assert n.url.startswith("https://")
    async with pinned(source) as http, http.request(
            method, n.url + path, data=None if body is None else orjson.dumps(body),
            headers={"Content-Type": "application/json", **(headers or {})}) as resp:
        return resp.status, orjson.loads(await resp.read())


def bearer(tok: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {tok}"}


async def login(n: Node, tok: str, sid: str, pin: str) -> dict[str, str]:
    status, body = await call(n, "POST", "/v1/session", {"staff_id": sid, "pin": pin},
                              bearer(tok))
    assert status == 201, body
    return {**bearer(tok), "X-Staff-Session": body["session"]}


async def ledger_rows(n: Node) -> int:
    return await asyncio.to_thread(n.durable.ledger.count)


async def test_unauthenticated_or_forged_writes_are_refused_and_change_nothing(
        store: tuple[Node, dict[str, str]]) -> None:
    n, toks = store
    before = await ledger_rows(n)
    forged = toks["svc"][:-4] + ("AAAA" if not toks["svc"].endswith("AAAA") else "BBBB")
    for headers, reason in (({}, "no_token"), ({"Authorization": "Basic x"}, "bad_token"),
                            (bearer(forged), "bad_token"), (bearer("smd1.x.y"), "bad_token")):
        status, body = await call(n, "POST", "/v1/receipts",
                                  {"sku": "A", "qty": 5, "txn_id": "t"}, headers)
        assert status == 401 and body["error"]["reason"] == reason, body
        assert set(body["error"]) >= {"field", "message"}
    status, _ = await call(n, "GET", "/v1/audit")
    assert status == 401
    assert await ledger_rows(n) == before
    assert n.replica.on_hand("A") == 0
    async with pinned() as http, http.get(n.url + "/metrics") as resp:
        text = await resp.text()
    assert 'storemesh_api_auth_refusals_total{reason="no_token"} 2.0' in text
    assert 'storemesh_api_auth_refusals_total{reason="bad_token"} 3.0' in text
    # public reads stay public
    assert (await call(n, "GET", "/v1/health"))[0] == 200


async def test_a_cashier_cannot_adjust_or_change_prices_without_a_manager(
        store: tuple[Node, dict[str, str]]) -> None:
    n, toks = store
    svc = bearer(toks["svc"])
    assert (await call(n, "POST", "/v1/receipts", {"sku": "A", "qty": 9, "txn_id": "r"},
                       svc))[0] == 201
    ann = await login(n, toks["till-1"], "ann", "1111")
    status, _ = await call(n, "POST", "/v1/sales", {"sku": "A", "qty": 1, "txn_id": "s"}, ann)
    assert status == 201
    before = await ledger_rows(n)
    status, body = await call(n, "POST", "/v1/adjustments",
                              {"sku": "A", "delta": -5, "reason": "x", "txn_id": "a"}, ann)
    assert (status, body["error"]["reason"]) == (403, "role")
    status, body = await call(n, "PUT", "/v1/catalog/A", {"price_cents": 1, "txn_id": "p"},
                              ann)
    assert (status, body["error"]["reason"]) == (403, "role")
    status, body = await call(n, "POST", "/v1/returns", {"sku": "A", "qty": 50,
                                                          "txn_id": "big"}, ann)
    assert status == 403, body
    assert await ledger_rows(n) == before
    # a body staff_id naming someone else is refused
    status, body = await call(n, "POST", "/v1/sales", {"sku": "A", "qty": 1, "txn_id": "s2",
                                                        "staff_id": "max"}, ann)
    assert (status, body["error"]["field"]) == (403, "staff_id")
    # with the manager's PIN on the same request it goes through, and the audit says so
    ok = {**ann, "X-Approver-Id": "max", "X-Approver-Pin": "9999"}
    status, body = await call(n, "POST", "/v1/adjustments",
                              {"sku": "A", "delta": -5, "reason": "x", "txn_id": "a"}, ok)
    assert status == 201, body
    status, audit = await call(n, "GET", "/v1/audit?limit=1", None, svc)
    e = audit["entries"][0]
    assert (e["staff_id"], e["approved_by"], e["device_id"], e["txn_id"]) == (
        "ann", "max", "till-1", "a")


async def test_wrong_pins_are_throttled_then_locked_out(
        store: tuple[Node, dict[str, str]], monkeypatch: pytest.MonkeyPatch) -> None:
    n, toks = store
    clock = [now_ms()]
    monkeypatch.setattr(n, "now_ms", lambda: clock[0])
    tok = bearer(toks["till-1"])

    async def attempt(pin: str) -> tuple[int, str]:
        status, body = await call(n, "POST", "/v1/session", {"staff_id": "ann", "pin": pin},
                                  tok)
        return status, body.get("error", {}).get("reason", "ok")

    for _ in range(config.PIN_FREE_FAILURES):
        assert await attempt("0000") == (401, "bad_pin")
    assert await attempt("0000") == (401, "bad_pin")  # the first delayed failure
    assert await attempt("1111") == (429, "pin_throttled")  # even the right PIN waits
    for _ in range(config.PIN_MAX_FAILURES - config.PIN_FREE_FAILURES - 1):
        clock[0] += config.PIN_DELAY_MAX_MS + 1
        assert await attempt("0000") == (401, "bad_pin")
    clock[0] += config.PIN_DELAY_MAX_MS + 1
    assert await attempt("1111") == (403, "locked_out")
    # a manager unlocks; then the right PIN works
    status, _ = await call(n, "POST", "/v1/staff/ann/unlock", None,
                           {**tok, "X-Approver-Id": "max", "X-Approver-Pin": "9999"})
    assert status == 200
    assert await attempt("1111") == (201, "ok")


async def test_the_store_wide_pin_bound_is_shared_out_between_nodes() -> None:
    assert pin_limit(1) == pin_limit(10) == config.PIN_MAX_FAILURES
    assert pin_limit(20) == 5 and pin_limit(25) == 4
    assert pin_limit(1000) == config.PIN_FREE_FAILURES  # never below the free typos
    for nodes in range(1, 34):  # a guesser walking from till to till: at most 100 tries
        assert nodes * pin_limit(nodes) <= config.PIN_STORE_MAX_FAILURES


async def test_a_big_store_locks_out_sooner_at_each_node(
        store: tuple[Node, dict[str, str]], monkeypatch: pytest.MonkeyPatch) -> None:
    n, toks = store
    clock = [now_ms()]
    monkeypatch.setattr(n, "now_ms", lambda: clock[0])
    tok = bearer(toks["till-1"])
    key = n.identity.store_key
    assert key is not None
    for i in range(24):  # 25 nodes that check PINs (the cloud would not count)
        n.identity.trust.add_certificate(issue_certificate(
            key, node_id=f"reg-{i}", store_id="store-1", role="register",
            public_key=NodeKey.generate().public_key, not_after=clock[0] + 86_400_000))
    limit = pin_limit(25)
    assert limit == 4 < config.PIN_MAX_FAILURES
    for i in range(limit):
        clock[0] += config.PIN_DELAY_MAX_MS + 1
        status, body = await call(n, "POST", "/v1/session", {"staff_id": "ann", "pin": "0000"},
                                  tok)
        assert (status, body["error"]["reason"]) == (401, "bad_pin"), i
    clock[0] += config.PIN_DELAY_MAX_MS + 1
    status, body = await call(n, "POST", "/v1/session", {"staff_id": "ann", "pin": "1111"}, tok)
    assert (status, body["error"]["reason"]) == (403, "locked_out")
    # revoking most of them gives the node its larger share back (a new trust version)
    for i in range(20):
        n.identity.trust.revoke(f"reg-{i}")
    assert n.app[GATE]._pin_limit() == config.PIN_MAX_FAILURES  # 5 nodes left


async def test_keys_are_scoped_to_the_device_and_a_stolen_token_writes_only_as_its_device(
        store: tuple[Node, dict[str, str]]) -> None:
    n, toks = store
    svc = bearer(toks["svc"])
    await call(n, "POST", "/v1/receipts", {"sku": "A", "qty": 9, "txn_id": "r"}, svc)
    t1 = await login(n, toks["till-1"], "ann", "1111")
    t2 = await login(n, toks["till-2"], "ann", "1111")
    # the same txn id at two tills: two sales, neither blocks the other
    a = await call(n, "POST", "/v1/sales", {"sku": "A", "qty": 1, "txn_id": "0001"}, t1)
    b = await call(n, "POST", "/v1/sales", {"sku": "A", "qty": 1, "txn_id": "0001"}, t2)
    assert a[0] == b[0] == 201 and n.replica.on_hand("A") == 7
    # till-1's token with till-2's session: refused (sessions are bound to the device)
    mixed = {**bearer(toks["till-1"]), "X-Staff-Session": t2["X-Staff-Session"]}
    status, body = await call(n, "POST", "/v1/sales", {"sku": "A", "qty": 1, "txn_id": "x"},
                              mixed)
    assert (status, body["error"]["reason"]) == (401, "bad_session")
    # an online-channel device may not end another channel's reservation
    web = bearer(toks["web"])
    status, body = await call(n, "POST", "/v1/reservations",
                              {"sku": "A", "qty": 1, "txn_id": "o", "channel": "app"}, web)
    assert status == 403
    status, res = await call(n, "POST", "/v1/reservations",
                             {"sku": "A", "qty": 1, "txn_id": "o", "channel": "app"}, svc)
    assert status == 201
    status, body = await call(n, "POST", f"/v1/reservations/{res['reservation_id']}/release",
                              {"txn_id": "rel"}, web)
    assert status == 403


async def test_a_revoked_device_or_disabled_staff_is_refused(
        store: tuple[Node, dict[str, str]], tmp_path: Path) -> None:
    n, toks = store
    t1 = await login(n, toks["till-1"], "ann", "1111")
    authdir.update_staff(tmp_path / "edge", "ann", now_ms=now_ms(), disabled=True)
    authdir.revoke_device(tmp_path / "edge", "svc", now_ms=now_ms())
    for _ in range(50):
        if n.identity.trust.is_revoked("device:svc") and n.identity.trust.roster_version >= 2:
            break
        await asyncio.sleep(0.1)
    status, body = await call(n, "POST", "/v1/sales", {"sku": "A", "qty": 1, "txn_id": "z"},
                              t1)
    assert (status, body["error"]["reason"]) == (401, "staff_disabled")
    status, body = await call(n, "POST", "/v1/receipts", {"sku": "A", "qty": 1, "txn_id": "z"},
                              bearer(toks["svc"]))
    assert (status, body["error"]["reason"]) == (401, "revoked")


async def test_the_audit_trail_names_the_session_staff_device_and_approver(
        store: tuple[Node, dict[str, str]], tmp_path: Path) -> None:
    """``storemesh ledger show`` (the audit trail on the node's disk) shows who did it:
    the staff id comes from the session, never from the body."""
    n, toks = store
    svc = bearer(toks["svc"])
    assert (await call(n, "POST", "/v1/receipts", {"sku": "A", "qty": 9, "txn_id": "r"},
                       svc))[0] == 201
    ann = await login(n, toks["till-1"], "ann", "1111")
    assert (await call(n, "POST", "/v1/sales", {"sku": "A", "qty": 1, "txn_id": "s-1",
                                                 "staff_id": "ann"}, ann))[0] == 201
    ok = {**ann, "X-Approver-Id": "max", "X-Approver-Pin": "9999"}
    assert (await call(n, "POST", "/v1/adjustments",
                       {"sku": "A", "delta": -1, "reason": "damaged", "txn_id": "a-1"},
                       ok))[0] == 201
    res = await asyncio.to_thread(CliRunner().invoke, cli,
                                  ["ledger", "show", str(tmp_path / "edge"), "--json"])
    assert res.exit_code == 0, res.output
    rows = [orjson.loads(line) for line in res.output.splitlines()]
    who = [(r["kind"], r["txn"], r["device"], r["staff"], r["approved_by"]) for r in rows]
    assert who == [("receipt", "r", "svc", None, None), ("sale", "s-1", "till-1", "ann", None),
                   ("adjust", "a-1", "till-1", "ann", "max")], who
    table = await asyncio.to_thread(CliRunner().invoke, cli,
                                    ["ledger", "show", str(tmp_path / "edge")])
    assert table.exit_code == 0 and "till-1" in table.output and "by max)" in table.output


async def test_refusals_are_throttled_per_source_and_change_nothing(
        store: tuple[Node, dict[str, str]], monkeypatch: pytest.MonkeyPatch) -> None:
    n, toks = store
    frozen = now_ms()  # the bucket refills with the node's clock: no refill mid-burst
    monkeypatch.setattr(n, "now_ms", lambda: frozen)
    before = await ledger_rows(n)
    seen = []
    for i in range(config.AUTH_BURST + 5):  # a guesser at 127.0.0.2
        status, body = await call(n, "POST", "/v1/sales",
                                  {"sku": "A", "qty": 1, "txn_id": f"g{i}"},
                                  bearer(f"smd1.guess{i}.x"), source="127.0.0.2")
        seen.append((status, body["error"]["reason"]))
    assert seen[:config.AUTH_BURST] == [(401, "bad_token")] * config.AUTH_BURST
    assert seen[config.AUTH_BURST:] == [(429, "throttled")] * 5
    # another address is not held back, neither for its mistakes nor for its writes
    status, body = await call(n, "POST", "/v1/sales", {"sku": "A", "qty": 1, "txn_id": "x"})
    assert (status, body["error"]["reason"]) == (401, "no_token")
    status, _ = await call(n, "POST", "/v1/receipts", {"sku": "A", "qty": 1, "txn_id": "ok"},
                           bearer(toks["svc"]))
    assert status == 201
    assert await ledger_rows(n) == before + 1 and n.replica.on_hand("A") == 1
    async with pinned() as http, http.get(n.url + "/metrics") as resp:
        text = await resp.text()
    assert f'storemesh_api_auth_refusals_total{{reason="bad_token"}} {config.AUTH_BURST}.0' \
        in text
    assert 'storemesh_api_auth_refusals_total{reason="throttled"} 5.0' in text


async def test_a_roster_expires_after_its_time_offline_and_the_edge_renews_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A till that has not heard from the edge for longer than the roster's validity
    (``staff add --valid-days``; here 1 h) stops accepting PINs and sessions; once the
    edge is back it re-signs the roster (at half its age) and the till takes PINs again."""
    edge_dir = tmp_path / "edge"
    edge_ident = init_store(edge_dir, "store-1", now_ms=now_ms(), node_id="edge")
    trust_ca(edge_dir)
    assert edge_ident.store_key is not None
    enrol_node(tmp_path / "r1", edge_ident.store_key, "store-1", "register", now_ms=now_ms(),
               node_id="r1", trust=TrustStore.from_dict(edge_ident.trust.to_dict()))
    till = authdir.issue_device_credential(edge_dir, device_id="till-1", role="pos",
                                           now_ms=now_ms(), ttl_ms=30 * 86_400_000)
    svc = authdir.issue_device_credential(edge_dir, device_id="svc", role="service",
                                          now_ms=now_ms(), ttl_ms=30 * 86_400_000)
    hour = 3_600_000
    roster = authdir.add_staff(edge_dir, staff_id="ann", name="Ann", role="cashier",
                               pin="1111", now_ms=now_ms(), validity_ms=hour,
                               pin_cost=PIN_COST)
    assert roster.not_after - now_ms() <= hour
    clock = {"edge": 0, "r1": 0}  # ms added to the real clock, per node
    edge = Node(edge_dir, http_host="127.0.0.1", discovery=False)
    monkeypatch.setattr(edge, "now_ms", lambda: now_ms() + clock["edge"])
    await edge.start()
    reg = Node(tmp_path / "r1", http_host="127.0.0.1", discovery=False, peers=[edge.url])
    monkeypatch.setattr(reg, "now_ms", lambda: now_ms() + clock["r1"])
    await reg.start()
    try:
        for _ in range(100):
            if reg.identity.trust.roster_version >= roster.version:
                break
            await asyncio.sleep(0.1)
        session = await login(reg, till, "ann", "1111")
        assert (await call(reg, "POST", "/v1/receipts", {"sku": "A", "qty": 5,
                                                          "txn_id": "r"}, bearer(svc)))[0] == 201
        assert (await call(reg, "POST", "/v1/sales", {"sku": "A", "qty": 1, "txn_id": "1"},
                           session))[0] == 201
        url = edge.url
        await edge.close()  # the till is on its own from now on
        clock["r1"] = hour + 1_000
        status, body = await call(reg, "POST", "/v1/session", {"staff_id": "ann",
                                                                "pin": "1111"}, bearer(till))
        assert (status, body["error"]["reason"]) == (403, "roster_expired"), body
        status, body = await call(reg, "POST", "/v1/sales",
                                  {"sku": "A", "qty": 1, "txn_id": "2"}, session)
        assert (status, body["error"]["reason"]) == (403, "roster_expired"), body
        # the edge comes back (same port), past half the roster's age: it re-signs it
        clock["edge"] = hour + 1_000
        edge = Node(edge_dir, http_host="127.0.0.1", http_port=int(url.rsplit(":", 1)[1]),
                    discovery=False)
        monkeypatch.setattr(edge, "now_ms", lambda: now_ms() + clock["edge"])
        await edge.start()
        for _ in range(200):
            held = reg.identity.trust.roster
            if held is not None and held.not_after > reg.now_ms():
                break
            await asyncio.sleep(0.1)
        assert reg.identity.trust.roster_version > roster.version
        await login(reg, till, "ann", "1111")
    finally:
        await reg.close()
        await edge.close()

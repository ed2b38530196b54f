"""Credentials, staff roles and PINs at a real Node over real HTTP (mesh.gate, mesh.auth)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import pytest_asyncio

from mesh import authdir, config
from mesh.datadir import init_store
from mesh.node import Node
from tests.meshkit import now_ms

pytestmark = pytest.mark.asyncio
PIN_COST = 1024  # cheap scrypt for tests; the CLI default is config.PIN_SCRYPT_N


@pytest_asyncio.fixture
async def store(tmp_path: Path) -> AsyncIterator[tuple[Node, dict[str, str]]]:
    d = tmp_path / "edge"
    init_store(d, "store-1", now_ms=now_ms(), node_id="edge")
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


async def call(n: Node, method: str, path: str, body: Any = None,
               headers: dict[str, str] | None = None) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as http, http.request(
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
    async with aiohttp.ClientSession() as http, http.get(n.url + "/metrics") as resp:
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

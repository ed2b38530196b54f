"""The control plane of gateways on PostgreSQL (``mesh.cloud.pgcontrol``), in this process:
gateways that share no directory serve stores registered in the database, pick up a
store registered while they run, share HQ accounts and sessions, and write the trust
store a node changed back to the database, so the next holder of the store starts with
it."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import pytest

pytest.importorskip("psycopg")

import psycopg

from mesh import config
from mesh.cloud import hq
from mesh.cloud.control import read_store_files
from mesh.cloud.pgcontrol import PgControl
from mesh.store.datadir import load_identity
from mesh.store.revoke import revoke_node
from mesh.testing.fleet import Fleet, provision
from tests import meshkit as mk
from tests.node.test_gateway import _converged, _gateway, _port, _serving


def _served(*gws: object) -> dict[str, str]:
    return {s: g.gateway.id for g in gws for s in g.nodes}  # type: ignore[attr-defined]


@pytest.mark.asyncio
async def test_gateways_without_a_shared_root_serve_what_the_database_holds(
        tmp_path: Path, pg_dsn: str) -> None:
    control = PgControl(pg_dsn)
    first = provision(tmp_path / "edges", tmp_path / "staging", 2)
    for s in first:  # registered in the database, as 'storemesh cloud join --database' does
        assert control.register_store(s, read_store_files(tmp_path / "staging" / s))
    hq.add_user(control, mk.HQ_USER, mk.HQ_PASSWORD, cost=mk.PIN_COST)
    r1, r2 = tmp_path / "gw1", tmp_path / "gw2"  # nothing shared between the gateways
    p1, p2 = _port(), _port()
    g1, g2 = _gateway(r1, pg_dsn, "g1", p1), _gateway(r2, pg_dsn, "g2", p2)
    urls = [f"http://127.0.0.1:{p1}", f"http://127.0.0.1:{p2}"]
    await g1.start()
    await g2.start()
    fleet = Fleet(tmp_path / "edges", list(first), urls)
    late: Fleet | None = None
    try:
        await mk.wait_until(lambda: sorted(_served(g1, g2)) == first, 15,
                            "the two registered stores served")
        assert sorted(os.listdir(r1 / ".gateways" / "g1")) == sorted(g1.nodes)
        assert (r1 / ".gateways" / "g1").stat().st_mode & 0o077 == 0  # keys: private
        await fleet.start()
        await fleet.sell_all(5)
        await _converged(fleet, pg_dsn, 30)

        # A store registered while the gateways run is served without a restart.
        (new,) = provision(tmp_path / "edges", tmp_path / "staging", 1, prefix="new")
        t0 = time.monotonic()
        assert control.register_store(new, read_store_files(tmp_path / "staging" / new))
        await mk.wait_until(lambda: new in _served(g1, g2), 10, f"store {new} served")
        print(f"\nstore registered while running: served after "
              f"{time.monotonic() - t0:.2f} s (lease ttl 1.5 s)")
        late = Fleet(tmp_path / "edges", [new], urls)
        await late.start()
        await late.sell_all(7)
        await _converged(late, pg_dsn, 30)

        # HQ: one account, one session, any gateway (the cookie from g1 works at g2).
        async with mk.hq_session(g1.url) as http:
            body = await mk.get_json(http, g2.url, "/v1/fleet/sales?hours=24")
            assert body["totals"]["sales"] == 5 * 2 + 7
            listed = await mk.get_json(http, g2.url, "/v1/stores")  # every registered one
            assert {s["store_id"]: s["gateway"] for s in listed["stores"]} == \
                _served(g1, g2)
            hq.update_user(control, mk.HQ_USER, disabled=True)  # ends it at every gateway
            await mk.wait_until(lambda: g2.app[hq.HQ_KEY].store.count() == 0, 10,
                                "the disabled account's sessions ended")
            deadline = time.monotonic() + config.HQ_SESSION_RECHECK_S + config.AUTH_RELOAD_S
            for gw in (g2, g1):  # every gateway refuses it within the recheck interval
                while True:
                    async with http.get(gw.url + "/v1/fleet/sales") as resp:
                        if resp.status == 401:
                            break
                    assert time.monotonic() < deadline + 1, "a disabled account's session"
                    await asyncio.sleep(0.1)

        # The trust store a node changes goes back to the database: the edge revokes a
        # register, the cloud's node learns the list, and its node.json in the database
        # holds it, so the gateway that takes the store next starts with it.
        store = first[0]
        edge = fleet.nodes[store]
        crl, _ = revoke_node(load_identity(edge.data_dir), "reg-lost", reason="stolen",
                             now_ms=mk.now_ms(), force=True)  # as the CLI does, beside it
        edge.handle_effects(edge.core.learn_revocations(crl, mk.now_ms()))  # as its gate
        await mk.wait_until(lambda: b'"reg-lost"' in control.store_files(store)["node.json"],
                            15, "the revocation list written back to the database")
        holder, other = (g1, g2) if store in g1.nodes else (g2, g1)
        await holder.close()  # hands its stores over
        await _serving(other, 3, 15)
        assert other.nodes[store].identity.trust.crl_version == crl.version
        assert not (holder.root / ".gateways" / holder.gateway.id).exists()  # type: ignore[union-attr]
        await fleet.sell_all(3)
        await _converged(fleet, pg_dsn, 30)
    finally:
        await fleet.close()
        if late is not None:
            await late.close()
        await g2.close()
        await g1.close()
        control.close()


@pytest.mark.asyncio
async def test_a_gateway_imports_its_roots_stores_and_accounts_once(tmp_path: Path,
                                                                    pg_dsn: str) -> None:
    """Moving a cloud from files to PostgreSQL: ROOT's stores and HQ accounts go into the
    database at the first start; the database is the control plane from then on."""
    root = tmp_path / "cloud"
    stores = provision(tmp_path / "edges", root, 2)
    mk.add_hq_user(root)
    g1 = _gateway(root, pg_dsn, "g1", _port())
    await g1.start()
    await g1.close()
    control = PgControl(pg_dsn)
    try:
        assert control.stores() == stores
        assert control.store_files(stores[0]) == read_store_files(root / stores[0])
        assert list(control.users()) == [mk.HQ_USER]
        hq.update_user(control, mk.HQ_USER, disabled=True)
        mk.add_hq_user(root, "bob@hq")  # the file is not read again: the database has some
        g1 = _gateway(root, pg_dsn, "g1", _port())
        await g1.start()
        await g1.close()
        assert list(control.users()) == [mk.HQ_USER]
        assert control.users()[mk.HQ_USER]["disabled"] is True
    finally:
        control.close()


@pytest.mark.asyncio
async def test_oversell_exceptions_fleet_wide_in_sql(tmp_path: Path, pg_dsn: str) -> None:
    """A register sells more than the store holds (offline-first): the store's replica at
    the cloud flags the sale, its holder writes the list to SQL, and every gateway, also
    one that holds none of the store's data, answers it for the whole fleet."""
    from functools import partial

    from mesh.core.replica import Replica

    control = PgControl(pg_dsn)
    stores = provision(tmp_path / "edges", tmp_path / "staging", 2)
    for s in stores:
        control.register_store(s, read_store_files(tmp_path / "staging" / s))
    hq.add_user(control, mk.HQ_USER, mk.HQ_PASSWORD, cost=mk.PIN_COST)
    p1, p2 = _port(), _port()
    g1 = _gateway(tmp_path / "gw1", pg_dsn, "g1", p1)
    await g1.start()  # alone: holds both stores
    g2 = _gateway(tmp_path / "gw2", pg_dsn, "g2", p2)
    fleet = Fleet(tmp_path / "edges", stores, [f"http://127.0.0.1:{p1}",
                                               f"http://127.0.0.1:{p2}"])
    try:
        await fleet.start()
        edge = fleet.nodes[stores[1]]

        def receive(r: Replica, *, now_ms: int) -> object:
            return r.receive("SKU-LAST", 1, txn="po-last", now_ms=now_ms)

        def sell(r: Replica, *, txn: str, now_ms: int) -> object:
            return r.sell("SKU-LAST", 2, txn=txn, now_ms=now_ms)
        await edge.execute(partial(receive, now_ms=mk.now_ms()))  # type: ignore[arg-type]
        await edge.execute(partial(sell, txn="sale-1", now_ms=mk.now_ms()))  # type: ignore[arg-type]
        assert [e.short for e in edge.replica.exceptions("SKU-LAST")] == [1]

        async with mk.hq_session(g1.url) as http:
            async def listed(url: str) -> dict[str, object]:
                body = await mk.get_json(http, url, "/v1/fleet/exceptions")
                return body  # type: ignore[no-any-return]
            deadline = time.monotonic() + 20
            while (body := await listed(g1.url))["exceptions"] == []:
                assert time.monotonic() < deadline, body
                await asyncio.sleep(0.2)
            (exc,) = body["exceptions"]  # type: ignore[misc]
            assert (exc["store"], exc["sku"], exc["short"], exc["kind"]) == \
                (stores[1], "SKU-LAST", 1, "sale")
            assert body["partial"] is False and body["stores"] == stores
            assert body["totals"] == {"count": 1, "short_units": 1, "by_store": {
                stores[0]: {"count": 0, "short_units": 0},
                stores[1]: {"count": 1, "short_units": 1}}}
            one = await mk.get_json(http, g1.url, f"/v1/fleet/exceptions?store={stores[0]}")
            assert one["exceptions"] == [] and one["stores"] == [stores[0]]

            await g2.start()  # a gateway that holds nothing of it yet answers the same
            other = await listed(g2.url)
            assert other["exceptions"] == body["exceptions"]
            none = await mk.get_json(http, g2.url, "/v1/fleet/exceptions?sku=SKU-FLEET")
            assert none["exceptions"] == []
            await g1.close()  # g2 takes both stores over and writes the same list
            await _serving(g2, 2, 15)
            await asyncio.sleep(0.5)
            with psycopg.connect(pg_dsn) as conn:
                assert conn.execute("SELECT gateway FROM exceptions_seen WHERE store_id "
                                    "= %s", (stores[1],)).fetchone() == ("g2",)
            assert (await listed(g2.url))["exceptions"] == body["exceptions"]
    finally:
        await fleet.close()
        await g2.close()
        await g1.close()
        control.close()

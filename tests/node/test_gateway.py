"""Cloud gateways on PostgreSQL, in this process: stores' edges (real nodes, real
signatures) sync to gateways whose ledgers are in one database; the analytics in SQL
equal the acknowledged sales exactly; a second gateway takes half the stores by lease,
and all of them when the first one leaves; nothing is in the cloud ledger twice."""

from __future__ import annotations

import asyncio
import socket
import time
from pathlib import Path

import pytest

pytest.importorskip("psycopg")

import psycopg

from mesh.cloud.pganalytics import setup_pg_dashboard
from mesh.cloud.server import CloudNode
from mesh.errors import LedgerError
from mesh.store.ledger import Ledger
from mesh.store.pgstore import PgLedger
from mesh.testing.fleet import SKU, Fleet, provision
from tests import meshkit as mk


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def test_pg_ledger_has_the_sqlite_ledgers_public_surface() -> None:
    public = {n for n in dir(Ledger) if not n.startswith("_")}
    assert public - set(dir(PgLedger)) == set()


def _gateway(root: Path, dsn: str, gid: str, port: int) -> CloudNode:
    cloud = CloudNode(root, http_host="127.0.0.1", http_port=port, insecure_plaintext=True,
                      database=dsn, gateway_id=gid, lease_ttl_s=1.5)
    cloud.setup_hooks.append(setup_pg_dashboard)
    return cloud


def ledger_stats(dsn: str) -> dict[str, tuple[int, int]]:
    """Per store: (sales in the analytics rollup, sale envelopes in the ledger)."""
    with psycopg.connect(dsn) as conn:
        rolled = dict(conn.execute("SELECT store_id, sum(events) FROM movements_hourly "
                                   "WHERE kind = 'sale' GROUP BY 1").fetchall())
        rows = dict(conn.execute("SELECT store_id, count(*) FROM envelopes WHERE kind = "
                                 "'sale' GROUP BY 1").fetchall())
        dup = conn.execute("SELECT count(*) FROM (SELECT 1 FROM envelopes GROUP BY "
                           "store_id, origin, seq HAVING count(*) > 1) d").fetchone()
        assert dup == (0,), "an envelope is in the cloud ledger twice"
    return {s: (int(rolled.get(s, 0)), int(rows[s])) for s in rows}


async def _converged(fleet: Fleet, dsn: str, within: float) -> None:
    def ok() -> bool:
        stats = ledger_stats(dsn)
        return all(stats.get(s, (0, 0)) == (n, n) for s, n in fleet.acked.items())
    deadline = time.monotonic() + within
    while not await asyncio.to_thread(ok):
        assert time.monotonic() < deadline, \
            f"cloud analytics {ledger_stats(dsn)} != acknowledged sales {fleet.acked}"
        await asyncio.sleep(0.1)


async def _serving(gw: CloudNode, n: int, within: float) -> None:
    await mk.wait_until(lambda: len(gw.nodes) == n, within,
                        f"gateway {gw.gateway.id if gw.gateway else '?'} serving {n} stores")


@pytest.mark.asyncio
async def test_two_gateways_share_the_stores_by_lease(tmp_path: Path, pg_dsn: str) -> None:
    root = tmp_path / "cloud"
    stores = provision(tmp_path / "edges", root, 4)
    mk.add_hq_user(root)
    p1, p2 = _port(), _port()
    g1 = _gateway(root, pg_dsn, "g1", p1)
    await g1.start()
    fleet = Fleet(tmp_path / "edges", stores, [f"http://127.0.0.1:{p1}", f"http://127.0.0.1:{p2}"])
    g2: CloudNode | None = None
    try:
        assert sorted(g1.nodes) == stores  # alone: it holds every store
        await fleet.start()
        await fleet.sell_all(15)
        await _converged(fleet, pg_dsn, 30)

        g2 = _gateway(root, pg_dsn, "g2", p2)
        await g2.start()
        await _serving(g1, 2, 15)  # fair share: g1 hands two stores over...
        await _serving(g2, 2, 15)  # ...and g2 takes them, rebuilt from PostgreSQL
        assert not set(g1.nodes) & set(g2.nodes)
        moved = sorted(g2.nodes)
        for s in moved:
            assert g2.nodes[s].replica.on_hand(SKU) == g1_on_hand(fleet, s)
        await fleet.sell_all(15)
        await _converged(fleet, pg_dsn, 40)

        # A gateway that does not hold a store sends its API to the holder, and refuses
        # its sync path (the edge keeps the holder's session).
        import aiohttp

        other = moved[0]
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{g1.url}/stores/{other}/v1/health",
                                allow_redirects=False) as resp:
                assert resp.status == 307, await resp.text()
                assert resp.headers["Location"] == f"{g2.url}/stores/{other}/v1/health"
            async with http.get(f"{g1.url}/stores/{other}/v1/sync") as resp:
                assert resp.status == 503
                assert (await resp.json())["holder"] == g2.url
            async with http.get(f"{g1.url}/v1/fleet/gateways") as resp:
                assert resp.status == 401  # behind the HQ login
        async with mk.hq_session(g1.url) as http:
            body = await mk.get_json(http, g1.url, "/v1/fleet/gateways")
            assert sorted(body["serving"]) == sorted(g1.nodes)
            assert {lease["gateway"] for lease in body["leases"]} == {"g1", "g2"}

        await g1.close()  # graceful: hands its stores over at once
        await _serving(g2, 4, 15)
        await fleet.sell_all(10)
        await _converged(fleet, pg_dsn, 40)
        assert all(n == 40 for n in fleet.acked.values())

        # The fleet view in SQL, served by the gateway, says the same.
        async with mk.hq_session(g2.url) as http:
            body = await mk.get_json(http, g2.url, "/v1/fleet/sales?hours=24")
            assert {r["store"]: r["sales"] for r in body["by_store"]} == fleet.acked
            assert body["totals"]["sales"] == 160
            stock = await mk.get_json(http, g2.url, "/v1/fleet/stock")
            (row,) = stock["stock"]
            assert row["sku"] == SKU and row["on_hand"] == 4 * (1_000_000 - 40)
            assert row["reserved_known"] is True
            await asyncio.sleep(1.0)  # a tick saves the WAN counters
            health = await mk.get_json(http, g2.url, "/v1/fleet/health")
            assert {h["store"]: h["gateway"] for h in health["stores"]} == \
                {s: "g2" for s in stores}
            # egress in SQL: every store sent its sales to the cloud over the wire
            assert all(h["wan_bytes"]["in"] > 40 * 100 for h in health["stores"]), health
            exc = await mk.get_json(http, g2.url, "/v1/fleet/exceptions")
            assert exc["exceptions"] == [] and exc["partial"] is False
            async with http.get(g2.url + "/") as resp:
                assert resp.status == 200  # the dashboard page
    finally:
        await fleet.close()
        if g2 is not None:
            await g2.close()
        await g1.close()


def g1_on_hand(fleet: Fleet, store: str) -> int:
    return fleet.nodes[store].replica.on_hand(SKU)


@pytest.mark.asyncio
async def test_a_gateway_that_stops_renewing_loses_its_stores(tmp_path: Path,
                                                              pg_dsn: str) -> None:
    """A gateway whose lease loop is frozen (as a dead one) loses its leases within the
    ttl; the other takes its store, and the frozen one, which still has the store's node
    open, cannot write any more: its commits are fenced on the lease."""
    root = tmp_path / "cloud"
    stores = provision(tmp_path / "edges", root, 1)
    p1, p2 = _port(), _port()
    g1 = _gateway(root, pg_dsn, "g1", p1)
    await g1.start()
    g2 = _gateway(root, pg_dsn, "g2", p2)
    try:
        assert g1.gateway is not None and g1.gateway._task is not None
        g1.gateway._task.cancel()  # g1 stops renewing (as if its process were
        g1.gateway._renewer.stop()  # gone) but keeps its node open
        node = g1.nodes[stores[0]]
        await g2.start()
        t0 = time.monotonic()
        await _serving(g2, 1, 10)
        took = time.monotonic() - t0
        # not before g1's lease ran out (ttl 1.5 s), and within ttl + a tick + rebuild
        assert 1.0 <= took <= 1.5 + 0.5 + 3.0, took
        from mesh.store.pgstore import FencedOut
        from mesh.testing.contracts import sales
        from tests.contract.test_contract_storage import _identity

        with pytest.raises(FencedOut, match="does not hold the lease"):
            await node.durable.ledger.append_async(sales(_identity(7), 1))
        # nor write its control files (trust store) back: the write-back is fenced too
        node.durable.ledger.reset_failure()
        with pytest.raises(LedgerError, match="does not hold the lease"):
            node.durable.ledger.call(lambda: None).result(10)
    finally:
        await g2.close()
        await g1.close()


@pytest.mark.asyncio
async def test_a_database_crash_loses_nothing_acknowledged(tmp_path: Path, pg_cluster,  # type: ignore[no-untyped-def]
                                                           pg_dsn: str) -> None:
    """PostgreSQL crashes (immediate stop) and comes back while a gateway ingests: the
    gateway's ledgers fail, recover and reconnect, its leases are renewed again, and
    the cloud ends up holding exactly the sales the edges acknowledged."""
    root = tmp_path / "cloud"
    stores = provision(tmp_path / "edges", root, 2)
    port = _port()
    g1 = _gateway(root, pg_dsn, "g1", port)
    await g1.start()
    fleet = Fleet(tmp_path / "edges", stores, [f"http://127.0.0.1:{port}"])
    try:
        await fleet.start()
        await fleet.sell_all(10)
        await _converged(fleet, pg_dsn, 30)
        selling = asyncio.create_task(fleet.sell_all(40))  # edges sell on meanwhile
        data = str(pg_cluster.data)
        res = await asyncio.to_thread(pg_cluster._run, "pg_ctl", "-D", data, "-m",
                                      "immediate", "stop")
        assert res.returncode == 0, res.stderr
        await asyncio.sleep(0.5)
        res = await asyncio.to_thread(pg_cluster._run, "pg_ctl", "-D", data, "-l",
                                      str(pg_cluster.dir / "log"), "-w", "start")
        assert res.returncode == 0, res.stderr
        await selling
        await _converged(fleet, pg_dsn, 60)
        assert all(n == 50 for n in fleet.acked.values())
    finally:
        await fleet.close()
        await g1.close()

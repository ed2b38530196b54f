"""The cloud's analytics agree with the replicas on a revocation bound (``upto``): a
revoked node's envelopes above its bound are not counted, whether the list reached the
cloud before them or after (then their counted contribution is taken out again, once:
a restart neither counts them back nor takes them out twice).

* Store level: ``AnalyticsStore`` over a real ledger that holds the left-out rows (an
  archive, as every cloud ledger keeps them).
* Embedded cloud: a real CloudNode, edge and register on 127.0.0.1 in this process; the
  register's later sales are counted, then the edge adopts a list that keeps fewer of
  them: fleet sales drop to the kept ones, the analytics' stock movements equal the
  replicas' stock, and a restart of the cloud changes nothing.
* PostgreSQL cloud: the same through a gateway, where the rollup ``movements_hourly`` is
  written in the ledger's transaction (``mesh.store.pgstore``).
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from mesh.cloud.analytics import AnalyticsStore, fact_of
from mesh.cloud.server import CloudNode
from mesh.core.envelope import Envelope
from mesh.core.identity import RevocationList, issue_revocations
from mesh.node.node import Node
from mesh.store.datadir import load_identity
from mesh.store.ledger import Ledger
from tests.node.test_analytics import (
    Fleet,
    assert_consistent,
    db_totals,
    db_watermarks,
    expected,
    get_ok,
    hq_login,
    hq_session,
    make_envelopes,
    now_ms,
    until,
    write_ledger,
)

BOUND = 10  # the store keeps r2's seqs 1..10


def _kept(envs: Sequence[Envelope], bounds: dict[str, int]) -> list[Envelope]:
    return [e for e in envs if e.seq <= bounds.get(e.origin, e.seq)]


# --- store level ----------------------------------------------------------------------------


def test_a_bound_learned_after_the_rows_takes_them_out_once(tmp_path: Path) -> None:
    envs = make_envelopes("s1", 60, seed=3)
    write_ledger(tmp_path / "ledger.sqlite", envs)
    db = tmp_path / "analytics.sqlite"
    bounds = {"r2": BOUND}
    kept = _kept(envs, bounds)
    assert len(kept) == len(envs) - (60 - BOUND)
    with Ledger(tmp_path / "ledger.sqlite") as ledger:
        store = AnalyticsStore(db)
        try:
            store.add_source("s1", ledger)
            store.flush(10)
            assert assert_consistent(db, "s1", envs) == len(envs)  # counted, all of them
            store.set_bounds("s1", bounds)  # the list arrives at the cloud
            store.flush(10)
            assert db_watermarks(db)[("s1", "r2")] == BOUND
            assert assert_consistent(db, "s1", envs) == len(kept)
            assert dict(db_totals(db)[0]) == dict(expected("s1", kept))
            assert store.excluded == 60 - BOUND
            # the live feed and catch-ups bring them again: never counted back
            store.submit("s1", [fact_of(e) for e in envs], now_ms())
            store.catch_up("s1")
            store.set_bounds("s1", bounds)  # the same list again: nothing to do
            store.flush(10)
            assert dict(db_totals(db)[0]) == dict(expected("s1", kept))
            assert store.excluded == 60 - BOUND
        finally:
            store.close()
        # A restart: the bound is applied already (recorded with the correction)
        store = AnalyticsStore(db)
        try:
            store.add_source("s1", ledger, bounds)
            store.flush(10)
            assert dict(db_totals(db)[0]) == dict(expected("s1", kept))
            assert store.excluded == 0 and store.aggregated == 0
        finally:
            store.close()
        # A database rebuilt from the ledger with the bound known first: the archived
        # rows above it are never counted.
        fresh = tmp_path / "fresh.sqlite"
        store = AnalyticsStore(fresh)
        try:
            store.add_source("s1", ledger, bounds)
            store.flush(10)
            assert dict(db_totals(fresh)[0]) == dict(expected("s1", kept))
            assert db_watermarks(fresh)[("s1", "r2")] == BOUND
            assert store.aggregated == len(kept)
        finally:
            store.close()


def test_a_bound_of_zero_and_a_bound_moved_up(tmp_path: Path) -> None:
    """A node whose every envelope is left out (bound 0: its watermark goes), and a
    bound a later list raises (the rows between come back through catch-up)."""
    envs = make_envelopes("s1", 30, seed=4)
    write_ledger(tmp_path / "ledger.sqlite", envs)
    db = tmp_path / "analytics.sqlite"
    with Ledger(tmp_path / "ledger.sqlite") as ledger:
        store = AnalyticsStore(db)
        try:
            store.add_source("s1", ledger)
            store.flush(10)
            for bounds in ({"r1": 0, "r2": 5}, {"r1": 0, "r2": 12}):
                store.set_bounds("s1", bounds)
                store.flush(10)
                kept = _kept(envs, bounds)
                assert dict(db_totals(db)[0]) == dict(expected("s1", kept))
                assert assert_consistent(db, "s1", envs) == len(kept)
                assert ("s1", "r1") not in db_watermarks(db)
            assert store.excluded == 30 + 25
        finally:
            store.close()


# --- embedded cloud -------------------------------------------------------------------------


def _crl(edge: Node, node_id: str, bound: int) -> RevocationList:
    ident = load_identity(edge.data_dir)
    assert ident.store_key is not None
    version = edge.identity.trust.crl_version + 1
    return issue_revocations(ident.store_key, store_id=ident.store_id, version=version,
                             revoked={node_id}, upto={node_id: bound})


def _db_stock(db: Path, store: str, sku: str) -> tuple[int, int]:
    """(units moved in total, sales) of ``sku`` at ``store`` in analytics.sqlite."""
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        row = conn.execute("SELECT COALESCE(SUM(qty), 0), COALESCE(SUM(CASE kind WHEN "
                           "'sale' THEN events END), 0) FROM movements_hourly WHERE "
                           "store = ? AND sku = ?", (store, sku)).fetchone()
    conn.close()
    return int(row[0]), int(row[1])


@pytest_asyncio.fixture
async def fleet(tmp_path: Path) -> AsyncIterator[Fleet]:
    f = Fleet(tmp_path, ["s1"])
    try:
        yield f
    finally:
        await f.close()


@pytest.mark.asyncio
async def test_embedded_cloud_uncounts_sales_above_a_bound_learned_later(
        fleet: Fleet) -> None:
    await fleet.start_cloud()
    await fleet.start_stores()
    reg, edge = fleet.regs["s1"], fleet.edges["s1"]
    await fleet.receive("s1", "sku-a", 100)
    for _ in range(3):
        await fleet.sell("s1", "sku-a", 2)
    bound = reg.replica.vv.get("reg-s1")
    for _ in range(4):  # above the bound: counted now, left out once the list arrives
        await fleet.sell("s1", "sku-a", 1)
    db = fleet.cloud_root / "analytics.sqlite"

    async def all_counted() -> bool:
        await fleet.analytics.flush()
        return _db_stock(db, "s1", "sku-a") == (100 - 6 - 4, 7)
    await until(all_counted, within=20, what="every sale counted by the analytics")

    edge.handle_effects(edge.core.learn_revocations(_crl(edge, "reg-s1", bound), now_ms()))
    assert fleet.cloud is not None
    cloud_node = fleet.cloud.nodes["s1"]

    async def left_out() -> Any:
        await fleet.analytics.flush()
        r = cloud_node.replica
        return r.vv.get("reg-s1") == bound and edge.replica.vv.get("reg-s1") == bound \
            and _db_stock(db, "s1", "sku-a") == (r.on_hand("sku-a"), 3)
    await until(left_out, within=20, what="the sales above the bound leave the analytics")
    assert cloud_node.replica.on_hand("sku-a") == edge.replica.on_hand("sku-a") == 94
    want = {"totals": {"sales": 3, "units": 6}, "by_store": [
        {"store": "s1", "sales": 3, "units": 6}]}
    async with hq_session(fleet.url) as http:
        body = await get_ok(http, f"{fleet.url}/v1/fleet/sales?hours=24")
        assert {"totals": body["totals"], "by_store": body["by_store"]} == want
        health = await get_ok(http, f"{fleet.url}/v1/fleet/health")
        (s1,) = health["stores"]
        assert s1["analytics_behind"] == 0
        assert {n["node_id"]: n["aggregated_seq"] for n in s1["nodes"]}["reg-s1"] == bound

        # A restart of the cloud: the correction is not done twice, nothing comes back.
        await fleet.stop_cloud()
        await fleet.start_cloud()
        await hq_login(http, fleet.url)
        await fleet.analytics.flush()
        await asyncio.sleep(0.3)
        await fleet.analytics.flush()
        body = await get_ok(http, f"{fleet.url}/v1/fleet/sales?hours=24")
        assert {"totals": body["totals"], "by_store": body["by_store"]} == want
        assert _db_stock(db, "s1", "sku-a") == (94, 3)
        assert fleet.analytics.store.excluded == 0

        # The analytics database lost (deleted, cloud stopped): rebuilt from the ledger,
        # whose archive still holds the 4 sales above the bound, with the bound known
        # first, so they are never counted.
        await fleet.stop_cloud()
        assert len(cloud_ledger_rows(fleet.cloud_root / "s1", "reg-s1")) == bound + 4
        remove_db(db)
        await fleet.start_cloud()
        await hq_login(http, fleet.url)
        await fleet.analytics.flush()
        body = await get_ok(http, f"{fleet.url}/v1/fleet/sales?hours=24")
        assert {"totals": body["totals"], "by_store": body["by_store"]} == want
        assert _db_stock(db, "s1", "sku-a") == (94, 3)
        assert fleet.analytics.store.excluded == 0  # (catch-up stops at the bound)
        health = await get_ok(http, f"{fleet.url}/v1/fleet/health")
        (s1,) = health["stores"]
        assert s1["analytics_behind"] == 0
        assert {n["node_id"]: n["aggregated_seq"] for n in s1["nodes"]}["reg-s1"] == bound


def remove_db(db: Path) -> None:
    for suffix in ("", "-wal", "-shm"):
        Path(f"{db}{suffix}").unlink(missing_ok=True)


def cloud_ledger_rows(data_dir: Path, origin: str) -> list[bytes]:
    """``origin``'s rows in the ledger of the cloud's node in ``data_dir`` (node stopped)."""
    with Ledger(load_identity(data_dir).ledger_path) as ledger:
        return ledger.read_origin(origin, 1, 10_000)


# --- PostgreSQL cloud -----------------------------------------------------------------------


def _pg_figures(dsn: str, store: str, sku: str) -> tuple[int, int, dict[str, int]]:
    """(units moved in total, sales) of ``sku`` at ``store`` in the rollup, and the
    recorded bounds."""
    import psycopg

    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT COALESCE(SUM(qty), 0), COALESCE(SUM(CASE kind WHEN "
                           "'sale' THEN events END), 0) FROM movements_hourly WHERE "
                           "store_id = %s AND sku = %s", (store, sku)).fetchone()
        bounds = dict(conn.execute("SELECT origin, upto FROM rollup_bounds WHERE "
                                   "store_id = %s", (store,)).fetchall())
    assert row is not None
    return int(row[0]), int(row[1]), {str(k): int(v) for k, v in bounds.items()}


def test_pg_ledger_rollup_honours_bounds_before_and_after_the_rows(pg_dsn: str) -> None:
    """``PgLedger.apply_bounds``: rows counted before the bound are taken out, rows
    written after it are never counted, a reopened ledger does nothing twice, and a
    bound moved up counts the rows back in (the rollup is a function of the rows and
    the bound)."""
    from mesh.store.pgstore import PgLedger
    from mesh.testing.contracts import sales
    from tests.contract.test_contract_storage import _identity

    envs = sales(_identity(7), 6)  # a receipt (seq 1), then 5 sales of A, 1 unit each
    after = PgLedger(pg_dsn, "late")  # the bound arrives after the rows
    before = PgLedger(pg_dsn, "early")  # ... before them
    try:
        after.append_sync(envs)
        assert _pg_figures(pg_dsn, "late", "A")[:2] == (1_000_000 - 5, 5)
        before.apply_bounds({"reg-1": 3})  # queued ahead of the append below
        before.append_sync(envs)
        fut = after.apply_bounds({"reg-1": 3})
        assert fut is not None
        fut.result(10)
        for store in ("late", "early"):  # the receipt and 2 sales kept
            assert _pg_figures(pg_dsn, store, "A") == (1_000_000 - 2, 2, {"reg-1": 3})
        assert after.apply_bounds({"reg-1": 3}) is None
    finally:
        after.close()
        before.close()
    again = PgLedger(pg_dsn, "late")
    try:
        assert again.apply_bounds({"reg-1": 3}) is None  # recorded with the correction
        assert _pg_figures(pg_dsn, "late", "A") == (1_000_000 - 2, 2, {"reg-1": 3})
        fut = again.apply_bounds({"reg-1": 5})
        assert fut is not None
        fut.result(10)
        assert _pg_figures(pg_dsn, "late", "A") == (1_000_000 - 4, 4, {"reg-1": 5})
    finally:
        again.close()


@pytest.mark.asyncio
async def test_pg_cloud_uncounts_sales_above_a_bound_learned_later(tmp_path: Path,
                                                                   pg_dsn: str) -> None:
    from mesh.cloud.pganalytics import setup_pg_dashboard
    from tests import meshkit as mk

    f = Fleet(tmp_path, ["s1"])  # its directories: edge, register, the cloud's node
    root = f.cloud_root

    def gateway() -> CloudNode:
        cloud = CloudNode(root, http_host="127.0.0.1", insecure_plaintext=True,
                          database=pg_dsn, gateway_id="g1", lease_ttl_s=1.5)
        cloud.setup_hooks.append(setup_pg_dashboard)
        return cloud

    g1 = gateway()
    await g1.start()
    edge = reg = None
    try:
        await mk.wait_until(lambda: "s1" in g1.nodes, 15, "the gateway serves s1")
        edge = Node(tmp_path / "s1" / "edge", insecure_plaintext=True, http_host="127.0.0.1",
                    discovery=False, wan_peers=[f"{g1.url}/stores/s1#cloud-s1"])
        await edge.start()
        reg = Node(tmp_path / "s1" / "reg", insecure_plaintext=True, http_host="127.0.0.1",
                   discovery=False, peers=[edge.url])
        await reg.start()
        await edge.execute(lambda r: r.receive("sku-a", 100, txn="rcv", now_ms=now_ms()))
        await mk.wait_until(lambda: reg is not None and reg.replica.knows_sku("sku-a"), 10,
                            "the register learns sku-a")
        bound = 0
        for i in range(7):
            if i == 3:
                bound = reg.replica.vv.get("reg-s1")
            await reg.execute(lambda r, i=i: r.sell("sku-a", 2 if i < 3 else 1,
                                                    txn=f"sale-{i}", now_ms=now_ms()))

        async def figures(want: tuple[int, int]) -> bool:
            got = await asyncio.to_thread(_pg_figures, pg_dsn, "s1", "sku-a")
            return got[:2] == want
        await until(lambda: figures((100 - 6 - 4, 7)), within=20,
                    what="every sale in the PostgreSQL rollup")

        edge.handle_effects(edge.core.learn_revocations(_crl(edge, "reg-s1", bound),
                                                        now_ms()))
        node = g1.nodes["s1"]

        async def left_out() -> bool:
            return node.replica.vv.get("reg-s1") == bound and \
                await figures((node.replica.on_hand("sku-a"), 3))
        await until(left_out, within=20, what="the sales above the bound leave the rollup")
        assert node.replica.on_hand("sku-a") == edge.replica.on_hand("sku-a") == 94
        assert (await asyncio.to_thread(_pg_figures, pg_dsn, "s1", "sku-a"))[2] == \
            {"reg-s1": bound}
        async with mk.hq_session(g1.url) as http:
            body = await mk.get_json(http, g1.url, "/v1/fleet/sales?hours=24")
            assert body["totals"] == {"sales": 3, "units": 6}
            stock = await mk.get_json(http, g1.url, "/v1/fleet/stock")
            assert [(s["sku"], s["on_hand"]) for s in stock["stock"]] == [("sku-a", 94)]

        # A restart of the gateway: the bound is recorded, nothing is taken out twice.
        await g1.close()
        g1 = gateway()
        await g1.start()
        await mk.wait_until(lambda: "s1" in g1.nodes, 15, "the gateway serves s1 again")
        await asyncio.sleep(1.0)  # a tick or two
        assert await asyncio.to_thread(_pg_figures, pg_dsn, "s1", "sku-a") == \
            (94, 3, {"reg-s1": bound})
        assert g1.nodes["s1"].replica.on_hand("sku-a") == 94
    finally:
        for n in (reg, edge):
            if n is not None:
                await n.close()
        await g1.close()

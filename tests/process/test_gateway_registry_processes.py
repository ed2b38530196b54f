"""The control plane in PostgreSQL, with real processes (issue 15): two ``storemesh cloud
run --database`` gateways that share no directory start with an empty store registry;
``storemesh hq add --database`` gives HQ an account and ``storemesh cloud join
--database`` enrols the cloud in a running store's edge (a real ``storemesh node``
process) while the gateways run. One of them serves the store within a lease tick, with
no restart: the edge's sales reach the cloud ledger and the fleet analytics over mutual
TLS; HQ's session from one gateway is good at the other; after a kill -9 of the holder
the other gateway takes the store over from what the database holds."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("psycopg")

import psycopg

from mesh.net.hqtls import ensure_hq_tls, hq_hosts
from tests import meshkit as mk
from tests.node.test_gateway import ledger_stats
from tests.process.test_gateway_processes import _leases, _port, _wait_listening

cluster = mk.cluster

TTL_S = 2.0


def _cli(*args: str, cwd: Path) -> str:
    res = subprocess.run([sys.executable, "-m", "mesh", *args], capture_output=True,
                         text=True, timeout=60, cwd=cwd, env=os.environ.copy(), check=False)
    assert res.returncode == 0, f"storemesh {' '.join(args[:2])} failed:\n{res.stdout}\n" \
                                f"{res.stderr}"
    return res.stdout


async def _sell(edge_url: str, n: int, prefix: str) -> None:
    async with mk.client() as http:
        for i in range(n):
            await mk.post_ok(http, edge_url, "/v1/sales",
                             {"sku": "BIKE", "qty": 1, "txn_id": f"{prefix}-{i}"})


@pytest.mark.slow
@pytest.mark.asyncio
async def test_a_store_joined_while_gateways_run_is_served_without_restart(
        cluster: mk.Cluster, tmp_path: Path, pg_dsn: str) -> None:
    t = mk.tag()
    store = f"late-{t}"
    roots = [tmp_path / "gw1", tmp_path / "gw2"]  # one each: nothing shared but the database
    ports = [_port(), _port()]
    for root in roots:
        hq = ensure_hq_tls(root, hq_hosts("127.0.0.1"), now_ms=mk.now_ms())
        assert hq.ca_path is not None
        mk.TEST_SSL.load_verify_locations(cafile=hq.ca_path)
    gws = []
    for i, (root, port) in enumerate(zip(roots, ports, strict=True)):
        gw = cluster.spawn(f"g{i + 1}", [
            "cloud", "run", "--data", str(root), "--http-host", "127.0.0.1", "--http-port",
            str(port), "--database", pg_dsn, "--gateway-id", f"g{i + 1}", "--lease-ttl",
            str(TTL_S)], data_dir=root)
        gw.url = f"https://127.0.0.1:{port}"
        gws.append(gw)
    for gw in gws:
        await _wait_listening(gw)  # with no store registered yet

    password = tmp_path / "pw"
    password.write_text(mk.HQ_PASSWORD)
    _cli("hq", "add", str(roots[1]), mk.HQ_USER, "--database", pg_dsn, "--password-file",
         str(password), cwd=tmp_path)

    # A store's edge, as a real process, dialing both gateway URLs (the store's node at
    # the cloud is pinned with #cloud-STORE, as a load generator's edge is).
    edge_ident = mk.new_store(tmp_path, store, f"edge-{t}")
    clouds = [a for gw in gws for a in ("--cloud", f"{gw.url}/stores/{store}#cloud-{store}")]
    edge = await cluster.start("edge", edge_ident.data_dir, discovery=False, extra=clouds)
    async with mk.client() as http:
        await mk.post_ok(http, edge.url, "/v1/receipts",
                         {"sku": "BIKE", "qty": 100, "txn_id": "po-1"})
    await _sell(edge.url, 3, "before")  # sold before the cloud knows the store

    token = mk.join_token(edge_ident, role="cloud", url=edge.url)
    out = _cli("cloud", "join", str(roots[0]), token, "--database", pg_dsn, cwd=tmp_path)
    assert "registered in the database" in out
    with psycopg.connect(pg_dsn) as conn:  # when the CLI committed it (same machine clock)
        row = conn.execute("SELECT extract(epoch FROM registered_at) FROM cloud_stores "
                           "WHERE store_id = %s", (store,)).fetchone()
    assert row is not None
    registered = float(row[0])
    assert not (roots[0] / store).exists()  # nothing left on the joining machine's root

    def served() -> bool:
        lease = _leases(pg_dsn).get(store)
        return lease is not None and lease[1]
    await mk.wait_until(served, 3 * TTL_S, f"a gateway holds store {store}")
    took = time.time() - registered
    print(f"\nstore {store} joined while 2 gateways run: served {took:.1f} s after its "
          f"registration (lease ttl {TTL_S} s, tick {TTL_S / 3:.2f} s)")
    assert took <= 2 * TTL_S, took  # within a tick or two, not a restart

    await _sell(edge.url, 4, "after")

    def in_cloud(n: int) -> bool:
        return ledger_stats(pg_dsn).get(store) == (n, n)
    await mk.wait_until(lambda: in_cloud(7), 30, "7 sales in the cloud ledger and analytics")

    # HQ: the account from the CLI, a session from one gateway good at the other.
    async with mk.hq_session(gws[0].url) as http:
        for gw in gws:
            body = await mk.get_json(http, gw.url, "/v1/fleet/sales?hours=24")
            assert {r["store"]: r["sales"] for r in body["by_store"]} == {store: 7}

    # kill -9 the holder: the other takes the store from the database and serves on.
    holder_id = _leases(pg_dsn)[store][0]
    holder = next(gw for gw in gws if gw.name == holder_id)
    survivor = next(gw for gw in gws if gw is not holder)
    cluster.kill(holder)
    await mk.wait_until(lambda: _leases(pg_dsn)[store] == (survivor.name, True),
                        4 * TTL_S + 10, f"{survivor.name} took store {store}")
    await _sell(edge.url, 5, "moved")
    await mk.wait_until(lambda: in_cloud(12), 60, "12 sales in the cloud after the move")
    async with mk.hq_session(survivor.url) as http:
        health = await mk.get_json(http, survivor.url, "/v1/fleet/health")
        assert [h["gateway"] for h in health["stores"] if h["store"] == store] == \
            [survivor.name]

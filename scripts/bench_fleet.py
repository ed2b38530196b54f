#!/usr/bin/env python3
"""Fleet load generator: ingest throughput of the cloud on PostgreSQL, 1 -> 2 -> 4 gateways.

Simulated stores (``mesh.testing.fleet``: each a real edge ``Node`` with its own store
key, signed and hash-chained envelopes, SQLite ledger; all of them in this process)
stream sales to ``storemesh cloud run --database postgresql://...`` gateways (child
processes, mutual TLS, on one throw-away PostgreSQL from ``tests.pgkit``, fsync on).

For each gateway count G, on a fresh database:

1. the stores sell ``--sales`` each with no cloud connected (their backlog: made before
   the clock starts, so the edges' signing is not counted);
2. G gateways start and share the stores by lease (waited for, not timed);
3. the edges connect to every gateway URL; the clock runs until PostgreSQL holds every
   envelope of every store (counted in SQL, so: verified by a gateway, committed, and
   the analytics rollup updated in the same transaction).

Reported per run: envelopes/s into the cloud, per gateway, and CPU seconds per 1,000
envelopes of the gateways (``/proc/PID/stat``), of PostgreSQL (the postmaster and its
backends: ``tests.pgkit.PgCluster.backend_cpu_s``) and of this process (the edges
sending), with the machine's core count: on 2 cores everything competes for the same
CPU, so the per-envelope costs are the figures to extrapolate from (docs/analytics.md).

Usage::

    PYTHONPATH=. .venv/bin/python scripts/bench_fleet.py --quick     # ~1 min
    PYTHONPATH=. .venv/bin/python scripts/bench_fleet.py             # ~4 min
    PYTHONPATH=. .venv/bin/python scripts/bench_fleet.py --gateways 1,2 --stores 40
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import queue
import resource
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psycopg
from rich.console import Console
from rich.table import Table

from mesh.net.hqtls import ensure_hq_tls, hq_hosts
from mesh.testing.fleet import Fleet, provision
from tests.pgkit import PgCluster

TICK = os.sysconf("SC_CLK_TCK")
#: Bounds: a phase that takes longer is reported as a failure, not waited for.
START_S = 120.0
INGEST_S = 600.0


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _cpu_s(pid: int) -> float:
    text = Path(f"/proc/{pid}/stat").read_text()
    fields = text[text.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def _self_cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


class Gateway:
    def __init__(self, root: Path, dsn: str, gid: str, log: Path) -> None:
        self.port = _port()
        self.url = f"https://127.0.0.1:{self.port}"
        self.log = log.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mesh", "cloud", "run", "--data", str(root),
             "--http-host", "127.0.0.1", "--http-port", str(self.port), "--database", dsn,
             "--gateway-id", gid, "--log-level", "WARNING"],
            stdout=subprocess.PIPE, stderr=self.log, stdin=subprocess.DEVNULL,
            start_new_session=True)
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            self.lines.put(raw.decode(errors="replace"))

    async def ready(self) -> None:
        deadline = time.monotonic() + START_S
        while time.monotonic() < deadline:
            try:
                if " listening on " in self.lines.get_nowait():
                    return
            except queue.Empty:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"gateway exited ({self.proc.returncode})") from None
                await asyncio.sleep(0.05)
        raise TimeoutError("gateway did not start")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self.log.close()


def _count(dsn: str) -> int:
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT count(*) FROM envelopes").fetchone()
        return int(row[0]) if row else 0


def _leases(dsn: str) -> tuple[dict[str, int], int]:
    """Live leases per gateway, and the sum of epochs (it grows with every move)."""
    with psycopg.connect(dsn) as conn:
        per = dict(conn.execute("SELECT gateway, count(*) FROM leases WHERE expires_at > "
                                "now() GROUP BY gateway").fetchall())
        row = conn.execute("SELECT COALESCE(sum(epoch), 0) FROM leases").fetchone()
    return {str(g): int(n) for g, n in per.items()}, int(row[0]) if row else 0


async def run_once(pg: PgCluster, base: Path, n_gw: int, stores: int, sales: int,
                   console: Console) -> dict[str, Any]:
    work = base / f"g{n_gw}"
    shutil.rmtree(work, ignore_errors=True)
    root, edges = work / "cloud", work / "edges"
    ids = provision(edges, root, stores, prefix=f"g{n_gw}s")
    ensure_hq_tls(root, hq_hosts("127.0.0.1"), now_ms=time.time_ns() // 1_000_000)
    dsn = pg.create_database(f"bench_g{n_gw}_{os.getpid()}")

    t = time.monotonic()
    offline = Fleet(edges, ids, [], plaintext=False)
    await offline.start()
    await offline.sell_all(sales, concurrency=stores)
    expected = sum(offline.held(s) for s in ids)  # receipt + sales, per store
    await offline.close()
    console.print(f"  G={n_gw}: backlog of {expected} envelopes made in "
                  f"{time.monotonic() - t:.1f} s")

    gws = [Gateway(root, dsn, f"gw{i + 1}", work / f"gw{i + 1}.log") for i in range(n_gw)]
    fleet = Fleet(edges, ids, [g.url for g in gws], plaintext=False)
    try:
        for g in gws:
            await g.ready()
        # Timed only once the fair share settled: every store leased, no gateway above
        # its share, and no lease moved for 5 s (hand-overs happen at ticks: ttl/3).
        deadline = time.monotonic() + START_S
        share = -(-stores // n_gw)
        last: tuple[dict[str, int], int] | None = None
        stable_since = time.monotonic()
        while True:
            if time.monotonic() > deadline:
                raise TimeoutError(f"the gateways did not settle: {last}")
            now = await asyncio.to_thread(_leases, dsn)
            if now != last:
                last, stable_since = now, time.monotonic()
            elif sum(now[0].values()) == stores and max(now[0].values()) <= share \
                    and time.monotonic() - stable_since >= 5:
                break
            await asyncio.sleep(0.2)
        epochs0 = last[1]
        await fleet.start(connect=False)  # opened before the clock; dialled at t0
        cpu0 = {g.proc.pid: _cpu_s(g.proc.pid) for g in gws}
        pg0, me0 = pg.backend_cpu_s(), _self_cpu_s()
        t0 = time.monotonic()
        fleet.connect()
        connected_s: float | None = None
        got = 0
        while got < expected:
            if time.monotonic() - t0 > INGEST_S:
                raise TimeoutError(f"ingest: {got}/{expected} after {INGEST_S} s")
            await asyncio.sleep(0.1)
            if connected_s is None and all(
                    any(p.startswith("cloud-") for p in n.sessions) for n in fleet.nodes.values()):
                connected_s = time.monotonic() - t0
            got = await asyncio.to_thread(_count, dsn)
        secs = time.monotonic() - t0
        gw_cpu = sum(_cpu_s(p) - c for p, c in cpu0.items())
        pg_cpu = pg.backend_cpu_s() - pg0
        me_cpu = _self_cpu_s() - me0
        moves = (await asyncio.to_thread(_leases, dsn))[1] - epochs0
    finally:
        await fleet.close()
        for g in gws:
            g.stop()
    rate = expected / secs
    return {"gateways": n_gw, "stores": stores, "envelopes": expected, "seconds": secs,
            "env_per_s": rate, "env_per_s_per_gateway": rate / n_gw,
            "gateway_cpu_s": gw_cpu, "pg_cpu_s": pg_cpu, "edges_cpu_s": me_cpu,
            # CPU ms per 1,000 envelopes = CPU s / envelopes x 1e6
            "gateway_ms_per_kenv": 1e6 * gw_cpu / expected,
            "pg_ms_per_kenv": 1e6 * pg_cpu / expected,
            "edges_ms_per_kenv": 1e6 * me_cpu / expected,
            "cpu_util": (gw_cpu + pg_cpu + me_cpu) / secs,
            "all_connected_s": connected_s, "lease_moves_while_timed": moves,
            "share": last[0]}


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes (smoke run)")
    ap.add_argument("--gateways", default="1,2,4", help="gateway counts to run")
    ap.add_argument("--stores", type=int, default=None, help="simulated stores")
    ap.add_argument("--sales", type=int, default=None, help="backlog sales per store")
    ap.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    args = ap.parse_args()
    stores = args.stores or (10 if args.quick else 40)
    sales = args.sales or (100 if args.quick else 1000)
    console = Console()
    console.print(f"bench_fleet: {stores} stores x {sales} sales, gateways "
                  f"{args.gateways}, {os.cpu_count()} cores")
    results = []
    with PgCluster() as pg:
        base = pg.dir.parent / f"{pg.dir.name}-fleet"
        base.mkdir()
        try:
            for n in (int(x) for x in args.gateways.split(",")):
                results.append(await run_once(pg, base, n, stores, sales, console))
                console.print(f"  G={n}: {results[-1]}")
        except BaseException:
            console.print(f"failed: logs kept in {base}")
            raise
        shutil.rmtree(base, ignore_errors=True)
    table = Table(title=f"Cloud ingest on PostgreSQL ({stores} stores, {os.cpu_count()} "
                        f"cores; CPU ms per 1,000 envelopes)")
    for col in ("gateways", "envelopes", "s", "env/s", "env/s/gw", "gw ms/kenv",
                "pg ms/kenv", "edges ms/kenv", "cores busy"):
        table.add_column(col, justify="right")
    for r in results:
        table.add_row(str(r["gateways"]), str(r["envelopes"]), f"{r['seconds']:.1f}",
                      f"{r['env_per_s']:.0f}", f"{r['env_per_s_per_gateway']:.0f}",
                      f"{r['gateway_ms_per_kenv']:.0f}", f"{r['pg_ms_per_kenv']:.0f}",
                      f"{r['edges_ms_per_kenv']:.0f}", f"{r['cpu_util']:.2f}")
    console.print(table)
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    asyncio.run(main())

#!/usr/bin/env python3
"""Benchmark of the replica core: durable sales, envelope verification, rebuild.

Three sections, each bounded in count and in time:

1. Durable local sales with group commit (``DurableReplica.execute`` + ``Ledger``):
   closed loop with a window of W un-acknowledged sales (W=1 is the baseline, one
   fsync per sale), then an open-loop run paced at a target rate (the acceptance
   figure: >= 2,000 sales/s sustained on one core, and the p99 latency of one
   acknowledged sale under that load).
2. Verification of real ~400 B sale envelopes from one register: raw Ed25519 verify
   (baseline), decode only, ``verify`` + ``Replica.apply`` one at a time, and
   ``verify_chain`` in pages + apply.
3. Rebuild from a big ledger (8 registers, ~2,000 SKUs): ``DurableReplica.open`` in a
   child process (clean wall time and peak RSS), with a full replay and with a
   snapshot plus a small tail.

The machine these run on is usually shared, so every figure comes with a ratio to a
baseline measured in the same run.

Usage::

    .venv/bin/python scripts/bench_core.py --quick          # smoke run, < 30 s
    .venv/bin/python scripts/bench_core.py                  # full sizes, several minutes
    .venv/bin/python scripts/bench_core.py --json out.json  # also dump the numbers
"""

from __future__ import annotations

import argparse
import hashlib
import heapq
import os
import random
import resource
import shutil
import sqlite3
import struct
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import orjson
from benchkit import (  # scripts/ is on sys.path when run as a script
    common_args,
    print_summary,
    run_dir,
)
from rich.console import Console
from rich.table import Table

from mesh import config
from mesh.core.envelope import DOMAIN, Envelope, body_bytes, decode, verify, verify_chain
from mesh.core.identity import (
    NodeKey,
    TrustStore,
    Verifier,
    issue_certificate,
    verify_signature,
)
from mesh.core.replica import CommandResult, Replica
from mesh.durable import DurableReplica
from mesh.store.datadir import NodeIdentity, init_store
from mesh.store.ledger import Ledger

STORE = "bench"
#: Synthetic epoch (ms) for pre-generated envelopes; certificates never expire in the bench.
T0 = 1_700_000_000_000
NOT_AFTER = (1 << 62)
#: Longest wait for any one future / child process: a hang is a failure, not a stall.
FUTURE_TIMEOUT_S = 120.0
CHILD_TIMEOUT_S = 900.0
#: Chain page for verify_chain: the brief's 1,000, never above the protocol's bound.
PAGE = min(1_000, config.LEDGER_PAGE)
#: Envelopes per Ledger.append while building the big ledger, and appends in flight.
BUILD_BATCH = 4_096
BUILD_IN_FLIGHT = 8
#: Un-acknowledged sales allowed in the paced run before the issuer blocks.
PACED_MAX_OUTSTANDING = 8_192
PACED_SKUS = 50
_REC = struct.Struct("<qqI")  # hlc, seq, len(raw) -- generator file record header

console = Console(width=None if sys.stdout.isatty() else 132)


@dataclass(frozen=True, slots=True)
class Sizes:
    windows: tuple[int, ...]
    sales_max: int
    sales_seconds: float
    sales_skus: int
    paced_rate: int
    paced_seconds: float
    verify_n: int
    verify_seconds: float
    rebuild_n: int
    rebuild_tail: int
    rebuild_registers: int
    rebuild_skus: int


FULL = Sizes(
    windows=(1, 8, 64), sales_max=20_000, sales_seconds=20.0, sales_skus=200,
    paced_rate=2_000, paced_seconds=10.0, verify_n=20_000, verify_seconds=30.0,
    rebuild_n=1_000_000, rebuild_tail=10_000, rebuild_registers=8, rebuild_skus=2_000,
)
QUICK = Sizes(
    windows=(1, 8, 64), sales_max=1_500, sales_seconds=2.0, sales_skus=50,
    paced_rate=2_000, paced_seconds=2.0, verify_n=3_000, verify_seconds=5.0,
    rebuild_n=20_000, rebuild_tail=1_000, rebuild_registers=8, rebuild_skus=2_000,
)


# --- small helpers -----------------------------------------------------------------------


def pct(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty list."""
    if not values:
        return float("nan")
    s = sorted(values)
    k = max(0, min(len(s) - 1, round(q / 100 * len(s) + 0.5) - 1))
    return s[k]


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def sku_name(i: int) -> str:
    return f"SKU-{i:05d}"


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.2f}"


def rate(n: float) -> str:
    return f"{n:,.0f}"


def _sell(sku: str, txn: str, at_ms: int) -> Callable[[Replica], CommandResult]:
    return lambda r: r.sell(sku, 1, txn=txn, now_ms=at_ms)


def _receive(sku: str, qty: int, txn: str, at_ms: int) -> Callable[[Replica], CommandResult]:
    return lambda r: r.receive(sku, qty, txn=txn, now_ms=at_ms)


# --- section 1: durable local sales ------------------------------------------------------


def open_sales_store(root: Path, name: str, n_skus: int) -> DurableReplica:
    d = root / name
    init_store(d, STORE, now_ms=now_ms())
    dr = DurableReplica.open(d)
    futs = [dr.execute(_receive(sku_name(i), 1_000_000, f"rx-{i}", now_ms()))[1]
            for i in range(n_skus)]
    for f in futs:
        f.result(timeout=FUTURE_TIMEOUT_S)
    return dr


def _stamp(lat: list[float], errors: list[BaseException], t0: float, fut: Future[int]) -> None:
    """Done-callback (runs on the ledger's writer thread): record the ack latency."""
    exc = fut.exception()
    if exc is not None:
        errors.append(exc)
        return
    lat.append(time.perf_counter() - t0)


def _latency_stats(lat: list[float]) -> dict[str, float]:
    return {"p50_ms": pct(lat, 50) * 1e3, "p99_ms": pct(lat, 99) * 1e3,
            "max_ms": max(lat) * 1e3 if lat else float("nan")}


def run_window(dr: DurableReplica, window: int, sz: Sizes) -> dict[str, Any]:
    """Closed loop: keep ``window`` sales un-acknowledged, like a busy bank of tills."""
    lat: list[float] = []
    errors: list[BaseException] = []
    outstanding: deque[Future[int]] = deque()
    batches0 = dr.ledger.batches
    n = 0
    t_start = time.perf_counter()
    cpu0, pcpu0 = time.thread_time(), time.process_time()
    deadline = t_start + sz.sales_seconds
    while n < sz.sales_max and time.perf_counter() < deadline:
        while len(outstanding) >= window:
            outstanding.popleft().result(timeout=FUTURE_TIMEOUT_S)
        t0 = time.perf_counter()
        _, fut = dr.execute(_sell(sku_name(n % sz.sales_skus), f"w{window}-{n}", now_ms()))
        fut.add_done_callback(lambda f, t0=t0: _stamp(lat, errors, t0, f))
        outstanding.append(fut)
        n += 1
    cpu = time.thread_time() - cpu0
    for fut in outstanding:
        fut.result(timeout=FUTURE_TIMEOUT_S)
    elapsed = time.perf_counter() - t_start
    pcpu = time.process_time() - pcpu0
    fsyncs = dr.ledger.batches - batches0
    return {
        "process_cpu_us_per_sale": pcpu / n * 1e6 if n else float("nan"),
        "window": window, "sales": n, "seconds": elapsed, "rate": n / elapsed,
        **_latency_stats(lat), "errors": len(errors),
        "cpu_us_per_sale": cpu / n * 1e6 if n else float("nan"),
        "commits": fsyncs, "sales_per_commit": n / fsyncs if fsyncs else float("nan"),
    }


def run_paced(dr: DurableReplica, target: int, seconds: float) -> dict[str, Any]:
    """Open loop: sale i is due at start + i/target whatever happened to earlier ones.

    Latency is measured from the *scheduled* time (so a stalled issuer shows up as
    latency instead of hiding it: no coordinated omission), and from the actual issue.
    """
    lat_sched: list[float] = []
    lat_issue: list[float] = []
    errors: list[BaseException] = []
    outstanding: deque[Future[int]] = deque()
    total = int(target * seconds)
    interval = 1.0 / target
    max_late = 0.0
    batches0 = dr.ledger.batches
    t_start = time.perf_counter()
    cpu0, pcpu0 = time.thread_time(), time.process_time()
    hard_deadline = t_start + seconds * 3 + 5  # bound even if the issuer falls far behind
    n = 0
    while n < total:
        due = t_start + n * interval
        now = time.perf_counter()
        if now > hard_deadline:
            break
        if now < due:
            time.sleep(due - now)
        n += 1
        while outstanding and outstanding[0].done():
            outstanding.popleft()
        while len(outstanding) >= PACED_MAX_OUTSTANDING:
            outstanding.popleft().result(timeout=FUTURE_TIMEOUT_S)
        t_issue = time.perf_counter()
        max_late = max(max_late, t_issue - due)
        _, fut = dr.execute(_sell(sku_name(n % PACED_SKUS), f"paced-{n}", now_ms()))

        def stamp(f: Future[int], due: float = due, t_issue: float = t_issue) -> None:
            if f.exception() is not None:
                errors.append(f.exception())  # type: ignore[arg-type]
                return
            t = time.perf_counter()
            lat_sched.append(t - due)
            lat_issue.append(t - t_issue)

        fut.add_done_callback(stamp)
        outstanding.append(fut)
    cpu = time.thread_time() - cpu0
    for fut in outstanding:
        fut.result(timeout=FUTURE_TIMEOUT_S)
    elapsed = time.perf_counter() - t_start
    pcpu = time.process_time() - pcpu0
    fsyncs = dr.ledger.batches - batches0
    return {
        "process_cpu_us_per_sale": pcpu / n * 1e6 if n else float("nan"),
        "target": target, "sales": n, "seconds": elapsed, "rate": n / elapsed,
        **_latency_stats(lat_sched),
        "p99_from_issue_ms": pct(lat_issue, 99) * 1e3,
        "max_issue_late_ms": max_late * 1e3, "errors": len(errors),
        "cpu_us_per_sale": cpu / n * 1e6 if n else float("nan"),
        "main_thread_cpu_share": cpu / elapsed,
        "commits": fsyncs, "sales_per_commit": n / fsyncs if fsyncs else float("nan"),
    }


def run_bare_commits(root: Path, n_max: int, seconds: float) -> dict[str, Any]:
    """The floor: one ~450 B row per transaction straight into SQLite (WAL,
    synchronous=FULL, the ledger's schema), no replica, no signing, no threads."""
    conn = sqlite3.connect(root / "bare.sqlite", isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("CREATE TABLE envelopes (id INTEGER PRIMARY KEY, origin TEXT NOT NULL, "
                     "seq INTEGER NOT NULL, hlc INTEGER NOT NULL, hash BLOB NOT NULL, "
                     "raw BLOB NOT NULL, UNIQUE (origin, seq))")
        raw = os.urandom(450)
        lat: list[float] = []
        t_start = time.perf_counter()
        deadline = t_start + seconds
        while len(lat) < n_max and time.perf_counter() < deadline:
            t0 = time.perf_counter()
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("INSERT INTO envelopes (origin, seq, hlc, hash, raw) "
                         "VALUES (?, ?, ?, ?, ?)", ("bare", len(lat) + 1, 0, raw[:32], raw))
            conn.execute("COMMIT")
            lat.append(time.perf_counter() - t0)
        elapsed = time.perf_counter() - t_start
    finally:
        conn.close()
    return {"commits": len(lat), "seconds": elapsed, "rate": len(lat) / elapsed,
            **_latency_stats(lat)}


def section_sales(root: Path, sz: Sizes) -> dict[str, Any]:
    out: dict[str, Any] = {"windows": []}
    out["bare"] = run_bare_commits(root, sz.sales_max, min(sz.sales_seconds, 5.0))
    for w in sz.windows:
        dr = open_sales_store(root, f"sales-w{w}", sz.sales_skus)
        try:
            out["windows"].append(run_window(dr, w, sz))
        finally:
            dr.close()
    dr = open_sales_store(root, "sales-paced", PACED_SKUS)
    try:
        out["paced"] = run_paced(dr, sz.paced_rate, sz.paced_seconds)
    finally:
        dr.close()
    base = out["windows"][0]["rate"]
    for row in out["windows"]:
        row["ratio_vs_w1"] = row["rate"] / base
    b = out["bare"]

    t = Table(title="1. Durable local sales (group commit, fsync per commit)")
    for col in ("run", "sales", "sales/s", "x W=1", "p50 ms", "p99 ms", "max ms",
                "sales/commit", "main CPU µs/sale", "process CPU µs/sale"):
        t.add_column(col, justify="right")
    t.add_row("bare SQLite commit, 1 row (floor)", rate(b["commits"]), rate(b["rate"]),
              f"{b['rate'] / base:.1f}", f"{b['p50_ms']:.2f}", f"{b['p99_ms']:.2f}",
              f"{b['max_ms']:.2f}", "1.0", "", "")
    for row in out["windows"]:
        t.add_row(f"window W={row['window']}", rate(row["sales"]), rate(row["rate"]),
                  f"{row['ratio_vs_w1']:.1f}", f"{row['p50_ms']:.2f}", f"{row['p99_ms']:.2f}",
                  f"{row['max_ms']:.2f}", f"{row['sales_per_commit']:.1f}",
                  f"{row['cpu_us_per_sale']:.0f}", f"{row['process_cpu_us_per_sale']:.0f}")
    p = out["paced"]
    t.add_row(f"paced {p['target']:,}/s (open loop)", rate(p["sales"]), rate(p["rate"]),
              f"{p['rate'] / base:.1f}", f"{p['p50_ms']:.2f}", f"{p['p99_ms']:.2f}",
              f"{p['max_ms']:.2f}", f"{p['sales_per_commit']:.1f}",
              f"{p['cpu_us_per_sale']:.0f}", f"{p['process_cpu_us_per_sale']:.0f}")
    console.print(t)
    console.print(f"  paced run: p99 from issue {p['p99_from_issue_ms']:.2f} ms, issuer at most "
                  f"{p['max_issue_late_ms']:.2f} ms behind schedule, main thread busy "
                  f"{p['main_thread_cpu_share']:.0%} of wall time; errors: "
                  f"{sum(r['errors'] for r in out['windows']) + p['errors']}")
    return out


# --- section 2: verification -------------------------------------------------------------


@dataclass
class World:
    store_key: NodeKey
    trust: TrustStore
    keys: dict[str, NodeKey]

    def enrol(self, node_id: str, role: str = "register") -> NodeKey:
        key = NodeKey.generate()
        self.keys[node_id] = key
        self.trust.add_certificate(issue_certificate(
            self.store_key, node_id=node_id, store_id=self.trust.store_id, role=role,
            public_key=key.public_key, not_after=NOT_AFTER))
        return key


def new_world() -> World:
    sk = NodeKey.generate()
    return World(sk, TrustStore(STORE, sk.public_key), {})


def gen_register_chain(key: NodeKey, node_id: str, n_skus: int, n_sales: int,
                       seed: int) -> tuple[list[bytes], list[bytes]]:
    """Receipts for ``n_skus`` SKUs, then ``n_sales`` one-unit sales. Returns raw bytes."""
    rng = random.Random(seed)
    r = Replica(STORE, node_id, "register", key)
    receipts = [r.receive(sku_name(i), 10_000, txn=f"rx-{i}", now_ms=T0 + i).envelope
                for i in range(n_skus)]
    sales = [r.sell(sku_name(rng.randrange(n_skus)), 1, txn=f"s-{i}", staff="st-042",
                    now_ms=T0 + n_skus + i).envelope for i in range(n_sales)]
    return ([e.raw for e in receipts if e is not None], [e.raw for e in sales if e is not None])


#: The trust stores' signature-check memories the timed phases clear.
_VERIFIERS: list[Verifier] = []


def _timed_loop(items: list[Any], fn: Callable[[Any], object], seconds: float,
                step: int = 256) -> tuple[int, float]:
    """Run ``fn`` over ``items`` (bounded by ``seconds``); returns (count, elapsed)."""
    for v in _VERIFIERS:  # each phase pays for its own signature checks
        v.clear()
    t0 = time.perf_counter()
    deadline = t0 + seconds
    n = 0
    for i in range(0, len(items), step):
        for it in items[i:i + step]:
            fn(it)
        n = min(len(items), i + step)
        if time.perf_counter() > deadline:
            break
    return n, time.perf_counter() - t0


def section_verify(sz: Sizes) -> dict[str, Any]:
    world = new_world()
    key = world.enrol("reg-01")
    world.enrol("edge-1", role="edge")
    n_skus = 200
    t = time.perf_counter()
    receipts, sales = gen_register_chain(key, "reg-01", n_skus, sz.verify_n, seed=1)
    gen_s = time.perf_counter() - t
    trust, now = world.trust, T0 + 10_000_000
    _VERIFIERS.append(trust.verifier)
    sizes = [len(r) for r in sales]

    # Baseline: Ed25519 alone, on the exact bytes verify() checks.
    pairs = [(bytes.fromhex(r[-130:-2].decode()), DOMAIN + body_bytes(r)) for r in sales]
    pk = key.public_key
    n_ed, s_ed = _timed_loop(pairs, lambda p: verify_signature(pk, p[0], p[1]),
                             sz.verify_seconds)
    assert all(verify_signature(pk, s, d) for s, d in pairs[:10])
    n_dec, s_dec = _timed_loop(sales, decode, sz.verify_seconds)

    def fresh_edge() -> Replica:
        edge = Replica(STORE, "edge-1", "edge")
        for raw in receipts:
            edge.apply(verify(raw, trust, now), now)
        return edge

    edge = fresh_edge()
    decoded = [decode(r) for r in sales]
    n_app, s_app = _timed_loop(decoded, lambda e: edge.apply(e, now), sz.verify_seconds)

    edge = fresh_edge()
    n_one, s_one = _timed_loop(sales, lambda raw: edge.apply(verify(raw, trust, now), now),
                               sz.verify_seconds)
    assert edge.vv.get("reg-01") == n_skus + n_one, "verify+apply lost envelopes"

    edge = fresh_edge()
    pages = [sales[i:i + PAGE] for i in range(0, len(sales), PAGE)]

    def chain_page(page: list[bytes]) -> None:
        for env in verify_chain(page, trust, now, prev=edge.head("reg-01")):
            edge.apply(env, now)

    n_pages, s_chain = _timed_loop(pages, chain_page, sz.verify_seconds, step=1)
    n_chain = sum(len(p) for p in pages[:n_pages])
    assert edge.vv.get("reg-01") == n_skus + n_chain, "verify_chain+apply lost envelopes"

    ed = n_ed / s_ed
    out = {
        "envelopes": len(sales), "bytes_mean": sum(sizes) / len(sizes),
        "bytes_max": max(sizes), "generate_per_s": (len(sales) + n_skus) / gen_s,
        "ed25519_verify_per_s": ed,
        "decode_per_s": n_dec / s_dec,
        "apply_only_per_s": n_app / s_app,
        "verify_apply_per_s": n_one / s_one,
        "verify_chain_apply_per_s": n_chain / s_chain,
        "page": PAGE,
    }
    t = Table(title=f"2. Verification ({len(sales):,} sale envelopes, "
                    f"mean {out['bytes_mean']:.0f} B, one register)")
    for col in ("path", "envelopes/s", "µs each", "x Ed25519", "goal"):
        t.add_column(col, justify="right")
    rows = [
        ("Ed25519 verify only (baseline)", ed, ""),
        ("decode only (no signature)", out["decode_per_s"], ""),
        ("Replica.apply only (pre-decoded)", out["apply_only_per_s"], ""),
        ("verify + apply, one at a time", out["verify_apply_per_s"], ">= 5,000/s"),
        (f"verify_chain (pages of {PAGE}) + apply", out["verify_chain_apply_per_s"],
         ">= 50,000/s"),
    ]
    for name, r, goal in rows:
        t.add_row(name, rate(r), f"{1e6 / r:.1f}", f"{r / ed:.2f}", goal)
    console.print(t)
    console.print(f"  (generating the chain by Replica.sell ran at {out['generate_per_s']:,.0f}"
                  " envelopes/s: seal = checks + Ed25519 sign)")
    return out


# --- section 3: rebuild from a big ledger ------------------------------------------------


def _gen_worker(path: str, tail_path: str, node_id: str, key_raw: bytes, reg_index: int,
                n_regs: int, n_main: int, n_tail: int, n_skus: int, seed: int) -> dict[str, Any]:
    """One register's chain (in a worker process), written as (hlc, seq, len, raw) records.

    The register sells skewed picks of the SKUs (80 % of sales on 20 % of them) and
    receives a SKU (a delivery) the first time it sells it and every ~5 % of operations.
    Op k happens at T0 + k * n_regs + reg_index ms, so merging all registers by HLC
    interleaves them as the edge node would have applied them.
    """
    rng = random.Random(seed)
    r = Replica(STORE, node_id, "register", NodeKey.from_bytes(key_raw))
    hot = max(1, n_skus // 5)
    t0 = time.perf_counter()
    nbytes = 0
    for out_path, count in ((path, n_main), (tail_path, n_tail)):
        with open(out_path, "wb", buffering=1 << 20) as f:
            for _ in range(count):
                k = r.vv.get(node_id)
                at = T0 + k * n_regs + reg_index
                i = rng.randrange(hot) if rng.random() < 0.8 else rng.randrange(n_skus)
                sku = sku_name(i)
                if not r.knows_sku(sku) or rng.random() < 0.05:
                    res = r.receive(sku, rng.randrange(12, 120), txn=f"rx-{k}", now_ms=at,
                                    staff="st-7")
                else:
                    res = r.sell(sku, rng.choice((1, 1, 1, 2, 3)), txn=f"s-{k}", now_ms=at,
                                 staff="st-7")
                env = res.envelope
                assert env is not None
                f.write(_REC.pack(env.hlc, env.seq, len(env.raw)))
                f.write(env.raw)
                nbytes += len(env.raw)
    return {"node": node_id, "seconds": time.perf_counter() - t0, "bytes": nbytes}


def _read_records(path: Path, origin: str) -> Iterator[tuple[int, str, int, bytes]]:
    with open(path, "rb", buffering=1 << 20) as f:
        while True:
            head = f.read(_REC.size)
            if not head:
                return
            hlc, seq, n = _REC.unpack(head)
            yield hlc, origin, seq, f.read(n)


def _feed_ledger(ledger: Ledger, files: list[tuple[Path, str]],
                 prev: dict[str, bytes | None]) -> int:
    """Merge the registers' files by HLC and append them in big batches, without waiting
    per envelope (at most BUILD_IN_FLIGHT appends in flight: bounded memory).

    The ledger stores origin, seq, hlc, hash and raw only, so the Envelope objects are
    built from the generator's records (hash = sha256(raw), prev from the chain) instead
    of decoding 1M envelopes again; the rebuild under test decodes every row for real.
    """
    in_flight: deque[Future[int]] = deque()
    batch: list[Envelope] = []
    n = 0
    merged = heapq.merge(*(_read_records(p, o) for p, o in files), key=lambda rec: rec[0])
    for hlc, origin, seq, raw in merged:
        h = hashlib.sha256(raw).digest()
        batch.append(Envelope(raw, h, STORE, origin, seq, prev.get(origin), hlc, [], {}))
        prev[origin] = h
        if len(batch) >= BUILD_BATCH:
            in_flight.append(ledger.append(batch))
            n += len(batch)
            batch = []
            while len(in_flight) >= BUILD_IN_FLIGHT:
                in_flight.popleft().result(timeout=FUTURE_TIMEOUT_S)
    if batch:
        in_flight.append(ledger.append(batch))
        n += len(batch)
    for fut in in_flight:
        fut.result(timeout=FUTURE_TIMEOUT_S)
    return n


def _run_child(data_dir: Path, write_snapshot: bool) -> dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child-rebuild", str(data_dir)]
    if write_snapshot:
        cmd.append("--child-snapshot")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=CHILD_TIMEOUT_S,
                          check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"rebuild child failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return dict(orjson.loads(proc.stdout.strip().splitlines()[-1]))


def peak_rss_mb() -> float:
    """Peak RSS of this process image in MB.

    ``VmHWM`` from /proc, not ``ru_maxrss``: Linux carries the *parent's* peak into a
    child's ``ru_maxrss`` across fork/vfork + exec, which would charge the benchmark
    driver's memory to the rebuild. Falls back to ``ru_maxrss`` elsewhere.
    """
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child_rebuild(data_dir: Path, write_snapshot: bool) -> None:
    """Hidden mode: open the DurableReplica in ``data_dir``, report JSON on stdout."""
    rss0 = peak_rss_mb()
    t0 = time.perf_counter()
    cpu0 = time.process_time()
    dr = DurableReplica.open(data_dir, snapshot_every=1)
    wall = time.perf_counter() - t0
    cpu = time.process_time() - cpu0
    rss = peak_rss_mb()
    ru_maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    st = dr.rebuild_stats
    count = dr.ledger.count()
    out: dict[str, Any] = {
        "open_s": wall, "cpu_s": cpu, "rebuild_s": st.seconds,
        "snapshot_upto": st.snapshot_upto, "replayed": st.replayed, "rows": count,
        "applied_total": dr.replica.vv.total(), "skus": len(dr.replica.stock),
        "maxrss_mb": rss, "import_rss_mb": rss0, "ru_maxrss_mb": ru_maxrss,
    }
    if write_snapshot:
        t1 = time.perf_counter()
        blob = dr.replica.snapshot()
        out["snapshot_encode_s"] = time.perf_counter() - t1
        out["snapshot_bytes"] = len(blob)
        t1 = time.perf_counter()
        out["snapshot_written"] = dr.maybe_snapshot()
        out["snapshot_save_s"] = time.perf_counter() - t1
        # Not timed: the snapshot must restore to the state the replay built.
        i = dr.identity
        again = Replica(i.store_id, i.node_id, i.role, i.key)
        again.restore(blob)
        out["snapshot_roundtrip_ok"] = (again.state_digest() == dr.replica.state_digest()
                                        and again.vv.to_dict() == dr.replica.vv.to_dict())
        del blob, again
    dr.close()
    sys.stdout.write(orjson.dumps(out).decode() + "\n")


def section_rebuild(root: Path, sz: Sizes, n_total: int) -> dict[str, Any]:
    data_dir = root / "rebuild"
    gen_dir = root / "rebuild-gen"
    gen_dir.mkdir(parents=True)
    ident: NodeIdentity = init_store(data_dir, STORE, now_ms=T0)
    assert ident.store_key is not None
    n_regs = sz.rebuild_registers
    keys = {f"reg-{i + 1:02d}": NodeKey.generate() for i in range(n_regs)}
    for node_id, key in keys.items():
        ident.trust.add_certificate(issue_certificate(
            ident.store_key, node_id=node_id, store_id=STORE, role="register",
            public_key=key.public_key, not_after=NOT_AFTER))
    ident.save()

    per_main = [n_total // n_regs + (1 if i < n_total % n_regs else 0) for i in range(n_regs)]
    tail = sz.rebuild_tail
    per_tail = [tail // n_regs + (1 if i < tail % n_regs else 0) for i in range(n_regs)]
    files = [(gen_dir / f"{nid}.bin", gen_dir / f"{nid}.tail.bin", nid) for nid in keys]
    t = time.perf_counter()
    workers = max(1, min(os.cpu_count() or 1, n_regs))
    with ProcessPoolExecutor(max_workers=workers) as pool:
        futs = [pool.submit(_gen_worker, str(m), str(tl), nid, keys[nid].private_bytes(), i,
                            n_regs, per_main[i], per_tail[i], sz.rebuild_skus, 1000 + i)
                for i, (m, tl, nid) in enumerate(files)]
        gen = [f.result(timeout=CHILD_TIMEOUT_S * 2) for f in futs]
    gen_s = time.perf_counter() - t
    console.print(f"  generated {n_total + tail:,} envelopes in {gen_s:.1f} s with "
                  f"{workers} worker process(es)")

    prev: dict[str, bytes | None] = {}
    t = time.perf_counter()
    with Ledger(ident.ledger_path) as ledger:
        written = _feed_ledger(ledger, [(m, nid) for m, _, nid in files], prev)
        batches = ledger.batches
    write_s = time.perf_counter() - t
    size = ident.ledger_path.stat().st_size
    console.print(f"  wrote {written:,} rows in {write_s:.1f} s ({written / write_s:,.0f} rows/s,"
                  f" {batches} commits), ledger {size / 1e6:.0f} MB")

    full = _run_child(data_dir, write_snapshot=True)
    console.print(f"  full replay: {full['open_s']:.1f} s, peak RSS {full['maxrss_mb']:.0f} MB")

    t = time.perf_counter()
    with Ledger(ident.ledger_path) as ledger:
        tail_written = _feed_ledger(ledger, [(tl, nid) for _, tl, nid in files], prev)
    tail_s = time.perf_counter() - t
    snap = _run_child(data_dir, write_snapshot=False)
    for res, expected_rows in ((full, written), (snap, written + tail_written)):
        if res["rows"] != expected_rows or res["applied_total"] != expected_rows:
            raise RuntimeError(f"rebuild mismatch: {res} (expected {expected_rows} rows)")
    if not full["snapshot_roundtrip_ok"]:
        raise RuntimeError("the snapshot does not restore to the replayed state")

    out = {
        "envelopes": written, "tail": tail_written, "registers": n_regs,
        "skus": full["skus"], "generate_s": gen_s, "generate_workers": workers,
        "generate_per_s": (n_total + tail) / gen_s,
        "worker_seconds": [g["seconds"] for g in gen],
        "mean_bytes": sum(g["bytes"] for g in gen) / (n_total + tail),
        "write_s": write_s, "write_rows_per_s": written / write_s, "write_commits": batches,
        "tail_write_s": tail_s, "ledger_mb": size / 1e6,
        "full": full, "snapshot": snap,
    }
    t = Table(title=f"3. Rebuild (DurableReplica.open in a child process), {written:,} "
                    f"envelopes from {n_regs} registers, {full['skus']:,} SKUs")
    for col in ("run", "rows replayed", "wall s", "rows/s", "peak RSS MB", "x full",
                "goal"):
        t.add_column(col, justify="right")
    t.add_row("full replay (no snapshot)", rate(full["replayed"]), f"{full['open_s']:.2f}",
              rate(full["replayed"] / full["rebuild_s"]), f"{full['maxrss_mb']:.0f}", "1.00",
              "< 60 s, < 500 MB")
    t.add_row(f"snapshot @ {snap['snapshot_upto']:,} + tail", rate(snap["replayed"]),
              f"{snap['open_s']:.2f}", "", f"{snap['maxrss_mb']:.0f}",
              f"{snap['open_s'] / full['open_s']:.2f}", "< 60 s, < 500 MB")
    console.print(t)
    console.print(f"  snapshot: {full['snapshot_bytes'] / 1e6:.1f} MB, encode "
                  f"{full['snapshot_encode_s']:.2f} s, encode+save "
                  f"{full['snapshot_save_s']:.2f} s, restores to the same state: "
                  f"{full['snapshot_roundtrip_ok']}; child RSS after imports "
                  f"{full['import_rss_mb']:.0f} MB (peak RSS = VmHWM of the child)")
    return out


# --- summary -------------------------------------------------------------------------------


def summary(results: dict[str, Any], sz: Sizes) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []

    def add(figure: str, value: str, goal: str, ok: bool | None) -> None:
        rows.append({"figure": figure, "value": value, "goal": goal, "pass": ok})

    if "sales" in results:
        s = results["sales"]
        w = {r["window"]: r for r in s["windows"]}
        best = w[max(w)]
        add(f"closed-loop sales/s, W={best['window']} (x W=1)",
            f"{rate(best['rate'])} (x{best['ratio_vs_w1']:.1f})", ">= 2,000/s",
            best["rate"] >= 2_000)
        p = s["paced"]
        add(f"paced {p['target']:,}/s: achieved rate", f"{rate(p['rate'])}/s",
            f">= {0.99 * p['target']:,.0f}/s (99 %)", p["rate"] >= 0.99 * p["target"])
        add(f"paced {p['target']:,}/s: p99 ack latency", f"{p['p99_ms']:.2f} ms",
            "reported", None)
        add(f"paced {p['target']:,}/s: CPU per sale, main thread / whole process",
            f"{p['cpu_us_per_sale']:.0f} / {p['process_cpu_us_per_sale']:.0f} µs",
            "process <= 500 µs (one core)", p["process_cpu_us_per_sale"] <= 500)
    if "verify" in results:
        v = results["verify"]
        add("verify + apply, one at a time", f"{rate(v['verify_apply_per_s'])}/s",
            ">= 5,000/s", v["verify_apply_per_s"] >= 5_000)
        add(f"verify_chain (pages of {v['page']}) + apply",
            f"{rate(v['verify_chain_apply_per_s'])}/s", ">= 50,000/s",
            v["verify_chain_apply_per_s"] >= 50_000)
    if "rebuild" in results:
        r = results["rebuild"]
        n = f"{r['envelopes']:,}"
        for key, label in (("full", f"rebuild {n}, full replay"),
                           ("snapshot", f"rebuild {n}+{r['tail']:,}, snapshot + tail")):
            c = r[key]
            add(f"{label}: wall", f"{c['open_s']:.2f} s", "< 60 s", c["open_s"] < 60)
            add(f"{label}: peak RSS", f"{c['maxrss_mb']:.0f} MB", "< 500 MB",
                c["maxrss_mb"] < 500)
    print_summary(console, rows, sz is QUICK)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    common_args(ap, "small sizes for a smoke run (< 30 s)", "keep the temporary directories")
    ap.add_argument("--rebuild-n", type=int, default=None,
                    help="envelopes in the rebuild ledger (default 1,000,000; --quick 20,000)")
    ap.add_argument("--only", choices=("sales", "verify", "rebuild"), action="append",
                    help="run only these sections (repeatable)")
    ap.add_argument("--child-rebuild", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--child-snapshot", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.child_rebuild is not None:
        child_rebuild(args.child_rebuild, args.child_snapshot)
        return 0

    sz = QUICK if args.quick else FULL
    n_rebuild = args.rebuild_n if args.rebuild_n is not None else sz.rebuild_n
    if not 1_000 <= n_rebuild <= 10_000_000:
        ap.error("--rebuild-n must be within 1,000..10,000,000")
    sections = args.only or ["sales", "verify", "rebuild"]
    root, started = run_dir("bench_core", args.dir)
    console.print(f"bench_core {'--quick ' if args.quick else ''}started {started}; "
                  f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}; data in {root}")
    results: dict[str, Any] = {}
    t_all = time.perf_counter()
    try:
        if "sales" in sections:
            results["sales"] = section_sales(root, sz)
        if "verify" in sections:
            results["verify"] = section_verify(sz)
        if "rebuild" in sections:
            results["rebuild"] = section_rebuild(root, sz, n_rebuild)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    rows = summary(results, sz)
    total = time.perf_counter() - t_all
    console.print(f"total {total:.1f} s; load average now {os.getloadavg()[0]:.2f}")
    if args.json is not None:
        doc = {"started": started, "quick": args.quick, "cpus": os.cpu_count(),
               "python": sys.version.split()[0], "sizes": asdict(sz), "seconds": total,
               "results": results, "summary": rows}
        args.json.write_bytes(orjson.dumps(doc, option=orjson.OPT_INDENT_2))
    failed = [r for r in rows if r["pass"] is False]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

"""Retention benchmark: memory, disk and restart of a register and an edge vs history.

Generates a busy store's history with the real replica and ledger code and feeds it to
two nodes under test, each in its own child process (so RSS is theirs alone):

* ``r00``, a register: it runs its own share of the commands locally (sales, returns,
  reservations that open and close, restocks, an occasional retried command) through
  ``DurableReplica.execute`` and ingests every other register's envelopes;
* ``edge``, the edge node: it ingests everything (the other registers' and r00's).

The other 19 registers are generator replicas in this (parent) process; SKUs are
picked with a Zipf-like skew (weight 1/(rank+1)); one register is away for
``--away-days`` (a week) of store time in the middle (at most a third of the run) and
delivers its envelopes late. Virtual time only: ``--days`` of store time (default a year
per 20 M envelopes) spread over the envelope count. Remote envelopes are applied and
persisted as the sync core and the driver do (``Replica.apply`` of each, then
``DurableReplica.persist``); snapshots follow the product's schedule
(``DurableReplica.maybe_snapshot`` after every frame: every ``SNAPSHOT_EVERY`` envelopes),
and the register prunes its ledger there (``LEDGER_PRUNE_ROLES``); the edge keeps the
archive. The edge proposes a checkpoint every ``--checkpoint-every`` frames.

Each node reports RSS (VmRSS from /proc/self/status) and the ledger's bytes on disk at
checkpoints of the envelope count (printed as they are reached, so a run stopped by
``--seconds`` still gives figures); afterwards each data dir is reopened in a fresh
child process: the time to rebuild (snapshot + tail) and serve a first command, and the
RSS after that; then ``storemesh ledger verify`` is timed over the register's pruned
ledger and the edge's archive. ``BENCH_TRACEMALLOC=1`` adds each node's traced Python
memory and its top growth between points (slower).

    python scripts/bench_retention.py                      # 100k envelopes, quick
    python scripts/bench_retention.py --envelopes 1000000  # ~5 min at load 2
    python scripts/bench_retention.py --envelopes 6000000 \
        --checkpoints 1000000,2000000,3000000,4000000,5000000,6000000 --seconds 1380
"""

from __future__ import annotations

import argparse
import bisect
import os
import random
import shutil
import struct
import subprocess
import sys
import time
import tracemalloc
from collections import deque
from pathlib import Path
from typing import IO, Any

import orjson
from benchkit import common_args, run_dir  # scripts/ is on sys.path when run as a script
from rich.console import Console
from rich.table import Table

from mesh.core.envelope import decode
from mesh.core.identity import NodeKey, issue_certificate
from mesh.core.replica import CommandResult, Replica
from mesh.durable import DurableReplica
from mesh.errors import CommandError
from mesh.store.datadir import enrol_node, init_store, load_identity

STORE = "bench-retention"
T0 = 1_700_000_000_000
NOT_AFTER = 1 << 62
N_REGISTERS = 20
N_SKUS = 2_000
BATCH = 500  # envelopes per frame to the nodes under test
HERE = Path(__file__).resolve()


def sku_name(i: int) -> str:
    return f"SKU-{i:05d}"


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


# --- framing between the parent and the nodes under test -------------------------------


def write_frame(out: IO[bytes], meta: dict[str, Any], raws: list[bytes]) -> None:
    head = orjson.dumps(meta)
    parts = [struct.pack("<II", len(head), len(raws)), head]
    for r in raws:
        parts.append(struct.pack("<I", len(r)))
        parts.append(r)
    out.write(b"".join(parts))
    out.flush()


def _read_exact(inp: IO[bytes], n: int) -> bytes:
    data = inp.read(n)
    if len(data) != n:
        raise EOFError("parent went away")
    return data


def read_frame(inp: IO[bytes]) -> tuple[dict[str, Any], list[bytes]]:
    hl, n = struct.unpack("<II", _read_exact(inp, 8))
    meta = orjson.loads(_read_exact(inp, hl))
    raws = []
    for _ in range(n):
        (ln,) = struct.unpack("<I", _read_exact(inp, 4))
        raws.append(_read_exact(inp, ln))
    return meta, raws


# --- the node under test (child process) -----------------------------------------------


class LocalTill:
    """r00's own command mix, run on its DurableReplica."""

    def __init__(self, dr: DurableReplica[Any]) -> None:
        self.dr = dr
        self.open: deque[str] = deque()
        self.n = 0
        self.recent: deque[tuple[str, int, int]] = deque(maxlen=64)  # (txn, sku, at)
        self.dups = 0
        self.refused = 0

    def run(self, kind: str, sku: int, at: int) -> None:
        self.n += 1
        txn = f"r00-{self.n}"
        s = sku_name(sku)
        r = self.dr.replica
        try:
            if kind == "retry" and self.recent:
                txn0, sku0, at0 = self.recent[0]
                res, _ = self.dr.execute(
                    lambda rp: rp.sell(sku_name(sku0), 1, txn=txn0, now_ms=at0))
                self.dups += res.duplicate
                return
            if r.available(s) < 20:
                self.dr.execute(lambda rp: rp.receive(s, 500, txn=txn + "-rx", now_ms=at))
            if kind in ("sale", "retry"):
                self.dr.execute(lambda rp: rp.sell(s, 1, txn=txn, now_ms=at, staff="st-1"))
                self.recent.append((txn, sku, at))
            elif kind == "return":
                self.dr.execute(lambda rp: rp.return_(s, 1, txn=txn, now_ms=at,
                                                      reason="changed-mind"))
            elif kind == "adjust":
                self.dr.execute(lambda rp: rp.adjust(s, -1, reason="damage", txn=txn,
                                                     now_ms=at))
            elif kind == "reserve":
                res, _ = self.dr.execute(lambda rp: rp.reserve(
                    s, 1, txn=txn, now_ms=at, channel="web", expires=at + 86_400_000))
                assert res.reservation_id is not None
                self.open.append(res.reservation_id)
            elif kind == "close" and self.open:
                rid = self.open.popleft()
                if rid in r.reservations:
                    if self.n % 3:
                        self.dr.execute(lambda rp: rp.fulfil(rid, txn=txn, now_ms=at))
                    else:
                        self.dr.execute(lambda rp: rp.release(rid, txn=txn, now_ms=at))
        except CommandError:
            self.refused += 1


def child_main(data_dir: Path, with_commands: bool, checkpointer: str | None) -> None:
    inp, out = sys.stdin.buffer, sys.stdout.buffer
    trace = bool(os.environ.get("BENCH_TRACEMALLOC"))
    if trace:
        tracemalloc.start(1)
    last_snap: tracemalloc.Snapshot | None = None
    dr = DurableReplica.open(data_dir, checkpointer=checkpointer)
    till = LocalTill(dr) if with_commands else None
    applied = 0
    while True:
        try:
            meta, raws = read_frame(inp)
        except EOFError:
            break
        if meta.get("stop"):
            break
        own_before = dr.replica.vv.get(dr.identity.node_id)
        if raws:
            # as the sync core and driver do: apply each (verified) envelope, then
            # persist what was applied (the core's Persist effect)
            applied_envs: list[Any] = []
            rep = dr.replica
            for r in raws:
                applied_envs.extend(rep.apply(decode(r), meta["now"]))
            if applied_envs:
                dr.persist(applied_envs)
        if till is not None:
            for kind, sku, at in meta.get("cmds", ()):
                till.run(kind, sku, at)
        applied += len(raws)
        for node, vv in meta.get("observe", {}).items():  # the peers' summaries
            dr.replica.frontier.observe(node, vv, meta["now"])
        if meta.get("checkpoint"):
            dr.maybe_checkpoint(meta["now"], meta["enrolled"])
        dr.ledger.flush()  # own envelopes durable before they are read back and sent
        back: list[bytes] = []
        # own envelopes (r00's commands, the edge's checkpoints) go back
        me = dr.identity.node_id
        head = dr.replica.vv.get(me)
        if head > own_before:
            back = dr.ledger.read_origin(me, own_before + 1, head, limit=head - own_before)
        dr.maybe_snapshot()
        report: dict[str, Any] = {"vv": dr.replica.vv.to_dict()}
        if meta.get("report"):
            report.update(rss=rss_mb(), disk=dr.ledger.size_bytes(),
                          rows=dr.ledger.last_id, held=dr.replica.held_history(),
                          folds=dr.replica.folds,
                          exceptions=len(dr.replica.exceptions()))
            if till is not None:
                report.update(dups=till.dups, refused=till.refused)
            if trace:  # what is allocated, and what grew since the last report
                snap = tracemalloc.take_snapshot()
                stats = snap.compare_to(last_snap, "lineno") if last_snap is not None \
                    else snap.statistics("lineno")
                report["trace"] = [str(st) for st in stats[:10]]
                report["traced_mb"] = tracemalloc.get_traced_memory()[0] / 2**20
                last_snap = snap
        write_frame(out, report, back)
    dr.close()


def restart_main(data_dir: Path, checkpointer: str | None) -> None:
    t0 = time.perf_counter()
    dr = DurableReplica.open(data_dir, checkpointer=checkpointer)
    r = dr.replica
    sku = next(iter(r.skus()))
    _, fut = dr.execute(lambda rp: rp.receive(sku, 1, txn="restart-probe", now_ms=T0 + 10**12))
    fut.result()
    seconds = time.perf_counter() - t0
    out = {"seconds": seconds, "replayed": dr.rebuild_stats.replayed,
           "snapshot_upto": dr.rebuild_stats.snapshot_upto, "rss": rss_mb(),
           "exceptions": len(r.exceptions()), "digest_bytes": len(r.state_digest())}
    dr.close()
    sys.stdout.write(orjson.dumps(out).decode() + "\n")


# --- the generator (parent) ------------------------------------------------------------


class Gen:
    """One generator register: a real Replica signing its own chain."""

    def __init__(self, node_id: str, key: NodeKey, rng: random.Random) -> None:
        self.r = Replica(STORE, node_id, "register", key)
        self.rng = rng
        self.open: deque[str] = deque()
        self.n = 0

    def step(self, kind: str, sku: int, at: int) -> list[bytes]:
        self.n += 1
        txn = f"{self.r.node_id}-{self.n}"
        s = sku_name(sku)
        r = self.r
        out: list[CommandResult | None] = []
        if r.available(s) < 20:
            out.append(r.receive(s, 500, txn=txn + "-rx", now_ms=at))
        try:
            if kind in ("sale", "retry"):
                out.append(r.sell(s, 1, txn=txn, now_ms=at, staff="st-2"))
            elif kind == "return":
                out.append(r.return_(s, 1, txn=txn, now_ms=at, reason="changed-mind"))
            elif kind == "adjust":
                out.append(r.adjust(s, -1, reason="damage", txn=txn, now_ms=at))
            elif kind == "reserve":
                res = r.reserve(s, 1, txn=txn, now_ms=at, channel="web",
                                expires=at + 86_400_000)
                assert res.reservation_id is not None
                self.open.append(res.reservation_id)
                out.append(res)
            elif kind == "close" and self.open:
                rid = self.open.popleft()
                if self.n % 3:
                    out.append(r.fulfil(rid, txn=txn, now_ms=at))
                else:
                    out.append(r.release(rid, txn=txn, now_ms=at))
        except CommandError:
            pass
        return [c.envelope.raw for c in out if c is not None and c.envelope is not None]


KINDS = ["sale"] * 85 + ["return"] * 4 + ["adjust"] * 1 + ["reserve"] * 5 + ["close"] * 4 + \
    ["retry"] * 1


def setup_dirs(root: Path) -> tuple[Path, Path, dict[str, NodeKey]]:
    edge_dir, reg_dir = root / "edge", root / "r00"
    init_store(edge_dir, STORE, now_ms=T0, node_id="edge")
    store_key = NodeKey.load_or_create(edge_dir / "store.key")
    edge = load_identity(edge_dir)
    enrol_node(reg_dir, store_key, STORE, "register", now_ms=T0, node_id="r00",
               trust=edge.trust)
    keys = {f"r{i:02d}": NodeKey.generate() for i in range(1, N_REGISTERS)}
    for d in (edge_dir, reg_dir):
        ident = load_identity(d)
        for nid, k in keys.items():
            ident.trust.add_certificate(issue_certificate(
                store_key, node_id=nid, store_id=STORE, role="register",
                public_key=k.public_key, not_after=NOT_AFTER))
        ident.trust.add_certificate(load_identity(reg_dir if d == edge_dir
                                                  else edge_dir).certificate)
        ident.save()
    return edge_dir, reg_dir, keys


def spawn(*args: str) -> subprocess.Popen[bytes]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(HERE.parent.parent), str(HERE.parent),
                                         env.get("PYTHONPATH", "")])
    return subprocess.Popen([sys.executable, str(HERE), *args], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, env=env)


def run(args: argparse.Namespace, console: Console) -> dict[str, Any]:
    root, started = run_dir("bench-retention", args.dir)
    edge_dir, reg_dir, keys = setup_dirs(root)
    rng = random.Random(args.seed)
    gens = [Gen(nid, k, random.Random(args.seed + i)) for i, (nid, k) in
            enumerate(sorted(keys.items()))]
    cum = []
    acc = 0.0
    for i in range(N_SKUS):
        acc += 1.0 / (i + 1)
        cum.append(acc)
    step_ms = max(1, int(args.days * 86_400_000 / args.envelopes))
    away = gens[-1]  # away for --away-days of store time (at most a third), in the middle
    away_n = min(args.envelopes // 3, int(args.away_days * 86_400_000 / step_ms))
    away_from = (args.envelopes - away_n) // 2
    away_to = away_from + away_n
    held: list[bytes] = []
    ck = ["--checkpointer", "edge"] if args.checkpoint_every else []
    reg = spawn("--child", str(reg_dir), "--commands", *ck)
    edge = spawn("--child", str(edge_dir), *ck)
    enrolled = ["edge", "r00", *sorted(keys)]
    edge_vv: dict[str, int] = {}
    edge_own: list[bytes] = []
    frames = 0
    checkpoints = sorted({c for c in args.checkpoints if c <= args.envelopes}
                         | {args.envelopes})
    rows: list[dict[str, Any]] = []
    sent = 0
    t_start = time.perf_counter()
    deadline = t_start + args.seconds
    nxt = 0
    while sent < args.envelopes and time.perf_counter() < deadline:
        raws: list[bytes] = []
        cmds: list[list[Any]] = []
        at = T0
        while len(raws) + len(cmds) < BATCH:
            at = T0 + (sent + len(raws) + len(cmds)) * step_ms
            kind = KINDS[rng.randrange(len(KINDS))]
            sku = bisect.bisect_left(cum, rng.random() * acc)
            who = rng.randrange(N_REGISTERS)
            if who == 0:
                cmds.append([kind, sku, at])
                continue
            g = gens[who - 1]
            out = g.step(kind, sku, at)
            count = sent + len(raws) + len(cmds)
            if g is away and (away_from <= count < away_to or held):
                held.extend(out)
            else:
                raws.extend(out)
        count = sent + len(raws) + len(cmds)
        if held and count >= away_to:
            raws.extend(held)  # the till is back: a week of envelopes, late
            held = []
        report = nxt < len(checkpoints) and count >= checkpoints[nxt]
        write_frame(reg.stdin, {"now": at, "cmds": cmds, "report": report}, raws + edge_own)
        reg_meta, own = read_frame(reg.stdout)
        # Summaries: r00 reports what it holds; the generator registers (not real
        # peers here) are taken to hold what the edge held a frame ago, as LAN peers
        # in sync would; the away till is not heard while it is away.
        observe = {"r00": reg_meta["vv"]}
        for nid in keys:
            if not (held and nid == away.r.node_id):
                observe[nid] = edge_vv
        frames += 1
        checkpoint = bool(args.checkpoint_every) and frames % args.checkpoint_every == 0
        write_frame(edge.stdin, {"now": at, "report": report, "observe": observe,
                                 "checkpoint": checkpoint, "enrolled": enrolled},
                    raws + own)
        edge_meta, edge_own = read_frame(edge.stdout)
        edge_vv = edge_meta["vv"]
        sent += len(raws) + len(own) + len(edge_own)
        if report:
            row = {"envelopes": sent, "seconds": time.perf_counter() - t_start,
                   "reg_rss": reg_meta["rss"], "reg_disk": reg_meta["disk"],
                   "edge_rss": edge_meta["rss"], "edge_disk": edge_meta["disk"],
                   "exceptions": reg_meta["exceptions"],
                   "edge_exceptions": edge_meta["exceptions"], "dups": reg_meta["dups"],
                   "reg_held": reg_meta["held"], "edge_held": edge_meta["held"],
                   "reg_folds": reg_meta["folds"], "edge_folds": edge_meta["folds"]}
            rows.append(row)
            for who, m in (("register", reg_meta), ("edge", edge_meta)):
                if "trace" in m:
                    row[f"{who}_trace"] = m["trace"]
                    console.print(f"  tracemalloc {who}: {m['traced_mb']:.1f} MB traced; "
                                  "top (growth since the last point):", highlight=False)
                    for line in m["trace"]:
                        console.print("    " + line, highlight=False, soft_wrap=True)
            console.print(f"  {sent:>10,} envelopes held {row['reg_held']}/"
                          f"{row['edge_held']} folds {row['reg_folds']}/{row['edge_folds']} "
                          f"last row {reg_meta['rows']:,}/{edge_meta['rows']:,}  "
                          f"register {row['reg_rss']:.0f} MB "
                          f"({row['reg_disk'] / 1e6:.0f} MB disk)  edge {row['edge_rss']:.0f}"
                          f" MB ({row['edge_disk'] / 1e6:.0f} MB disk)  "
                          f"{row['seconds']:.0f} s  load {os.getloadavg()[0]:.1f}", highlight=False)
            while nxt < len(checkpoints) and sent >= checkpoints[nxt]:
                nxt += 1
    for p in (reg, edge):
        write_frame(p.stdin, {"stop": True}, [])
        p.wait(timeout=600)
    restarts = {}
    for name, d in (("register", reg_dir), ("edge", edge_dir)):
        res = subprocess.run([sys.executable, str(HERE), "--restart", str(d), *ck],
                             capture_output=True, check=True, env=spawn_env(), timeout=600)
        restarts[name] = orjson.loads(res.stdout.splitlines()[-1])
        console.print(f"  restart {name}: {restarts[name]}")
    verify = {}
    for name, d in (("register", reg_dir), ("edge", edge_dir)):
        t0 = time.perf_counter()
        res = subprocess.run([sys.executable, "-m", "mesh", "ledger", "verify", str(d)],
                             capture_output=True, env=spawn_env())
        verify[name] = {"seconds": time.perf_counter() - t0, "rc": res.returncode,
                        "out": res.stdout.decode()[-300:] + res.stderr.decode()[-300:]}
        console.print(f"  ledger verify {name}: rc {res.returncode}, "
                      f"{verify[name]['seconds']:.1f} s\n{verify[name]['out']}")
    result = {"started": started, "envelopes": sent, "target": args.envelopes,
              "days": args.days, "seed": args.seed, "rows": rows, "restart": restarts,
              "verify": verify, "away": [away_from, away_to],
              "complete": sent >= args.envelopes}
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)
    else:
        result["dir"] = str(root)
    return result


def spawn_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(HERE.parent.parent), str(HERE.parent),
                                         env.get("PYTHONPATH", "")])
    return env


def print_table(console: Console, res: dict[str, Any]) -> None:
    t = Table(title=f"Retention: {res['envelopes']:,} envelopes"
              + ("" if res["complete"] else " (stopped by --seconds)"))
    for col in ("envelopes", "register RSS MB", "register ledger MB", "edge RSS MB",
                "edge ledger MB", "exceptions (reg/edge)", "held (reg/edge)", "elapsed s"):
        t.add_column(col, justify="right")
    for r in res["rows"]:
        t.add_row(f"{r['envelopes']:,}", f"{r['reg_rss']:.0f}", f"{r['reg_disk'] / 1e6:.0f}",
                  f"{r['edge_rss']:.0f}", f"{r['edge_disk'] / 1e6:.0f}",
                  f"{r['exceptions']}/{r['edge_exceptions']}",
                  f"{r.get('reg_held', '-')}/{r.get('edge_held', '-')}", f"{r['seconds']:.0f}")
    console.print(t)
    t2 = Table(title="Restart to serving (rebuild + first durable command)")
    for col in ("node", "seconds", "snapshot upto", "replayed", "RSS MB"):
        t2.add_column(col, justify="right")
    for name, r in res["restart"].items():
        t2.add_row(name, f"{r['seconds']:.2f}", f"{r['snapshot_upto']:,}",
                   f"{r['replayed']:,}", f"{r['rss']:.0f}")
    console.print(t2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--envelopes", type=int, default=100_000)
    ap.add_argument("--days", type=float, default=None,
                    help="store time the run spans (default: a year per 20 M envelopes)")
    ap.add_argument("--checkpoints", type=lambda s: [int(x) for x in s.split(",")],
                    default=None, help="envelope counts to report at (comma-separated)")
    ap.add_argument("--seconds", type=float, default=1800.0, help="stop generating after")
    ap.add_argument("--seed", type=int, default=12)
    ap.add_argument("--away-days", type=float, default=7.0,
                    help="store time one till is away in the middle (at most a third)")
    ap.add_argument("--checkpoint-every", type=int, default=20, metavar="FRAMES",
                    help=f"the edge proposes a checkpoint every FRAMES frames of {BATCH} "
                         "envelopes (0: no checkpoints, as before issue 12)")
    ap.add_argument("--checkpointer", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--commands", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--restart", type=Path, help=argparse.SUPPRESS)
    common_args(ap, "100k envelopes", "keep the data directories")
    args = ap.parse_args()
    if args.child is not None:
        child_main(args.child, args.commands, args.checkpointer)
        return
    if args.restart is not None:
        restart_main(args.restart, args.checkpointer)
        return
    if args.quick:
        args.envelopes = min(args.envelopes, 100_000)
    if args.days is None:
        args.days = 365.0 * args.envelopes / 20_000_000
    if args.checkpoints is None:
        n = args.envelopes
        args.checkpoints = [n // 10, n // 4, n // 2, 3 * n // 4, n]
    console = Console()
    console.print(f"[bold]bench_retention[/]: {args.envelopes:,} envelopes, "
                  f"{N_REGISTERS} registers, {N_SKUS} SKUs, {args.days:.1f} days, "
                  f"seed {args.seed}")
    res = run(args, console)
    print_table(console, res)
    if args.json:
        args.json.write_bytes(orjson.dumps(res, option=orjson.OPT_INDENT_2))


if __name__ == "__main__":
    main()

"""What proposing a checkpoint costs the checkpointer (issue 12): the ``ck`` op carries
the proposer's fold hash (``Replica.fold_hash``, computed before signing). Reports, for
a store of SKUS SKUs and a tail of EVENTS sales from 4 registers, per round: the propose
time, the fold hash's share of it, the scratch-copy dry fold (``Replica._dry_fold``, the
method before, timed on the same checkpoint and checked to give the same hash), a
snapshot and a plain command. Bounded: one store, ROUNDS proposals.

With ``--baseline DIR`` the same measurement also runs in a child process importing
``mesh`` from DIR (an older tree, e.g. ``git archive main mesh | tar -x -C DIR``), and
a before/after table is printed; the machine load is printed beside it.

    PYTHONPATH=. python scripts/bench_checkpoint_propose.py [SKUS] [EVENTS] [--baseline DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time
from typing import Any

from mesh.core.checkpoint import Frontier
from mesh.core.identity import NodeKey
from mesh.core.replica import Checkpoint, Replica

NOW = 1_700_000_000_000
ROUNDS = 3


def measure(skus: int, events: int, *, quiet: bool) -> dict[str, list[float]]:
    rng = random.Random(1)
    edge = Replica("s1", "edge", "edge", NodeKey.generate(), checkpointer="edge")
    regs = {f"r{i}": Replica("s1", f"r{i}", "register", NodeKey.generate(),
                             checkpointer="edge") for i in range(4)}
    t = NOW
    for k in range(skus):
        t += 1
        env = edge.receive(f"S{k}", 1000, txn=f"rx{k}", now_ms=t).envelope
        assert env is not None
        for r in regs.values():
            r.apply(env, t)

    def burst(n: int) -> None:
        nonlocal t
        for i in range(n):
            t += 1
            name = f"r{i % 4}"
            env = regs[name].sell(f"S{rng.randrange(skus)}", 1, txn=f"{name}-{t}",
                                  now_ms=t).envelope
            assert env is not None
            edge.apply(env, t)

    # the method propose_checkpoint calls for the hash: _fold_plan (fold_hash's work,
    # after) or the scratch-copy _dry_fold (before, in a baseline tree)
    name = "_fold_plan" if hasattr(Replica, "_fold_plan") else "_dry_fold"
    real = getattr(Replica, name)
    fh: list[float] = []

    def timed(self: Replica, ck: Checkpoint) -> Any:
        t0 = time.perf_counter()
        try:
            return real(self, ck)
        finally:
            fh.append(time.perf_counter() - t0)

    setattr(Replica, name, timed)
    out: dict[str, list[float]] = {"propose": [], "hash": [], "scratch": [], "snapshot": [],
                                   "command": []}
    for n in range(ROUNDS):
        burst(events)
        f = Frontier()
        for node in ("edge", *regs):
            f.observe(node, edge.vv, t)
        frontier, members = f.stable(["edge", *regs], t)
        t0 = time.perf_counter()
        snap = edge.snapshot()
        t_snap = time.perf_counter() - t0
        t0 = time.perf_counter()
        res = edge.propose_checkpoint(frontier, members, txn=f"ck{n}", now_ms=t + 1)
        t_prop = time.perf_counter() - t0
        assert res is not None and res.envelope is not None and edge.ck_mismatches == 0
        # the scratch-copy method on the same checkpoint, on a copy from before it
        before = Replica("s1", "edge", "edge", checkpointer="edge")
        before.restore(snap)
        op = res.envelope.ops[0]
        ck = Checkpoint(op["cut"], dict(op["f"]), "edge", res.envelope.seq, dict(op["h"]))
        t0 = time.perf_counter()
        old = Replica._dry_fold(before, ck)
        t_old = time.perf_counter() - t0
        assert old is not None and old.hex() == op["fh"], "fold hashes differ"
        t0 = time.perf_counter()
        plain = regs["r0"].sell("S0", 1, txn=f"plain{n}", now_ms=t + 2).envelope
        t_cmd = time.perf_counter() - t0
        assert plain is not None
        edge.apply(plain, t + 2)
        for k, v in (("propose", t_prop), ("hash", fh[-1]), ("scratch", t_old),
                     ("snapshot", t_snap), ("command", t_cmd)):
            out[k].append(v * 1e3)
        if not quiet:
            print(f"round {n}: {skus} SKUs, {events} new events: propose {t_prop * 1e3:.1f} ms "
                  f"({name} {fh[-1] * 1e3:.1f} ms = {fh[-1] / t_prop:.0%}); scratch dry fold "
                  f"{t_old * 1e3:.1f} ms (same hash); snapshot {t_snap * 1e3:.1f} ms "
                  f"({len(snap) / 1e6:.1f} MB); plain command {t_cmd * 1e3:.2f} ms")
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("skus", nargs="?", type=int, default=2000)
    ap.add_argument("events", nargs="?", type=int, default=20_000)
    ap.add_argument("--baseline", metavar="DIR", help="also measure the mesh/ under DIR")
    ap.add_argument("--json", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.json:  # the baseline child
        print(json.dumps(measure(a.skus, a.events, quiet=True)))
        return
    base: dict[str, Any] | None = None
    if a.baseline:
        env = dict(os.environ, PYTHONPATH=os.path.abspath(a.baseline))
        child = subprocess.run([sys.executable, os.path.abspath(__file__), str(a.skus),
                                str(a.events), "--json"], env=env, check=True,
                               capture_output=True, text=True, cwd=a.baseline, timeout=600)
        base = json.loads(child.stdout)
    now = measure(a.skus, a.events, quiet=False)
    if base is not None:
        print(f"\nmedian of {ROUNDS} rounds, ms | baseline ({a.baseline}) | this tree | ratio")
        for k, label in (("propose", "propose (whole)"), ("hash", "fold hash in propose"),
                         ("snapshot", "snapshot"), ("command", "plain command")):
            b, n = statistics.median(base[k]), statistics.median(now[k])
            print(f"{label:22} | {b:10.1f} | {n:9.1f} | {b / n:5.1f}x")
    print(f"load average {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()

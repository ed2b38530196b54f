"""What proposing a checkpoint costs the checkpointer (issue 12): the ``ck`` op carries
the proposer's fold hash, computed before signing by folding a scratch copy restored
from a snapshot (``Replica._dry_fold``). Reports, for a store of SKUS SKUs and a tail
of EVENTS sales from 4 registers, the propose time and the dry fold's share of it,
against a snapshot and a plain command measured in the same run. Bounded: one store,
ROUNDS proposals.

    PYTHONPATH=. python scripts/bench_checkpoint_propose.py [SKUS] [EVENTS]
"""

from __future__ import annotations

import os
import random
import sys
import time

from mesh.core.checkpoint import Frontier
from mesh.core.identity import NodeKey
from mesh.core.replica import Checkpoint, Replica

NOW = 1_700_000_000_000
ROUNDS = 3


def main() -> None:
    skus = int(sys.argv[1]) if len(sys.argv) > 1 else 2000
    events = int(sys.argv[2]) if len(sys.argv) > 2 else 20_000
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

    dry: list[float] = []
    real_dry = Replica._dry_fold

    def timed(self: Replica, ck: Checkpoint) -> bytes | None:
        t0 = time.perf_counter()
        try:
            return real_dry(self, ck)
        finally:
            dry.append(time.perf_counter() - t0)

    Replica._dry_fold = timed  # type: ignore[method-assign]
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
        assert res is not None and edge.ck_mismatches == 0
        t0 = time.perf_counter()
        plain = regs["r0"].sell("S0", 1, txn=f"plain{n}", now_ms=t + 2).envelope
        t_cmd = time.perf_counter() - t0
        assert plain is not None
        edge.apply(plain, t + 2)
        print(f"round {n}: {skus} SKUs, {events} new events: propose {t_prop * 1e3:.1f} ms "
              f"(dry fold {dry[-1] * 1e3:.1f} ms = {dry[-1] / t_prop:.0%}); snapshot "
              f"{t_snap * 1e3:.1f} ms ({len(snap) / 1e6:.1f} MB); plain command "
              f"{t_cmd * 1e3:.2f} ms; propose/command {t_prop / t_cmd:.0f}x")
    print(f"load average {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()

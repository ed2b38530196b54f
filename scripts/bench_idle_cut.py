"""Clock floors (issue 12): how far an idle member held the checkpoint fold back.

Runs ``simulations/live_checkpoints.toml`` twice per variant in one process: with the
clock floor the summaries carry (the code as it is), and without it (the checkpointer
ignores every floor: ``Frontier.floors`` returns none, as with peers from before the
field). Variant ``idle_till``: r5 sells, returns and fulfils nothing (a spare till).
Reports folds, proposed checkpoints and the history each node held in memory
(``Replica.held_history``), sampled every 5 s of virtual time.

    PYTHONPATH=. python scripts/bench_idle_cut.py [--seed N]
"""

from __future__ import annotations

import argparse
import statistics
from dataclasses import replace
from pathlib import Path
from typing import Any

from mesh.core.checkpoint import Frontier
from mesh.sim.runner import RunContext, run_scenario
from mesh.sim.scenario import Scenario, load_scenario

ROOT = Path(__file__).resolve().parents[1]
SAMPLE_MS = 5_000.0


def _idle_r5(sc: Scenario) -> Scenario:
    regs = tuple(f"r{i}" for i in range(1, 5))

    def fix(nodes: tuple[str, ...]) -> tuple[str, ...]:
        out: list[str] = []
        for n in nodes:
            out.extend(regs if n == "role:register" else () if n == "r5" else (n,))
        return tuple(out)

    streams = tuple(replace(s, nodes=fix(s.nodes), pickup=fix(s.pickup)) for s in sc.streams)
    races = tuple(replace(r, nodes=fix(r.nodes)) for r in sc.races)
    return replace(sc, streams=streams, races=races)


def _run(sc: Scenario, seed: int | None, floors: bool) -> dict[str, Any]:
    samples: list[int] = []

    def setup(ctx: RunContext) -> None:
        w = ctx.world

        def sample() -> None:
            samples.append(max(n.replica.held_history() for n in w.nodes.values()
                               if n.alive))
            w.after(SAMPLE_MS, sample)

        w.after(SAMPLE_MS, sample)

    real = Frontier.floors
    if not floors:
        Frontier.floors = lambda self, nodes: {}  # type: ignore[method-assign]
    try:
        r = run_scenario(sc, seed, setup=setup)
    finally:
        Frontier.floors = real  # type: ignore[method-assign]
    ck = r.report["checkpoints"]
    return {"ok": r.ok, "proposed": ck["proposed"],
            "min_folds": min(ck["folded_by_node"].values()),
            "hashes_identical": ck["hashes_identical"],
            "held_mean": round(statistics.fmean(samples)), "held_max": max(samples),
            "held_end": samples[-1]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seed", type=int, default=None)
    args = ap.parse_args()
    base = load_scenario(ROOT / "simulations" / "live_checkpoints.toml")
    for name, sc in (("live_checkpoints", base), ("idle_till", _idle_r5(base))):
        rows = {f: _run(sc, args.seed, f) for f in (False, True)}
        for f, row in rows.items():
            print(f"{name:16} floors={'on ' if f else 'off'} {row}")
        off, on = rows[False], rows[True]
        print(f"{name:16} held_mean on/off = {on['held_mean'] / off['held_mean']:.2f}, "
              f"held_max on/off = {on['held_max'] / off['held_max']:.2f}")


if __name__ == "__main__":
    main()

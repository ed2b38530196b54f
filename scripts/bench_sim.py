#!/usr/bin/env python3
"""How fast the partition simulator runs: virtual time per wall second, per scenario.

Every scenario runs on the real replica and sync core, so this measures the core as
much as the simulator. Prints a table (scenario, nodes, virtual s, wall s, ratio,
events, events/s, ok) and, with ``--profile``, the top functions of one scenario.

Usage::

    .venv/bin/python scripts/bench_sim.py                       # every shipped scenario
    .venv/bin/python scripts/bench_sim.py --scale busy_saturday_40=0.1
    .venv/bin/python scripts/bench_sim.py --only busy_saturday_40 --scale busy_saturday_40=1
    .venv/bin/python scripts/bench_sim.py --only busy_saturday_40 --profile
    .venv/bin/python scripts/bench_sim.py --only busy_saturday_40 --registers 100 \
        --scale busy_saturday_100=0.1              # the busy store with 100 tills
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import time
import tomllib
from pathlib import Path

from rich.console import Console
from rich.table import Table

from mesh.sim.runner import run_scenario
from mesh.sim.scenario import Scenario, ScenarioError, load_scenario, parse_scenario

ROOT = Path(__file__).resolve().parent.parent
#: Default scales: the busy store runs a tenth of its hour (the full hour takes minutes
#: on the current core: see docs/simulation.md), everything else its full duration.
DEFAULT_SCALES = {"busy_saturday_40": 0.1}
#: Bound of ``--registers`` (a store this size takes minutes per virtual minute).
MAX_REGISTERS = 400


def _with_registers(path: Path, count: int) -> Scenario:
    """``busy_saturday_40`` with ``count`` tills instead of 40 (same streams per till,
    same faults), named ``busy_saturday_<count>``."""
    data = tomllib.loads(path.read_text())
    tills = [n for n in data["nodes"] if n.get("prefix") == "till"]
    if len(tills) != 1:
        raise SystemExit(f"{path.name}: expected one [[nodes]] group with prefix 'till'")
    tills[0]["count"] = count
    data["name"] = f"busy_saturday_{count}"
    try:
        return parse_scenario(data, str(path))
    except ScenarioError as exc:  # e.g. a fault naming till17 in a store of 10
        raise SystemExit(f"--registers {count}: {exc}") from None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", action="append", default=[], help="scenario name (repeatable)")
    ap.add_argument("--scale", action="append", default=[], metavar="NAME=F",
                    help="duration scale for one scenario")
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--profile", action="store_true", help="cProfile the (first) scenario")
    ap.add_argument("--registers", type=int, default=None, metavar="N",
                    help=f"run busy_saturday_40 with N tills instead (1..{MAX_REGISTERS})")
    args = ap.parse_args()
    if args.registers is not None and not 1 <= args.registers <= MAX_REGISTERS:
        ap.error(f"--registers must be within 1..{MAX_REGISTERS}")
    scales = dict(DEFAULT_SCALES)
    for item in args.scale:
        name, _, f = item.partition("=")
        scales[name] = float(f)
    paths = sorted((ROOT / "simulations").glob("*.toml"))
    if args.only:
        paths = [p for p in paths if p.stem in args.only]
    console = Console(width=150)
    table = Table(title="storemesh sim: virtual vs wall time (real replica + sync core)")
    for col in ("scenario", "nodes", "scale", "virtual s", "wall s", "cpu s", "ratio (cpu)",
                "events", "events/s (cpu)", "ok"):
        table.add_column(col, justify="left" if col == "scenario" else "right")
    for path in paths:
        if args.registers is not None and path.stem == "busy_saturday_40":
            sc = _with_registers(path, args.registers)
        else:
            sc = load_scenario(path)
        scale = scales.get(sc.name, 1.0)
        if scale != 1.0:
            sc = sc.scaled(scale)
        prof = cProfile.Profile() if args.profile else None
        t0 = time.perf_counter()
        c0 = time.process_time()
        if prof is not None:
            prof.enable()
        r = run_scenario(sc, args.seed)
        if prof is not None:
            prof.disable()
        wall = time.perf_counter() - t0
        cpu = time.process_time() - c0  # the machine is shared: CPU time is the fair figure
        # Virtual time covers the safety phase and the liveness phase until convergence.
        virtual = (r.report["quiesce_ms"] + (r.report["convergence_ms"] or 0)) / 1000
        table.add_row(sc.name, str(r.report["nodes"]["total"]), f"{scale:g}", f"{virtual:,.0f}",
                      f"{wall:,.1f}", f"{cpu:,.1f}", f"{virtual / cpu:,.1f}",
                      f"{r.report['events']:,}", f"{r.report['events'] / cpu:,.0f}",
                      "[green]yes[/]" if r.ok else "[red]no[/]")
        if prof is not None:
            console.print(table)
            pstats.Stats(prof, stream=sys.stdout).sort_stats("tottime").print_stats(25)
            return 0
    console.print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())

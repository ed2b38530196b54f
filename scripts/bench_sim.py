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
    .venv/bin/python scripts/bench_sim.py --series 20,40,70,100 --series-scale 0.1 \
        --baseline /tmp/before                     # growth with the store's size

``--series`` runs ``busy_saturday_40`` with each number of tills (18 or more: its
faults name till17), each point in a fresh process, and prints virtual seconds per CPU
second, CPU per envelope delivery (every envelope reaches every other node: the work
itself grows as nodes²) and the growth exponents fitted over the series (least squares
on log-log: CPU per virtual second ~ nodes^k). With ``--baseline TREE`` (a checkout of
an earlier commit, e.g. ``git worktree add /tmp/before <commit>``) every point also
runs on that tree's ``mesh`` package, interleaved with this one's, and the table
shows both and their ratio: the same machine load for both.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import math
import os
import pstats
import subprocess
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

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


def _point(registers: int, scale: float, seed: int | None) -> dict[str, Any]:
    """One run of the busy store with ``registers`` tills, measured in this process."""
    path = ROOT / "simulations" / "busy_saturday_40.toml"
    sc = _with_registers(path, registers)
    if scale != 1.0:
        sc = sc.scaled(scale)
    c0 = time.process_time()
    r = run_scenario(sc, seed)
    cpu = time.process_time() - c0
    virtual = (r.report["quiesce_ms"] + (r.report["convergence_ms"] or 0)) / 1000
    nodes = r.report["nodes"]["total"]
    return {"registers": registers, "nodes": nodes, "virtual_s": virtual, "cpu_s": cpu,
            "events": r.report["events"], "envelopes": r.report["envelopes"],
            # every envelope reaches every other node: the work the store must do
            "deliveries": r.report["envelopes"] * (nodes - 1), "ok": r.ok}


def _run_point(tree: Path | None, registers: int, scale: float,
               seed: int | None) -> dict[str, Any]:
    """``_point`` in a fresh process, importing ``mesh`` from ``tree`` (default: ours)."""
    env = dict(os.environ, PYTHONPATH=str(tree or ROOT))
    cmd = [sys.executable, str(Path(__file__).resolve()), "--point", str(registers),
           "--series-scale", str(scale)]
    if seed is not None:
        cmd += ["--seed", str(seed)]
    proc = subprocess.run(cmd, env=env, check=False, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{registers} tills on {tree or ROOT}: {proc.stderr.strip()}")
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def _exponent(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of log y against log x."""
    lx, ly = [math.log(x) for x in xs], [math.log(y) for y in ys]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    den = sum((a - mx) ** 2 for a in lx)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly, strict=True)) / den if den else 0.0


def _series(counts: list[int], scale: float, seed: int | None, baseline: Path | None,
            console: Console) -> int:
    trees: list[tuple[str, Path | None]] = [("after", None)]
    if baseline is not None:
        trees.insert(0, ("before", baseline))
    rows: dict[str, list[dict[str, Any]]] = {name: [] for name, _ in trees}
    for n in counts:
        for name, tree in trees:  # interleaved: both see the same machine load
            rows[name].append(_run_point(tree, n, scale, seed))
    load = os.getloadavg()
    table = Table(title=f"storemesh sim: busy_saturday_<n> at {scale:g} of its hour "
                        f"(load {load[0]:.1f} {load[1]:.1f} {load[2]:.1f})")
    cols = ["tills", "nodes", "virtual s", "events"]
    for name, _ in trees:
        cols += [f"{name} cpu s", f"{name} virtual/cpu", f"{name} µs/delivery"]
    if baseline is not None:
        cols += ["speed-up"]
    for col in cols:
        table.add_column(col, justify="right")
    ok = True
    for i, n in enumerate(counts):
        first = rows[trees[0][0]][i]
        cells = [str(n), str(first["nodes"]), f"{first['virtual_s']:,.0f}",
                 " → ".join(f"{rows[name][i]['events']:,}" for name, _ in trees)]
        for name, _ in trees:
            p = rows[name][i]
            ok &= bool(p["ok"])
            cells += [f"{p['cpu_s']:,.1f}", f"{p['virtual_s'] / p['cpu_s']:,.1f}",
                      f"{p['cpu_s'] / max(p['deliveries'], 1) * 1e6:,.1f}"]
        if baseline is not None:
            cells.append(f"{rows['before'][i]['cpu_s'] / rows['after'][i]['cpu_s']:.2f}×")
        table.add_row(*cells)
    console.print(table)
    for name, _ in trees:
        pts = rows[name]
        nodes = [float(p["nodes"]) for p in pts]
        per_s = [p["cpu_s"] / p["virtual_s"] for p in pts]
        per_d = [p["cpu_s"] / max(p["deliveries"], 1) for p in pts]
        per_n = [float(p["deliveries"]) for p in pts]
        console.print(f"{name}: CPU per virtual second ~ nodes^{_exponent(nodes, per_s):.2f}; "
                      f"CPU per delivery ~ nodes^{_exponent(nodes, per_d):.2f} "
                      f"(deliveries grow as nodes^{_exponent(nodes, per_n):.2f})")
    if not ok:
        console.print("[red]a run failed its checks[/]")
    return 0 if ok else 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", action="append", default=[], help="scenario name (repeatable)")
    ap.add_argument("--scale", action="append", default=[], metavar="NAME=F",
                    help="duration scale for one scenario")
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--profile", action="store_true", help="cProfile the (first) scenario")
    ap.add_argument("--registers", type=int, default=None, metavar="N",
                    help=f"run busy_saturday_40 with N tills instead (1..{MAX_REGISTERS})")
    ap.add_argument("--series", default=None, metavar="N,N,...",
                    help="busy_saturday_40 with each of these numbers of tills")
    ap.add_argument("--series-scale", type=float, default=0.1, metavar="F",
                    help="duration scale of every --series run (default 0.1)")
    ap.add_argument("--baseline", type=Path, default=None, metavar="TREE",
                    help="with --series: also run each point on TREE's mesh package")
    ap.add_argument("--point", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.point is not None:  # one --series point (a child process): JSON out
        print(json.dumps(_point(args.point, args.series_scale, args.seed)))
        return 0
    if args.series is not None:
        counts = [int(x) for x in args.series.split(",")]
        if not all(1 <= n <= MAX_REGISTERS for n in counts) or len(counts) < 2:
            ap.error(f"--series needs two or more counts within 1..{MAX_REGISTERS}")
        if args.baseline is not None and not (args.baseline / "mesh").is_dir():
            ap.error(f"--baseline {args.baseline}: no mesh package there")
        return _series(counts, args.series_scale, args.seed, args.baseline,
                       Console(width=180))
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

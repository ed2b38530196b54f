"""``storemesh sim``: run partition scenarios on the real replica and sync core.

Wired into the main command with ``main.add_command(sim)`` (``mesh.app.cli``).
Exit status: 0 when every safety check passed, 1 when one failed (with "reproduce
with --seed N"), 2 for a scenario or argument the user can fix.
"""

from __future__ import annotations

import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import click
import orjson
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from mesh.sim.scenario import Scenario, ScenarioError, load_scenario

__all__ = ["sim"]


class _UserError(click.ClickException):
    exit_code = 2


def _load(path: Path, scale: float | None) -> Scenario:
    try:
        sc = load_scenario(path)
        return sc.scaled(scale) if scale is not None and scale != 1.0 else sc
    except ScenarioError as exc:
        raise _UserError(str(exc)) from None


@click.group()
def sim() -> None:
    """Simulate a store mesh (virtual time, real replica and sync code) under faults."""


@sim.command("run")
@click.argument("scenario", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--seed", type=int, default=None, help="Seed (default: the scenario's).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (deterministic).")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False, path_type=Path),
              default=None, help="Draw stock per replica over time to this PNG.")
@click.option("--duration-scale", type=float, default=None,
              help="Multiply every scheduled time by F (e.g. 0.1 for a quick run).")
@click.option("--random-faults", is_flag=True,
              help="Replace the fault schedule by one drawn from the seed (as swarm does).")
def run_cmd(scenario: Path, seed: int | None, as_json: bool, plot_path: Path | None,
            duration_scale: float | None, random_faults: bool) -> None:
    """Run SCENARIO once and report the safety checks, convergence, traffic and lag."""
    from mesh.sim.report import render
    from mesh.sim.runner import run_scenario

    if plot_path is not None and not plot_path.parent.is_dir():
        # checked before the run, not after it: a long run must not end in an error
        raise _UserError(f"--plot {plot_path}: folder {plot_path.parent} does not exist")
    sc = _load(scenario, duration_scale)
    result = run_scenario(sc, seed, randomise=random_faults, timer=time.perf_counter)
    if plot_path is not None:
        from mesh.sim.plot import plot_run

        try:
            plot_run(result, plot_path)
        except OSError as exc:
            raise _UserError(f"--plot {plot_path}: {exc.strerror or exc}") from None
    if as_json:
        sys.stdout.buffer.write(result.to_json() + b"\n")
        sys.stdout.flush()
        if not result.ok:
            click.echo(f"reproduce with --seed {result.seed}  ({result.reproduce(str(scenario))})",
                       err=True)
    else:
        render(result, Console(), str(scenario))
        if plot_path is not None:
            click.echo(f"plot written to {plot_path}")
    if not result.ok:
        sys.exit(1)


def _swarm_one(sc: Scenario, seed: int) -> dict[str, Any]:
    from mesh.sim.runner import run_scenario

    r = run_scenario(sc, seed, randomise=True).report
    return {"seed": seed, "ok": r["ok"], "failures": r["failures"],
            "convergence_ms": r["convergence_ms"], "lost_ops": r["lost_ops"],
            "duplicate_applies": r["duplicate_applies"],
            "invalid_accepted": r["invalid_accepted"], "faults": len(r["faults"]),
            "events": r["events"]}


@sim.command("swarm")
@click.argument("scenario", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--runs", type=click.IntRange(1, 1_000_000), required=True,
              help="How many runs, each with its own seed and fault schedule.")
@click.option("--seed", type=int, default=None,
              help="Seed of the swarm (default: the scenario's); run seeds derive from it.")
@click.option("--duration-scale", type=float, default=None,
              help="Multiply every scheduled time by F.")
@click.option("--jobs", type=click.IntRange(1, 64), default=1, show_default=True,
              help="Worker processes.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def swarm_cmd(scenario: Path, runs: int, seed: int | None, duration_scale: float | None,
              jobs: int, as_json: bool) -> None:
    """Run SCENARIO many times with random fault schedules and report failing seeds."""
    from mesh.sim.report import render_swarm
    from mesh.sim.runner import derive_seed

    sc = _load(scenario, duration_scale)
    base = sc.seed if seed is None else seed
    seeds = [derive_seed(base, i) for i in range(runs)]
    rows: list[dict[str, Any] | None] = [None] * runs
    console = Console(stderr=as_json)
    columns = (TextColumn("[bold]swarm[/] {task.description}"), BarColumn(),
               MofNCompleteColumn(), TextColumn("[red]{task.fields[failed]} failed[/]"),
               TimeRemainingColumn())
    failed = 0
    with Progress(*columns, console=console, transient=as_json) as progress:
        task = progress.add_task(sc.name, total=runs, failed=0)
        if jobs == 1:
            for i, s in enumerate(seeds):
                rows[i] = _swarm_one(sc, s)
                failed += not rows[i]["ok"]  # type: ignore[index]
                progress.update(task, advance=1, failed=failed)
        else:
            with ProcessPoolExecutor(max_workers=jobs) as pool:
                futures = {pool.submit(_swarm_one, sc, s): i for i, s in enumerate(seeds)}
                for fut in as_completed(futures):
                    row = fut.result()
                    rows[futures[fut]] = row
                    failed += not row["ok"]
                    progress.update(task, advance=1, failed=failed)
    done = [r for r in rows if r is not None]
    if as_json:
        out = {"scenario": sc.name, "seed": base, "runs": runs,
               "failed_seeds": [r["seed"] for r in done if not r["ok"]], "results": done}
        sys.stdout.buffer.write(orjson.dumps(out, option=orjson.OPT_SORT_KEYS) + b"\n")
        sys.stdout.flush()
    else:
        render_swarm(done, console, str(scenario))
    if any(not r["ok"] for r in done):
        sys.exit(1)


if __name__ == "__main__":  # pragma: no cover - ``python -m mesh.sim.cli`` until wired
    sim()

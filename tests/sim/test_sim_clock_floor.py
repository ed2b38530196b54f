"""Clock floors through the one driver in the simulator (issue 12): with a spare till
that writes nothing, the checkpointer still checkpoints every period, because the
summaries (the same sync core as the node's) carry the members' clock floors."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from mesh.core.checkpoint import Frontier
from mesh.sim.runner import RunResult, run_scenario
from mesh.sim.scenario import Scenario, load_scenario
from tests.sim.test_sim_scenarios import assert_safe

ROOT = Path(__file__).resolve().parents[2]
REGS = ("r1", "r2", "r3", "r4")


def _idle_r5() -> Scenario:
    sc = load_scenario(ROOT / "simulations" / "live_checkpoints.toml")

    def fix(nodes: tuple[str, ...]) -> tuple[str, ...]:
        out: list[str] = []
        for n in nodes:
            out.extend(REGS if n == "role:register" else () if n == "r5" else (n,))
        return tuple(out)

    return replace(sc, streams=tuple(replace(s, nodes=fix(s.nodes), pickup=fix(s.pickup))
                                     for s in sc.streams),
                   races=tuple(replace(r, nodes=fix(r.nodes)) for r in sc.races))


def test_an_idle_till_does_not_stop_the_checkpoints(monkeypatch: pytest.MonkeyPatch) -> None:
    sc = _idle_r5()
    runs: dict[bool, RunResult] = {}
    for floors in (True, False):
        if not floors:  # as with peers from before the field: no floor is used
            monkeypatch.setattr(Frontier, "floors", lambda self, nodes: {})
        runs[floors] = run_scenario(sc, None)
        assert_safe(runs[floors])
        assert runs[floors].report["checkpoints"]["hashes_identical"]
    on, off = (runs[f].report["checkpoints"] for f in (True, False))
    # 300 s at one checkpoint per 5 s, less the partition: the floor keeps nearly
    # every period moving; without it the least recent writer holds the cut
    assert on["proposed"] >= off["proposed"] + 8, (on["proposed"], off["proposed"])
    assert min(on["folded_by_node"].values()) >= on["proposed"] - 2

"""Catch-up from a checkpoint in the simulator (issue 12, ``mesh.core.catchup``): a till
that joins a store whose registers have pruned their ledgers installs the edge's
checkpoint state, verified against the signed ck, and fetches only the tail above its
frontier; it converges with identical exceptions and checkpoint hashes. The node and
the simulator run the same driver code."""

from __future__ import annotations

from pathlib import Path

import pytest

from mesh.sim.runner import RunContext, RunResult, run_scenario
from mesh.sim.scenario import load_scenario
from tests.sim.test_sim_scenarios import assert_safe

ROOT = Path(__file__).resolve().parents[2]
SCENARIO = ROOT / "simulations" / "live_checkpoints.toml"
JOIN = """
[[nodes]]
id = "r9"
role = "register"

[[faults]]
kind = "enrol"
label = "a new till joins after the registers pruned"
at_s = 250
nodes = ["r9"]
"""


def _run(tmp_path: Path, seed: int | None = None, *, catchup_on: bool = True
         ) -> tuple[RunResult, RunContext]:
    path = tmp_path / "join.toml"
    path.write_text(SCENARIO.read_text() + JOIN)
    got: list[RunContext] = []

    def setup(ctx: RunContext) -> None:
        got.append(ctx)
        for n in ctx.world.nodes.values():
            n.snapshot_every = n.durable.snapshot_every = 20  # registers prune
            n.on_boot.append(_tune)

    def _tune(driver: object) -> None:
        core = driver.core  # type: ignore[attr-defined]
        core.catchup_min_behind = 200 if catchup_on else 1 << 62

    r = run_scenario(load_scenario(path), seed, setup=setup)
    return r, got[0]


@pytest.mark.parametrize("seed", [None, 1])
def test_a_new_till_catches_up_from_a_checkpoint(tmp_path: Path, seed: int | None) -> None:
    r, ctx = _run(tmp_path, seed)
    assert_safe(r)
    ck = r.report["checkpoints"]
    assert ck["hashes_identical"] and ck["fold_checks_failed"] == 0
    nodes = ctx.world.nodes
    new, edge = nodes["r9"], nodes["edge"]
    assert new.enrolled
    assert new.core.stats.get("state_installed") == 1, new.core.stats
    assert edge.core.stats.get("state_served", 0) >= 1
    assert not new.core.stats.get("bad_checkpoint_state")
    # registers pruned, so the prefix is not in the new till's ledger: it came from
    # the checkpoint state, not from seq 1
    assert any(sum(n.disk.pruned.values()) for n in nodes.values() if n.role == "register")
    base = new.replica.last_folded
    assert base is not None
    held = sum(len(e) for e in new.replica._events.values())  # bounded, like its peers
    assert held < sum(new.replica.vv.to_dict().values())
    assert new.replica.exceptions() == edge.replica.exceptions()
    assert new.replica.state_digest() == edge.replica.state_digest()
    assert new.disk.snapshots, "the installed state is durable"
    rows = {(e.origin, e.seq) for e in new.disk.rows}
    assert ("edge", 1) not in rows  # never fetched from the beginning of time


def test_without_catch_up_the_new_till_fetches_everything(tmp_path: Path) -> None:
    r, ctx = _run(tmp_path, catchup_on=False)
    assert_safe(r)
    new = ctx.world.nodes["r9"]
    assert not new.core.stats.get("state_installed")
    assert new.replica.state_digest() == ctx.world.nodes["edge"].replica.state_digest()

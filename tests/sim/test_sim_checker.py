"""The checker can fail: deliberately broken nodes (switched on only here, through the
world's fault hooks, never in mesh.core.sync) are caught, and each check fires on the fault
it names. A checker that always passes would be worse than none."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from mesh.core.envelope import decode
from mesh.core.sync import encode_batch, split_batch
from mesh.sim import runner as sim_runner
from mesh.sim.cli import sim
from mesh.sim.runner import RunContext, RunResult, run_scenario
from mesh.sim.scenario import parse_scenario

SIMS = Path(__file__).resolve().parents[2] / "simulations"


def _store(**extra: object) -> dict[str, object]:
    """A small store: edge, three tills; sales all along; no faults unless given."""
    return {
        "name": "broken", "duration_s": 40, "seed": 9,
        "nodes": [{"id": "edge", "role": "edge"}, {"prefix": "r", "count": 3}],
        "stock": {"items": {"A": 500}},
        "workload": {"streams": [{"kind": "sale", "nodes": ["role:register"],
                                  "rate_per_min": 30}]},
        "sim": {"converge_timeout_s": 20},
        **extra,
    }


def _drop_even_seqs(node_is_origin: Callable[[str], bool]) -> Callable[[str, bytes], bytes | None]:
    """A send filter that drops every second envelope (the even seqs) among those
    ``node_is_origin`` selects, from every batch the node sends, every time."""
    def send_filter(peer: str, data: bytes) -> bytes | None:
        if data[:1] != b"E":
            return data
        keep = []
        for raw in split_batch(data):
            env = decode(raw)
            if node_is_origin(env.origin) and env.seq % 2 == 0:
                continue
            keep.append(raw)
        return encode_batch(keep) if keep else None
    return send_filter


def _relay_only(ctx: RunContext) -> None:
    """r1, r2 and r3 reach each other only through the edge."""
    w = ctx.world
    w.set_link("r1", "r2", False)
    w.set_link("r1", "r3", False)
    w.set_link("r2", "r3", False)


def test_a_relay_that_drops_every_second_envelope_is_caught() -> None:
    sc = parse_scenario(_store())

    def broken(ctx: RunContext) -> None:
        _relay_only(ctx)
        ctx.world.nodes["edge"].send_filter = _drop_even_seqs(lambda origin: origin != "edge")

    r = run_scenario(sc, setup=broken)
    assert not r.ok
    assert r.report["lost_ops"] > 0
    assert not r.report["converged"]
    assert "reproduce with --seed 9" in _cli_failure_text(r)

    # The same topology with an honest relay passes: the failure is the relay's.
    healthy = run_scenario(sc, setup=_relay_only)
    assert healthy.ok, healthy.failures


def test_a_sender_that_drops_its_own_even_envelopes_is_caught() -> None:
    sc = parse_scenario(_store())

    def broken(ctx: RunContext) -> None:
        ctx.world.nodes["r2"].send_filter = _drop_even_seqs(lambda origin: origin == "r2")

    r = run_scenario(sc, setup=broken)
    assert not r.ok and r.report["lost_ops"] > 0


def test_dropping_every_second_message_is_healed_by_the_core() -> None:
    """Transient loss (a different message each time) is what anti-entropy and
    retransmission are for: the checker must *pass* this one."""
    sc = parse_scenario(_store())

    def lossy(ctx: RunContext) -> None:
        w = ctx.world
        count = {"n": 0}

        def every_second(peer: str, data: bytes) -> bytes | None:
            count["n"] += 1
            return None if count["n"] % 2 == 0 else data
        w.nodes["edge"].send_filter = every_second
        w.nodes["r1"].send_filter = every_second

    r = run_scenario(sc, setup=lossy)
    assert r.ok, r.failures


def test_a_disk_that_lies_about_fsync_is_caught() -> None:
    sc = parse_scenario(_store(faults=[{"kind": "crash", "nodes": ["r1"], "at_s": 20,
                                        "duration_s": 5}]))

    def liar(ctx: RunContext) -> None:
        ctx.world.nodes["r1"].disk.lie_about_fsync = True

    r = run_scenario(sc, setup=liar)
    assert not r.ok
    rep = r.report
    assert rep["lost_ops"] > 0  # acknowledged sales vanished with the crash
    assert rep["equivocations"] > 0 or rep["phantom_envelopes"] > 0


def test_the_forgery_check_fires_when_a_registered_forgery_is_applied() -> None:
    """Pretend r3's first sale were a forgery: the checker must see it applied."""
    sc = parse_scenario(_store())

    def mark_genuine_as_forged(ctx: RunContext) -> None:
        def on_created(kind: str, data: dict[str, Any]) -> None:
            env = data.get("envelope")
            if kind == "created" and data["node"] == "r3" and not ctx.checker.forged:
                assert env is not None
                ctx.checker.forged[env.hash] = (env.origin, env.seq)
        ctx.world.observers.append(on_created)

    r = run_scenario(sc, setup=mark_genuine_as_forged)
    assert r.report["invalid_accepted"] > 0 and not r.ok


def test_the_duplicate_apply_check_fires() -> None:
    sc = parse_scenario(_store())

    def replay_an_apply(ctx: RunContext) -> None:
        w = ctx.world

        def again(kind: str, data: dict[str, object]) -> None:
            if kind == "applied" and data["node"] == "r2" and not done:
                done.append(True)
                w.emit("applied", **data)  # as if the core had persisted it twice
        done: list[bool] = []
        w.observers.append(again)

    r = run_scenario(sc, setup=replay_an_apply)
    assert r.report["duplicate_applies"] == 1 and not r.ok


def _cli_failure_text(r: RunResult) -> str:
    return f"reproduce with --seed {r.seed}  ({r.reproduce()})"


def test_cli_exits_non_zero_and_prints_the_seed(monkeypatch: pytest.MonkeyPatch,
                                                tmp_path: Path) -> None:
    path = tmp_path / "broken.toml"
    path.write_text((SIMS / "swarm_small.toml").read_text())
    real = sim_runner.run_scenario

    def broken_run(sc: object, seed: int | None = None, **kw: object) -> RunResult:
        def setup(ctx: RunContext) -> None:
            ctx.world.nodes["r1"].send_filter = _drop_even_seqs(lambda origin: origin == "r1")
        return real(sc, seed, setup=setup, **kw)  # type: ignore[arg-type]
    monkeypatch.setattr(sim_runner, "run_scenario", broken_run)
    res = CliRunner().invoke(sim, ["run", str(path), "--seed", "77"])
    assert res.exit_code == 1, res.output
    assert "reproduce with --seed 77" in res.output
    res = CliRunner().invoke(sim, ["run", str(path), "--seed", "77", "--json"])
    assert res.exit_code == 1
    assert '"lost_ops"' in res.stdout


def test_cli_passes_plots_and_reports(tmp_path: Path) -> None:
    png = tmp_path / "run.png"
    res = CliRunner().invoke(sim, ["run", str(SIMS / "last_unit_partition.toml"),
                                   "--duration-scale", "0.25", "--plot", str(png)])
    assert res.exit_code == 0, res.output
    assert "all safety checks passed" in res.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_refuses_a_bad_scenario_with_status_2(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('name = "x"\nduration_s = 10\n[[nodes]]\nid = "a"\nrole = "boss"\n')
    res = CliRunner().invoke(sim, ["run", str(bad)])
    assert res.exit_code == 2
    assert "nodes[0].role" in res.output

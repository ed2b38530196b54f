"""The fault plane's driver-level faults and the degrade fixes (issue 9 deliverable 4)."""

from __future__ import annotations

from pathlib import Path

from mesh.sim.runner import RunContext, run_scenario
from mesh.sim.scenario import FaultSpec, LinkSpec, Scenario, load_scenario, parse_scenario

SIMS = Path(__file__).resolve().parent.parent / "simulations"


def _base(*faults: FaultSpec) -> Scenario:
    return load_scenario(SIMS / "register_crash.toml").with_faults(tuple(faults))


def _probe(ctx: RunContext, times: list[float], out: dict[float, tuple[float, float | None]],
           link: tuple[str, str] = ("r1", "r2")) -> None:
    def look(t: float) -> None:
        m = ctx.world.links[link]
        out[t] = (m.latency_ms, m.bandwidth)
    for t in times:
        ctx.world.at(t, lambda t=t: look(t))


def test_overlapping_degrades_end_with_the_links_own_physics() -> None:
    slow = FaultSpec("degrade", 10.0, 20.0, nodes=("r1",), link=LinkSpec(latency_ms=40.0))
    slower = FaultSpec("degrade", 20.0, 30.0, nodes=("r1",),
                       link=LinkSpec(latency_ms=80.0, bandwidth_mbps=1.0))
    seen: dict[float, tuple[float, float | None]] = {}
    sc = _base(slow, slower)
    result = run_scenario(sc, 3, setup=lambda ctx: _probe(
        ctx, [5_000, 15_000, 25_000, 40_000, 60_000, 400_000], seen))
    assert result.ok, result.failures
    own = seen[5_000]
    assert seen[15_000] == (40.0, None)
    assert seen[25_000] == (80.0, 125.0)  # the newer one in force; bandwidth applied
    assert seen[40_000] == (80.0, 125.0), "the first degrade's end undid the second"
    assert seen[60_000] == own, "the first degrade's physics outlived both"
    assert seen[400_000] == own


def test_a_frozen_node_resumes_and_catches_up() -> None:
    sc = _base(FaultSpec("freeze", 60.0, 30.0, nodes=("r2",), label="r2 SIGSTOP"))
    vv: dict[str, int] = {}

    def setup(ctx: RunContext) -> None:
        def look() -> None:
            vv["r2_frozen_r1"] = ctx.world.nodes["r2"].replica.vv.get("r1")
            vv["r1_now"] = ctx.world.nodes["r1"].replica.vv.get("r1")
        ctx.world.at(61_000, lambda: vv.__setitem__("r2_at_61", ctx.world.nodes["r2"]
                                                     .replica.vv.get("r1")))
        ctx.world.at(89_000, look)
    result = run_scenario(sc, 3, setup=setup)
    assert result.ok, result.failures
    assert vv["r2_frozen_r1"] == vv["r2_at_61"] < vv["r1_now"]  # nothing ran while stopped
    assert result.report["commands"]["sale"]["offline"] > 0  # its tills got no answer


def test_slow_disk_and_fsync_spikes_delay_acks_but_lose_nothing() -> None:
    sc = _base(FaultSpec("disk_slow", 30.0, 200.0, nodes=("r1", "r2"), slow_ms=20.0,
                         spike_every=5, spike_ms=400.0),
               FaultSpec("crash", 100.0, 10.0, nodes=("r1",), mid_sale=True))
    result = run_scenario(sc, 3)
    assert result.ok, result.failures


def test_new_fault_kinds_parse_and_are_checked() -> None:
    doc = {"name": "t", "duration_s": 10, "nodes": [{"id": "a"}, {"id": "b"}],
           "faults": [{"kind": "disk_slow", "at_s": 1, "duration_s": 2, "nodes": ["a"],
                       "slow_ms": 5, "spike_every": 3, "spike_ms": 50},
                      {"kind": "disk_error", "at_s": 1, "nodes": ["a"], "count": 2},
                      {"kind": "retry_crash", "at_s": 2, "duration_s": 1, "nodes": ["b"]}]}
    sc = parse_scenario(doc)
    assert [f.kind for f in sc.faults] == ["disk_slow", "disk_error", "retry_crash"]
    assert sc.faults[0].spike_every == 3 and sc.faults[1].count == 2
    bad = dict(doc, faults=[{"kind": "freeze", "at_s": 1, "nodes": ["a"]}])
    try:
        parse_scenario(bad)
    except ValueError as exc:
        assert "needs duration_s" in str(exc)
    else:
        raise AssertionError("a freeze without duration_s was accepted")

"""The fault plane's driver-level faults and the degrade fixes (issue 9 deliverable 4)."""

from __future__ import annotations

from pathlib import Path

from mesh.sim.runner import RunContext, run_scenario
from mesh.sim.scenario import FaultSpec, LinkSpec, Scenario, load_scenario, parse_scenario

SIMS = Path(__file__).resolve().parents[2] / "simulations"


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


# --- repeatable faults and faults kept into the liveness phase ---------------------------


def test_a_crash_loop_is_one_entry() -> None:
    loop = FaultSpec("crash", 40.0, 8.0, nodes=("r2",), mid_sale=True, every_s=60.0,
                     repeat=5, label="r2 crash loop")
    result = run_scenario(_base(loop), 3)
    assert result.ok, result.failures
    assert result.report["crashes"] == 5 and result.report["restarts"] == 5
    starts = [f["start_ms"] for f in result.report["faults"] if f["label"] == "r2 crash loop"]
    assert starts == [40_000.0, 100_000.0, 160_000.0, 220_000.0, 280_000.0]


def test_repeat_without_a_count_runs_to_the_end_of_the_safety_phase() -> None:
    loop = FaultSpec("isolate", 100.0, 5.0, nodes=("r1",), every_s=100.0)
    assert loop.occurrences(420.0) == [100.0, 200.0, 300.0, 400.0]
    assert _base(loop).scaled(0.5).faults[0].every_s == 50.0


def test_repeat_keys_parse_and_are_checked() -> None:
    doc = {"name": "t", "duration_s": 100, "nodes": [{"id": "a"}, {"id": "b"}],
           "faults": [{"kind": "crash", "at_s": 10, "duration_s": 5, "nodes": ["a"],
                       "every_s": 20, "repeat": 3, "liveness": True}]}
    f = parse_scenario(doc).faults[0]
    assert (f.every_s, f.repeat, f.liveness) == (20.0, 3, True)
    for fault, msg in (({"repeat": 3}, "repeat needs every_s"),
                       ({"every_s": 5}, "every_s must be longer than duration_s"),
                       ({"kind": "isolate", "liveness": True, "duration_s": None},
                        "needs duration_s")):
        one = {"kind": "crash", "at_s": 10, "duration_s": 5, "nodes": ["a"], **fault}
        one = {k: v for k, v in one.items() if v is not None}
        try:
            parse_scenario(dict(doc, faults=[one]))
        except ValueError as exc:
            assert msg in str(exc), exc
        else:
            raise AssertionError(f"accepted {one}")


def test_a_dead_node_that_never_returns_and_the_rest_converge() -> None:
    dead = FaultSpec("crash", 150.0, None, nodes=("r3",), liveness=True, label="r3 gone")
    result = run_scenario(_base(dead), 3)
    assert result.ok, result.failures
    rep = result.report
    assert rep["converged"] and rep["gone_nodes"] == ["r3"]
    assert rep["crashes"] == 1 and rep["restarts"] == 0, "the heal restarted a dead node"
    assert [f["end_ms"] for f in rep["faults"] if f["label"] == "r3 gone"] == [None]


def test_a_fault_kept_into_the_liveness_phase_happens_there() -> None:
    # A partition that starts after the workload stopped (t = 430 s of a 420 s run)
    # and lasts 30 s: convergence must wait for its end.
    late = FaultSpec("isolate", 430.0, 30.0, nodes=("r1",), liveness=True)
    cut: dict[str, bool] = {}

    def setup(ctx: RunContext) -> None:
        ctx.world.at(440_000, lambda: cut.__setitem__(
            "r1-r2 up at 440 s", ctx.world.links[("r1", "r2")].up))
    result = run_scenario(_base(late), 3, setup=setup)
    assert result.ok, result.failures
    assert cut == {"r1-r2 up at 440 s": False}
    assert result.report["convergence_ms"] >= 40_000 - 1


def test_a_crash_loop_kept_into_the_liveness_phase_still_converges() -> None:
    loop = FaultSpec("crash", 300.0, 3.0, nodes=("r2",), every_s=40.0, repeat=6,
                     liveness=True, mid_sale=True)
    result = run_scenario(_base(loop), 3)
    assert result.ok, result.failures
    assert result.report["crashes"] >= 5  # some of the six fell in the liveness phase


# --- link physics per direction ------------------------------------------------------------


def _wan_doc(**extra: object) -> dict[str, object]:
    return {"name": "dirs", "duration_s": 60, "seed": 2,
            "nodes": [{"id": "edge", "role": "edge"}, {"prefix": "r", "count": 2},
                      {"id": "cloud", "role": "cloud"}],
            "stock": {"items": {"A": 50}},
            "workload": {"streams": [{"kind": "sale", "nodes": ["role:register"],
                                      "rate_per_min": 30}]},
            **extra}


def test_the_wan_has_physics_per_direction() -> None:
    sc = parse_scenario(_wan_doc(network={"wan": {
        "latency_ms": 30, "up": {"bandwidth_mbps": 0.5}, "down": {"latency_ms": 200}}}))
    seen: dict[str, tuple[float, float | None]] = {}

    def setup(ctx: RunContext) -> None:
        for a, b in (("edge", "cloud"), ("cloud", "edge")):
            m = ctx.world.links[(a, b)]
            seen[f"{a}>{b}"] = (m.latency_ms, m.bandwidth)
    result = run_scenario(sc, setup=setup)
    assert result.ok, result.failures
    assert seen["edge>cloud"] == (30.0, 62.5)  # up: the override, latency inherited
    assert seen["cloud>edge"] == (200.0, 1250.0)  # down: the WAN's own 10 Mbit/s


def test_a_degrade_can_hit_one_direction() -> None:
    one_way = FaultSpec("degrade", 10.0, 30.0, nodes=("r1",), link=LinkSpec(
        latency_ms=1.0, out=LinkSpec(latency_ms=90.0, loss=0.3)))
    seen: dict[float, tuple[float, float | None]] = {}
    back: dict[float, tuple[float, float | None]] = {}

    def setup(ctx: RunContext) -> None:
        _probe(ctx, [20_000, 50_000], seen, ("r1", "r2"))
        _probe(ctx, [20_000, 50_000], back, ("r2", "r1"))
    result = run_scenario(_base(one_way), 3, setup=setup)
    assert result.ok, result.failures
    assert seen[20_000] == (90.0, None) and back[20_000] == (1.0, None)
    assert seen[50_000] == back[50_000] and seen[50_000][0] < 1.0  # own physics again
    doc = _wan_doc(faults=[{"kind": "degrade", "at_s": 1, "duration_s": 2,
                            "link": {"latency_ms": 5, "inbound": {"loss": 0.5}}}])
    try:
        parse_scenario(doc)
    except ValueError as exc:
        assert "need nodes" in str(exc)
    else:
        raise AssertionError("a one-direction degrade without nodes was accepted")
    doc["faults"][0]["nodes"] = ["r1"]  # type: ignore[index]
    link = parse_scenario(doc).faults[0].link
    assert link is not None and link.back is not None
    assert (link.back.latency_ms, link.back.loss) == (5.0, 0.5)

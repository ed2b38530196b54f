"""Trust changes mid-run as simulated faults (issue 9 deliverable 4): a till enrolled
during a partition, a node revoked mid-run."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from mesh.sim.runner import RunContext, RunResult, run_scenario
from mesh.sim.scenario import Scenario, ScenarioError, parse_scenario
from mesh.sim.world import World


def _doc(*faults: dict[str, Any]) -> dict[str, Any]:
    return {"name": "trust", "duration_s": 300, "seed": 4,
            "nodes": [{"id": "edge", "role": "edge"}, {"prefix": "r", "count": 5},
                      {"id": "cloud", "role": "cloud"}],
            "network": {"lan": {"loss": 0.01}},
            "stock": {"items": {"A": 400}, "generate": {"count": 20, "qty": [20, 50]}},
            "workload": {"streams": [{"kind": "sale", "nodes": ["role:register"],
                                      "rate_per_min": 20},
                                     {"kind": "receipt", "nodes": ["edge"],
                                      "rate_per_min": 2}]},
            "faults": list(faults)}


def test_a_till_enrolled_during_a_partition_joins_everyone() -> None:
    sc = parse_scenario(_doc(
        {"kind": "partition", "at_s": 60, "duration_s": 120,
         "groups": [["r3", "r4"]], "label": "back room cut off"},
        {"kind": "enrol", "at_s": 90, "nodes": ["r5"]}))
    seen: dict[str, Any] = {}

    def setup(ctx: RunContext) -> None:
        w = ctx.world
        seen["alive_at_0"] = w.nodes["r5"].alive

        def look() -> None:  # 60 s after the join, still partitioned
            seen["r5_made"] = w.nodes["r5"].replica.vv.get("r5")
            seen["r1_has"] = w.nodes["r1"].replica.vv.get("r5")
            seen["r3_has"] = w.nodes["r3"].replica.vv.get("r5")
            seen["r3_knows"] = w.nodes["r3"].trust.certificate("r5") is not None
        w.at(150_000, look)
    result = run_scenario(sc, setup=setup)
    assert result.ok, result.failures
    rep = result.report
    assert seen["alive_at_0"] is False
    assert rep["enrolled_mid_run"] == ["r5"]
    assert seen["r5_made"] > 5 and seen["r1_has"] > 0  # its sales reach its side
    assert seen["r3_has"] == 0 and not seen["r3_knows"]  # not across the cut
    # ... and everyone after the heal: lost_ops counts r5's acknowledged sales too
    assert rep["converged"] and rep["lost_ops"] == 0
    assert rep["commands"]["sale"]["offline"] > 0  # r5's till before it joined


def _run_noting_r4_at_revocation(sc: Scenario, at: str, seen: dict[str, int], key: str,
                                 also: Callable[[World], None] | None = None
                                 ) -> tuple[RunResult, World]:
    """Run ``sc``, noting in ``seen[key]`` how much of r4's chain ``at`` holds when the
    revocation is issued; ``also(world)`` may schedule more before the run."""
    worlds: list[World] = []

    def setup(ctx: RunContext) -> None:
        w = ctx.world
        worlds.append(w)

        def on(kind: str, data: dict[str, Any]) -> None:
            if kind == "revoked":
                seen[key] = w.nodes[at].replica.vv.get("r4")
        w.observers.append(on)
        if also is not None:
            also(w)
    result = run_scenario(sc, setup=setup)
    return result, worlds[0]


def test_a_node_revoked_mid_run_is_refused_everywhere() -> None:
    sc = parse_scenario(_doc({"kind": "revoke", "at_s": 150, "nodes": ["r4"]}))
    seen: dict[str, int] = {}
    result, w = _run_noting_r4_at_revocation(sc, "r4", seen, "made_at_revoke")
    assert result.ok, result.failures
    rep = result.report
    assert rep["revoked_nodes"] == ["r4"] and rep["revoked_accepted"] == 0
    assert rep["converged"]  # the honest nodes converge without it
    assert rep["rejected"].get("revoked_session", 0) > 0  # its sessions were ended
    # r4 kept selling; no honest replica took what it signed after the list
    held = {n: w.nodes[n].replica.vv.get("r4") for n in w.nodes if n != "r4"}
    assert seen["made_at_revoke"] > 5 and len(set(held.values())) == 1
    assert next(iter(held.values())) <= seen["made_at_revoke"]
    assert w.nodes["r4"].replica.vv.get("r4") > seen["made_at_revoke"] + 20
    assert rep["stranded_ops"] > 20  # its later sales: on its own disk, nowhere else


def test_a_node_revoked_while_cut_off_with_a_peer_is_dropped_there_to_the_bound() -> None:
    """r4 is revoked while it and r3 are cut off from the edge: r3 keeps taking r4's
    sales the edge never saw. The list (bound: the edge's head for r4) reaches r3 at the
    heal; r3 rebuilds without what lies above the bound, and every replica ends with
    exactly r4's chain up to it (docs/protocol.md, "Revocation bounds")."""
    sc = parse_scenario(_doc(
        {"kind": "partition", "at_s": 60, "duration_s": 140, "groups": [["r3", "r4"]]},
        {"kind": "revoke", "at_s": 120, "nodes": ["r4"]}))
    seen: dict[str, int] = {}

    def before_heal(w: World) -> None:
        w.at(199_000, lambda: seen.setdefault(
            "r3_before_heal", w.nodes["r3"].replica.vv.get("r4")))
    result, w = _run_noting_r4_at_revocation(sc, "edge", seen, "bound", before_heal)
    assert result.ok, (result.failures, result.report["examples"][:3])
    bound = seen["bound"]
    crl = w.nodes["edge"].trust.crl
    assert crl is not None and crl.upto == {"r4": bound}
    assert seen["r3_before_heal"] > bound + 5  # r3 took r4's sales past the edge's head
    held = {n: w.nodes[n].replica.vv.get("r4") for n in w.nodes if n != "r4"}
    assert set(held.values()) == {bound}, held
    assert w.nodes["r3"].durable.rebuild_stats.excluded >= seen["r3_before_heal"] - bound
    assert result.report["converged"] and result.report["lost_ops"] == 0


def test_trust_faults_are_checked() -> None:
    for faults, msg in (
        ([{"kind": "enrol", "at_s": 1, "nodes": ["edge"]}], "holds the store key"),
        ([{"kind": "revoke", "at_s": 1, "nodes": ["edge"]}], "holds the store key"),
        ([{"kind": "enrol", "at_s": 1, "nodes": ["r5"]},
          {"kind": "enrol", "at_s": 2, "nodes": ["r5"]}], "enrolled once"),
        ([{"kind": "enrol", "at_s": 1, "nodes": ["r5"], "every_s": 10}], "cannot repeat"),
    ):
        try:
            parse_scenario(_doc(*faults))
        except ScenarioError as exc:
            assert msg in str(exc), exc
        else:
            raise AssertionError(f"accepted {faults}")

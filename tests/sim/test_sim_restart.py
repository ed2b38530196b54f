"""A restart racing a stale session (issue 9 deliverable 4): a crashed node's peers hold
its session until the heartbeat notices; the restarted node dials, and the driver's
rule (``Driver.admit_session``, driver invariant 9) decides as in the real node."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mesh.driver import keep_new_session
from mesh.sim.runner import RunContext, run_scenario
from mesh.sim.scenario import FaultSpec, load_scenario

SIMS = Path(__file__).resolve().parents[2] / "simulations"


def test_the_rule_keeps_one_session_and_both_ends_agree() -> None:
    # The same end dialled again: it lost the old one (a restart), the new one wins.
    assert keep_new_session("a", "b", outbound=True, old_outbound=True)
    assert keep_new_session("b", "a", outbound=False, old_outbound=False)
    # Both dialled at once: each end holds one of each; both keep the one "a" dialled.
    a_keeps_new = keep_new_session("a", "b", outbound=True, old_outbound=False)
    b_keeps_new = keep_new_session("b", "a", outbound=False, old_outbound=True)
    assert a_keeps_new and b_keeps_new  # at a and b the new one is a's
    assert not keep_new_session("a", "b", outbound=False, old_outbound=True)
    assert not keep_new_session("b", "a", outbound=True, old_outbound=False)


def test_a_restart_races_its_stale_sessions() -> None:
    sc = load_scenario(SIMS / "register_crash.toml").with_faults((
        FaultSpec("crash", 100.0, 2.0, nodes=("r1",), mid_sale=True),
        FaultSpec("crash", 200.0, 2.0, nodes=("edge",))))
    seen: dict[str, Any] = {}

    def setup(ctx: RunContext) -> None:
        w = ctx.world
        stale = w.stale_ms

        def look(tag: str) -> None:
            r1 = w.nodes["r1"]
            seen[tag] = {p: (w.nodes[p].core.is_up("r1"), r1.alive and r1.core.is_up(p))
                         for p in ("edge", "r2", "r4")}
            seen[tag + " races"] = dict(w.stale_races)
        w.at(100_500, lambda: look("r1 down"))
        w.at(103_000, lambda: look("r1 back"))
        w.at(100_000 + stale + 1_000, lambda: look("after heartbeat"))
        w.at(203_000, lambda: seen.__setitem__(
            "cloud-edge", (w.nodes["cloud"].core.is_up("edge"),
                           w.nodes["edge"].core.is_up("cloud"))))
    result = run_scenario(sc, 3, setup=setup)
    assert result.ok, result.failures
    # its peers still hold the dead node's sessions (stale): nobody told them
    assert seen["r1 down"] == {"edge": (True, False), "r2": (True, False),
                               "r4": (True, False)}
    # r1 dials r2 and r4 (smaller id): its new sessions replace the stale ones; the
    # edge dials r1, and does not while it holds one: stale until the heartbeat
    assert seen["r1 back"] == {"edge": (True, False), "r2": (True, True),
                               "r4": (True, True)}
    assert seen["r1 back races"].get("replaced", 0) >= 3
    assert seen["after heartbeat"] == {p: (True, True) for p in ("edge", "r2", "r4")}
    # the edge dials the cloud: its new session replaces the cloud's stale one at once
    assert seen["cloud-edge"] == (True, True)


def test_a_frozen_node_loses_its_sessions_at_the_heartbeat_and_gets_them_back() -> None:
    sc = load_scenario(SIMS / "register_crash.toml").with_faults((
        FaultSpec("freeze", 100.0, 30.0, nodes=("r2",)),
        FaultSpec("freeze", 200.0, 3.0, nodes=("r3",))))
    seen: dict[str, Any] = {}

    def setup(ctx: RunContext) -> None:
        w = ctx.world

        def look(tag: str, node: str) -> None:
            seen[tag] = (w.nodes["r1"].core.is_up(node), w.nodes["edge"].core.is_up(node))
        w.at(105_000, lambda: look("r2 frozen 5 s", "r2"))
        w.at(100_000 + w.stale_ms + 500, lambda: look("r2 after heartbeat", "r2"))
        w.at(135_000, lambda: look("r2 resumed", "r2"))
        w.at(205_000, lambda: look("r3 resumed before the heartbeat", "r3"))
    result = run_scenario(sc, 3, setup=setup)
    assert result.ok, result.failures
    assert seen["r2 frozen 5 s"] == (True, True)  # not yet noticed
    assert seen["r2 after heartbeat"] == (False, False)  # no pong: dropped
    assert seen["r2 resumed"] == (True, True)  # it learns, and the sessions re-open
    assert seen["r3 resumed before the heartbeat"] == (True, True)  # never dropped
    assert result.report["sync_lag_ms"]["count"] > 0


def test_a_session_cut_while_frozen_reopens_after_the_resume() -> None:
    """Before, the resumed node looked for dropped sessions before it had learnt of
    them (what it learns waits behind its deferred work), so a link cut while it was
    frozen stayed without a session, and the run did not converge."""
    sc = load_scenario(SIMS / "register_crash.toml").with_faults((
        FaultSpec("freeze", 100.0, 30.0, nodes=("r2",)),
        FaultSpec("isolate", 105.0, 5.0, nodes=("r2",))))
    seen: dict[str, tuple[bool, bool]] = {}

    def setup(ctx: RunContext) -> None:
        w = ctx.world
        w.at(150_000, lambda: seen.__setitem__(
            "r1-r2", (w.nodes["r1"].core.is_up("r2"), w.nodes["r2"].core.is_up("r1"))))
    result = run_scenario(sc, 3, setup=setup)
    assert seen["r1-r2"] == (True, True)
    assert result.ok, result.failures

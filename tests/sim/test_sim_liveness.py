"""Liveness on real networks (issue 10 items 14-18), shown in the simulator on the real
sync core: retransmission adapts to the link and runs per batch on a monotonic clock,
acceptance does not depend on the receiver's wall clock and a skewed clock is not
adopted, refusals back off, and a flapping till costs O(n) summaries per change.
Each test failed on the code before its fix (figures in the docstrings; the commands
and the full figures are in docs/simulation.md, "Liveness scenarios")."""

from __future__ import annotations

from collections import deque
from dataclasses import replace
from pathlib import Path

import pytest

from mesh import config
from mesh.core.sync import _Batch
from mesh.sim.runner import RunContext, RunResult, run_scenario
from mesh.sim.scenario import load_scenario, parse_scenario
from mesh.sim.world import World

SIMS = Path(__file__).resolve().parents[2] / "simulations"


def _run(name: str, scale: float = 1.0) -> RunResult:
    sc = load_scenario(SIMS / f"{name}.toml")
    return run_scenario(sc.scaled(scale) if scale != 1.0 else sc)


def _safe(r: RunResult) -> None:
    rep = r.report
    why = f"{r.failures} {rep['examples']}; reproduce with --seed {r.seed}"
    assert r.ok and rep["converged"] and rep["lost_ops"] == 0, why


def _refusals(r: RunResult) -> int:
    return sum(r.report["rejected"].values())


def test_slow_wan_catch_up_sends_each_page_once() -> None:
    """Item 14, 15 % of the scenario (3,000 receipts, ~1.4 MB): with a fixed 3 s
    timer pages merely in flight on the 2 Mbit/s link were resent (before: 9.8 MB sent,
    catch-up 47 s); an RTO measured from the link sends each page once."""
    r = _run("slow_wan_catchup", 0.15)
    _safe(r)
    needed = r.report["envelopes"] * 470  # a receipt envelope is ~460 bytes here
    assert r.report["bytes"]["wan"] < 1.2 * needed, r.report["bytes"]
    assert r.report["heal_catch_up"][0]["catch_up_ms"] < 20_000


@pytest.mark.slow
def test_slow_wan_catch_up_of_20000_receipts() -> None:
    """Item 14, the whole scenario: before, 108.6 MB sent for 9.2 MB of envelopes and
    188 s to converge; the link alone needs ~37 s."""
    r = _run("slow_wan_catchup")
    _safe(r)
    assert r.report["envelopes"] >= 20_000
    assert r.report["bytes"]["wan"] < 10_500_000
    assert r.report["convergence_ms"] < 60_000


def test_lost_push_of_a_busy_till_is_resent() -> None:
    """Item 15: a till pushing every 0.5 s on a 1 % lossy LAN, nobody else to serve the
    gap, its clock set back an hour mid-run. Before: p99 lag 189 s, max 193 s (the lost
    push waited for a 3 s pause in the till's own sends, or for the wall clock to come
    back); after: repaired within about the RTO floor."""
    r = _run("lossy_busy_till")
    _safe(r)
    lag = r.report["sync_lag_ms"]
    assert lag["max"] < 3_000, lag  # about two RTO floors (SYNC_RTO_MIN_MS, 1 s)
    assert lag["p99"] < 1_000, lag


def _hlc_wall(ctx_world: object, node: str) -> tuple[int, int]:
    from mesh.sim.world import World

    assert isinstance(ctx_world, World)
    n = ctx_world.nodes[node]
    return n.replica.hlc.last >> 16, n.clock()


def test_clock_step_is_neither_refused_nor_adopted() -> None:
    """Item 16: r1's clock is 20 h ahead for a moment, 'slow' runs 5 h behind. Before:
    the slow till refused every node's envelopes (theirs dragged 20 h forward by r1's
    stamps): 251,000 refusals and 58 minutes to converge at full scale. After: nothing
    refused, converged at once, and no HLC but r1's own is ahead of its node's clock by
    more than MAX_HLC_ADOPT_AHEAD_MS."""
    worlds: list[object] = []
    sc = replace(load_scenario(SIMS / "clock_step.toml").scaled(0.3),
                 converge_timeout_s=60)
    r = run_scenario(sc, setup=lambda ctx: worlds.append(ctx.world))
    assert _refusals(r) == 0, r.report["rejected"]
    _safe(r)
    assert r.report["convergence_ms"] < 5_000
    for node in ("edge", "r2", "r8", "slow"):
        hlc, wall = _hlc_wall(worlds[0], node)
        assert hlc <= wall + config.MAX_HLC_ADOPT_AHEAD_MS, (node, hlc - wall)
    hlc, wall = _hlc_wall(worlds[0], "r1")
    assert hlc > wall + 3600_000  # its own stamps stay ahead: only its own clock


def test_a_till_a_day_slow_refuses_nothing() -> None:
    """Items 16 and 17: one till 25 h slow among eleven. Before: it refused the store's
    envelopes and each refusal came back as a resend (1.08 M refusals, 478 MB in 10
    minutes at full scale); after: nothing to refuse."""
    sc = replace(load_scenario(SIMS / "skewed_till.toml").scaled(0.2), converge_timeout_s=60)
    r = run_scenario(sc)
    assert _refusals(r) == 0, r.report["rejected"]
    _safe(r)


def test_refused_envelopes_are_resent_with_backoff() -> None:
    """Item 17: from 10 s on, every envelope r3 sends reaches its peers with a damaged
    signature (a faulty NIC, or someone tampering on the wire), while its sessions stay
    up, so each of its sales is refused (``bad_signature``) and each resend is refused
    again. Before: every refusal came back as a resend from the first refused envelope
    (462 refusals and 3.9 MB for 56 sales in this run, growing with the backlog);
    after: resends back off per (peer, origin), nacks per (peer, reason), up to
    SYNC_REFUSAL_BACKOFF_MAX_MS (each sale refused once by each of 3 peers, and a few
    backed-off resends). (A revoked node can no longer show this: its sessions end.)"""
    data = {
        "name": "tampered_till", "duration_s": 120, "seed": 3,
        "nodes": [{"id": "edge", "role": "edge"}, {"prefix": "r", "count": 3}],
        "stock": {"items": {"A": 5000}},
        "workload": {"streams": [{"kind": "sale", "nodes": ["r3"], "rate_per_min": 30}]},
        "sim": {"converge_timeout_s": 1},
    }

    def setup(ctx: RunContext) -> None:
        w = ctx.world

        def tamper(peer: str, msg: bytes) -> bytes:
            if msg[:1] != b"E" or w.now < 10_000:
                return msg
            out, pos = bytearray(b"E"), 1
            while pos < len(msg):
                n = int.from_bytes(msg[pos:pos + 4], "big")
                raw = bytearray(msg[pos + 4:pos + 4 + n])
                raw[-3] = ord("0") if raw[-3] != ord("0") else ord("1")  # a signature hex
                out += n.to_bytes(4, "big") + raw
                pos += 4 + n
            return bytes(out)
        w.nodes["r3"].send_filter = tamper

    r = run_scenario(parse_scenario(data), setup=setup)
    refused = r.report["rejected"].get("bad_signature", 0)
    sales = r.report["commands"]["sale"]["ok"]
    tampered = sales * 110 // 120  # those sold after 10 s
    assert sales > 30
    assert 3 * tampered <= refused < 5 * sales, (refused, sales)
    assert r.report["bytes"]["total"] < 1_000_000, r.report["bytes"]


def _summary_bytes(sc_data: dict[str, object]) -> tuple[int, RunResult]:
    counted = [0]

    def setup(ctx: RunContext) -> None:
        def count(peer: str, data: bytes) -> bytes:
            if data[:1] == b"V":
                counted[0] += len(data)
            return data
        for node in ctx.world.nodes.values():
            node.send_filter = count
    r = run_scenario(parse_scenario(sc_data), setup=setup)
    return counted[0], r


def _flapping_store(flap: bool) -> dict[str, object]:
    data: dict[str, object] = {
        "name": "flapping_till", "duration_s": 40, "seed": 18,
        "nodes": [{"prefix": "e", "count": 2, "role": "edge"},
                  {"prefix": "r", "count": 24}],
        "stock": {"items": {"A": 100_000}},
        "workload": {"streams": [{"kind": "sale", "nodes": ["role:register"],
                                  "rate_per_min": 2}]},
        "sim": {"converge_timeout_s": 60},
    }
    if flap:
        data["faults"] = [{"kind": "flap", "at_s": 5, "duration_s": 30, "nodes": ["r7"],
                           "down_s": [0.5, 4], "up_s": [1, 6]}]
    return data


def test_a_flapping_till_costs_o_n_summaries_per_change() -> None:
    """Item 18, 26 nodes: before, every peer of the flapping till sent its full summary
    to every LAN peer on each change of its sessions (summary bytes ~5x those of the
    same store without the flap); now one end announces a session (the one rejoining)
    and a session lost is told to one peer."""
    calm, r0 = _summary_bytes(_flapping_store(False))
    flapping, r1 = _summary_bytes(_flapping_store(True))
    _safe(r0)
    _safe(r1)
    assert flapping < 1.6 * calm, (flapping, calm)


def test_a_backoff_slot_resends_every_batch_the_peer_lacks() -> None:
    """Refused (or lost with everything after it counted as arrived) batches of one
    origin go again together when its backoff allows: before, one batch per slot, so a
    resend holding the peer's next seq waited behind the others while the backoff
    doubled (its ``have`` never moved) -- minutes for a dozen lost pushes."""
    w = World(33)
    w.add_node("a", "edge")
    w.add_node("b")
    w.connect("a", "b")
    w.run_until(100)
    core = w.nodes["a"].core
    peer = core.peers["b"]
    # Ours 6 and 7 sent once, then 5 again (its first copy was lost): b holds up to 4.
    peer.out = deque([_Batch("a", 6, 6, 0, 1, False), _Batch("a", 7, 7, 0, 2, False),
                      _Batch("a", 5, 5, 0, 3, True)])
    peer.tx = 3
    core._settle(peer, lambda origin, d: 4 if origin == "a" else d, 3, 0, 10_000)
    assert peer.resend == {"a": [5, 7]} and not peer.out
    # The backoff still holds the next slot back while b's ``have`` stays at 4.
    peer.out = deque([_Batch("a", 5, 7, 10_000, 6, True)])
    peer.tx = 6
    peer.resend.clear()
    core._settle(peer, lambda origin, d: 4 if origin == "a" else d, 6, 0, 10_010)
    assert peer.resend == {"a": [5, 7]}  # the first backoff step is immediate ...
    peer.out = deque([_Batch("a", 5, 7, 10_010, 9, True)])
    peer.tx = 9
    peer.resend.clear()
    core._settle(peer, lambda origin, d: 4 if origin == "a" else d, 9, 0, 10_020)
    assert peer.resend == {} and len(peer.out) == 1  # ... then SYNC_NACK_MS, doubling


def test_swarm_seed_with_a_dozen_lost_pushes_converges() -> None:
    """``storemesh sim run simulations/lossy_busy_till.toml --random-faults --seed
    163017067268678`` (found by a 200-seed swarm of the one-driver simulator): an
    asymmetric link, then a dozen lost pushes with the edge's ``rx`` counted as caught
    up; before the fix above the edge still lacked 182 of r1's sales 120 s after the
    heal."""
    sc = load_scenario(SIMS / "lossy_busy_till.toml")
    _safe(run_scenario(sc, 163017067268678, randomise=True))

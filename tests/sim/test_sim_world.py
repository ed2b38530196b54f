"""The simulated ports added for the partition simulator: link physics (distributions,
fifo, reordering, bandwidth, blackholes), fault hooks, discovery jitter, scenario
loading and the fault plane."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from mesh.core.sync import Effect
from mesh.sim.faults import FaultPlane
from mesh.sim.runner import build_world, run_scenario
from mesh.sim.scenario import (
    LinkSpec,
    ScenarioError,
    load_scenario,
    parse_scenario,
    random_faults,
    resolve,
)
from mesh.sim.world import DISTRIBUTIONS, LinkModel, World

SIMS = Path(__file__).resolve().parents[2] / "simulations"


def _pair(model: LinkModel, *, lan_codec: bool = False
          ) -> tuple[World, list[tuple[float, bytes]]]:
    """Two nodes a->b; what b's core receives is recorded (time, data)."""
    w = World(1)
    w.lan_codec = lan_codec
    w.add_node("a", "edge")
    w.add_node("b")
    w.connect("a", "b", model, LinkModel(**{k: getattr(model, k) for k in (
        "latency_ms", "jitter_ms", "distribution", "fifo")}))
    w.run_until(100)
    got: list[tuple[float, bytes]] = []
    b = w.nodes["b"]
    real = b.core.receive

    def spy(data: bytes, peer: str, now: int) -> list[Effect]:
        got.append((w.now, data))
        return real(data, peer, now)
    b.core.receive = spy  # type: ignore[method-assign,assignment]
    return w, got


def _send_numbered(w: World, n: int) -> None:
    for i in range(n):
        w.send("a", "b", b"V" + str(i).encode())


def _order(got: list[tuple[float, bytes]]) -> list[int]:
    return [int(d[1:]) for _, d in got if d[:1] == b"V" and d[1:].isdigit()]


@pytest.mark.parametrize("dist", DISTRIBUTIONS)
def test_jitter_distributions_are_bounded_and_mean_about_jitter(dist: str) -> None:
    w = World(3)
    link = LinkModel(latency_ms=1.0, jitter_ms=4.0, distribution=dist)
    xs = [w._jitter(link) for _ in range(20_000)]
    assert min(xs) >= 0 and max(xs) <= 50 * 4.0
    mean = sum(xs) / len(xs)
    expected = 2.0 if dist == "uniform" else 4.0
    assert expected * 0.7 < mean < expected * 1.3, (dist, mean)


def test_fifo_link_keeps_order_and_jittery_link_reorders() -> None:
    w, got = _pair(LinkModel(latency_ms=1, jitter_ms=20, fifo=True))
    _send_numbered(w, 200)
    w.run_until(w.now + 1000)
    assert _order(got) == list(range(200))

    w, got = _pair(LinkModel(latency_ms=1, jitter_ms=20, reorder=0.3, reorder_ms=50))
    _send_numbered(w, 200)
    w.run_until(w.now + 1000)
    assert sorted(_order(got)) == list(range(200)) and _order(got) != list(range(200))


def test_a_lan_link_with_the_z1_codec_is_a_stream_of_fewer_wire_bytes() -> None:
    """``lan_codec``: what the real transport negotiates on the LAN. A reordering link
    still delivers in stream order (head-of-line delay), every message exactly as sent,
    and its wire bytes are the codec's."""
    w, got = _pair(LinkModel(latency_ms=1, jitter_ms=20, reorder=0.3, reorder_ms=50),
                   lan_codec=True)
    link = w.links[("a", "b")]
    assert link.codec is not None and link.codec.name == "lan"
    _send_numbered(w, 200)
    w.run_until(w.now + 1000)
    assert _order(got) == list(range(200))
    sent = b"V" + b"0123456789" * 30
    before = (link.bytes, link.wire_bytes)
    for _ in range(20):
        w.send("a", "b", sent)
    w.run_until(w.now + 1000)
    assert sum(1 for _, d in got if d == sent) == 20
    assert link.wire_bytes - before[1] < (link.bytes - before[0]) / 4


def test_a_bad_lan_message_ends_the_session_as_the_transport_does() -> None:
    w, got = _pair(LinkModel(latency_ms=1, jitter_ms=0), lan_codec=True)
    link = w.links[("a", "b")]
    real = link.codec
    assert real is not None

    class Garbling:  # the sender's end emits a frame that is not its codec's
        name = "lan"

        def encode(self, data: bytes) -> bytes:
            return b"Z" + data
    link.codec = Garbling()  # type: ignore[assignment]
    w.send("a", "b", b"V1")
    w.run_until(w.now + 100)
    assert _order(got) == [] and w.dropped_sessions.get("bad_lan_message") == 1
    w.run_until(w.now + 5_000)  # it re-opens, plain codecs anew, and carries again
    assert w.nodes["a"].core.is_up("b")
    w.send("a", "b", b"V2")
    w.run_until(w.now + 100)
    assert _order(got) == [2]


def test_store_life_runs_its_lan_with_the_z1_codec() -> None:
    sc = load_scenario(SIMS / "store_life.toml").scaled(0.2)
    assert sc.lan_codec
    r = run_scenario(sc, 3)
    assert r.ok, r.failures
    assert r.report["wire_bytes"]["lan"] < r.report["bytes"]["lan"] / 2


def test_bandwidth_queues_messages() -> None:
    w, got = _pair(LinkModel(latency_ms=0, jitter_ms=0, bandwidth=10.0))  # 10 B/ms
    t0 = w.now
    for _ in range(10):
        w.send("a", "b", b"V" + b"x" * 99)  # 100 B each: 10 ms each on the wire
    w.run_until(w.now + 1000)
    arrivals = [t for t, d in got if d.startswith(b"Vx")]
    assert arrivals[-1] - t0 == pytest.approx(100.0)


def test_blackhole_eats_one_direction_and_keeps_the_session() -> None:
    w, got = _pair(LinkModel())
    w.links[("a", "b")].blackhole = True
    _send_numbered(w, 5)
    w.run_until(w.now + 100)
    assert _order(got) == [] and w.links[("a", "b")].lost == 5
    assert w.nodes["a"].core.is_up("b") and w.nodes["b"].core.is_up("a")


def test_fractional_skew_timer_does_not_spin() -> None:
    """Regression: with a skew of -83.333 ms the timer fired at a time the node's clock
    read 1 ms early, re-armed at the same instant and looped forever."""
    w = World(2)
    w.add_node("a", "edge", skew_ms=-83.33333333333333)
    w.add_node("b", skew_ms=83.33333333333333)
    w.connect("a", "b")
    w.run_until(60_000, max_events=20_000)
    assert w.events < 20_000


def test_discovery_jitter_delays_reconnects() -> None:
    w = World(4, discovery_ms=100, discovery_jitter_ms=400)
    delays = [w.discovery_delay() for _ in range(1000)]
    assert 100 <= min(delays) and max(delays) <= 500 and len(set(delays)) > 900
    assert World(4).discovery_delay() == 50.0


def test_lying_disk_loses_acknowledged_rows_on_crash() -> None:
    w = World(5)
    n = w.add_node("a", "edge")
    n.disk.lie_about_fsync = True
    n.command(lambda r: r.receive("A", 1, txn="t1", now_ms=n.clock()))
    w.run_until(10)
    assert len(n.acked) == 1
    n.crash()
    n.restart()
    assert n.replica.vv.get("a") == 0


# --- scenarios -------------------------------------------------------------------------------


def _minimal(**extra: object) -> dict[str, object]:
    return {"name": "m", "duration_s": 10, "nodes": [{"id": "edge", "role": "edge"},
                                                     {"prefix": "r", "count": 3}], **extra}


def test_every_shipped_scenario_loads() -> None:
    for path in sorted(SIMS.glob("*.toml")):
        sc = load_scenario(path)
        assert sc.name == path.stem and sc.duration_s > 0


@pytest.mark.parametrize(("data", "needle"), [
    ({"nodes": [{"id": "a", "role": "boss"}]}, "nodes[0].role"),
    ({"colour": "red"}, "unknown key(s) ['colour']"),
    ({"faults": [{"kind": "isolate", "at_s": 1, "nodes": ["zz*"]}]}, "matches no node"),
    ({"faults": [{"kind": "partition", "at_s": 1}]}, "needs groups"),
    ({"network": {"lan": {"loss": 2}}}, "network.lan.loss"),
    ({"network": {"lan": {"fifo": True, "reorder": 0.1}}}, "cannot reorder"),
    ({"stock": {"hot": ["NOPE"]}}, "stock.hot"),
    ({"workload": {"streams": [{"kind": "steal", "nodes": ["*"], "rate_per_min": 1}]}},
     "kind must be one of"),
    ({"nodes": [{"id": "a"}, {"id": "a"}]}, "unique"),
])
def test_bad_scenarios_name_the_key(data: dict[str, object], needle: str) -> None:
    with pytest.raises(ScenarioError, match=None) as err:
        parse_scenario(_minimal(**data))
    assert needle in str(err.value)


def test_selectors_resolve_in_declaration_order() -> None:
    sc = parse_scenario(_minimal(nodes=[{"id": "edge", "role": "edge"},
                                        {"prefix": "r", "count": 3},
                                        {"id": "cloud", "role": "cloud"}]))
    assert resolve(("r*",), sc.nodes) == ["r1", "r2", "r3"]
    assert resolve(("role:register", "!r2"), sc.nodes) == ["r1", "r3"]
    assert resolve(("site:cloud", "edge"), sc.nodes) == ["edge", "cloud"]
    assert resolve(("*",), sc.nodes) == ["edge", "r1", "r2", "r3", "cloud"]


def test_scaled_scales_schedules_not_physics() -> None:
    sc = load_scenario(SIMS / "wan_outage_20min.toml")
    half = sc.scaled(0.5)
    assert half.duration_s == sc.duration_s / 2
    assert half.faults[0].at_s == sc.faults[0].at_s / 2
    assert half.faults[0].duration_s == (sc.faults[0].duration_s or 0) / 2
    assert half.wan == sc.wan and half.streams[0].rate_per_min == sc.streams[0].rate_per_min
    with pytest.raises(ScenarioError):
        sc.scaled(0)


def test_random_faults_are_a_function_of_the_rng() -> None:
    sc = load_scenario(SIMS / "swarm_small.toml")
    a = random_faults(sc, random.Random(1))
    assert a == random_faults(sc, random.Random(1)) and a != random_faults(sc, random.Random(2))
    for f in a:
        assert 0 <= f.at_s <= sc.duration_s
        assert f.end_s is None or f.end_s <= sc.duration_s


def test_overlapping_partitions_heal_when_the_last_ends() -> None:
    sc = parse_scenario(_minimal(faults=[
        {"kind": "isolate", "at_s": 1, "duration_s": 4, "nodes": ["r1"]},
        {"kind": "partition", "at_s": 2, "duration_s": 6, "groups": [["r1", "r2"]]},
    ]))
    w = build_world(sc, 1)
    for a, b in (("edge", "r1"), ("edge", "r2"), ("edge", "r3"), ("r1", "r2"),
                 ("r1", "r3"), ("r2", "r3")):
        w.connect(a, b)
    plane = FaultPlane(w, sc, random.Random(1), lambda label: None, lambda node: None)
    plane.schedule(sc.faults)
    w.run_until(6_000)  # isolate over, partition on: r1-r2 up again, r1-edge still cut
    assert w.links[("r1", "r2")].up and not w.links[("r1", "edge")].up
    w.run_until(9_000)
    assert all(link.up for link in w.links.values())
    assert [iv.end_ms for iv in plane.intervals] == [5_000.0, 8_000.0]


def test_asymmetric_partition_blackholes_then_drops_the_session() -> None:
    sc = parse_scenario(_minimal(duration_s=40, faults=[
        {"kind": "asymmetric", "at_s": 5, "duration_s": 20, "detect_s": 10, "nodes": ["r1"],
         "to": ["edge"]}]))
    seen: dict[str, bool] = {}

    def probe(ctx: object) -> None:
        w = ctx.world  # type: ignore[attr-defined]

        def at(t: float, key: str) -> None:
            def look() -> None:
                seen[key + "_hole"] = w.links[("r1", "edge")].blackhole
                seen[key + "_up"] = w.nodes["edge"].core.is_up("r1")
            w.at(t, look)
        at(10_000, "early")
        at(20_000, "late")
    r = run_scenario(sc, setup=probe)
    assert seen == {"early_hole": True, "early_up": True, "late_hole": True, "late_up": False}
    assert r.ok, r.failures


def test_linkspec_defaults_are_a_lan() -> None:
    assert LinkSpec().latency_ms < 1 and LinkSpec().bandwidth_mbps is None

"""Review items replicated as an OR-set (mesh.core.reviews), telemetry windows and alerts
(mesh.core.telemetry): the pure layers, between real replicas with real keys."""

from __future__ import annotations

import random

import pytest

from mesh import config
from mesh.core import ops, reviews
from mesh.core.envelope import Envelope, verify
from mesh.core.replica import Replica
from mesh.core.telemetry import AlertRule, Telemetry, ops_for, validate_tm
from mesh.errors import CommandError, Forbidden, Malformed
from tests.conftest import NOW, StoreKit


def _deliver(kit: StoreKit, envs: list[Envelope], to: Replica) -> None:
    for env in envs:
        to.apply(verify(env.raw, kit.trust, NOW), NOW)


def _stocked(kit: StoreKit) -> tuple[Replica, Replica, list[Envelope]]:
    edge, r1 = kit.replica("edge"), kit.replica("r1")
    env = edge.receive("A", 10, txn="rcv", now_ms=NOW).envelope
    assert env is not None
    _deliver(kit, [env], r1)
    return edge, r1, [env]


def test_an_item_opened_at_the_edge_is_resolved_at_a_register(kit: StoreKit) -> None:
    edge, r1, _ = _stocked(kit)
    opened = reviews.open_item(edge, sku="A", why="sensor_disagree", delta=-2, score=700,
                               evidence=["s1"], zone="dairy", now_ms=NOW, txn="rv1")
    assert opened.envelope is not None and opened.reservation_id == "edge:rv1"
    _deliver(kit, [opened.envelope], r1)
    assert [i.id for i in r1.reviews.open_items("A")] == ["edge:rv1"]
    acc = reviews.resolve(r1, "edge:rv1", "accept", now_ms=NOW + 1, txn="acc", staff="anna")
    assert acc.envelope is not None and acc.envelope.meta["kind"] == "adjust"
    assert acc.envelope.meta["evidence"] == {"review": "edge:rv1", "score": 700,
                                             "readings": ["s1"]}
    assert r1.on_hand("A") == 8 and not r1.reviews.is_open("edge:rv1")
    _deliver(kit, [acc.envelope], edge)
    assert edge.on_hand("A") == 8 and edge.reviews.open_items() == []
    view = edge.reviews.view("edge:rv1")
    assert view is not None and view["resolutions"][0]["staff_id"] == "anna"
    assert view["conflict"] is False
    # replay answers the original; another txn on a closed item is refused
    again = reviews.resolve(r1, "edge:rv1", "accept", now_ms=NOW + 2, txn="acc", staff="anna")
    assert again.duplicate and again.seq == acc.seq
    with pytest.raises(CommandError):
        reviews.resolve(r1, "edge:rv1", "reject", now_ms=NOW + 2, txn="rej")


def test_concurrent_accepts_both_adjust_and_are_flagged(kit: StoreKit) -> None:
    edge, r1, base = _stocked(kit)
    r2 = kit.replica("r2")
    opened = reviews.open_item(edge, sku="A", why="sensor_disagree", delta=-1, score=600,
                               evidence=[], zone=None, now_ms=NOW, txn="rv1").envelope
    assert opened is not None
    _deliver(kit, [opened], r1)
    _deliver(kit, [*base, opened], r2)
    a = reviews.resolve(r1, "edge:rv1", "accept", now_ms=NOW + 5, txn="a1").envelope
    b = reviews.resolve(r2, "edge:rv1", "accept", now_ms=NOW + 6, txn="b1").envelope
    assert a is not None and b is not None
    for rep, envs in ((edge, [a, b]), (r1, [b]), (r2, [a])):
        _deliver(kit, envs, rep)
    views = [rep.reviews.view("edge:rv1") for rep in (edge, r1, r2)]
    assert all(v is not None and v["conflict"] and not v["open"] for v in views)
    assert views[0] == views[1] == views[2]
    assert {rep.on_hand("A") for rep in (edge, r1, r2)} == {8}  # both accepts adjusted


def _env(res: object) -> Envelope:
    env = getattr(res, "envelope", None)
    assert isinstance(env, Envelope)
    return env


def test_any_delivery_order_converges_and_snapshots_keep_items(kit: StoreKit) -> None:
    edge, _, envs = _stocked(kit)
    for i in range(4):
        envs.append(_env(reviews.open_item(
            edge, sku="A", why="replenish", delta=0, score=0, evidence=[f"q{i}"], zone=None,
            now_ms=NOW + i, txn=f"o{i}")))
    envs.append(_env(reviews.resolve(edge, "edge:o1", "reject", now_ms=NOW + 9, txn="r1")))
    envs.append(_env(reviews.resolve(edge, "edge:o2", "count", now_ms=NOW + 9, txn="c2")))
    states = set()
    for seed in range(5):
        rep = kit.replica("r2")
        shuffled = envs[:]
        random.Random(seed).shuffle(shuffled)
        _deliver(kit, shuffled, rep)
        states.add(tuple(i.id for i in rep.reviews.open_items()))
        restored = kit.replica("r2")
        restored.restore(rep.snapshot())
        assert restored.reviews.open_items() == rep.reviews.open_items()
        assert restored.reviews.view("edge:o2") == rep.reviews.view("edge:o2")
    assert states == {("edge:c2", "edge:o0", "edge:o3")}


def _seen(rep: Replica) -> tuple[list[str], list[object], list[str]]:
    """Items, their views, and the held history (internal: what memory keeps)."""
    rs = rep.reviews
    d = rs.to_dict()
    held = sorted(repr(x) for x in [*d["dot_id"], *d["resolutions"]])
    return sorted(rs.records), [rs.view(r) for r in sorted(rs.records)], held


def test_resolved_items_retire_after_the_window_alike_in_any_order(
        kit: StoreKit, monkeypatch: pytest.MonkeyPatch) -> None:
    """Invariant 6: a resolved item is retired once the rv log has moved REVIEW_RETAIN_MS
    past its first resolution; every replica holds the same items and history whatever
    the order: a concurrent (late) resolution of an item another replica retired, an
    item resolved only on another node whose add arrives after the window passed."""
    monkeypatch.setattr(config, "REVIEW_RETAIN_MS", 1_000)
    edge, r1, envs = _stocked(kit)
    for i in range(5):
        envs.append(_env(reviews.open_item(
            edge, sku="A", why="replenish", delta=0, score=0, evidence=[f"q{i}"], zone=None,
            now_ms=NOW + i, txn=f"o{i}")))
    _deliver(kit, envs[1:], r1)
    envs.append(_env(reviews.resolve(edge, "edge:o1", "reject", now_ms=NOW + 9, txn="r1")))
    envs.append(_env(reviews.resolve(edge, "edge:o2", "count", now_ms=NOW + 9, txn="c2")))
    envs.append(_env(reviews.resolve(edge, "edge:o3", "reject", now_ms=NOW + 10, txn="r3")))
    only_r1 = _env(reviews.resolve(r1, "edge:o0", "reject", now_ms=NOW + 15, txn="r0"))
    envs.append(only_r1)
    late = _env(reviews.resolve(r1, "edge:o3", "accept", now_ms=NOW + 20, txn="a3"))
    within = [*envs, late]
    # before the window has passed, every resolved item is kept, with its history
    rep = kit.replica("r2")
    _deliver(kit, within, rep)
    assert sorted(rep.reviews.records) == ["edge:c2", *(f"edge:o{i}" for i in range(5))]
    view = rep.reviews.view("edge:o3")
    assert view is not None and view["conflict"] is False and len(view["resolutions"]) == 2
    # items opened past the window (on both nodes) move the horizon: all but the open
    # ones retire everywhere
    jumps = [_env(reviews.open_item(n, sku="A", why="replenish", delta=0, score=0,
                                    evidence=["q9"], zone=None, now_ms=NOW + t, txn="o9"))
             for n, t in ((r1, 120_000), (edge, 121_000))]
    everything = [*within, *jumps]
    seen = set()
    for seed in range(24):
        rep = kit.replica("r2")
        shuffled = everything[:]
        random.Random(seed).shuffle(shuffled)
        _deliver(kit, shuffled, rep)
        ids, views, held = _seen(rep)
        assert ids == ["edge:c2", "edge:o4", "edge:o9", "r1:o9"], (seed, ids)
        assert rep.reviews.view("edge:o3") is None
        seen.add(repr((views, held)))
        restored = kit.replica("r2")
        restored.restore(rep.snapshot())
        assert _seen(restored) == (ids, views, held)
    assert len(seen) == 1
    # the edge retired its own items too, and the late resolution changes nothing there
    _deliver(kit, [only_r1, late, jumps[0]], edge)
    assert sorted(edge.reviews.records) == ["edge:c2", "edge:o4", "edge:o9", "r1:o9"]
    assert edge.reviews.retired == 4
    with pytest.raises(CommandError):
        reviews.resolve(edge, "edge:o1", "accept", now_ms=NOW + 121_001, txn="again")


def test_rv_ops_are_validated_and_namespaced(kit: StoreKit) -> None:
    edge, _, _ = _stocked(kit)
    env = reviews.open_item(edge, sku="A", why="zone_shrink", delta=0, score=0,
                            evidence=["dairy:3"], zone="dairy", now_ms=NOW, txn="z").envelope
    assert env is not None
    op = env.ops[0]
    ops.validate_ops([op])
    with pytest.raises(Forbidden):
        ops.check_rights([op], "r1", "register")
    bad = {**op, "rec": {"edge:z": {**op["rec"]["edge:z"], "why": "because"}}}
    with pytest.raises(Malformed):
        ops.validate_ops([bad])
    with pytest.raises(Malformed):
        ops.validate_meta({"kind": "adjust", "txn": "t", "evidence": {"score": 1001}})
    with pytest.raises(CommandError):
        reviews.open_item(edge, sku="A", why="nope", delta=0, score=0, evidence=[],
                          zone=None, now_ms=NOW, txn="n")


def test_auto_adjust_carries_its_evidence_and_replays(kit: StoreKit) -> None:
    edge, r1, _ = _stocked(kit)
    res = reviews.auto_adjust(edge, sku="A", delta=-3, score=984, readings=["r1", "s1"],
                              rule="default", now_ms=NOW, txn="rec:1")
    assert res.envelope is not None
    meta = res.envelope.meta
    assert (meta["kind"], meta["reason"], meta["qty"]) == ("adjust", "sensor_reconcile", -3)
    assert meta["evidence"] == {"readings": ["r1", "s1"], "score": 984, "rule": "default"}
    _deliver(kit, [res.envelope], r1)
    assert r1.on_hand("A") == 7
    again = reviews.auto_adjust(edge, sku="A", delta=-3, score=984, readings=["r1", "s1"],
                                rule="default", now_ms=NOW + 5, txn="rec:1")
    assert again.duplicate and edge.on_hand("A") == 7


# --- telemetry ------------------------------------------------------------------------


def test_windows_summarise_once_and_late_readings_are_dropped() -> None:
    t = Telemetry([], window_ms=60_000)
    for i in range(120):
        t.add("cooler-1", "cooler_temp_c", 3.0 + (i % 3), NOW - NOW % 60_000 + i * 1000)
    start = NOW - NOW % 60_000
    sums = t.flush(start + 60_000)
    assert [(s.count, s.min, s.max, s.mean) for s in sums] == [(60, 3.0, 5.0, 4.0)]
    assert t.flush(start + 60_000) == []
    t.add("cooler-1", "cooler_temp_c", 9.0, start + 10)
    assert t.counts["late"] == 1
    assert [s.count for s in t.flush(start + 120_000)] == [60]


def test_cooler_above_5_for_10_minutes_raises_once_and_clears_once() -> None:
    t = Telemetry()
    out = []
    for minute in range(25):
        value = 6.0 if 2 <= minute < 20 else 4.0
        out += t.add("cooler-1", "cooler_temp_c", value, NOW + minute * 60_000)
    assert [(a.rule, a.state, (a.at_ms - NOW) // 60_000) for a in out] == [
        ("cooler_warm", "raised", 12), ("cooler_warm", "cleared", 20)]
    # a blip below the threshold restarts the clock
    t2 = Telemetry()
    blips = []
    for minute in range(20):
        blips += t2.add("c", "cooler_temp_c", 4.0 if minute == 8 else 6.0,
                        NOW + minute * 60_000)
    assert [(a.state, (a.at_ms - NOW) // 60_000) for a in blips] == [("raised", 19)]


def test_rate_of_change_alert() -> None:
    t = Telemetry([AlertRule("rising", "cooler_temp_c", rate_per_min=2.0)])
    out = []
    for i, v in enumerate([3.0, 3.5, 6.0, 6.2, 6.3]):
        out += t.add("c", "cooler_temp_c", v, NOW + i * 60_000)
    assert [(a.state, a.value) for a in out] == [("raised", 6.0), ("cleared", 6.2)]


def test_tm_ops_validate() -> None:
    t = Telemetry([], window_ms=60_000)
    t.add("d", "m", 1.5, NOW)
    [op] = ops_for(t.flush(NOW + 60_000), [])
    validate_tm(op)
    ops.validate_ops([op])
    with pytest.raises(Forbidden):
        ops.check_rights([op], "r1", "register")
    with pytest.raises(Malformed):
        validate_tm({**op, "s": [["d", "m", 0, 1, float("nan"), 1.0, 1.0]]})


def test_noise_at_1hz_raises_no_rate_alert() -> None:
    """Between consecutive 1 Hz readings, 0.3 °C of sensor noise is 18 °C/min: the rate
    is judged over a span, so a noisy but steady cooler sends nothing (bench_telemetry
    found the flapping: 86,000 alert envelopes a day)."""
    rng = random.Random(3)
    t = Telemetry()
    out = []
    for s in range(1800):
        out += t.add("c", "cooler_temp_c", 3.0 + rng.gauss(0, 0.3), NOW + s * 1000)
    assert out == []

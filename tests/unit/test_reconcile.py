"""The pure reconciliation (mesh.core.reconcile): determinism, the confidence score's
monotonicity, drift, rules as data, phantom-stock helpers and reorder points."""

from __future__ import annotations

import copy

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mesh.core.reconcile import (
    DEFAULT_RULES,
    Rules,
    absent_sales,
    phantom_reservations,
    reconcile_sku,
    reorder_suggestions,
    score_of,
    zone_shrink,
)
from mesh.core.sensors import Reading, SensorInfo

NOW = 1_790_000_000_000
RULES = Rules.from_dict(DEFAULT_RULES)


def info(sid: str, kind: str, *, unit: float | None = None, drift: float = 0.05,
         calibrated: int | None = NOW - 86_400_000) -> SensorInfo:
    return SensorInfo(sid, kind, "z1", ("A",), unit, 0.0, calibrated, drift, None, "active")


SENSORS = {"sc": info("sc", "weight", unit=100.0), "rf": info("rf", "rfid"),
           "vi": info("vi", "vision"), "ct": info("ct", "count")}


def rd(rid: str, sensor: str, value: float, age: int = 1000, **kw: object) -> Reading:
    return Reading(rid, sensor, SENSORS[sensor].kind, "A", value, NOW - age, **kw)  # type: ignore[arg-type]


def test_two_agreeing_signals_auto_one_signal_reviews() -> None:
    both = {"sc": [rd("s1", "sc", 700)], "rf": [rd("r1", "rf", 7)]}
    out = reconcile_sku("A", 10, both, SENSORS, RULES, NOW)
    assert (out.action, out.estimate, out.delta) == ("auto", 7, -3)
    assert out.evidence == ("r1", "s1") and out.score >= 950
    one = reconcile_sku("A", 10, {"sc": [rd("s1", "sc", 700)]}, SENSORS, RULES, NOW)
    assert (one.action, one.delta) == ("review", -3)
    agree = reconcile_sku("A", 10, {"sc": [rd("s1", "sc", 1000)]}, SENSORS, RULES, NOW)
    assert agree.action == "ok"
    none = reconcile_sku("A", 10, {"sc": [rd("s1", "sc", 700, age=10**7)]}, SENSORS, RULES,
                         NOW)
    assert none.action == "none"


def test_disagreeing_signals_lower_confidence_to_review_or_warn() -> None:
    h = {"sc": [rd("s1", "sc", 700)], "rf": [rd("r1", "rf", 10)]}
    out = reconcile_sku("A", 10, h, SENSORS, RULES, NOW)
    # the scale (trusted a bit more) is the estimate; the RFID count disagrees
    assert (out.action, out.estimate, out.score) == ("warn", 7, 135)
    h = {"vi": [rd("v1", "vi", 3, confidence=0.4)], "rf": [rd("r1", "rf", 10, age=800_000)]}
    out = reconcile_sku("A", 10, h, SENSORS, RULES, NOW)
    assert out.action == "warn"
    lone_vision = reconcile_sku("A", 10, {"vi": [rd("v1", "vi", 4, confidence=0.5)]},
                                SENSORS, RULES, NOW)
    assert lone_vision.action == "warn" and lone_vision.score == 299


def test_a_manual_count_alone_auto_adjusts_but_not_for_high_value_skus() -> None:
    h = {"ct": [rd("c1", "ct", 4)]}
    assert reconcile_sku("A", 10, h, SENSORS, RULES, NOW).action == "auto"
    doc = copy.deepcopy(DEFAULT_RULES)
    doc["sku_class"] = {"A": "high_value"}
    hv = Rules.from_dict(doc)
    out = reconcile_sku("A", 10, h, SENSORS, hv, NOW)
    assert out.rule == "high_value" and out.action == "review"


def test_uncalibrated_and_stale_calibration_lower_trust() -> None:
    stale = dict(SENSORS, sc=info("sc", "weight", unit=100.0, calibrated=NOW - 400 * 86_400_000))
    h = {"sc": [rd("s1", "sc", 700)], "rf": [rd("r1", "rf", 7)]}
    fresh = reconcile_sku("A", 10, h, SENSORS, RULES, NOW)
    old = reconcile_sku("A", 10, h, stale, RULES, NOW)
    due = reconcile_sku("A", 10, {"sc": [rd("s1", "sc", 700, calibration="due")],
                                  "rf": [rd("r1", "rf", 7)]}, SENSORS, RULES, NOW)
    assert old.score < fresh.score and due.score == old.score
    assert old.action == "review"


def test_a_drifting_scale_is_flagged_and_not_believed() -> None:
    h = {"sc": [rd(f"s{i}", "sc", 1300 + 100 * i, age=5000 - 1000 * i) for i in range(3)],
         "rf": [rd(f"r{i}", "rf", 10, age=5001 - 1000 * i) for i in range(3)]}
    out = reconcile_sku("A", 10, h, SENSORS, RULES, NOW)
    assert out.drifting == ("sc",)
    assert out.action == "ok" and "s2" not in out.evidence
    # Within its drift tolerance it is believed; two readings are not "persistent".
    tolerant = dict(SENSORS, sc=info("sc", "weight", unit=100.0, drift=0.5))
    assert reconcile_sku("A", 10, h, tolerant, RULES, NOW).drifting == ()
    short = {"sc": h["sc"][:2], "rf": h["rf"]}
    assert reconcile_sku("A", 10, short, SENSORS, RULES, NOW).drifting == ()


_signal = st.tuples(st.sampled_from(["weight", "rfid", "vision", "count"]),
                    st.integers(0, 30), st.integers(0, 899_000),
                    st.floats(0.05, 1.0, allow_nan=False))


def _history(signals: list[tuple[str, int, int, float]]
             ) -> tuple[dict[str, list[Reading]], dict[str, SensorInfo]]:
    hist: dict[str, list[Reading]] = {}
    sens: dict[str, SensorInfo] = {}
    for i, (kind, units, age, conf) in enumerate(signals):
        sid = f"{kind}-{i}"
        sens[sid] = info(sid, kind, unit=50.0 if kind == "weight" else None)
        value = units * 50.0 if kind == "weight" else float(units)
        hist[sid] = [Reading(f"x{i}", sid, kind, "A", value, NOW - age,
                             conf if kind == "vision" else None)]
    return hist, sens


@settings(max_examples=200, deadline=None)
@given(st.lists(_signal, min_size=1, max_size=6), st.integers(0, 40))
def test_deterministic_whatever_the_order(signals: list[tuple[str, int, int, float]],
                                          expected: int) -> None:
    hist, sens = _history(signals)
    a = reconcile_sku("A", expected, hist, sens, RULES, NOW)
    b = reconcile_sku("A", expected, dict(reversed(list(hist.items()))),
                      dict(reversed(list(sens.items()))), RULES, NOW)
    assert a == b
    assert 0 <= a.score <= 1000


@settings(max_examples=300, deadline=None)
@given(st.lists(st.floats(0.0, 0.999), max_size=6), st.lists(st.floats(0.0, 0.999),
                                                             max_size=6),
       st.floats(0.0, 0.999), st.floats(0.0, 0.999))
def test_score_is_monotone_in_agreement(agree: list[float], disagree: list[float],
                                        extra: float, bump: float) -> None:
    base = score_of(agree, disagree)
    assert score_of([*agree, extra], disagree) >= base - 1e-12  # one more agreeing signal
    if agree:  # an agreeing signal trusted more
        raised = [max(agree[0], bump), *agree[1:]]
        assert score_of(raised, disagree) >= base - 1e-12
    # one more disagreeing signal never raises it; turning it to agree never lowers it
    assert score_of(agree, [*disagree, extra]) <= base + 1e-12
    assert score_of([*agree, extra], disagree) >= score_of(agree, [*disagree, extra]) - 1e-12


@settings(max_examples=100, deadline=None)
@given(st.integers(0, 30), st.integers(1, 4), st.integers(0, 40))
def test_more_agreeing_sensors_never_lower_the_score(units: int, n: int,
                                                     expected: int) -> None:
    sigs = [("rfid", units, 1000, 1.0)] * n
    hist, sens = _history(sigs)
    more_h, more_s = _history([*sigs, ("weight", units, 1000, 1.0)])
    assert reconcile_sku("A", expected, more_h, more_s, RULES, NOW).score >= reconcile_sku(
        "A", expected, hist, sens, RULES, NOW).score


@pytest.mark.parametrize(("patch", "message"), [
    ({"version": 2}, "version"),
    ({"kinds": {"weight": {}}}, "kinds.weight"),
    ({"classes": {"x": {"auto": 0.9, "review": 0.5, "tolerance": 0, "max_auto_delta": 1,
                        "min_signals": 1}}}, "default"),
    ({"classes": {"default": {"auto": 0.4, "review": 0.5, "tolerance": 0,
                              "max_auto_delta": 1, "min_signals": 1}}}, "review"),
    ({"sku_class": {"A": "nope"}}, "unknown class"),
    ({"max_age_ms": "soon"}, "max_age_ms"),
])
def test_rules_documents_are_checked(patch: dict[str, object], message: str) -> None:
    doc = {**copy.deepcopy(DEFAULT_RULES), **patch}
    with pytest.raises(ValueError, match=message):
        Rules.from_dict(doc)
    with pytest.raises(ValueError):
        Rules.from_dict([1, 2])


def test_class_prefix_longest_wins() -> None:
    doc = copy.deepcopy(DEFAULT_RULES)
    doc["class_prefix"] = {"TV": "default", "TV-OLED": "high_value"}
    r = Rules.from_dict(doc)
    assert r.class_of("TV-OLED-55") == "high_value" and r.class_of("TV-LCD") == "default"


def test_phantom_helpers() -> None:
    old = NOW - RULES.pick_window_ms - 1
    assert phantom_reservations([("e:1", "A", 1, old), ("e:2", "A", 1, NOW - 1000),
                                 ("e:3", "B", 1, None)], RULES, NOW) == [("e:1", "A")]
    shelf = {"A": [(NOW - 5000, 0.0, "s1"), (NOW - 100, 4.0, "s2")]}
    assert absent_sales([("r1:5", "A", NOW - 1000), ("r1:6", "A", NOW - 50),
                         ("r1:7", "B", NOW)], shelf) == [("r1:5", "A")]
    adj = [("dairy", NOW - 1000, -2), ("dairy", NOW - 2000, -1), ("dairy", NOW - 3000, -1),
           ("bakery", NOW - 1000, -1), ("dairy", NOW - 10**9, -5), ("dairy", NOW, 3)]
    assert zone_shrink(adj, RULES, NOW) == [("dairy", 3)]


def test_reorder_points_static_and_from_sales_rate() -> None:
    doc = copy.deepcopy(DEFAULT_RULES)
    doc["reorder"] = {"default": {"point": 5, "target": 20},
                      "skus": {"FAST": {"lead_time_days": 2, "safety": 3, "target_days": 7}}}
    r = Rules.from_dict(doc)
    out = reorder_suggestions({"A": 5, "B": 6, "FAST": 20}, {"FAST": 70}, 7.0, r)
    # FAST sells 10/day: point 2*10+3 = 23, target 70+23 = 93
    assert out == [
        {"sku": "A", "available": 5, "reorder_point": 5, "suggested_qty": 15,
         "rate_per_day": 0.0},
        {"sku": "FAST", "available": 20, "reorder_point": 23, "suggested_qty": 73,
         "rate_per_day": 10.0}]
    assert reorder_suggestions({"A": 0}, {}, 7.0, RULES) == []  # no point: no suggestion


def test_a_signal_that_also_fits_the_ledger_is_no_evidence_for_a_change() -> None:
    """Found by the simulator (mesh.sim.sensors): a scale drifting up (20.6 units), a
    camera saying 21 and an RFID count of 20 all lay within their errors of the median,
    so the ledger's 20 was auto-adjusted to 21: a false adjustment."""
    sensors = dict(SENSORS, sc=info("sc", "weight", unit=100.0))
    h = {"sc": [rd("s1", "sc", 2060)], "vi": [rd("v1", "vi", 21, confidence=0.9)],
         "rf": [rd("r1", "rf", 20)]}
    out = reconcile_sku("A", 20, h, sensors, RULES, NOW)
    assert out.action != "auto"
    assert [s.agrees for s in out.signals if s.sensor == "rf"] == [False]


def test_a_reading_older_than_the_last_stock_movement_is_no_signal() -> None:
    """Found by the world simulator: a sale between a reading and the run made the
    readings (one unit more) auto-adjust the ledger by +1 (reconcile invariant 5)."""
    h = {"sc": [rd("s1", "sc", 2100, age=20_000)], "rf": [rd("r1", "rf", 21, age=20_000)]}
    assert reconcile_sku("A", 20, h, SENSORS, RULES, NOW).action == "auto"
    out = reconcile_sku("A", 20, h, SENSORS, RULES, NOW, moved_ms=NOW - 10_000)
    assert out.action == "none" and out.signals == ()
    assert reconcile_sku("A", 20, h, SENSORS, RULES, NOW,
                         moved_ms=NOW - 30_000).action == "auto"


def test_of_two_sensors_at_odds_the_one_off_the_ledger_is_the_drifting_one() -> None:
    """Found by the simulator: a scale stuck at 0 and the RFID reader beside it
    disagreed persistently, and both were flagged; the ledger tells which is off."""
    h = {"sc": [rd(f"s{i}", "sc", 0, age=5000 - 1000 * i) for i in range(3)],
         "rf": [rd(f"r{i}", "rf", 20, age=4999 - 1000 * i) for i in range(3)]}
    assert reconcile_sku("A", 20, h, SENSORS, RULES, NOW).drifting == ("sc",)
    # one tag missed, a sale between two readings: within the kinds' errors, no flag
    h = {"sc": [rd(f"s{i}", "sc", 2000 - 100 * (i > 1), age=5000 - 1000 * i)
                for i in range(3)],
         "rf": [rd(f"r{i}", "rf", 19, age=4000 - 1000 * i) for i in range(3)]}
    assert reconcile_sku("A", 20, h, SENSORS, RULES, NOW).drifting == ()

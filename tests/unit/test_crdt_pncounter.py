"""CRDT laws of PNCounter over generated multi-replica histories (mesh.core.crdt)."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mesh.core.crdt import PNCounter

REPLICAS = ("r0", "r1", "r2")

# ("inc" | "dec", replica, amount) | ("sync", to, from) | ("recv", to, delta index)
ops = st.lists(
    st.one_of(
        st.tuples(st.sampled_from(("inc", "dec")), st.integers(0, 2), st.integers(1, 5)),
        st.tuples(st.just("sync"), st.integers(0, 2), st.integers(0, 2)),
        st.tuples(st.just("recv"), st.integers(0, 2), st.integers(0, 10_000)),
    ),
    max_size=30,
)


@dataclass
class History:
    replicas: list[PNCounter]
    deltas: list[PNCounter] = field(default_factory=list)
    incremented: int = 0
    decremented: int = 0


def run(history: list[tuple[str, int, int]]) -> History:
    """Play ``history`` on three replicas; every mutation's delta is checked and kept."""
    h = History([PNCounter() for _ in REPLICAS])
    for kind, i, arg in history:
        replica = h.replicas[i]
        if kind in ("inc", "dec"):
            before = replica.copy()
            if kind == "inc":
                delta = replica.increment(REPLICAS[i], arg)
                h.incremented += arg
                assert delta.entry(REPLICAS[i]) == (replica.entry(REPLICAS[i])[0], 0)
            else:
                delta = replica.decrement(REPLICAS[i], arg)
                h.decremented += arg
                assert delta.entry(REPLICAS[i]) == (0, replica.entry(REPLICAS[i])[1])
            assert delta.replicas() == {REPLICAS[i]}  # only the owner's entry
            assert before.merge(delta) == replica  # mutator == join with its delta
            h.deltas.append(delta)
        elif kind == "sync":
            replica.merge(h.replicas[arg])
        elif h.deltas:
            replica.merge(h.deltas[arg % len(h.deltas)])
    return h


def join_all(counters: list[PNCounter]) -> PNCounter:
    out = PNCounter()
    for c in counters:
        out.merge(c)
    return out


def recomputed(c: PNCounter) -> int:
    d = c.to_dict()
    return sum(d["p"].values()) - sum(d["n"].values())


@given(ops)
def test_value_is_increments_minus_decrements(history: list[tuple[str, int, int]]) -> None:
    h = run(history)
    merged = join_all(h.replicas)
    assert merged.value == h.incremented - h.decremented
    for c in [*h.replicas, *h.deltas, merged]:
        assert c.value == recomputed(c)  # the cached value never drifts


@given(ops)
def test_merge_laws(history: list[tuple[str, int, int]]) -> None:
    a, b, c = run(history).replicas
    b_before = b.copy()
    ab = a.copy().merge(b)
    assert b == b_before  # merge leaves its argument alone
    assert ab == b.copy().merge(a)  # commutative
    assert ab.copy().merge(c) == a.copy().merge(b.copy().merge(c))  # associative
    assert ab.copy().merge(ab) == ab  # idempotent
    assert ab.copy().merge(a) == ab  # absorbs what it already has
    m = a.copy()
    assert m.merge(m) is m
    assert m == a
    for r in REPLICAS:
        assert ab.entry(r) == (
            max(a.entry(r)[0], b.entry(r)[0]),
            max(a.entry(r)[1], b.entry(r)[1]),
        )
    assert ab.value == recomputed(ab)


@settings(max_examples=200)
@given(ops, st.data())
def test_deltas_in_any_order_with_duplicates_converge(
    history: list[tuple[str, int, int]], data: st.DataObject
) -> None:
    h = run(history)
    full = join_all(h.replicas)
    n = len(h.deltas)
    extra = data.draw(st.lists(st.integers(0, max(n - 1, 0)), max_size=n)) if n else []
    order = data.draw(st.permutations(list(range(n)) + extra))
    fresh = PNCounter()
    for k in order:
        fresh.merge(h.deltas[k])
    assert fresh == full
    assert fresh.value == full.value == h.incremented - h.decremented
    assert join_all(h.deltas) == full  # plain sequential application


def test_concurrent_increments_all_count() -> None:
    a, b = PNCounter(), PNCounter()
    da = a.increment("a", 3)
    db = b.decrement("b", 2)
    db2 = b.increment("b", 5)
    a.merge(db).merge(db2).merge(db)
    b.merge(da)
    assert a == b
    assert a.value == b.value == 6
    assert a.entry("b") == (5, 2)
    assert a.entry("nobody") == (0, 0)
    assert a.replicas() == {"a", "b"}


@pytest.mark.parametrize("bad", [0, -1, True, 1.5, "1", None])
def test_mutators_reject_bad_amounts(bad: object) -> None:
    c = PNCounter({"a": 2})
    with pytest.raises(ValueError, match="int > 0"):
        c.increment("a", bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="int > 0"):
        c.decrement("a", bad)  # type: ignore[arg-type]
    assert c == PNCounter({"a": 2})
    assert c.value == 2


@given(ops)
def test_dict_round_trip(history: list[tuple[str, int, int]]) -> None:
    for c in run(history).replicas:
        d = c.to_dict()
        assert set(d) == {"p", "n"}
        assert all(v > 0 for side in d.values() for v in side.values())
        back = PNCounter.from_dict(d)
        assert back == c
        assert back.value == c.value
        assert repr(back) == repr(c)


def test_zero_entries_are_not_state() -> None:
    c = PNCounter.from_dict({"p": {"a": 0}, "n": {}})
    assert c == PNCounter()
    assert c.to_dict() == {"p": {}, "n": {}}
    assert c.replicas() == set()


def test_copy_is_independent() -> None:
    c = PNCounter({"a": 1})
    d = c.copy()
    d.increment("a")
    assert c.entry("a") == (1, 0)
    assert d.entry("a") == (2, 0)


@pytest.mark.parametrize(
    "bad",
    [
        None,
        [],
        {"p": {}},
        {"p": {}, "n": {}, "x": {}},
        {"p": [], "n": {}},
        {"p": {"a": -1}, "n": {}},
        {"p": {}, "n": {"a": True}},
        {"p": {"a": 1.0}, "n": {}},
        {"p": {"a": "3"}, "n": {}},
        {"p": {1: 3}, "n": {}},
    ],
)
def test_from_dict_rejects(bad: object) -> None:
    with pytest.raises(ValueError, match="PN-counter"):
        PNCounter.from_dict(bad)

"""CRDT laws of CausalContext and the add-wins ORSet over generated histories (mesh.core.crdt)."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mesh.core.crdt import CausalContext, Dot, ORSet, VersionVector

REPLICAS = ("r0", "r1", "r2")
ELEMENTS = ("x", "y", "z")


def ctx_dots(ctx: CausalContext) -> set[Dot]:
    """Every dot a context holds, spelled out."""
    out = {(r, c) for r, seq in ctx.vv.items() for c in range(1, seq + 1)}
    return out | set(ctx.cloud)


def entry_dots(s: ORSet) -> set[Dot]:
    return {d for e in s for d in s.dots(e)}


# -- CausalContext ---------------------------------------------------------------------

dot_sets = st.sets(st.tuples(st.sampled_from(REPLICAS), st.integers(1, 8)), max_size=20)


def context_of(dots: set[Dot]) -> CausalContext:
    return CausalContext(cloud=dots)


@given(dot_sets)
def test_context_holds_exactly_its_dots_and_is_compact(dots: set[Dot]) -> None:
    ctx = context_of(dots)
    assert ctx_dots(ctx) == dots
    for r in REPLICAS:
        for c in range(1, 11):
            assert ctx.contains((r, c)) == ((r, c) in dots) == ((r, c) in ctx)
    for r, c in ctx.cloud:  # invariant 2: nothing foldable is left in the cloud
        assert c > ctx.vv[r] + 1


@given(dot_sets, st.data())
def test_context_is_canonical(dots: set[Dot], data: st.DataObject) -> None:
    order = data.draw(st.permutations(sorted(dots)))
    one_by_one = CausalContext()
    for d in order:
        one_by_one.add(d)
    half = len(order) // 2
    split = context_of(set(order[:half])).merge(context_of(set(order[half:])))
    assert one_by_one == split == context_of(dots)


@given(dot_sets, dot_sets, dot_sets)
def test_context_merge_laws(a: set[Dot], b: set[Dot], c: set[Dot]) -> None:
    ca, cb, cc = context_of(a), context_of(b), context_of(c)
    ab = ca.copy().merge(cb)
    assert cb == context_of(b)  # argument untouched
    assert ctx_dots(ab) == a | b
    assert ab == cb.copy().merge(ca)
    assert ab.copy().merge(cc) == ca.copy().merge(cb.copy().merge(cc))
    assert ab.copy().merge(ab) == ab
    assert ca.merge(ca) is ca
    assert ca == context_of(a)


@given(dot_sets, st.sampled_from(REPLICAS))
def test_next_dot_is_fresh_and_recorded(dots: set[Dot], replica: str) -> None:
    ctx = context_of(dots)
    d = ctx.next_dot(replica)
    assert d == (replica, context_of(dots).vv[replica] + 1)
    assert d not in dots
    assert ctx_dots(ctx) == dots | {d}


@given(dot_sets)
def test_context_dict_round_trip(dots: set[Dot]) -> None:
    ctx = context_of(dots)
    d = ctx.to_dict()
    assert d["cloud"] == sorted([r, c] for r, c in ctx.cloud)
    assert CausalContext.from_dict(d) == ctx


def test_context_from_dict_compacts_input() -> None:
    ctx = CausalContext.from_dict({"vv": {"a": 2}, "cloud": [["a", 1], ["a", 3], ["b", 2]]})
    assert ctx.vv == VersionVector({"a": 3})
    assert ctx.cloud == frozenset({("b", 2)})
    assert CausalContext(VersionVector({"a": 3}), [("b", 2)]) == ctx


@pytest.mark.parametrize(
    "bad",
    [
        None,
        {"vv": {}},
        {"vv": {}, "cloud": [], "x": 1},
        {"vv": [], "cloud": []},
        {"vv": {"a": -1}, "cloud": []},
        {"vv": {}, "cloud": {}},
        {"vv": {}, "cloud": [["a", 0]]},
        {"vv": {}, "cloud": [["a", True]]},
        {"vv": {}, "cloud": [["a"]]},
        {"vv": {}, "cloud": [[1, 1]]},
        {"vv": {}, "cloud": ["a1"]},
    ],
)
def test_context_from_dict_rejects(bad: object) -> None:
    with pytest.raises(ValueError):
        CausalContext.from_dict(bad)


def test_context_add_rejects_bad_dots() -> None:
    ctx = CausalContext()
    for bad in [("a", 0), ("a", -2), (1, 1), ("a",), ("a", 1.0)]:
        with pytest.raises(ValueError):
            ctx.add(bad)  # type: ignore[arg-type]
    assert ctx == CausalContext()


# -- ORSet histories -------------------------------------------------------------------

# ("add", replica, element) | ("rm", replica, element) | ("sync", to, from)
# | ("recv", to, delta index)
ops = st.lists(
    st.one_of(
        st.tuples(st.just("add"), st.integers(0, 2), st.sampled_from(ELEMENTS)),
        st.tuples(st.just("rm"), st.integers(0, 2), st.sampled_from(ELEMENTS)),
        st.tuples(st.just("sync"), st.integers(0, 2), st.integers(0, 2)),
        st.tuples(st.just("recv"), st.integers(0, 2), st.integers(0, 10_000)),
    ),
    max_size=30,
)


@dataclass
class History:
    replicas: list[ORSet]
    deltas: list[ORSet] = field(default_factory=list)
    added: dict[Dot, str] = field(default_factory=dict)  # every add's dot -> element
    killed: set[Dot] = field(default_factory=set)  # dots some remove/re-add observed


def run(history: list[tuple[str, int, object]]) -> History:
    """Play ``history`` on three replicas; every mutation's delta is checked and kept."""
    h = History([ORSet() for _ in REPLICAS])
    for kind, i, arg in history:
        replica = h.replicas[i]
        if kind in ("add", "rm"):
            assert isinstance(arg, str)
            before = replica.copy()
            if kind == "add":
                delta = replica.add(REPLICAS[i], arg)
                (new_dot,) = delta.dots(arg)
                assert new_dot not in h.added  # dots are unique across the mesh
                h.added[new_dot] = arg
                assert replica.dots(arg) == {new_dot}
                assert ctx_dots(delta.context) == before.dots(arg) | {new_dot}
            else:
                delta = replica.remove(arg)
                assert arg not in replica
                assert delta.elements() == frozenset()
                assert ctx_dots(delta.context) == before.dots(arg)
                assert delta.is_empty_delta() == (arg not in before)
            h.killed |= ctx_dots(delta.context) - entry_dots(delta)
            assert before.merge(delta) == replica  # mutator == join with its delta
            h.deltas.append(delta)
        elif kind == "sync":
            assert isinstance(arg, int)
            replica.merge(h.replicas[arg])
        elif h.deltas:
            assert isinstance(arg, int)
            replica.merge(h.deltas[arg % len(h.deltas)])
    return h


def join_all(sets: list[ORSet]) -> ORSet:
    out = ORSet()
    for s in sets:
        out.merge(s)
    return out


def check_invariants(s: ORSet) -> None:
    seen = ctx_dots(s.context)
    owners: dict[Dot, str] = {}
    for e in s:
        assert s.dots(e), "no element without dots"
        for d in s.dots(e):
            assert d in seen, "entry dots are in the context"
            assert owners.setdefault(d, e) == e, "a dot has one element"
    assert len(s) == len(s.elements())


@settings(max_examples=200)
@given(ops)
def test_merged_state_matches_add_wins_oracle(history: list[tuple[str, int, object]]) -> None:
    """After everything is merged, exactly the adds nobody observed-removed survive."""
    h = run(history)
    merged = join_all(h.replicas)
    live = {d: e for d, e in h.added.items() if d not in h.killed}
    assert entry_dots(merged) == set(live)
    for d, e in live.items():
        assert d in merged.dots(e)
    assert merged.elements() == frozenset(live.values())
    assert ctx_dots(merged.context) == set(h.added)  # seen = every add, nothing else
    for s in [*h.replicas, *h.deltas, merged]:
        check_invariants(s)


@given(ops)
def test_merge_laws(history: list[tuple[str, int, object]]) -> None:
    a, b, c = run(history).replicas
    b_before = b.copy()
    ab = a.copy().merge(b)
    assert b == b_before  # merge leaves its argument alone
    assert ab == b.copy().merge(a)  # commutative
    assert ab.copy().merge(c) == a.copy().merge(b.copy().merge(c))  # associative
    assert ab.copy().merge(ab) == ab  # idempotent
    assert ab.copy().merge(a) == ab
    m = a.copy()
    assert m.merge(m) is m
    assert m == a
    check_invariants(ab)


@settings(max_examples=200)
@given(ops, st.data())
def test_deltas_in_any_order_with_duplicates_converge(
    history: list[tuple[str, int, object]], data: st.DataObject
) -> None:
    h = run(history)
    full = join_all(h.replicas)
    n = len(h.deltas)
    extra = data.draw(st.lists(st.integers(0, max(n - 1, 0)), max_size=n)) if n else []
    order = data.draw(st.permutations(list(range(n)) + extra))
    fresh = ORSet()
    for k in order:
        fresh.merge(h.deltas[k])
        check_invariants(fresh)
    assert fresh == full
    assert join_all(h.deltas) == full  # plain sequential application
    # Deltas also join into delta groups (what a sender batches) with the same result.
    group_a, group_b = join_all([h.deltas[k] for k in order[::2]]), ORSet()
    for k in order[1::2]:
        group_b.merge(h.deltas[k])
    assert ORSet().merge(group_b).merge(group_a) == full


@given(ops, st.integers(0, 2), st.integers(0, 2), st.sampled_from(ELEMENTS), st.booleans())
def test_concurrent_add_and_remove_add_wins(
    history: list[tuple[str, int, object]], i: int, j: int, element: str, seen_first: bool
) -> None:
    h = run(history)
    if seen_first:  # both sides hold the element before the concurrent ops
        h.replicas[i].add(REPLICAS[i], element)
    everything = join_all(h.replicas)
    for r in h.replicas:
        r.merge(everything)
    remover, adder = h.replicas[i], h.replicas[j].copy() if i == j else h.replicas[j]
    removal = remover.remove(element)  # concurrently ...
    addition = adder.add(REPLICAS[j], element)  # ... with this add
    if seen_first:
        assert not removal.is_empty_delta()
    remover.merge(addition)
    adder.merge(removal)
    assert element in remover
    assert element in adder
    assert remover.dots(element) == addition.dots(element)
    assert remover == adder


@given(ops, st.integers(0, 2), st.integers(0, 2), st.sampled_from(ELEMENTS), st.data())
def test_remove_after_observing_the_add_removes_everywhere(
    history: list[tuple[str, int, object]],
    adder_i: int,
    remover_i: int,
    element: str,
    data: st.DataObject,
) -> None:
    h = run(history)
    h.deltas.append(h.replicas[adder_i].add(REPLICAS[adder_i], element))
    everything = join_all(h.replicas)
    for r in h.replicas:
        r.merge(everything)
    removal = h.replicas[remover_i].remove(element)
    assert not removal.is_empty_delta()
    for r in h.replicas:
        r.merge(removal)
        assert element not in r
    # Late and duplicated deltas, even the add itself, do not bring it back; nor does
    # a fresh replica that hears of the removal before the add.
    late = ORSet().merge(removal)
    order = data.draw(st.permutations(range(len(h.deltas))))
    for k in order:
        late.merge(h.deltas[k])
        for r in h.replicas:
            r.merge(h.deltas[k])
    for r in [*h.replicas, late]:
        assert element not in r
    assert all(r == late for r in h.replicas)


def test_add_wins_example() -> None:
    a, b = ORSet(), ORSet()
    b.merge(a.add("a", "res-1"))
    rm = a.remove("res-1")
    add = b.add("b", "res-1")
    a.merge(add)
    b.merge(rm)
    assert "res-1" in a
    assert "res-1" in b
    assert a == b
    assert a.dots("res-1") == frozenset({("b", 1)})
    assert a.remove("absent").is_empty_delta()
    assert len(a) == 1
    assert list(a) == ["res-1"]
    assert 42 not in a


# -- wire form -------------------------------------------------------------------------


@given(ops)
def test_dict_round_trip(history: list[tuple[str, int, object]]) -> None:
    h = run(history)
    for s in [*h.replicas, *h.deltas]:
        d = s.to_dict()
        back = ORSet.from_dict(d)
        assert back == s
        assert back.to_dict() == d
        check_invariants(back)
        # The rebuilt set keeps working like the original.
        assert back.copy().merge(h.replicas[0]) == s.copy().merge(h.replicas[0])


def test_to_dict_is_deterministic() -> None:
    a = ORSet()
    a.add("r2", "z")
    a.add("r1", "a")
    a.add("r1", "z")
    b = ORSet().merge(a)
    assert a.to_dict() == b.to_dict()
    entries = a.to_dict()["e"]
    assert isinstance(entries, dict)
    assert list(entries) == ["a", "z"]
    assert a.to_dict() == {
        "e": {"a": [["r1", 1]], "z": [["r1", 2]]},
        "c": {"vv": {"r1": 2, "r2": 1}, "cloud": []},
    }


CTX = {"vv": {"a": 2}, "cloud": [["b", 3]]}


@pytest.mark.parametrize(
    "bad",
    [
        None,
        [],
        {"e": {}},
        {"e": {}, "c": CTX, "x": 0},
        {"e": [], "c": CTX},
        {"e": {"x": [["a", 1]]}, "c": {"vv": {"a": -1}, "cloud": []}},
        {"e": {1: [["a", 1]]}, "c": CTX},
        {"e": {"x": []}, "c": CTX},
        {"e": {"x": ["a", 1]}, "c": CTX},
        {"e": {"x": [["a", 0]]}, "c": CTX},
        {"e": {"x": [["a", True]]}, "c": CTX},
        {"e": {"x": [["a", 1, 2]]}, "c": CTX},
        {"e": {"x": [["a", 3]]}, "c": CTX},  # not covered by the context
        {"e": {"x": [["b", 2]]}, "c": CTX},  # not covered by the context
        {"e": {"x": [["a", 1]], "y": [["a", 1]]}, "c": CTX},  # one dot, two elements
    ],
)
def test_from_dict_rejects(bad: object) -> None:
    with pytest.raises(ValueError):
        ORSet.from_dict(bad)


def test_from_dict_accepts_a_valid_crafted_state() -> None:
    s = ORSet.from_dict({"e": {"x": [["a", 1], ["b", 3]], "y": [["a", 2]]}, "c": CTX})
    assert s.elements() == frozenset({"x", "y"})
    assert s.dots("x") == frozenset({("a", 1), ("b", 3)})
    s.remove("x")
    assert s.elements() == frozenset({"y"})


def test_mutators_reject_non_str() -> None:
    s = ORSet()
    with pytest.raises(TypeError):
        s.add("r0", 5)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        s.add(5, "x")  # type: ignore[arg-type]
    assert s == ORSet()
    assert s.is_empty_delta()

"""Laws and edge cases of VersionVector and HLC (mesh.core.crdt)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mesh.core.crdt import HLC, VersionVector, pack_hlc, unpack_hlc
from mesh.core.crdt.hlc import MAX_COUNTER, MAX_TS

ORIGINS = ("a", "b", "c", "d")

# -- VersionVector ---------------------------------------------------------------------


@st.composite
def vvs(draw: st.DrawFn) -> VersionVector:
    """A vector built by a real history of advance/set calls."""
    vv = VersionVector()
    steps = draw(
        st.lists(st.tuples(st.sampled_from(ORIGINS), st.booleans(), st.integers(0, 6)), max_size=12)
    )
    for origin, step_by_one, jump in steps:
        if step_by_one:
            vv.advance(origin, vv.get(origin) + 1)
        else:
            vv.set(origin, vv.get(origin) + jump)
    return vv


@given(vvs(), vvs())
def test_vv_merge_commutative(a: VersionVector, b: VersionVector) -> None:
    assert a.copy().merge(b) == b.copy().merge(a)


@given(vvs(), vvs(), vvs())
def test_vv_merge_associative(a: VersionVector, b: VersionVector, c: VersionVector) -> None:
    assert a.copy().merge(b).merge(c) == a.copy().merge(b.copy().merge(c))


@given(vvs())
def test_vv_merge_idempotent(a: VersionVector) -> None:
    m = a.copy()
    assert m.merge(a) is m
    assert m == a
    assert m.merge(m) == a


@given(vvs(), vvs())
def test_vv_merge_is_pointwise_max(a: VersionVector, b: VersionVector) -> None:
    b_before = b.copy()
    m = a.copy().merge(b)
    assert b == b_before  # the argument is not touched
    for origin in ORIGINS:
        assert m[origin] == max(a.get(origin), b.get(origin))
    assert m.total() == sum(seq for _, seq in m.items())
    assert m.dominates(a)
    assert m.dominates(b)


@given(vvs(), vvs())
def test_vv_dominates_iff_merge_changes_nothing(a: VersionVector, b: VersionVector) -> None:
    assert a.dominates(b) == (a.copy().merge(b) == a)
    assert a.dominates(a)


@given(vvs(), vvs())
def test_vv_missing_from(a: VersionVector, b: VersionVector) -> None:
    missing = a.missing_from(b)
    for origin in ORIGINS:
        if b[origin] > a[origin]:
            assert missing[origin] == (a[origin] + 1, b[origin])
        else:
            assert origin not in missing
    assert (missing == {}) == a.dominates(b)
    # Fetching exactly the missing ranges, one seq at a time, catches a up with b.
    for origin, (first, last) in missing.items():
        for seq in range(first, last + 1):
            a.advance(origin, seq)
    assert a.dominates(b)
    assert a.missing_from(b) == {}
    assert a.missing_from(a) == {}


def test_vv_missing_from_edges() -> None:
    empty = VersionVector()
    v = VersionVector({"a": 3, "b": 1})
    assert empty.missing_from(v) == {"a": (1, 3), "b": (1, 1)}
    assert v.missing_from(empty) == {}
    assert v.missing_from(VersionVector({"a": 2, "c": 4})) == {"c": (1, 4)}
    assert v.missing_from(VersionVector({"a": 5})) == {"a": (4, 5)}


def test_vv_advance_edges() -> None:
    v = VersionVector()
    v.advance("a", 1)
    v.advance("a", 2)
    assert v["a"] == v.get("a") == 2
    for bad in (2, 1, 4, 0, -1):
        with pytest.raises(ValueError, match="next seq is 3"):
            v.advance("a", bad)
    with pytest.raises(ValueError):
        v.advance("b", True)  # a bool is not a seq, even though True == 1
    with pytest.raises(ValueError):
        v.advance("b", 1.0)  # type: ignore[arg-type]
    assert v == VersionVector({"a": 2})
    assert v.total() == 2


def test_vv_set_edges() -> None:
    v = VersionVector({"a": 5})
    v.set("a", 5)  # equal: no-op
    v.set("a", 9)
    assert v["a"] == 9
    with pytest.raises(ValueError, match="cannot lower"):
        v.set("a", 8)
    with pytest.raises(ValueError):
        v.set("b", -1)
    v.set("b", 0)  # zero is the implicit value of an absent origin
    assert "b" not in list(v)
    assert len(v) == 1
    assert v.total() == 9
    assert v == VersionVector({"a": 9, "z": 0})


@given(vvs())
def test_vv_dict_round_trip(a: VersionVector) -> None:
    d = a.to_dict()
    assert VersionVector.from_dict(d) == a
    assert sorted(a) == sorted(d)
    assert len(a) == len(d)
    assert a.total() == sum(d.values())
    d["zz"] = 1  # to_dict returns a copy
    assert "zz" not in a.to_dict()


@pytest.mark.parametrize(
    "bad",
    [None, [], [["a", 1]], {1: 2}, {"a": -1}, {"a": True}, {"a": 1.5}, {"a": "1"}, {"a": None}],
)
def test_vv_from_dict_rejects(bad: object) -> None:
    with pytest.raises(ValueError):
        VersionVector.from_dict(bad)


# -- HLC -------------------------------------------------------------------------------

# Walls drawn from a narrow band so that equal walls, stalls and backward jumps are common.
walls = st.integers(1_000, 1_020)
counters = st.one_of(st.integers(0, 3), st.integers(MAX_COUNTER - 3, MAX_COUNTER))
hlc_ops = st.lists(
    st.one_of(
        st.tuples(st.just("now"), walls, st.just(0), st.just(0)),
        st.tuples(st.just("update"), walls, walls, counters),
    ),
    max_size=40,
)


def _carry(wall: int, counter: int) -> tuple[int, int]:
    return (wall + 1, 0) if counter > MAX_COUNTER else (wall, counter)


def _paper_send(lc: tuple[int, int], pt: int) -> tuple[int, int]:
    """Send/local event, as written in Kulkarni et al. 2014 (Fig. 5), plus the carry."""
    l_old, c_old = lc
    wall = max(l_old, pt)
    return _carry(wall, c_old + 1 if wall == l_old else 0)


def _paper_recv(lc: tuple[int, int], msg: tuple[int, int], pt: int) -> tuple[int, int]:
    """Receive event, as written in the paper, plus the carry."""
    (l_old, c_old), (l_m, c_m) = lc, msg
    wall = max(l_old, l_m, pt)
    if wall == l_old == l_m:
        counter = max(c_old, c_m) + 1
    elif wall == l_old:
        counter = c_old + 1
    elif wall == l_m:
        counter = c_m + 1
    else:
        counter = 0
    return _carry(wall, counter)


@settings(max_examples=300)
@given(st.integers(0, 1_020), st.integers(0, MAX_COUNTER), hlc_ops)
def test_hlc_monotonic_and_matches_paper(
    start_wall: int, start_counter: int, ops: list[tuple[str, int, int, int]]
) -> None:
    clock = HLC(pack_hlc(start_wall, start_counter))
    model = (start_wall, start_counter)
    highest = clock.last
    for kind, wall, remote_wall, remote_counter in ops:
        if kind == "now":
            ts = clock.now(wall)
            model = _paper_send(model, wall)
        else:
            remote = pack_hlc(remote_wall, remote_counter)
            ts = clock.update(remote, wall)
            model = _paper_recv(model, (remote_wall, remote_counter), wall)
            assert ts > remote
            highest = max(highest, remote)
        assert ts > highest  # strictly after everything returned or observed
        assert ts >= pack_hlc(wall, 0)  # never behind the wall clock
        assert unpack_hlc(ts) == model
        assert clock.last == ts
        highest = ts


@given(st.lists(st.integers(0, 10_000), min_size=1, max_size=30))
def test_hlc_tracks_wall_clock_when_ahead(wall_seq: list[int]) -> None:
    clock = HLC()
    for wall in wall_seq:
        before = clock.last
        ts = clock.now(wall)
        if pack_hlc(wall, 0) > before:
            assert ts == pack_hlc(wall, 0)
        else:
            assert ts == before + 1


def test_hlc_wall_clock_goes_backwards() -> None:
    clock = HLC()
    t1 = clock.now(100)
    t2 = clock.now(50)
    t3 = clock.now(50)
    assert t1 < t2 < t3
    assert unpack_hlc(t3) == (100, 2)
    assert clock.now(101) == pack_hlc(101, 0)


@given(st.integers(0, 10_000), st.integers(0, 10_000), st.integers(0, 5_000), walls)
def test_hlc_skew_bound(start: int, remote_wall: int, skew: int, wall: int) -> None:
    clock = HLC(pack_hlc(start, 7))
    remote = pack_hlc(remote_wall, 3)
    if remote_wall > wall + skew:
        with pytest.raises(ValueError, match="too far ahead"):
            clock.update(remote, wall, max_skew_ms=skew)
        assert clock.last == pack_hlc(start, 7)
    else:
        assert clock.update(remote, wall, max_skew_ms=skew) > remote


def test_hlc_skew_bound_edges() -> None:
    clock = HLC()
    assert clock.update(pack_hlc(1_500, 0), 1_000, max_skew_ms=500) == pack_hlc(1_500, 1)
    with pytest.raises(ValueError):
        clock.update(pack_hlc(2_001, 0), 1_000, max_skew_ms=1_000)
    with pytest.raises(ValueError):
        clock.update(0, 1_000, max_skew_ms=-1)
    assert clock.last == pack_hlc(1_500, 1)
    # Without a bound a remote far ahead is accepted (the caller chose not to bound it).
    assert clock.update(pack_hlc(9_999, 0), 1_000) == pack_hlc(9_999, 1)


def test_hlc_counter_overflow_carries_into_wall() -> None:
    clock = HLC(pack_hlc(5, MAX_COUNTER))
    assert clock.now(5) == pack_hlc(6, 0)
    assert clock.now(5) == pack_hlc(6, 1)
    remote = pack_hlc(7, MAX_COUNTER)
    ts = clock.update(remote, 3)
    assert ts == pack_hlc(8, 0)
    assert ts > remote


def test_hlc_many_events_in_one_ms_stay_monotonic() -> None:
    clock = HLC()
    previous = -1
    for _ in range(MAX_COUNTER + 10):
        ts = clock.now(42)
        assert ts > previous
        previous = ts
    assert unpack_hlc(previous) == (43, 8)  # (42, 0..0xFFFF) then (43, 0..8)


@given(st.integers(0, (1 << 47) - 1), st.integers(0, MAX_COUNTER))
def test_pack_unpack_round_trip(wall: int, counter: int) -> None:
    ts = pack_hlc(wall, counter)
    assert 0 <= ts <= MAX_TS
    assert unpack_hlc(ts) == (wall, counter)


@given(
    st.integers(0, 1 << 20),
    st.integers(0, MAX_COUNTER),
    st.integers(0, 1 << 20),
    st.integers(0, MAX_COUNTER),
)
def test_pack_preserves_order(w1: int, c1: int, w2: int, c2: int) -> None:
    assert (pack_hlc(w1, c1) < pack_hlc(w2, c2)) == ((w1, c1) < (w2, c2))


@pytest.mark.parametrize(
    ("wall", "counter"),
    [(-1, 0), (0, -1), (0, MAX_COUNTER + 1), (1 << 47, 0), (True, 0), (0, 1.0), (1.5, 0)],
)
def test_pack_rejects(wall: object, counter: object) -> None:
    with pytest.raises(ValueError):
        pack_hlc(wall, counter)  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", [-1, MAX_TS + 1, True, "1", None])
def test_hlc_rejects_bad_timestamps(bad: object) -> None:
    with pytest.raises(ValueError):
        unpack_hlc(bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        HLC(bad)  # type: ignore[arg-type]
    clock = HLC(pack_hlc(10, 0))
    with pytest.raises(ValueError):
        clock.update(bad, 10)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        clock.now(-1)
    assert clock.last == pack_hlc(10, 0)


def test_hlc_exhaustion_is_an_error_not_a_wrap() -> None:
    clock = HLC(MAX_TS)
    with pytest.raises(ValueError, match="exhausted"):
        clock.now(0)
    assert clock.last == MAX_TS

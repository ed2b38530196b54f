"""Clock floors in summaries (issue 12): an idle member no longer holds the checkpoint
cut back. A summary carries ``cf``, the sender's promise that it signs nothing more with
an HLC up to it; once the frontier holds the sender's own seq of that summary, the cut
may follow the promise instead of the member's last envelope."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mesh import config
from mesh.core.checkpoint import Frontier
from mesh.core.envelope import decode
from mesh.core.replica import Replica
from mesh.sim import World
from tests.unit.test_retention import (
    ALL,
    AWAY,
    EDGE,
    KEYS,
    NOW,
    REGS,
    _history,
    _replay,
    _Store,
    deliver_shuffled,
)

IDLE = "r2"
MARGIN = config.CLOCK_FLOOR_MARGIN_MS


def _n(node: str) -> Replica:
    return Replica("s1", node, "edge" if node == EDGE else "register", KEYS[node],
                   checkpointer=EDGE)


class _Trio:
    """The edge (checkpointer) and r1 sell and receive; r2 sold once and then stays
    idle, but it is live: it receives everything and reports its vector."""

    def __init__(self, *, floors: bool) -> None:
        self.floors = floors
        self.nodes = {n: _n(n) for n in (EDGE, "r1", IDLE)}
        self.log: dict[str, list[bytes]] = {n: [] for n in self.nodes}
        self.frontier = Frontier()
        self.t = NOW
        self.i = 0
        self.write(EDGE, "rx", 50)
        self.sync()
        self.write(IDLE, "sell", 1)
        self.sync()

    def write(self, node: str, kind: str, qty: int) -> None:
        r, self.i = self.nodes[node], self.i + 1
        self.t += 1_000
        cmd = r.receive if kind == "rx" else r.sell
        res = cmd("A", qty, txn=f"{node}-{self.i}", now_ms=self.t)
        assert res.envelope is not None
        self.log[node].append(res.envelope.raw)

    def sync(self) -> None:
        for r in self.nodes.values():
            for frm, raws in self.log.items():
                for raw in raws[r.vv.get(frm):]:
                    r.apply(decode(raw), self.t)

    def checkpoint(self) -> None:
        self.t += 1_000
        for n, r in self.nodes.items():  # each one's summary, as the sync core sends it
            floor = r.clock_floor(self.t) if self.floors else None
            self.frontier.observe(n, r.vv, self.t, floor)
        vv, live = self.frontier.stable(list(self.nodes), self.t)
        self.i += 1
        res = self.nodes[EDGE].propose_checkpoint(
            vv, live, txn=f"ck-{self.i}", now_ms=self.t,
            floors=self.frontier.floors(live) if self.floors else None)
        if res is not None and res.envelope is not None:
            self.log[EDGE].append(res.envelope.raw)
        self.sync()

    def run(self, rounds: int) -> None:
        for k in range(rounds):
            self.write("r1", "sell", 1)
            self.write(EDGE, "rx", 1)
            self.sync()
            if k % 5 == 4:
                self.checkpoint()


def test_an_idle_member_no_longer_holds_the_cut_back() -> None:
    held, folds = {}, {}
    for floors in (False, True):
        trio = _Trio(floors=floors)
        trio.run(100)
        edge = trio.nodes[EDGE]
        folds[floors], held[floors] = edge.folds, edge.held_history()
        assert trio.nodes[IDLE].vv.get(IDLE) == 1  # it stayed idle throughout
        if floors:  # the last cut follows the idle till's clock, not its one sale
            last = edge.last_folded
            assert last is not None and (last.cut >> 16) > trio.t - 30_000
            assert last.cut > decode(trio.log[IDLE][0]).hlc
    # without the floor the idle till's only sale is the oldest bound for ever: one
    # checkpoint folds, then none moves; with it the fold follows the store
    assert folds[False] <= 1 and folds[True] >= 15, folds
    assert held[True] * 3 < held[False], held


def test_the_idle_members_next_envelope_is_not_late_and_every_replica_agrees() -> None:
    trio = _Trio(floors=True)
    trio.run(40)
    edge = trio.nodes[EDGE]
    assert edge.folds >= 5
    cut = edge.last_folded
    assert cut is not None
    # r2 wakes up and sells the last units, racing r1
    trio.write(IDLE, "sell", 100)
    trio.write("r1", "sell", 1)
    env = decode(trio.log[IDLE][-1])
    assert env.hlc > max(c.cut for c in [*edge.checkpoints(), cut])
    assert all(c.cut < env.hlc for c in trio.nodes[IDLE].checkpoints())
    trio.sync()
    trio.checkpoint()
    # not late: its order key is its own stamp at every replica
    for r in trio.nodes.values():
        assert r._key(env.hlc, IDLE, env.seq) == 2 * env.hlc
    raws = [raw for n in trio.log for raw in trio.log[n]]
    ref = _replay_trio(raws, 0, fold=False)
    want = [e.to_dict() for e in ref.exceptions()]
    assert (IDLE, env.seq) in [(e["origin"], e["seq"]) for e in want]
    hashes = None
    for order in (1, 2, 3):
        r = _replay_trio(raws, order, fold=True)
        assert [e.to_dict() for e in r.exceptions()] == want
        assert r.state_digest() == ref.state_digest() and r.ck_mismatches == 0
        hashes = hashes or r.checkpoint_hashes
        assert r.checkpoint_hashes == hashes
    for r in trio.nodes.values():
        assert [e.to_dict() for e in r.exceptions()] == want and r.ck_mismatches == 0


def _replay_trio(raws: list[bytes], order: int, *, fold: bool) -> Replica:
    r = _n(AWAY)  # an observer holding every envelope, in another order
    r.fold_enabled = fold
    return deliver_shuffled(r, raws, order)


def test_a_member_lying_with_a_huge_floor_only_makes_its_own_envelopes_late() -> None:
    """r2 promises a floor an hour ahead, then signs a sale stamped below the cut (it
    controls its own stamps). Only that sale is late; it is judged the same everywhere,
    and the honest members' envelopes are never late: their own bounds cap the cut."""
    from mesh.core.crdt import HLC

    trio = _Trio(floors=True)
    liar = trio.nodes[IDLE]
    real = liar.clock_floor
    liar.clock_floor = lambda now: real(now) + (3_600_000 << 16)  # type: ignore[method-assign]
    trio.run(40)
    edge = trio.nodes[EDGE]
    assert edge.folds >= 5
    cut = edge.checkpoints()[-1].cut
    liar.hlc = HLC(cut - (60_000 << 16))  # its stamps go back behind the cut
    res = liar.sell("A", 100, txn="lie", now_ms=(cut >> 16) - 60_000)
    assert res.envelope is not None
    trio.log[IDLE].append(res.envelope.raw)
    trio.write("r1", "sell", 1)
    trio.sync()
    lie, honest = decode(trio.log[IDLE][-1]), decode(trio.log["r1"][-1])
    for r in trio.nodes.values():
        newest = r.checkpoints()[-1]
        assert not newest.holds(IDLE, lie.seq)
        assert r._key(lie.hlc, IDLE, lie.seq) == 2 * newest.cut + 1  # late
        assert r._key(honest.hlc, "r1", honest.seq) == 2 * honest.hlc  # not late
    trio.checkpoint()
    raws = [raw for n in trio.log for raw in trio.log[n]]
    ref = _replay_trio(raws, 0, fold=False)
    want = [e.to_dict() for e in ref.exceptions()]
    assert (IDLE, lie.seq) in [(e["origin"], e["seq"]) for e in want]  # judged last
    for order in (1, 2):
        r = _replay_trio(raws, order, fold=True)
        assert r.state_digest() == ref.state_digest()
        assert [e.to_dict() for e in r.exceptions()] == want
        assert r.ck_mismatches == 0
    for r in trio.nodes.values():
        assert [e.to_dict() for e in r.exceptions()] == want


def test_summaries_without_a_floor_keep_the_old_bound() -> None:
    f = Frontier()
    f.observe("a", {"a": 3}, 0)
    f.observe("b", {"a": 3, "b": 2}, 0, floor=500)
    f.observe("b", {"a": 3, "b": 2}, 1, floor=400)  # an older summary, reordered
    f.observe("b", {"a": 3, "b": 1}, 2, floor=900)  # a lower own seq: not newer
    f.observe("b", {"a": 3, "b": 2}, 3, floor=600)  # the same seq, later: replaces
    f.observe("b", {"a": 3, "b": 4}, 4, floor=700)
    assert f.floors(["a", "b", "c"]) == {"b": ((2, 600), (4, 700))}
    for i in range(20):
        f.observe("b", {"b": 5 + i}, 5, floor=800 + i)
    assert len(f.floors(["b"])["b"]) == 8
    f.retire("b")
    assert f.floors(["b"]) == {}


def test_the_floor_is_below_every_later_stamp_even_with_the_wall_clock_set_back() -> None:
    r = _n("r1")
    floor = r.clock_floor(NOW)
    assert floor == (NOW - MARGIN) << 16
    later = r.receive("A", 1, txn="t", now_ms=NOW - 60_000)  # the wall clock went back
    assert later.envelope is not None and later.envelope.hlc > floor
    # a restart (HLC rebuilt, here from nothing) keeps it while the wall clock is
    # set back by less than the margin
    fresh = _n("r1")
    again = fresh.receive("A", 1, txn="t2", now_ms=NOW - MARGIN + 1)
    assert again.envelope is not None and again.envelope.hlc > floor


def test_summaries_on_the_wire_carry_the_floor() -> None:
    w = World(3)
    w.add_node("edge", "edge")
    w.add_node("r1")
    w.connect("edge", "r1")
    w.run_until(2_000)
    floors = w.nodes["edge"].replica.frontier.floors(["r1"])
    assert "r1" in floors
    seq, floor = floors["r1"][-1]
    assert seq == 0 and 0 < (floor >> 16) <= w.nodes["r1"].clock() - MARGIN


# --- property: with floors, every replica still agrees, and members are never late ----


class _FloorStore(_Store):
    def checkpoint(self) -> None:
        edge = self.nodes[EDGE]
        members = [EDGE, *REGS] + ([] if self.away else [AWAY])
        f = getattr(self, "frontier", None)
        if f is None:
            f = self.frontier = Frontier()
        for m in members:
            f.observe(m, self.nodes[m].vv, self.t, self.nodes[m].clock_floor(self.t))
        frontier, live = f.stable(members, self.t)
        self.n += 1
        self._emit(EDGE, edge.propose_checkpoint(frontier, live, txn=f"ck-{self.n}",
                                                 now_ms=self.t, floors=f.floors(live)))


def _floor_history(seed: int, steps: int) -> _Store:
    import tests.unit.test_retention as tr

    saved = tr._Store
    tr._Store = _FloorStore  # type: ignore[misc]
    try:
        return _history(seed, steps)
    finally:
        tr._Store = saved  # type: ignore[misc]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10**6), order=st.integers(1, 10**6))
def test_with_floors_replicas_agree_and_only_the_away_node_is_late(seed: int, order: int
                                                                   ) -> None:
    store = _floor_history(seed, 160)
    raws = store.envelopes()
    ref = _replay(raws, 0, fold=False)
    r = _replay(raws, order, fold=True)
    assert r.state_digest() == ref.state_digest()
    assert [e.to_dict() for e in r.exceptions()] == [e.to_dict() for e in ref.exceptions()]
    assert r.ck_mismatches == 0 and r.folds == _replay(raws, 0, fold=True).folds
    for n in ALL:
        for frm in ALL:
            store.deliver(n, frm)
        assert store.nodes[n].state_digest() == ref.state_digest(), n
    # T_k's guarantee: an envelope of a node that was a member all along (not the one
    # that went away) outside F_k has an HLC above T_k
    cks = [(op["cut"], op["f"]) for raw in store.log[EDGE] for op in decode(raw).ops
           if op["t"] == "ck"]
    for origin in (EDGE, *REGS):
        for raw in store.log[origin]:
            env = decode(raw)
            for cut, f in cks:
                assert env.seq <= f.get(origin, 0) or env.hlc > cut, (origin, env.seq)


def test_a_bad_floor_is_malformed_and_a_summary_without_one_is_accepted() -> None:
    import orjson

    w = World(4)
    w.add_node("edge", "edge")
    w.add_node("r1")
    w.connect("edge", "r1")
    w.run_until(2_000)
    edge = w.nodes["edge"]
    core, f = edge.core, edge.replica.frontier
    kept = f.floors(["r1"])
    base = {"vv": {}, "links": ["edge"], "nc": "", "crl": -1, "rx": 10**6, "ad": 0}
    for bad in ("x", -1, 1 << 63, 1.5, True):
        core.receive(b"V" + orjson.dumps({**base, "cf": bad}), "r1", edge.clock())
    assert core.stats.get("malformed", 0) == 5 and f.floors(["r1"]) == kept
    core.receive(b"V" + orjson.dumps(base), "r1", edge.clock())  # an older peer's
    assert core.stats.get("malformed", 0) == 5 and f.floors(["r1"]) == kept

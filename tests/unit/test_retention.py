"""Bounded history (issue 12): idempotency window, bounded replica state, checkpoints."""

from __future__ import annotations

import pytest

from mesh import config
from mesh.core.identity import NodeKey
from mesh.core.replica import Replica
from mesh.errors import TxnReused

NOW = 1_700_000_000_000
WINDOW = config.IDEMPOTENCY_WINDOW_MS


def _till(node: str = "r1") -> Replica:
    r = Replica("s1", node, "register", NodeKey.generate())
    r.receive("SKU-1", 100, txn="rx-1", now_ms=NOW)
    return r


def test_replay_inside_the_window_is_a_duplicate_with_the_original_result() -> None:
    r = _till()
    first = r.sell("SKU-1", 2, txn="t-1", now_ms=NOW + 1)
    late = r.sell("SKU-1", 2, txn="t-1", now_ms=NOW + 1 + WINDOW - 1)  # just inside
    assert late.duplicate and late.envelope is None and late.seq == first.seq
    assert r.on_hand("SKU-1") == 98
    res = r.reserve("SKU-1", 1, txn="t-r", now_ms=NOW + 2, channel="web")
    again = r.reserve("SKU-1", 1, txn="t-r", now_ms=NOW + 2 + WINDOW - 1, channel="web")
    assert again.duplicate and again.reservation_id == res.reservation_id


def test_replay_past_the_window_is_a_new_command_and_keys_are_retired() -> None:
    r = _till()
    for i in range(50):
        r.sell("SKU-1", 1, txn=f"t-{i}", now_ms=NOW + i)
    assert len(r._txns) == 51
    late = r.sell("SKU-1", 1, txn="t-0", now_ms=NOW + WINDOW + 100)  # past it: retired
    assert not late.duplicate and late.envelope is not None
    assert r.on_hand("SKU-1") == 49
    assert r.txns_retired == 51  # rx-1 and t-0..t-49: only the new t-0 is remembered
    assert set(r._txns) == {"t-0"}


def test_retired_reservation_txn_still_refused_while_the_reservation_is_held() -> None:
    r = _till()
    r.reserve("SKU-1", 1, txn="t-r", now_ms=NOW, channel="web")
    with pytest.raises(TxnReused):
        r.reserve("SKU-1", 1, txn="t-r", now_ms=NOW + WINDOW + 10, channel="web")


def test_window_survives_a_snapshot() -> None:
    r = _till()
    first = r.sell("SKU-1", 1, txn="t-1", now_ms=NOW + 5)
    copy = Replica("s1", "r1", "register", r.key)
    copy.restore(r.snapshot())
    assert copy.sell("SKU-1", 1, txn="t-1", now_ms=NOW + WINDOW).seq == first.seq
    assert not copy.sell("SKU-1", 1, txn="t-1", now_ms=NOW + WINDOW + 10).duplicate


# --- checkpoints: the stable prefix folds, every replica derives the same answers -------

import random  # noqa: E402

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from mesh.core.checkpoint import Frontier  # noqa: E402
from mesh.core.crdt import VersionVector  # noqa: E402
from mesh.core.envelope import decode  # noqa: E402
from mesh.errors import CommandError  # noqa: E402

EDGE, REGS, AWAY = "e0", ("r1", "r2"), "r3"
ALL = (EDGE, *REGS, AWAY)
KEYS = {n: NodeKey.generate() for n in ALL}
SKUS = ("A", "B", "C")


def _node(n: str) -> Replica:
    return Replica("s1", n, "edge" if n == EDGE else "register", KEYS.get(n),
                   checkpointer=EDGE)


class _Store:
    """Four nodes writing concurrently; r3 goes away (past the horizon) and comes back."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.nodes = {n: _node(n) for n in ALL}
        self.log: dict[str, list[bytes]] = {n: [] for n in ALL}  # per origin, in seq order
        self.open: dict[str, list[str]] = {n: [] for n in ALL}
        self.t = NOW
        self.n = 0
        self.away = False

    def _emit(self, node: str, res: object) -> None:
        env = getattr(res, "envelope", None)
        if env is not None:
            self.log[node].append(env.raw)

    def command(self, node: str, what: int, sku: str) -> None:
        r, self.n = self.nodes[node], self.n + 1
        self.t += self.rng.randrange(1, 2_000)
        txn = f"{node}-{self.n}"
        try:
            if what == 0 or not r.knows_sku(sku):
                self._emit(node, r.receive(sku, self.rng.randrange(1, 4), txn=txn, now_ms=self.t))
            elif what == 1:
                res = r.reserve(sku, 1, txn=txn, now_ms=self.t, channel="web")
                self._emit(node, res)
                assert res.reservation_id is not None
                self.open[node].append(res.reservation_id)
            elif what == 2 and self.open[node]:
                rid = self.open[node].pop(0)
                if rid in r.reservations:
                    cmd = r.fulfil if self.n % 2 else r.release
                    self._emit(node, cmd(rid, txn=txn, now_ms=self.t))
            elif what == 3:  # another node's reservation, removed by whoever sees it
                rids = [x.id for x in r.active_reservations()]
                if rids:
                    self._emit(node, r.release(self.rng.choice(rids), txn=txn, now_ms=self.t))
            else:
                self._emit(node, r.sell(sku, self.rng.randrange(1, 3), txn=txn, now_ms=self.t))
        except CommandError:
            pass

    def deliver(self, to: str, frm: str) -> None:
        r = self.nodes[to]
        for raw in self.log[frm][r.vv.get(frm):]:
            r.apply(decode(raw), self.t)

    def checkpoint(self) -> None:
        edge = self.nodes[EDGE]
        members = [EDGE, *REGS] + ([] if self.away else [AWAY])
        f = Frontier()
        for m in members:
            f.observe(m, self.nodes[m].vv, self.t)
        frontier, live = f.stable(members, self.t)
        self.n += 1
        self._emit(EDGE, edge.propose_checkpoint(frontier, live, txn=f"ck-{self.n}",
                                                 now_ms=self.t))

    def envelopes(self) -> list[bytes]:
        return [raw for n in ALL for raw in self.log[n]]


def _history(seed: int, steps: int) -> _Store:
    rng = random.Random(seed)
    store = _Store(rng)
    for i in range(steps):
        store.away = steps // 3 <= i < 2 * steps // 3
        writers = [n for n in ALL if not (store.away and n == AWAY)]
        x = rng.random()
        if x < 0.55:
            store.command(rng.choice(ALL), rng.randrange(6),
                          rng.choice(SKUS))
        elif x < 0.9:
            to, frm = rng.choice(writers), rng.choice(writers)
            if to != frm:
                store.deliver(to, frm)
        else:
            store.checkpoint()
    return store


def _replay(raws: list[bytes], order_seed: int, *, fold: bool) -> Replica:
    r = _node("obs")
    r.fold_enabled = fold
    return deliver_shuffled(r, raws, order_seed)


def deliver_shuffled(r: Replica, raws: list[bytes], order_seed: int) -> Replica:
    """Apply ``raws`` to ``r`` in an order shuffled by ``order_seed``; an envelope
    whose chain has a gap waits for the next round."""
    todo = list(raws)
    random.Random(order_seed).shuffle(todo)
    while todo:
        later = []
        for raw in todo:
            try:
                r.apply(decode(raw), NOW)
            except Exception:
                later.append(raw)
        assert len(later) < len(todo)
        todo = later
    return r


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10**6), orders=st.lists(st.integers(0, 10**6), min_size=2,
                                                    max_size=3))
def test_every_replica_derives_the_same_exceptions_whatever_the_order(
        seed: int, orders: list[int]) -> None:
    store = _history(seed, 160)
    raws = store.envelopes()
    reference = _replay(raws, 0, fold=False)
    want = reference.state_digest()
    for order in orders:
        r = _replay(raws, order, fold=True)
        assert r.state_digest() == want
        assert [e.to_dict() for e in r.exceptions()] == [
            e.to_dict() for e in reference.exceptions()]
        assert r.active_reservations() == reference.active_reservations()
        for sku in SKUS:
            assert r.available(sku) == reference.available(sku)
    # the writers themselves folded live; once they hold everything they agree too
    for n in ALL:
        for frm in ALL:
            store.deliver(n, frm)
        assert store.nodes[n].state_digest() == want, n


def test_folding_bounds_what_a_replica_holds() -> None:
    store = _history(7, 2_000)
    raws = store.envelopes()
    folded, full = _replay(raws, 1, fold=True), _replay(raws, 1, fold=False)
    assert folded.state_digest() == full.state_digest()
    assert folded.folds > 0
    assert folded.held_history() < full.held_history() // 3, (
        folded.held_history(), full.held_history())
    assert len(folded.records) < len(full.records)


def test_late_envelopes_of_an_away_node_are_accepted_and_judged_after_the_checkpoint() -> None:
    """r3 sells the last units while away; the others checkpoint past its stamps: its
    sale is late, accepted, and loses to everything the checkpoint made final."""
    a, away, edge = _node("r1"), _node(AWAY), _node(EDGE)
    rx = a.receive("A", 1, txn="rx", now_ms=NOW)
    for r in (away, edge):
        r.apply(rx.envelope, NOW)  # type: ignore[arg-type]
    late = away.sell("A", 1, txn="away-1", now_ms=NOW + 10)  # stamped first...
    early = a.sell("A", 1, txn="a-1", now_ms=NOW + 20)  # ...than this sale
    edge.apply(early.envelope, NOW + 20)  # type: ignore[arg-type]
    f = VersionVector({"r1": 2})
    ck = edge.propose_checkpoint(f, ["r1", EDGE], txn="ck-1", now_ms=NOW + 30)
    assert ck is not None and ck.envelope is not None
    out = []
    for order in ([rx, early, ck, late], [rx, late, early, ck], [late, ck, rx, early]):
        r = _node("obs")
        pending = [c.envelope for c in order]
        while pending:
            env = pending.pop(0)
            assert env is not None
            try:
                r.apply(env, NOW + 40)
            except Exception:
                pending.append(env)
        out.append([e.to_dict() for e in r.exceptions()])
        assert r.vv.get(AWAY) == 1 and r.on_hand("A") == -1  # accepted, counted
    assert out[0] == out[1] == out[2]
    # without the checkpoint the away sale (earlier HLC) would win; with it, it is late
    assert [(e["origin"], e["seq"]) for e in out[0]] == [(AWAY, 1)]


def test_frontier_horizon_and_revocation() -> None:
    f = Frontier(horizon_ms=1_000)
    f.observe("a", {"a": 5, "b": 2}, 0)
    f.observe("b", {"a": 3, "b": 4}, 0)
    vv, members = f.stable(["a", "b", "c"], 0)
    assert members == ["a", "b", "c"] and vv.total() == 0  # c never heard: holds back
    f.observe("c", {"a": 9, "b": 9}, 10)
    assert f.stable(["a", "b", "c"], 10)[0].to_dict() == {"a": 3, "b": 2}
    f.observe("a", {"a": 6, "b": 4}, 1_500)
    f.observe("c", {"a": 9, "b": 9}, 1_500)
    vv, members = f.stable(["a", "b", "c"], 1_500)  # b silent past the horizon
    assert members == ["a", "c"] and vv.to_dict() == {"a": 6, "b": 4}
    f.retire("c")  # revoked: out at once
    assert f.stable(["a", "b", "c"], 1_500)[1] == ["a"]


def test_binary_snapshot_restores_the_same_state_and_holds_no_base64() -> None:
    store = _history(11, 900)
    raws = [raw for n in ALL for raw in store.log[n][: len(store.log[n]) * 2 // 3]]
    r = _replay(raws, 2, fold=True)
    assert r.folds > 0 and r.exceptions()
    blob = r.snapshot()
    import orjson

    from mesh.core.replica import SNAPSHOT_MAGIC
    assert blob.startswith(SNAPSHOT_MAGIC)
    n = int.from_bytes(blob[len(SNAPSHOT_MAGIC):len(SNAPSHOT_MAGIC) + 4], "little")
    head = orjson.loads(blob[len(SNAPSHOT_MAGIC) + 4:len(SNAPSHOT_MAGIC) + 4 + n])
    assert "hashes" in head and all(isinstance(v[1], int) for v in head["hashes"].values())
    copy = _node("obs")
    copy.restore(blob)
    assert copy.state_digest() == r.state_digest()
    assert copy.snapshot() == blob
    # it goes on exactly as the original: the rest of the history, and new checkpoints
    more = store.envelopes()
    for x in (r, copy):
        for raw in more:
            env = decode(raw)
            if env.seq > x.vv.get(env.origin):
                x.apply(env, NOW)
    assert copy.state_digest() == r.state_digest()


def test_durable_restart_from_a_binary_snapshot(tmp_path: object) -> None:
    from pathlib import Path

    from mesh.durable import DurableReplica
    from mesh.store.datadir import init_store
    d = Path(str(tmp_path)) / "n"
    init_store(d, "s1", now_ms=NOW, node_id="edge")
    dr = DurableReplica.open(d, snapshot_every=10)
    for i in range(30):
        sku, txn, at = f"S{i % 4}", f"t{i}", NOW + i
        dr.execute(lambda r, s=sku, t=txn, a=at: r.receive(s, 1, txn=t, now_ms=a))[1].result()
    assert dr.maybe_snapshot()
    want = dr.replica.state_digest()
    dr.close()
    again = DurableReplica.open(d)
    assert again.rebuild_stats.snapshot_upto > 0 and again.replica.state_digest() == want
    again.close()


# --- checkpoint hashes (mesh.sim.checker invariant 7) and the store's checkpointer -------


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10**6), order=st.integers(1, 10**6))
def test_every_replica_folds_each_checkpoint_to_the_same_hash(seed: int, order: int) -> None:
    raws = _history(seed, 160).envelopes()
    a, b = _replay(raws, 0, fold=True), _replay(raws, order, fold=True)
    assert a.folds == b.folds
    assert a.checkpoint_hashes == b.checkpoint_hashes
    if a.folds:
        assert a.checkpoint_hashes


def test_checkpoint_hash_covers_the_folded_state() -> None:
    for seed in range(40):
        store = _history(seed, 160)
        edge = store.nodes[EDGE]
        if edge.folds and edge.checkpoints():
            break
    else:
        pytest.fail("no history folded a checkpoint")
    ck = edge.checkpoints()[0]
    before = edge.checkpoint_hash(ck)
    ev = next(e for e in edge._events.values() if e.base_oh)
    ev.base_oh += 1  # another folded total: another hash
    assert edge.checkpoint_hash(ck) != before


def test_the_trust_store_names_the_checkpointer_and_keeps_it() -> None:
    from mesh.core.identity import TrustStore

    t = TrustStore("s1", KEYS[EDGE].public_key, checkpointer=EDGE)
    again = TrustStore.from_dict(t.to_dict())
    assert again.checkpointer == EDGE
    plain = TrustStore("s1", KEYS[EDGE].public_key).to_dict()
    assert "checkpointer" not in plain  # files without one read as before
    assert TrustStore.from_dict(plain).checkpointer is None


# --- the ck op carries the proposer's fold hash and the chain heads it covers -----------


def _folded_history() -> _Store:
    for seed in range(40):
        store = _history(seed, 160)
        if store.nodes[EDGE].folds >= 2:
            return store
    pytest.fail("no history folded two checkpoints")


def _ck_ops(store: _Store) -> list[dict[str, object]]:
    return [op for raw in store.log[EDGE] for op in decode(raw).ops if op["t"] == "ck"]


def test_ck_op_names_its_fold_hash_and_the_head_of_every_chain() -> None:
    store = _folded_history()
    edge = store.nodes[EDGE]
    ref = _replay(store.envelopes(), 0, fold=False)  # keeps every hash
    for op in _ck_ops(store):
        f, heads = op["f"], op["h"]
        assert isinstance(f, dict) and isinstance(heads, dict) and set(heads) == set(f)
        for origin, seq in f.items():
            held = ref.hash_at(origin, seq)
            assert held is not None and heads[origin] == held.hex()
    # the proposer's dry fold is the fold it then did itself
    assert edge.ck_mismatches == 0
    assert {h.hex() for h in edge.checkpoint_hashes.values()} <= {
        op["fh"] for op in _ck_ops(store)}


def test_equal_replicas_never_report_a_checkpoint_mismatch() -> None:
    for seed in range(6):
        store = _history(seed, 160)
        raws = store.envelopes()
        for order in (0, seed + 1):
            r = _replay(raws, order, fold=True)
            assert r.ck_mismatches == 0 and r.take_checkpoint_mismatches() == []
        assert all(n.ck_mismatches == 0 for n in store.nodes.values())


def test_a_replica_with_another_state_reports_the_mismatch_and_still_folds() -> None:
    store = _folded_history()
    raws = store.envelopes()
    honest = _replay(raws, 0, fold=True)
    odd = _node("obs")
    # a deliberately different state (inside this test only): one SKU's stock events
    # shifted before any checkpoint arrives, as a replica with a bug would hold them
    ck_raws = {raw for raw in store.log[EDGE] if any(op["t"] == "ck" for op in decode(raw).ops)}
    for raw in [x for x in raws if x not in ck_raws]:
        try:
            odd.apply(decode(raw), NOW)
        except Exception:
            pass
    ev = next(e for e in odd._events.values() if len(e))
    ev.d_oh[0] += 7
    for raw in store.log[EDGE]:
        if raw in ck_raws:
            odd.apply(decode(raw), NOW)
    got = odd.take_checkpoint_mismatches()
    assert odd.ck_mismatches == len(got) > 0
    assert {m.what for m in got} == {"fold"}
    assert all(m.origin == EDGE and m.expected != m.found for m in got)
    assert odd.folds == honest.folds  # a check, never a refusal: the fold stands
    assert odd.vv == honest.vv
    assert honest.ck_mismatches == 0


def test_a_chain_head_that_differs_from_the_ck_op_is_reported() -> None:
    edge, r1, obs = _node(EDGE), _node("r1"), _node("obs")
    out: dict[str, list[bytes]] = {EDGE: [], "r1": []}
    for i, (node, r) in enumerate([(EDGE, edge), ("r1", r1), (EDGE, edge), ("r1", r1)]):
        out[node].append(r.receive("A", 2, txn=f"t{i}", now_ms=NOW + i).envelope.raw)
    for raw in out["r1"]:
        edge.apply(decode(raw), NOW + 10)
    for raw in out[EDGE]:
        r1.apply(decode(raw), NOW + 10)
    f = Frontier()
    for n, r in ((EDGE, edge), ("r1", r1)):
        f.observe(n, r.vv, NOW + 20)
    frontier, live = f.stable([EDGE, "r1"], NOW + 20)
    res = edge.propose_checkpoint(frontier, live, txn="ck-1", now_ms=NOW + 30)
    assert res is not None and edge.folds == 1 and edge.ck_mismatches == 0
    out[EDGE].append(res.envelope.raw)
    for raw in out["r1"]:
        obs.apply(decode(raw), NOW + 40)
    # this replica holds another hash at r1's frontier seq than the one the op names
    seq = frontier.get("r1")
    obs._hashes["r1"][(seq - 1) * 32] ^= 0xFF
    for raw in out[EDGE]:
        obs.apply(decode(raw), NOW + 40)
    got = obs.take_checkpoint_mismatches()
    assert obs.folds == 1 and [m.what for m in got] == ["head:r1"]
    op = next(o for o in decode(out[EDGE][-1]).ops if o["t"] == "ck")
    assert got[0].expected.hex() == op["h"]["r1"] != got[0].found.hex()


def test_a_ck_op_without_heads_or_fold_hash_is_malformed() -> None:
    from mesh.core.ops import validate_ops
    from mesh.errors import Malformed

    good = {"t": "ck", "cut": 5, "f": {"r1": 2}, "h": {"r1": "ab" * 32}, "fh": "cd" * 32}
    validate_ops([good])
    for bad in ({k: v for k, v in good.items() if k != "fh"},
                {**good, "h": {}}, {**good, "h": {"r1": "AB" * 32}}, {**good, "fh": "x"}):
        with pytest.raises(Malformed):
            validate_ops([bad])


# --- ledger verify over the checkpoint chain -----------------------------------------

from pathlib import Path  # noqa: E402

from mesh.app.cli import verify_ledger  # noqa: E402
from mesh.durable import DurableReplica  # noqa: E402
from mesh.store.datadir import init_store  # noqa: E402


def _edge_with_checkpoints(tmp_path: Path, wrong_head: bool) -> Path:
    d = tmp_path / "edge"
    init_store(d, "store-1", now_ms=NOW, node_id="edge")
    dr = DurableReplica.open(d)
    assert dr.checkpointer == "edge"
    real = Replica.hash_at
    for k in range(3):
        for i in range(4):
            dr.execute(lambda r, t=f"t{k}-{i}", a=NOW + 10 * k + i: r.receive(
                "A", 1, txn=t, now_ms=a))[1].result()
        if wrong_head and k == 1:  # a checkpointer that names another chain head
            Replica.hash_at = lambda self, o, q: bytes(32)  # type: ignore[method-assign]
        try:
            got = dr.maybe_checkpoint(NOW + 10 * k + 5, ["edge"])
        finally:
            Replica.hash_at = real  # type: ignore[method-assign]
        assert got is not None
        got[1].result()
    assert dr.replica.folds == 3
    dr.close()
    return d


def test_ledger_verify_checks_the_chain_heads_checkpoints_name(tmp_path: Path) -> None:
    good = verify_ledger(_edge_with_checkpoints(tmp_path / "a", False))
    assert good.ok and good.checkpoints == 3, good.problems
    bad = verify_ledger(_edge_with_checkpoints(tmp_path / "b", True))
    assert not bad.ok
    assert any("checkpoint edge seq" in p and "names another hash" in p for p in bad.problems)

"""The proposer's fold hash (``Replica.fold_hash``, issue 12): computed in place, it is
byte-identical to the hash the real fold leaves, at the proposer and at every receiver,
and computing it changes nothing."""

from __future__ import annotations

import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mesh.core.envelope import Envelope, decode
from mesh.core.replica import Checkpoint, Replica
from tests.unit.test_retention import ALL, AWAY, EDGE, REGS, SKUS, _node, _Store


class _Checked(_Store):
    """A ``_Store`` whose every proposal is checked against real folds."""

    def __init__(self, rng: random.Random) -> None:
        super().__init__(rng)
        self.checked = 0
        self.cheap = 0  # proposals whose hash took the in-place path

    def checkpoint(self) -> None:
        edge = self.nodes[EDGE]
        snap, digest = edge.snapshot(), edge.state_digest()
        held = len(self.log[EDGE])
        super().checkpoint()
        if len(self.log[EDGE]) == held:
            return  # nothing proposed
        env = decode(self.log[EDGE][-1])
        op = env.ops[0]
        ck = Checkpoint(op["cut"], dict(op["f"]), EDGE, env.seq, dict(op["h"]), op["fh"])
        # the proposer folded it at once; its state after the fold hashes to fh
        assert edge.last_folded is not None and edge.last_folded.key() == ck.key()
        assert edge.checkpoint_hash(ck).hex() == op["fh"]
        # on a copy of the proposer from just before: the hash, without a change...
        copy = _copy(snap)
        cheap = copy._fold_plan(ck)
        assert cheap is not None and cheap[0].hex() == op["fh"]
        self.cheap += cheap[1] is not None
        assert copy.fold_hash(ck) == cheap[0]
        assert copy.snapshot() == snap and copy.state_digest() == digest
        # ...equal to the scratch-copy fold and to what really folding it leaves there
        assert copy._dry_fold(ck) == cheap[0]
        copy.apply(env, self.t)
        assert copy.checkpoint_hashes[ck.key()] == cheap[0] and copy.ck_mismatches == 0
        self.checked += 1


def _copy(snap: bytes) -> Replica:
    r = _node(EDGE)
    r.key = None
    r.restore(snap)
    return r


def _run(seed: int, steps: int) -> _Checked:
    rng = random.Random(seed)
    store = _Checked(rng)
    for i in range(steps):
        store.away = steps // 3 <= i < 2 * steps // 3
        writers = [n for n in ALL if not (store.away and n == AWAY)]
        x = rng.random()
        if x < 0.55:
            store.command(rng.choice(ALL), rng.randrange(6), rng.choice(SKUS))
        elif x < 0.9:
            to, frm = rng.choice(writers), rng.choice(writers)
            if to != frm:
                store.deliver(to, frm)
        else:
            for m in rng.sample(REGS, rng.randrange(len(REGS) + 1)):
                store.deliver(EDGE, m)  # the edge usually holds more than the frontier
            store.checkpoint()
    for n in ALL:  # every receiver folds every checkpoint itself: no mismatch anywhere
        for frm in ALL:
            store.deliver(n, frm)
        assert store.nodes[n].ck_mismatches == 0, n
    hashes = [store.nodes[n].checkpoint_hashes for n in ALL]
    for n, h in zip(ALL, hashes, strict=True):
        common = set(h) & set(hashes[0])
        assert {k: h[k] for k in common} == {k: hashes[0][k] for k in common}, n
    return store


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10**6))
def test_fold_hash_is_the_hash_the_fold_leaves_and_changes_nothing(seed: int) -> None:
    _run(seed, 240)


def test_the_histories_take_both_paths() -> None:
    """Over a few long histories both the in-place path and the scratch copy (a late
    envelope of the away till) are checked, with sales, returns, reservations and
    several checkpoints."""
    cheap = checked = 0
    for seed in range(6):
        store = _run(seed, 600)
        cheap, checked = cheap + store.cheap, checked + store.checked
    assert cheap >= 10 and checked - cheap >= 1, (cheap, checked)


def test_the_common_case_copies_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every member reported, nothing late: no scratch replica, no snapshot."""
    edge, reg = _node(EDGE), _node("r1")
    envs: list[Envelope] = []
    for k in range(20):
        res = edge.receive(f"S{k}", 5, txn=f"rx{k}", now_ms=1_000 + k)
        assert res.envelope is not None
        reg.apply(res.envelope, 1_000 + k)
    for i in range(200):
        res = reg.sell(f"S{i % 20}", 1, txn=f"s{i}", now_ms=2_000 + i)
        assert res.envelope is not None
        envs.append(res.envelope)
        edge.apply(res.envelope, 2_000 + i)

    def boom(*_: object) -> bytes:
        raise AssertionError("copied the replica")

    monkeypatch.setattr(Replica, "_dry_fold", boom)
    monkeypatch.setattr(Replica, "snapshot", boom)
    res = edge.propose_checkpoint(edge.vv, [EDGE, "r1"], txn="ck", now_ms=3_000)
    assert res is not None and res.envelope is not None and edge.folds == 1
    monkeypatch.undo()
    reg.apply(res.envelope, 3_000)
    assert reg.folds == 1 and reg.ck_mismatches == 0
    assert reg.state_digest() == edge.state_digest()
    assert sum(e.short for e in edge.exceptions()) == 100  # 200 sold, 100 there

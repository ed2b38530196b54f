"""Catch-up from a checkpoint state (``mesh.core.catchup``, ``DurableReplica``
invariant 9): the checkpointer's state verifies against its signed ck; a tampered one,
or one whose hash the ck does not sign, is refused whole; installed, it is durable
before it is taken (a crash between the install and the tail loses nothing); state plus
tail equals the full history."""

from __future__ import annotations

import random
import time
from pathlib import Path

import pytest

from mesh.core.catchup import decode_state, encode_state, verify_state
from mesh.core.envelope import decode, verify
from mesh.core.sync import InstallState, SyncCore
from mesh.durable import DurableReplica
from mesh.errors import Malformed
from mesh.store.datadir import enrol_node, init_store
from mesh.store.ledger import Ledger
from tests.conftest import NOW, ingest

SKUS = ["A", "B", "LAST"]


class _Store:
    """An edge (the checkpointer) and a till on disk, r9 enrolled and empty."""

    def __init__(self, tmp: Path) -> None:
        edge = init_store(tmp / "edge", "store-1", now_ms=NOW, node_id="edge")
        assert edge.store_key is not None
        for n in ("r1", "r9"):
            enrol_node(tmp / n, edge.store_key, "store-1", "register", now_ms=NOW,
                       node_id=n, trust=edge.trust)
        edge.save()
        self.tmp = tmp
        self.edge = DurableReplica.open(tmp / "edge")
        self.r1 = DurableReplica.open(tmp / "r1")
        self.t = NOW
        self.n = 0
        self.offers: list[tuple[int, int, bytes]] = []

    def close(self) -> None:
        self.edge.close()
        self.r1.close()

    def _sync(self, dst: DurableReplica[Ledger], src: DurableReplica[Ledger]) -> None:
        for origin, top in src.replica.vv.items():
            first = dst.replica.vv.get(origin) + 1
            for raw in src.ledger.read_origin(origin, first, top):
                _, fut = ingest(dst, raw, self.t)
                if fut is not None:
                    fut.result()

    def _command(self, sku: str, n: int, t: int) -> None:
        if n % 7 == 1:
            _, fut = self.edge.execute(lambda r: r.receive(sku, 3, txn=f"e{n}", now_ms=t))
        elif not self.r1.replica.knows_sku(sku):
            return
        elif n % 11 == 2 and self.r1.replica.available(sku) > 0:
            _, fut = self.r1.execute(lambda r: r.reserve(sku, 1, txn=f"v{n}", now_ms=t,
                                                         channel="web"))
        else:
            _, fut = self.r1.execute(lambda r: r.sell(sku, 1, txn=f"s{n}", now_ms=t))
        fut.result()

    def round(self, rng: random.Random, sales: int) -> None:
        for _ in range(sales):
            self.t += rng.randrange(1, 500)
            self.n += 1
            self._command(rng.choice(SKUS), self.n, self.t)
        self._sync(self.r1, self.edge)
        self._sync(self.edge, self.r1)
        self.edge.replica.frontier.observe("r1", self.r1.replica.vv, self.t)
        self.t += 1_000
        got = self.edge.maybe_checkpoint(self.t, ["edge", "r1"])
        if got is not None:
            got[1].result()
            assert self.edge.state_offer is not None
            self.offers.append(self.edge.state_offer)
        self._sync(self.r1, self.edge)


@pytest.fixture
def store(tmp_path: Path):  # type: ignore[no-untyped-def]
    s = _Store(tmp_path)
    rng = random.Random(5)
    for _ in range(6):
        s.round(rng, 40)
    assert len(s.offers) >= 3, "checkpoints with a state"
    s.round(rng, 30)  # a tail above the newest checkpoint
    yield s
    s.close()


def _install(dr: DurableReplica[Ledger], msg: bytes, now: int) -> str:
    ck_raw, blob = decode_state(msg)
    env = verify(decode(ck_raw), dr.identity.trust, now)
    ck, state = verify_state(env, blob, "store-1", "register", dr.checkpointer)
    for _ in range(100):  # the writer thread's last callback may still be running
        got = dr.install_state(env, ck, state)
        if got != "busy":
            return got
        time.sleep(0.01)
    return got


def _tail(s: _Store, dr: DurableReplica[Ledger]) -> None:
    s._sync(dr, s.edge)


def test_state_plus_tail_equals_the_full_history(store: _Store) -> None:
    r9 = DurableReplica.open(store.tmp / "r9")
    seq, total, msg = store.offers[-1]
    assert _install(r9, msg, store.t) == "ok"
    ck = r9.replica.last_folded
    assert ck is not None and ck.seq == seq and sum(ck.frontier.values()) == total
    assert r9.replica.vv.to_dict() == {o: q for o, q in ck.frontier.items() if q}
    assert r9.ledger.read_origin("edge", 1, 1) == []  # nothing fetched from seq 1
    _tail(store, r9)
    edge = store.edge.replica
    assert r9.replica.state_digest() == edge.state_digest()
    assert r9.replica.exceptions() == edge.exceptions()
    assert r9.replica.exceptions(), "the history oversold: exceptions compared"
    assert r9.replica.checkpoint_hash(ck) == edge.checkpoint_hash(ck)
    # and it goes on: the next checkpoint folds here to the proposer's hash
    store.round(random.Random(9), 30)
    _tail(store, r9)
    assert r9.replica.folds >= 1 and r9.replica.ck_mismatches == 0
    assert r9.replica.state_digest() == store.edge.replica.state_digest()
    r9.close()


def test_a_crash_between_the_install_and_the_tail_loses_nothing(store: _Store) -> None:
    r9 = DurableReplica.open(store.tmp / "r9")
    assert _install(r9, store.offers[-1][2], store.t) == "ok"
    installed = r9.replica.state_digest()
    r9.close()  # (the process dies here: nothing of the tail yet)
    r9 = DurableReplica.open(store.tmp / "r9")
    assert r9.replica.state_digest() == installed
    _tail(store, r9)
    r9.close()
    r9 = DurableReplica.open(store.tmp / "r9")  # and after part of the tail
    assert r9.replica.state_digest() == store.edge.replica.state_digest()
    r9.close()


def test_a_tampered_state_is_refused(store: _Store) -> None:
    ck_raw, blob = decode_state(store.offers[-1][2])
    env = verify(decode(ck_raw), store.edge.identity.trust, store.t)
    bad = bytearray(blob)
    bad[len(bad) // 2] ^= 1
    with pytest.raises(Malformed, match="does not hash"):
        verify_state(env, bytes(bad), "store-1", "register", "edge")
    with pytest.raises(Malformed):
        verify_state(env, blob, "store-1", "register", "r1")  # not the checkpointer's


def test_a_state_the_signed_ck_does_not_name_is_refused(store: _Store) -> None:
    old_raw, old_blob = decode_state(store.offers[-2][2])
    new_raw, _ = decode_state(store.offers[-1][2])
    env = verify(decode(new_raw), store.edge.identity.trust, store.t)
    with pytest.raises(Malformed, match="does not hash"):
        verify_state(env, old_blob, "store-1", "register", "edge")
    # a ck without sh names no state at all
    ck_env = decode(old_raw)
    assert any("sh" in op for op in ck_env.ops)


def test_the_sync_core_refuses_a_bad_state_whole_and_installs_a_good_one(
        store: _Store) -> None:
    r9 = DurableReplica.open(store.tmp / "r9")
    core = SyncCore(r9.replica, r9.identity.trust, random.Random(1))
    core.peer_up("edge", store.t)
    before = r9.replica.state_digest()
    ck_raw, blob = decode_state(store.offers[-1][2])
    for msg in (encode_state(ck_raw, blob[:-1]), encode_state(ck_raw[:-3], blob),
                b"K\x00\x00", encode_state(ck_raw, blob[:100])):
        out = core.receive(msg, "edge", store.t)
        assert not any(isinstance(e, InstallState) for e in out)
    assert core.stats["bad_checkpoint_state"] == 4, core.stats
    assert r9.replica.state_digest() == before and r9.replica.vv.total() == 0
    # a good one from another peer is still taken
    core.peer_up("r1", store.t)
    out = core.receive(store.offers[-1][2], "r1", store.t)
    inst = [e for e in out if isinstance(e, InstallState)]
    assert len(inst) == 1 and core.installing
    r9.close()


def test_the_checkpointer_rebuilds_the_same_state_after_a_restart(store: _Store) -> None:
    offer = store.offers[-1]
    store.edge.close()
    edge = DurableReplica.open(store.tmp / "edge")
    assert edge.state_offer is None
    assert edge.restore_offer() and edge.state_offer == offer
    store.edge = edge


def test_a_till_that_installs_a_state_keeps_its_idempotency_window(store: _Store) -> None:
    """r1 itself (its own envelopes within the frontier) installs the edge's state: a
    retried sale it made before is still a duplicate with the original result."""
    r1 = store.r1
    seq = r1.replica.vv.get("r1")
    sold = [t for t in r1.replica._txns if t.startswith("s")][-1]
    original = r1.replica._txns[sold][0]
    assert _install(r1, store.offers[-1][2], store.t) == "ok"
    assert r1.replica.vv.get("r1") == seq  # its own tail applied again from its ledger
    env = decode(r1.ledger.read_origin("r1", original, original)[0])
    res = r1.replica.sell(env.meta["sku"], 1, txn=sold, now_ms=store.t)
    assert res.duplicate and res.seq == original and res.envelope is None


def test_a_restarted_checkpointer_over_a_big_archive_serves_no_state(
        store: _Store, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    # the rebuild replays the whole archive on the event loop: past the bound it is
    # not done (no stall), no state is offered, and the next ck carries no ``sh``
    from mesh import config

    store.edge.close()
    edge = DurableReplica.open(store.tmp / "edge")
    store.edge = edge
    held = sum(edge.replica.vv.to_dict().values())
    monkeypatch.setattr(config, "CATCHUP_REBUILD_MAX", held - 1)
    with caplog.at_level("WARNING"):
        assert not edge.restore_offer()
    assert edge.state_offer is None
    assert "CATCHUP_REBUILD_MAX" in caplog.text
    assert edge._state_from_scratch() is None

"""Contract suites for the ports (``mesh.ports``), shipped like ``trio.testing``.

One function per port, run against the real and the simulated implementation alike
(automerge-repo's ``runStorageAdapterTests``): a port that passes may be plugged into
the ``Driver``. Each takes a factory for a *rig*: the implementation plus the few
powers a test needs over it (let time pass, crash the process, inject a failure).

``check_storage(make)`` (ledger invariants 1-4, ``mesh.ports`` contract 3):
 * rows replay (``scan``) in append order; ``read_origin`` returns seq ranges, at most
   the page bound;
 * an append is acknowledged only once it survives a crash of the process, and a crash
   loses exactly what was not yet durable: the survivors are a prefix of what was
   appended that holds every acknowledged row;
 * restart rebuilds the same state (``DurableReplica`` over the reopened storage), and
   snapshot + tail rebuilds what a full replay does;
 * a failed batch fails every append queued behind it, and every later one until
   ``reset_failure``; then appends work again without a hole.

``check_transport(make)`` (``mesh.ports`` contract 2): per-session FIFO; HIGH before LOW
when both are queued; nothing crosses from one session into the next.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Protocol

from mesh.core.envelope import Envelope, decode
from mesh.core.replica import Replica
from mesh.durable import DurableReplica
from mesh.errors import LedgerError
from mesh.ports import Identity, Prunable, Storage

__all__ = ["StorageRig", "TransportRig", "check_pruning", "check_storage", "check_transport",
           "sales"]

NOW = 1_790_000_000_000


class StorageRig(Protocol):
    """A storage implementation under test, with powers over its process."""

    identity: Identity

    def open(self) -> Storage:
        """(Re)open the storage of this rig (a fresh process reading the same disk)."""
        ...

    def settle(self, storage: Storage) -> None:
        """Let time pass until every append queued so far has completed."""
        ...

    def crash_while_appending(self, batches: Sequence[Sequence[Envelope]]) -> int:
        """Append ``batches`` (sync) in a process that is killed once some, not all, are
        acknowledged; return how many batches were acknowledged before the kill."""
        ...

    def fail_commits(self, storage: Storage) -> None:
        """Make every commit from now on fail (a full disk), until ``heal``."""
        ...

    def heal(self, storage: Storage) -> None: ...


def sales(identity: Identity, n: int, start: int = 0) -> list[Envelope]:
    """``n`` signed envelopes of ``identity``'s node: a receipt, then sales."""
    r = Replica(identity.store_id, identity.node_id, identity.role, identity.key)
    out: list[Envelope] = []
    res = r.receive("A", 1_000_000, txn="contract-rcv", now_ms=NOW)
    assert res.envelope is not None
    out.append(res.envelope)
    for i in range(start, start + n - 1):
        res = r.sell("A", 1, txn=f"contract-{i}", now_ms=NOW + i)
        assert res.envelope is not None
        out.append(res.envelope)
    return out


def _rows(storage: Storage) -> list[bytes]:
    return [raw for _, raw in storage.scan(0)]


def check_storage(make: Callable[[], StorageRig]) -> None:
    """Run every storage contract check; each on a fresh rig from ``make``."""
    _order_and_ranges(make())
    _durable_ack_survives_crash(make())
    _restart_rebuilds_same_state(make())
    _failed_batch_fails_what_is_queued_behind(make())


def check_pruning(make: Callable[[], StorageRig]) -> None:
    """The ``Prunable`` contract (a register's ledger): a pruned prefix is gone for every
    reader, nothing else is, row ids go on, and it stays pruned across a restart."""
    rig = make()
    st = rig.open()
    assert isinstance(st, Prunable), "storage cannot prune"
    other = Replica(rig.identity.store_id, "reg-2", "register", rig.identity.key)
    envs = sales(rig.identity, 30)
    theirs = [other.receive("B", 1, txn=f"o{i}", now_ms=1_700_000_000_000 + i).envelope
              for i in range(5)]
    st.append(envs[:20] + [e for e in theirs if e is not None] + envs[20:], sync=True)
    rig.settle(st)
    origin, last = rig.identity.node_id, st.last_id
    assert st.prune({origin: 12, "reg-2": 2, "nobody": 4}) == 14
    assert st.prune({origin: 12}) == 0, "pruning twice deleted more"
    assert st.read_origin(origin, 1, 30) == [], "a read from a pruned seq returned a later run"
    assert st.read_origin(origin, 12, 14) == []
    assert st.read_origin(origin, 13, 15) == [e.raw for e in envs[12:15]]
    assert st.read_origin("reg-2", 3, 9) == [e.raw for e in theirs[2:] if e is not None]
    kept = [e.raw for e in envs[12:20]] + [e.raw for e in theirs[2:] if e is not None] + [
        e.raw for e in envs[20:]]
    assert _rows(st) == kept, "scan still returns pruned rows (or lost others)"
    assert st.last_id == last, "pruning moved the row ids"
    more = [e for e in (other.receive("B", 1, txn=f"p{i}", now_ms=1_700_000_000_100 + i).envelope
                        for i in range(2)) if e is not None]
    st.append(more, sync=True)
    rig.settle(st)
    assert len(more) == 2 and st.last_id > last and _rows(st)[-2:] == [e.raw for e in more]
    st.close()
    st = rig.open()  # a restart: still pruned
    assert st.read_origin(origin, 1, 5) == [] and _rows(st) == kept + [e.raw for e in more]
    st.close()


def _order_and_ranges(rig: StorageRig) -> None:
    st = rig.open()
    envs = sales(rig.identity, 30)
    futs = [st.append(envs[i : i + 7], sync=True) for i in range(0, len(envs), 7)]
    rig.settle(st)
    assert all(f.done() and f.exception() is None for f in futs)
    assert _rows(st) == [e.raw for e in envs], "scan order differs from append order"
    assert st.last_id == futs[-1].result() >= len(envs)
    origin = rig.identity.node_id
    assert st.read_origin(origin, 3, 9) == [e.raw for e in envs[2:9]]
    assert st.read_origin(origin, 29, 99) == [e.raw for e in envs[28:]]
    assert st.read_origin("nobody", 1, 5) == []
    st.close()


def _durable_ack_survives_crash(rig: StorageRig) -> None:
    envs = sales(rig.identity, 400)
    batches = [envs[i : i + 4] for i in range(0, len(envs), 4)]
    acked = rig.crash_while_appending(batches)
    st = rig.open()
    rows = _rows(st)
    want = [e.raw for e in envs]
    assert rows == want[: len(rows)], "after a crash the rows are not a prefix of the appends"
    assert len(rows) >= 4 * acked, (
        f"{acked} batches were acknowledged but only {len(rows)} rows survived the crash")
    assert 0 < acked < len(batches), "the crash did not land while appending"
    st.close()


def _restart_rebuilds_same_state(rig: StorageRig) -> None:
    ident = rig.identity
    st = rig.open()
    envs = sales(ident, 60)
    for i in range(0, 40, 5):
        st.append(envs[i : i + 5])
    rig.settle(st)
    part = Replica(ident.store_id, ident.node_id, ident.role, ident.key)
    full = Replica(ident.store_id, ident.node_id, ident.role, ident.key)
    for env in envs[:40]:
        part.apply(decode(env.raw), None, check_skew=False)
    upto = st.last_id
    st.save_snapshot(upto, part.snapshot())
    st.append(envs[40:])
    rig.settle(st)
    for env in envs:
        full.apply(decode(env.raw), None, check_skew=False)
    st.close()
    again = DurableReplica(ident, rig.open())
    assert again.rebuild_stats.snapshot_upto == upto
    assert again.rebuild_stats.replayed == len(envs) - 40
    assert again.replica.state_digest() == full.state_digest(), \
        "snapshot + tail rebuilds another state than a full replay"
    again.close()


def _failed_batch_fails_what_is_queued_behind(rig: StorageRig) -> None:
    st = rig.open()
    envs = sales(rig.identity, 50)
    first = st.append(envs[:10])
    rig.settle(st)
    assert first.exception() is None
    rig.fail_commits(st)
    futs: list[Future[int]] = [st.append([e]) for e in envs[10:30]]
    rig.settle(st)
    errors = [f.exception() for f in futs]
    failed_at = next((i for i, e in enumerate(errors) if e is not None), None)
    assert failed_at is not None, "every commit on a full disk succeeded"
    assert all(isinstance(e, LedgerError) for e in errors[failed_at:]), \
        "an append queued behind a failed batch succeeded"
    assert st.failed is not None
    later = st.append(envs[30:31])
    rig.settle(st)
    assert later.exception() is not None, "an append after a failure succeeded before reset"
    rig.heal(st)
    st.reset_failure()
    again = st.append(envs[10 + failed_at :])
    rig.settle(st)
    assert again.exception() is None, again.exception()
    assert _rows(st) == [e.raw for e in envs], "a hole behind the failed write"
    st.close()


# --- transport -------------------------------------------------------------------------------


class TransportRig(Protocol):
    """Two endpoints a and b of a transport, with a session between them."""

    def send(self, src: str, data: bytes, priority: int) -> None: ...

    def hold(self, src: str) -> None:
        """Let ``src``'s messages queue without leaving (a busy link)."""
        ...

    def release(self, src: str) -> None: ...

    def run(self) -> None:
        """Let time pass until everything sent has arrived."""
        ...

    def received(self, dst: str) -> list[bytes]: ...

    def reconnect(self) -> None:
        """End the session and open a new one."""
        ...


def check_transport(make: Callable[[], TransportRig]) -> None:
    rig = make()
    msgs = [b"V" + str(i).encode() for i in range(50)]
    for m in msgs:
        rig.send("a", m, 0)
    rig.run()
    assert rig.received("b") == msgs, "messages of one session arrived out of order"

    rig = make()
    rig.hold("a")
    rig.send("a", b"Vlow-1", 1)
    rig.send("a", b"Vhigh-1", 0)
    rig.send("a", b"Vlow-2", 1)
    rig.send("a", b"Vhigh-2", 0)
    rig.release("a")
    rig.run()
    assert rig.received("b") == [b"Vhigh-1", b"Vhigh-2", b"Vlow-1", b"Vlow-2"], \
        f"HIGH did not leave before LOW: {rig.received('b')}"

    rig = make()
    rig.hold("a")
    rig.send("a", b"Vold", 0)
    rig.reconnect()
    rig.release("a")
    rig.send("a", b"Vnew", 0)
    rig.run()
    assert rig.received("b") == [b"Vnew"], "a message crossed into the next session"


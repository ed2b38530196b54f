"""A replica bound to its ledger: commands acknowledged only once durable.

``DurableReplica`` is what the node runtime (and the crash test) drive. It is not
async itself: commands run on the caller's thread (the event loop), the ledger's
writer thread makes them durable, and the returned future says when.

Invariants:
 1. Every envelope the replica applies goes to the ledger, in apply order (so the
    ledger replays to the same state).
 2. A local command's result is acknowledged (its future resolved) only once its
    envelope is fsynced; local envelopes must not be sent to peers before that,
    or a crash could make this node sign a different envelope for the same seq.
 3. If the ledger fails (disk full, I/O error), the in-memory replica may hold
    envelopes that are not durable: the replica is rebuilt from disk before any
    further command is accepted (``recover``), so nothing unacknowledged survives
    in memory and nothing acknowledged is lost.
 4. A snapshot is written only when no append is in flight, so it covers exactly the
    rows up to the last committed one.
 5. A replayed command (same txn id, same content) is acknowledged no earlier than its
    original: while the original's envelope is still being written, the replay gets the
    original's own future, so a crash in that window cannot lose a sale that a retrying
    till was told is recorded. If the original's write fails, so does the replay.
 6. Every certificate an envelope needs is on disk before the envelope: a change of the
    trust store (whoever made it: the session handshake, a certificate message, a
    join) is written to node.json on the ledger's writer thread ahead of every append
    queued after it (``save_trust``, ledger invariant 6). Otherwise a crash, or a clean
    stop, leaves envelopes whose origin this node can no longer verify.
 7. The replica never holds a revoked node's envelopes above the bound its revocation
    names (``mesh.core.identity`` invariant 7): every rebuild (start, ``recover``,
    ``exclude_revoked``) leaves those ledger rows out (they stay on disk, an archive),
    and ignores a snapshot that holds any of them. ``exclude_revoked`` rebuilds while
    appends may be in flight: the rows not yet written are applied again from memory,
    after what is on disk, in the order they were queued.
 8. A ledger is pruned only on a role in ``config.LEDGER_PRUNE_ROLES`` whose storage is
    ``Prunable``, only right after a snapshot was saved, and only to the frontier of a
    checkpoint folded ``config.LEDGER_TAIL_CHECKPOINTS`` folds before the newest one
    (``prune_plan``): the snapshot holds everything pruned (its vector is past that
    frontier), so a restart rebuilds from it and the tail. The rows of the newest
    checkpoints stay, so ``storemesh ledger verify`` checks the tail from the chain heads
    that checkpoint names.
 9. Checkpoint states (``mesh.core.catchup``): the checkpointer keeps the state of
    exactly the envelopes within its newest checkpoint's frontier (``ck_state``),
    advanced with the ledger rows between two frontiers before it signs the next ck
    (whose ``sh`` names the hash of its snapshot), and serves it once that ck is
    durable. A node installs a verified one only when no append is in flight, none of
    another origin's envelopes it holds lies beyond the frontier, and after the
    snapshot of the installed state is saved: a crash before leaves the old state, a
    crash after restarts from the installed one and fetches the tail again.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Generic, TypeVar

from mesh import config
from mesh.core.catchup import BASE_NODE, advance_state, checkpoint_of, encode_state
from mesh.core.crdt import HLC
from mesh.core.envelope import Envelope, decode
from mesh.core.replica import SNAPSHOT_MAGIC, Checkpoint, CommandResult, Replica
from mesh.errors import EnvelopeError
from mesh.ports import Identity, Prunable, Storage

if TYPE_CHECKING:
    from mesh.store.datadir import NodeIdentity
    from mesh.store.ledger import Ledger

S = TypeVar("S", bound=Storage)

__all__ = ["DurableReplica", "RebuildStats", "rebuild"]

log = logging.getLogger(__name__)


@dataclass(slots=True)
class RebuildStats:
    snapshot_upto: int = 0
    replayed: int = 0
    seconds: float = 0.0
    #: rows left out: a revoked node's envelopes above its bound (invariant 7)
    excluded: int = 0


class _SnapshotHoldsExcluded(Exception):
    """The snapshot holds envelopes a revocation leaves out: replay without it."""


@dataclass(slots=True)
class _Counters:
    applied: int = 0
    duplicates: int = 0


def rebuild(replica: Replica, ledger: Storage,
            perf_counter: Callable[[], float] | None = None, *,
            bounds: Mapping[str, int] | None = None, snapshot: bool = True) -> RebuildStats:
    """Load the newest snapshot, then replay the ledger rows after it (trusted: every
    row was verified when it was first accepted; ``storemesh ledger verify`` re-checks).
    ``perf_counter`` times it (the real node passes ``time.perf_counter``). ``bounds``:
    revoked origins and the highest seq of each to replay (invariant 7); a snapshot
    holding more of one raises ``_SnapshotHoldsExcluded`` (rebuild then with
    ``snapshot=False`` on a fresh replica)."""
    t0 = perf_counter() if perf_counter is not None else 0.0
    stats = RebuildStats()
    snap = ledger.latest_snapshot() if snapshot else None
    after = 0
    if snap is not None and snap[1].startswith(SNAPSHOT_MAGIC):
        after, blob = snap
        replica.restore(blob)
        stats.snapshot_upto = after
        if bounds and any(replica.vv.get(o) > b for o, b in bounds.items()):
            raise _SnapshotHoldsExcluded
    # else: a snapshot of an older format (JSON, before issue 12): replay the ledger
    for _, raw in ledger.scan(after):
        env = decode(raw)
        if bounds and env.seq > bounds.get(env.origin, env.seq):
            stats.excluded += 1
            continue
        replica.apply(env, None, check_skew=False)
        stats.replayed += 1
    if perf_counter is not None:
        stats.seconds = perf_counter() - t0
    return stats


class DurableReplica(Generic[S]):
    """A ``Replica`` whose every change is appended to a ledger (any ``Storage``: the
    SQLite ``Ledger`` for real, ``SimDisk`` in the simulator)."""

    def __init__(self, identity: Identity, ledger: S,
                 snapshot_every: int = config.SNAPSHOT_EVERY,
                 perf_counter: Callable[[], float] | None = None, *,
                 checkpointer: str | None = None,
                 horizon_ms: int = config.FRONTIER_HORIZON_MS) -> None:
        self.identity = identity
        #: how long an absent node holds the stable frontier back (``Frontier``)
        self.horizon_ms = horizon_ms
        #: the node that proposes the store's checkpoints: the trust store's (fixed at
        #: store creation, the same at every node) unless given
        self.checkpointer = checkpointer if checkpointer is not None \
            else identity.trust.checkpointer
        self.ledger = ledger
        self.snapshot_every = snapshot_every
        self._perf = perf_counter
        #: appends not yet landed, by a number of their own, in queue order (invariant 7)
        self._unlanded: dict[int, list[Envelope]] = {}
        self._appends = 0
        self.replica, self.rebuild_stats = self._rebuilt()
        self.counters = _Counters()
        self._in_flight = 0
        #: seq -> the durability future of our own envelopes not yet on disk: a replay
        #: of their command is answered with the original's future (invariant 5).
        self._pending_local: dict[int, Future[int]] = {}
        self._lock = threading.Lock()
        self._since_snapshot = self.rebuild_stats.replayed
        self._trust_saved = identity.trust.version  # trust store version on disk
        #: prune the ledger behind checkpoints (invariant 8): registers; edges and the
        #: cloud keep the archive
        self.prune_ledger = (identity.role in config.LEDGER_PRUNE_ROLES
                             and isinstance(ledger, Prunable))
        #: checkpoints seen folded at snapshots, newest last (invariant 8)
        self._folds_seen: deque[Checkpoint] = deque(maxlen=config.LEDGER_TAIL_CHECKPOINTS + 1)
        self._pruned_to: bytes | None = None  # key of the checkpoint last pruned to
        self.pruned_rows = 0
        #: On the checkpointer: the checkpoint state of its newest checkpoint
        #: (invariant 9, ``mesh.core.catchup``) and what it serves of it: (seq of the
        #: ck envelope, the frontier's total, the ``K`` message); None until built
        self.ck_state: Replica | None = None
        self._ck_state_blob: bytes | None = None
        self.state_offer: tuple[int, int, bytes] | None = None
        self._offer_tried: bytes | None = None
        self._rebuild_refused = False  # warned once that the archive is too big to replay

    @staticmethod
    def open(data_dir: Path, snapshot_every: int = config.SNAPSHOT_EVERY,
             max_bytes: int | None = None,
             storage: Callable[[NodeIdentity], Ledger] | None = None, *,
             checkpointer: str | None = None) -> DurableReplica[Ledger]:
        """Load the node in ``data_dir`` and rebuild its state from the SQLite ledger
        (or from ``storage(identity)``: the cloud's PostgreSQL ledger, ``mesh.store.pgstore``).
        ``checkpointer``: the node that proposes the store's checkpoints (default: the
        one the trust store names, ``TrustStore.checkpointer``)."""
        # The real storage is imported by the real path only: the simulator imports
        # this module and must not pull in sqlite3 (tests/unit/test_purity.py).
        import time

        from mesh.store.datadir import load_identity
        from mesh.store.ledger import Ledger

        identity = load_identity(data_dir)
        ledger = Ledger(identity.ledger_path, max_bytes=max_bytes) if storage is None \
            else storage(identity)
        return DurableReplica(identity, ledger, snapshot_every, time.perf_counter,
                              checkpointer=checkpointer)

    def _rebuilt(self) -> tuple[Replica, RebuildStats]:
        """A replica rebuilt from storage, without what revocations leave out (inv. 7)."""
        bounds = self.identity.trust.revocation_bounds
        fresh = self._fresh_replica()
        try:
            stats = rebuild(fresh, self.ledger, self._perf, bounds=bounds)
        except _SnapshotHoldsExcluded:
            fresh = self._fresh_replica()
            try:
                stats = rebuild(fresh, self.ledger, self._perf, bounds=bounds, snapshot=False)
                whole = fresh.pending_count() == 0
            except EnvelopeError:
                if not self.prune_ledger:
                    raise
                whole = False
            if not whole and self.prune_ledger:
                # A pruned ledger (invariant 8) cannot replay from seq 1: keep the
                # snapshot's state rather than a replica missing the pruned prefix. Its
                # envelopes of the revoked node above the bound stay in memory (the
                # edge, with the archive, leaves them out); said loudly.
                log.error("ledger pruned: cannot rebuild without the envelopes a revocation "
                          "leaves out; rebuilt from the snapshot, which holds some of them")
                fresh = self._fresh_replica()
                stats = rebuild(fresh, self.ledger, self._perf)
        return fresh, stats

    def exclude_revoked(self) -> RebuildStats:
        """A revocation leaves out envelopes the replica applied (``mesh.core.sync``
        ``Rebuild``): rebuild it from storage without them, then apply again what is
        queued for storage and not yet on it (invariant 7). The next snapshot is due at
        once (the older ones hold the left-out envelopes)."""
        bounds = self.identity.trust.revocation_bounds
        with self._lock:  # taken before the scan: a batch landing meanwhile is in both
            queued = [envs for _, envs in sorted(self._unlanded.items())]
        fresh, stats = self._rebuilt()
        for envs in queued:
            for env in envs:
                if env.seq > bounds.get(env.origin, env.seq):
                    stats.excluded += 1
                    continue
                # (a copy the scan already replayed is a duplicate: it changes nothing)
                try:
                    fresh.apply(env, None, check_skew=False)
                except EnvelopeError as exc:  # not foreseen; anti-entropy brings it back
                    log.warning("%s seq %d not applied again after the rebuild: %s",
                                env.origin, env.seq, exc)
        self.replica = fresh
        self.rebuild_stats = stats
        self._since_snapshot = max(self._since_snapshot, self.snapshot_every)
        return stats

    def _fresh_replica(self) -> Replica:
        i = self.identity
        r = Replica(i.store_id, i.node_id, i.role, i.key, checkpointer=self.checkpointer)
        r.frontier.horizon_ms = self.horizon_ms
        r.archive_hash = self._archive_hash  # hashes below a checkpoint: from the ledger
        if self.checkpointer == i.node_id:
            r.state_hash = self._state_hash  # the checkpoint state it serves (invariant 9)
        return r

    # --- checkpoint states (invariant 9) ------------------------------------------------

    def _state_hash(self, ck: Checkpoint) -> bytes | None:
        """Called by ``propose_checkpoint`` before it signs ``ck``: advance the
        checkpoint state to ``ck`` (from the previous checkpoint's, or built from the
        ledger after a restart) and return the SHA-256 of its snapshot, or None (no
        state for this checkpoint: it is then proposed without ``sh``)."""
        import hashlib

        held = self.replica.checkpoints()
        prev = held[-1] if held else None
        state = self.ck_state
        self.ck_state = self._ck_state_blob = None
        if state is None or (prev is None) != (state.last_folded is None) or (
                prev is not None and state.last_folded is not None
                and state.last_folded.key() != prev.key()):
            state = self._state_from_scratch()
        if state is None or not advance_state(state, ck, self.ledger.read_origin) \
                or state.ck_mismatches:
            return None
        blob = state.snapshot()
        self.ck_state = state
        if len(blob) + config.MAX_ENVELOPE_BYTES > config.MAX_MESSAGE_BYTES:
            log.warning("checkpoint state of %d bytes does not fit a message: not served",
                        len(blob))
            return None
        self._ck_state_blob = blob
        return hashlib.sha256(blob).digest()

    def _state_from_scratch(self) -> Replica | None:
        """The checkpoint state of the newest checkpoint this node proposed, rebuilt
        from its ledger (the archive): every ck of its own chain in turn. O(the
        archive): once after a restart, at the first checkpoint proposed; None (no
        state served) past ``config.CATCHUP_REBUILD_MAX`` envelopes, where the replay
        would stall the event loop."""
        i = self.identity
        held = sum(self.replica.vv.to_dict().values())
        if held > config.CATCHUP_REBUILD_MAX:
            if not self._rebuild_refused:
                self._rebuild_refused = True
                log.warning("checkpoint state not rebuilt after the restart: %d envelopes "
                            "> CATCHUP_REBUILD_MAX %d (new tills fetch from seq 1)",
                            held, config.CATCHUP_REBUILD_MAX)
            return None
        state = Replica(i.store_id, BASE_NODE, i.role, checkpointer=self.checkpointer)
        top = self.replica.vv.get(i.node_id)
        seq = 1
        while seq <= top:
            raws = self.ledger.read_origin(i.node_id, seq, min(top, seq + config.LEDGER_PAGE - 1))
            if not raws:
                return None
            for raw in raws:
                ck = checkpoint_of(decode(raw), self.checkpointer)
                if ck is not None and not advance_state(state, ck, self.ledger.read_origin):
                    return None
            seq += len(raws)
        return state

    def restore_offer(self) -> bool:
        """After a restart of the checkpointer: build the checkpoint state of its newest
        checkpoint again from the ledger and offer it if it still hashes to the ``sh``
        that ck signs (the build is deterministic: the same steps in the same order).
        O(the archive), once; the driver calls it at its first checkpoint tick."""
        import hashlib

        held = self.replica.checkpoints()
        ck = held[-1] if held else None
        if (self.state_offer is not None or ck is None or not ck.state_hash
                or ck.origin != self.identity.node_id or ck.key() == self._offer_tried):
            return False
        self._offer_tried = ck.key()  # once per checkpoint
        state = self._state_from_scratch()
        raws = self.ledger.read_origin(ck.origin, ck.seq, ck.seq)
        if state is None or not raws or state.last_folded is None \
                or state.last_folded.key() != ck.key():
            return False
        blob = state.snapshot()
        if hashlib.sha256(blob).hexdigest() != ck.state_hash:
            log.warning("checkpoint state rebuilt to another hash: not served")
            return False
        self.ck_state, self._ck_state_blob = state, blob
        self.state_offer = (ck.seq, sum(ck.frontier.values()), encode_state(raws[0], blob))
        return True

    def install_state(self, env: Envelope, ck: Checkpoint, state: Replica) -> str:
        """Install a verified checkpoint state (``mesh.core.catchup.verify_state``) as
        this replica's base (invariant 9): "ok", "busy" (an append is in flight: the
        snapshot must cover exactly the rows on disk; try again) or "stale" (what this
        replica holds beyond its frontier does not apply on it: not for us).
        Durable before it is taken: the snapshot is saved first, so a crash loses
        nothing and the restart rebuilds from it and the tail."""
        i, r = self.identity, self.replica
        with self._lock:
            busy = self._in_flight > 0
        if busy or self.ledger.failed is not None or self._pending_local:
            return "busy"
        state.node_id, state.key, state.role = i.node_id, i.key, i.role
        state.frontier.horizon_ms = self.horizon_ms
        state.archive_hash = self._archive_hash
        if self.checkpointer == i.node_id:
            state.state_hash = self._state_hash
        # What we hold beyond its frontier (our own envelopes, and what the full fetch
        # brought meanwhile): applied again from our ledger, chained to its heads.
        try:
            for origin, top in sorted(r.vv.items()):
                while state.vv.get(origin) < top:
                    first = state.vv.get(origin) + 1
                    raws = self.ledger.read_origin(origin, first,
                                                   min(top, first + config.LEDGER_PAGE - 1))
                    if not raws:
                        return "stale"
                    for raw in raws:
                        state.apply(decode(raw), None, check_skew=False)
        except EnvelopeError as exc:  # our chain does not link to its heads
            log.warning("checkpoint state does not fit what this node holds: %s", exc)
            return "stale"
        state.hlc = HLC(max(state.hlc.last, r.hlc.last))
        state.take_txns(r)  # our own txn ids, also those of our envelopes within F
        self.ledger.save_snapshot(self.ledger.last_id, state.snapshot())  # may raise
        self.replica = state
        self._since_snapshot = 0
        log.info("installed the checkpoint state of %s seq %d (frontier of %d envelopes)",
                 env.origin, env.seq, sum(ck.frontier.values()))
        return "ok"

    def _archive_hash(self, origin: str, seq: int) -> bytes | None:
        raws = self.ledger.read_origin(origin, seq, seq)
        return decode(raws[0]).hash if raws else None

    def maybe_checkpoint(self, now_ms: int, enrolled: Iterable[str]
                         ) -> tuple[CommandResult, Future[int]] | None:
        """As the store's checkpointer: propose a checkpoint at the stable frontier of
        ``enrolled`` (``mesh.core.checkpoint``) if it moved; the envelope is durable (and
        may be pushed) once the future resolves. None if not the checkpointer or
        nothing moved."""
        r = self.replica
        if self.checkpointer != self.identity.node_id or r.checkpointer != r.node_id:
            return None
        r.frontier.observe(r.node_id, r.vv, now_ms, r.clock_floor(now_ms))
        vv, members = r.frontier.stable(enrolled, now_ms)
        res = r.propose_checkpoint(vv, members, txn=f"ck-{now_ms}-{r.vv.get(r.node_id)}",
                                   now_ms=now_ms, floors=r.frontier.floors(members))
        if res is None:
            return None
        env = res.envelope
        ck = checkpoint_of(env, self.checkpointer) if env is not None else None
        if env is not None and ck is not None and ck.state_hash \
                and self._ck_state_blob is not None:
            self.state_offer = (ck.seq, sum(ck.frontier.values()),
                                encode_state(env.raw, self._ck_state_blob))
        return self.execute(lambda _: res)

    # --- local commands ---------------------------------------------------------------

    def execute(self, command: Callable[[Replica], CommandResult]) -> tuple[CommandResult,
                                                                             Future[int]]:
        """Run a local command; the future resolves when its envelope is durable."""
        if self.ledger.failed is not None:
            self.recover()
        result = command(self.replica)
        if result.envelope is None:
            pending = self._pending_local.get(result.seq) if result.duplicate else None
            if pending is not None:
                return result, pending  # the original is still being written
            done: Future[int] = Future()
            done.set_result(self.ledger.last_id)
            return result, done
        fut = self._append([result.envelope])
        if not fut.done():
            seq = result.envelope.seq
            self._pending_local[seq] = fut
            fut.add_done_callback(partial(self._written, seq))
        return result, fut

    # --- remote envelopes -------------------------------------------------------------

    # --- durability -------------------------------------------------------------------

    def persist(self, envs: Sequence[Envelope]) -> Future[int]:
        """Append envelopes the caller already applied to ``replica`` (the sync core's
        ``Persist`` effect)."""
        self.counters.applied += len(envs)
        return self._append(list(envs), sync=False)

    def save_trust(self) -> Future[int] | None:
        """Queue node.json for writing if the trust store changed since it was last
        written (invariant 6); the future resolves once it is on disk. Call from the
        replica's own thread (the event loop): the file's bytes are taken here."""
        trust = self.identity.trust
        if trust.version == self._trust_saved:
            return None
        self._trust_saved = trust.version
        return self.ledger.call(partial(self.identity.write, self.identity.encode()))

    def _append(self, envs: list[Envelope], *, sync: bool = True) -> Future[int]:
        self.save_trust()  # before the rows that may need it (invariant 6)
        with self._lock:
            self._in_flight += 1
            self._appends += 1
            n = self._appends
            self._unlanded[n] = envs
        fut = self.ledger.append(envs, sync=sync)
        fut.add_done_callback(partial(self._landed, n))
        self._since_snapshot += len(envs)
        return fut

    def _written(self, seq: int, _: Future[int]) -> None:
        self._pending_local.pop(seq, None)  # on the writer thread; dict ops are atomic

    def _landed(self, n: int, _: Future[int]) -> None:
        with self._lock:  # runs on the ledger's writer thread
            self._in_flight -= 1
            self._unlanded.pop(n, None)

    def snapshot_due(self) -> bool:
        """Enough envelopes since the last snapshot, none in flight, and no failed write
        (after one, memory may hold what the disk does not: invariants 3 and 4)."""
        with self._lock:
            idle = self._in_flight == 0
        return (self._since_snapshot >= self.snapshot_every and idle
                and self.ledger.failed is None)

    def take_snapshot(self) -> tuple[int, bytes]:
        """The state and the ledger row it covers; call on the replica's own thread when
        ``snapshot_due()``, then store it with ``ledger.save_snapshot`` (any thread)."""
        self._since_snapshot = 0
        return self.ledger.last_id, self.replica.snapshot()

    def maybe_snapshot(self) -> bool:
        """Take and store a snapshot if one is due, then prune the ledger if a plan says
        so (invariant 8). Call from the replica's own thread."""
        if not self.snapshot_due():
            return False
        upto, state = self.take_snapshot()
        self.save_snapshot_and_prune(upto, state, self.prune_plan())
        return True

    def prune_plan(self) -> dict[str, int] | None:
        """At a snapshot, on the replica's own thread: the frontier to prune the ledger
        to (invariant 8), or None. The snapshot taken with it holds everything below."""
        if not self.prune_ledger:
            return None
        ck = self.replica.last_folded
        if ck is not None and (not self._folds_seen or self._folds_seen[-1].key() != ck.key()):
            self._folds_seen.append(ck)
        if len(self._folds_seen) <= config.LEDGER_TAIL_CHECKPOINTS:
            return None
        target = self._folds_seen[0]
        if target.key() == self._pruned_to:
            return None
        self._pruned_to = target.key()
        return dict(target.frontier)

    def save_snapshot_and_prune(self, upto: int, state: bytes,
                                plan: Mapping[str, int] | None) -> int:
        """Store the snapshot, then (only if that worked) prune to ``plan``; any thread
        (the driver's worker). Returns the rows pruned."""
        self.ledger.save_snapshot(upto, state)
        if not plan or not isinstance(self.ledger, Prunable):
            return 0
        n = self.ledger.prune(plan)
        self.pruned_rows += n
        if n:
            log.info("ledger pruned: %d rows within checkpoint frontier %s", n, dict(plan))
        return n

    def recover(self) -> None:
        """After a failed write: drop memory state and rebuild from what is on disk."""
        self.ledger.reset_failure()
        self._trust_saved = -1  # the failure may have been node.json's: write it again
        # may raise (a database still away): then nothing here has changed but the
        # storage's failure flag, and the caller tries again (``Driver.recover``)
        fresh, stats = self._rebuilt()
        self._pending_local.clear()  # their commands are not on disk: a replay is new
        # the checkpoint state may be past a ck the failure lost: built afresh later
        self.ck_state = self._ck_state_blob = self.state_offer = None
        self.replica = fresh
        self.rebuild_stats = stats
        self._since_snapshot = stats.replayed

    def close(self) -> None:
        self.ledger.close()

"""The simulated ports: the same Protocols (``mesh.ports``) as the real node's, over
the world's virtual time, network and disks. A ``SimNode`` is the real ``Driver`` over
these (``mesh.sim.world``).

Invariants:
 1. ``SimClock``: ``monotonic_ms`` is the world's virtual time; ``realtime_ms`` is that
    plus the node's skew (which a ``clock_jump`` fault steps); ``call_soon`` runs at the
    same virtual instant after everything already scheduled for it (the batch boundary).
    While the node is frozen (``freeze`` fault, SIGSTOP-like) nothing it scheduled runs;
    it all runs, in order, when the node resumes.
 2. ``SimDisk``: rows replay in append order. A group commit covers every row appended
    before it starts; its futures resolve ``fsync_ms`` (plus any injected slowness)
    later, and only then are the rows durable. A crash keeps exactly the durable rows
    (fewer if ``lie_about_fsync``). A failed commit (injected I/O error or disk full)
    fails its batch and every append queued behind it, drops every row not yet durable,
    and fails every later append until ``reset_failure``.
 3. ``SimTransport`` only hands messages to ``World.send`` (priority, send filter);
    the world's links model queueing, physics and the WAN codec, both ways.
 4. ``SimWorker`` runs a call ``latency_ms`` later, as a thread would.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

import orjson

from mesh import config
from mesh.core.envelope import Envelope
from mesh.core.identity import Certificate, NodeKey, TrustStore, renew_certificate
from mesh.errors import LedgerError, StorageFull

if TYPE_CHECKING:
    from mesh.sim.world import SimNode, World

__all__ = ["DiskFaults", "SimClock", "SimDisk", "SimIdentity", "SimTransport", "SimWorker"]

T = TypeVar("T")


class _Call:
    __slots__ = ("cancelled", "fn", "node")

    def __init__(self, fn: Callable[[], None], node: SimNode) -> None:
        self.fn = fn
        self.node = node
        self.cancelled = False

    def __call__(self) -> None:
        if self.cancelled:
            return
        if self.node.frozen:
            self.node.defer(self)  # a stopped process runs its timers once resumed
            return
        self.fn()

    def cancel(self) -> None:
        self.cancelled = True


class SimClock:
    """``Clock`` over the world's virtual time; the node's skew is its wall-clock error."""

    __slots__ = ("node", "world")

    def __init__(self, world: World, node: SimNode) -> None:
        self.world = world
        self.node = node

    def monotonic_ms(self) -> float:
        return self.world.now

    def realtime_ms(self) -> int:
        return self.world.wall_ms(self.node.skew_ms)

    def call_at(self, monotonic_ms: float, fn: Callable[[], None]) -> _Call:
        call = _Call(fn, self.node)
        self.world.at(monotonic_ms, call)
        return call

    def call_soon(self, fn: Callable[[], None]) -> None:
        if self.node.frozen:
            self.node.defer(fn)
        else:
            self.world.soon(fn)


class SimWorker:
    """``Worker``: the call runs ``latency_ms`` later (a thread hop and a read), then
    ``done``; never inline, so a driver that loops on reads advances virtual time."""

    __slots__ = ("clock", "latency_ms")

    def __init__(self, clock: SimClock, latency_ms: float = 0.05) -> None:
        self.clock = clock
        self.latency_ms = latency_ms

    def run(self, fn: Callable[[], T], done: Callable[[Future[T]], None]) -> None:
        def call() -> None:
            fut: Future[T] = Future()
            try:
                fut.set_result(fn())
            except Exception as exc:
                fut.set_exception(exc)
            done(fut)
        self.clock.call_at(self.clock.monotonic_ms() + self.latency_ms, call)


@dataclass(slots=True)
class SimIdentity:
    """``Identity``: what ``save`` wrote is what a restarted node's trust store holds."""

    node_id: str
    store_id: str
    role: str
    key: NodeKey
    trust: TrustStore
    certificate: Certificate
    saved: dict[str, Any] = field(default_factory=dict)
    saves: int = 0
    #: The store key on the simulated edge: it renews certificates (``Issuer``).
    store_key: NodeKey | None = None
    validity_ms: int = config.CERT_VALIDITY_MS
    #: TLS certificates installed (the simulator has no TLS: the renewal carries none).
    tls_installed: list[str] = field(default_factory=list)

    @property
    def issuer(self) -> SimIdentity | None:
        return self if self.store_key is not None else None

    def renew(self, cert: Certificate, now_ms: int) -> tuple[Certificate, str | None]:
        assert self.store_key is not None
        return renew_certificate(self.store_key, cert, now_ms=now_ms,
                                 validity_ms=self.validity_ms), None

    def write_tls(self, pem: str) -> bool:
        self.tls_installed.append(pem)
        return True

    def save(self) -> None:
        self.write(self.encode())

    def encode(self) -> bytes:
        held = self.trust.certificate(self.node_id)
        if (held is not None and held.public_key == self.key.public_key
                and (self.certificate is None or held.not_after > self.certificate.not_after)):
            self.certificate = held
        return orjson.dumps(self.trust.to_dict())

    def write(self, data: bytes) -> None:
        self.saved = orjson.loads(data)
        self.saves += 1

    def reload(self) -> None:
        """A restart: the trust store is what was last saved."""
        if self.saved:
            verifier = self.trust.verifier
            self.trust = TrustStore.from_dict(self.saved)
            self.trust.verifier = verifier


@dataclass(slots=True)
class DiskFaults:
    """Injected disk faults of one node (scenario ``disk_*`` faults)."""

    slow_ms: float = 0.0  #: added to every fsync
    spike_every: int = 0  #: every n-th fsync takes ``spike_ms`` more
    spike_ms: float = 0.0
    full: bool = False  #: every commit fails with StorageFull
    io_error: int = 0  #: the next n commits fail with an I/O error
    read_error: int = 0  #: the next n rebuild reads fail (storage away, e.g. a database)


class SimDisk:
    """``Storage``: the ledger of one simulated node (see invariant 2).

    Rows keep the decoded envelope next to its raw bytes (as the real driver holds the
    envelopes it handed to the ledger); a restart decodes the raw bytes, as a real node
    reading its ledger does.

    ``lie_about_fsync`` is a fault: fsync reports success (the node acknowledges) but the
    rows reach the platter only when the lie is switched off; a crash meanwhile loses
    them. A correct node cannot survive that, so it is for showing the checker fails.
    """

    def __init__(self, world: World | None, fsync_ms: float = 0.5) -> None:
        self.world = world
        self.rows: list[Envelope] = []
        self.durable = 0
        self.fsync_ms = fsync_ms
        self.by_origin: dict[str, list[bytes]] = {}
        #: origin -> seq of ``by_origin[origin][0]``: 1, or just above a checkpoint
        #: frontier for a node that installed a checkpoint state (``mesh.core.catchup``)
        self._start: dict[str, int] = {}
        #: origin -> highest seq pruned (``prune``): a deletion, it survives a crash
        self.pruned: dict[str, int] = {}
        self.syncing = False
        self.lie_about_fsync = False
        self.faults = DiskFaults()
        self.failed: BaseException | None = None
        self.fsyncs = 0
        self.batches = 0
        self.appends = 0
        self.snapshots: list[tuple[int, bytes]] = []
        self.evidence: list[tuple[str, int, bytes, bytes]] = []
        self._queue: list[tuple[int, Future[int]]] = []  # (rows up to, future)
        self._platter = 0  # rows really durable (== durable unless lying)
        self._epoch = 0

    # --- Storage ------------------------------------------------------------------------

    @property
    def last_id(self) -> int:
        return self.durable

    def append(self, envs: Sequence[Envelope], *, sync: bool = True) -> Future[int]:
        fut: Future[int] = Future()
        if self.failed is not None:
            fut.set_exception(self.failed)
            return fut
        self.appends += 1
        self.rows.extend(envs)
        self._queue.append((len(self.rows), fut))
        self._kick()
        return fut

    def reset_failure(self) -> None:
        self.failed = None

    def call(self, fn: Callable[[], None]) -> Future[int]:
        """Run ``fn`` (a file write rows appended later depend on): now, so before them."""
        fut: Future[int] = Future()
        if self.failed is not None:
            fut.set_exception(self.failed)
            return fut
        fn()
        fut.set_result(self.durable)
        return fut

    def read_origin(self, origin: str, first: int, last: int,
                    limit: int = config.LEDGER_PAGE) -> list[bytes]:
        if first <= self.pruned.get(origin, 0):
            return []  # the run from ``first`` only: nothing past a pruned prefix
        rows = self.by_origin.get(origin, [])
        at = first - self._start.get(origin, 1)
        if at < 0:
            return []  # below the checkpoint state it installed: not on this disk
        return rows[at : at + min(last - first + 1, limit)]

    def prune(self, upto: Mapping[str, int]) -> int:
        """``Prunable``: each origin's durable rows with seq <= ``upto[origin]`` are gone
        for every reader (``read_origin``, ``scan``, ``hash_at``); ``rows`` keeps them as
        the platter's history for the checker, which knows the floors (``pruned``)."""
        gone = 0
        for origin, seq in upto.items():
            have = self._start.get(origin, 1) - 1 + len(self.by_origin.get(origin, []))
            floor = min(seq, have)
            if floor > self.pruned.get(origin, 0):
                gone += floor - self.pruned.get(origin, 0)
                self.pruned[origin] = floor
        return gone

    def _read(self) -> None:
        if self.faults.read_error > 0:
            self.faults.read_error -= 1
            raise LedgerError("simulated read error: the storage does not answer")

    def scan(self, after: int = 0) -> Iterator[tuple[int, bytes]]:
        self._read()
        for i in range(after, self.durable):
            env = self.rows[i]
            if env.seq > self.pruned.get(env.origin, 0):
                yield i + 1, env.raw

    def latest_snapshot(self) -> tuple[int, bytes] | None:
        self._read()
        return self.snapshots[-1] if self.snapshots else None

    def save_snapshot(self, upto: int, state: bytes) -> None:
        if self.failed is not None or upto != self.durable or self.durable != len(self.rows):
            raise LedgerError(f"snapshot not saved: it covers row {upto} but the disk "
                              f"holds {self.durable} (failed: {self.failed})")
        self.snapshots = [*self.snapshots[-1:], (upto, state)]

    def add_evidence(self, origin: str, seq: int, first: bytes, second: bytes) -> None:
        self.evidence.append((origin, seq, first, second))

    def close(self) -> None:
        pass

    # --- group commit -------------------------------------------------------------------

    def _kick(self) -> None:
        if self.syncing or not self._queue or self.world is None:
            return
        self.syncing = True
        batch, self._queue = self._queue, []
        upto = len(self.rows)
        f = self.faults
        self.fsyncs += 1
        delay = self.fsync_ms + f.slow_ms
        if f.spike_every and self.fsyncs % f.spike_every == 0:
            delay += f.spike_ms
        epoch = self._epoch
        self.world.after(delay, lambda: self._committed(epoch, upto, batch))

    def _committed(self, epoch: int, upto: int, batch: list[tuple[int, Future[int]]]) -> None:
        if epoch != self._epoch:
            return  # crashed meanwhile: the process that waited is gone
        self.syncing = False
        err = self._injected_error(upto)
        if err is not None:
            self.fail(err, batch)
            return
        self.mark_durable(upto)
        self.batches += 1
        for _, fut in batch:
            fut.set_result(upto)
        self._kick()

    def _injected_error(self, upto: int) -> LedgerError | None:
        f = self.faults
        n = upto - self.durable
        if f.full:
            return StorageFull(f"disk full: {n} envelopes not written (simulated)")
        if f.io_error > 0:
            f.io_error -= 1
            return LedgerError(f"ledger write failed: {n} envelopes (simulated I/O error)")
        return None

    def fail(self, err: LedgerError, batch: list[tuple[int, Future[int]]]) -> None:
        """The commit failed: it, and everything queued behind it, fails; what was not
        durable is gone (the transaction rolled back)."""
        self.failed = err
        behind, self._queue = self._queue, []
        del self.rows[self.durable:]
        for _, fut in [*batch, *behind]:
            fut.set_exception(err)

    def mark_durable(self, upto: int) -> list[Envelope]:
        newly = self.rows[self.durable:upto]
        self._index(newly)
        self.durable = upto
        if not self.lie_about_fsync:
            self._platter = upto
        return newly

    # --- crash ----------------------------------------------------------------------------

    def crash(self) -> None:
        """Power loss: only what reached the platter stays; waiting futures never resolve."""
        self._epoch += 1
        self.syncing = False
        self._queue = []
        self.failed = None
        self.durable = self._platter
        del self.rows[self.durable:]
        self.snapshots = [s for s in self.snapshots if s[0] <= self.durable]
        self.by_origin, self._start = {}, {}
        self._index(self.rows)

    def _index(self, envs: Iterable[Envelope]) -> None:
        """Each origin's rows by seq: contiguous from seq 1, or from just above the
        frontier of a checkpoint state this node installed (then what it held below,
        superseded by the state, leaves the index: read as not on disk)."""
        by_origin, start = self.by_origin, self._start
        for env in envs:
            rows = by_origin.get(env.origin)
            if rows is None or env.seq != start[env.origin] + len(rows):
                rows = by_origin[env.origin] = []
                start[env.origin] = env.seq
            rows.append(env.raw)

    def hash_at(self, origin: str, seq: int) -> bytes | None:
        """The hash of ``origin``'s envelope ``seq`` among the durable rows."""
        if seq <= self.pruned.get(origin, 0):
            return None
        for env in self.rows[: self.durable]:
            if env.origin == origin and env.seq == seq:
                return env.hash
        return None

    def durable_seqs(self) -> dict[str, int]:
        """Per origin, the highest seq on disk (rows of one origin are contiguous)."""
        return {origin: self._start[origin] - 1 + len(raws)
                for origin, raws in self.by_origin.items()}


class SimTransport:
    """``Transport`` of one simulated node: its messages go onto the world's links."""

    __slots__ = ("node", "world")

    def __init__(self, world: World, node: SimNode) -> None:
        self.world = world
        self.node = node

    def send(self, peer: str, data: bytes, priority: int) -> None:
        node = self.node
        out: bytes | None = data
        if node.send_filter is not None:
            out = node.send_filter(peer, data)
        if out is not None:
            self.world.send(node.node_id, peer, out, priority)

    def close(self, peer: str, reason: str) -> None:
        # The connection ends for both sides, as closing a socket would (a revoked
        # peer: it is refused from now on, so the world does not re-open it).
        self.world.dropped_sessions[reason] = self.world.dropped_sessions.get(reason, 0) + 1
        self.world._session_down(self.node.node_id, peer)

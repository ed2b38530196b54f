"""A deterministic discrete-event world that drives the real replica and sync core.

Nothing here replicates anything: every node is a real ``Replica`` + ``SyncCore``
with real signed envelopes; only the ports are simulated — a virtual clock, a network
of links that delay, drop, duplicate and reorder, a disk that loses what was not yet
durable when its node crashes, and clock skew.

Invariants:
 1. One seed drives every random choice (``World.rng`` and generators derived from it
    in a fixed order), so the same scenario and seed replay the same trace. Nothing
    iterates a set of strings (hash order differs between processes).
 2. Events at the same virtual time run in the order they were scheduled.
 3. A node's disk rows up to ``durable`` survive a crash; later rows are lost. A local
    command is acknowledged only once its rows are durable, as on a real node.
 4. Messages on a link that is down are dropped; a link going down ends the sessions
    across it (``peer_down`` on both ends) and coming back up re-opens them after the
    discovery delay.
 5. Fault hooks (``LinkModel.blackhole``, ``SimNode.send_filter``,
    ``SimDisk.lie_about_fsync``) only change what the simulated ports do; the replica
    and the sync core are never touched.

Observers (``World.observers``) see ``emit(kind, **data)`` calls: ``created`` (node,
envelope: a local command signed it), ``acked`` (node, result: durable, acknowledged to
the POS), ``applied`` (node, envelopes: a ``Persist`` of remote envelopes), ``crash`` and
``restart`` (node).
"""

from __future__ import annotations

import heapq
import math
import random
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

from mesh.crdt import VersionVector
from mesh.envelope import Envelope, decode
from mesh.identity import NodeKey, TrustStore, issue_certificate
from mesh.replica import CommandResult, Replica
from mesh.sync import Alert, Effect, EndSession, Fetch, Persist, Send, SyncCore

__all__ = ["DISTRIBUTIONS", "LinkModel", "SimDisk", "SimNode", "World"]


#: Jitter distributions a link may draw from; each has mean ``jitter_ms`` except
#: "uniform" (mean jitter/2, the historical default). Heavy tails are capped at
#: ``_MAX_JITTER_FACTOR`` x jitter so one draw cannot stall a run.
DISTRIBUTIONS = ("uniform", "normal", "exponential", "lognormal", "pareto")
_MAX_JITTER_FACTOR = 50.0


@dataclass(slots=True)
class LinkModel:
    """One direction of a link: latency in ms (base + jitter drawn from
    ``distribution``), loss and duplication probabilities, extra reordering delay for a
    fraction of messages, bandwidth in bytes/ms (None = unlimited). ``fifo`` keeps the
    order of messages (a TCP stream); ``blackhole`` silently eats everything while the
    session stays up (one direction of an asymmetric partition)."""

    latency_ms: float = 0.3
    jitter_ms: float = 0.2
    loss: float = 0.0
    duplicate: float = 0.0
    bandwidth: float | None = None
    up: bool = True
    kind: str = "lan"
    distribution: str = "uniform"
    reorder: float = 0.0
    reorder_ms: float = 0.0
    fifo: bool = False
    blackhole: bool = False
    busy_until: float = 0.0  # bandwidth queue
    last_arrival: float = 0.0  # fifo
    messages: int = 0
    bytes: int = 0
    lost: int = 0  # dropped by ``loss`` or a blackhole
    duplicated: int = 0
    wire_bytes: int = 0  # after the WAN codec on "wan" links, else == bytes
    summary_bytes: int = 0  # of ``bytes``, those of ``V`` messages (summaries)
    codec: Any = None  # mesh.transport.WanCodec of the current session ("wan" links)


class SimDisk:
    """The ledger of one node: rows in apply order; ``durable`` rows survive a crash.

    Rows keep the decoded envelope next to its raw bytes (as the real driver holds the
    envelopes it handed to the ledger), so a group commit does not decode them again; a
    restart still decodes the raw bytes, as a real node reading its ledger does.

    ``lie_about_fsync`` is a fault: fsync reports success (the node acknowledges) but the
    rows reach the platter only when the lie is switched off; a crash meanwhile loses
    them. A correct node cannot survive that, so it is for showing the checker fails.
    """

    def __init__(self, fsync_ms: float = 0.5) -> None:
        self.rows: list[Envelope] = []
        self.durable = 0
        self.fsync_ms = fsync_ms
        self.by_origin: dict[str, list[bytes]] = {}
        self.syncing = False
        self.lie_about_fsync = False
        self._platter = 0  # rows really durable (== durable unless lying)

    def append(self, envs: list[Envelope]) -> None:
        self.rows.extend(envs)

    def crash(self) -> None:
        self.durable = self._platter
        del self.rows[self.durable:]
        self._reindex()

    def _reindex(self) -> None:
        self.by_origin = {}
        for env in self.rows[: self.durable]:
            self.by_origin.setdefault(env.origin, []).append(env.raw)

    def mark_durable(self, upto: int) -> list[Envelope]:
        newly = self.rows[self.durable:upto]
        for env in newly:
            self.by_origin.setdefault(env.origin, []).append(env.raw)
        self.durable = upto
        if not self.lie_about_fsync:
            self._platter = upto
        return newly

    def durable_seqs(self) -> dict[str, int]:
        """Per origin, the highest seq on disk (rows of one origin are contiguous)."""
        return {origin: len(raws) for origin, raws in self.by_origin.items()}

    def read_origin(self, origin: str, first: int, last: int) -> list[bytes]:
        rows = self.by_origin.get(origin, [])
        return rows[first - 1 : last]


#: A scheduled event: (virtual time, scheduling order, action). A plain tuple: the heap
#: compares millions of them, and (at, seq) is unique, so ``fn`` is never compared.
_Event = tuple[float, int, Callable[[], None]]


class World:
    """The event queue, the virtual clock and the network between nodes."""

    def __init__(self, seed: int, store_id: str = "sim-store", start_ms: int = 1_790_000_000_000,
                 discovery_ms: float = 50.0, discovery_jitter_ms: float = 0.0) -> None:
        self.seed = seed
        self.rng = random.Random(seed)
        self.now = 0.0
        self.start_ms = start_ms
        self.discovery_ms = discovery_ms
        self.discovery_jitter_ms = discovery_jitter_ms
        self.events = 0  # events run so far (a deterministic measure of work)
        self.store_id = store_id
        self._queue: list[_Event] = []
        self._seq = 0
        self.nodes: dict[str, SimNode] = {}
        self.links: dict[tuple[str, str], LinkModel] = {}
        #: session number per node pair (sorted): bumped when a session opens
        self._sessions: dict[tuple[str, str], int] = {}
        self.store_key = NodeKey.from_bytes(self.rng.randbytes(32))
        self.trust_template = TrustStore(store_id, self.store_key.public_key)
        self.certs: list[Any] = []
        self.observers: list[Callable[[str, dict[str, Any]], None]] = []

    # --- scheduling ---------------------------------------------------------------------

    def at(self, when: float, fn: Callable[[], None]) -> None:
        self._seq += 1
        heapq.heappush(self._queue, (max(when, self.now), self._seq, fn))

    def after(self, delay: float, fn: Callable[[], None]) -> None:
        self.at(self.now + delay, fn)

    def run_until(self, until: float, max_events: int = 50_000_000) -> None:
        n = 0
        queue = self._queue
        while queue and queue[0][0] <= until:
            at, _, fn = heapq.heappop(queue)
            self.now = at
            fn()
            n += 1
            if n >= max_events:
                self.events += n
                raise RuntimeError(f"more than {max_events} events before t={until}")
        self.events += n
        self.now = max(self.now, until)

    def pending_events(self) -> int:
        return len(self._queue)

    def discovery_delay(self) -> float:
        """How long until two nodes that can reach each other again have a session."""
        if self.discovery_jitter_ms <= 0:
            return self.discovery_ms
        return self.discovery_ms + self.rng.random() * self.discovery_jitter_ms

    def wall_ms(self, skew_ms: float = 0.0) -> int:
        # floor, with a little slack for float error: a timer armed for ``nxt - skew``
        # must read ``nxt`` when it fires, or it re-arms at the same instant forever
        # (with fractional skews, int(4142.333 - 83.333) was 4058, not 4059).
        return self.start_ms + math.floor(self.now + skew_ms + 1e-6)

    def emit(self, kind: str, **data: Any) -> None:
        for obs in self.observers:
            obs(kind, data)

    # --- topology -------------------------------------------------------------------------

    def add_node(self, node_id: str, role: str = "register", *, skew_ms: float = 0.0,
                 fsync_ms: float = 0.5) -> SimNode:
        key = NodeKey.from_bytes(self.rng.randbytes(32))
        cert = issue_certificate(self.store_key, node_id=node_id, store_id=self.store_id,
                                 role=role, public_key=key.public_key,
                                 not_after=self.start_ms + 10 * 365 * 24 * 3600 * 1000)
        self.certs.append(cert)
        node = SimNode(self, node_id, role, key, skew_ms=skew_ms, fsync_ms=fsync_ms)
        self.nodes[node_id] = node
        for other in self.nodes.values():
            other.trust.add_certificate(cert)
            if other is not node:
                node.trust.add_certificate(other.certificate)
        return node

    def connect(self, a: str, b: str, model: LinkModel | None = None,
                back: LinkModel | None = None) -> None:
        """A link a<->b (two directions, each with its own model); sessions open at once."""
        self.links[(a, b)] = model or LinkModel()
        self.links[(b, a)] = back or LinkModel(**_copyable(self.links[(a, b)]))
        self._session_up(a, b)

    def _session_up(self, a: str, b: str) -> None:
        na, nb = self.nodes[a], self.nodes[b]
        ab, ba = self.links[(a, b)], self.links[(b, a)]
        if na.alive and nb.alive and ab.up and ba.up:
            # A new session: what the old one still has in flight is never delivered
            # into it (a TCP connection's bytes die with it).
            pair = (a, b) if a < b else (b, a)
            self._sessions[pair] = self._sessions.get(pair, 0) + 1
            wan = ab.kind == "wan"
            if wan:
                # A new session, a new compression stream per direction (as the transport).
                from mesh.transport import WanCodec

                ab.codec, ba.codec = WanCodec(), WanCodec()
            na.handle(na.core.peer_up(b, na.clock(), wan=wan))
            nb.handle(nb.core.peer_up(a, nb.clock(), wan=wan))

    def _session_down(self, a: str, b: str) -> None:
        for x, y in ((a, b), (b, a)):
            node = self.nodes[x]
            if node.alive and node.core.is_up(y):
                node.handle(node.core.peer_down(y, node.clock()))

    def set_link(self, a: str, b: str, up: bool, *, both: bool = True) -> None:
        """Cut or restore a link. A cut in either direction ends the session (a TCP
        session cannot live on a one-way link); restoring re-opens it after discovery."""
        pairs = [(a, b), (b, a)] if both else [(a, b)]
        was = self.links[(a, b)].up and self.links[(b, a)].up
        for p in pairs:
            self.links[p].up = up
        now_up = self.links[(a, b)].up and self.links[(b, a)].up
        if was and not now_up:
            self._session_down(a, b)
        elif now_up and not was:
            self.after(self.discovery_delay(), lambda: self._reconnect(a, b))

    def _reconnect(self, a: str, b: str) -> None:
        na, nb = self.nodes[a], self.nodes[b]
        if not (na.alive and nb.alive) or na.core.is_up(b):
            return
        self._session_up(a, b)

    def send(self, src: str, dst: str, data: bytes) -> None:
        link = self.links.get((src, dst))
        if link is None or not link.up:
            return
        session = self._session_of(src, dst)
        link.messages += 1
        link.bytes += len(data)
        if data[:1] == b"V":
            link.summary_bytes += len(data)
        if link.codec is not None:
            # What the real WAN transport would put on the wire (prev elided, raw
            # signatures, one zlib stream per direction): the metered figure.
            link.wire_bytes += len(link.codec.encode(data))
        else:
            link.wire_bytes += len(data)
        if link.blackhole:
            link.lost += 1
            return
        rng = self.rng
        if rng.random() < link.loss:
            link.lost += 1
            return
        copies = 2 if rng.random() < link.duplicate else 1
        if copies == 2:
            link.duplicated += 1
        for _ in range(copies):
            delay = link.latency_ms + self._jitter(link)
            if link.reorder and rng.random() < link.reorder:
                delay += rng.random() * link.reorder_ms
            if link.bandwidth:
                start = max(self.now, link.busy_until)
                link.busy_until = start + len(data) / link.bandwidth
                delay += link.busy_until - self.now
            if link.fifo:
                arrival = max(self.now + delay, link.last_arrival)
                link.last_arrival = arrival
                delay = arrival - self.now
            self.after(delay, partial(self._deliver, src, dst, data, session))

    def _session_of(self, a: str, b: str) -> int:
        return self._sessions.get((a, b) if a < b else (b, a), 0)

    def _jitter(self, link: LinkModel) -> float:
        j = link.jitter_ms
        dist = link.distribution
        if dist == "uniform" or j <= 0:
            return self.rng.random() * j
        if dist == "exponential":
            x = self.rng.expovariate(1.0 / j)
        elif dist == "normal":
            x = abs(self.rng.gauss(0.0, j))
        elif dist == "lognormal":
            x = self.rng.lognormvariate(math.log(j) - 0.5, 1.0)
        elif dist == "pareto":
            x = (self.rng.paretovariate(2.5) - 1.0) * 1.5 * j
        else:
            raise ValueError(f"unknown latency distribution {dist!r}; use one of {DISTRIBUTIONS}")
        return min(x, _MAX_JITTER_FACTOR * j)

    def inject(self, src: str, dst: str, data: bytes, delay: float = 0.0) -> None:
        """Put ``data`` on the wire from ``src`` to ``dst`` as if ``src`` had sent it,
        outside the link model (a byzantine injector or a man in the middle)."""
        self.after(delay, partial(self._deliver, src, dst, data))

    def _deliver(self, src: str, dst: str, data: bytes, session: int | None = None) -> None:
        node = self.nodes[dst]
        link = self.links[(src, dst)]
        if not node.alive or not link.up or not node.core.is_up(src):
            return
        if session is not None and session != self._session_of(src, dst):
            return  # sent in an earlier session of this pair
        node.handle(node.core.receive(data, src, node.clock()))


def _copyable(m: LinkModel) -> dict[str, Any]:
    return {"latency_ms": m.latency_ms, "jitter_ms": m.jitter_ms, "loss": m.loss,
            "duplicate": m.duplicate, "bandwidth": m.bandwidth, "kind": m.kind,
            "distribution": m.distribution, "reorder": m.reorder, "reorder_ms": m.reorder_ms,
            "fifo": m.fifo}


class SimNode:
    """A real replica + sync core on simulated ports."""

    def __init__(self, world: World, node_id: str, role: str, key: NodeKey, *,
                 skew_ms: float, fsync_ms: float) -> None:
        self.world = world
        self.node_id = node_id
        self.role = role
        self.key = key
        self.skew_ms = skew_ms
        self.certificate = world.certs[-1]
        self.trust = TrustStore(world.store_id, world.store_key.public_key)
        self.trust.add_certificate(self.certificate)
        self.disk = SimDisk(fsync_ms)
        self.alive = True
        self.alerts: list[Alert] = []
        self.acked: list[CommandResult] = []
        self._waiting: list[tuple[int, Callable[[], None]]] = []  # (row, on_durable)
        self.replica = Replica(world.store_id, node_id, role, key)
        self.core = SyncCore(self.replica, self.trust, random.Random(world.rng.random()))
        self._timer_at: float | None = None
        self._epoch = 0
        #: Fault hook: sees every message this node sends (peer, bytes) and returns the
        #: bytes to send (maybe altered) or None to drop them. Tests use it to build
        #: deliberately broken nodes; the sync core never knows.
        self.send_filter: Callable[[str, bytes], bytes | None] | None = None

    def clock(self) -> int:
        return self.world.wall_ms(self.skew_ms)

    # --- commands -----------------------------------------------------------------------

    def command(self, fn: Callable[[Replica], CommandResult],
                on_ack: Callable[[CommandResult], None] | None = None) -> CommandResult | None:
        """Run a local command; acknowledged (``on_ack``) once its envelope is durable."""
        if not self.alive:
            return None
        result = fn(self.replica)
        if result.envelope is None:
            if on_ack:
                on_ack(result)
            return result
        self.disk.append([result.envelope])
        self.world.emit("created", node=self.node_id, envelope=result.envelope)

        def acked() -> None:
            self.acked.append(result)
            self.world.emit("acked", node=self.node_id, result=result)
            if on_ack:
                on_ack(result)
        self._waiting.append((len(self.disk.rows), acked))
        self._sync_disk()
        return result

    def _sync_disk(self) -> None:
        """Group commit: one fsync covers every row appended before it starts."""
        if self.disk.syncing or self.disk.durable >= len(self.disk.rows):
            return
        self.disk.syncing = True
        upto = len(self.disk.rows)
        epoch = self._epoch

        def done() -> None:
            if epoch != self._epoch:
                return  # crashed meanwhile
            self.disk.syncing = False
            envs = self.disk.mark_durable(upto)
            ready = [cb for row, cb in self._waiting if row <= upto]
            self._waiting = [(row, cb) for row, cb in self._waiting if row > upto]
            for cb in ready:
                cb()
            self.handle(self.core.durable(envs, self.clock()))
            self._sync_disk()
        self.world.after(self.disk.fsync_ms, done)

    # --- effects ------------------------------------------------------------------------------

    def handle(self, effects: list[Effect]) -> None:
        for eff in effects:
            if isinstance(eff, Send):
                data: bytes | None = eff.data
                if self.send_filter is not None:
                    data = self.send_filter(eff.peer, eff.data)
                if data is not None:
                    self.world.send(self.node_id, eff.peer, data)
            elif isinstance(eff, Persist):
                self.disk.append(list(eff.envelopes))
                self._sync_disk()
                self.world.emit("applied", node=self.node_id, envelopes=eff.envelopes)
            elif isinstance(eff, Fetch):
                raws = self.disk.read_origin(eff.origin, eff.first, eff.last)
                self.handle(self.core.fetched(eff.peer, eff.origin, eff.first, raws,
                                              self.clock()))
            elif isinstance(eff, Alert):
                self.alerts.append(eff)
            elif isinstance(eff, EndSession):
                # The connection ends for both sides, as closing a socket would.
                self.world._session_down(self.node_id, eff.peer)
        self._arm_timer()

    def _arm_timer(self) -> None:
        nxt = self.core.next_timer()
        if nxt is None:
            return
        at = nxt - self.world.start_ms - self.skew_ms
        if self._timer_at is not None and self._timer_at <= at and self._timer_at >= self.world.now:
            return
        self._timer_at = at
        epoch = self._epoch

        def fire() -> None:
            if epoch != self._epoch or not self.alive:
                return
            if self._timer_at != at:
                return
            self._timer_at = None
            self.handle(self.core.on_timer(self.clock()))
        self.world.at(at, fire)

    # --- crash and restart ------------------------------------------------------------------

    def crash(self) -> None:
        """Power loss: memory gone, disk keeps only durable rows, sessions end."""
        if not self.alive:
            return
        self.alive = False
        self._epoch += 1
        self.disk.crash()
        self.disk.syncing = False
        self._waiting = []
        self._timer_at = None
        for other in self.world.nodes.values():
            if other is not self and other.alive and other.core.is_up(self.node_id):
                other.handle(other.core.peer_down(self.node_id, other.clock()))
        self.world.emit("crash", node=self.node_id)

    def restart(self) -> None:
        """Boot: rebuild the replica from the disk, then reconnect after discovery."""
        if self.alive:
            return
        self.replica = Replica(self.world.store_id, self.node_id, self.role, self.key)
        for env in self.disk.rows[: self.disk.durable]:
            self.replica.apply(decode(env.raw), None, check_skew=False)
        stored = VersionVector(self.replica.vv.to_dict())
        self.core = SyncCore(self.replica, self.trust, random.Random(self.world.rng.random()),
                             stored)
        self.alive = True
        self.world.emit("restart", node=self.node_id)
        for (a, b) in list(self.world.links):
            if a == self.node_id:
                self.world.after(self.world.discovery_delay(),
                                 partial(self.world._reconnect, self.node_id, b))

"""A deterministic discrete-event world that drives the real node program.

Nothing here replicates anything, nor interprets the core's effects: every node is the
real ``Driver`` (``mesh.driver``) over a real ``DurableReplica`` + ``SyncCore`` with real
signed envelopes; only the ports are simulated (``mesh.sim.ports``) — a virtual clock
with skew, a network of links that queue by priority, delay, drop, duplicate and
reorder and run the WAN codec both ways, and a disk with group commit that loses what
was not yet durable when its node crashes.

Invariants:
 1. One seed drives every random choice (``World.rng`` and generators derived from it
    in a fixed order), so the same scenario and seed replay the same trace. Nothing
    iterates a set of strings (hash order differs between processes).
 2. Events at the same virtual time run in the order they were scheduled.
 3. A node's disk rows up to ``durable`` survive a crash; later rows are lost. A crash
    drops the node's ``Driver`` and keeps its ``SimDisk``; a restart is a new ``Driver``
    over a new ``DurableReplica`` over the same disk (rebuild from snapshot + rows).
 4. Messages on a link that is down are dropped; a link going down ends the sessions
    across it (``session_down`` on both ends) and coming back up re-opens them after the
    discovery delay. Messages queued on a link die with its session. One end of each
    pair dials (``dialer``: the smaller id on the LAN, as discovery does; the store end
    of a WAN link, as ``--cloud``), and only while it holds no session with the other.
 8. A crash is noticed by a peer holding a session with the node only at the
    transport's heartbeat (``stale_ms`` later): until then the peer's session is stale
    and what it sends is lost. A frozen node answers no heartbeat either: its peers
    drop their sessions with it ``stale_ms`` after the freeze, if it is still frozen.
    A restarted node that dials such a peer races that stale session;
    ``Driver.admit_session`` decides, as in the real node (driver invariant 9).
 6. Per directed link, messages queue while the link is busy (bandwidth) or a LOW one
    waits; HIGH leaves before LOW; more than ``SESSION_MAX_QUEUE`` queued drops the
    session (a slow peer), as the real ``Session`` does; queued envelope batches are
    merged (``wancodec.coalesce``) as its writer does.
 7. A WAN link is the real cloud link's byte path (``mesh.core.wancodec``): a write waits
    ``WAN_LINGER_S`` to gather a batch, goes through the sender's ``WanCodec``, takes
    the link's bandwidth for its *wire* bytes, and is decoded by the receiver's codec
    on arrival, in stream order (a message that overtook an earlier one waits for it:
    a TCP stream), with the receiver's enrolment check (``wancodec.enrolled``: refused
    frames are counted in ``SimNode.session_refused``); after a ``C`` the receiver's
    driver applies it before the next message is decoded. Loss and duplication on a
    WAN link act on decoded messages (harsher than TCP, on purpose).
 5. Fault hooks (``LinkModel.blackhole``, ``SimNode.send_filter``, ``SimDisk.faults``,
    ``SimDisk.lie_about_fsync``, ``SimNode.freeze``) only change what the simulated
    ports do; the replica, the sync core and the driver are never touched (tests break
    the driver on purpose only through ``Driver.faults``).

Observers (``World.observers``) see ``emit(kind, **data)`` calls: ``created`` (node,
envelope: a local command signed it), ``acked`` (node, result: durable, acknowledged to
the POS; a replay answered as a duplicate carries its original's envelope), ``applied``
(node, envelopes: a ``Persist`` of remote envelopes), ``recovered`` (node: memory rebuilt
from disk after a failed write), ``crash`` and ``restart`` (node).
"""

from __future__ import annotations

import heapq
import math
import random
import zlib
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from mesh import config
from mesh.core.envelope import Envelope, decode
from mesh.core.identity import (
    NodeKey,
    TrustStore,
    Verifier,
    issue_certificate,
    issue_revocations,
    revocation_bounds,
)
from mesh.core.replica import CommandResult, Replica
from mesh.core.sync import HIGH, Alert, Effect, SyncCore
from mesh.core.wancodec import WanCodec, coalesce, enrolled
from mesh.driver import Driver
from mesh.durable import DurableReplica
from mesh.sim.ports import SimClock, SimDisk, SimIdentity, SimTransport, SimWorker

__all__ = ["DISTRIBUTIONS", "LinkModel", "SimDisk", "SimNode", "World"]


#: Jitter distributions a link may draw from; each has mean ``jitter_ms`` except
#: "uniform" (mean jitter/2, the historical default). Heavy tails are capped at
#: ``_MAX_JITTER_FACTOR`` x jitter so one draw cannot stall a run.
DISTRIBUTIONS = ("uniform", "normal", "exponential", "lognormal", "pareto")
_MAX_JITTER_FACTOR = 50.0


#: A WAN message on its way: (wire bytes, copies to deliver (0: lost), session).
_InFlight = tuple[bytes, int, int]
_Bytes = bytes  # (``LinkModel.bytes`` is a field name)


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
    #: The sending end's WanCodec of the current session ("wan" links); the receiving
    #: end's is on the link of the other direction.
    codec: WanCodec | None = None
    #: Messages waiting for the link (busy, behind a LOW one, or lingering on the WAN),
    #: all of session ``queue_session``.
    high: deque[_Bytes] = field(default_factory=deque)
    low: deque[_Bytes] = field(default_factory=deque)
    queue_session: int = 0
    pumping: bool = False
    #: WAN stream order (invariant 7): the next sequence number sent, the next one the
    #: receiver decodes, and those arrived ahead of it.
    tx_seq: int = 0
    rx_next: int = 0
    rx_wait: dict[int, _InFlight] = field(default_factory=dict)


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
        #: (seq, fn) to run at ``now`` (``soon``), in order; empty whenever time moves
        self._soon: deque[tuple[int, Callable[[], None]]] = deque()
        self._seq = 0
        self.nodes: dict[str, SimNode] = {}
        self.links: dict[tuple[str, str], LinkModel] = {}
        #: session number per node pair (sorted): bumped when a session opens
        self._sessions: dict[tuple[str, str], int] = {}
        self.store_key = NodeKey.from_bytes(self.rng.randbytes(32))
        #: One signature-check memory for every node hosted in this process (an object
        #: the world owns, not process-global state).
        self.verifier = Verifier()
        self.trust_template = TrustStore(store_id, self.store_key.public_key)
        self.certs: list[Any] = []
        #: How long certificates are valid (the edge, which holds the store key, renews
        #: them: mesh.driver invariant 8). Ten years unless a scenario says otherwise.
        self.cert_validity_ms = 10 * 365 * 24 * 3600 * 1000
        #: The node holding the store key: the first edge added.
        self.issuer: str | None = None
        #: The store's checkpointer, named in every node's trust store as ``store init``
        #: and the join answer do (``TrustStore.checkpointer``); None: the issuer as it
        #: stands when each node is added (the runner names the scenario's first edge).
        self.checkpointer: str | None = None
        #: How often the checkpointer proposes and how long an absent node holds the
        #: frontier back (``config.CHECKPOINT_EVERY_MS``, ``FRONTIER_HORIZON_MS``).
        self.checkpoint_every_ms = config.CHECKPOINT_EVERY_MS
        self.horizon_ms = config.FRONTIER_HORIZON_MS
        self.observers: list[Callable[[str, dict[str, Any]], None]] = []
        #: Whether LAN sessions run the session codec the real transport negotiates
        #: (``z1``: ``mesh.net.transport`` invariant 8, the WAN codec's format at
        #: ``LAN_ZLIB_*``), a stream as on the WAN (invariant 7). Off by default: a
        #: plain LAN link keeps the harsher per-message model (``reorder`` reorders;
        #: a stream would turn it into head-of-line delay) and runs ~1.3-1.6x faster;
        #: scenarios switch it on with ``[sim] lan_codec = true``.
        self.lan_codec = False
        #: sessions dropped by a transport, per reason (slow_peer, bad_wan_message)
        self.dropped_sessions: dict[str, int] = {}
        #: How long a peer's session with a crashed node lives on (invariant 8): the
        #: WebSocket heartbeat's worst case (a ping after HEARTBEAT_S of silence, and
        #: HEARTBEAT_S / 2 for its pong).
        self.stale_ms = config.HEARTBEAT_S * 1000 * 1.5
        #: sessions a peer held stale when the crashed node's new one came up, by what
        #: the driver did: "replaced" (the new one runs) or "refused" (until heartbeat)
        self.stale_races: dict[str, int] = {}

    # --- scheduling ---------------------------------------------------------------------

    def at(self, when: float, fn: Callable[[], None]) -> None:
        self._seq += 1
        heapq.heappush(self._queue, (max(when, self.now), self._seq, fn))

    def soon(self, fn: Callable[[], None]) -> None:
        """``at(now, fn)``, cheaper: the batch boundary (``SimClock.call_soon``) is
        half of all events. Same order as the heap would give (invariant 2)."""
        self._seq += 1
        self._soon.append((self._seq, fn))

    def after(self, delay: float, fn: Callable[[], None]) -> None:
        self.at(self.now + delay, fn)

    def run_until(self, until: float, max_events: int = 50_000_000) -> None:
        n = 0
        queue = self._queue
        soon = self._soon
        while True:
            if soon and (not queue or queue[0][0] > self.now or queue[0][1] > soon[0][0]):
                fn = soon.popleft()[1]  # at ``now``, scheduled before the heap's next
            elif queue and queue[0][0] <= until:
                at, _, fn = heapq.heappop(queue)
                self.now = at
            else:
                break
            fn()
            n += 1
            if n >= max_events:
                self.events += n
                raise RuntimeError(f"more than {max_events} events before t={until}")
        self.events += n
        self.now = max(self.now, until)

    def pending_events(self) -> int:
        return len(self._queue) + len(self._soon)

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
                 fsync_ms: float = 0.5, enrolled: bool = True) -> SimNode:
        """A node; ``enrolled=False``: one that joins later (``enrol``): until then it
        has its key but no certificate anyone knows of, and it does not run."""
        key = NodeKey.from_bytes(self.rng.randbytes(32))
        cert = issue_certificate(self.store_key, node_id=node_id, store_id=self.store_id,
                                 role=role, public_key=key.public_key,
                                 not_after=self.start_ms + self.cert_validity_ms)
        self.certs.append(cert)
        if role == "edge" and self.issuer is None:
            self.issuer = node_id
        node = SimNode(self, node_id, role, key, skew_ms=skew_ms, fsync_ms=fsync_ms)
        self.nodes[node_id] = node
        if not enrolled:
            node.unenrolled()
            return node
        for other in self.nodes.values():
            if not other.enrolled:
                continue
            other.trust.add_certificate(cert)
            if other is not node:
                node.trust.add_certificate(other.certificate)
            other.identity.save()  # enrolment writes node.json
        return node

    def enrol(self, node_id: str) -> bool:
        """A node joins mid-run with a join token (``mesh.net.enrol``): the issuer (the
        edge holding the store key) signs its certificate, keeps it and saves its trust
        store, as ``redeem`` does; the node gets that trust store (the join answer),
        saves it and starts; the certificate reaches everyone else by gossip. False
        (nothing done) while the issuer is not running: the join needs it."""
        node = self.nodes[node_id]
        issuer = self.nodes[self.issuer] if self.issuer is not None else None
        if node.enrolled:
            return True
        if issuer is None or not issuer.alive or issuer.frozen:
            return False
        now = self.wall_ms(issuer.skew_ms)
        cert = issue_certificate(self.store_key, node_id=node_id, store_id=self.store_id,
                                 role=node.role, public_key=node.key.public_key,
                                 not_after=now + self.cert_validity_ms)
        issuer.trust.add_certificate(cert)
        issuer.driver.trust_changed()
        trust = TrustStore.from_dict(issuer.trust.to_dict())
        trust.verifier = self.verifier
        node.identity.trust = trust
        node.identity.certificate = node.certificate = cert
        node.identity.save()  # the joining node writes node.json
        node.enrolled = True
        node.restart()
        self.emit("enrolled", node=node_id)
        return True

    def revoke(self, node_ids: list[str]) -> bool:
        """The store owner revokes nodes on the issuer (``storemesh nodes revoke``): it
        signs the next revocation list (each newly revoked node bounded by the issuer's
        replica's head for it) and hands it to its running node, which adopts
        it and passes it on (``SyncCore.learn_revocations``, as ``POST
        /v1/revocations``). False (nothing done) while the issuer is not running."""
        issuer = self.nodes[self.issuer] if self.issuer is not None else None
        if issuer is None or not issuer.alive or issuer.frozen:
            return False
        trust = issuer.trust
        revoked = set(trust.revoked) | set(node_ids)
        crl = issue_revocations(self.store_key, store_id=self.store_id,
                                version=trust.crl_version + 1, revoked=revoked,
                                upto=revocation_bounds(trust, revoked, issuer.replica.vv.get))
        issuer.driver.carry_out(issuer.core.learn_revocations(crl, self.wall_ms(issuer.skew_ms)))
        self.emit("revoked", nodes=tuple(node_ids))
        return True

    def connect(self, a: str, b: str, model: LinkModel | None = None,
                back: LinkModel | None = None) -> None:
        """A link a<->b (two directions, each with its own model); sessions open at once."""
        self.links[(a, b)] = model or LinkModel()
        self.links[(b, a)] = back or LinkModel(**_copyable(self.links[(a, b)]))
        self._session_up(a, b)

    def dialer(self, a: str, b: str) -> str:
        """Which end of the pair dials (invariant 4)."""
        if self.links[(a, b)].kind == "wan":
            ra, rb = self.nodes[a].role, self.nodes[b].role
            if (ra == "cloud") != (rb == "cloud"):
                return b if ra == "cloud" else a
        return min(a, b)

    def _session_up(self, a: str, b: str) -> None:
        a, b = (a, b) if self.dialer(a, b) == a else (b, a)  # a dials
        na, nb = self.nodes[a], self.nodes[b]
        ab, ba = self.links[(a, b)], self.links[(b, a)]
        if na.alive and nb.alive and ab.up and ba.up:
            for x, y in ((na, b), (nb, a)):
                if x.core.is_up(y):  # a stale session (invariant 8): the driver decides
                    kept = x.driver.admit_session(
                        y, outbound=x is na, old_outbound=x.dialed.get(y) == x.node_id)
                    key = "replaced" if kept else "refused"
                    self.stale_races[key] = self.stale_races.get(key, 0) + 1
                    if not kept:  # closed at once; the dialer tries again
                        self.after(self.discovery_delay(), partial(self._reconnect, a, b))
                        return
            na.dialed[b] = nb.dialed[a] = a
            # A new session: what the old one still has in flight is never delivered
            # into it (a TCP connection's bytes die with it).
            pair = (a, b) if a < b else (b, a)
            self._sessions[pair] = self._sessions.get(pair, 0) + 1
            wan = ab.kind == "wan"
            # A new session, a new codec at each end (as the transport), each with its
            # end's enrolment check (invariant 7): the WAN's, or the LAN's z1.
            if wan:
                ab.codec = WanCodec(enrolled(lambda: na.trust), na.refuse)
                ba.codec = WanCodec(enrolled(lambda: nb.trust), nb.refuse)
            elif self.lan_codec:
                ab.codec, ba.codec = _lan_codec(na), _lan_codec(nb)
            else:
                ab.codec = ba.codec = None
            if ab.codec is not None:
                for link in (ab, ba):
                    link.tx_seq = link.rx_next = 0
                    link.rx_wait.clear()
            na.driver.session_up(b, wan=wan)
            nb.driver.session_up(a, wan=wan)

    def _session_down(self, a: str, b: str) -> None:
        for x, y in ((a, b), (b, a)):
            link = self.links.get((x, y))
            if link is not None:
                link.high.clear()  # queued messages die with the session
                link.low.clear()
            node = self.nodes[x]
            if node.alive and node.core.is_up(y):
                if node.frozen:  # it learns when it runs again
                    node.defer(partial(node.lost_session, y))
                else:
                    node.driver.session_down(y)

    def drop_session(self, a: str, b: str, reason: str) -> None:
        """A transport ended the session a<->b (slow peer, bad WAN message): both ends
        see it go down; it re-opens after the discovery delay."""
        self.dropped_sessions[reason] = self.dropped_sessions.get(reason, 0) + 1
        if self.nodes[a].core.is_up(b) or self.nodes[b].core.is_up(a):
            self._session_down(a, b)
            self.after(self.discovery_delay(), partial(self._reconnect, a, b))

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
        a, b = (a, b) if self.dialer(a, b) == a else (b, a)  # a dials (invariant 4)
        na, nb = self.nodes[a], self.nodes[b]
        if not (na.alive and nb.alive) or na.frozen or nb.frozen or na.core.is_up(b):
            return  # (a dialer that holds a session, even a stale one, does not dial)
        self._session_up(a, b)

    def stale_session(self, holder: str, silent: str, *, frozen: bool = False) -> None:
        """``holder`` keeps its session with ``silent`` (crashed, or ``frozen``: a
        stopped process answers no ping either) until the heartbeat notices (invariant
        8); then it ends at both ends (a frozen one learns when it runs again), and the
        dialer of the pair dials again."""
        session = self._session_of(holder, silent)

        def notice() -> None:
            node = self.nodes[holder]
            if (not node.alive or not node.core.is_up(silent)
                    or self._session_of(holder, silent) != session
                    or (frozen and not self.nodes[silent].frozen)):
                return  # replaced, cut, crashed or resumed meanwhile
            if node.frozen:
                node.defer(notice)
                return
            self.dropped_sessions["heartbeat"] = self.dropped_sessions.get("heartbeat", 0) + 1
            self._session_down(holder, silent)
            self.after(self.discovery_delay(), partial(self._reconnect, holder, silent))
        self.after(self.stale_ms, notice)

    def send(self, src: str, dst: str, data: bytes, priority: int = HIGH) -> None:
        """``src`` sends ``data`` on its session with ``dst`` (invariant 6: queued while
        the link is busy or a LOW message waits, HIGH first; invariant 7 on the WAN)."""
        link = self.links.get((src, dst))
        if link is None or not link.up:
            return
        session = self._session_of(src, dst)
        if link.queue_session != session:  # what an earlier session queued died with it
            link.high.clear()
            link.low.clear()
            link.queue_session = session
        wan = link.kind == "wan"
        if (not wan and priority == HIGH and not link.high and not link.low
                and (not link.bandwidth or link.busy_until <= self.now)):
            self._transmit(link, src, dst, data, session)
            return
        if len(link.high) + len(link.low) >= config.SESSION_MAX_QUEUE:
            self.drop_session(src, dst, "slow_peer")
            return
        (link.high if priority == HIGH else link.low).append(data)
        if not link.pumping:
            link.pumping = True
            linger = config.WAN_LINGER_S * 1000 if wan else 0.0
            self.at(max(self.now + linger, link.busy_until), partial(self._pump, src, dst))

    def _pump(self, src: str, dst: str) -> None:
        link = self.links[(src, dst)]
        link.pumping = False
        session = self._session_of(src, dst)
        if not link.up or link.queue_session != session:
            link.high.clear()
            link.low.clear()
            return
        while link.high or link.low:
            if link.bandwidth and link.busy_until > self.now:
                link.pumping = True
                self.at(link.busy_until, partial(self._pump, src, dst))
                return
            data = coalesce(link.high or link.low)
            self._transmit(link, src, dst, data, session)

    def _transmit(self, link: LinkModel, src: str, dst: str, data: bytes,
                  session: int) -> None:
        link.messages += 1
        link.bytes += len(data)
        if data[:1] == b"V":
            link.summary_bytes += len(data)
        size = len(data)
        wire = b""
        if link.codec is not None:
            # What the real WAN transport puts on the wire (prev elided, raw signatures,
            # one zlib stream per direction): its size is what the link carries.
            wire = link.codec.encode(data)
            size = len(wire)
        link.wire_bytes += size
        rng = self.rng
        lost = link.blackhole or rng.random() < link.loss
        if lost:
            link.lost += 1
            if link.codec is not None:  # the receiver's stream still holds it
                self._in_flight(link, src, dst, wire, 0, session, link.latency_ms)
            return
        copies = 2 if rng.random() < link.duplicate else 1
        if copies == 2:
            link.duplicated += 1
        for i in range(copies):
            delay = link.latency_ms + self._jitter(link)
            if link.reorder and rng.random() < link.reorder:
                delay += rng.random() * link.reorder_ms
            if link.bandwidth:
                start = max(self.now, link.busy_until)
                link.busy_until = start + size / link.bandwidth
                delay += link.busy_until - self.now
            if link.fifo:
                arrival = max(self.now + delay, link.last_arrival)
                link.last_arrival = arrival
                delay = arrival - self.now
            if link.codec is not None:
                if i == 0:  # one decode; the network's duplicate is a second delivery
                    self._in_flight(link, src, dst, wire, copies, session, delay)
            else:
                self.after(delay, partial(self._deliver, src, dst, data, session))

    def _in_flight(self, link: LinkModel, src: str, dst: str, wire: bytes, copies: int,
                   session: int, delay: float) -> None:
        seq = link.tx_seq
        link.tx_seq += 1
        self.after(delay, partial(self._arrive, src, dst, seq, (wire, copies, session)))

    def _arrive(self, src: str, dst: str, seq: int, msg: _InFlight) -> None:
        """A WAN message reached ``dst``; decode what is now in stream order."""
        link = self.links[(src, dst)]
        if msg[2] != self._session_of(src, dst):
            return  # sent in an earlier session of this pair
        link.rx_wait[seq] = msg
        if seq == link.rx_next:
            self._read_stream(src, dst, msg[2])

    def _read_stream(self, src: str, dst: str, session: int) -> None:
        """The receiver's reader: decode (its own codec, its enrolment check) and hand
        over every message that is next in the stream (invariant 7)."""
        link = self.links[(src, dst)]
        node = self.nodes[dst]
        while link.rx_next in link.rx_wait:
            if session != self._session_of(src, dst) or not node.alive or not link.up:
                link.rx_wait.clear()
                return
            if node.frozen:  # the process reads nothing until it runs again
                node.defer(partial(self._read_stream, src, dst, session))
                return
            wire, copies, _ = link.rx_wait.pop(link.rx_next)
            link.rx_next += 1
            back = self.links[(dst, src)].codec
            try:
                assert back is not None
                data = back.decode(wire)
            except (ValueError, zlib.error, AssertionError):
                reason = f"bad_{link.kind}_message"
                self.drop_session(src, dst, reason)
                node.refuse(reason)
                return
            for _ in range(copies):
                self._deliver(src, dst, data, session)
            if copies and data[:1] == b"C" and link.rx_next in link.rx_wait:
                # As the real reader: the driver's drain of the C (queued just now)
                # runs before the next message is decoded.
                self.soon(partial(self._read_stream, src, dst, session))
                return

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
        if node.frozen:  # the kernel holds it until the process runs again
            node.defer(partial(self._deliver, src, dst, data, session))
            return
        node.driver.message(src, data)


def _copyable(m: LinkModel) -> dict[str, Any]:
    return {"latency_ms": m.latency_ms, "jitter_ms": m.jitter_ms, "loss": m.loss,
            "duplicate": m.duplicate, "bandwidth": m.bandwidth, "kind": m.kind,
            "distribution": m.distribution, "reorder": m.reorder, "reorder_ms": m.reorder_ms,
            "fifo": m.fifo}


class SimNode:
    """The real node program (``Driver`` over ``DurableReplica`` + ``SyncCore``) on
    simulated ports, plus crash and restart."""

    def __init__(self, world: World, node_id: str, role: str, key: NodeKey, *,
                 skew_ms: float, fsync_ms: float,
                 snapshot_every: int = config.SNAPSHOT_EVERY) -> None:
        self.world = world
        self.node_id = node_id
        self.role = role
        self.key = key
        self.skew_ms = skew_ms
        self.snapshot_every = snapshot_every
        self.certificate = world.certs[-1]
        trust = TrustStore(world.store_id, world.store_key.public_key,
                           checkpointer=world.checkpointer or world.issuer)
        trust.verifier = world.verifier
        trust.add_certificate(self.certificate)
        self.identity = SimIdentity(node_id, world.store_id, role, key, trust,
                                    self.certificate)
        if world.issuer == node_id:
            self.identity.store_key = world.store_key
            self.identity.validity_ms = world.cert_validity_ms
        self.disk = SimDisk(world, fsync_ms)
        self.sim_clock = SimClock(world, self)
        self.transport = SimTransport(world, self)
        self.worker = SimWorker(self.sim_clock)
        self.alive = True
        #: False until an ``enrol`` fault lets it join (``World.enrol``)
        self.enrolled = True
        #: SIGSTOP-like: nothing of this process runs; what it would run waits here
        self.frozen = False
        self._deferred: list[Callable[[], None]] = []
        self.alerts: list[Alert] = []
        self.acked: list[CommandResult] = []
        #: frames its sessions refused, by reason (the real node's ``session_<reason>``)
        self.session_refused: dict[str, int] = {}
        #: per peer, which end dialled the session held with it (world invariant 4)
        self.dialed: dict[str, str] = {}
        #: Fault hook: sees every message this node sends (peer, bytes) and returns the
        #: bytes to send (maybe altered) or None to drop them. Tests use it to build
        #: deliberately broken nodes; the sync core never knows.
        self.send_filter: Callable[[str, bytes], bytes | None] | None = None
        #: Called with every new Driver (boot and restart), e.g. to set its ``faults``.
        self.on_boot: list[Callable[[Driver], None]] = []
        self.durable: DurableReplica[SimDisk]
        self.core: SyncCore
        self.driver: Driver
        self._boot()

    def _boot(self) -> None:
        """A process start: rebuild from the disk, a new core and driver."""
        self.durable = DurableReplica(self.identity, self.disk, self.snapshot_every,
                                      horizon_ms=self.world.horizon_ms)
        self.core = SyncCore(self.durable.replica, self.identity.trust,
                             random.Random(self.world.rng.random()))
        self.driver = Driver(self.durable, self.core, self.transport, self.sim_clock,
                             self.worker, self.identity)
        self.driver.checkpoint_every_ms = self.world.checkpoint_every_ms
        self.driver.alerts = self.alerts
        self.driver.signed_listeners.append(self._signed)
        self.driver.applied_listeners.append(self._applied)
        self.driver.recovered_listeners.append(self._recovered)
        self.driver.state_listeners.append(self._state_installed)
        for hook in self.on_boot:
            hook(self.driver)
        self.driver.start()

    @property
    def replica(self) -> Replica:
        return self.durable.replica

    @property
    def trust(self) -> TrustStore:
        return self.identity.trust

    def clock(self) -> int:
        return self.world.wall_ms(self.skew_ms)

    def refuse(self, reason: str) -> None:
        """A session of this node refused a frame (``Session.refuse``)."""
        self.session_refused[reason] = self.session_refused.get(reason, 0) + 1

    def _signed(self, env: Envelope) -> None:
        self.world.emit("created", node=self.node_id, envelope=env)

    def _recovered(self) -> None:
        self.world.emit("recovered", node=self.node_id)

    def _state_installed(self, frontier: dict[str, int]) -> None:
        self.world.emit("state_installed", node=self.node_id, frontier=frontier,
                        vv=self.replica.vv.to_dict())

    def _applied(self, envs: list[Envelope], local: bool) -> None:
        if not local:
            self.world.emit("applied", node=self.node_id, envelopes=tuple(envs))

    # --- commands -----------------------------------------------------------------------

    def command(self, fn: Callable[[Replica], CommandResult],
                on_ack: Callable[[CommandResult], None] | None = None) -> CommandResult | None:
        """Run a local command; acknowledged (``on_ack``) once the driver says it is
        durable. Raises ``CommandError`` for a refused command."""
        if not self.alive:
            return None
        driver = self.driver

        def done(result: CommandResult, exc: BaseException | None) -> None:
            if exc is not None or driver is not self.driver:
                return  # not written (the POS sees an error), or the process is gone
            if result.envelope is None and result.duplicate:
                # A replay acknowledges its original: the checker holds it to that.
                env = self._envelope(result.seq)
                if env is None:
                    return
                result = CommandResult(env, result.origin, result.seq, True,
                                       result.reservation_id)
            if result.envelope is not None:
                self.acked.append(result)
                self.world.emit("acked", node=self.node_id, result=result)
            if on_ack:
                on_ack(result)
        return self.driver.execute(fn, done)

    def _envelope(self, seq: int) -> Envelope | None:
        """Our own envelope ``seq``, as memory holds it (durable or not)."""
        raws = self.disk.by_origin.get(self.node_id, [])
        if 0 < seq <= len(raws):
            return decode(raws[seq - 1])
        for env in reversed(self.disk.rows):
            if env.origin == self.node_id and env.seq == seq:
                return env
        return None

    def handle(self, effects: list[Effect]) -> None:
        """Carry out effects a test took from the core directly."""
        self.driver.carry_out(effects)

    # --- freeze, crash and restart --------------------------------------------------------

    def defer(self, fn: Callable[[], None]) -> None:
        self._deferred.append(fn)

    def lost_session(self, peer: str) -> None:
        if self.core.is_up(peer):
            self.driver.session_down(peer)

    def freeze(self) -> None:
        """SIGSTOP: timers, message deliveries and completions wait until ``resume``;
        peers drop their sessions with it at the heartbeat (world invariant 8)."""
        if self.alive and not self.frozen:
            self.frozen = True
            for other in self.world.nodes.values():
                if other is not self and other.alive and other.core.is_up(self.node_id):
                    self.world.stale_session(other.node_id, self.node_id, frozen=True)

    def resume(self) -> None:
        """SIGCONT: everything that waited runs now, in order; dropped sessions re-open."""
        if not self.frozen:
            return
        self.frozen = False
        todo, self._deferred = self._deferred, []
        for fn in todo:
            self.world.at(self.world.now, fn)
        # after what waited (it may learn of sessions dropped meanwhile): re-open those
        self.world.at(self.world.now, self._reconnect_all)

    def _reconnect_all(self) -> None:
        if not self.alive or self.frozen:
            return
        for (a, b) in list(self.world.links):
            if a == self.node_id and not self.core.is_up(b):
                self.world.after(self.world.discovery_delay(),
                                 partial(self.world._reconnect, self.node_id, b))

    def crash(self) -> None:
        """Power loss: the process (driver, replica, core) is gone, the disk keeps only
        durable rows, sessions end."""
        if not self.alive:
            return
        self.alive = False
        self.frozen = False
        self._deferred = []
        self.driver.close()
        self.disk.crash()
        for other in self.world.nodes.values():
            if other is not self and other.alive and other.core.is_up(self.node_id):
                self.world.stale_session(other.node_id, self.node_id)
        for (a, b), link in self.world.links.items():
            if self.node_id in (a, b):
                link.high.clear()
                link.low.clear()
        self.world.emit("crash", node=self.node_id)

    def unenrolled(self) -> None:
        """Not joined yet: the process is not running (its first start is the join)."""
        self.enrolled = False
        self.alive = False
        self.driver.close()

    def restart(self) -> None:
        """Boot: a new driver over the same disk, then reconnect after discovery."""
        if self.alive or not self.enrolled:
            return
        self.identity.reload()
        self._boot()
        self.alive = True
        self.world.emit("restart", node=self.node_id)
        for (a, b) in list(self.world.links):
            if a == self.node_id:
                self.world.after(self.world.discovery_delay(),
                                 partial(self.world._reconnect, self.node_id, b))


def _lan_codec(node: SimNode) -> WanCodec:
    """The receiving/sending end's codec of a LAN session, as ``mesh.net.transport``
    makes it for ``z1`` (its enrolment check, the LAN's compression settings)."""
    return WanCodec(enrolled(lambda: node.trust), node.refuse, level=config.LAN_ZLIB_LEVEL,
                    wbits=config.LAN_ZLIB_WBITS, mem_level=config.LAN_ZLIB_MEM_LEVEL,
                    name="lan")

"""The sync core: push and anti-entropy between one node and its peers, without I/O.

Inputs go in (``peer_up``, ``peer_down``, ``receive``, ``durable``, ``fetched``,
``on_timer``), each with ``now`` in ms; effects come out (``Send``, ``Persist``,
``Fetch``, ``Alert``, ``TrustChanged``). The asyncio node and the partition simulator
drive this same class; only the drivers differ.

Wire messages (bytes, first byte is the type):

* ``V`` + orjson ``{"vv": {origin: seq}, "links": [node ids], "nc": digest, "crl": v,
  "rx": n}`` — our version vector (highest contiguous seq held per origin), the peers we
  have live sessions with, a digest of the certificates and the revocation list version
  we hold, and how many envelopes we received from this peer in this session. It is the
  anti-entropy summary *and* the acknowledgement that opens the sender's window.
* ``E`` + frames of ``u32 big-endian length + raw envelope`` — envelopes, verbatim.
* ``C`` + orjson ``{"certs": [...], "crl": {...} | null, "roster": {...} | null}`` —
  certificates, the revocation list (which also names revoked API devices) and the staff
  roster (``mesh.auth``), all signed by the store key and relayable by anyone. ``V``
  carries the roster version held as ``"ro"``, so a peer behind gets the newer one.

Invariants:
 1. Envelopes are forwarded verbatim; every envelope is verified (signature, or its
    hash chain to a verified one) before it is applied, whoever sent it.
 2. Per peer and origin, ``sent`` only grows while the session lives and we send an
    envelope of ``origin`` only if it directly follows ``sent`` — so a peer receives
    each origin's envelopes in order, without gaps, on a reliable link.
 3. Envelopes outstanding per peer (sent or being read, and not acknowledged) never
    exceed ``MAX_INFLIGHT_PER_PEER`` for catch-up, plus ``PUSH_RESERVE`` for fresh
    pushes: catch-up is paced by the receiver's acknowledgements, and a live sale is
    not stuck behind a catch-up.
 4. We only fetch from storage what is durable (``stored`` vector), so a fetch never
    misses an envelope that memory holds but disk does not yet.
 5. Anything a peer sends that is malformed, oversized, forged or inconsistent is
    dropped and counted under a reason in ``stats``; nothing a peer sends raises (an
    exception we did not foresee is counted as ``internal_error``, never propagated;
    ``mesh.ops`` bounds keep the replica's "whole or not at all" true meanwhile).
 6. No clock and no global randomness: ``now`` comes in, jitter comes from the
    injected ``random.Random``.
 7. An envelope for an (origin, seq) we hold or buffer is a duplicate only if its hash
    is the one we hold. Otherwise it is verified: a failing copy is refused under its
    reason (``bad_signature``, ...), a valid one is equivocation: counted, kept as
    evidence by the replica and raised as an ``Alert`` (at most
    ``MAX_ALERTS_PER_ORIGIN`` per origin; later ones are counted only).
"""

from __future__ import annotations

import hashlib
import heapq
import random
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from itertools import repeat

import orjson

from mesh import config
from mesh.auth import Roster
from mesh.crdt import VersionVector
from mesh.envelope import Envelope, decode, verify, verify_chain
from mesh.errors import EnvelopeError, Equivocation, Malformed, Oversized
from mesh.identity import Certificate, RevocationList, TrustStore
from mesh.replica import Replica

__all__ = [
    "NOT_REFUSALS",
    "Alert",
    "Effect",
    "Fetch",
    "Persist",
    "Send",
    "SyncCore",
    "TrustChanged",
    "encode_batch",
    "split_batch",
]

_LEN = struct.Struct(">I")
#: ``stats`` keys that count expected traffic, not a peer's fault: the same envelope
#: relayed by two peers; a summary overtaken by a newer one on a reordering link.
NOT_REFUSALS = frozenset({"duplicate", "stale_summary"})
HIGH, LOW = 0, 1  # send priorities: stock-moving events first, catalog after


@dataclass(frozen=True, slots=True)
class Send:
    peer: str
    data: bytes
    priority: int = HIGH


@dataclass(frozen=True, slots=True)
class Persist:
    """Append these applied remote envelopes to the ledger (in this order)."""

    envelopes: tuple[Envelope, ...]


@dataclass(frozen=True, slots=True)
class Fetch:
    """Read ``origin``'s envelopes ``first..last`` from storage, then call ``fetched``."""

    peer: str
    origin: str
    first: int
    last: int


@dataclass(frozen=True, slots=True)
class Alert:
    """Something staff must see: equivocation evidence (kept by the driver)."""

    kind: str
    origin: str
    seq: int
    first: bytes
    second: bytes


@dataclass(frozen=True, slots=True)
class TrustChanged:
    """New certificates or revocations were learned: the driver persists the trust store."""


Effect = Send | Persist | Fetch | Alert | TrustChanged


def encode_batch(raws: Iterable[bytes]) -> bytes:
    parts = [b"E"]
    for raw in raws:
        parts.append(_LEN.pack(len(raw)))
        parts.append(raw)
    return b"".join(parts)


def split_batch(data: bytes) -> list[bytes]:
    """Frames of an ``E`` message (without its type byte); ``Malformed`` if truncated."""
    out: list[bytes] = []
    pos, end = 1, len(data)
    while pos < end:
        if end - pos < 4:
            raise Malformed("truncated frame header")
        (n,) = _LEN.unpack_from(data, pos)
        pos += 4
        if n > config.MAX_ENVELOPE_BYTES:
            raise Oversized(f"frame of {n} bytes")
        if end - pos < n:
            raise Malformed("truncated frame")
        out.append(data[pos : pos + n])
        pos += n
        if len(out) > config.MAX_BATCH_ENVELOPES:
            raise Malformed(f"more than {config.MAX_BATCH_ENVELOPES} envelopes in a batch")
    return out


@dataclass(slots=True)
class _Peer:
    id: str
    ready: bool = False  # its first version vector arrived
    acked: VersionVector = field(default_factory=VersionVector)
    sent: VersionVector = field(default_factory=VersionVector)
    links: frozenset[str] = frozenset()
    reach: frozenset[str] = frozenset()  # links and the peer itself
    wan: bool = False
    fetching: dict[str, int] = field(default_factory=dict)  # origin -> envelopes asked
    #: origins where it lacked, at its previous summary, what we held then
    held_at_report: dict[str, int] = field(default_factory=dict)
    #: origins where it still lacks what we held at its previous summary (not healed by
    #: the origin's own pushes within a whole summary period): we serve those too
    stuck: frozenset[str] = frozenset()
    sent_at: dict[str, int] = field(default_factory=dict)  # origin -> when we last sent
    sent_tx: dict[str, int] = field(default_factory=dict)  # origin -> tx after that send
    vv_at: int = 0  # when we last sent it our summary
    unacked_in: int = 0  # envelopes received since we last sent it our vv
    tx: int = 0  # envelopes sent to it in this session
    rx: int = 0  # envelopes received from it in this session
    their_rx: int = -1  # the rx of its latest summary (older ones arriving late: stale)
    next_vv: int = 0
    interval: int = config.SYNC_INTERVAL_MS
    cur_interval: int = config.SYNC_INTERVAL_MS  # the one the current deadline used
    certs: int = 0
    crl: int = -1

    def inflight(self) -> int:
        """Envelopes sent or being read for this peer and not yet acknowledged."""
        acked = self.acked.view().get
        sent = 0
        for o, s in self.sent.items():
            a = acked(o, 0)
            if s > a:
                sent += s - a
        return sent + sum(self.fetching.values())


def _priority(env: Envelope) -> int:
    return LOW if env.meta.get("kind") == "catalog" else HIGH


class SyncCore:
    """Replication state machine of one node (sans-I/O)."""

    def __init__(self, replica: Replica, trust: TrustStore, rng: random.Random,
                 stored: VersionVector | None = None) -> None:
        self.replica = replica
        self.trust = trust
        self.rng = rng
        #: What storage holds durably (invariant 4); the driver keeps it current via
        #: ``durable``. Starts as what the replica rebuilt from disk.
        self.stored = stored.copy() if stored is not None else replica.vv.copy()
        self.peers: dict[str, _Peer] = {}
        self.stats: dict[str, int] = {}
        self.received = 0  # envelopes applied from peers
        self.sent_envelopes = 0
        self.bytes_out = 0
        self.bytes_in = 0
        self._digest: tuple[int, str] = (-1, "")
        #: (deadline, peer) for every summary deadline set; entries whose peer is gone
        #: or whose deadline moved are skipped when they come up (lazy deletion)
        self._deadlines: list[tuple[int, str]] = []
        #: the latest ``now`` a deadline was set or checked at: an on_timer with an
        #: earlier ``now`` means the wall clock went back (see on_timer)
        self._timer_now = 0
        #: (peer, origin) -> whether another of the peer's peers has a session with
        #: origin (see _eligible); cleared whenever sessions or links change.
        self._covered: dict[tuple[str, str], bool] = {}
        #: (source, origin) -> peers to relay that origin's envelopes to (see _relay)
        self._relay_targets: dict[tuple[str, str], tuple[str, ...]] = {}
        #: origin -> peers without a session with it (see durable)
        self._unreached: dict[str, tuple[str, ...]] = {}
        self._stuck_peers: set[str] = set()  # peers whose ``stuck`` is not empty
        #: origin -> equivocation alerts raised (MAX_ALERTS_PER_ORIGIN); only origins
        #: with a certificate get here (the envelope verified), so the table is bounded
        self._alerted: dict[str, int] = {}

    # --- helpers -------------------------------------------------------------------------

    def _refusals(self) -> int:
        return sum(v for k, v in self.stats.items() if k not in NOT_REFUSALS)

    def _count(self, key: str, n: int = 1) -> None:
        self.stats[key] = self.stats.get(key, 0) + n

    def _send(self, out: list[Effect], peer: str, data: bytes, priority: int = HIGH) -> None:
        self.bytes_out += len(data)
        out.append(Send(peer, data, priority))

    def _vv_message(self, rx: int) -> bytes:
        links = sorted(self.peers)
        crl = self.trust.crl_version
        return b"V" + orjson.dumps({"vv": self.replica.vv.to_dict(), "links": links,
                                    "nc": self._cert_digest(), "crl": crl, "rx": rx,
                                    "ro": self.trust.roster_version})

    def _cert_digest(self) -> str:
        """Which certificates we hold, in 16 hex chars: peers that differ swap them."""
        if self._digest[0] != self.trust.version:
            h = hashlib.sha256()
            for c in self.trust.certificates():
                h.update(f"{c.node_id}\x00{c.not_after}\x00".encode())
            self._digest = (self.trust.version, h.hexdigest()[:16])
        return self._digest[1]

    def _send_vv(self, out: list[Effect], peer: _Peer, now: int) -> None:
        self._send(out, peer.id, self._vv_message(peer.rx))
        peer.unacked_in = 0
        peer.vv_at = now
        jitter = self.rng.uniform(0.75, 1.25)
        peer.cur_interval = self._interval(peer, now)
        peer.next_vv = now + int(peer.cur_interval * jitter)
        heapq.heappush(self._deadlines, (peer.next_vv, peer.id))
        if now > self._timer_now:
            self._timer_now = now

    def _interval(self, peer: _Peer, now: int) -> int:
        """Summary interval for ``peer``. In a big store summaries would cost O(peers²)
        per second, so a peer that is keeping up hears from us n/SYNC_FULL_RATE_PEERS
        times less often: pushes still reach everyone at once, and a receiver that sees
        a gap or refuses something says so at once (SYNC_NACK_MS). A peer whose gap has
        not moved for an interval gets the full rate, and so does a WAN link (its
        interval is long already, and does not grow with the store's size)."""
        n = len(self.peers)
        if peer.wan or n <= config.SYNC_FULL_RATE_PEERS or peer.stuck:
            return peer.interval
        return peer.interval * n // config.SYNC_FULL_RATE_PEERS

    def _certs_message(self) -> bytes:
        crl, roster = self.trust.crl, self.trust.roster
        return b"C" + orjson.dumps({
            "certs": [c.to_dict() for c in self.trust.certificates()],
            "crl": None if crl is None else crl.to_dict(),
            "roster": None if roster is None else roster.to_dict(),
        })

    # --- sessions --------------------------------------------------------------------------

    def peer_up(self, peer_id: str, now: int, *, wan: bool = False) -> list[Effect]:
        """A session with ``peer_id`` (authenticated by the transport) is established.
        ``wan``: a metered link (the cloud): summaries go out less often there."""
        out: list[Effect] = []
        if peer_id not in self.peers and len(self.peers) >= config.MAX_PEERS:
            self._count("peer_table_full")
            return out
        peer = self.peers[peer_id] = _Peer(peer_id, reach=frozenset((peer_id,)))
        if wan:
            peer.wan = True
            peer.interval = config.SYNC_WAN_INTERVAL_MS
        # Certificates follow only if its summary shows it holds other ones (_on_vv):
        # in a store where everyone already holds everyone's, none cross at all.
        self._send_vv(out, peer, now)
        self._links_changed(now, peer)
        return out

    def peer_down(self, peer_id: str, now: int) -> list[Effect]:
        self._stuck_peers.discard(peer_id)
        if self.peers.pop(peer_id, None) is not None:
            self._links_changed(now, None)
        return []

    def _topology_changed(self) -> None:
        self._covered.clear()
        self._relay_targets.clear()
        self._unreached.clear()

    def _links_changed(self, now: int, new: _Peer | None) -> None:
        """Our sessions changed: tell the LAN peers soon (debounced, so a burst of
        sessions at start-up costs one summary per peer). Relaying decides by the
        peers' links; stale links mean copies sent twice, or not relayed at all."""
        self._topology_changed()
        due = now + config.SYNC_LINKS_MS
        for peer in self.peers.values():
            if peer is not new and not peer.wan and peer.next_vv > due:
                peer.next_vv = due
                heapq.heappush(self._deadlines, (due, peer.id))

    def is_up(self, peer_id: str) -> bool:
        return peer_id in self.peers

    def lag(self, peer_id: str) -> int:
        """Envelopes we hold that the peer has not acknowledged."""
        peer = self.peers.get(peer_id)
        if peer is None:
            return 0
        return sum(max(0, s - peer.acked.get(o)) for o, s in self.replica.vv.items()
                   if o != peer_id)

    # --- local and durable envelopes ---------------------------------------------------------

    def durable(self, envs: Sequence[Envelope], now: int) -> list[Effect]:
        """These envelopes are now on disk. Local ones are pushed to every peer now
        (never before: invariant 2 of mesh.durable); all advance ``stored``."""
        out: list[Effect] = []
        local = []
        for env in envs:
            if env.seq == self.stored.get(env.origin) + 1:
                self.stored.advance(env.origin, env.seq)
            elif env.seq > self.stored.get(env.origin):
                self.stored.set(env.origin, env.seq)
            if env.origin == self.replica.node_id:
                local.append(env)
        if local:
            for peer in self.peers.values():
                self._push(out, peer, local, now)
        advanced = {env.origin for env in envs}
        heads = [(o, self.stored.get(o)) for o in advanced]
        me = self.replica.node_id
        only_others = me not in advanced
        peers: Iterable[_Peer] = self.peers.values()
        if only_others and len(advanced) == 1 and not self._stuck_peers:
            # The common case (one peer's envelopes, nobody stuck): only the peers with
            # no session with that origin can need a pump; memoised per topology.
            (origin,) = advanced
            pids = self._unreached.get(origin)
            if pids is None:
                pids = self._unreached[origin] = tuple(
                    p.id for p in self.peers.values() if origin not in p.reach)
            peers = [self.peers[pid] for pid in pids if pid in self.peers]
        for peer in peers:
            if not peer.ready or (only_others and not peer.stuck and advanced <= peer.reach):
                continue  # it has sessions with all those origins: they serve it
            # Inline pre-check (this runs for every peer after every group commit): a
            # pump is needed only where the peer may be served an origin it lacks.
            for origin, have in heads:
                if (have > peer.sent.get(origin) and origin != peer.id
                        and self._eligible(peer, origin, now)):
                    self._pump(out, peer, now, advanced)
                    break
        return out

    def _push(self, out: list[Effect], peer: _Peer, envs: Sequence[Envelope], now: int) -> None:
        """Send the envelopes that directly follow what the peer has from us (inv. 2)."""
        if not peer.ready:
            return
        high: list[bytes] = []
        low: list[bytes] = []
        inflight = -1  # computed once, on the first envelope that qualifies
        for env in envs:
            if env.seq != peer.sent.get(env.origin) + 1 or env.origin == peer.id:
                continue
            if inflight < 0:
                inflight = peer.inflight()
            if inflight >= config.MAX_INFLIGHT_PER_PEER + config.PUSH_RESERVE:
                break  # fresh envelopes may use the reserve a catch-up cannot
            inflight += 1
            peer.sent.set(env.origin, env.seq)
            peer.sent_at[env.origin] = now
            peer.sent_tx[env.origin] = peer.tx + len(high) + len(low) + 1
            (low if _priority(env) == LOW else high).append(env.raw)
        for raws, prio in ((high, HIGH), (low, LOW)):
            if raws:
                self.sent_envelopes += len(raws)
                peer.tx += len(raws)
                for chunk in _chunks(raws):
                    self._send(out, peer.id, encode_batch(chunk), prio)

    def _eligible(self, peer: _Peer, origin: str, now: int) -> bool:
        """Whether we serve ``origin``'s envelopes to ``peer`` from storage. Every node
        serves its own. A third party's only when the peer is stuck on it (it still
        lacks what we held at its previous summary: a lost push), or when the peer has
        no live session with that origin and nobody nearer serves it: if we have a
        session with the origin, no other peer of the peer with a smaller id has one
        too; if we have none, none of its peers (as far as we know them) has one. So a
        rejoining register is not flooded with one copy per peer, envelopes merely in
        flight are not sent twice, and the cloud's envelopes reach registers from one
        edge node holding the WAN link, not from every register."""
        if origin == self.replica.node_id or origin in peer.stuck:
            return True
        if origin in peer.links:
            return False
        key = (peer.id, origin)
        covered = self._covered.get(key)
        if covered is None:  # memoised until any session or any peer's links change
            me = self.replica.node_id
            peers = self.peers
            if origin in peers:  # we are a bridge: defer only to a preferred one
                covered = any(q != me and self._preferred_bridge(q, origin)
                              for q in peer.links)
            else:
                covered = any(q != me and q in peers and origin in peers[q].links
                              for q in peer.links)
            self._covered[key] = covered
        return not covered

    def _preferred_bridge(self, q: str, origin: str) -> bool:
        """Whether peer ``q``, like us a bridge to ``origin`` (a node with a session to
        it), should relay and serve ``origin``'s envelopes instead of us. Both ``q`` and
        the origin must report that session (the origin's summary comes within
        SYNC_LINKS_MS of a change; a WAN peer's may be minutes old). A LAN node never
        defers to a peer it reaches over WAN (the cloud: a detour over the metered
        link); a node whose sessions are all WAN (the cloud) defers to any LAN bridge.
        Otherwise the smaller node id relays."""
        peers = self.peers
        p = peers.get(q)
        o = peers.get(origin)
        if p is None or o is None or origin not in p.links or q not in o.links:
            return False
        if self._wan_only():
            return True
        return not p.wan and q < self.replica.node_id

    def _wan_only(self) -> bool:
        return bool(self.peers) and all(p.wan for p in self.peers.values())

    def _pump(self, out: list[Effect], peer: _Peer, now: int,
              origins: set[str] | None = None) -> None:
        """Fetch what the peer lacks from storage, within its window (invariant 3);
        only for ``origins`` if given (those whose stored head just advanced)."""
        room = -1  # the window is computed (O(origins)) only once something qualifies
        if origins is None:
            # Only these can be eligible (see _eligible): our own, those it is stuck
            # on, and those it has no session with: a short list, not every origin.
            cand = self.stored.origins() - peer.reach
            cand |= peer.stuck
            cand.add(self.replica.node_id)
            origins = cand
        for origin in sorted(origins):
            have = self.stored.get(origin)
            sent = peer.sent.get(origin)
            if (have <= sent or origin in peer.fetching or origin == peer.id
                    or not self._eligible(peer, origin, now)):
                continue
            if room < 0:
                room = config.MAX_INFLIGHT_PER_PEER - peer.inflight()
            if room <= 0:
                return
            last = min(have, sent + min(room, config.LEDGER_PAGE))
            peer.fetching[origin] = last - sent
            room -= last - sent
            out.append(Fetch(peer.id, origin, sent + 1, last))

    def fetched(self, peer_id: str, origin: str, first: int, raws: Sequence[bytes],
                now: int) -> list[Effect]:
        """The driver read ``raws`` (seqs ``first``, ``first + 1``, ...) for a ``Fetch``."""
        out: list[Effect] = []
        peer = self.peers.get(peer_id)
        if peer is None:
            return out
        peer.fetching.pop(origin, None)
        if first != peer.sent.get(origin) + 1 or not raws:
            self._pump(out, peer, now)
            return out
        raws = list(raws)
        peer.sent.set(origin, first + len(raws) - 1)
        peer.sent_at[origin] = now
        self.sent_envelopes += len(raws)
        peer.tx += len(raws)
        peer.sent_tx[origin] = peer.tx
        for chunk in _chunks(raws):
            self._send(out, peer.id, encode_batch(chunk), HIGH)
        self._pump(out, peer, now)
        return out

    # --- receiving ----------------------------------------------------------------------------

    def receive(self, data: bytes, peer_id: str, now: int) -> list[Effect]:
        """A message from an authenticated peer. Never raises for the peer's faults."""
        out: list[Effect] = []
        peer = self.peers.get(peer_id)
        if peer is None:
            self._count("not_connected")
            return out
        self.bytes_in += len(data)
        if len(data) > config.MAX_MESSAGE_BYTES:
            self._count("oversized")
            return out
        if not data:
            self._count("empty_message")
            return out
        kind = data[:1]
        try:
            if kind == b"E":
                self._on_envelopes(out, peer, split_batch(data), now)
            elif kind == b"V":
                self._on_vv(out, peer, data, now)
            elif kind == b"C":
                self._on_certs(out, data)
            else:
                raise Malformed(f"unknown message type {kind!r}")
        except EnvelopeError as exc:
            self._count(exc.reason)
        except Exception:  # our bug, a peer's input: never raise (inv. 5)
            self._count("internal_error")
        return out

    def receive_many(self, items: Sequence[tuple[bytes, str]], now: int) -> list[Effect]:
        """Messages that arrived together, ``(data, peer_id)`` in arrival order: the same
        as ``receive`` on each in turn, except that consecutive ``E`` messages of one peer
        are applied as one batch (of at most ``LEDGER_PAGE`` envelopes), so that an
        origin's run across them is verified as one hash chain (one signature check) and
        yields one ``Persist``. Each peer's messages keep their order; the peers are taken
        one after the other (in the order of their first message), so a bad envelope from
        one peer costs the others nothing and every count stays with its peer. A message
        that repeats an envelope of this call (a retransmission) is taken on its own, as
        ``receive`` takes it (counted as a duplicate). Never raises for the peers'
        faults."""
        out: list[Effect] = []
        by_peer: dict[str, list[bytes]] = {}
        for message, peer_id in items:
            by_peer.setdefault(peer_id, []).append(message)
        for peer_id, msgs in by_peer.items():
            peer = self.peers.get(peer_id)
            batch: list[bytes] = []  # frames of consecutive E messages, not yet applied
            held: set[bytes] = set()  # its frames so far, to spot a repeated envelope
            todo_msgs: list[bytes | None] = [*msgs, None]  # None: the end of its messages
            for data in todo_msgs:
                frames: list[bytes] | None = None
                repeated = False
                if (peer is not None and data is not None and data[:1] == b"E"
                        and len(data) <= config.MAX_MESSAGE_BYTES):
                    self.bytes_in += len(data)
                    try:
                        frames = split_batch(data)
                    except EnvelopeError as exc:
                        self._count(exc.reason)
                        continue
                    repeated = not held.isdisjoint(frames)
                    held.update(frames)
                    if not repeated and len(batch) + len(frames) <= config.LEDGER_PAGE:
                        batch.extend(frames)
                        continue
                todo = [batch] if batch else []
                batch = []
                if repeated:
                    assert frames is not None
                    todo.append(frames)  # on its own, as ``receive`` would take it
                elif frames is not None:
                    batch = frames
                for chunk in todo:
                    assert peer is not None  # only a connected peer's frames are batched
                    try:
                        self._on_envelopes(out, peer, chunk, now)
                    except EnvelopeError as exc:
                        self._count(exc.reason)
                    except Exception:  # never raise for a peer (inv. 5)
                        self._count("internal_error")
                if frames is None and data is not None:
                    out.extend(self.receive(data, peer_id, now))
        return out

    def _on_vv(self, out: list[Effect], peer: _Peer, data: bytes, now: int) -> None:
        try:
            msg = orjson.loads(data[1:])
        except orjson.JSONDecodeError:
            raise Malformed("version vector is not JSON") from None
        if not isinstance(msg, dict) or not isinstance(msg.get("vv"), dict):
            raise Malformed("version vector message needs a vv object")
        if len(msg["vv"]) > config.MAX_ORIGINS:
            raise Malformed("version vector names too many origins")
        try:
            theirs = VersionVector.from_dict(msg["vv"])
        except ValueError as exc:
            raise Malformed(f"bad version vector: {exc}") from None
        links = msg.get("links", [])
        if not isinstance(links, list) or len(links) > config.MAX_PEERS or not all(
            map(isinstance, links, repeat(str))
        ):
            raise Malformed("links must be a list of node ids")
        certs, crl, their_rx = msg.get("nc", ""), msg.get("crl", -1), msg.get("rx", -1)
        if type(certs) is not str or type(crl) is not int or type(their_rx) is not int:
            raise Malformed("nc must be a string, crl and rx integers")

        if their_rx < peer.their_rx:
            # Overtaken by a newer summary (a reordering link; rx only grows within a
            # session): what it says is out of date. Acting on it would lower what the
            # peer acknowledged, open the window twice and "repair" by resending.
            # (A session's messages never reach the next one: the transport's session
            # object, and the simulator's per-pair session numbers, see to that.)
            self._count("stale_summary")
            return
        peer.their_rx = their_rx
        first = not peer.ready
        peer.ready = True
        new_links = frozenset(links)
        if new_links != peer.links:
            peer.links = new_links
            peer.reach = new_links | {peer.id}
            self._topology_changed()
        peer.acked = theirs
        tget = theirs.view().get
        if first:
            peer.sent = theirs.copy()
        elif peer.sent != theirs:  # (equal: the common case, nothing to do)
            # What it holds it got somewhere: never send it those (for every origin it
            # reports, also those we never sent it; else a node that takes over relaying
            # an origin, or serves one lost push, would start from seq 1).
            peer.sent.merge(theirs)
            for origin in [o for o, q in peer.sent.items() if tget(o, 0) < q]:
                if (
                        # we never sent it this origin in this session: what made us
                        # think it holds them was wrong (it lost them, or said so
                        # falsely): resend
                        origin not in peer.sent_at
                        # everything up to our last send of this origin has arrived, so
                        # the gap was refused (e.g. its certificate was missing) or
                        # lost: resend
                        or their_rx >= peer.sent_tx.get(origin, 2**62)
                        or now - peer.sent_at.get(origin, now) > config.SYNC_RETRANSMIT_MS):
                    # Sent long ago and still not acknowledged: lost (lossy link or a
                    # peer that restarted without them). Send again from what it holds.
                    peer.sent = _lowered(peer.sent, origin, theirs.get(origin))
        peer.stuck = frozenset(o for o, had in peer.held_at_report.items()
                               if tget(o, 0) < had)
        if peer.stuck:
            self._stuck_peers.add(peer.id)
        else:
            self._stuck_peers.discard(peer.id)
        peer.held_at_report = {o: have for o, have in self.stored.items()
                               if tget(o, 0) < have}
        roster = msg.get("ro", -1)  # (absent from peers that predate staff rosters)
        if type(roster) is not int:
            raise Malformed("ro must be an integer")
        if (certs != self._cert_digest() or crl < self.trust.crl_version
                or roster < self.trust.roster_version):
            self._send(out, peer.id, self._certs_message(), HIGH)  # before any resend
        self._pump(out, peer, now)

    def _on_certs(self, out: list[Effect], data: bytes) -> None:
        try:
            msg = orjson.loads(data[1:])
        except orjson.JSONDecodeError:
            raise Malformed("certificate message is not JSON") from None
        if not isinstance(msg, dict) or not isinstance(msg.get("certs"), list):
            raise Malformed("certificate message needs a certs list")
        if len(msg["certs"]) > config.MAX_CERTS_PER_MESSAGE:
            raise Malformed("too many certificates in one message")
        changed = False
        for item in msg["certs"]:
            if isinstance(item, dict) and isinstance(item.get("node_id"), str):
                held = self.trust.certificate(item["node_id"])
                if held is not None and held.to_dict() == item:
                    continue  # one we hold already: nothing to parse or check
            try:
                cert = Certificate.from_dict(item)
                held = self.trust.certificate(cert.node_id)
                self.trust.add_certificate(cert)
            except EnvelopeError as exc:
                self._count(exc.reason)
                continue
            changed |= self.trust.certificate(cert.node_id) is not held
        if msg.get("crl") is not None:
            try:
                crl = RevocationList.from_dict(msg["crl"])
                before = self.trust.crl_version
                self.trust.apply_revocations(crl)
                changed |= self.trust.crl_version != before
            except EnvelopeError as exc:
                self._count(exc.reason)
        if msg.get("roster") is not None:
            try:
                roster = Roster.from_dict(msg["roster"])
            except ValueError:
                self._count("malformed")
            else:
                try:
                    before = self.trust.roster_version
                    self.trust.apply_roster(roster)
                    changed |= self.trust.roster_version != before
                except EnvelopeError as exc:
                    self._count(exc.reason)
        if changed:
            out.append(TrustChanged())

    def _on_envelopes(self, out: list[Effect], peer: _Peer, raws: list[bytes],
                      now: int) -> None:
        decoded: list[tuple[Envelope, bytes]] = []
        for raw in raws:
            try:
                env = decode(raw)
            except EnvelopeError as exc:
                self._count(exc.reason)
                continue
            decoded.append((env, raw))
        applied: list[Envelope] = []
        refused_before = self._refusals()
        pending_before = self.replica.pending_count()
        for run in _runs(decoded):
            applied.extend(self._apply_run(out, run, now))
        # The sender holds what it sends: that acknowledges it too, and we must never
        # send those back to it. Only for envelopes we now hold with the same hash
        # (applied, or genuine duplicates): a forged or garbled copy of an envelope it
        # lacks must not make us believe it holds it, or we would never send it the
        # genuine one.
        last: dict[str, int] = {}
        hash_at = self.replica.hash_at
        for env, _ in decoded:
            if env.seq > last.get(env.origin, 0) and hash_at(env.origin, env.seq) == env.hash:
                last[env.origin] = env.seq
        for origin, seq in last.items():
            if seq > peer.acked.get(origin):
                peer.acked.set(origin, seq)
            if seq > peer.sent.get(origin):
                peer.sent.set(origin, seq)
        n = len(raws)
        peer.rx += n
        peer.unacked_in += n
        if applied:
            self.received += len(applied)
            out.append(Persist(tuple(applied)))
            self._relay(out, peer, applied, now)
        gap = (self._refusals() != refused_before
               or self.replica.pending_count() > pending_before)
        if peer.unacked_in >= config.SYNC_ACK_EVERY or (
                gap and now - peer.vv_at >= config.SYNC_NACK_MS):
            # Opens the sender's window during catch-up; after a refusal or a gap, tells
            # it soon what we lack (and which certificates we hold) so it can repair.
            self._send_vv(out, peer, now)

    def _apply_run(self, out: list[Effect], run: list[tuple[Envelope, bytes]],
                   now: int) -> list[Envelope]:
        """Verify and apply one origin's consecutive envelopes from a batch."""
        origin = run[0][0].origin
        head = self.replica.vv.get(origin)
        hash_at = self.replica.hash_at
        fresh: list[tuple[Envelope, bytes]] = []
        for e, r in run:
            if e.seq > head:
                fresh.append((e, r))
            elif hash_at(origin, e.seq) == e.hash:
                self._count("duplicate")
            else:
                self._conflict(out, e, now)
        if not fresh:
            return []
        applied: list[Envelope] = []
        if fresh[0][0].seq == head + 1 and len(fresh) > 1:
            try:
                envs = verify_chain([e for e, _ in fresh], self.trust, now,
                                    prev=self.replica.head(origin))
            except EnvelopeError:
                envs = []  # fall back to one-at-a-time below, to keep the good prefix
            for env in envs:
                applied.extend(self._apply_one(out, env, now))
            if envs:
                return applied
        i = 0
        while i < len(fresh):
            try:
                env = verify(fresh[i][0], self.trust, now)
            except EnvelopeError as exc:
                self._count(exc.reason)
                # The rest of the run cannot link past a bad envelope, unless the run
                # holds another copy of the one we still need (a retransmission merged
                # into this batch): go on from that copy.
                need = self.replica.vv.get(origin) + 1
                i = next((k for k in range(i + 1, len(fresh)) if fresh[k][0].seq == need),
                         len(fresh))
                continue
            applied.extend(self._apply_one(out, env, now))
            i += 1
        return applied

    def _conflict(self, out: list[Effect], env: Envelope, now: int) -> None:
        """``env`` differs from the envelope we applied for its (origin, seq): a forged
        or garbled copy (refused under its verify reason, e.g. ``bad_signature``), or a
        second envelope the origin signed for one seq: equivocation (invariant 7)."""
        try:
            self.replica.classify(verify(env, self.trust, now))
        except Equivocation as exc:
            self._alert(out, exc)
        except EnvelopeError as exc:
            self._count(exc.reason)
        else:  # not reached: classify raises for a different hash at an applied seq
            self._count("duplicate")

    def _alert(self, out: list[Effect], exc: Equivocation) -> None:
        self._count(exc.reason)
        n = self._alerted.get(exc.origin, 0)
        if n < config.MAX_ALERTS_PER_ORIGIN:  # beyond: counted only (bounded evidence)
            self._alerted[exc.origin] = n + 1
            out.append(Alert("equivocation", exc.origin, exc.seq, exc.first, exc.second))

    def _apply_one(self, out: list[Effect], env: Envelope, now: int) -> list[Envelope]:
        applied: list[Envelope] = []
        try:
            applied = self.replica.apply(env, now)
        except Equivocation as exc:
            self._alert(out, exc)
        except EnvelopeError as exc:
            self._count(exc.reason)
        except Exception:  # a bug of ours a peer's input found (inv. 5)
            self._count("internal_error")
        return applied

    def _relay(self, out: list[Effect], source: _Peer, applied: list[Envelope],
               now: int) -> None:
        """Forward fresh third-party envelopes at once to peers that have no session
        with their origin (links); peers that do get them from the origin itself. Nor
        to peers that have a session with the node we got them from: that node relays
        to them itself (or they are covered, by the same rule, one hop nearer the
        origin). Without that rule, an envelope of the cloud reaching a store of 40
        registers that have no WAN link was relayed by every register to every other."""
        targets: dict[str, tuple[str, ...]] = {}  # origin -> peers (memoised per topology)
        for env in applied:
            if env.origin not in targets:
                key = (source.id, env.origin)
                t = self._relay_targets.get(key)
                if t is None:
                    t = self._relay_targets[key] = self._relay_targets_for(source, env.origin)
                targets[env.origin] = t
        if len(targets) == 1:  # the common case: one origin, push the batch as it is
            by_peer = dict.fromkeys(next(iter(targets.values())), applied)
        else:
            by_peer = {}
            for env in applied:
                for pid in targets[env.origin]:
                    by_peer.setdefault(pid, []).append(env)
        for pid, envs in by_peer.items():
            peer = self.peers.get(pid)
            if peer is not None and peer.ready:
                self._push(out, peer, envs, now)

    def _relay_targets_for(self, source: _Peer, origin: str) -> tuple[str, ...]:
        """Peers we relay ``origin``'s envelopes to when they came from ``source``: those
        with no session with the origin or the source. When we had them from the origin
        itself, and another peer of the target is a preferred bridge to the origin
        (``_preferred_bridge``), that one relays instead: two edge nodes holding the
        cloud's WAN link do not both send each cloud envelope to every register."""
        bridges = [q for q in self.peers if self._preferred_bridge(q, origin)]
        out = []
        for p in self.peers.values():
            if p is source or origin in p.reach or source.id in p.links:
                continue
            if source.id == origin and any(q in p.links for q in bridges):
                continue
            out.append(p.id)
        return tuple(out)

    # --- timers -------------------------------------------------------------------------------

    def _live_deadline(self) -> tuple[int, str] | None:
        """The earliest deadline still current (drops stale heap entries)."""
        heap = self._deadlines
        while heap:
            at, pid = heap[0]
            peer = self.peers.get(pid)
            if peer is not None and peer.next_vv == at:
                return heap[0]
            heapq.heappop(heap)
        return None

    def next_timer(self) -> int | None:
        top = self._live_deadline()
        return None if top is None else top[0]

    def on_timer(self, now: int) -> list[Effect]:
        """Send summaries that are due (or nearly: one timer wake-up serves every peer
        due within ``SYNC_TIMER_SLACK_MS``). A deadline more than two intervals ahead
        means the wall clock jumped backwards since it was set: treat it as due, or a
        node whose clock was set back an hour would go quiet for an hour."""
        out: list[Effect] = []
        soon = now + config.SYNC_TIMER_SLACK_MS
        if now < self._timer_now:  # the clock went back: scan every deadline
            self._timer_now = now
            for peer in list(self.peers.values()):
                if peer.next_vv <= soon or peer.next_vv > now + 2 * peer.cur_interval:
                    self._send_vv(out, peer, now)
            return out
        self._timer_now = now
        while (top := self._live_deadline()) is not None and top[0] <= soon:
            heapq.heappop(self._deadlines)
            self._send_vv(out, self.peers[top[1]], now)  # pushes its next deadline
        return out


def _lowered(vv: VersionVector, origin: str, seq: int) -> VersionVector:
    d = vv.to_dict()
    if seq:
        d[origin] = seq
    else:
        d.pop(origin, None)
    return VersionVector(d)


def _chunks(raws: list[bytes]) -> Iterable[list[bytes]]:
    chunk: list[bytes] = []
    size = 0
    for raw in raws:
        if chunk and (size + len(raw) > config.MAX_BATCH_BYTES
                      or len(chunk) >= config.MAX_BATCH_ENVELOPES):
            yield chunk
            chunk, size = [], 0
        chunk.append(raw)
        size += len(raw) + 4
    if chunk:
        yield chunk


def _runs(envs: list[tuple[Envelope, bytes]]) -> list[list[tuple[Envelope, bytes]]]:
    """Group a batch into runs of consecutive envelopes of one origin."""
    runs: list[list[tuple[Envelope, bytes]]] = []
    for env, raw in envs:
        if runs and runs[-1][0][0].origin == env.origin:
            runs[-1].append((env, raw))
        else:
            runs.append([(env, raw)])
    return runs

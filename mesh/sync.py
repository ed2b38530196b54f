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
* ``C`` + orjson ``{"certs": [...], "crl": {...} | null}`` — certificates signed by the
  store key, relayable by anyone.

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
    dropped and counted under a reason in ``stats``; nothing a peer sends raises.
 6. No clock and no global randomness: ``now`` comes in, jitter comes from the
    injected ``random.Random``.
"""

from __future__ import annotations

import hashlib
import random
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import orjson

from mesh import config
from mesh.crdt import VersionVector
from mesh.envelope import Envelope, decode, verify, verify_chain
from mesh.errors import EnvelopeError, Equivocation, Malformed, Oversized
from mesh.identity import Certificate, RevocationList, TrustStore
from mesh.replica import Replica

__all__ = [
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
    next_vv: int = 0
    interval: int = config.SYNC_INTERVAL_MS
    cur_interval: int = config.SYNC_INTERVAL_MS  # the one the current deadline used
    certs: int = 0
    crl: int = -1

    def inflight(self) -> int:
        """Envelopes sent or being read for this peer and not yet acknowledged."""
        sent = sum(max(0, s - self.acked.get(o)) for o, s in self.sent.items())
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

    # --- helpers -------------------------------------------------------------------------

    def _refusals(self) -> int:
        return sum(v for k, v in self.stats.items() if k != "duplicate")

    def _count(self, key: str, n: int = 1) -> None:
        self.stats[key] = self.stats.get(key, 0) + n

    def _send(self, out: list[Effect], peer: str, data: bytes, priority: int = HIGH) -> None:
        self.bytes_out += len(data)
        out.append(Send(peer, data, priority))

    def _vv_message(self, rx: int) -> bytes:
        links = sorted(p.id for p in self.peers.values())
        crl = self.trust.crl_version
        return b"V" + orjson.dumps({"vv": self.replica.vv.to_dict(), "links": links,
                                    "nc": self._cert_digest(), "crl": crl, "rx": rx})

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

    def _interval(self, peer: _Peer, now: int) -> int:
        """Summary interval for ``peer``. In a big store summaries would cost O(peers²)
        per second, so a peer that is keeping up hears from us n/SYNC_FULL_RATE_PEERS
        times less often: pushes still reach everyone at once, and a receiver that sees
        a gap or refuses something says so at once (SYNC_NACK_MS). A peer whose gap has
        not moved for an interval gets the full rate."""
        n = len(self.peers)
        if n <= config.SYNC_FULL_RATE_PEERS or peer.stuck:
            return peer.interval
        return peer.interval * n // config.SYNC_FULL_RATE_PEERS

    def _certs_message(self) -> bytes:
        crl = self.trust.crl
        return b"C" + orjson.dumps({
            "certs": [c.to_dict() for c in self.trust.certificates()],
            "crl": None if crl is None else crl.to_dict(),
        })

    # --- sessions --------------------------------------------------------------------------

    def peer_up(self, peer_id: str, now: int, *, wan: bool = False) -> list[Effect]:
        """A session with ``peer_id`` (authenticated by the transport) is established.
        ``wan``: a metered link (the cloud): summaries go out less often there."""
        out: list[Effect] = []
        if peer_id not in self.peers and len(self.peers) >= config.MAX_PEERS:
            self._count("peer_table_full")
            return out
        peer = self.peers[peer_id] = _Peer(peer_id)
        if wan:
            peer.interval = config.SYNC_WAN_INTERVAL_MS
        self._send(out, peer_id, self._certs_message(), HIGH)
        self._send_vv(out, peer, now)
        return out

    def peer_down(self, peer_id: str, now: int) -> list[Effect]:
        self.peers.pop(peer_id, None)
        return []

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
        for peer in self.peers.values():
            if peer.ready:
                self._pump(out, peer, now, advanced)
        return out

    def _push(self, out: list[Effect], peer: _Peer, envs: Sequence[Envelope], now: int) -> None:
        """Send the envelopes that directly follow what the peer has from us (inv. 2)."""
        if not peer.ready:
            return
        high: list[bytes] = []
        low: list[bytes] = []
        for env in envs:
            if env.seq != peer.sent.get(env.origin) + 1 or env.origin == peer.id:
                continue
            if peer.inflight() >= config.MAX_INFLIGHT_PER_PEER + config.PUSH_RESERVE:
                break  # fresh envelopes may use the reserve a catch-up cannot
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
        serves its own; a third party's only when the peer has no live session with that
        origin, or is stuck on it (it still lacks what we held at its previous summary:
        a lost push): so a rejoining register is not flooded with one copy per peer, and
        envelopes merely in flight are not sent twice."""
        if origin == self.replica.node_id or origin not in peer.links:
            return True
        return origin in peer.stuck

    def _pump(self, out: list[Effect], peer: _Peer, now: int,
              origins: set[str] | None = None) -> None:
        """Fetch what the peer lacks from storage, within its window (invariant 3);
        only for ``origins`` if given (those whose stored head just advanced)."""
        room = config.MAX_INFLIGHT_PER_PEER - peer.inflight()
        if room <= 0:
            return
        items = (self.stored.items() if origins is None
                 else ((o, self.stored.get(o)) for o in origins))
        for origin, have in items:
            if room <= 0:
                return
            sent = peer.sent.get(origin)
            if (have <= sent or origin in peer.fetching or origin == peer.id
                    or not self._eligible(peer, origin, now)):
                continue
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
            isinstance(x, str) for x in links
        ):
            raise Malformed("links must be a list of node ids")
        certs, crl, their_rx = msg.get("nc", ""), msg.get("crl", -1), msg.get("rx", -1)
        if type(certs) is not str or type(crl) is not int or type(their_rx) is not int:
            raise Malformed("nc must be a string, crl and rx integers")

        first = not peer.ready
        peer.ready = True
        peer.links = frozenset(links)
        peer.acked = theirs
        if first:
            peer.sent = theirs.copy()
        for origin, seq in list(peer.sent.items()):
            if theirs.get(origin) > seq:
                peer.sent.set(origin, theirs.get(origin))  # it got them elsewhere
            elif theirs.get(origin) < seq and (
                    # everything up to our last send of this origin has arrived, so the
                    # gap was refused (e.g. its certificate was missing) or lost: resend
                    their_rx >= peer.sent_tx.get(origin, 2**62)
                    or now - peer.sent_at.get(origin, now) > config.SYNC_RETRANSMIT_MS):
                # Sent long ago and still not acknowledged: lost (lossy link or a peer
                # that restarted without them). Send again from what it holds.
                peer.sent = _lowered(peer.sent, origin, theirs.get(origin))
        peer.stuck = frozenset(o for o, had in peer.held_at_report.items()
                               if theirs.get(o) < had)
        peer.held_at_report = {o: have for o, have in self.stored.items()
                               if theirs.get(o) < have}
        if certs != self._cert_digest() or crl < self.trust.crl_version:
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
        if decoded:
            # The sender holds what it sends (contiguously): that acknowledges it too,
            # and we must never send those back to it.
            last = {env.origin: env.seq for env, _ in decoded}
            for origin, seq in last.items():
                if seq > peer.acked.get(origin):
                    peer.acked.set(origin, seq)
                if seq > peer.sent.get(origin):
                    peer.sent.set(origin, seq)
        applied: list[Envelope] = []
        refused_before = self._refusals()
        pending_before = self.replica.pending_count()
        for run in _runs(decoded):
            applied.extend(self._apply_run(out, run, now))
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
        fresh = [(e, r) for e, r in run if e.seq > head]
        if not fresh:
            self._count("duplicate", len(run))
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
        for decoded, _ in fresh:
            try:
                env = verify(decoded, self.trust, now)
            except EnvelopeError as exc:
                self._count(exc.reason)
                break  # the rest of this origin's run cannot link past a bad envelope
            applied.extend(self._apply_one(out, env, now))
        return applied

    def _apply_one(self, out: list[Effect], env: Envelope, now: int) -> list[Envelope]:
        try:
            return self.replica.apply(env, now)
        except Equivocation as exc:
            self._count(exc.reason)
            out.append(Alert("equivocation", exc.origin, exc.seq, exc.first, exc.second))
        except EnvelopeError as exc:
            self._count(exc.reason)
        return []

    def _relay(self, out: list[Effect], source: _Peer, applied: list[Envelope],
               now: int) -> None:
        """Forward fresh third-party envelopes at once to peers that have no session
        with their origin (links); peers that do get them from the origin itself."""
        for peer in self.peers.values():
            if peer is source or not peer.ready:
                continue
            envs = [e for e in applied if e.origin not in peer.links and e.origin != peer.id]
            if envs:
                self._push(out, peer, envs, now)

    # --- timers -------------------------------------------------------------------------------

    def next_timer(self) -> int | None:
        times = [p.next_vv for p in self.peers.values()]
        return min(times) if times else None

    def on_timer(self, now: int) -> list[Effect]:
        """Send summaries that are due (or nearly: one timer wake-up serves every peer
        due within ``SYNC_TIMER_SLACK_MS``). A deadline more than two intervals ahead
        means the wall clock jumped backwards since it was set: treat it as due, or a
        node whose clock was set back an hour would go quiet for an hour."""
        out: list[Effect] = []
        for peer in list(self.peers.values()):
            if (peer.next_vv <= now + config.SYNC_TIMER_SLACK_MS
                    or peer.next_vv > now + 2 * peer.cur_interval):
                self._send_vv(out, peer, now)
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

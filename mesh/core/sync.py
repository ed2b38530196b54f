"""The sync core: push and anti-entropy between one node and its peers, without I/O.

Inputs go in (``peer_up``, ``peer_down``, ``receive``, ``durable``, ``fetched``,
``on_timer``), each with ``now`` in ms; effects come out (``Send``, ``Persist``,
``Fetch``, ``Alert``, ``TrustChanged``, ``InstallTls``, ``EndSession``). The asyncio node and the
partition simulator drive this same class; only the drivers differ.

Wire messages (bytes, first byte is the type):

* ``V`` + orjson ``{"vv": {origin: seq}, "links": [node ids], "nc": digest, "crl": v,
  "rx": n, "ad": ms, "rs": [origins]}`` — our version vector (highest contiguous seq
  held per origin), the peers we have live sessions with, a digest of the certificates
  and the revocation list version we hold, how many envelopes we received from this
  peer in this session, and how long ago the last of them arrived (ack delay). It is
  the anti-entropy summary *and* the acknowledgement that opens the sender's window.
  ``rs`` (optional) names origins whose envelopes we refused for want of their
  certificate, which has arrived since: the peer sends them again from our vector.
* ``E`` + frames of ``u32 big-endian length + raw envelope`` — envelopes, verbatim.
* ``C`` + orjson ``{"certs": [...], "crl": {...} | null, "roster": {...} | null}`` —
  certificates, the revocation list (which also names revoked API devices) and the staff
  roster (``mesh.core.auth``), all signed by the store key and relayable by anyone. ``V``
  carries the roster version held as ``"ro"``, so a peer behind gets the newer one. A
  new revocation list or roster goes to every peer whose summary shows an older one at
  once, without the certificates (``certs`` empty). From the edge, a ``C`` may also
  carry ``"tls": PEM``: the receiver's own renewed TLS certificate (``renewed``), which
  it installs (``InstallTls``) once it checks against the store CA and its key. Peers
  that predate renewal ignore the key.

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
    ``mesh.core.ops`` bounds keep the replica's "whole or not at all" true meanwhile).
 6. No clock and no global randomness: ``now`` comes in, jitter comes from the
    injected ``random.Random``.
 7. An envelope for an (origin, seq) we hold or buffer is a duplicate only if its hash
    is the one we hold. Otherwise it is verified: a failing copy is refused under its
    reason (``bad_signature``, ...), a valid one is equivocation: counted, kept as
    evidence by the replica and raised as an ``Alert`` (at most
    ``MAX_ALERTS_PER_ORIGIN`` per origin; later ones are counted only). A checkpoint
    fold that does not match its ``ck`` op is raised the same way
    (``checkpoint_mismatch``), and the fold stands.
 8. Certificates before envelopes: we send a peer envelopes only after every
    certificate we hold has been offered to it: at its summary (all of ours, if its
    digest differs) or, for those we learned since, in a ``C`` just before the
    envelopes. Whoever forwards an envelope holds its origin's certificate, so a
    register that has just joined is not refused as unknown downstream; if it still is
    (a lost ``C``), the receiver asks for those envelopes again (``rs``) once the
    certificate comes.
 9. A revoked node has no session with us, and of its envelopes we accept, hold,
    push, relay and serve exactly those up to the bound its revocation names
    (``mesh.core.identity`` invariant 7), so every replica converges on the same prefix
    of its chain whichever it heard first, the list or the envelopes: on learning a
    revocation we end its session (``EndSession``) and refuse it in ``peer_up``; we
    drop what we buffered of it above the bound, and if we applied some of that, we
    ask the driver to rebuild the replica from storage without it (``Rebuild``; the
    rows stay in the ledger as an archive, left out of every replay). A revoked node
    without a bound (an older list) is refused from when we learn of it, and what we
    held of it stays (the old behaviour: replicas may differ on its last envelopes).
 10. Retransmission is per batch sent (``_Peer.out``) on a monotonic clock derived from
    ``now`` (``_mono``: a wall clock set back counts as no time). A batch is sent again
    only when a summary shows it lost (older than the peer's RFC 6298 timeout) or
    refused (everything we sent arrived and it is not held), and then only the part the
    peer lacks: nothing merely in flight is resent. Resending what a peer refused, and
    the receiver's immediate summary after a refusal, back off exponentially (per
    (peer, origin) and per (peer, reason)) up to ``SYNC_REFUSAL_BACKOFF_MAX_MS``.
 11. A session with a peer counts as known from either end's summary (``_reaches``),
    so a session change is announced by one end (the one rejoining, or both when both
    are settled) and a change costs O(peers) summaries, not O(peers²).
"""

from __future__ import annotations

import hashlib
import heapq
import random
import struct
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from itertools import repeat
from typing import Any

import orjson

from mesh import config
from mesh.core.auth import Roster
from mesh.core.catchup import decode_state, verify_state
from mesh.core.crdt import VersionVector
from mesh.core.crdt.hlc import MAX_TS
from mesh.core.envelope import Envelope, decode, verify, verify_chain
from mesh.core.identity import Certificate, RevocationList, TrustStore
from mesh.core.replica import Checkpoint, Replica
from mesh.errors import EnvelopeError, Equivocation, Malformed, Oversized

__all__ = [
    "NOT_REFUSALS",
    "Alert",
    "Effect",
    "EndSession",
    "Fetch",
    "InstallState",
    "InstallTls",
    "Persist",
    "Rebuild",
    "Send",
    "SyncCore",
    "TrustChanged",
    "encode_batch",
    "split_batch",
]

_LEN = struct.Struct(">I")
#: ``stats`` keys that count expected traffic, not a peer's fault: the same envelope
#: relayed by two peers; a summary overtaken by a newer one on a reordering link.
NOT_REFUSALS = frozenset({"duplicate", "stale_summary", "checkpoint_mismatch",  # a check
                          # catch-up from a checkpoint: bookkeeping
                          "state_served", "state_not_served", "state_installed",
                          "state_not_installed", "duplicate_state"})
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
    """Something staff must see: equivocation evidence, or a checkpoint fold that does
    not match its ``ck`` op (``first``: the hash it names, ``second``: ours); kept by the
    driver."""

    kind: str
    origin: str
    seq: int
    first: bytes
    second: bytes


@dataclass(frozen=True, slots=True)
class TrustChanged:
    """New certificates or revocations were learned: the driver persists the trust store."""


@dataclass(frozen=True, slots=True)
class InstallTls:
    """A renewed TLS certificate (PEM) for this node arrived from the edge: the driver
    checks it against the store CA and this node's key, saves it and reloads it."""

    pem: str


@dataclass(frozen=True, slots=True)
class EndSession:
    """Close the session with ``peer`` (it was revoked): the driver ends the connection."""

    peer: str
    reason: str


@dataclass(frozen=True, slots=True)
class Rebuild:
    """A revocation bounds what the store keeps of ``origins`` below what the replica
    applied (invariant 9): rebuild it from storage leaving out their envelopes above
    their bounds (``TrustStore.revocation_bounds``), then call ``replica_rebuilt``."""

    origins: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class InstallState:
    """A checkpoint state from ``peer`` verified (``mesh.core.catchup`` invariant 1):
    the driver installs it as the replica's base once storage is idle
    (``DurableReplica.install_state``), then calls ``state_installed``."""

    peer: str
    envelope: Envelope
    checkpoint: Checkpoint
    state: Replica


Effect = (Send | Persist | Fetch | Alert | TrustChanged | InstallTls | EndSession | Rebuild
          | InstallState)


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
class _Batch:
    """Envelopes ``first..last`` of ``origin`` sent in one go (one retransmission unit)."""

    origin: str
    first: int
    last: int
    at: int  # monotonic ms when sent
    tx: int  # the peer's ``tx`` after it
    retx: bool  # a retransmission: no round-trip sample from it (Karn)


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
    #: batches sent and not yet acknowledged, in send order (retransmission, inv. 7)
    out: deque[_Batch] = field(default_factory=deque)
    #: origin -> [first, last] to send again (lost or refused), served before new ones
    resend: dict[str, list[int]] = field(default_factory=dict)
    refetching: dict[str, int] = field(default_factory=dict)  # origin -> first seq asked
    #: origins whose storage read for it came back empty (a pruned ledger prefix, or a
    #: failed read): not fetched again until its next summary; others serve them
    unservable: set[str] = field(default_factory=set)
    srtt: float = -1.0  # smoothed round trip (ms, RFC 6298); -1: no sample yet
    rttvar: float = 0.0
    rto: int = config.SYNC_RTO_INITIAL_MS
    #: origin -> (not before, delay, what it held then): resending what this peer
    #: refused backs off exponentially until it takes some of that origin again
    refused: dict[str, tuple[int, int, int]] = field(default_factory=dict)
    #: reason -> (not before, delay, last seen): our nacks for this peer's refusals
    nack: dict[str, tuple[int, int, int]] = field(default_factory=dict)
    rx_at: int = 0  # monotonic ms when we last received envelopes from it
    vv_at: int = 0  # when we last sent it our summary
    unacked_in: int = 0  # envelopes received since we last sent it our vv
    tx: int = 0  # envelopes sent to it in this session
    rx: int = 0  # envelopes received from it in this session
    their_rx: int = -1  # the rx of its latest summary (older ones arriving late: stale)
    next_vv: int = 0
    interval: int = config.SYNC_INTERVAL_MS
    cur_interval: int = config.SYNC_INTERVAL_MS  # the one the current deadline used
    certs: int = 0
    crl: int = -1  # the revocation list version of its latest summary
    roster: int = -1  # the staff roster version of its latest summary ("ro")
    #: our trust store version up to which it holds (or was sent) every certificate we
    #: hold: set at each of its summaries, since we answer one whose digest differs
    #: with all of ours (invariant 8)
    certs_at: int = -1
    #: checkpoint states served to it in this session (bounded), and whether one it
    #: sent us was refused (then we do not ask it again in this session)
    states_served: int = 0
    state_refused: bool = False
    #: its summary says it waits for a checkpoint state (``cq``): do not fetch it
    #: envelopes from seq 1 meanwhile (it asks for them when it stops waiting)
    awaits_state: bool = False

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
    return LOW if env.meta.get("kind") in ("catalog", "telemetry") else HIGH


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
        #: origin (see _eligible). These three memos are kept true as sessions and
        #: links change (_peer_added, _peer_removed, _links_changed; else cleared).
        self._covered: dict[tuple[str, str], bool] = {}
        #: (source, origin) -> peers to relay that origin's envelopes to (see _relay),
        #: and the preferred bridges that decided it (see _links_changed)
        self._relay_targets: dict[tuple[str, str],
                                  tuple[tuple[str, ...], frozenset[str] | None]] = {}
        #: origin -> peers without a session with it (see durable)
        self._unreached: dict[str, tuple[str, ...]] = {}
        self._stuck_peers: set[str] = set()  # peers whose ``stuck`` is not empty
        #: origin -> equivocation alerts raised (MAX_ALERTS_PER_ORIGIN); only origins
        #: with a certificate get here (the envelope verified), so the table is bounded
        self._alerted: dict[str, int] = {}
        #: origin -> peers that sent us its envelopes while we held no certificate for
        #: it (bounded by MAX_AWAITED_CERTS): asked again once it arrives (invariant 8)
        self._awaited: dict[str, set[str]] = {}
        #: A monotonic clock derived from ``now`` (invariant 10): the wall clock's
        #: forward steps count, backward steps count as no time at all.
        self._wall_seen: int | None = None
        self._mono_ms = 0
        self._reasons: set[str] = set()  # stats keys counted since last cleared
        #: (monotonic ms, peer) of recent session changes (see _announce_links)
        self._session_changes: deque[tuple[int, str]] = deque()
        #: Catch-up from a checkpoint (``mesh.core.catchup``). What we serve: (seq of
        #: the ck envelope, its frontier's total, the ``K`` message), set by the driver
        #: on the checkpointer; offered once that ck is durable here.
        self.state_offer: tuple[int, int, bytes] | None = None
        #: ask a peer offering a checkpoint state for it when we hold at least this
        #: many envelopes fewer than its frontier
        self.catchup_min_behind = config.CATCHUP_MIN_BEHIND
        self._state_asked = -config.CATCHUP_RETRY_MS  # monotonic ms of our last ask
        self.installing = False  # a verified state waits for the driver
        #: we hold nothing yet and wait, at most CATCHUP_WAIT_MS from our first session,
        #: for a checkpoint state (our summaries say ``cq``); None: not (or no longer)
        self._await_until: int | None = None
        self._awaited_once = False

    def _mono(self, now: int) -> int:
        """Monotonic ms for retransmission timers: a clock set back by D must not stall
        them for D (the wall ``now`` is all a driver gives us)."""
        last = self._wall_seen
        if last is not None and now > last:
            self._mono_ms += now - last
        self._wall_seen = now
        return self._mono_ms

    # --- helpers -------------------------------------------------------------------------

    def _refusals(self) -> int:
        return sum(v for k, v in self.stats.items() if k not in NOT_REFUSALS)

    def _count(self, key: str, n: int = 1) -> None:
        self.stats[key] = self.stats.get(key, 0) + n
        self._reasons.add(key)

    def _note(self, key: str) -> None:
        """Count bookkeeping that is no refusal (catch-up from a checkpoint)."""
        self.stats[key] = self.stats.get(key, 0) + 1

    def _send(self, out: list[Effect], peer: str, data: bytes, priority: int = HIGH) -> None:
        self.bytes_out += len(data)
        out.append(Send(peer, data, priority))

    def _vv_message(self, rx: int, ad: int, now: int, resend: Sequence[str] = ()) -> bytes:
        links = sorted(self.peers)
        crl = self.trust.crl_version
        msg = {"vv": self.replica.vv.to_dict(), "links": links,
               "nc": self._cert_digest(), "crl": crl, "rx": rx, "ad": ad,
               "ro": self.trust.roster_version, "cf": self.replica.clock_floor(now)}
        offer = self.state_offer
        if offer is not None and self.stored.get(self.replica.node_id) >= offer[0]:
            msg["cb"] = offer[1]  # a checkpoint state of this many envelopes, on request
        if resend:
            msg["rs"] = sorted(resend)
        if self._await_until is not None:
            msg["cq"] = 1
        return b"V" + orjson.dumps(msg)

    def _cert_digest(self) -> str:
        """Which certificates we hold, in 16 hex chars: peers that differ swap them."""
        if self._digest[0] != self.trust.version:
            h = hashlib.sha256()
            for c in self.trust.certificates():
                h.update(f"{c.node_id}\x00{c.not_after}\x00".encode())
            self._digest = (self.trust.version, h.hexdigest()[:16])
        return self._digest[1]

    def _send_vv(self, out: list[Effect], peer: _Peer, now: int,
                 resend: Sequence[str] = ()) -> None:
        # "ad": how long ago the last envelope counted in rx arrived (QUIC's ack delay),
        # so the sender measures the link, not how long we waited to summarise.
        ad = min(self._mono(now) - peer.rx_at, config.SYNC_RTO_MAX_MS) if peer.rx else 0
        self._send(out, peer.id, self._vv_message(peer.rx, ad, now, resend))
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

    def _certs_message(self, *, certs: bool = True) -> bytes:
        crl, roster = self.trust.crl, self.trust.roster
        return b"C" + orjson.dumps({
            "certs": [c.to_dict() for c in self.trust.certificates()] if certs else [],
            "crl": None if crl is None else crl.to_dict(),
            "roster": None if roster is None else roster.to_dict(),
        })

    def _certs_first(self, out: list[Effect], peer: _Peer) -> None:
        """Before envelopes go to ``peer``: the certificates we learned since its latest
        summary (or our latest ``C`` to it), which it may lack, go first (invariant 8).
        Only those, once: a register joining a store of n nodes costs each node one
        certificate per peer, not its whole trust store."""
        trust = self.trust
        if peer.certs_at == trust.version:  # the common case: nothing new
            return
        new = trust.certificates_since(peer.certs_at)
        peer.certs_at = trust.version
        if new:
            self._send(out, peer.id, b"C" + orjson.dumps(
                {"certs": [c.to_dict() for c in new], "crl": None}), HIGH)

    # --- sessions --------------------------------------------------------------------------

    def peer_up(self, peer_id: str, now: int, *, wan: bool = False) -> list[Effect]:
        """A session with ``peer_id`` (authenticated by the transport) is established.
        ``wan``: a metered link (the cloud): summaries go out less often there."""
        out: list[Effect] = []
        if self.trust.is_revoked(peer_id):  # invariant 9 (the transport refuses it too)
            self._count("revoked_session")
            out.append(EndSession(peer_id, "revoked"))
            return out
        if peer_id not in self.peers and len(self.peers) >= config.MAX_PEERS:
            self._count("peer_table_full")
            return out
        known = peer_id in self.peers
        wan_only = self._wan_only()
        if (not self._awaited_once and self.catchup_min_behind < config.MAX_COUNT
                and peer_id == self.replica.checkpointer != self.replica.node_id
                and self.replica.vv.total() == 0):
            # an empty replica, and a session with the one node that may offer a
            # checkpoint state: our summaries ask everyone to wait (``cq``) until its
            # first summary says whether it has one, for CATCHUP_WAIT_MS at most
            self._awaited_once = True
            self._await_until = self._mono(now) + config.CATCHUP_WAIT_MS
        peer = self.peers[peer_id] = _Peer(peer_id, reach=frozenset((peer_id,)))
        if wan:
            peer.wan = True
            peer.interval = config.SYNC_WAN_INTERVAL_MS
        # Certificates follow only if its summary shows it holds other ones (_on_vv):
        # in a store where everyone already holds everyone's, none cross at all.
        self._send_vv(out, peer, now)
        # Our other peers hear of this session once its first summary shows whether
        # it is the one (re)joining (see _on_vv and _announce_links).
        if known or wan_only != self._wan_only():
            self._topology_changed()
        else:
            self._peer_added(peer)
        self._session_changed(now, peer_id)
        return out

    def peer_down(self, peer_id: str, now: int) -> list[Effect]:
        self._stuck_peers.discard(peer_id)
        wan_only = self._wan_only()
        gone = self.peers.pop(peer_id, None)
        if gone is not None:
            if wan_only != self._wan_only():
                self._topology_changed()
            else:
                self._peer_removed(gone)
            self._session_changed(now, peer_id)
            # Only the peer that should now relay the lost one's envelopes to us needs
            # to know at once: the one with the smallest id that has a session with it
            # (the preferred bridge of rule 2, docs/protocol.md). Everyone else learns
            # it from our next periodic summary; until then they believe we still
            # reach it, so they do not relay it to us: one copy, not one per peer.
            bridge = min((q.id for q in self.peers.values()
                          if not q.wan and peer_id in q.links), default=None)
            if bridge is not None:
                self._links_due(now, [self.peers[bridge]])
        return []

    def _topology_changed(self) -> None:
        self._covered.clear()
        self._relay_targets.clear()
        self._unreached.clear()

    def _peer_added(self, x: _Peer) -> None:
        """A new peer ``x`` (last in ``peers``, no links known yet), and whether all our
        sessions are WAN did not change: update the memos as a full clear and
        recomputation would give them (tests/unit/test_sync_memo.py). At start-up
        every node adds n peers; a full clear each time cost O(n²) per peer."""
        xid = x.id
        # _unreached[o]: x's reach is {x}: it lacks every other origin
        unreached = self._unreached
        for origin in list(unreached):
            if origin != xid:
                unreached[origin] = (*unreached[origin], xid)
        # _covered[(p, o)]: x reports no session, so it covers nothing as a q; entries
        # about x itself, or whose origin just became a peer, go
        covered = self._covered
        for key in [k for k in covered if k[0] == xid or k[1] == xid]:
            del covered[key]
        # _relay_targets[(s, o)]: x bridges nothing (no links); it is a target unless
        # the origin or the source reports a session with it
        peers = self.peers
        targets_of = self._relay_targets
        for key in list(targets_of):
            sid, origin = key
            if sid == xid or origin == xid:
                del targets_of[key]
                continue
            o = peers.get(origin)
            if (o is not None and xid in o.links) or xid in peers[sid].links:
                continue
            targets, bridges = targets_of[key]
            if bridges is None:  # x is its first candidate: computed afresh when needed
                del targets_of[key]
            else:
                targets_of[key] = ((*targets, xid), bridges)

    def _peer_removed(self, x: _Peer) -> None:
        """Peer ``x`` left ``peers`` (and whether all our sessions are WAN did not
        change): update the memos as a full clear and recomputation would."""
        xid = x.id
        unreached = self._unreached
        for origin, pids in list(unreached.items()):
            if xid in pids:
                unreached[origin] = tuple(p for p in pids if p != xid)
        # _covered[(p, o)]: x counted as a q for p when p reported a session with it
        peers = self.peers
        covered = self._covered
        for key in [k for k in covered if k[0] == xid or k[1] == xid
                    or k[0] not in peers or xid in peers[k[0]].links]:
            del covered[key]
        # _relay_targets[(s, o)]: x drops out of the targets; where it was a bridge,
        # the others' tests change: those entries go
        targets_of = self._relay_targets
        for key in list(targets_of):
            sid, origin = key
            targets, bridges = targets_of[key]
            if sid == xid or origin == xid or (bridges is not None and xid in bridges):
                del targets_of[key]
            elif xid in targets:
                targets_of[key] = (tuple(p for p in targets if p != xid), bridges)

    def _links_changed(self, x: _Peer, old_links: frozenset[str]) -> None:
        """Peer ``x``'s summary lists other sessions than before (``old_links``), and
        nothing else changed: forget only the memo entries that this can change (the
        rest stay what ``_topology_changed`` and a recomputation would give). In a big
        store, the links of one rejoining node reach every node in n summaries spread
        over a summary period; clearing every memo at each of them cost O(n²) per
        summary, O(n⁴) in all (tests/unit/test_sync_memo.py checks this against the
        full clear)."""
        xid = x.id
        diff = old_links ^ x.links
        # _unreached[o]: the peers whose reach lacks o; only x's reach changed.
        for origin in diff:
            self._unreached.pop(origin, None)
        # _covered[(p, o)] reads p's links, o's links and, for q among p's links,
        # whether q reports o: x's change matters only if p or o is x, or o in diff.
        covered = self._covered
        for key in [k for k in covered if k[0] == xid or k[1] == xid or k[1] in diff]:
            del covered[key]
        # _relay_targets[(s, o)]: where x is neither the source nor the origin, x's
        # links decide only whether x itself is a bridge (then the others' tests
        # change) and whether x is a target: keep the entry when neither changes.
        peers = self.peers
        links, reach = x.links, x.reach
        wan_only = self._wan_only()
        me = self.replica.node_id
        stale = []
        for key, (targets, bridges) in self._relay_targets.items():
            sid, origin = key
            if sid == xid or origin == xid:
                stale.append(key)
                continue
            if bridges is None:  # no candidates, and x's links cannot add one
                continue
            source = peers.get(sid)
            o = peers.get(origin)
            if source is None:  # (not reached: a peer that left updates every memo)
                stale.append(key)
                continue
            if sid == origin and o is not None and (
                    (xid in o.links and origin in links
                     and (wan_only or (not x.wan and xid < me))) != (xid in bridges)):
                stale.append(key)  # x became, or stopped being, a preferred bridge
                continue
            target = not (origin in reach or (o is not None and xid in o.links)
                          or sid in links or xid in source.links
                          or (bridges and not links.isdisjoint(bridges)))
            if target != (xid in targets):
                stale.append(key)
        for key in stale:
            del self._relay_targets[key]

    def _links_due(self, now: int, peers: Iterable[_Peer]) -> None:
        """Send these peers our summary (which lists our sessions) within
        SYNC_LINKS_MS: debounced, so a burst of session changes costs one each."""
        due = now + config.SYNC_LINKS_MS
        for peer in peers:
            if not peer.wan and peer.next_vv > due:
                peer.next_vv = due
                heapq.heappush(self._deadlines, (due, peer.id))

    def _announce_links(self, now: int, new: _Peer) -> None:
        """A session with ``new`` is up and its first summary came. Relaying decides
        by who has a session with whom, and a session is known from either end's
        summary (``_reaches``), so one end announcing it is enough: the end that is
        (re)joining: its first summary lists fewer sessions than we hold (it lists
        ours, so between two settled nodes neither is fewer), while ours have not
        changed for SYNC_LINKS_SETTLED_MS (at start-up everyone's are changing, and
        everyone announces, as before). It announces to all its LAN peers; the other
        end stays quiet. So a till rejoining a store of n nodes
        costs O(n) summaries, not n peers each telling n peers (O(n^2)). Between two
        settled nodes (a single link back) both announce: 2n. At least one end always
        announces: each holds about as many sessions as its summary lists."""
        mono = self._mono(now)
        since = mono - config.SYNC_LINKS_SETTLED_MS
        changes = self._session_changes
        while changes and changes[0][0] < since:
            changes.popleft()
        settled = all(pid == new.id for _, pid in changes)
        if settled and len(new.links) + 1 < len(self.peers):
            return  # it is the one rejoining: it announces its sessions itself
        self._links_due(now, (p for p in self.peers.values() if p is not new))

    def _session_changed(self, now: int, peer_id: str) -> None:
        self._session_changes.append((self._mono(now), peer_id))
        if len(self._session_changes) > 2 * config.MAX_PEERS:
            self._session_changes.popleft()

    def _reaches(self, peer: _Peer, origin: str) -> bool:
        """Whether ``peer`` has a session with ``origin``, by its summary or by the
        origin's (either end's word is enough; see _announce_links)."""
        if origin in peer.reach:
            return True
        o = self.peers.get(origin)
        return o is not None and peer.id in o.links

    def is_up(self, peer_id: str) -> bool:
        return peer_id in self.peers

    def lag(self, peer_id: str) -> int:
        """Envelopes we hold that the peer has not acknowledged."""
        peer = self.peers.get(peer_id)
        if peer is None:
            return 0
        revoked = self.trust.revoked  # never sent above the bound (invariant 9): not lag
        return sum(max(0, (s if o not in revoked else min(s, self._upto(o)))
                       - peer.acked.get(o))
                   for o, s in self.replica.vv.items() if o != peer_id)

    def _upto(self, origin: str) -> int:
        """The highest seq of revoked ``origin`` we may hold and send (invariant 9)."""
        return self.trust.revocation_bound(origin) or 0

    # --- local and durable envelopes ---------------------------------------------------------

    def durable(self, envs: Sequence[Envelope], now: int) -> list[Effect]:
        """These envelopes are now on disk. Local ones are pushed to every peer now
        (never before: invariant 2 of mesh.durable); all advance ``stored``."""
        out: list[Effect] = []
        local = []
        revoked = self.trust.revoked
        for env in envs:
            if env.origin in revoked and env.seq > self._upto(env.origin):
                continue  # left out of the replica, kept on disk only (invariant 9)
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
        revoked = self.trust.revoked
        ranges: dict[str, list[int]] = {}  # origin -> [first, last] sent now
        for env in envs:
            if (env.seq != peer.sent.get(env.origin) + 1 or env.origin == peer.id
                    or (env.origin in revoked and env.seq > self._upto(env.origin))):
                continue
            if inflight < 0:
                inflight = peer.inflight()
                self._certs_first(out, peer)
            if inflight >= config.MAX_INFLIGHT_PER_PEER + config.PUSH_RESERVE:
                break  # fresh envelopes may use the reserve a catch-up cannot
            inflight += 1
            peer.sent.set(env.origin, env.seq)
            r = ranges.get(env.origin)
            if r is None:
                ranges[env.origin] = [env.seq, env.seq]
            else:
                r[1] = env.seq
            (low if _priority(env) == LOW else high).append(env.raw)
        for raws, prio in ((high, HIGH), (low, LOW)):
            if raws:
                self.sent_envelopes += len(raws)
                peer.tx += len(raws)
                for chunk in _chunks(raws):
                    self._send(out, peer.id, encode_batch(chunk), prio)
        if ranges:
            at = self._mono(now)
            for origin, (first, last) in ranges.items():
                peer.out.append(_Batch(origin, first, last, at, peer.tx, False))

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
        if origin in peer.links or self._reaches(peer, origin):
            return False
        key = (peer.id, origin)
        covered = self._covered.get(key)
        if covered is None:  # memoised until sessions or links change (_links_changed)
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
        if peer.awaits_state:
            return  # it waits for a checkpoint state (``cq``), and then says so
        if peer.resend:
            self._serve_resends(out, peer)
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
            if self.trust.is_revoked(origin):  # up to its bound only (invariant 9)
                have = min(have, self._upto(origin))
            sent = peer.sent.get(origin)
            if (have <= sent or origin in peer.fetching or origin == peer.id
                    or origin in peer.unservable or not self._eligible(peer, origin, now)):
                continue
            if room < 0:
                room = config.MAX_INFLIGHT_PER_PEER - peer.inflight()
            if room <= 0:
                return
            last = min(have, sent + min(room, config.LEDGER_PAGE))
            peer.fetching[origin] = last - sent
            room -= last - sent
            out.append(Fetch(peer.id, origin, sent + 1, last))

    def _serve_resends(self, out: list[Effect], peer: _Peer) -> None:
        """Fetch what must be sent again (lost or refused), a page at a time per origin;
        only what storage holds durably (invariant 4)."""
        for origin in sorted(peer.resend):
            if origin in peer.refetching:
                continue
            lo, hi = peer.resend[origin]
            top = min(hi, self.stored.get(origin), lo + config.LEDGER_PAGE - 1)
            if top < lo:
                continue
            if top >= hi:
                del peer.resend[origin]
            else:
                peer.resend[origin][0] = top + 1
            peer.refetching[origin] = lo
            out.append(Fetch(peer.id, origin, lo, top))

    def fetched(self, peer_id: str, origin: str, first: int, raws: Sequence[bytes],
                now: int) -> list[Effect]:
        """The driver read ``raws`` (seqs ``first``, ``first + 1``, ...) for a ``Fetch``."""
        out: list[Effect] = []
        peer = self.peers.get(peer_id)
        if peer is None:
            return out
        if self.trust.is_revoked(origin):  # up to its bound only (invariant 9)
            raws = raws[:max(0, self._upto(origin) - first + 1)]
        if peer.refetching.get(origin) == first:
            # A retransmission (lost or refused envelopes below ``sent``): it leaves
            # ``sent`` as it is, and yields no round-trip sample when acknowledged.
            del peer.refetching[origin]
            if raws:
                self._certs_first(out, peer)
                self._send_batch(out, peer, origin, first, list(raws), now, retx=True)
            self._pump(out, peer, now)
            return out
        peer.fetching.pop(origin, None)
        if not raws and first == peer.sent.get(origin) + 1:
            # storage no longer holds them (a register's pruned ledger, or it did not
            # answer): asking again at once would spin; the peer's next summary retries
            peer.unservable.add(origin)
        if first != peer.sent.get(origin) + 1 or not raws:
            self._pump(out, peer, now)
            return out
        raws = list(raws)
        self._certs_first(out, peer)
        peer.sent.set(origin, first + len(raws) - 1)
        self._send_batch(out, peer, origin, first, raws, now, retx=False)
        self._pump(out, peer, now)
        return out

    def _send_batch(self, out: list[Effect], peer: _Peer, origin: str, first: int,
                    raws: list[bytes], now: int, *, retx: bool) -> None:
        self.sent_envelopes += len(raws)
        peer.tx += len(raws)
        for chunk in _chunks(raws):
            self._send(out, peer.id, encode_batch(chunk), HIGH)
        peer.out.append(_Batch(origin, first, first + len(raws) - 1, self._mono(now),
                               peer.tx, retx))

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
                self._on_certs(out, peer, data, now)
            elif kind == b"B":
                self._on_state_request(out, peer)
            elif kind == b"K":
                self._on_state(out, peer, data, now)
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
        floor = msg.get("cf")  # optional: peers before the clock floor send none
        if floor is not None and (type(floor) is not int or not 0 <= floor <= MAX_TS):
            raise Malformed("cf must be an HLC timestamp")
        # The stable frontier and the member's clock promise (issue 12).
        self.replica.frontier.observe(peer.id, theirs, now, floor)
        links = msg.get("links", [])
        if not isinstance(links, list) or len(links) > config.MAX_PEERS or not all(
            map(isinstance, links, repeat(str))
        ):
            raise Malformed("links must be a list of node ids")
        certs, crl, their_rx = msg.get("nc", ""), msg.get("crl", -1), msg.get("rx", -1)
        ad = msg.get("ad", 0)
        if (type(certs) is not str or type(crl) is not int or type(their_rx) is not int
                or type(ad) is not int):
            raise Malformed("nc must be a string, crl, rx and ad integers")
        ad = min(max(ad, 0), config.SYNC_RTO_MAX_MS)
        resend = msg.get("rs", [])
        if not isinstance(resend, list) or len(resend) > config.MAX_AWAITED_CERTS or not all(
            map(isinstance, resend, repeat(str))
        ):
            raise Malformed("rs must be a short list of node ids")

        if their_rx < peer.their_rx:
            # Overtaken by a newer summary (a reordering link; rx only grows within a
            # session): what it says is out of date. Acting on it would lower what the
            # peer acknowledged, open the window twice and "repair" by resending.
            # (A session's messages never reach the next one: the transport's session
            # object, and the simulator's per-pair session numbers, see to that.)
            self._count("stale_summary")
            return
        peer.their_rx = their_rx
        peer.crl = crl
        first = not peer.ready
        peer.ready = True
        new_links = frozenset(links)
        if new_links != peer.links:
            old_links = peer.links
            peer.links = new_links
            peer.reach = new_links | {peer.id}
            self._links_changed(peer, old_links)
        if first:
            self._announce_links(now, peer)
        peer.acked = theirs
        peer.unservable.clear()
        tget = theirs.view().get
        if first:
            peer.sent = theirs.copy()
            peer.out.clear()
        else:
            spans: dict[str, list[tuple[int, int]]] = {}
            if peer.out or peer.resend:
                spans = self._settle(peer, tget, their_rx, ad, self._mono(now),
                                     frozenset(resend))
            if peer.sent != theirs:  # (equal: the common case, nothing to do)
                # What it holds it got somewhere: never send it those (for every origin
                # it reports, also those we never sent it; else a node that takes over
                # relaying an origin, or serves one lost push, would start from seq 1).
                peer.sent.merge(theirs)
                for origin in [o for o, q in peer.sent.items() if tget(o, 0) < q]:
                    self._uncovered(peer, origin, tget(origin, 0), spans.get(origin, []))
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
        peer.roster = roster
        if (certs != self._cert_digest() or crl < self.trust.crl_version
                or roster < self.trust.roster_version):
            self._send(out, peer.id, self._certs_message(), HIGH)  # before any resend
            peer.crl = self.trust.crl_version
            peer.roster = self.trust.roster_version
        peer.certs_at = self.trust.version  # it holds ours, or has just been sent them
        peer.awaits_state = msg.get("cq") == 1
        offer = msg.get("cb")
        if type(offer) is int and self._wants_state(peer, offer, now):
            self._state_asked = self._mono(now)
            self._send(out, peer.id, b"B", HIGH)
        elif not self.installing and (type(offer) is int
                                      or peer.id == self.replica.checkpointer):
            # offered, but not worth it; or the checkpointer has none: fetch instead
            self._stop_awaiting(out, now)
        self._pump(out, peer, now)

    def _settle(self, peer: _Peer, tget: Callable[[str, int], int], their_rx: int,
                ad: int, mono: int, asked: frozenset[str] = frozenset(),
                ) -> dict[str, list[tuple[int, int]]]:
        """Match a summary against the batches outstanding (invariant 10): drop the
        acknowledged ones (one round-trip sample, RFC 6298, from the batch that ended
        where the summary's ``rx`` does and was never resent: Karn's rule), and queue
        for resending the part of a batch that is lost or refused. A batch is refused
        when everything we sent has arrived (``rx``) and it is still not held; lost when
        it is older than the retransmission timeout. What is merely in flight is never
        resent. Returns, per origin, the seq ranges still outstanding or queued."""
        keep: deque[_Batch] = deque()
        spans: dict[str, list[tuple[int, int]]] = {}
        timed_out = False
        all_arrived = their_rx >= peer.tx
        #: per origin, whether its refused/lost batches are resent now: decided once per
        #: origin and summary, so a backoff slot resends ALL of them. (One batch per slot
        #: left the one holding the peer's next seq behind the others; the peer's
        #: contiguous ``have`` never rose, so the backoff never reset: a swarm run of
        #: lossy_busy_till took minutes to repair a dozen lost pushes.)
        due: dict[str, bool] = {}
        for b in peer.out:
            have = tget(b.origin, 0)
            if have >= b.last:
                if not b.retx and b.tx == their_rx:
                    self._rtt_sample(peer, mono - b.at - ad)
                continue
            lost = False
            if all_arrived or b.origin in asked:
                # Refused (e.g. a certificate it lacked) or lost with everything after
                # it arriving: resend, backing off per origin while it keeps refusing.
                verdict = due.get(b.origin)
                if verdict is None:
                    verdict = due[b.origin] = self._refusal_due(peer, b.origin, have, mono,
                                                                b.origin in asked)
                lost = verdict
            elif mono - b.at > peer.rto:
                lost = timed_out = True
            if lost:
                lo = max(have + 1, b.first)
                r = peer.resend.get(b.origin)
                if r is None:
                    peer.resend[b.origin] = [lo, b.last]
                else:
                    r[0], r[1] = min(r[0], lo), max(r[1], b.last)
                continue
            keep.append(b)
            spans.setdefault(b.origin, []).append((b.first, b.last))
        peer.out = keep
        for origin, r in list(peer.resend.items()):
            have = tget(origin, 0)
            if have >= r[1]:
                del peer.resend[origin]  # it got them meanwhile (another peer's copy)
            else:
                r[0] = max(r[0], have + 1)
                spans.setdefault(origin, []).append((r[0], r[1]))
        if timed_out:  # RFC 6298 5.5: back off until a fresh sample
            peer.rto = min(config.SYNC_RTO_MAX_MS, 2 * peer.rto)
        return spans

    @staticmethod
    def _refusal_due(peer: _Peer, origin: str, have: int, mono: int, asked: bool) -> bool:
        """Whether ``origin``'s refused batches may go again now (per-origin backoff,
        doubling from SYNC_NACK_MS while the peer's ``have`` does not move)."""
        until, delay, at_have = peer.refused.get(origin, (-1, 0, -1))
        if have > at_have or asked:
            # it took some since, or asks for them (``rs``: the certificate it lacked
            # has come): start the backoff afresh
            until, delay = -1, 0
        if mono < until:
            return False
        delay = min(config.SYNC_REFUSAL_BACKOFF_MAX_MS,
                    max(config.SYNC_NACK_MS, 2 * delay)) if until >= 0 else 0
        peer.refused[origin] = (mono + delay, delay, have)
        return True

    @staticmethod
    def _uncovered(peer: _Peer, origin: str, have: int, spans: list[tuple[int, int]]) -> None:
        """Seqs of ``origin`` above what the peer holds and up to ``sent`` that no batch
        outstanding (or queued for resending) covers: we never sent it those in this
        session, so what made us think it holds them was wrong (it lost them, said so
        falsely, or a copy relayed "from" it was replayed): a gap below a batch in
        flight is queued for resending, and past the last batch ``sent`` goes back to
        where coverage ends, so the window sends the rest."""
        pos = have + 1
        gap_lo = gap_hi = 0
        for first, last in sorted(spans):
            if first > pos:
                gap_lo = gap_lo or pos
                gap_hi = first - 1
            pos = max(pos, last + 1)
        if gap_lo:
            r = peer.resend.get(origin)
            if r is None:
                peer.resend[origin] = [gap_lo, gap_hi]
            else:
                r[0], r[1] = min(r[0], gap_lo), max(r[1], gap_hi)
        if pos <= peer.sent.get(origin):
            peer.sent = _lowered(peer.sent, origin, pos - 1)

    @staticmethod
    def _rtt_sample(peer: _Peer, r: int) -> None:
        """RFC 6298 section 2, with our bounds on the result."""
        r = max(r, 0)
        if peer.srtt < 0:
            peer.srtt, peer.rttvar = float(r), r / 2
        else:
            peer.rttvar = 0.75 * peer.rttvar + 0.25 * abs(peer.srtt - r)
            peer.srtt = 0.875 * peer.srtt + 0.125 * r
        rto = peer.srtt + max(config.SYNC_TIMER_SLACK_MS, 4 * peer.rttvar)
        peer.rto = int(min(config.SYNC_RTO_MAX_MS, max(config.SYNC_RTO_MIN_MS, rto)))

    def _on_certs(self, out: list[Effect], peer: _Peer, data: bytes, now: int) -> None:
        try:
            msg = orjson.loads(data[1:])
        except orjson.JSONDecodeError:
            raise Malformed("certificate message is not JSON") from None
        if not isinstance(msg, dict) or not isinstance(msg.get("certs"), list):
            raise Malformed("certificate message needs a certs list")
        if len(msg["certs"]) > config.MAX_CERTS_PER_MESSAGE:
            raise Malformed("too many certificates in one message")
        changed = False
        learned: list[str] = []  # node ids we hold a certificate for only now
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
            if self.trust.certificate(cert.node_id) is not held:
                changed = True
                if held is None:
                    learned.append(cert.node_id)
        if msg.get("crl") is not None:
            try:
                crl = RevocationList.from_dict(msg["crl"])
                before = self.trust.crl_version
                self.trust.apply_revocations(crl)
            except EnvelopeError as exc:
                self._count(exc.reason)
            else:
                peer.crl = max(peer.crl, crl.version)  # it holds this one
                if self.trust.crl_version != before:
                    changed = True
                    self._revocations_changed(out, now)
        if msg.get("roster") is not None:
            try:
                roster = Roster.from_dict(msg["roster"])
            except ValueError:
                self._count("malformed")
            else:
                try:
                    before = self.trust.roster_version
                    self.trust.apply_roster(roster)
                except EnvelopeError as exc:
                    self._count(exc.reason)
                else:
                    peer.roster = max(peer.roster, roster.version)
                    if self.trust.roster_version != before:
                        changed = True
                        self._roster_changed(out)
        if changed:
            out.append(TrustChanged())
        tls = msg.get("tls")
        if tls is not None:
            if isinstance(tls, str) and len(tls) <= config.MAX_TLS_PEM_BYTES:
                out.append(InstallTls(tls))  # after TrustChanged: its certificate first
            else:
                self._count("malformed")
        if learned and self._awaited:
            self._ask_again(out, learned, now)

    # --- catch-up from a checkpoint (mesh.core.catchup) ----------------------------------------

    def _wants_state(self, peer: _Peer, offered: int, now: int) -> bool:
        """Whether to ask ``peer`` for the checkpoint state it offers (a frontier of
        ``offered`` envelopes): we are that far behind it, have not asked anyone
        lately, and it has not sent us one we refused."""
        return (not self.installing and not peer.state_refused
                and offered - self.replica.vv.total() >= self.catchup_min_behind
                and self._mono(now) - self._state_asked >= config.CATCHUP_RETRY_MS)

    def _on_state_request(self, out: list[Effect], peer: _Peer) -> None:
        offer = self.state_offer
        if (offer is None or self.stored.get(self.replica.node_id) < offer[0]
                or peer.states_served >= config.CATCHUP_STATES_PER_SESSION):
            self._note("state_not_served")  # (not the peer's fault: no refusal)
            return
        peer.states_served += 1
        self._note("state_served")
        self._certs_first(out, peer)
        self._send(out, peer.id, offer[2], HIGH)

    def _on_state(self, out: list[Effect], peer: _Peer, data: bytes, now: int) -> None:
        """A checkpoint state: verified whole (``mesh.core.catchup`` invariant 1) or
        refused whole (``bad_checkpoint_state``), and then we go on with the full
        fetch, as we do meanwhile."""
        if self.installing:
            self._note("duplicate_state")
            return
        try:
            ck_raw, blob = decode_state(data)
            env = verify(decode(ck_raw), self.trust, now)
            ck, state = verify_state(env, blob, self.replica.store_id, self.replica.role,
                                     self.replica.checkpointer)
        except EnvelopeError:
            peer.state_refused = True
            self._count("bad_checkpoint_state")
            self._stop_awaiting(out, now)  # the full fetch, then
            return
        self.installing = True
        out.append(InstallState(peer.id, env, ck, state))

    def state_installed(self, replica: Replica | None, now: int) -> list[Effect]:
        """The driver carried out an ``InstallState``: ``replica`` is the installed one
        (durable), or None if it could not be installed. Our peers hear our new
        vector at once and send the tail above the checkpoint's frontier."""
        out: list[Effect] = []
        self.installing = False
        if replica is None:
            self._note("state_not_installed")
            self._stop_awaiting(out, now)
            return out
        self._await_until = None
        self._note("state_installed")
        self.replica = replica
        self.stored = replica.vv.copy()
        for peer in self.peers.values():
            peer.unservable.clear()
            if peer.ready:
                self._send_vv(out, peer, now)
        return out

    def _stop_awaiting(self, out: list[Effect], now: int) -> None:
        """Stop waiting for a checkpoint state: our summary (without ``cq``) tells
        every peer to fetch us what we lack, from seq 1."""
        if self._await_until is None:
            return
        self._await_until = None
        for peer in self.peers.values():
            if peer.ready:
                self._send_vv(out, peer, now)

    def ready_peers(self) -> list[str]:
        """Peers with a live, handshaken session (whom a ``Send`` reaches now)."""
        return sorted(pid for pid, p in self.peers.items() if p.ready)

    def renewed(self, cert: Certificate, tls_pem: str | None) -> list[Effect]:
        """The store key's holder renewed ``cert`` (``mesh.driver``): hold it (every
        peer gets it before our next envelopes, invariant 8, and with our summary) and,
        if its node is a peer now, send it there at once with its TLS certificate."""
        out: list[Effect] = []
        self.trust.add_certificate(cert)
        out.append(TrustChanged())
        peer = self.peers.get(cert.node_id)
        if peer is not None and peer.ready:
            msg: dict[str, Any] = {"certs": [cert.to_dict()], "crl": None}
            if tls_pem is not None:
                msg["tls"] = tls_pem
            self._send(out, peer.id, b"C" + orjson.dumps(msg), HIGH)
        return out

    def _ask_again(self, out: list[Effect], learned: list[str], now: int) -> None:
        """Certificates of ``learned`` arrived: peers that sent us envelopes of those
        origins (refused then as ``not_enrolled``) get our summary now, naming them in
        ``rs``, so they send them again from what we hold (invariant 8)."""
        by_peer: dict[str, list[str]] = {}
        for origin in learned:
            for pid in self._awaited.pop(origin, ()):
                by_peer.setdefault(pid, []).append(origin)
        for pid, origins in by_peer.items():
            peer = self.peers.get(pid)
            if peer is not None:
                self._send_vv(out, peer, now, origins)

    def _revocations_changed(self, out: list[Effect], now: int) -> None:
        """A newer revocation list was adopted: end the sessions of revoked peers and
        pass the list on at once to every peer whose summary shows an older one (the
        list alone: its certificates are not news), so it crosses the store in a few
        round trips, not one summary interval per hop (invariant 9)."""
        revoked = self.trust.revoked
        for pid in [p for p in self.peers if p in revoked]:
            self._count("revoked_session")
            out.append(EndSession(pid, "revoked"))
            self.peer_down(pid, now)
        for origin in [o for o in self._awaited if o in revoked]:
            del self._awaited[origin]
        rebuild = []
        for origin in sorted(revoked):
            bound = self.trust.revocation_bound(origin)
            dropped = self.replica.drop_pending(origin, 0 if bound is None else bound)
            if dropped:  # (not a refusal of this message's sender: no ``_count``)
                self.stats["revoked_dropped"] = self.stats.get("revoked_dropped", 0) + dropped
            if bound is not None and self.replica.vv.get(origin) > bound:
                rebuild.append(origin)
        if rebuild:
            out.append(Rebuild(tuple(rebuild)))
        version = self.trust.crl_version
        data = b""
        for peer in self.peers.values():
            if peer.ready and peer.crl < version:
                data = data or self._certs_message(certs=False)
                self._send(out, peer.id, data, HIGH)
                peer.crl = version

    def _roster_changed(self, out: list[Effect]) -> None:
        """A newer staff roster was adopted: pass it on at once to every peer whose
        summary shows an older one, as ``_revocations_changed`` does for the list, so a
        disabled staff member is refused store-wide within a few round trips."""
        version = self.trust.roster_version
        data = b""
        for peer in self.peers.values():
            if peer.ready and peer.roster < version:
                data = data or self._certs_message(certs=False)
                self._send(out, peer.id, data, HIGH)
                peer.roster = version

    def learn_roster(self, roster: Roster) -> list[Effect]:
        """A staff roster from a local source (the edge re-signed it): adopt it if newer
        and pass it on at once. Raises ``BadSignature`` or ``WrongStore``."""
        out: list[Effect] = []
        before = self.trust.roster_version
        self.trust.apply_roster(roster)
        if self.trust.roster_version != before:
            self._roster_changed(out)
            out.append(TrustChanged())
        return out

    def replica_rebuilt(self, replica: Replica) -> None:
        """The driver carried out a ``Rebuild``: take the rebuilt replica. Storage still
        holds the left-out rows (an archive): we serve only up to the bounds (inv. 4, 9)."""
        self.replica = replica
        stored = self.stored
        for origin, bound in self.trust.revocation_bounds.items():
            if stored.get(origin) > bound:
                stored = _lowered(stored, origin, bound)
        self.stored = stored

    def learn_revocations(self, crl: RevocationList, now: int) -> list[Effect]:
        """A revocation list from a local source (``POST /v1/revocations``): adopt it if
        it is newer, with the same effects as one a peer sent. Raises ``BadSignature``
        or ``WrongStore`` (the caller's input: refuse the request)."""
        out: list[Effect] = []
        before = self.trust.crl_version
        self.trust.apply_revocations(crl)
        if self.trust.crl_version != before:
            self._revocations_changed(out, now)
            out.append(TrustChanged())
        return out

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
        self._reasons.clear()
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
        if "not_enrolled" in self._reasons:
            self._await_certificates(peer, decoded)
        n = len(raws)
        peer.rx += n
        peer.rx_at = self._mono(now)
        peer.unacked_in += n
        refused = [r for r in self._reasons if r not in NOT_REFUSALS]
        if applied:
            self.received += len(applied)
            out.append(Persist(tuple(applied)))
            self._relay(out, peer, applied, now)
        gap = self.replica.pending_count() > pending_before
        if refused:
            gap |= self._nack_due(peer, refused, peer.rx_at)
        if peer.unacked_in >= config.SYNC_ACK_EVERY or (
                gap and now - peer.vv_at >= config.SYNC_NACK_MS):
            # Opens the sender's window during catch-up; after a refusal or a gap, tells
            # it soon what we lack (and which certificates we hold) so it can repair.
            self._send_vv(out, peer, now)

    def _await_certificates(self, peer: _Peer, decoded: list[tuple[Envelope, bytes]]) -> None:
        """Some of ``decoded`` were refused as ``not_enrolled``: remember their origins
        and ``peer`` (bounded), to ask it for them again when the certificate comes."""
        trust = self.trust
        for origin in {env.origin for env, _ in decoded}:
            if trust.certificate(origin) is not None or trust.is_revoked(origin):
                continue
            peers = self._awaited.get(origin)
            if peers is None:
                if len(self._awaited) >= config.MAX_AWAITED_CERTS:
                    # oldest first: an origin that never enrols must not keep a
                    # register that joins later from being asked for again
                    del self._awaited[next(iter(self._awaited))]
                peers = self._awaited[origin] = set()
            if len(peers) < config.MAX_AWAITED_CERTS:
                peers.add(peer.id)
    @staticmethod
    def _nack_due(peer: _Peer, reasons: list[str], mono: int) -> bool:
        """Whether a refusal for one of ``reasons`` should be reported at once. Per
        (peer, reason) the delay doubles from SYNC_NACK_MS to
        SYNC_REFUSAL_BACKOFF_MAX_MS while the peer keeps sending what we refuse, and
        starts afresh after a quiet spell as long as the cap: a peer resending what we
        refuse would otherwise loop (refusal, summary, resend) at the nack rate."""
        due = False
        cap = config.SYNC_REFUSAL_BACKOFF_MAX_MS
        for reason in reasons:
            until, delay, seen = peer.nack.get(reason, (0, 0, -cap - 1))
            if mono - seen > cap:
                until, delay = 0, 0
            if mono >= until:
                due = True
                delay = min(cap, max(config.SYNC_NACK_MS, 2 * delay))
                until = mono + delay
            peer.nack[reason] = (until, delay, mono)
        return due

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
        if self.replica.checkpoint_mismatches:
            self._checkpoint_alerts(out)
        return applied

    def _checkpoint_alerts(self, out: list[Effect]) -> None:
        """A fold here did not match its ``ck`` op (the proposer's fold hash or a chain
        head it names): counted and raised as an alert, never a refusal; the fold stands
        on this replica's own envelopes (``mesh.core.replica.CheckpointMismatch``)."""
        for m in self.replica.take_checkpoint_mismatches():
            self._count("checkpoint_mismatch")
            n = self._alerted.get(m.origin, 0)
            if n < config.MAX_ALERTS_PER_ORIGIN:
                self._alerted[m.origin] = n + 1
                out.append(Alert("checkpoint_mismatch", m.origin, m.seq, m.expected, m.found))

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
                    t = self._relay_targets[key] = self._relay_targets_with_bridges(
                        source, env.origin)
                targets[env.origin] = t[0]
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
        return self._relay_targets_with_bridges(source, origin)[0]

    def _relay_targets_with_bridges(self, source: _Peer, origin: str,
                                    ) -> tuple[tuple[str, ...], frozenset[str] | None]:
        """Peers we relay ``origin``'s envelopes to when they came from ``source``: those
        with no session with the origin or the source. When we had them from the origin
        itself, and another peer of the target is a preferred bridge to the origin
        (``_preferred_bridge``), that one relays instead: two edge nodes holding the
        cloud's WAN link do not both send each cloud envelope to every register.

        Also returns the preferred bridges that decided it, or None when no peer was
        left to decide for (every peer but the source is among the origin's or the
        source's links: the usual case in a full LAN mesh). The memo updates
        (``_links_changed``, ``_peer_added``, ``_peer_removed``) rely on that: a None
        entry's candidates stay empty until a peer is added."""
        # (Runs for every (source, origin) after each change of topology: O(peers)
        # set look-ups, with ``_preferred_bridge`` and ``_reaches`` inlined: a 100-node
        # store spent a fifth of its time here.)
        peers = self.peers
        o = peers.get(origin)
        o_links = o.links if o is not None else frozenset()
        sid, s_links = source.id, source.links
        cand = [pid for pid in peers if pid not in o_links and pid not in s_links and pid != sid]
        if not cand:
            return (), None
        bridges = self._bridges(source, origin)
        out = []
        for pid in cand:
            p = peers[pid]
            if (origin in p.reach or sid in p.links
                    or (bridges and not p.links.isdisjoint(bridges))):
                continue
            out.append(pid)
        return tuple(out), bridges

    def _bridges(self, source: _Peer, origin: str) -> frozenset[str]:
        """= {q in peers if _preferred_bridge(q, origin)} when we had ``origin``'s
        envelopes from the origin itself, else empty: q and the origin both report
        their session (so q is among the origin's links), q a LAN node with the smaller
        id, or any such q when all our sessions are WAN."""
        peers = self.peers
        o = peers.get(origin)
        if source.id != origin or o is None:
            return frozenset()
        wan_only = self._wan_only()
        me = self.replica.node_id
        bridges = set()
        for q in o.links:
            p = peers.get(q)
            if p is not None and origin in p.links and (wan_only or (not p.wan and q < me)):
                bridges.add(q)
        return frozenset(bridges)

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
        if (self._await_until is not None and not self.installing
                and self._mono(now) >= self._await_until):
            self._stop_awaiting(out, now)  # nobody offered one in time
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

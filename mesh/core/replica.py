"""The replicated state of one store, as one node holds it.

A ``Replica`` is pure: no I/O, no clock, no randomness. Local commands take ``now_ms``
and return signed envelopes; remote envelopes (already verified by
``mesh.core.envelope.verify``) go in through ``apply``. Persisting and pushing envelopes is
the caller's job (``mesh.durable``, the node runtime, the simulator).

Invariants:
 1. Per origin, envelopes are applied in seq order without gaps, each linking to the
    hash of the one before (``prev``). ``vv[origin]`` is the highest applied seq.
 2. ``apply`` is idempotent by (origin, seq): a second copy of an applied envelope
    changes nothing; a *different* envelope for an applied (origin, seq) is
    equivocation, kept as evidence and raised, and changes nothing.
 3. An envelope that arrives ahead of a gap is buffered and applied once the gap
    fills, so any arrival order gives the same state. The buffer holds wire bytes only
    (re-decoded when the gap fills), bounded in count per origin and in bytes per
    origin and per node; past a bound the envelope is refused (``SeqGap``,
    ``PendingFull``) and changes nothing.
 4. An envelope is applied whole or not at all: every check that can fail runs before
    the first mutation (``mesh.core.ops`` bounds every number, so the mutation's arithmetic
    cannot overflow).
 5. ``stock[sku]`` is a PN-counter; ``reservations`` an add-wins OR-set of reservation
    ids with immutable records; ``available = on_hand - reserved``.
 6. The oversell exception list is a function of the *set* of applied envelopes only:
    stock events are ordered by (HLC, origin, seq) and every event that lowers
    availability below zero is flagged — the same list at every replica holding the
    same envelopes, whatever order they arrived in.
 7. A txn id is used once per origin: a repeated local command with the same txn id
    and the same content (the same kind and meta fields, ``_fingerprint``; for a
    reservation also its record's channel, order and expiry) returns the original
    result (seq, reservation id) and changes nothing; the same txn id with other
    content is refused (``TxnReused``). docs/api.md lists the fields per kind. A txn
    id is remembered for ``config.IDEMPOTENCY_WINDOW_MS`` after its envelope's HLC
    time, judged against the command's ``now_ms`` (never the wall clock); then it is
    retired and the same id is a new command (a reservation whose record is still
    held keeps refusing its txn id: the id names the reservation).
 8. A remote HLC is adopted only within ``config.MAX_HLC_ADOPT_AHEAD_MS`` of ``now``
    (of the clock rebuilt so far, on replay); acceptance never depends on the wall
    clock (``_apply_next``).
 9. Checkpoints (docs/architecture.md, "Bounded history"): only ``ck`` ops of the
    store's ``checkpointer`` count; their cut and frontier grow strictly (the cut is
    the oldest member bound: newest stamp within the frontier, or a clock floor the
    member promised, ``propose_checkpoint``; receivers take it from the op). An envelope
    outside a checkpoint's frontier with an HLC within its cut is *late*: its order key
    is just after the cut (``_key``). Once this replica holds a checkpoint's frontier,
    every event with a key up to twice the cut is folded into per-SKU totals and final
    exceptions; reservations released there, and hashes below the frontier, leave
    memory. Folding changes no answer: exceptions, availability and ``state_digest``
    are those of a replica that keeps everything. A fold that differs from what its
    ``ck`` op names (the proposer's fold hash, the chain head at each frontier seq) is
    recorded (``CheckpointMismatch``) and the fold stands. A replica installed from a
    checkpoint state (``mesh.core.catchup``) holds its checkpoint without the ck
    envelope: a ck of the checkpointer at or below the seq of the newest held one is
    then one it holds already, and changes nothing (``_plan_checkpoint``).
 10. ``snapshot`` is binary, holds no base64, and ``restore`` of it gives the same
    state (``state_digest``) and the same future behaviour.
"""

from __future__ import annotations

import base64
import enum
import hashlib
import sys
from array import array
from bisect import bisect_left, bisect_right, insort
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from itertools import accumulate
from operator import sub
from typing import Any, Final

import orjson
import pycrdt

from mesh import config
from mesh.core.checkpoint import Frontier
from mesh.core.crdt import HLC, ORSet, PNCounter, VersionVector
from mesh.core.crdt.hlc import COUNTER_BITS, MAX_TS
from mesh.core.envelope import Envelope, decode, seal
from mesh.core.identity import NodeKey
from mesh.core.reviews import ReviewSet
from mesh.errors import (
    BrokenChain,
    ClockSkew,
    CommandError,
    EnvelopeError,
    Equivocation,
    Malformed,
    PendingFull,
    SeqGap,
    TxnReused,
    UnknownSku,
    WrongStore,
)

__all__ = [
    "SNAPSHOT_MAGIC",
    "ApplyResult",
    "Checkpoint",
    "CheckpointMismatch",
    "CommandResult",
    "OversellException",
    "Replica",
    "Reservation",
]

#: Event kinds that consume availability and can therefore be oversell losers.
_CONSUMING: Final = ("sale", "reserve", "fulfil", "adjust")
_KINDS: Final = (
    "receipt", "sale", "return", "adjust", "reserve", "release", "fulfil", "expire", "catalog",
    # appended (codes are in snapshots): mesh.core.reviews, mesh.core.telemetry
    "review", "telemetry",
    "checkpoint",  # mesh.core.checkpoint
)
_KIND_CODE: Final = {k: i for i, k in enumerate(_KINDS)}


class ApplyResult(enum.Enum):
    APPLIED = "applied"
    DUPLICATE = "duplicate"
    PENDING = "pending"


@dataclass(frozen=True, slots=True)
class Reservation:
    id: str
    sku: str
    qty: int
    channel: str
    order: str | None
    expires: int | None


@dataclass(frozen=True, slots=True)
class OversellException:
    """A stock event that took availability below zero (the loser of a race)."""

    sku: str
    origin: str
    seq: int
    hlc: int
    kind: str
    short: int  # units of this event that were not there

    def to_dict(self) -> dict[str, Any]:
        return {
            "sku": self.sku, "origin": self.origin, "seq": self.seq, "hlc": self.hlc,
            "kind": self.kind, "short": self.short,
        }


@dataclass(frozen=True, slots=True)
class CommandResult:
    """What a local command did. ``envelope`` is None when nothing needed to change."""

    envelope: Envelope | None
    origin: str
    seq: int
    duplicate: bool = False
    reservation_id: str | None = None


#: A release in the replay: (key, origin, seq, kind, units, hlc) of the envelope.
_Release = tuple[int, str, int, int, int, int]
#: What a replay returns (``_SkuEvents._replay``): exceptions, on hand, reserved, and
#: how many events and releases it replayed.
_Replayed = tuple[list["OversellException"], int, int, int, int]


class _SkuEvents:
    """Stock events of one SKU above the last checkpoint fold, in (key, origin, seq)
    order, as compact parallel arrays, plus the folded prefix: the totals it left and
    its final exceptions (invariant 9). ``key`` is the event's order key
    (``Replica._key``): 2*HLC, or 2*cut+1 for an envelope late for a checkpoint.

    A million events cost ~35 MB here against ~170 MB as tuples.
    """

    __slots__ = ("_final_fed", "_final_sha", "base_oh", "base_res", "cache", "d_oh", "d_res",
                 "final", "hlc", "key", "kind", "origin", "seq")

    def __init__(self) -> None:
        self.key = array("q")
        self.hlc = array("q")
        self.origin: list[str] = []
        self.seq = array("q")
        self.d_oh = array("q")
        self.d_res = array("q")
        self.kind = array("b")
        self.cache: list[OversellException] | None = None
        self.base_oh = 0  # on hand after the folded prefix
        self.base_res = 0  # reserved (as the replay counts it) after the folded prefix
        self.final: list[OversellException] = []  # the folded prefix's exceptions
        # a running SHA-256 of ``final`` (``final_digest``): fed lazily, so a checkpoint
        # hash costs the exceptions it added, not the store's whole history
        self._final_sha = hashlib.sha256()
        self._final_fed = 0

    def __len__(self) -> int:
        return len(self.key)

    def insert(self, key: int, hlc: int, origin: str, seq: int, d_oh: int, d_res: int,
               kind: int) -> None:
        n = len(self.key)
        if n == 0 or (self.key[-1], self.origin[-1], self.seq[-1]) < (key, origin, seq):
            i = n  # the common case: events mostly arrive in HLC order
        else:
            lo = bisect_left(self.key, key)
            hi = bisect_right(self.key, key, lo)
            i = lo
            while i < hi and (self.origin[i], self.seq[i]) < (origin, seq):
                i += 1
        self.key.insert(i, key)
        self.hlc.insert(i, hlc)
        self.origin.insert(i, origin)
        self.seq.insert(i, seq)
        self.d_oh.insert(i, d_oh)
        self.d_res.insert(i, d_res)
        self.kind.insert(i, kind)
        self.cache = None

    def rekey(self, key_of: Callable[[int, str, int], int]) -> bool:
        """Recompute every key (a checkpoint made some envelopes late); True if any
        changed, and then the arrays are sorted again."""
        keys = [key_of(h, o, q) for h, o, q in zip(self.hlc, self.origin, self.seq,
                                                     strict=True)]
        if keys == list(self.key):
            return False
        order = sorted(range(len(keys)), key=lambda i: (keys[i], self.origin[i], self.seq[i]))
        self.key = array("q", (keys[i] for i in order))
        self.hlc = array("q", (self.hlc[i] for i in order))
        self.origin = [self.origin[i] for i in order]
        self.seq = array("q", (self.seq[i] for i in order))
        self.d_oh = array("q", (self.d_oh[i] for i in order))
        self.d_res = array("q", (self.d_res[i] for i in order))
        self.kind = array("b", (self.kind[i] for i in order))
        self.cache = None
        return True

    def _replay(self, sku: str, releases: list[_Release], upto: int | None) -> _Replayed:
        """Replay from the folded totals the events merged with ``releases`` (sorted),
        in (key, origin, seq) order, as far as key ``upto`` (None: all); flag every
        event that lowers availability below zero (invariant 6). Returns the
        exceptions, the totals and how many events and releases were replayed."""
        out: list[OversellException] = []
        on_hand, reserved = self.base_oh, self.base_res
        i = j = 0
        n, m = len(self.key), len(releases)
        if upto is not None:
            n = bisect_right(self.key, upto)
            m = bisect_right(releases, (upto, "\U0010ffff"))
        if m == 0 and n:
            # No releases: availability after each event is a running sum; if it never
            # goes below zero nothing is flagged, and the loop below is not needed
            # (the same totals, read at C speed).
            whole = n == len(self.key)  # the common case: no slice to copy
            a_oh = self.d_oh if whole else self.d_oh[:n]
            a_res = self.d_res if whole else self.d_res[:n]
            if min(accumulate(map(sub, a_oh, a_res), initial=on_hand - reserved)) >= 0:
                return out, on_hand + sum(a_oh), reserved + sum(a_res), n, 0
        while i < n or j < m:
            key_i = (self.key[i], self.origin[i], self.seq[i]) if i < n else None
            key_j = releases[j][:3] if j < m else None
            d_oh = d_res = 0
            if key_j is None or (key_i is not None and key_i <= key_j):
                assert key_i is not None
                key, kind, hlc = key_i, self.kind[i], self.hlc[i]
                d_oh, d_res = self.d_oh[i], self.d_res[i]
                i += 1
                if key_j == key:  # the same envelope also released reservations
                    d_res -= releases[j][4]
                    j += 1
            else:
                key, kind, hlc = key_j, releases[j][3], releases[j][5]
                d_res = -releases[j][4]
                j += 1
            on_hand += d_oh
            reserved += d_res
            available = on_hand - reserved
            lowered = d_res - d_oh
            if lowered > 0 and available < 0:
                out.append(OversellException(sku, key[1], key[2], hlc, _KINDS[kind],
                                             min(lowered, -available)))
        return out, on_hand, reserved, i, j

    def final_digest(self) -> bytes:
        """SHA-256 over the folded prefix's exceptions, in order (``final`` only grows)."""
        for e in self.final[self._final_fed:]:
            self._final_sha.update(orjson.dumps(e.to_dict(), option=orjson.OPT_SORT_KEYS))
        self._final_fed = len(self.final)
        return self._final_sha.copy().digest()

    def final_digest_with(self, more: list[OversellException]) -> bytes:
        """What ``final_digest`` would be with ``more`` appended to ``final``, without
        changing anything here (``Replica.fold_hash``)."""
        sha = self._final_sha.copy()
        for e in (*self.final[self._final_fed:], *more):
            sha.update(orjson.dumps(e.to_dict(), option=orjson.OPT_SORT_KEYS))
        return sha.digest()

    def exceptions(self, sku: str, releases: list[_Release]) -> list[OversellException]:
        if self.cache is None:
            self.cache = self.final + self._replay(sku, releases, None)[0]
        return self.cache

    def fold(self, sku: str, releases: list[_Release], upto: int,
             replayed: _Replayed | None = None) -> int:
        """Collapse the events (and ``releases``) with key <= ``upto`` into the totals
        and final exceptions; returns how many releases were folded (they lead the
        sorted list). ``replayed``: that replay, done already on this very state
        (``Replica.fold_hash``)."""
        if replayed is None:
            replayed = self._replay(sku, releases, upto)
        out, self.base_oh, self.base_res, i, j = replayed
        self.final.extend(out)
        for a in (self.key, self.hlc, self.seq, self.d_oh, self.d_res, self.kind):
            del a[:i]
        del self.origin[:i]
        self.cache = None
        return j


#: Checkpoint hashes a replica keeps (``Replica.checkpoint_hashes``): for comparing
#: replicas (the simulator's checker), not needed to serve.
_CK_HASHES_KEPT: Final = 16



@dataclass(frozen=True, slots=True)
class Checkpoint:
    """A checkpoint of the store (invariant 9): every envelope within ``frontier`` is
    held by every live enrolled node, and every one of them with an HLC up to ``cut``
    is final. Proposed, in a ``ck`` op, only by the store's checkpointer."""

    cut: int
    frontier: dict[str, int]
    origin: str
    seq: int
    #: per origin of ``frontier``, the hash (hex) of its envelope at the frontier seq:
    #: the chain head the checkpoint covers, so it proves the prefix of every chain
    heads: dict[str, str] = field(default_factory=dict)
    #: the proposer's ``Replica.checkpoint_hash`` of this checkpoint's fold (hex):
    #: every replica compares its own when it folds (``CheckpointMismatch``)
    fold_hash: str = ""
    #: SHA-256 (hex) of the checkpoint state the proposer serves for it (``sh``,
    #: ``mesh.core.catchup``): the snapshot of exactly the envelopes within the
    #: frontier, folded; "" if it serves none
    state_hash: str = ""

    def holds(self, origin: str, seq: int) -> bool:
        return seq <= self.frontier.get(origin, 0)

    def key(self) -> bytes:
        """SHA-256 of what names this checkpoint: its envelope's origin and seq, cut,
        frontier and the chain heads it names (a ``ck`` lost in a crash before it was
        durable and the one proposed at the same seq after the restart are told apart,
        unless they are alike)."""
        doc = [self.origin, self.seq, self.cut, dict(sorted(self.frontier.items())),
               dict(sorted(self.heads.items()))]
        return hashlib.sha256(orjson.dumps(doc)).digest()


@dataclass(frozen=True, slots=True)
class CheckpointMismatch:
    """A fold that does not match what its ``ck`` op names (invariant 9): this replica's
    fold hash differs from the proposer's (``what`` = "fold"), or the hash it holds at
    an origin's frontier seq differs from the head the op names (``what`` = "head").
    A check: the fold is done all the same, from this replica's own envelopes."""

    origin: str  # the checkpoint's envelope
    seq: int
    what: str
    expected: bytes
    found: bytes


def _check_qty(qty: object, field: str = "qty") -> int:
    if type(qty) is not int or not 0 < qty <= config.MAX_QTY:
        raise CommandError(f"{field} must be an integer in 1..{config.MAX_QTY}", field)
    return qty


def _check_id(value: object, field: str) -> str:
    if not isinstance(value, str) or not value or len(value) > config.MAX_ID_LEN:
        raise CommandError(
            f"{field} must be a non-empty string of at most {config.MAX_ID_LEN} characters", field
        )
    return value


class Replica:
    """One node's replica of a store's stock, reservations and catalog."""

    def __init__(
        self, store_id: str, node_id: str, role: str, key: NodeKey | None = None,
        *, checkpointer: str | None = None,
    ) -> None:
        self.store_id = store_id
        self.node_id = node_id
        self.role = role
        self.key = key
        self.stock: dict[str, PNCounter] = {}
        self.reservations = ORSet()
        self.records: dict[str, Reservation] = {}
        self.vv = VersionVector()
        self.hlc = HLC()
        #: remote envelopes applied whose HLC was too far ahead to adopt (invariant 8)
        self.hlc_not_adopted = 0
        self.catalog: pycrdt.Doc[Any] = pycrdt.Doc()
        self.evidence: list[Equivocation] = []
        self.last_change: dict[str, int] = {}  # sku -> HLC of the last event touching it
        self._reserved: dict[str, int] = {}
        self._dot_rid: dict[tuple[str, int], str] = {}  # every reservation's dot, forever
        #: Envelopes that removed reservation dots, sorted by (key, origin, seq), with
        #: their kind, dots and HLC: their effect on ``reserved`` is derived from the set
        #: of envelopes, not arrival order.
        self._removals: list[tuple[int, str, int, int, tuple[tuple[str, int], ...], int]] = []
        self._releases: dict[str, list[_Release]] | None = None
        #: origin -> 32-byte hashes of seq base..vv (``_base``; all of them until the
        #: first fold), and the HLC of each: below the base they are on disk
        #: (``archive_hash``), the checkpoint covers them (invariant 9)
        self._hashes: dict[str, bytearray] = {}
        self._hlcs: dict[str, array[int]] = {}
        self._base: dict[str, int] = {}  # origin -> seq of the first hash held (1 if absent)
        #: Reads a hash below the base from the ledger (set by ``DurableReplica``).
        self.archive_hash: Callable[[str, int], bytes | None] | None = None
        #: On the checkpointer: the hash of the checkpoint state it will serve for a
        #: checkpoint it proposes (``sh``; set by ``DurableReplica``), or None
        self.state_hash: Callable[[Checkpoint], bytes | None] | None = None
        #: The node whose ``ck`` ops are the store's checkpoints (invariant 9): one per
        #: store, the same at every node (store config); None: no checkpoints.
        self.checkpointer = checkpointer
        #: checkpoints from the last folded one on, oldest first; ``_folded`` of them
        #: (0 or 1) are folded
        self._cks: list[Checkpoint] = []
        self._folded = 0
        #: ``Checkpoint.key`` -> hash of what folding it left
        #: (``checkpoint_hash``), for the newest ``_CK_HASHES_KEPT`` folds here, oldest
        #: first: every replica must find the same
        self.checkpoint_hashes: dict[bytes, bytes] = {}
        #: folds that did not match their ``ck`` op, oldest first, at most
        #: ``config.MAX_EVIDENCE`` (the sync core takes them as alerts,
        #: ``take_checkpoint_mismatches``); all of them counted in ``ck_mismatches``
        self.checkpoint_mismatches: list[CheckpointMismatch] = []
        self.ck_mismatches = 0
        #: False keeps every event (a reference for tests: folding must not change
        #: any answer, invariant 9)
        self.fold_enabled = True
        #: what every node is known to hold, fed from peers' summaries (mesh.core.sync);
        #: only the checkpointer uses it (``propose_checkpoint``)
        self.frontier = Frontier()
        self.folds = 0
        #: (checkpoint key, fold hash, per-SKU replays) of the checkpoint
        #: ``propose_checkpoint`` is applying, for its fold to reuse; None otherwise
        self._ready: tuple[bytes, bytes, dict[str, _Replayed]] | None = None
        #: rid -> (hlc, origin, seq) of the envelope that added the reservation
        self._adds: dict[str, tuple[int, str, int]] = {}
        #: dot -> (hlc, origin, seq) of the first removal of a dot whose add is not held:
        #: an add that arrives after a removal ordered before it is cancelled
        self._orphans: dict[tuple[str, int], tuple[int, str, int]] = {}
        #: origin -> seq -> raw: envelopes ahead of a gap, as wire bytes only (a decoded
        #: envelope costs several times its size in Python objects), bounded in bytes
        #: per origin (``_pending_bytes``) and in total (``_pending_total``)
        self._pending: dict[str, dict[int, bytes]] = {}
        self._pending_bytes: dict[str, int] = {}
        self._pending_total = 0
        self._events: dict[str, _SkuEvents] = {}
        self._txns: dict[str, tuple[int, str]] = {}  # local txn -> (seq, fingerprint)
        #: (ms, txn) of ``_txns`` in seq order: keys retire from the left once older
        #: than ``config.IDEMPOTENCY_WINDOW_MS`` (invariant 7)
        self._txn_age: deque[tuple[int, str]] = deque()
        self.txns_retired = 0
        self.reviews = ReviewSet()  # review items (``rv`` ops): mesh.core.reviews

    # --- queries ------------------------------------------------------------------

    def on_hand(self, sku: str) -> int:
        counter = self.stock.get(sku)
        return counter.value if counter is not None else 0

    def reserved(self, sku: str) -> int:
        return self._reserved.get(sku, 0)

    def available(self, sku: str) -> int:
        return self.on_hand(sku) - self.reserved(sku)

    def skus(self) -> list[str]:
        return sorted(set(self.stock) | set(self._reserved))

    def knows_sku(self, sku: str) -> bool:
        return sku in self.stock or sku in self._events

    def exceptions(self, sku: str | None = None) -> list[OversellException]:
        releases = self._release_effects()
        if sku is not None:
            events = self._events.get(sku)
            return list(events.exceptions(sku, releases.get(sku, []))) if events else []
        out: list[OversellException] = []
        for s in sorted(self._events):
            out.extend(self._events[s].exceptions(s, releases.get(s, [])))
        return out

    def _release_effects(self) -> dict[str, list[_Release]]:
        """Per SKU, the releases of reservations, sorted: the first removal of a
        reservation in (key, origin, seq) order releases its units; later (concurrent)
        removals of it release nothing. A removal ordered before the add it removes
        (only a late add can be) releases at the add (the two cancel out)."""
        if self._releases is None:
            released: set[str] = set()
            units: dict[tuple[int, str, int, str], list[int]] = {}
            for key, origin, seq, kind, dots, hlc in self._removals:
                for dot in dots:
                    rid = self._dot_rid.get(dot)
                    if rid is None or rid in released:
                        continue
                    released.add(rid)
                    rec = self.records[rid]
                    at = (key, origin, seq)
                    add = self._adds.get(rid)
                    if add is not None:
                        ah, ao, aq = add
                        at = max(at, (self._key(ah, ao, aq), ao, aq))
                    slot = units.setdefault((*at, rec.sku), [kind, 0, hlc])
                    slot[1] += rec.qty
            by_sku: dict[str, list[_Release]] = {}
            for (key, origin, seq, sku), (kind, qty, hlc) in sorted(units.items()):
                by_sku.setdefault(sku, []).append((key, origin, seq, kind, qty, hlc))
            self._releases = by_sku
        return self._releases

    def oversold_units(self) -> int:
        return sum(e.short for e in self.exceptions())

    def active_reservations(self, sku: str | None = None) -> list[Reservation]:
        recs = (self.records[r] for r in sorted(self.reservations.elements()))
        return [r for r in recs if sku is None or r.sku == sku]

    def head(self, origin: str) -> bytes | None:
        """Hash of the newest applied envelope of ``origin``."""
        return self.hash_at(origin, self.vv.get(origin))

    def hash_at(self, origin: str, seq: int) -> bytes | None:
        """The hash of an applied envelope: from memory at or above the origin's base
        (the last checkpoint fold), else from the archive (``archive_hash``) if any."""
        if not 0 < seq <= self.vv.get(origin):
            return None
        i = seq - self._base.get(origin, 1)
        if i < 0:
            return self.archive_hash(origin, seq) if self.archive_hash is not None else None
        hashes = self._hashes[origin]
        return bytes(hashes[i * 32 : (i + 1) * 32])

    def hlc_at(self, origin: str, seq: int) -> int | None:
        """The HLC of an applied envelope at or above the origin's base."""
        i = seq - self._base.get(origin, 1)
        hlcs = self._hlcs.get(origin)
        if hlcs is None or not 0 <= i < len(hlcs):
            return None
        return hlcs[i]

    @property
    def last_folded(self) -> Checkpoint | None:
        """The newest checkpoint folded here, if any."""
        return self._cks[0] if self._folded else None

    def checkpoints(self) -> list[Checkpoint]:
        """The checkpoints held from the last folded one on (oldest first)."""
        return list(self._cks)

    def held_history(self) -> int:
        """Per-envelope entries held in memory (hashes, stock events, removals): what
        checkpoints bound (invariant 9)."""
        return (sum(len(h) for h in self._hlcs.values())
                + sum(len(e) for e in self._events.values()) + len(self._removals))

    def pending_count(self) -> int:
        return sum(len(p) for p in self._pending.values())

    def pending_bytes(self) -> int:
        """Bytes of envelopes buffered ahead of gaps (all origins)."""
        return self._pending_total

    def state_digest(self) -> bytes:
        """Canonical bytes of the converging state, for comparing replicas."""
        return orjson.dumps(
            {
                "stock": {s: c.to_dict() for s, c in self.stock.items()},
                "reservations": sorted(self.reservations.elements()),
                "vv": self.vv.to_dict(),
                "exceptions": [e.to_dict() for e in self.exceptions()],
            },
            option=orjson.OPT_SORT_KEYS,
        )

    # --- applying envelopes -----------------------------------------------------------

    def apply(
        self, env: Envelope, now_ms: int | None = None, *, check_skew: bool = True
    ) -> list[Envelope]:
        """Apply a verified envelope; returns the envelopes applied (in order).

        ``check_skew`` is kept for callers and has no effect: acceptance does not depend
        on the wall clock (invariant 8).

        That is ``[env]`` plus any buffered successors it unblocked; ``[]`` for a
        duplicate or a buffered envelope (see ``classify``). Raises ``EnvelopeError``
        subclasses for anything that must be refused; then nothing changed.
        """
        if env.store != self.store_id:
            raise WrongStore(f"envelope for store {env.store!r}, this is {self.store_id!r}")
        status = self.classify(env)
        if status is not None:
            if status is ApplyResult.PENDING:
                self._buffer(env)
            return []
        applied = [self._apply_next(env, now_ms)]
        origin = env.origin
        pending = self._pending.get(origin)
        while pending:
            raw = pending.pop(self.vv.get(origin) + 1, None)
            if raw is None:
                break
            self._unbuffered(origin, len(raw))
            try:
                applied.append(self._apply_next(decode(raw), now_ms))
            except EnvelopeError:
                # A fork from a faulty origin (or an envelope whose ops no longer apply):
                # drop the rest of its buffer; anti-entropy re-fetches what is genuine.
                self._unbuffered(origin, sum(map(len, pending.values())))
                pending.clear()
                break
        if pending is not None and not pending:
            del self._pending[origin]
            self._pending_bytes.pop(origin, None)
        return applied

    def _buffer(self, env: Envelope) -> None:
        origin, size = env.origin, len(env.raw)
        self._pending.setdefault(origin, {})[env.seq] = env.raw
        self._pending_bytes[origin] = self._pending_bytes.get(origin, 0) + size
        self._pending_total += size

    def _unbuffered(self, origin: str, size: int) -> None:
        self._pending_bytes[origin] = self._pending_bytes.get(origin, 0) - size
        self._pending_total -= size

    def drop_pending(self, origin: str, above: int) -> int:
        """Forget ``origin``'s buffered envelopes with a seq above ``above`` (its
        revocation's bound: they would be applied, unverified again, once the gap
        fills). Returns how many were dropped."""
        pending = self._pending.get(origin)
        if not pending:
            return 0
        gone = [s for s in pending if s > above]
        for s in gone:
            self._unbuffered(origin, len(pending.pop(s)))
        if not pending:
            del self._pending[origin]
            self._pending_bytes.pop(origin, None)
        return len(gone)

    def classify(self, env: Envelope) -> ApplyResult | None:
        """Duplicate / pending / None (= applicable now). Raises on equivocation or gaps."""
        head = self.vv.get(env.origin)
        if env.seq <= head:
            known = self.hash_at(env.origin, env.seq)
            # Below the fold with no archive, the hash is gone: a copy is a duplicate
            # (equivocation about a checkpointed envelope shows in the archive).
            if known != env.hash and known is not None:
                self._equivocation(env, known)
            return ApplyResult.DUPLICATE
        if env.seq == head + 1:
            return None
        pending = self._pending.get(env.origin, {})
        other = pending.get(env.seq)
        if other is not None:
            if other != env.raw:
                self._equivocation(env, None, other)
            return ApplyResult.DUPLICATE
        if env.seq - head > config.MAX_PENDING_PER_ORIGIN or (
            len(pending) >= config.MAX_PENDING_PER_ORIGIN
        ):
            raise SeqGap(
                f"{env.origin} seq {env.seq} is too far ahead of {head}; fetch the gap first"
            )
        size = len(env.raw)
        if (self._pending_bytes.get(env.origin, 0) + size > config.MAX_PENDING_BYTES_PER_ORIGIN
                or self._pending_total + size > config.MAX_PENDING_BYTES):
            raise PendingFull(
                f"{env.origin} seq {env.seq}: the out-of-order buffer is full "
                f"({self._pending_bytes.get(env.origin, 0)} B of this origin, "
                f"{self._pending_total} B in all); fetch the gap first"
            )
        return ApplyResult.PENDING

    def _equivocation(self, env: Envelope, known: bytes | None, first_raw: bytes = b"") -> None:
        err = Equivocation(
            f"{env.origin} signed two different envelopes for seq {env.seq}",
            env.origin, env.seq, first_raw or (known or b""), env.raw,
        )
        if len(self.evidence) < config.MAX_EVIDENCE:
            self.evidence.append(err)
        raise err

    def _apply_next(self, env: Envelope, now_ms: int | None) -> Envelope:
        """Apply the envelope that directly follows the origin's head (invariant 4)."""
        expected = self.head(env.origin)
        if env.prev != expected:
            raise BrokenChain(
                f"{env.origin} seq {env.seq}: prev does not match the hash of seq {env.seq - 1}"
            )
        plan = self._plan(env)  # all checks; raises before any mutation
        clock = HLC(self.hlc.last)
        if now_ms is None:
            # Rebuilding from our own ledger: our own stamps must never go back; a
            # remote one is taken only within the adoption bound of the clock rebuilt
            # so far, so a restart does not adopt a skewed node's far-future stamp that
            # the live path refused to follow (invariant 8).
            if env.hlc > clock.last and (
                    env.origin == self.node_id
                    or (env.hlc >> 16) - (clock.last >> 16) <= config.MAX_HLC_ADOPT_AHEAD_MS):
                clock = HLC(env.hlc)
        elif (env.hlc >> 16) - now_ms <= config.MAX_HLC_ADOPT_AHEAD_MS:
            try:
                clock.update(env.hlc, now_ms)
            except ValueError as exc:  # an HLC at the very end of the range
                raise ClockSkew(f"{env.origin} seq {env.seq}: {exc}") from None
        else:
            # Applied, but its clock is not adopted (docs/protocol.md, "Clocks"): one
            # far-future stamp must not drag our HLC, and through us every HLC in the
            # store, forward.
            self.hlc_not_adopted += 1
        self._mutate(env, plan)
        self.hlc = clock
        self.vv.advance(env.origin, env.seq)
        self._hashes.setdefault(env.origin, bytearray()).extend(env.hash)
        hlcs = self._hlcs.get(env.origin)
        if hlcs is None:
            hlcs = self._hlcs[env.origin] = array("q")
        hlcs.append(env.hlc)
        if self._folded < len(self._cks):  # after the hash: a fold checks the heads
            self._maybe_fold()
        if env.origin == self.node_id:
            txn = env.meta["txn"]
            self._txns[txn] = (env.seq, _fingerprint(env.meta))
            self._txn_age.append((env.hlc >> 16, txn))
            self.retire_txns(env.hlc >> 16)
        return env

    def retire_txns(self, now_ms: int) -> int:
        """Forget the txn ids of own commands older than the idempotency window
        (invariant 7); returns how many were retired."""
        horizon = now_ms - config.IDEMPOTENCY_WINDOW_MS
        age, n = self._txn_age, 0
        while age and age[0][0] < horizon:
            _, txn = age.popleft()
            self._txns.pop(txn, None)
            n += 1
        self.txns_retired += n
        return n

    def take_txns(self, other: Replica) -> None:
        """Take the idempotency window of ``other``, an older replica of this same node
        (invariant 7): a checkpoint state it replaces (``mesh.core.catchup``) holds
        nobody's txn ids, while this node's own envelopes within its frontier had them."""
        self._txns = dict(other._txns)
        self._txn_age = deque(other._txn_age)
        self.txns_retired = other.txns_retired

    def _plan(self, env: Envelope) -> list[tuple[str, Any]]:
        plan: list[tuple[str, Any]] = []
        for op in env.ops:
            t = op["t"]
            if t == "pn":
                old_p, old_n = self.stock[op["sku"]].entry(op["r"]) if op["sku"] in self.stock \
                    else (0, 0)
                if op["p"] < old_p or op["n"] < old_n:
                    raise Malformed(f"{env.origin} seq {env.seq}: counter entry went backwards")
                plan.append(("pn", (op, op["p"] - old_p - (op["n"] - old_n))))
            elif t == "rs":
                try:
                    delta = ORSet.from_dict({"e": op["e"], "c": {"vv": {}, "cloud": op["c"]}})
                except ValueError as exc:
                    raise Malformed(f"reservation delta: {exc}") from None
                plan.append(("rs", (op, delta)))
            elif t == "cat":
                plan.append(("cat", base64.b64decode(op["u"])))
            elif t == "rv":
                plan.append(("rv", (op, self.reviews.plan(op))))
            elif t == "ck" and env.origin == self.checkpointer:
                ck = self._plan_checkpoint(env, op)
                if ck is not None:
                    plan.append(("ck", ck))
        return plan

    def _plan_checkpoint(self, env: Envelope, op: dict[str, Any]) -> Checkpoint | None:
        ck = Checkpoint(op["cut"], dict(op["f"]), env.origin, env.seq, dict(op["h"]), op["fh"],
                        op.get("sh", ""))
        last = self._cks[-1] if self._cks else None
        if last is not None and last.origin == env.origin and env.seq <= last.seq:
            # A replica installed from a checkpoint state (``mesh.core.catchup``) holds
            # the checkpoint already, and the ones before it: the ck envelopes of the
            # tail up to it change nothing (in a chain applied from seq 1 the
            # checkpointer's cks come in seq order: never here).
            return None
        if last is not None and (ck.cut <= last.cut or any(
                ck.frontier.get(o, 0) < q for o, q in last.frontier.items())):
            raise Malformed(f"{env.origin} seq {env.seq}: checkpoint does not follow "
                            "the previous one (cut and frontier must grow)")
        return ck

    def _mutate(self, env: Envelope, plan: list[tuple[str, Any]]) -> None:
        d_oh: dict[str, int] = {}
        d_res: dict[str, int] = {}
        for t, item in plan:
            if t == "cat":
                # First, so a bad update is refused before anything else changed; a Yjs
                # update applies in one transaction.
                try:
                    self.catalog.apply_update(item)
                except Exception as exc:
                    raise Malformed(f"catalog update does not apply: {exc}") from None
        for t, item in plan:
            if t == "pn":
                op, diff = item
                counter = self.stock.get(op["sku"])
                if counter is None:
                    counter = self.stock[op["sku"]] = PNCounter()
                counter.join_entry(op["r"], op["p"], op["n"])
                d_oh[op["sku"]] = d_oh.get(op["sku"], 0) + diff
            elif t == "rs":
                op, delta = item
                for rid, rec in op.get("rec", {}).items():
                    if rid not in self.records:
                        self.records[rid] = Reservation(
                            rid, rec["sku"], rec["qty"], rec["channel"], rec["order"],
                            rec["expires"],
                        )
                added: set[tuple[str, int]] = set()
                if op["e"]:
                    self._releases = None  # a late add can complete an earlier removal
                for rid, dots in op["e"].items():
                    dot = (dots[0][0], dots[0][1])
                    added.add(dot)
                    rec = self.records[rid]  # an add holds its units from this event on
                    rm = self._orphans.pop(dot, None)
                    if rm is not None and (self._key(*rm), rm[1], rm[2]) < (
                            self._key(env.hlc, env.origin, env.seq), env.origin, env.seq):
                        # removed by an envelope ordered before it (a late add): the
                        # two cancel out here, as a release at the add would
                        d_res[rec.sku] = d_res.get(rec.sku, 0)
                        continue
                    self._dot_rid[dot] = rid
                    self._adds[rid] = (env.hlc, env.origin, env.seq)
                    d_res[rec.sku] = d_res.get(rec.sku, 0) + rec.qty
                removed = tuple(sorted((r, c) for r, c in op["c"] if (r, c) not in added))
                if removed:
                    self._add_removal(env, removed)
                affected = set(op["e"]) | {self._dot_rid[(r, c)] for r, c in op["c"]
                                           if (r, c) in self._dot_rid}
                before = {rid: rid in self.reservations for rid in affected}
                self.reservations.merge(delta)  # the live state: a CRDT, order-free
                for rid, was in before.items():
                    if was != (rid in self.reservations):
                        rec = self.records[rid]
                        change = -rec.qty if was else rec.qty
                        self._reserved[rec.sku] = self._reserved.get(rec.sku, 0) + change
                        self.last_change[rec.sku] = max(self.last_change.get(rec.sku, 0),
                                                        env.hlc)
            elif t == "rv":
                self.reviews.mutate(env, *item)
            elif t == "ck":
                self._add_checkpoint(item)
        kind = _KIND_CODE[env.meta["kind"]]
        key = self._key(env.hlc, env.origin, env.seq)
        for sku in sorted(set(d_oh) | set(d_res)):
            events = self._events.get(sku)
            if events is None:
                events = self._events[sku] = _SkuEvents()
            events.insert(key, env.hlc, env.origin, env.seq, d_oh.get(sku, 0),
                          d_res.get(sku, 0), kind)
            self.last_change[sku] = env.hlc

    def _add_removal(self, env: Envelope, dots: tuple[tuple[str, int], ...]) -> None:
        entry = (self._key(env.hlc, env.origin, env.seq), env.origin, env.seq,
                 _KIND_CODE[env.meta["kind"]], dots, env.hlc)
        if self._removals and self._removals[-1][:3] > entry[:3]:
            insort(self._removals, entry)
        else:
            self._removals.append(entry)
        self._releases = None
        for dot in dots:  # a removal can move the exceptions of the SKUs it touches
            rid = self._dot_rid.get(dot)
            if rid is None:
                first = self._orphans.get(dot)
                here = (env.hlc, env.origin, env.seq)
                if first is None or (self._key(*here), *here[1:]) < (self._key(*first),
                                                                      *first[1:]):
                    self._orphans[dot] = here
            elif ev := self._events.get(self.records[rid].sku):
                ev.cache = None

    # --- checkpoints (invariant 9) -------------------------------------------------

    def _key(self, hlc: int, origin: str, seq: int) -> int:
        """The order key of an envelope: 2*HLC, or 2*cut+1 if it is late for the newest
        checkpoint that does not hold it (its HLC is within that cut): judged after
        everything that checkpoint made final, the same at every replica."""
        for ck in reversed(self._cks):
            if not ck.holds(origin, seq):
                return 2 * ck.cut + 1 if hlc <= ck.cut else 2 * hlc
        return 2 * hlc

    def _makes_late(self, ck: Checkpoint) -> bool:
        """Whether adding ``ck`` changes any order key here: only an envelope held here
        outside its frontier with an HLC within its cut becomes late (every other key
        stays: frontiers and cuts grow). Scans the HLCs above the frontier only."""
        for origin, hlcs in self._hlcs.items():
            i = max(0, ck.frontier.get(origin, 0) + 1 - self._base.get(origin, 1))
            if i < len(hlcs) and min(hlcs[i:]) <= ck.cut:
                return True
        return False

    def _add_checkpoint(self, ck: Checkpoint) -> None:
        rekey = self._makes_late(ck)
        self._cks.append(ck)
        for ev in self._events.values():  # envelopes it does not hold may be late now
            if rekey:
                ev.rekey(self._key)
            ev.cache = None
        if rekey:
            self._removals = sorted((self._key(h, o, q), o, q, k, d, h)
                                    for _, o, q, k, d, h in self._removals)
        self._releases = None

    def add_checkpoint(self, ck: Checkpoint) -> None:
        """Take ``ck`` without its envelope and fold it if its frontier is held: how
        the checkpoint state is built, of exactly the envelopes within the frontier
        (``mesh.core.catchup``; its ck envelope lies outside that frontier)."""
        self._add_checkpoint(ck)
        self._maybe_fold()

    def _maybe_fold(self) -> None:
        while self.fold_enabled and self._folded < len(self._cks):
            ck = self._cks[self._folded]
            if any(self.vv.get(o) < q for o, q in ck.frontier.items()):
                return
            self._fold(ck)
            del self._cks[: self._folded]
            self._folded = 1

    def _fold(self, ck: Checkpoint) -> None:
        """Collapse everything with a key up to 2*cut (all of it within the frontier,
        held here): per-SKU totals and final exceptions; the reservations released
        in it are forgotten, and the hashes below the frontier (the ledger keeps them)."""
        cut = 2 * ck.cut
        for origin, seq in sorted(ck.frontier.items()):  # before the hashes leave memory
            held = self.hash_at(origin, seq)
            named = ck.heads.get(origin, "")
            if held is not None and held.hex() != named:
                self._ck_mismatch(CheckpointMismatch(ck.origin, ck.seq, "head:" + origin,
                                                     bytes.fromhex(named), held))
        releases = self._release_effects()
        ready = self._ready[2] if self._ready and self._ready[0] == ck.key() else None
        for sku, ev in self._events.items():
            ev.fold(sku, releases.get(sku, []), cut, ready.get(sku) if ready else None)
        # Which reservations the folded prefix released, as _release_effects decides.
        released: set[str] = set()
        keep: list[tuple[int, str, int, int, tuple[tuple[str, int], ...], int]] = []
        for entry in self._removals:
            key, origin, seq, _, dots, _ = entry
            pending = False
            for dot in dots:
                rid = self._dot_rid.get(dot)
                if rid is None or rid in released:
                    continue
                add = self._adds.get(rid)
                at = (key, origin, seq)
                if add is not None:
                    at = max(at, (self._key(*add), add[1], add[2]))
                if at[0] <= cut:
                    released.add(rid)
                else:
                    pending = True
            if key > cut or pending:
                keep.append(entry)
        self._removals = keep
        for dot, rid in list(self._dot_rid.items()):
            if rid in released:
                del self._dot_rid[dot]
        for rid in released:
            self._adds.pop(rid, None)
            if rid not in self.reservations:
                self.records.pop(rid, None)
        self._releases = None
        for origin, seq in ck.frontier.items():
            base = self._base.get(origin, 1)
            drop = min(seq, self.vv.get(origin)) - base  # keep the hash at the frontier
            if drop > 0:
                del self._hashes[origin][: drop * 32]
                del self._hlcs[origin][:drop]
                self._base[origin] = base + drop
        self.folds += 1
        own = self._ready[1] if ready is not None and self._ready else self.checkpoint_hash(ck)
        self.checkpoint_hashes[ck.key()] = own
        if ck.fold_hash and own.hex() != ck.fold_hash:
            self._ck_mismatch(CheckpointMismatch(ck.origin, ck.seq, "fold",
                                                 bytes.fromhex(ck.fold_hash), own))
        while len(self.checkpoint_hashes) > _CK_HASHES_KEPT:
            del self.checkpoint_hashes[next(iter(self.checkpoint_hashes))]

    def _ck_mismatch(self, m: CheckpointMismatch) -> None:
        self.ck_mismatches += 1
        if len(self.checkpoint_mismatches) < config.MAX_EVIDENCE:
            self.checkpoint_mismatches.append(m)

    def take_checkpoint_mismatches(self) -> list[CheckpointMismatch]:
        """The mismatches found since the last call (for alerts), oldest first."""
        out, self.checkpoint_mismatches = self.checkpoint_mismatches, []
        return out

    def checkpoint_hash(self, ck: Checkpoint) -> bytes:
        """SHA-256 of the checkpoint and of the folded state it leaves: per SKU, on hand
        and reserved at the cut and the final exceptions (SKUs with none of these left
        out). A function of the envelopes within the frontier only (invariant 9), so
        every replica that folds ``ck`` computes the same hash, whenever it folds."""
        skus = {sku: [ev.base_oh, ev.base_res, len(ev.final), ev.final_digest().hex()]
                for sku, ev in self._events.items() if ev.base_oh or ev.base_res or ev.final}
        doc = {"ck": ck.key().hex(), "skus": skus}
        return hashlib.sha256(orjson.dumps(doc, option=orjson.OPT_SORT_KEYS)).digest()

    def clock_floor(self, now_ms: int) -> int:
        """The clock floor our summaries carry (``mesh.core.checkpoint`` invariant 5): a
        promise that every envelope we sign from now on has an HLC above it. The HLC is
        first raised to the wall clock (it never decreases, so without a restart every
        later stamp is above it whatever the wall clock does); the floor is
        ``config.CLOCK_FLOOR_MARGIN_MS`` behind, so a restart, whose HLC is rebuilt
        from the ledger, keeps the promise unless the wall clock was set back by more.
        A broken promise only makes our next envelopes late: judged the same at every
        replica (docs/architecture.md, "Bounded history")."""
        wall = min(max(now_ms, 0), MAX_TS >> COUNTER_BITS)
        if wall << COUNTER_BITS > self.hlc.last:
            self.hlc = HLC(wall << COUNTER_BITS)
        return min(self.hlc.last, max(wall - config.CLOCK_FLOOR_MARGIN_MS, 0) << COUNTER_BITS)

    def propose_checkpoint(self, frontier: VersionVector, members: Iterable[str], *,
                           txn: str, now_ms: int,
                           floors: Mapping[str, Sequence[tuple[int, int]]] | None = None,
                           ) -> CommandResult | None:
        """As the store's checkpointer: a ``ck`` envelope for ``frontier`` (what every
        live enrolled node in ``members`` is known to hold, ``mesh.core.checkpoint``), or
        None when it would not move past the last checkpoint. The cut is the oldest of
        the members' bounds, where a member's bound is an HLC that every envelope of it
        outside the frontier is above: the HLC of its newest envelope within the
        frontier (its HLC grows along its chain), or, if ``floors`` (``Frontier.floors``)
        holds a promise (own seq s, clock floor c) of it with s within the frontier, the
        greater of that and c for the newest such promise (everything it signs after s
        is above c). So nothing from a member is judged late, except from a member that
        broke its own promise, and an idle member's cut follows its clock, not its last
        sale. A member that sent promises but has neither an envelope within the
        frontier nor a promise that applies (it wrote before its first summary came)
        blocks the checkpoint until the frontier holds its first envelope; one that sent
        none (a peer from before the floor) and has nothing within the frontier does not
        bound the cut, as before."""
        if self.checkpointer != self.node_id or self.role not in ("edge", "cloud"):
            raise CommandError("only the store's checkpointer proposes checkpoints", "role")
        f = {o: min(q, self.vv.get(o)) for o, q in frontier.items() if q}
        last = self._cks[-1] if self._cks else None
        if last is not None:
            for o, q in last.frontier.items():
                f[o] = max(f.get(o, 0), q)
        cuts: list[int] = []
        for o in members:
            q, promises = f.get(o, 0), (floors or {}).get(o, ())
            floor = max((c for s, c in promises if s <= q), default=None)
            newest = self.hlc_at(o, q) if q >= 1 else None
            if newest is None and floor is None:
                if q >= 1 or promises:  # a stamp not held here, or unknown: no bound
                    return None
                continue  # a peer from before the floor that wrote nothing within f
            cuts.append(max(x for x in (newest, floor) if x is not None))
        if not cuts:
            return None
        cut = min(cuts)
        if last is not None and cut <= last.cut:
            return None
        f = dict(sorted(f.items()))
        heads: dict[str, str] = {}
        for o, q in f.items():
            h = self.hash_at(o, q)
            if h is None:  # below the fold with no archive: cannot name the head
                return None
            heads[o] = h.hex()
        ck = Checkpoint(cut, f, self.node_id, self.vv.get(self.node_id) + 1, heads)
        plan = self._fold_plan(ck)
        if plan is None:
            return None
        fold_hash, replayed = plan
        meta = {"kind": "checkpoint", "txn": txn}
        op = {"t": "ck", "cut": cut, "f": f, "h": heads, "fh": fold_hash.hex()}
        if self.state_hash is not None:  # the checkpoint state it serves (catch-up)
            sh = self.state_hash(replace(ck, fold_hash=fold_hash.hex()))
            if sh is not None:
                op["sh"] = sh.hex()
        # the fold this envelope triggers at once reuses the replays (nothing else can
        # change this replica in between: it is pure and this call is synchronous)
        self._ready = (ck.key(), fold_hash, replayed) if replayed is not None else None
        try:
            env = self._local([op], meta, now_ms)
        finally:
            self._ready = None
        return CommandResult(env, self.node_id, env.seq)

    def fold_hash(self, ck: Checkpoint) -> bytes | None:
        """The hash folding ``ck`` (the next checkpoint) will leave here
        (``checkpoint_hash``), without changing this replica; None if this replica
        would not fold it at once (it does not hold the frontier of every checkpoint
        up to it).

        The common case costs one replay of the events up to the cut, read in place:
        every earlier checkpoint folded and no envelope held here late for ``ck``, so
        adding ``ck`` changes no order key and its fold replays, per SKU, exactly the
        events and releases with a key up to twice the cut, from the folded totals, in
        the order they are held (``_SkuEvents._replay`` is pure). Otherwise (a late
        envelope, an unfolded checkpoint, folding off) it folds a scratch copy
        (``_dry_fold``)."""
        plan = self._fold_plan(ck)
        return plan[0] if plan is not None else None

    def _fold_plan(self, ck: Checkpoint) -> tuple[bytes, dict[str, _Replayed] | None] | None:
        """``fold_hash``, and per SKU the replay it did (None from a scratch copy)."""
        if any(self.vv.get(o) < q for o, q in ck.frontier.items()):
            return None
        if not self.fold_enabled or self._folded < len(self._cks) or self._makes_late(ck):
            h = self._dry_fold(ck)
            return (h, None) if h is not None else None
        cut = 2 * ck.cut
        releases = self._release_effects()
        skus: dict[str, list[Any]] = {}
        replayed: dict[str, _Replayed] = {}
        for sku, ev in self._events.items():
            r = replayed[sku] = ev._replay(sku, releases.get(sku, []), cut)
            out, on_hand, reserved = r[0], r[1], r[2]
            if on_hand or reserved or ev.final or out:
                skus[sku] = [on_hand, reserved, len(ev.final) + len(out),
                             ev.final_digest_with(out).hex()]
        doc = {"ck": ck.key().hex(), "skus": skus}
        return hashlib.sha256(orjson.dumps(doc, option=orjson.OPT_SORT_KEYS)).digest(), replayed

    def _dry_fold(self, ck: Checkpoint) -> bytes | None:
        """The hash folding ``ck`` will leave here, computed on a scratch copy (from a
        snapshot: bounded by the store, invariant 10) so this replica is untouched; None
        if this replica would not fold it at once (it does not hold the frontier of
        every checkpoint up to it)."""
        scratch = Replica(self.store_id, self.node_id, self.role, checkpointer=self.checkpointer)
        scratch.restore(self.snapshot())
        scratch._add_checkpoint(ck)
        scratch._maybe_fold()
        return scratch.checkpoint_hashes.get(ck.key())

    def touched_skus(self, env: Envelope) -> set[str]:
        """The SKUs an applied envelope changed (stock, or reservations it added or
        removed): what a live stream reports for it."""
        out: set[str] = set()
        for op in env.ops:
            if op["t"] == "pn":
                out.add(op["sku"])
            elif op["t"] == "rs":
                out.update(rec["sku"] for rec in op.get("rec", {}).values())
                for r, c in op["c"]:
                    rid = self._dot_rid.get((r, c))
                    if rid is not None:
                        out.add(self.records[rid].sku)
        return out

    # --- local commands -------------------------------------------------------------

    def _local(
        self, ops: list[dict[str, Any]], meta: dict[str, Any], now_ms: int
    ) -> Envelope:
        if self.key is None:
            raise CommandError("this replica has no node key; it cannot originate changes")
        seq = self.vv.get(self.node_id) + 1
        env = seal(
            self.key, store=self.store_id, origin=self.node_id, seq=seq,
            prev=self.head(self.node_id), hlc=self.hlc.now(now_ms), ops=ops,
            meta={k: v for k, v in meta.items() if v is not None},
        )
        self._apply_next(env, None)
        return env

    def _seen_txn(self, meta: dict[str, Any], *, rid: str | None = None,
                  same: bool = True, now_ms: int | None = None) -> CommandResult | None:
        """The original result if ``meta``'s txn id was used before (invariant 7), None
        for a new one. A replay has the same meta fields (``_fingerprint``) and ``same``
        true: the caller's verdict on content outside the meta (a reservation's
        record). Anything else is a reused txn id (``TxnReused``). ``rid`` is the
        reservation the command is about, answered in the replay as in the original."""
        txn = _check_id(meta["txn"], "txn_id")
        if meta.get("staff") is not None:
            _check_id(meta["staff"], "staff_id")
        if meta.get("reason") is not None:
            _check_id(meta["reason"], "reason")
        note = meta.get("note")
        if note is not None and (not isinstance(note, str) or len(note) > config.MAX_TEXT_LEN):
            raise CommandError(f"note must be at most {config.MAX_TEXT_LEN} characters", "note")
        if now_ms is not None:
            self.retire_txns(now_ms)
        seen = self._txns.get(txn)
        if seen is None:
            return None
        seq, fingerprint = seen
        if not same or fingerprint != _fingerprint(
                {k: v for k, v in meta.items() if v is not None}):
            raise TxnReused(
                f"txn_id {txn!r} was already used for a different operation; use a new txn_id",
                "txn_id",
            )
        return CommandResult(None, self.node_id, seq, duplicate=True, reservation_id=rid)

    def _stock_change(
        self, kind: str, sku: str, delta: int, now_ms: int, txn: str,
        staff: str | None, reason: str | None, note: str | None, *, new_sku_ok: bool = False,
    ) -> CommandResult:
        _check_id(sku, "sku")
        meta = {"kind": kind, "txn": txn, "staff": staff, "reason": reason, "note": note,
                "sku": sku, "qty": delta}
        seen = self._seen_txn(meta, now_ms=now_ms)
        if seen is not None:
            return seen
        if not new_sku_ok and not self.knows_sku(sku):
            raise UnknownSku(f"unknown SKU {sku!r}: receive stock for it first", "sku")
        step = (self.stock.get(sku) or PNCounter()).copy()
        if delta > 0:
            step.increment(self.node_id, delta)
        else:
            step.decrement(self.node_id, -delta)
        p, n = step.entry(self.node_id)
        op = {"t": "pn", "sku": sku, "r": self.node_id, "p": p, "n": n}
        env = self._local([op], meta, now_ms)
        return CommandResult(env, self.node_id, env.seq)

    def receive(self, sku: str, qty: int, *, txn: str, now_ms: int, staff: str | None = None,
                reason: str | None = None, note: str | None = None) -> CommandResult:
        """Goods received into the store (delivery, transfer in)."""
        return self._stock_change("receipt", sku, _check_qty(qty), now_ms, txn, staff, reason,
                                  note, new_sku_ok=True)

    def sell(self, sku: str, qty: int, *, txn: str, now_ms: int, staff: str | None = None,
             note: str | None = None, strict: bool = False) -> CommandResult:
        """A sale. Offline-first: a register sells what the customer hands over even when its
        view says none are left (the race is flagged as an exception). ``strict`` refuses
        instead, for channels that cannot see the goods (online orders)."""
        qty = _check_qty(qty)
        if strict and self.available(sku) < qty:
            seen = self._seen_txn({"kind": "sale", "txn": txn, "staff": staff, "note": note,
                                   "sku": sku, "qty": -qty}, now_ms=now_ms)
            if seen is not None:
                return seen
            raise CommandError(f"only {self.available(sku)} of {sku!r} available", "qty")
        return self._stock_change("sale", sku, -qty, now_ms, txn, staff, None, note)

    def return_(self, sku: str, qty: int, *, txn: str, now_ms: int, staff: str | None = None,
                reason: str | None = None, note: str | None = None) -> CommandResult:
        """Goods returned by a customer, back on hand."""
        return self._stock_change("return", sku, _check_qty(qty), now_ms, txn, staff, reason,
                                  note)

    def adjust(self, sku: str, delta: int, *, reason: str, txn: str, now_ms: int,
               staff: str | None = None, note: str | None = None) -> CommandResult:
        """Stock count correction (damage, shrink, recount). ``reason`` is required."""
        if type(delta) is not int or delta == 0 or abs(delta) > config.MAX_QTY:
            raise CommandError(f"delta must be a non-zero integer within ±{config.MAX_QTY}",
                               "delta")
        if not reason:
            raise CommandError("an adjustment needs a reason code", "reason")
        return self._stock_change("adjust", sku, delta, now_ms, txn, staff, reason, note)

    def reserve(self, sku: str, qty: int, *, txn: str, now_ms: int, channel: str,
                order: str | None = None, expires: int | None = None,
                staff: str | None = None) -> CommandResult:
        """Hold ``qty`` units for an order (e.g. buy online, pick up in store).

        Refused when fewer than ``qty`` are available here: a reservation is a promise
        to a customer who is not standing at the till."""
        qty = _check_qty(qty)
        _check_id(sku, "sku")
        _check_id(channel, "channel")
        if order is not None and (not isinstance(order, str) or len(order) > config.MAX_TEXT_LEN):
            raise CommandError("order must be a string", "order")
        if expires is not None and (type(expires) is not int
                                    or not 0 <= expires <= config.MAX_COUNT):
            raise CommandError("expires must be a timestamp in ms", "expires")
        meta = {"kind": "reserve", "txn": txn, "staff": staff, "sku": sku, "qty": qty}
        rid = f"{self.node_id}:{txn}"
        # The channel, order and expiry are in the reservation's record, not the meta:
        # a replay must match them too (a txn id seen as a reserve has its record here).
        rec = self.records.get(rid)
        seen = self._seen_txn(meta, rid=rid, same=rec is None or (
            rec.sku, rec.qty, rec.channel, rec.order, rec.expires) == (
            sku, qty, channel, order, expires), now_ms=now_ms)
        if seen is not None:
            return seen
        if rec is not None:  # its txn id retired, the reservation it names is still held
            raise TxnReused(f"txn_id {txn!r} names reservation {rid!r}; use a new txn_id",
                            "txn_id")
        if len(rid) > config.MAX_ID_LEN:  # envelope validation would refuse it (mesh.core.ops)
            raise CommandError(
                f"txn_id is too long for a reservation: the reservation id "
                f"'<node id>:<txn_id>' has at most {config.MAX_ID_LEN} characters, so a "
                f"txn_id here has at most {config.MAX_ID_LEN - len(self.node_id) - 1}",
                "txn_id")
        if not self.knows_sku(sku):
            raise UnknownSku(f"unknown SKU {sku!r}", "sku")
        if self.available(sku) < qty:
            raise CommandError(f"only {self.available(sku)} of {sku!r} available", "qty")
        delta = self.reservations.copy().add(self.node_id, rid)
        d = delta.to_dict()
        op = {"t": "rs", "e": d["e"], "c": _ctx_dots(d),
              "rec": {rid: {"sku": sku, "qty": qty, "channel": channel, "order": order,
                            "expires": expires}}}
        env = self._local([op], meta, now_ms)
        return CommandResult(env, self.node_id, env.seq, reservation_id=rid)

    def _reservation(self, rid: object) -> Reservation:
        _check_id(rid, "reservation_id")
        assert isinstance(rid, str)
        if rid not in self.reservations:
            raise CommandError(f"no active reservation {rid!r}", "reservation_id")
        return self.records[rid]

    def release(self, reservation_id: str, *, txn: str, now_ms: int, staff: str | None = None,
                reason: str | None = None) -> CommandResult:
        """Cancel a reservation: the units become available again."""
        meta = {"kind": "release", "txn": txn, "staff": staff, "reason": reason,
                "note": reservation_id}
        seen = self._seen_txn(meta, rid=reservation_id, now_ms=now_ms)
        if seen is not None:
            return seen
        self._reservation(reservation_id)
        op = _remove_op(self.reservations, reservation_id)
        env = self._local([op], meta, now_ms)
        return CommandResult(env, self.node_id, env.seq, reservation_id=reservation_id)

    def fulfil(self, reservation_id: str, *, txn: str, now_ms: int,
               staff: str | None = None) -> CommandResult:
        """Hand over a reserved order: remove the reservation and take the units off stock,
        in one envelope so no replica ever sees half of it."""
        meta: dict[str, Any] = {"kind": "fulfil", "txn": txn, "staff": staff,
                                "note": reservation_id}
        known = self.records.get(reservation_id) if isinstance(reservation_id, str) else None
        if known is not None:  # the envelope's meta names what it took off stock
            meta.update(sku=known.sku, qty=-known.qty)
        seen = self._seen_txn(meta, rid=reservation_id, now_ms=now_ms)
        if seen is not None:
            return seen
        rec = self._reservation(reservation_id)
        step = (self.stock.get(rec.sku) or PNCounter()).copy()
        step.decrement(self.node_id, rec.qty)
        p, n = step.entry(self.node_id)
        ops = [_remove_op(self.reservations, reservation_id),
               {"t": "pn", "sku": rec.sku, "r": self.node_id, "p": p, "n": n}]
        env = self._local(ops, meta, now_ms)
        return CommandResult(env, self.node_id, env.seq, reservation_id=reservation_id)

    def expire(self, *, now_ms: int, txn: str,
               others_after_ms: int | None = None) -> CommandResult | None:
        """Release every reservation whose expiry has passed (one envelope), or None.

        With ``others_after_ms``, reservations created by other nodes are released only
        once they are that much overdue: their creator normally expires them, and a
        sweeper elsewhere steps in only when the creator stays silent."""
        mine = self.node_id + ":"
        due = [r.id for r in self.active_reservations()
               if r.expires is not None and r.expires <= now_ms - (
                   0 if others_after_ms is None or r.id.startswith(mine) else others_after_ms)]
        if not due:
            return None
        meta = {"kind": "expire", "txn": txn}
        seen = self._seen_txn(meta, now_ms=now_ms)
        if seen is not None:
            return seen
        ops = [_remove_op(self.reservations, rid) for rid in due[: config.MAX_OPS_PER_ENVELOPE]]
        env = self._local(ops, meta, now_ms)
        return CommandResult(env, self.node_id, env.seq)

    def update_catalog(self, update: bytes, *, txn: str, now_ms: int,
                       staff: str | None = None, sku: str | None = None,
                       note: str | None = None) -> CommandResult:
        """Carry a Yjs update of the catalog document (edge/cloud roles only). ``sku`` and
        ``note`` (the change as the caller asked for it) go into the audit meta and the
        txn fingerprint, so a reused txn id with another change is refused."""
        if self.role not in ("edge", "cloud"):
            raise CommandError(f"a {self.role} node may not write the catalog", "role")
        meta = {"kind": "catalog", "txn": txn, "staff": staff, "sku": sku, "note": note}
        seen = self._seen_txn(meta, now_ms=now_ms)
        if seen is not None:
            return seen
        op = {"t": "cat", "u": base64.b64encode(update).decode()}
        env = self._local([op], meta, now_ms)
        return CommandResult(env, self.node_id, env.seq)

    # --- snapshots --------------------------------------------------------------------

    def snapshot(self) -> bytes:
        """Everything needed to resume without replaying the ledger (not pending/evidence),
        in a compact binary form (invariant 10): a small JSON header of what the store
        bounds (stock, open reservations, vv, idempotency window, checkpoints, the
        tail's removals), origins as small integers, and raw arrays for what grows
        with the tail (hashes, HLCs, stock events). No base64 anywhere."""
        origins: dict[str, int] = {}

        def oi(o: str) -> int:
            i = origins.get(o)
            if i is None:
                i = origins[o] = len(origins)
            return i

        sections: list[bytes] = []

        def sec(data: bytes) -> int:
            sections.append(data)
            return len(sections) - 1

        hashes = {str(oi(o)): [self._base.get(o, 1), sec(bytes(h)), sec(self._hlcs[o].tobytes())]
                  for o, h in self._hashes.items()}
        skus = []
        for sku, ev in self._events.items():
            skus.append([
                sku, ev.base_oh, ev.base_res,
                [[oi(e.origin), e.seq, e.hlc, _KIND_CODE[e.kind], e.short] for e in ev.final],
                [sec(ev.key.tobytes()), sec(ev.hlc.tobytes()), sec(ev.seq.tobytes()),
                 sec(ev.d_oh.tobytes()), sec(ev.d_res.tobytes()), sec(ev.kind.tobytes()),
                 sec(array("I", map(oi, ev.origin)).tobytes())],
            ])
        state = {
            "v": 2,
            "store": self.store_id,
            "node": self.node_id,
            "stock": {s: c.to_dict() for s, c in self.stock.items()},
            "reservations": self.reservations.to_dict(),
            "records": {rid: [r.sku, r.qty, r.channel, r.order, r.expires]
                        for rid, r in self.records.items()},
            "vv": self.vv.to_dict(),
            "hlc": self.hlc.last,
            "hashes": hashes,
            "skus": skus,
            "last_change": self.last_change,
            "txns": self._txns,
            "txn_age": list(self._txn_age),
            "dot_rid": [[oi(d[0]), d[1], rid] for d, rid in self._dot_rid.items()],
            "adds": {rid: [h, oi(o), q] for rid, (h, o, q) in self._adds.items()},
            "orphans": [[oi(d[0]), d[1], h, oi(o), q] for d, (h, o, q) in self._orphans.items()],
            "removals": [[k, oi(o), q, kind, [[oi(r), c] for r, c in dots], h]
                         for k, o, q, kind, dots, h in self._removals],
            "cks": [[c.cut, c.frontier, c.origin, c.seq, c.heads, c.fold_hash, c.state_hash]
                    for c in self._cks],
            "folded": self._folded,
            "catalog": sec(self.catalog.get_update()),
            "reviews": self.reviews.to_dict(),
            "frontier": self.frontier.state(oi),  # the checkpointer's (mesh.core.checkpoint)
            "origins": list(origins),
        }
        state["sections"] = [len(x) for x in sections]
        head = orjson.dumps(state)
        return b"".join([SNAPSHOT_MAGIC, len(head).to_bytes(4, "little"), head, *sections])

    def restore(self, blob: bytes) -> None:
        """Load a snapshot into this (fresh) replica."""
        if self.vv.total():
            raise RuntimeError("restore() needs a fresh replica")
        if not blob.startswith(SNAPSHOT_MAGIC):
            raise ValueError("not a snapshot of this version (rebuild from the ledger)")
        view = memoryview(blob)
        at = len(SNAPSHOT_MAGIC)
        n = int.from_bytes(view[at : at + 4], "little")
        s = orjson.loads(view[at + 4 : at + 4 + n])
        if s.get("v") != 2 or s["store"] != self.store_id or s["node"] != self.node_id:
            raise ValueError("snapshot belongs to another store/node or version")
        at += 4 + n
        sections: list[memoryview] = []
        for length in s["sections"]:
            sections.append(view[at : at + length])
            at += length
        names = [sys.intern(o) for o in s["origins"]]

        def arr(code: str, i: int) -> array[int]:
            a = array(code)
            a.frombytes(sections[i])
            return a

        self.stock = {sku: PNCounter.from_dict(c) for sku, c in s["stock"].items()}
        self.reservations = ORSet.from_dict(s["reservations"])
        self.records = {rid: Reservation(rid, *rec) for rid, rec in s["records"].items()}
        self.vv = VersionVector.from_dict(s["vv"])
        self.hlc = HLC(s["hlc"])
        for i, (base, h, hl) in s["hashes"].items():
            o = names[int(i)]
            self._base[o] = base
            self._hashes[o] = bytearray(sections[h])
            self._hlcs[o] = arr("q", hl)
        self._events = {}
        for sku, base_oh, base_res, final, secs in s["skus"]:
            ev = self._events[sku] = _SkuEvents()
            ev.base_oh, ev.base_res = base_oh, base_res
            ev.final = [OversellException(sku, names[o], q, h, _KINDS[k], short)
                        for o, q, h, k, short in final]
            ev.key, ev.hlc, ev.seq, ev.d_oh, ev.d_res = (arr("q", i) for i in secs[:5])
            ev.kind = arr("b", secs[5])
            ev.origin = [names[i] for i in arr("I", secs[6])]
        self.last_change = dict(s["last_change"])
        self._txns = {t: (v[0], v[1]) for t, v in s["txns"].items()}
        self._txn_age = deque((a[0], a[1]) for a in s["txn_age"])
        self.catalog.apply_update(bytes(sections[s["catalog"]]))
        self._dot_rid = {(names[o], c): rid for o, c, rid in s["dot_rid"]}
        self._adds = {rid: (h, names[o], q) for rid, (h, o, q) in s["adds"].items()}
        self._orphans = {(names[d], c): (h, names[o], q) for d, c, h, o, q in s["orphans"]}
        self._removals = [(k, names[o], q, kind, tuple((names[r], c) for r, c in dots), h)
                          for k, o, q, kind, dots, h in s["removals"]]
        self._cks = [Checkpoint(c[0], dict(c[1]), c[2], c[3], *c[4:]) for c in s["cks"]]
        self._folded = s["folded"]
        self._releases = None
        self.reviews = ReviewSet.from_dict(s.get("reviews"))
        if s.get("frontier") is not None:  # absent from snapshots before: afresh
            self.frontier.restore(s["frontier"], names)
        self._reserved = {}
        for rid in self.reservations.elements():
            rec = self.records[rid]
            self._reserved[rec.sku] = self._reserved.get(rec.sku, 0) + rec.qty


SNAPSHOT_MAGIC: Final = b"SMSNAP2\n"


def _fingerprint(meta: dict[str, Any]) -> str:
    """Short digest of a command's content, to tell a replay from a reused txn id."""
    digest = hashlib.blake2b(orjson.dumps(meta, option=orjson.OPT_SORT_KEYS), digest_size=8)
    return digest.hexdigest()


def _ctx_dots(delta: dict[str, Any]) -> list[list[Any]]:
    """All dots of a delta's causal context, as a flat list (deltas are tiny)."""
    ctx = delta["c"]
    dots: list[list[Any]] = [list(d) for d in ctx["cloud"]]
    for replica, top in ctx["vv"].items():
        dots.extend([replica, c] for c in range(1, top + 1))
    return sorted(dots)


def _remove_op(orset: ORSet, rid: str) -> dict[str, Any]:
    dots: Iterable[tuple[str, int]] = orset.dots(rid)
    return {"t": "rs", "e": {}, "c": sorted([r, c] for r, c in dots)}

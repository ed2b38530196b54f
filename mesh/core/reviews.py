"""Review items: sensor disagreements, phantom stock and replenishment waiting for staff.

A review item is an element of an add-wins OR-set, replicated in signed envelopes as an
``rv`` op exactly like reservations (``rs``): an add carries one dot of its origin and an
immutable record; a resolution removes the observed dots. Any node may open and resolve
items; reconciliation at the edge opens most of them (``mesh.core.reconcile``), staff resolve
them on any node (``resolve``). ``docs/sensors.md`` is the reference.

Invariants:
 1. ``rv`` ops have the shape of ``rs`` ops (``mesh.core.ops`` invariant 3): every dot an op
    adds belongs to its origin, every id it adds is namespaced ``"<origin>:..."`` and
    comes with its record, removals (context-only dots) may name anyone's dots.
 2. The open items are the OR-set's elements: a function of the set of applied
    envelopes, whatever order they arrived in (the OR-set's laws).
 3. Every resolution is kept per dot with (HLC, origin, seq, kind, reason, staff), sorted,
    so the history of an item is the same on every replica; a removal that arrives
    before its add is kept and attached when the add arrives. Two concurrent accepting
    resolutions (on partitioned nodes) both adjust stock; the item then shows
    ``conflict: true`` for staff (it is not undone automatically).
 4. ``validate_rv``, ``validate_record`` and ``validate_evidence`` are pure and total:
    any JSON value in, the value or ``Malformed`` out. ``plan`` raises only
    ``Malformed``; ``mutate`` never raises (the replica's apply is all-or-nothing).
 5. An accepted item with a non-zero ``delta`` adjusts stock in the same envelope that
    closes it (a ``pn`` op, kind ``adjust``), so no replica sees one without the other.
 6. Resolved items are retired, like tombstones: the set's *horizon* is the newest HLC
    of the ``rv`` envelopes applied (a function of the applied set, not of any clock),
    and an item whose first resolution is more than ``REVIEW_RETAIN_MS`` older than the
    horizon is dropped with its history. Replicas holding the same envelopes hold the
    same items, in whatever order they came: a late resolution of a retired item (its
    dot in the causal context, its record gone) is dropped, a resolution older than the
    window waiting for its add is dropped, and an add that arrives already resolved with
    no history left is not kept. Memory is then bounded by the open items and the items
    resolved within the window. (The OR-set's causal context stays: it is compact.)
"""

from __future__ import annotations

import hashlib
import heapq
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from mesh import config
from mesh.core.crdt import ORSet, PNCounter
from mesh.errors import CommandError, Malformed

if TYPE_CHECKING:
    from mesh.core.replica import CommandResult, Replica

__all__ = [
    "RESOLUTIONS",
    "WHY",
    "ReviewItem",
    "ReviewSet",
    "auto_adjust",
    "open_item",
    "resolve",
    "stable_txn",
    "validate_evidence",
    "validate_record",
    "validate_rv",
]

Dot = tuple[str, int]

#: Why an item was opened.
WHY: Final = frozenset({
    "sensor_disagree",      # sensors and the ledger disagree, confidence in between
    "sensor_drift",         # a sensor disagrees with the others persistently: maintenance
    "phantom_reservation",  # a reservation past its pick window was never fulfilled
    "absent_sale",          # a sale of a SKU the shelf said was absent
    "zone_shrink",          # repeated shrink in one zone
    "count_requested",      # staff asked for a manual count
    "replenish",            # stock at or below its reorder point
})
#: What staff may do with an item.
RESOLUTIONS: Final = ("accept", "reject", "count")
_RECORD_KEYS: Final = frozenset({"sku", "why", "delta", "score", "evidence", "zone", "opened"})
_EVIDENCE_KEYS: Final = frozenset({"readings", "score", "review", "rule"})


def _ident(value: object, what: str) -> str:
    if not isinstance(value, str) or not value or len(value) > config.MAX_ID_LEN:
        raise Malformed(f"{what} must be a non-empty string of at most {config.MAX_ID_LEN} chars")
    return value


def _int_in(value: object, lo: int, hi: int, what: str) -> int:
    if type(value) is not int or not lo <= value <= hi:
        raise Malformed(f"{what} must be an integer in {lo}..{hi}")
    return value


def _ids(value: object, what: str) -> list[str]:
    if not isinstance(value, list) or len(value) > config.REVIEW_MAX_EVIDENCE:
        raise Malformed(f"{what} must be a list of at most {config.REVIEW_MAX_EVIDENCE} ids")
    return [_ident(v, what) for v in value]


def validate_evidence(ev: object) -> dict[str, Any]:
    """The evidence of an automatic or reviewed adjustment (envelope meta ``evidence``):
    ``readings`` (reading ids), ``score`` (confidence in permille), optionally ``review``
    (the item it resolves) and ``rule`` (the SKU class whose thresholds applied)."""
    if not isinstance(ev, dict) or not ev.keys() <= _EVIDENCE_KEYS:
        raise Malformed(f"evidence must be an object with fields among {sorted(_EVIDENCE_KEYS)}")
    _ids(ev.get("readings", []), "evidence readings")
    if "score" in ev:
        _int_in(ev["score"], 0, 1000, "evidence score")
    for name in ("review", "rule"):
        if name in ev:
            _ident(ev[name], f"evidence {name}")
    return ev


def validate_record(rec: object) -> dict[str, Any]:
    """A review item's record: {sku, why, delta, score, evidence, zone, opened}."""
    if not isinstance(rec, dict) or set(rec) != _RECORD_KEYS:
        raise Malformed(f"review record needs exactly {sorted(_RECORD_KEYS)}")
    _ident(rec["sku"], "review sku")
    if rec["why"] not in WHY:
        raise Malformed(f"review why must be one of {sorted(WHY)}")
    _int_in(rec["delta"], -config.MAX_QTY, config.MAX_QTY, "review delta")
    _int_in(rec["score"], 0, 1000, "review score")
    _ids(rec["evidence"], "review evidence")
    if rec["zone"] is not None:
        _ident(rec["zone"], "review zone")
    _int_in(rec["opened"], 0, (1 << 47) - 1, "review opened")
    return rec


def _dot(value: object, what: str) -> Dot:
    if not isinstance(value, list) or len(value) != 2:
        raise Malformed(f"{what} must be a [replica, counter] pair")
    replica, counter = value
    _ident(replica, what + " replica")
    if type(counter) is not int or counter < 1:
        raise Malformed(f"{what} counter must be an integer >= 1")
    return replica, counter


def validate_rv(op: dict[str, Any]) -> None:
    """Shape of an ``rv`` op (invariant 1); raises ``Malformed``."""
    if not set(op) <= {"t", "e", "c", "rec"} or "e" not in op or "c" not in op:
        raise Malformed("rv op needs t, e, c and optionally rec")
    entries, ctx, recs = op["e"], op["c"], op.get("rec", {})
    if not isinstance(entries, dict) or not isinstance(ctx, list) or not isinstance(recs, dict):
        raise Malformed("rv op: e must be an object, c a list of dots, rec an object")
    if len(ctx) > config.MAX_OPS_PER_ENVELOPE * 4:
        raise Malformed("rv op: too many context dots")
    ctx_dots = {_dot(d, "rv context dot") for d in ctx}
    for rid, dots in entries.items():
        _ident(rid, "review id")
        if not isinstance(dots, list) or len(dots) != 1:
            raise Malformed("rv op: each added item carries exactly one dot")
        if _dot(dots[0], "rv entry dot") not in ctx_dots:
            raise Malformed("rv op: entry dot not covered by the delta's context")
        if rid not in recs:
            raise Malformed(f"rv op: added item {rid!r} has no record")
    for rid, rec in recs.items():
        if rid not in entries:
            raise Malformed(f"rv op: record for {rid!r} which is not added")
        validate_record(rec)


def check_rv_rights(op: dict[str, Any], origin: str) -> str | None:
    """Why ``origin`` may not write ``op`` (None if it may): invariant 1."""
    prefix = origin + ":"
    for rid, dots in op["e"].items():
        if dots[0][0] != origin:
            return f"{origin} may not add a dot of replica {dots[0][0]}"
        if not rid.startswith(prefix):
            return f"{origin} may not add review item {rid!r} outside its namespace"
    return None


@dataclass(frozen=True, slots=True)
class ReviewItem:
    id: str
    sku: str
    why: str
    delta: int  # the stock adjustment accepting it makes (0: none)
    score: int  # confidence in permille when opened
    evidence: tuple[str, ...]
    zone: str | None
    opened: int  # wall-clock ms

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "sku": self.sku, "why": self.why, "delta": self.delta,
                "score": self.score, "evidence": list(self.evidence), "zone": self.zone,
                "opened_ms": self.opened}


#: (hlc, origin, seq, kind, reason, staff) of an envelope that removed an item's dot.
Resolution = tuple[int, str, int, str, str | None, str | None]


class ReviewSet:
    """The review items a replica holds (open and resolved)."""

    def __init__(self) -> None:
        self.items = ORSet()
        self.records: dict[str, ReviewItem] = {}
        self._dot_id: dict[Dot, str] = {}
        self._resolutions: dict[Dot, list[Resolution]] = {}
        #: newest HLC of the rv envelopes applied (invariant 6)
        self.horizon = 0
        #: items retired so far here (a counter for /metrics, not replicated state)
        self.retired = 0
        self._closed: list[tuple[int, str, Dot]] = []  # heap: (first resolution, id, dot)
        self._swept_ms = 0

    # --- the replica's apply path -------------------------------------------------------

    @staticmethod
    def plan(op: dict[str, Any]) -> ORSet:
        try:
            return ORSet.from_dict({"e": op["e"], "c": {"vv": {}, "cloud": op["c"]}})
        except ValueError as exc:
            raise Malformed(f"review delta: {exc}") from None

    def mutate(self, env: Any, op: dict[str, Any], delta: ORSet) -> None:
        """Apply a planned op of envelope ``env`` (never raises: invariant 4)."""
        added: set[Dot] = set()
        for rid, rec in op.get("rec", {}).items():
            if rid not in self.records:
                self.records[rid] = ReviewItem(rid, rec["sku"], rec["why"], rec["delta"],
                                               rec["score"], tuple(rec["evidence"]),
                                               rec["zone"], rec["opened"])
        for rid, dots in op["e"].items():
            dot = (dots[0][0], dots[0][1])
            added.add(dot)
            self._dot_id[dot] = rid
        meta = env.meta
        res: Resolution = (env.hlc, env.origin, env.seq, meta["kind"], meta.get("reason"),
                           meta.get("staff"))
        known = self.items.context
        for r, c in op["c"]:
            dot = (r, c)
            if dot in added:
                continue
            if dot in known and dot not in self._dot_id and dot not in self._resolutions:
                continue  # its item was retired here: a late resolution (invariant 6)
            hist = self._resolutions.setdefault(dot, [])
            hist.append(res)
            hist.sort()
        self.items.merge(delta)
        self.horizon = max(self.horizon, env.hlc)
        for dot in added | {(r, c) for r, c in op["c"]}:
            self._note_closed(dot)
        self._retire()

    # --- retirement (invariant 6) --------------------------------------------------------

    def _note_closed(self, dot: Dot) -> None:
        rid = self._dot_id.get(dot)
        hist = self._resolutions.get(dot)
        if rid is None or rid in self.items:
            return
        if not hist:  # an add already resolved, its history retired elsewhere first
            self._drop(rid, dot)
            return
        heapq.heappush(self._closed, (hist[0][0], rid, dot))

    def _expired(self, hlc: int) -> bool:
        return (self.horizon >> 16) - (hlc >> 16) > config.REVIEW_RETAIN_MS

    def _retire(self) -> None:
        while self._closed and self._expired(self._closed[0][0]):
            _, rid, dot = heapq.heappop(self._closed)
            if rid in self.records and rid not in self.items:
                self._drop(rid, dot)
        # Resolutions waiting for an add that the window has passed: when the add comes,
        # its item is already past the window (its first resolution is no later). They
        # are never shown, so sweeping them once a minute of horizon is enough.
        if (self.horizon >> 16) - self._swept_ms < 60_000:
            return
        self._swept_ms = self.horizon >> 16
        for d in [d for d, h in self._resolutions.items()
                  if d not in self._dot_id and self._expired(h[0][0])]:
            del self._resolutions[d]

    def _drop(self, rid: str, dot: Dot) -> None:
        """Retire item ``rid`` (one add, so one dot: ``dot``)."""
        if self.records.pop(rid, None) is not None:
            self.retired += 1
        self._dot_id.pop(dot, None)
        self._resolutions.pop(dot, None)

    # --- queries ------------------------------------------------------------------------

    def open_items(self, sku: str | None = None) -> list[ReviewItem]:
        recs = (self.records[r] for r in sorted(self.items.elements()))
        return [r for r in recs if sku is None or r.sku == sku]

    def is_open(self, rid: str) -> bool:
        return rid in self.items

    def history(self, rid: str) -> list[dict[str, Any]]:
        """Resolutions of item ``rid``, oldest first (invariant 3)."""
        out: list[Resolution] = []
        for dot, hist in self._resolutions.items():
            if self._dot_id.get(dot) == rid:
                out.extend(hist)
        return [{"hlc": h, "at_ms": h >> 16, "origin": o, "seq": s, "kind": k,
                 "resolution": (reason or "").removeprefix("review_") or None,
                 "staff_id": staff}
                for h, o, s, k, reason, staff in sorted(out)]

    def view(self, rid: str) -> dict[str, Any] | None:
        item = self.records.get(rid)
        if item is None:
            return None
        hist = self.history(rid)
        accepts = sum(1 for h in hist if h["resolution"] == "accept")
        return {**item.to_dict(), "open": rid in self.items, "resolutions": hist,
                "conflict": accepts > 1}

    # --- snapshots ----------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {
            "items": self.items.to_dict(),
            "records": {rid: [r.sku, r.why, r.delta, r.score, list(r.evidence), r.zone,
                              r.opened] for rid, r in self.records.items()},
            "dot_id": [[list(d), rid] for d, rid in self._dot_id.items()],
            "resolutions": [[list(d), [list(x) for x in hist]]
                            for d, hist in self._resolutions.items()],
            "horizon": self.horizon,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> ReviewSet:
        out = cls()
        if not d:
            return out
        out.items = ORSet.from_dict(d["items"])
        out.records = {rid: ReviewItem(rid, r[0], r[1], r[2], r[3], tuple(r[4]), r[5], r[6])
                       for rid, r in d["records"].items()}
        out._dot_id = {(dd[0], dd[1]): rid for dd, rid in d["dot_id"]}
        out._resolutions = {(dd[0], dd[1]): [
            (x[0], x[1], x[2], x[3], x[4], x[5]) for x in hist] for dd, hist in d["resolutions"]}
        out.horizon = d.get("horizon", 0)
        for dot in list(out._dot_id):
            out._note_closed(dot)
        out._retire()
        return out


# --- local commands ---------------------------------------------------------------------


def stable_txn(prefix: str, *parts: object) -> str:
    """A txn id derived from content: running the same reconciliation on the same evidence
    twice is a replay (``Replica`` invariant 7), not a second adjustment."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=10).hexdigest()
    return f"{prefix}:{digest}"


def _ctx_dots(delta: dict[str, Any]) -> list[list[Any]]:
    ctx = delta["c"]
    dots: list[list[Any]] = [list(d) for d in ctx["cloud"]]
    for replica, top in ctx["vv"].items():
        dots.extend([replica, c] for c in range(1, top + 1))
    return sorted(dots)


def _add_op(reviews: ReviewSet, origin: str, rid: str, rec: dict[str, Any]) -> dict[str, Any]:
    d = reviews.items.copy().add(origin, rid).to_dict()
    return {"t": "rv", "e": d["e"], "c": _ctx_dots(d), "rec": {rid: rec}}


def _pn_op(replica: Replica, sku: str, delta: int) -> dict[str, Any]:
    step = (replica.stock.get(sku) or PNCounter()).copy()
    if delta > 0:
        step.increment(replica.node_id, delta)
    else:
        step.decrement(replica.node_id, -delta)
    p, n = step.entry(replica.node_id)
    return {"t": "pn", "sku": sku, "r": replica.node_id, "p": p, "n": n}


def _result(replica: Replica, ops: list[dict[str, Any]], meta: dict[str, Any],
            now_ms: int, rid: str | None = None) -> CommandResult:
    from mesh.core.replica import CommandResult

    seen = replica._seen_txn(meta, rid=rid)  # the replica's idempotency rule (inv. 7)
    if seen is not None:
        return seen
    env = replica._local(ops, meta, now_ms)  # seals, applies, records the txn
    return CommandResult(env, replica.node_id, env.seq, reservation_id=rid)


def _check_delta(delta: object) -> int:
    if type(delta) is not int or abs(delta) > config.MAX_QTY:
        raise CommandError(f"delta must be an integer within ±{config.MAX_QTY}", "delta")
    return delta


def open_item(replica: Replica, *, sku: str, why: str, delta: int, score: int,
              evidence: list[str], zone: str | None, now_ms: int, txn: str,
              staff: str | None = None) -> CommandResult:
    """Open a review item (one envelope, kind ``review``); its id is ``<node>:<txn>``, so
    the same txn opens it once (a replay answers the original)."""
    if why not in WHY:
        raise CommandError(f"why must be one of {sorted(WHY)}", "why")
    rid = f"{replica.node_id}:{txn}"
    if len(rid) > config.MAX_ID_LEN:
        raise CommandError("txn_id is too long for a review id", "txn_id")
    rec = {"sku": sku, "why": why, "delta": _check_delta(delta), "score": score,
           "evidence": evidence[: config.REVIEW_MAX_EVIDENCE], "zone": zone,
           "opened": now_ms}
    try:
        validate_record(rec)
    except Malformed as exc:
        raise CommandError(str(exc), "review") from None
    meta = {"kind": "review", "txn": txn, "staff": staff, "reason": "open:" + why,
            "sku": sku, "note": rid}
    return _result(replica, [_add_op(replica.reviews, replica.node_id, rid, rec)], meta,
                   now_ms, rid)


def resolve(replica: Replica, rid: str, resolution: str, *, now_ms: int, txn: str,
            staff: str | None = None, note: str | None = None) -> CommandResult:
    """Staff resolve an open item: ``accept`` (its delta adjusts stock in the same
    envelope, invariant 5), ``reject``, or ``count`` (closes it and opens a
    ``count_requested`` item for the same SKU)."""
    if resolution not in RESOLUTIONS:
        raise CommandError(f"resolution must be one of {', '.join(RESOLUTIONS)}", "resolution")
    reviews = replica.reviews
    item = reviews.records.get(rid)
    kind = "adjust" if resolution == "accept" and item is not None and item.delta else "review"
    meta: dict[str, Any] = {"kind": kind, "txn": txn, "staff": staff,
                            "reason": "review_" + resolution, "note": rid}
    if kind == "adjust" and item is not None:
        meta.update(sku=item.sku, qty=item.delta,
                    evidence={"review": rid, "score": item.score,
                              "readings": list(item.evidence)})
    seen = replica._seen_txn(meta, rid=rid)
    if seen is not None:
        return seen
    if item is None or not reviews.is_open(rid):
        raise CommandError(f"no open review item {rid!r}", "review_id")
    dots = sorted([r, c] for r, c in reviews.items.dots(rid))
    ops: list[dict[str, Any]] = [{"t": "rv", "e": {}, "c": dots}]
    if kind == "adjust":
        ops.append(_pn_op(replica, item.sku, item.delta))
    if resolution == "count":
        new_id = f"{replica.node_id}:{txn}"
        if len(new_id) > config.MAX_ID_LEN:
            raise CommandError("txn_id is too long for a review id", "txn_id")
        rec = {"sku": item.sku, "why": "count_requested", "delta": 0, "score": 0,
               "evidence": [rid], "zone": item.zone, "opened": now_ms}
        add = _add_op(reviews, replica.node_id, new_id, rec)
        ops[0] = {**add, "c": sorted(add["c"] + dots)}
    if note is not None:
        meta["note"] = f"{rid} {note}"[: config.MAX_TEXT_LEN]
    return _result(replica, ops, meta, now_ms, rid)


def auto_adjust(replica: Replica, *, sku: str, delta: int, score: int, readings: list[str],
                rule: str, now_ms: int, txn: str, staff: str | None = None) -> CommandResult:
    """An adjustment reconciliation confirmed with high confidence: kind ``adjust``,
    reason ``sensor_reconcile``, the evidence (reading ids, score, rule) in the meta;
    ``staff``: who made the manual counts behind it (from their sessions), if any."""
    if type(delta) is not int or delta == 0 or abs(delta) > config.MAX_QTY:
        raise CommandError(f"delta must be a non-zero integer within ±{config.MAX_QTY}",
                           "delta")
    if not math.isfinite(score) or not 0 <= score <= 1000:
        raise CommandError("score must be in 0..1000", "score")
    meta = {"kind": "adjust", "txn": txn, "reason": "sensor_reconcile", "sku": sku,
            "qty": delta, "staff": staff,
            "evidence": {"readings": readings[: config.REVIEW_MAX_EVIDENCE], "score": score,
                         "rule": rule}}
    return _result(replica, [_pn_op(replica, sku, delta)], meta, now_ms)

"""Ops: the CRDT deltas inside an envelope, their schema and who may write them.

Invariants:
 1. Every op is a dict with a string ``t`` naming its type; unknown types are malformed.
 2. ``pn`` carries the *origin's own* cumulative (P, N) entry for one SKU; a node may only
    write its own entry (``r == origin``).
 3. ``rs`` carries an add-wins OR-set delta of reservation ids. Every dot in its entries
    belongs to the origin, every id it adds is namespaced ``"<origin>:..."`` and comes with
    its record; removals (context-only dots) may name any replica's dots.
 4. ``cat`` carries a Yjs update for the catalog document; only ``edge`` and ``cloud``
    roles may write it.
 5. ``rv`` carries an OR-set delta of review items (``mesh.core.reviews``), with the rights of
    ``rs``; ``tm`` carries edge telemetry summaries and alerts (``mesh.core.telemetry``),
    written by ``edge`` and ``cloud`` roles only. Meta ``evidence`` (an automatic
    adjustment's readings and score) is checked by ``mesh.core.reviews.validate_evidence``.
 6. Validation is pure and total: any JSON value in, either ``None`` out or
    ``Malformed``/``Forbidden`` raised. It never raises anything else.
 6. Every number a peer sends is bounded: counts (counter entries, dot counters,
    expiries) lie in ``0..config.MAX_COUNT``, quantities in ``1..config.MAX_QTY`` (meta
    ``qty`` within ``±MAX_QTY``), so no arithmetic on them can overflow a signed 64-bit
    slot anywhere downstream (oversell arrays, SQLite, orjson). An envelope holds at
    most one ``pn`` op per SKU: the replica's plan computes each op's change against
    the state before the envelope.
"""

from __future__ import annotations

import base64
import binascii
from typing import Any, Final

from mesh import config
from mesh.core import reviews, telemetry
from mesh.errors import Forbidden, Malformed

__all__ = [
    "CATALOG_ROLES",
    "EVENT_KINDS",
    "ROLES",
    "check_rights",
    "validate_meta",
    "validate_ops",
    "validate_record",
]

ROLES: Final = frozenset({"register", "edge", "cloud"})
CATALOG_ROLES: Final = frozenset({"edge", "cloud"})
EVENT_KINDS: Final = frozenset(
    {"receipt", "sale", "return", "adjust", "reserve", "release", "fulfil", "expire", "catalog",
     "review", "telemetry", "checkpoint"}
)
_META_FIELDS: Final = frozenset({"kind", "txn", "staff", "reason", "note", "sku", "qty",
                                 "evidence"})
_PN_KEYS: Final = frozenset({"t", "sku", "r", "p", "n"})


def _ident(value: object, what: str) -> str:
    if not isinstance(value, str) or not value or len(value) > config.MAX_ID_LEN:
        raise Malformed(f"{what} must be a non-empty string of at most {config.MAX_ID_LEN} chars")
    return value


def _text(value: object, what: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or len(value) > config.MAX_TEXT_LEN:
        raise Malformed(f"{what} must be a string of at most {config.MAX_TEXT_LEN} chars")
    return value


def _count(value: object, what: str) -> int:
    if type(value) is not int or not 0 <= value <= config.MAX_COUNT:
        raise Malformed(f"{what} must be an integer in 0..{config.MAX_COUNT}")
    return value


def _dot(value: object, what: str) -> tuple[str, int]:
    if not isinstance(value, list) or len(value) != 2:
        raise Malformed(f"{what} must be a [replica, counter] pair")
    replica, counter = value
    _ident(replica, what + " replica")
    if type(counter) is not int or not 1 <= counter <= config.MAX_COUNT:
        raise Malformed(f"{what} counter must be an integer in 1..{config.MAX_COUNT}")
    return replica, counter


def validate_record(rec: object) -> dict[str, Any]:
    """A reservation record: {sku, qty, channel, order, expires}."""
    if not isinstance(rec, dict):
        raise Malformed("reservation record must be an object")
    if set(rec) != {"sku", "qty", "channel", "order", "expires"}:
        raise Malformed("reservation record needs exactly sku, qty, channel, order, expires")
    _ident(rec["sku"], "record sku")
    qty = rec["qty"]
    if type(qty) is not int or not 0 < qty <= config.MAX_QTY:
        raise Malformed(f"record qty must be an integer in 1..{config.MAX_QTY}")
    _ident(rec["channel"], "record channel")
    _text(rec["order"], "record order")
    if rec["expires"] is not None:
        _count(rec["expires"], "record expires")
    return rec


def _validate_pn(op: dict[str, Any]) -> None:
    if op.keys() != _PN_KEYS:
        raise Malformed("pn op needs exactly t, sku, r, p, n")
    _ident(op["sku"], "pn sku")
    _ident(op["r"], "pn replica")
    _count(op["p"], "pn p")
    _count(op["n"], "pn n")


def _validate_rs(op: dict[str, Any]) -> None:
    if not set(op) <= {"t", "e", "c", "rec"} or "e" not in op or "c" not in op:
        raise Malformed("rs op needs t, e, c and optionally rec")
    entries, ctx, recs = op["e"], op["c"], op.get("rec", {})
    if not isinstance(entries, dict) or not isinstance(ctx, list) or not isinstance(recs, dict):
        raise Malformed("rs op: e must be an object, c a list of dots, rec an object")
    if len(ctx) > config.MAX_OPS_PER_ENVELOPE * 4:
        raise Malformed("rs op: too many context dots")
    ctx_dots = {_dot(d, "rs context dot") for d in ctx}
    for rid, dots in entries.items():
        _ident(rid, "reservation id")
        if not isinstance(dots, list) or len(dots) != 1:
            raise Malformed("rs op: each added reservation carries exactly one dot")
        if _dot(dots[0], "rs entry dot") not in ctx_dots:
            raise Malformed("rs op: entry dot not covered by the delta's context")
        if rid not in recs:
            raise Malformed(f"rs op: added reservation {rid!r} has no record")
    for rid, rec in recs.items():
        if rid not in entries:
            raise Malformed(f"rs op: record for {rid!r} which is not added")
        validate_record(rec)


def _validate_cat(op: dict[str, Any]) -> None:
    if set(op) != {"t", "u"} or not isinstance(op["u"], str):
        raise Malformed("cat op needs t and u (a base64 Yjs update)")
    try:
        base64.b64decode(op["u"], validate=True)
    except (binascii.Error, ValueError) as exc:
        raise Malformed(f"cat op: update is not valid base64: {exc}") from None


def _validate_ck(op: dict[str, Any]) -> None:
    """A checkpoint (``mesh.core.checkpoint``): its cut (an HLC), frontier (a version
    vector), per origin of the frontier the hash of the envelope at its seq (``h``, the
    chain head it covers) and the proposer's hash of its fold (``fh``)."""
    if set(op) - {"sh"} != {"t", "cut", "f", "h", "fh"}:
        raise Malformed("ck op needs t, cut, f, h and fh (and may carry sh)")
    if type(op["cut"]) is not int or not 0 < op["cut"] < 1 << 63:
        raise Malformed("ck cut must be a positive HLC")
    f = op["f"]
    if not isinstance(f, dict) or len(f) > config.MAX_ORIGINS:
        raise Malformed("ck f must be a version vector")
    for origin, seq in f.items():
        _ident(origin, "ck origin")
        _count(seq, "ck seq")
    heads = op["h"]
    if not isinstance(heads, dict) or set(heads) != set(f):
        raise Malformed("ck h must name a hash for every origin of f")
    for value in (*heads.values(), op["fh"], *([op["sh"]] if "sh" in op else [])):
        if not _is_sha256_hex(value):
            raise Malformed("ck h and fh hold SHA-256 hashes as 64 lowercase hex digits")


def _is_sha256_hex(value: object) -> bool:
    return (isinstance(value, str) and len(value) == 64
            and all(c in "0123456789abcdef" for c in value))


# --- sensors (issue 14): review items and telemetry summaries, in their own modules ---
_VALIDATORS: Final = {"pn": _validate_pn, "rs": _validate_rs, "cat": _validate_cat,
                      "rv": reviews.validate_rv, "tm": telemetry.validate_tm,
                      "ck": _validate_ck}


def validate_ops(ops: object) -> list[dict[str, Any]]:
    """Check the shape of an envelope's ops; returns them typed, or raises ``Malformed``."""
    if not isinstance(ops, list) or not ops:
        raise Malformed("ops must be a non-empty list")
    if len(ops) > config.MAX_OPS_PER_ENVELOPE:
        raise Malformed(f"too many ops ({len(ops)} > {config.MAX_OPS_PER_ENVELOPE})")
    pn_skus: set[str] = set()
    for op in ops:
        if not isinstance(op, dict):
            raise Malformed("each op must be an object")
        t = op.get("t")
        validator = _VALIDATORS.get(t) if isinstance(t, str) else None  # [] is unhashable
        if validator is None:
            raise Malformed(f"unknown op type {op.get('t')!r}")
        validator(op)
        if op["t"] == "pn":
            if op["sku"] in pn_skus:
                raise Malformed(f"two pn ops for SKU {op['sku']!r} in one envelope")
            pn_skus.add(op["sku"])
    return ops


def validate_meta(meta: object) -> dict[str, Any]:
    """The business event: who, which device, why. ``kind`` and ``txn`` are required."""
    if not isinstance(meta, dict):
        raise Malformed("meta must be an object")
    if not meta.keys() <= _META_FIELDS:
        raise Malformed(f"meta has unknown fields: {sorted(set(meta) - _META_FIELDS)}")
    if meta.get("kind") not in EVENT_KINDS:
        raise Malformed(f"meta kind must be one of {sorted(EVENT_KINDS)}")
    _ident(meta.get("txn"), "meta txn")
    if meta.get("staff") is not None:
        _ident(meta["staff"], "meta staff")
    if meta.get("reason") is not None:
        _ident(meta["reason"], "meta reason")
    _text(meta.get("note"), "meta note")
    if meta.get("sku") is not None:
        _ident(meta["sku"], "meta sku")
    qty = meta.get("qty")
    if qty is not None and (type(qty) is not int or not -config.MAX_QTY <= qty <= config.MAX_QTY):
        raise Malformed(f"meta qty must be an integer within ±{config.MAX_QTY}")
    if "evidence" in meta:
        reviews.validate_evidence(meta["evidence"])
    return meta


def check_rights(ops: list[dict[str, Any]], origin: str, role: str) -> None:
    """Raise ``Forbidden`` if the ops write anything ``origin`` (with ``role``) may not."""
    for op in ops:
        t = op["t"]
        if t == "pn":
            if op["r"] != origin:
                raise Forbidden(f"{origin} may not write {op['r']}'s counter entry")
        elif t == "rs":
            prefix = origin + ":"
            for rid, dots in op["e"].items():
                if dots[0][0] != origin:
                    raise Forbidden(f"{origin} may not add a dot of replica {dots[0][0]}")
                if not rid.startswith(prefix):
                    raise Forbidden(
                        f"{origin} may not add reservation {rid!r} outside its namespace"
                    )
        elif t == "cat":
            if role not in CATALOG_ROLES:
                raise Forbidden(f"a {role} node may not write the catalog")
        elif t == "rv":
            why = reviews.check_rv_rights(op, origin)
            if why is not None:
                raise Forbidden(why)
        elif t == "ck":
            if role not in CATALOG_ROLES:
                raise Forbidden(f"a {role} node may not propose checkpoints")
        elif t == "tm":
            if role not in CATALOG_ROLES:
                raise Forbidden(f"a {role} node may not send telemetry summaries")

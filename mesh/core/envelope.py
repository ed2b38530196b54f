"""Envelopes: the signed, hash-chained unit of the ledger.

Wire form (sign bytes, never objects)::

    raw  = b'{"body":' + BODY + b',"sig":"' + SIGHEX + b'"}'
    BODY = orjson.dumps(body, option=OPT_SORT_KEYS)
    SIG  = Ed25519(origin key, DOMAIN + BODY)          # SIGHEX: 128 lowercase hex chars
    hash = sha256(raw)

``body`` holds exactly ``v`` (1), ``store``, ``origin``, ``seq``, ``prev``, ``hlc``,
``ops`` and ``meta``. ``raw`` is itself canonical JSON, so it is stored and relayed
verbatim, and a receiver finds BODY by slicing (the suffix has a fixed length).

Invariants:

1. One content, one encoding: ``decode`` accepts BODY only if it is exactly the
   canonical orjson encoding of what it parses to, and SIGHEX only in lowercase. So
   ``raw`` (and ``hash``) is a function of the content and the signature, and since
   Ed25519 signatures as verified by OpenSSL are not malleable, nobody but the origin
   can produce a second valid ``raw`` for the same (origin, seq): two of them are
   proof of equivocation, not of a relay's re-encoding.
2. The signature covers the exact BODY bytes received (``DOMAIN + raw[8:-138]``), never
   a re-encoding; the domain prefix keeps it from being valid as any other kind of
   signature (certificates, revocation lists).
3. ``prev`` is ``None`` iff ``seq == 1``; otherwise it is the 32-byte hash of the
   origin's envelope ``seq - 1``. Each origin's envelopes thus form a hash chain.
4. ``decode`` checks structure only and is total: any bytes in, an ``Envelope`` or an
   ``EnvelopeError`` out (``Oversized`` before any parsing). ``verify`` and
   ``verify_chain`` add store, certificate, rights and signature checks, cheapest
   first, the signature last.
5. Envelopes compare and hash by ``raw`` only.
6. ``seal`` produces only envelopes that ``decode`` accepts; a caller's bad argument
   raises ``ValueError`` before anything is signed.
7. A certificate's expiry is judged against the envelope's own stamp (the wall-clock
   part of its HLC), not the time it is received: an envelope signed while its origin's
   certificate was valid stays valid for every replica, at any later time (a till's
   offline sales that reach the store after its certificate expired, a new till
   catching up on a retired one's history). One signed after expiry is refused
   (``ExpiredCertificate``). A revoked origin is refused whatever the stamp, except
   its seqs up to the bound its revocation names (``mesh.core.identity``, invariant 7):
   judged by seq, the same at every replica, whenever the envelope arrives.
"""

from __future__ import annotations

import binascii
import hashlib
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import orjson

from mesh import config
from mesh.core.crdt.hlc import COUNTER_BITS
from mesh.core.identity import NodeKey, TrustStore, verify_signature
from mesh.core.ops import check_rights, validate_meta, validate_ops
from mesh.errors import BadSignature, BrokenChain, EnvelopeError, Malformed, Oversized, WrongStore

__all__ = [
    "DOMAIN",
    "VERSION",
    "Envelope",
    "body_bytes",
    "decode",
    "seal",
    "verify",
    "verify_chain",
]

DOMAIN: Final = b"storemesh/envelope/v1\n"
VERSION: Final = 1

_PREFIX: Final = b'{"body":'
_SIG_MARK: Final = b',"sig":"'
_END: Final = b'"}'
_SIG_HEX_LEN: Final = 128
#: Bytes after BODY: ',"sig":"' + 128 hex + '"}'.
_SUFFIX_LEN: Final = len(_SIG_MARK) + _SIG_HEX_LEN + len(_END)
_PREFIX_LEN: Final = len(_PREFIX)
#: Smallest conceivable raw: prefix, a 2-byte body, suffix.
_MIN_LEN: Final = _PREFIX_LEN + 2 + _SUFFIX_LEN
_BODY_KEYS: Final = frozenset({"v", "store", "origin", "seq", "prev", "hlc", "ops", "meta"})
#: seq and hlc are stored as SQLite INTEGER (signed 64-bit).
_MAX_INT: Final = (1 << 63) - 1
_SORT: Final = orjson.OPT_SORT_KEYS


@dataclass(frozen=True, slots=True)
class Envelope:
    """A decoded envelope. ``raw`` is the truth; the other fields are read from it.

    ``ops`` and ``meta`` are the parsed JSON: treat them as read-only.
    """

    raw: bytes
    hash: bytes = field(compare=False)
    store: str = field(compare=False)
    origin: str = field(compare=False)
    seq: int = field(compare=False)
    prev: bytes | None = field(compare=False)
    hlc: int = field(compare=False)
    ops: list[dict[str, Any]] = field(compare=False)
    meta: dict[str, Any] = field(compare=False)

    def __repr__(self) -> str:
        return (
            f"Envelope(origin={self.origin!r}, seq={self.seq}, hlc={self.hlc}, "
            f"hash={self.hash.hex()[:16]}, kind={self.meta.get('kind')!r})"
        )

    @property
    def signature(self) -> bytes:
        return _signature(self.raw)


def _frame(raw: bytes) -> None:
    n = len(raw)
    if (
        n < _MIN_LEN
        or not raw.startswith(_PREFIX)
        or not raw.startswith(_SIG_MARK, n - _SUFFIX_LEN)
        or not raw.endswith(_END)
    ):
        raise Malformed('bad framing: expected {"body":...,"sig":"<128 hex>"}')


def body_bytes(raw: bytes) -> bytes:
    """The BODY slice of ``raw`` (the signature covers ``DOMAIN + body_bytes(raw)``)."""
    _frame(raw)
    return raw[_PREFIX_LEN:-_SUFFIX_LEN]


def _signature(raw: bytes) -> bytes:
    sighex = raw[-_SIG_HEX_LEN - 2 : -2]
    try:
        sig = binascii.a2b_hex(sighex)
    except (binascii.Error, ValueError):
        raise Malformed("signature must be 128 lowercase hex chars") from None
    if binascii.b2a_hex(sig) != sighex:
        raise Malformed("signature must be 128 lowercase hex chars")
    return sig


def decode(raw: bytes, *, max_bytes: int = config.MAX_ENVELOPE_BYTES) -> Envelope:
    """Parse and check the structure of ``raw``. Does NOT check the signature."""
    if len(raw) > max_bytes:
        raise Oversized(f"envelope of {len(raw)} bytes exceeds {max_bytes}")
    if type(raw) is not bytes:
        raw = bytes(raw)
    _frame(raw)
    _signature(raw)
    body_slice = raw[_PREFIX_LEN:-_SUFFIX_LEN]
    try:
        body = orjson.loads(body_slice)
    except orjson.JSONDecodeError as exc:
        raise Malformed(f"body is not JSON: {exc}") from None
    if type(body) is not dict or body.keys() != _BODY_KEYS:
        keys = sorted(body) if type(body) is dict else type(body).__name__
        raise Malformed(f"body must hold exactly {sorted(_BODY_KEYS)}, got {keys}")
    if orjson.dumps(body, option=_SORT) != body_slice:
        raise Malformed("body is not in canonical form (orjson, sorted keys)")
    v = body["v"]
    if type(v) is not int or v != VERSION:
        raise Malformed(f"unsupported envelope version {v!r}")
    store = body["store"]
    origin = body["origin"]
    if type(origin) is str:
        origin = sys.intern(origin)  # one string per node, not one per envelope in memory
    if type(store) is not str or not store or len(store) > config.MAX_ID_LEN:
        raise Malformed(f"store must be a non-empty string of at most {config.MAX_ID_LEN} chars")
    if type(origin) is not str or not origin or len(origin) > config.MAX_ID_LEN:
        raise Malformed(f"origin must be a non-empty string of at most {config.MAX_ID_LEN} chars")
    seq = body["seq"]
    hlc = body["hlc"]
    if type(seq) is not int or not 1 <= seq <= _MAX_INT:
        raise Malformed("seq must be an integer in 1..2**63-1")
    if type(hlc) is not int or not 0 <= hlc <= _MAX_INT:
        raise Malformed("hlc must be an integer in 0..2**63-1")
    prev = _prev(body["prev"], seq)
    ops = validate_ops(body["ops"])
    meta = validate_meta(body["meta"])
    return Envelope(raw, hashlib.sha256(raw).digest(), store, origin, seq, prev, hlc, ops, meta)


def _prev(value: object, seq: int) -> bytes | None:
    if seq == 1:
        if value is not None:
            raise Malformed("prev must be null at seq 1")
        return None
    if type(value) is not str or len(value) != 64:
        raise Malformed(f"prev must be 64 lowercase hex chars at seq {seq}")
    try:
        prev = bytes.fromhex(value)
    except ValueError:
        raise Malformed("prev must be 64 lowercase hex chars") from None
    if prev.hex() != value:
        raise Malformed("prev must be 64 lowercase hex chars")
    return prev


def seal(
    key: NodeKey,
    *,
    store: str,
    origin: str,
    seq: int,
    prev: bytes | None,
    hlc: int,
    ops: list[dict[str, Any]],
    meta: dict[str, Any],
) -> Envelope:
    """Build, check and sign an envelope. A bad argument raises ``ValueError``."""
    if prev is not None and (not isinstance(prev, bytes) or len(prev) != 32):
        raise ValueError("prev must be None or the 32-byte hash of the previous envelope")
    body = {
        "v": VERSION,
        "store": store,
        "origin": origin,
        "seq": seq,
        "prev": None if prev is None else prev.hex(),
        "hlc": hlc,
        "ops": ops,
        "meta": meta,
    }
    try:
        body_raw = orjson.dumps(body, option=_SORT)
    except orjson.JSONEncodeError as exc:
        raise ValueError(f"cannot encode envelope body: {exc}") from None
    # Check everything decode will check before signing anything.
    try:
        env = decode(_PREFIX + body_raw + _SIG_MARK + b"0" * _SIG_HEX_LEN + _END)
    except EnvelopeError as exc:
        raise ValueError(f"cannot seal envelope: {exc}") from None
    sig = key.sign(DOMAIN + body_raw)
    raw = _PREFIX + body_raw + _SIG_MARK + sig.hex().encode() + _END
    return Envelope(
        raw,
        hashlib.sha256(raw).digest(),
        env.store,
        env.origin,
        env.seq,
        env.prev,
        env.hlc,
        env.ops,
        env.meta,
    )


def verify(raw: bytes | Envelope, trust: TrustStore, now_ms: int) -> Envelope:
    """Decode ``raw`` (unless given decoded) and check store, certificate, rights and
    signature (in that order). ``now_ms`` is not used for expiry (invariant 7)."""
    env = raw if isinstance(raw, Envelope) else decode(raw)
    if env.store != trust.store_id:
        raise WrongStore(f"envelope of {env.origin!r} is for store {env.store!r}")
    cert = trust.check(env.origin, env.hlc >> COUNTER_BITS, env.seq)  # invariant 7
    check_rights(env.ops, env.origin, cert.role)
    _check_signature(env, cert.public_key, trust)
    return env


def _check_signature(env: Envelope, public_key: bytes, trust: TrustStore) -> None:
    raw = env.raw
    if not verify_signature(public_key, _signature(raw), DOMAIN + raw[_PREFIX_LEN:-_SUFFIX_LEN],
                            trust.verifier):
        raise BadSignature(f"signature of {env.origin!r} seq {env.seq} does not verify")


def verify_chain(
    raws: Sequence[bytes] | Sequence[Envelope], trust: TrustStore, now_ms: int, *,
    prev: bytes | None,
) -> list[Envelope]:
    """Verify a contiguous page of one origin's envelopes with ONE signature check.

    ``raws`` hold seqs ``s, s+1, ..., s+n-1`` of one origin; ``prev`` is the hash of that
    origin's envelope ``s-1`` as the caller holds it (``None`` iff ``s == 1``).

    Why one signature is enough: the last envelope's signature authenticates its BODY,
    which holds ``prev = sha256(raws[-2])``. Under SHA-256's collision resistance that
    fixes every byte of ``raws[-2]``, including its ``prev``, which fixes ``raws[-3]``,
    and so on back to ``raws[0]``, whose ``prev`` must equal the hash the caller already
    trusts. So every byte of the page was committed to by the origin's key, and an
    attacker without that key can neither alter, drop, insert nor reorder anything.
    That is one Ed25519 verify (~110 µs) plus one SHA-256 (~1 µs) per envelope.

    Caveat: the origin's *own* signatures on the non-last envelopes are not checked. A
    malicious (enrolled) origin can thus publish an envelope with an invalid signature
    that this function accepts as part of a page while ``verify`` rejects it on its own.
    Such an origin can already write anything its rights allow under a valid signature,
    so this gains it nothing but a disagreement about that one envelope between
    replicas that fetched it alone and those that fetched it in a page; the remedy for
    a misbehaving node is revocation. We keep the single check.

    Raises ``Malformed`` (bad envelope, mixed origins, page longer than
    ``config.LEDGER_PAGE``), ``WrongStore``, ``BrokenChain`` (seqs not contiguous, or a
    ``prev`` link that does not match), the certificate errors, ``Forbidden`` and
    ``BadSignature``.
    """
    if not raws:
        return []
    if len(raws) > config.LEDGER_PAGE:
        raise Malformed(f"page of {len(raws)} envelopes exceeds {config.LEDGER_PAGE}")
    envs = [raw if isinstance(raw, Envelope) else decode(raw) for raw in raws]
    first = envs[0]
    store, origin = first.store, first.origin
    if store != trust.store_id:
        raise WrongStore(f"envelope of {origin!r} is for store {store!r}")
    # invariant 7: the newest stamp of the page (an origin's stamps only grow)
    # (and the highest seq: a revoked origin's bound, mesh.core.identity invariant 7)
    cert = trust.check(origin, max(e.hlc for e in envs) >> COUNTER_BITS,
                       max(e.seq for e in envs))
    role = cert.role
    seq = first.seq
    link = prev
    for env in envs:
        if env.origin != origin or env.store != store:
            raise Malformed(
                f"a page holds one origin's envelopes: {env.origin!r}@{env.store!r} "
                f"after {origin!r}@{store!r}"
            )
        if env.seq != seq:
            raise BrokenChain(f"{origin!r}: expected seq {seq}, got {env.seq}")
        if env.prev != link:
            raise BrokenChain(f"{origin!r} seq {env.seq}: prev does not match the chain")
        check_rights(env.ops, origin, role)
        link = env.hash
        seq += 1
    _check_signature(envs[-1], cert.public_key, trust)
    return envs

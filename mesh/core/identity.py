"""Identity: node keys, enrolment certificates, revocations and the trust store.

Each node holds an Ed25519 key generated on first start. The store's own key signs a
*certificate* binding {node id, store id, role, public key, expiry}, and a versioned
*revocation list*. A replica's ``TrustStore`` holds the store's public key plus the
certificates and revocations it has seen, and answers "may this node write here now?".

Invariants:

1. A key file is created atomically with mode 0600 (``os.open(..., 0o600)``, write,
   fsync, link into place, fsync the directory) and never overwritten: if two processes
   race, both end up using the key that won. A key file readable or writable by group or
   others is refused (``KeyPermissionError``), never silently used.
2. Signatures cover canonical bytes only: a domain prefix (``storemesh/cert/v1\\n``,
   ``storemesh/crl/v1\\n``) followed by ``orjson.dumps(body, OPT_SORT_KEYS)``. The
   prefix keeps a signature of one kind from ever verifying as another kind (the
   envelope domain is ``storemesh/envelope/v1\\n``).
3. ``Certificate.from_dict`` / ``RevocationList.from_dict`` are total: any JSON value in,
   either an object or ``Malformed`` out. They check shape, not signatures.
4. ``TrustStore`` only holds certificates and revocation lists that verified against
   the store key and name this store. For a node it keeps the certificate with the
   greatest ``(not_after, body bytes)``, so replicas that saw the same certificates in
   any order agree.
5. Revocation list versions only move forward; a list whose version is not newer than
   the one held is ignored. A list is cumulative: version N names every revoked node.
6. ``TrustStore.check`` never reads a clock: time comes in as ``now_ms``.
7. A revoked node with a bound (``RevocationList.upto``) is refused above its bound
   only: ``check(node, now_ms, seq)`` admits its seqs up to the bound, so every replica
   holding the list keeps exactly the same prefix of its chain, whatever it received
   before the list. Without a bound (an old list, a node revoked here only, or a check
   that names no seq, such as a session's) a revoked node is refused outright. A bound,
   once signed, is carried into every later version unchanged (``mesh.store.revoke``).
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import orjson
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from mesh import config
from mesh.core.ops import ROLES
from mesh.errors import (
    BadSignature,
    ExpiredCertificate,
    KeyPermissionError,
    Malformed,
    NotEnrolled,
    RevokedCertificate,
    WrongStore,
)

if TYPE_CHECKING:
    from mesh.core.auth import Roster

__all__ = [
    "CERT_DOMAIN",
    "CRL_DOMAIN",
    "ROLES",
    "Certificate",
    "NodeKey",
    "RevocationList",
    "TrustStore",
    "Verifier",
    "fingerprint",
    "issue_certificate",
    "issue_revocations",
    "renew_certificate",
    "renewal_due",
    "revocation_bounds",
    "verify_signature",
]

CERT_DOMAIN: Final = b"storemesh/cert/v1\n"
CRL_DOMAIN: Final = b"storemesh/crl/v1\n"

#: Public key objects kept for ``verify_signature``. Building one from bytes costs a few
#: µs; a store has tens of nodes, so this bound is never hit in practice but stops a
#: flood of unknown keys from growing memory.
_PUBKEY_CACHE_MAX: Final = 1024
#: Most node ids in one revocation list: far beyond any store's lifetime of registers,
#: small enough that a forged huge list is refused before its signature is checked.
MAX_REVOKED: Final = 65_536
#: Largest integer we accept in a timestamp or version: fits SQLite's signed INTEGER.
_MAX_INT: Final = (1 << 63) - 1

_KEY_LEN: Final = 32
_SIG_LEN: Final = 64


# --- keys -------------------------------------------------------------------------


class NodeKey:
    """An Ed25519 private key: a node's own, or the store's (which signs certificates)."""

    __slots__ = ("_key", "fingerprint", "public_key")

    def __init__(self, key: Ed25519PrivateKey) -> None:
        self._key = key
        self.public_key: bytes = key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        self.fingerprint: str = fingerprint(self.public_key)

    def __repr__(self) -> str:
        return f"NodeKey(fingerprint={self.fingerprint!r})"

    @classmethod
    def generate(cls) -> NodeKey:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def from_bytes(cls, raw32: bytes) -> NodeKey:
        if len(raw32) != _KEY_LEN:
            raise ValueError(f"an Ed25519 private key is {_KEY_LEN} bytes, got {len(raw32)}")
        return cls(Ed25519PrivateKey.from_private_bytes(bytes(raw32)))

    def private_bytes(self) -> bytes:
        return self._key.private_bytes(
            serialization.Encoding.Raw,
            serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        )

    def sign(self, data: bytes) -> bytes:
        return self._key.sign(data)

    @classmethod
    def load_or_create(cls, path: Path) -> NodeKey:
        """Load the key at ``path``, or create it (mode 0600) if there is none."""
        path = Path(path)
        try:
            return cls._load(path)
        except FileNotFoundError:
            pass
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        key = cls.generate()
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{key.fingerprint}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            try:
                os.write(fd, key.private_bytes())
                os.fsync(fd)
            finally:
                os.close(fd)
            try:
                # link, not rename: never clobber a key another process just created.
                os.link(tmp, path)
            except FileExistsError:
                return cls._load(path)
            _fsync_dir(path.parent)
        finally:
            tmp.unlink(missing_ok=True)
        return key

    @classmethod
    def _load(cls, path: Path) -> NodeKey:
        fd = os.open(path, os.O_RDONLY)
        try:
            st = os.fstat(fd)
            mode = stat.S_IMODE(st.st_mode)
            if mode & 0o077:
                raise KeyPermissionError(
                    f"key file {path} has mode {mode:04o}: group/others may access it, "
                    f"so it is not used. Fix: chmod 600 {path}"
                )
            raw = os.read(fd, _KEY_LEN + 1)
        finally:
            os.close(fd)
        if len(raw) != _KEY_LEN:
            raise ValueError(
                f"key file {path} holds {len(raw)} bytes, not a raw {_KEY_LEN}-byte "
                "Ed25519 key; restore it from backup or move it away to create a new one"
            )
        return cls.from_bytes(raw)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fingerprint(public_key: bytes) -> str:
    """First 16 hex chars of sha256(public key): short, stable, safe to log."""
    return hashlib.sha256(public_key).hexdigest()[:16]


#: Successful signature checks a ``Verifier`` remembers: 64k entries ~ 6 MB.
_VERIFIED_MAX: Final = 65_536


class Verifier:
    """Ed25519 checks with memory: parsed public keys and successful checks, bounded,
    oldest forgotten first. An object, not process-global state: every ``TrustStore``
    owns one; the simulator hands one to all the nodes it hosts in its process, so the
    same bytes are verified once per run, as a relay verifies them once per node."""

    __slots__ = ("_keys", "_ok")

    def __init__(self) -> None:
        self._keys: dict[bytes, Ed25519PublicKey] = {}
        self._ok: dict[bytes, None] = {}

    def clear(self) -> None:
        """Forget remembered checks (benchmarks measure the real cost)."""
        self._ok.clear()

    def check(self, public_key: bytes, signature: bytes, data: bytes) -> bool:
        memo = hashlib.sha256(public_key + signature + data).digest()
        if memo in self._ok:
            return True
        pk = self._keys.get(public_key)
        if pk is None:
            try:
                pk = Ed25519PublicKey.from_public_bytes(public_key)
            except ValueError:
                return False
            if len(self._keys) >= _PUBKEY_CACHE_MAX:
                del self._keys[next(iter(self._keys))]  # oldest first
            self._keys[bytes(public_key)] = pk
        try:
            pk.verify(signature, data)
        except (InvalidSignature, ValueError, TypeError):
            return False
        if len(self._ok) >= _VERIFIED_MAX:
            del self._ok[next(iter(self._ok))]  # oldest first
        self._ok[memo] = None
        return True


def verify_signature(public_key: bytes, signature: bytes, data: bytes,
                     verifier: Verifier | None = None) -> bool:
    """True iff ``signature`` is a valid Ed25519 signature of ``data`` by ``public_key``.

    Total: a malformed key or signature is just ``False``. With a ``verifier`` (a trust
    store's), successful checks are remembered there, so the same bytes are not
    verified twice: a relay that sees an envelope again."""
    if verifier is not None:
        return verifier.check(public_key, signature, data)
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, data)
    except (InvalidSignature, ValueError, TypeError):
        return False
    return True


# --- shape helpers (remote input: raise Malformed) -----------------------------------


def _ident(value: object, what: str) -> str:
    if not isinstance(value, str) or not value or len(value) > config.MAX_ID_LEN:
        raise Malformed(f"{what} must be a non-empty string of at most {config.MAX_ID_LEN} chars")
    return value


def _uint(value: object, what: str) -> int:
    if type(value) is not int or not 0 <= value <= _MAX_INT:
        raise Malformed(f"{what} must be an integer in 0..2**63-1")
    return value


def _hex(value: object, n: int, what: str) -> bytes:
    if not isinstance(value, str) or len(value) != 2 * n:
        raise Malformed(f"{what} must be {2 * n} lowercase hex chars")
    try:
        out = bytes.fromhex(value)
    except ValueError:
        raise Malformed(f"{what} must be {2 * n} lowercase hex chars") from None
    if out.hex() != value:
        raise Malformed(f"{what} must be {2 * n} lowercase hex chars")
    return out


def _fields(d: object, keys: frozenset[str], what: str) -> dict[str, Any]:
    if not isinstance(d, dict) or d.keys() != keys:
        raise Malformed(f"{what} must be an object with exactly the keys {sorted(keys)}")
    return d


def _local_ident(value: str, what: str) -> None:
    if not isinstance(value, str) or not value or len(value) > config.MAX_ID_LEN:
        raise ValueError(f"{what} must be a non-empty string of at most {config.MAX_ID_LEN} chars")


# --- certificates -------------------------------------------------------------------

_CERT_KEYS: Final = frozenset(
    {"node_id", "store_id", "role", "public_key", "not_after", "signature"}
)


@dataclass(frozen=True, slots=True)
class Certificate:
    """The store key's statement: ``node_id`` with ``public_key`` may write to ``store_id``
    as ``role`` until ``not_after`` (ms, inclusive)."""

    node_id: str
    store_id: str
    role: str
    public_key: bytes
    not_after: int
    signature: bytes

    def body_bytes(self) -> bytes:
        body = {
            "node_id": self.node_id,
            "store_id": self.store_id,
            "role": self.role,
            "public_key": self.public_key.hex(),
            "not_after": self.not_after,
        }
        return CERT_DOMAIN + orjson.dumps(body, option=orjson.OPT_SORT_KEYS)

    def to_dict(self) -> dict[str, Any]:
        return {
            "node_id": self.node_id,
            "store_id": self.store_id,
            "role": self.role,
            "public_key": self.public_key.hex(),
            "not_after": self.not_after,
            "signature": self.signature.hex(),
        }

    @classmethod
    def from_dict(cls, d: object) -> Certificate:
        f = _fields(d, _CERT_KEYS, "certificate")
        role = f["role"]
        if role not in ROLES:
            raise Malformed(f"certificate role must be one of {sorted(ROLES)}")
        return cls(
            node_id=_ident(f["node_id"], "certificate node_id"),
            store_id=_ident(f["store_id"], "certificate store_id"),
            role=role,
            public_key=_hex(f["public_key"], _KEY_LEN, "certificate public_key"),
            not_after=_uint(f["not_after"], "certificate not_after"),
            signature=_hex(f["signature"], _SIG_LEN, "certificate signature"),
        )

    def verify(self, store_public_key: bytes, verifier: Verifier | None = None) -> None:
        if not verify_signature(store_public_key, self.signature, self.body_bytes(), verifier):
            raise BadSignature(
                f"certificate of node {self.node_id!r} is not signed by the store key"
            )


def issue_certificate(
    store_key: NodeKey,
    *,
    node_id: str,
    store_id: str,
    role: str,
    public_key: bytes,
    not_after: int,
) -> Certificate:
    """Sign a certificate with the store key. Bad arguments raise ``ValueError``."""
    _local_ident(node_id, "node_id")
    _local_ident(store_id, "store_id")
    if role not in ROLES:
        raise ValueError(f"role must be one of {sorted(ROLES)}, got {role!r}")
    if not isinstance(public_key, bytes) or len(public_key) != _KEY_LEN:
        raise ValueError(f"public_key must be {_KEY_LEN} raw bytes")
    if type(not_after) is not int or not 0 <= not_after <= _MAX_INT:
        raise ValueError("not_after must be an integer in 0..2**63-1 (ms since the epoch)")
    unsigned = Certificate(node_id, store_id, role, public_key, not_after, b"")
    return Certificate(
        node_id, store_id, role, public_key, not_after, store_key.sign(unsigned.body_bytes())
    )


def renewal_due(cert: Certificate, now_ms: int, validity_ms: int) -> bool:
    """Should the store key's holder renew ``cert`` now? Once less than a third
    (``config.CERT_RENEW_FRACTION``) of the store's certificate validity remains, and
    only while it is still valid: an expired node is past renewal and must join again
    (its TLS certificate no longer opens a session to ask for one either)."""
    return now_ms <= cert.not_after < now_ms + validity_ms // config.CERT_RENEW_FRACTION


def renew_certificate(store_key: NodeKey, cert: Certificate, *, now_ms: int,
                      validity_ms: int) -> Certificate:
    """``cert`` again, for the same node, store, role and key, valid ``validity_ms``
    from ``now_ms``."""
    return issue_certificate(store_key, node_id=cert.node_id, store_id=cert.store_id,
                             role=cert.role, public_key=cert.public_key,
                             not_after=now_ms + validity_ms)


# --- revocations --------------------------------------------------------------------

_CRL_KEYS: Final = frozenset({"store_id", "version", "revoked", "signature"})


@dataclass(frozen=True, slots=True)
class RevocationList:
    """The store key's list of every revoked node id, as of ``version``.

    ``upto`` bounds what the store keeps of a revoked node (invariant 7): its envelopes
    with seq up to ``upto[node]`` are accepted by every replica, whenever and from
    whomever they arrive (still signature- and chain-verified); those above are refused
    everywhere, and a replica that applied some before it held the list drops them. A
    revoked node id without a bound (a list signed before bounds, or ``device:<id>``,
    which signs no envelopes) is refused from when each replica learns of it."""

    store_id: str
    version: int
    revoked: frozenset[str]
    signature: bytes
    upto: dict[str, int] = field(default_factory=dict)

    def body_bytes(self) -> bytes:
        body: dict[str, Any] = {"store_id": self.store_id, "version": self.version,
                                "revoked": sorted(self.revoked)}
        if self.upto:
            body["upto"] = self.upto
        return CRL_DOMAIN + orjson.dumps(body, option=orjson.OPT_SORT_KEYS)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "store_id": self.store_id,
            "version": self.version,
            "revoked": sorted(self.revoked),
            "signature": self.signature.hex(),
        }
        if self.upto:
            d["upto"] = dict(sorted(self.upto.items()))
        return d

    @classmethod
    def from_dict(cls, d: object) -> RevocationList:
        # ``upto`` is optional: lists signed before bounds existed lack it, and their
        # signed bytes (``body_bytes``) are unchanged when it is empty
        upto_doc: object = {}
        if isinstance(d, dict) and "upto" in d:
            upto_doc = d["upto"]
            d = {k: v for k, v in d.items() if k != "upto"}
        f = _fields(d, _CRL_KEYS, "revocation list")
        revoked = f["revoked"]
        if not isinstance(revoked, list) or len(revoked) > MAX_REVOKED:
            raise Malformed(f"revocation list revoked must be a list of at most {MAX_REVOKED}")
        ids = frozenset(_ident(n, "revoked node id") for n in revoked)
        if not isinstance(upto_doc, dict) or len(upto_doc) > MAX_REVOKED:
            raise Malformed("revocation list upto must be an object {node id: seq}")
        upto = {_ident(n, "revoked node id"): _uint(s, "revocation list upto seq")
                for n, s in upto_doc.items()}
        if not upto.keys() <= ids:
            raise Malformed("revocation list upto names a node that is not revoked")
        return cls(
            store_id=_ident(f["store_id"], "revocation list store_id"),
            version=_uint(f["version"], "revocation list version"),
            revoked=ids,
            signature=_hex(f["signature"], _SIG_LEN, "revocation list signature"),
            upto=upto,
        )

    def verify(self, store_public_key: bytes, verifier: Verifier | None = None) -> None:
        if not verify_signature(store_public_key, self.signature, self.body_bytes(), verifier):
            raise BadSignature(f"revocation list v{self.version} is not signed by the store key")


def issue_revocations(
    store_key: NodeKey, *, store_id: str, version: int, revoked: frozenset[str] | set[str],
    upto: dict[str, int] | None = None,
) -> RevocationList:
    """Sign a revocation list with the store key; ``upto``: the highest seq of each
    revoked node the store keeps (``RevocationList``). Bad arguments raise ``ValueError``."""
    _local_ident(store_id, "store_id")
    if type(version) is not int or not 0 <= version <= _MAX_INT:
        raise ValueError("version must be an integer in 0..2**63-1")
    ids = frozenset(revoked)
    if len(ids) > MAX_REVOKED:
        raise ValueError(f"at most {MAX_REVOKED} revoked node ids")
    for node_id in ids:
        _local_ident(node_id, "revoked node id")
    bounds = dict(sorted((upto or {}).items()))
    for node_id, seq in bounds.items():
        if node_id not in ids:
            raise ValueError(f"upto names {node_id!r}, which is not revoked")
        if type(seq) is not int or not 0 <= seq <= _MAX_INT:
            raise ValueError(f"upto of {node_id!r} must be an integer in 0..2**63-1")
    unsigned = RevocationList(store_id, version, ids, b"", bounds)
    return RevocationList(store_id, version, ids, store_key.sign(unsigned.body_bytes()), bounds)


def revocation_bounds(trust: TrustStore, revoked: set[str] | frozenset[str],
                      head: Callable[[str], int]) -> dict[str, int]:
    """The ``upto`` of the next revocation list naming ``revoked``, as its signer (the
    store key's holder) computes it: every bound of the list ``trust`` holds, unchanged
    (invariant 7), and for each revoked node without one, ``head(node)``: the highest
    seq of its chain the signer holds. API devices (``device:<id>``) sign no envelopes
    and get none."""
    held = trust.crl.upto if trust.crl is not None else {}
    out = {n: b for n, b in held.items() if n in revoked}
    for name in revoked:
        if name not in out and not name.startswith("device:"):
            out[name] = head(name)
    return out


# --- trust store --------------------------------------------------------------------

_TRUST_KEYS: Final = frozenset(
    {"store_id", "store_public_key", "certificates", "crl", "revoked_local"}
)
#: Optional keys of a saved trust store (files written before they existed lack them).
_TRUST_OPTIONAL: Final = frozenset({"roster", "checkpointer"})


class TrustStore:
    """Who may write to this store: the store key, certificates and revocations seen."""

    __slots__ = ("_cert_at", "_certs", "_crl", "_local_revoked", "_revoked", "_roster",
                 "checkpointer", "store_id", "store_public_key", "verifier", "version")

    def __init__(self, store_id: str, store_public_key: bytes, *,
                 checkpointer: str | None = None) -> None:
        _local_ident(store_id, "store_id")
        if not isinstance(store_public_key, bytes) or len(store_public_key) != _KEY_LEN:
            raise ValueError(f"store_public_key must be {_KEY_LEN} raw bytes")
        if checkpointer is not None:
            _local_ident(checkpointer, "checkpointer")
        self.store_id = store_id
        self.store_public_key = store_public_key
        #: The node whose checkpoints the store counts (docs/architecture.md, "Bounded
        #: history"): the edge made by ``store init`` (the store key's first holder),
        #: fixed at store creation and copied into every node's trust store at enrolment
        #: (the join answer carries it), so every node of a store names the same one.
        #: None: checkpoints are neither proposed nor counted here.
        self.checkpointer = checkpointer
        self._certs: dict[str, Certificate] = {}
        self._cert_at: dict[str, int] = {}  # node id -> ``version`` its certificate came at
        self._crl: RevocationList | None = None
        self._local_revoked: set[str] = set()
        self._revoked: frozenset[str] = frozenset()  # crl ∪ local, for a cheap check()
        #: The newest staff roster (``mesh.core.auth.Roster``) that verified, if any.
        self._roster: Roster | None = None
        #: Bumped on every change, so derived values (digests) can be cached.
        self.version = 0
        #: Signature checks against this store's keys, remembered (see ``Verifier``).
        self.verifier = Verifier()

    def __repr__(self) -> str:
        return (
            f"TrustStore(store_id={self.store_id!r}, certificates={len(self._certs)}, "
            f"crl_version={self.crl_version}, revoked={len(self._revoked)})"
        )

    @property
    def crl(self) -> RevocationList | None:
        """The newest revocation list applied (to pass on to peers), if any."""
        return self._crl

    @property
    def crl_version(self) -> int:
        return -1 if self._crl is None else self._crl.version

    def add_certificate(self, cert: Certificate) -> None:
        """Verify and keep ``cert``; a certificate already held that expires later wins."""
        if cert.store_id != self.store_id:
            raise WrongStore(
                f"certificate of node {cert.node_id!r} is for store {cert.store_id!r}, "
                f"not {self.store_id!r}"
            )
        held = self._certs.get(cert.node_id)
        if held == cert:
            return  # already held (and verified): gossip repeats certificates a lot
        cert.verify(self.store_public_key, self.verifier)
        if held is None or (cert.not_after, cert.body_bytes()) > (
            held.not_after,
            held.body_bytes(),
        ):
            self._certs[cert.node_id] = cert
            self.version += 1
            self._cert_at[cert.node_id] = self.version

    def apply_revocations(self, crl: RevocationList) -> None:
        """Verify and adopt ``crl`` if it is newer than the list held; else ignore it."""
        if crl.store_id != self.store_id:
            raise WrongStore(
                f"revocation list v{crl.version} is for store {crl.store_id!r}, "
                f"not {self.store_id!r}"
            )
        crl.verify(self.store_public_key, self.verifier)
        if crl.version <= self.crl_version:
            return
        self._crl = crl
        self._revoked = crl.revoked | self._local_revoked
        self.version += 1

    @property
    def roster(self) -> Roster | None:
        """The newest staff roster applied (to pass on to peers), if any."""
        return self._roster

    @property
    def roster_version(self) -> int:
        return -1 if self._roster is None else self._roster.version

    def apply_roster(self, roster: Roster) -> None:
        """Verify and adopt ``roster`` if it is newer than the one held (versions only
        move forward, as revocation lists do); else ignore it."""
        if roster.store_id != self.store_id:
            raise WrongStore(f"roster v{roster.version} is for store {roster.store_id!r}, "
                             f"not {self.store_id!r}")
        if not roster.verify(self.store_public_key):
            raise BadSignature(f"roster v{roster.version} is not signed by the store key")
        if roster.version <= self.roster_version:
            return
        self._roster = roster
        self.version += 1

    def is_revoked(self, name: str) -> bool:
        """Is ``name`` (a node id, or ``device:<id>``) on the revocation list (or revoked
        here only)?"""
        return name in self._revoked

    def revoke(self, node_id: str) -> None:
        """Refuse ``node_id`` from now on, on this replica only."""
        self._local_revoked.add(node_id)
        self._revoked = self._revoked | {node_id}
        self.version += 1

    def revocation_bound(self, node_id: str) -> int | None:
        """The highest seq of revoked ``node_id`` the store keeps (invariant 7); None if
        it is not revoked, or revoked without a bound (refused outright)."""
        if node_id not in self._revoked or node_id in self._local_revoked or self._crl is None:
            return None
        return self._crl.upto.get(node_id)

    @property
    def revocation_bounds(self) -> dict[str, int]:
        """Every revoked node with a bound, and its bound (invariant 7)."""
        if self._crl is None or not self._crl.upto:
            return {}
        return {n: b for n, b in self._crl.upto.items() if n not in self._local_revoked}

    @property
    def revoked(self) -> frozenset[str]:
        """Every node id refused as revoked: the list's and the local ones."""
        return self._revoked

    def check(self, node_id: str, now_ms: int, seq: int | None = None) -> Certificate:
        """The certificate under which ``node_id`` may write at ``now_ms`` (its envelope
        ``seq``, if one is judged: invariant 7), or raise."""
        if node_id in self._revoked:
            bound = self.revocation_bound(node_id)
            if seq is None or bound is None or seq > bound:
                kept = "" if bound is None else f" (the store keeps its seqs up to {bound})"
                raise RevokedCertificate(f"node {node_id!r} is revoked{kept}")
        cert = self._certs.get(node_id)
        if cert is None:
            raise NotEnrolled(f"node {node_id!r} holds no certificate for store {self.store_id!r}")
        if now_ms > cert.not_after:
            raise ExpiredCertificate(
                f"certificate of node {node_id!r} expired at {cert.not_after} ms (now {now_ms})"
            )
        return cert

    def certificate(self, node_id: str) -> Certificate | None:
        return self._certs.get(node_id)

    def certificates_since(self, version: int) -> list[Certificate]:
        """The certificates that arrived (or replaced one held) after ``version``: what a
        peer that held everything we held at ``version`` may lack."""
        return sorted((self._certs[n] for n, at in self._cert_at.items() if at > version),
                      key=lambda c: c.node_id)

    def certificates(self) -> list[Certificate]:
        return sorted(self._certs.values(), key=lambda c: c.node_id)

    def to_dict(self) -> dict[str, Any]:
        return {
            "store_id": self.store_id,
            "store_public_key": self.store_public_key.hex(),
            "certificates": [c.to_dict() for c in self.certificates()],
            "crl": None if self._crl is None else self._crl.to_dict(),
            "revoked_local": sorted(self._local_revoked),
            "roster": None if self._roster is None else self._roster.to_dict(),
            # only when set: a trust store without one reads as before (older files)
            **({} if self.checkpointer is None else {"checkpointer": self.checkpointer}),
        }

    @classmethod
    def from_dict(cls, d: object) -> TrustStore:
        """Rebuild from ``to_dict`` output, re-verifying every signature (the file may have
        been tampered with). Raises ``Malformed``, ``BadSignature`` or ``WrongStore``."""
        checkpointer: str | None = None
        if isinstance(d, dict) and d.keys() - _TRUST_KEYS <= _TRUST_OPTIONAL:
            roster_doc = d.get("roster")
            if d.get("checkpointer") is not None:
                checkpointer = _ident(d["checkpointer"], "trust store checkpointer")
            d = {k: v for k, v in d.items() if k in _TRUST_KEYS}
        else:
            roster_doc = None
        f = _fields(d, _TRUST_KEYS, "trust store")
        trust = cls(
            _ident(f["store_id"], "trust store store_id"),
            _hex(f["store_public_key"], _KEY_LEN, "trust store store_public_key"),
            checkpointer=checkpointer,
        )
        certs, local = f["certificates"], f["revoked_local"]
        if not isinstance(certs, list) or not isinstance(local, list):
            raise Malformed("trust store certificates and revoked_local must be lists")
        for c in certs:
            trust.add_certificate(Certificate.from_dict(c))
        if f["crl"] is not None:
            trust.apply_revocations(RevocationList.from_dict(f["crl"]))
        for node_id in local:
            trust.revoke(_ident(node_id, "locally revoked node id"))
        if roster_doc is not None:
            from mesh.core.auth import Roster  # (mesh.core.auth builds on this module)

            try:
                roster = Roster.from_dict(roster_doc)
            except ValueError as exc:
                raise Malformed(f"trust store roster: {exc}") from None
            trust.apply_roster(roster)
        return trust

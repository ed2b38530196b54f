"""A node's data directory: its key, its certificate, what it trusts, its ledger.

Layout::

    DIR/node.key        Ed25519 private key of this node (mode 0600)
    DIR/store.key       the store key, only on the node that enrols others (mode 0600)
    DIR/node.json       node id, store id, role, certificate and trust store
    DIR/ledger.sqlite   the durable ledger (mesh.store.ledger)
    DIR/config.json     how ``storemesh node`` runs here (peers, cloud, ports): ``NodeConfig``
    DIR/node.lock       held (flock) by the one process that runs this node: ``DataDirLock``
    DIR/tls-ca.pem, DIR/tls-node.pem, DIR/tls-node.key (0600)
                        the store CA and this node's TLS certificate and key (``mesh.net.tls``)
    DIR/revocations.json  the store's signed revocation list, on the edge that revokes
                        (mesh.store.revoke); applied on load

Invariants:
 1. ``node.json`` and ``config.json`` are replaced atomically (write to a temp file,
    fsync, rename), so a crash leaves the old or the new file, never half of one.
 2. Loading re-verifies every certificate against the store key: a tampered file is
    refused, not trusted.
 3. At most one process runs a data directory: it holds an exclusive ``flock`` on
    ``node.lock`` for its whole life (the kernel drops it when the process dies, even
    by SIGKILL, so there is no stale lock to clean up). A second process is refused
    with the first one's pid. Two processes on one node key would sign different
    envelopes for the same seq (equivocation) and fight over every peer session.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Final

import orjson

from mesh import config
from mesh.core.identity import (
    Certificate,
    NodeKey,
    TrustStore,
    issue_certificate,
    renew_certificate,
)
from mesh.errors import EnvelopeError

if TYPE_CHECKING:  # mesh.net.tls (aiohttp, x509) is imported where used: load_identity needs none
    from mesh.net.tls import TlsFiles

__all__ = ["DEFAULT_VALIDITY_MS", "DataDirInUse", "DataDirLock", "NodeIdentity", "check_id",
           "enrol_node", "ensure_tls", "init_store", "issue_tls", "load_identity",
           "lock_data_dir", "write_atomic"]

#: Store ids and node ids: they become directory names (the cloud keeps one per store),
#: URL path segments (``/stores/STORE``) and mDNS labels, so no spaces, slashes or dots
#: first. The same rule as ``POST /v1/join``'s ``node_id``.
_ID: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def check_id(value: str, what: str) -> None:
    """Raise ``ValueError`` with a one-line fix unless ``value`` is a valid id."""
    if not value or len(value) > config.MAX_ID_LEN or not _ID.fullmatch(value):
        raise ValueError(
            f"{what} {value!r} is not valid: use 1..{config.MAX_ID_LEN} characters of "
            "A-Z a-z 0-9 . _ - starting with a letter or digit (e.g. 'berlin-mitte')")


#: Certificates issued by ``store init`` / join tokens are valid for a year; the edge
#: renews them (``mesh.driver`` invariant 8; a revoked node is refused whatever its
#: expiry).
DEFAULT_VALIDITY_MS = config.CERT_VALIDITY_MS
_SAVE_LOCK = threading.Lock()
LOCK_FILE = "node.lock"


class DataDirInUse(Exception):
    """Another process runs this data directory (invariant 3)."""

    def __init__(self, data_dir: Path, pid: int | None) -> None:
        who = f"storemesh process {pid}" if pid else "another process"
        super().__init__(f"{data_dir} is in use by {who}: stop it first (one process per "
                         "data directory)")
        self.data_dir = data_dir
        self.pid = pid


class DataDirLock:
    """This process's hold on a data directory (invariant 3). Re-entrant within the
    process (the CLI holds it around a join and the node's own start takes it again);
    the file lock goes when the last holder releases it, or when the process ends."""

    _held: ClassVar[dict[Path, tuple[int, int]]] = {}  # resolved dir -> (fd, holders)
    _guard: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = Path(data_dir)
        self._key = self.data_dir.resolve()
        self._released = False
        with self._guard:
            held = self._held.get(self._key)
            if held is not None:
                self._held[self._key] = (held[0], held[1] + 1)
                return
            self.data_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.data_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                pid = _read_pid(fd)
                os.close(fd)
                raise DataDirInUse(self.data_dir, pid) from None
            except BaseException:
                os.close(fd)
                raise
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)  # for the refusal message only
            self._held[self._key] = (fd, 1)

    def release(self) -> None:
        with self._guard:
            if self._released:
                return
            self._released = True
            fd, holders = self._held[self._key]
            if holders > 1:
                self._held[self._key] = (fd, holders - 1)
                return
            del self._held[self._key]
            os.close(fd)  # drops the flock; the file stays (removing it would race)

    def __enter__(self) -> DataDirLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _read_pid(fd: int) -> int | None:
    try:
        return int(os.pread(fd, 32, 0).decode().strip() or 0) or None
    except (OSError, ValueError):
        return None


def lock_data_dir(data_dir: Path) -> DataDirLock:
    """Hold ``data_dir`` for this process, or raise ``DataDirInUse`` (invariant 3)."""
    return DataDirLock(data_dir)


@dataclass(slots=True)
class NodeIdentity:
    data_dir: Path
    node_id: str
    store_id: str
    role: str
    key: NodeKey
    certificate: Certificate
    trust: TrustStore
    store_key: NodeKey | None = None
    #: How long certificates this node issues are valid (``storemesh node
    #: --cert-validity`` on the edge; tokens redeemed here and renewals).
    validity_ms: int = DEFAULT_VALIDITY_MS

    @property
    def ledger_path(self) -> Path:
        return self.data_dir / "ledger.sqlite"

    # --- renewal (``mesh.ports.Identity`` / ``Issuer``; mesh.driver invariant 8) -------

    @property
    def issuer(self) -> NodeIdentity | None:
        """This node renews certificates if it holds the store key (the edge)."""
        if self.store_key is None or self.store_key.public_key != self.trust.store_public_key:
            return None
        return self

    def renew(self, cert: Certificate, now_ms: int) -> tuple[Certificate, str | None]:
        """``cert`` renewed for ``validity_ms``, with a TLS certificate to match."""
        from mesh.net.tls import issue_node_cert

        assert self.store_key is not None
        new = renew_certificate(self.store_key, cert, now_ms=now_ms,
                                validity_ms=self.validity_ms)
        pem = issue_node_cert(self.store_key, store_id=new.store_id, node_id=new.node_id,
                              public_key=new.public_key, not_after_ms=new.not_after,
                              now_ms=now_ms)
        return new, pem.decode("ascii")

    def write_tls(self, pem: str) -> bool:
        """Install a renewed TLS certificate for this node: it must be the store CA's,
        for this node and key, and outlast the one in place (``ValueError`` if not).
        Written atomically; ``False`` if it is not newer (a repeat)."""
        from cryptography import x509

        from mesh.net.tls import CA_FILE, CERT_FILE, check_node_cert, write_file

        data = pem.encode("ascii", "replace")
        ca = (self.data_dir / CA_FILE).read_bytes()
        check_node_cert(ca, data, store_id=self.store_id, node_id=self.node_id,
                        public_key=self.key.public_key)
        path = self.data_dir / CERT_FILE
        with contextlib.suppress(FileNotFoundError, ValueError):
            held = x509.load_pem_x509_certificate(path.read_bytes())
            new = x509.load_pem_x509_certificate(data)
            if new.not_valid_after_utc <= held.not_valid_after_utc:
                return False
        write_file(path, data, 0o644)
        return True

    def _own_certificate(self) -> None:
        """Follow a renewed certificate of ours that the trust store holds (from the
        edge, or issued here): the handshake presents ``certificate``."""
        held = self.trust.certificate(self.node_id)
        if (held is not None and held.public_key == self.key.public_key
                and held.not_after > self.certificate.not_after):
            self.certificate = held

    def save(self) -> None:
        """Write node.json atomically (invariant 1)."""
        self.write(self.encode())

    def encode(self) -> bytes:
        """node.json's bytes now: taken on the thread that changes the trust store (the
        event loop), so ``write`` may run on another thread (the ledger's writer)."""
        self._own_certificate()
        doc: dict[str, Any] = {
            "node_id": self.node_id,
            "store_id": self.store_id,
            "role": self.role,
            "certificate": self.certificate.to_dict(),
            "trust": self.trust.to_dict(),
        }
        return orjson.dumps(doc, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS)

    def write(self, data: bytes) -> None:
        """Replace node.json with ``data`` (from ``encode``) atomically (invariant 1)."""
        with _SAVE_LOCK:  # saves may come from several threads (join, sync core)
            write_atomic(self.data_dir / "node.json", data)


def write_atomic(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data``: temp file, fsync, rename, fsync of the directory
    (invariant 1), so a crash leaves the old file or the new one."""
    tmp = path.with_suffix(f"{path.suffix}.{os.getpid()}.{threading.get_ident()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def init_store(
    data_dir: Path, store_id: str, *, now_ms: int, node_id: str | None = None,
    validity_ms: int = DEFAULT_VALIDITY_MS,
) -> NodeIdentity:
    """Create a store key and the store's first node (an edge node) in ``data_dir``."""
    check_id(store_id, "store id")
    if node_id is not None:
        check_id(node_id, "node id")
    data_dir.mkdir(parents=True, exist_ok=True)
    if (data_dir / "node.json").exists():
        raise FileExistsError(f"{data_dir} already holds a node; use another directory")
    store_key = NodeKey.load_or_create(data_dir / "store.key")
    key = NodeKey.load_or_create(data_dir / "node.key")
    node_id = node_id or f"edge-{key.fingerprint[:8]}"
    # The store's first edge proposes its checkpoints, for the store's whole life
    # (``TrustStore.checkpointer``): every node enrolled later copies its trust store.
    trust = TrustStore(store_id, store_key.public_key, checkpointer=node_id)
    return enrol_node(
        data_dir, store_key, store_id, "edge", now_ms=now_ms, node_id=node_id,
        validity_ms=validity_ms, keep_store_key=True, trust=trust,
    )


def enrol_node(
    data_dir: Path, store_key: NodeKey, store_id: str, role: str, *, now_ms: int,
    node_id: str | None = None, validity_ms: int = DEFAULT_VALIDITY_MS,
    keep_store_key: bool = False, trust: TrustStore | None = None,
    checkpointer: str | None = None,
) -> NodeIdentity:
    """Create (or reuse) the node key in ``data_dir`` and enrol it with ``store_key``.

    This is the local path (the store owner's machine, tests). Over the network, a
    register joins with a one-time token instead and receives the same certificate
    and the edge's trust store, which names the store's checkpointer. Here, a new
    trust store names ``checkpointer`` (the store's first edge: ``init_store``'s node
    id); pass ``trust`` (the edge's) or ``checkpointer`` so the node counts the
    store's checkpoints.
    """
    data_dir.mkdir(parents=True, exist_ok=True)
    key = NodeKey.load_or_create(data_dir / "node.key")
    node_id = node_id or f"{role}-{key.fingerprint[:8]}"
    cert = issue_certificate(
        store_key, node_id=node_id, store_id=store_id, role=role,
        public_key=key.public_key, not_after=now_ms + validity_ms,
    )
    trust = trust or TrustStore(store_id, store_key.public_key, checkpointer=checkpointer)
    trust.add_certificate(cert)
    ident = NodeIdentity(data_dir, node_id, store_id, role, key, cert, trust,
                         store_key if keep_store_key else None)
    issue_tls(ident, store_key, now_ms=now_ms)
    ident.save()
    return ident


def issue_tls(ident: NodeIdentity, store_key: NodeKey, *, now_ms: int) -> TlsFiles:
    """Write ``ident``'s TLS files: the store CA and a certificate for its node key, both
    signed by ``store_key``, valid as long as its storemesh certificate."""
    from mesh.net.tls import issue_ca, issue_node_cert, write_tls_files

    ca = issue_ca(store_key, ident.store_id, now_ms=now_ms)
    cert = issue_node_cert(store_key, store_id=ident.store_id, node_id=ident.node_id,
                           public_key=ident.key.public_key,
                           not_after_ms=ident.certificate.not_after, now_ms=now_ms)
    return write_tls_files(ident.data_dir, ident.key, ca, cert)


def ensure_tls(ident: NodeIdentity, *, now_ms: int) -> TlsFiles:
    """This node's TLS files, checked; a node holding the store key (the edge made by
    ``store init``) issues them for itself if they are missing or stale. Raises
    ``FileNotFoundError`` / ``ValueError`` with what to do."""
    from mesh.net.tls import load_tls_files

    try:
        return load_tls_files(ident.data_dir, ident.key, store_id=ident.store_id,
                              node_id=ident.node_id,
                              store_public_key=ident.trust.store_public_key)
    except (FileNotFoundError, ValueError):
        if ident.store_key is None or ident.store_key.public_key != \
                ident.trust.store_public_key:
            raise
        return issue_tls(ident, ident.store_key, now_ms=now_ms)


def load_identity(data_dir: Path) -> NodeIdentity:
    """Load a node's identity; raises FileNotFoundError with a hint if there is none."""
    path = data_dir / "node.json"
    if not path.exists():
        raise FileNotFoundError(
            f"{data_dir} holds no node (no node.json): run 'storemesh store init' or join "
            "with a token first"
        )
    try:
        doc = orjson.loads(path.read_bytes())
        cert = Certificate.from_dict(doc["certificate"])
        trust = TrustStore.from_dict(doc["trust"])
        trust.add_certificate(cert)
        node_id, store_id, role = doc["node_id"], doc["store_id"], doc["role"]
    except (orjson.JSONDecodeError, KeyError, TypeError, EnvelopeError) as exc:
        raise ValueError(f"{path} is damaged ({type(exc).__name__}: {exc}): restore it from "
                         "a backup") from None
    key = NodeKey.load_or_create(data_dir / "node.key")
    from mesh.store.revoke import load_revocations  # (mesh.store.revoke imports this module)

    crl = load_revocations(data_dir, trust)  # the edge's own list (mesh.store.revoke inv. 3)
    if crl is not None:
        trust.apply_revocations(crl)
    if cert.public_key != key.public_key:
        raise ValueError(f"{data_dir}: node.key does not match the certificate in node.json")
    store_key_path = data_dir / "store.key"
    store_key = NodeKey.load_or_create(store_key_path) if store_key_path.exists() else None
    return NodeIdentity(data_dir, node_id, store_id, role, key, cert, trust, store_key)

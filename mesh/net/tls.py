"""TLS on every link: the store key is the store's X.509 certificate authority.

Files in a node's data directory (written by ``write_tls_files``)::

    DIR/tls-ca.pem     the store CA certificate: self-signed by the store key (pinned)
    DIR/tls-node.pem   this node's certificate, signed by the store key
    DIR/tls-node.key   this node's TLS private key, PEM (mode 0600)

The TLS key IS the node's Ed25519 key (``node.key``): TLS 1.3 with OpenSSL signs with
Ed25519, and a handshake then costs about what an ECDSA one does (docs/security.md). So
the key a TLS session proves is the very key in the node's storemesh ``Certificate``,
and the sync handshake checks that they are the same (``check_binding``).

Invariants:

1. Only the store CA is trusted: contexts are built empty (no system CA paths) and
   load ``tls-ca.pem`` only. A certificate from any public CA, or another store's CA,
   fails the handshake.
2. TLS 1.3 only (``minimum_version``): no downgrade, no renegotiation.
3. A node certificate names its store and node in a URI SAN
   (``urn:storemesh:<store>:<node>``, both percent-encoded) and carries the node's own
   Ed25519 public key; ``peer_identity`` reads both back from the DER bytes.
4. A listener accepts a connection only after a TLS handshake; a handshake that fails
   (plain text, a certificate of another CA, a timeout) closes the connection and is
   counted by reason through ``on_refuse``, never raised. A TLS record that fails its
   integrity check on a live connection ends the connection and is counted as
   ``tls_record_error``.
5. Every task a ``TlsSite`` starts belongs to it and is cancelled on ``stop``.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import ipaddress
import logging
import os
import re
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final
from urllib.parse import quote, unquote

from aiohttp import web
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from mesh import config
from mesh.core.identity import NodeKey

__all__ = [
    "CA_FILE",
    "CERT_FILE",
    "KEY_FILE",
    "PeerIdentity",
    "TlsFiles",
    "TlsSite",
    "api_client_context",
    "cert_fingerprint",
    "client_context",
    "is_loopback_host",
    "issue_ca",
    "issue_node_cert",
    "load_tls_files",
    "peer_identity",
    "server_context",
    "sni_name",
    "write_file",
    "write_tls_files",
]

log = logging.getLogger(__name__)

CA_FILE: Final = "tls-ca.pem"
CERT_FILE: Final = "tls-node.pem"
KEY_FILE: Final = "tls-node.key"
_URN: Final = "urn:storemesh:"
#: The store CA certificate outlives every node certificate it signs (a year each,
#: renewed); ten years is the store's lifetime. Its key is the store key, so
#: re-issuing it (same key) keeps every node certificate valid.
CA_VALIDITY: Final = dt.timedelta(days=3650)
#: Node certificates start this long before they are issued: registers' clocks drift.
_BACKDATE: Final = dt.timedelta(hours=1)
_HOSTNAME: Final = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
                              r"(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*")


def _crypto_key(key: NodeKey) -> Ed25519PrivateKey:
    return Ed25519PrivateKey.from_private_bytes(key.private_bytes())


def _ca_name(store_id: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "storemesh store CA"),
                      x509.NameAttribute(NameOID.ORGANIZATION_NAME, store_id)])



def build_ca(key: Any, name: x509.Name, now: dt.datetime,
             algorithm: hashes.SHA256 | None) -> x509.Certificate:
    """A self-signed CA certificate for ``key`` (the store CA: Ed25519, ``algorithm``
    None; the cloud's HQ CA: P-256 with SHA-256), valid ``CA_VALIDITY``, signing only
    certificates one level down."""
    return (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - _BACKDATE).not_valid_after(now + CA_VALIDITY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, key_cert_sign=True,
                                         crl_sign=True, encipher_only=False,
                                         decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                           critical=False)
            .sign(key, algorithm))

def issue_ca(store_key: NodeKey, store_id: str, *, now_ms: int) -> bytes:
    """The store's CA certificate (PEM): self-signed by the store key."""
    now = dt.datetime.fromtimestamp(now_ms / 1000, dt.UTC)
    priv = _crypto_key(store_key)
    name = _ca_name(store_id)
    cert = build_ca(priv, name, now, None)
    return cert.public_bytes(serialization.Encoding.PEM)


def node_uri(store_id: str, node_id: str) -> str:
    return f"{_URN}{quote(store_id, safe='')}:{quote(node_id, safe='')}"


def issue_node_cert(store_key: NodeKey, *, store_id: str, node_id: str, public_key: bytes,
                    not_after_ms: int, now_ms: int) -> bytes:
    """A node's TLS certificate (PEM) for its Ed25519 ``public_key``, signed by the store
    key, valid until ``not_after_ms`` (its storemesh certificate's expiry)."""
    now = dt.datetime.fromtimestamp(now_ms / 1000, dt.UTC)
    until = dt.datetime.fromtimestamp(not_after_ms / 1000, dt.UTC)
    priv = _crypto_key(store_key)
    names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(node_uri(store_id,
                                                                            node_id))]
    if _HOSTNAME.fullmatch(node_id):
        # so that ``curl --cacert ca.pem --resolve NODE:PORT:IP https://NODE:PORT`` works
        names.append(x509.DNSName(node_id.lower()))
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, node_id[:64]),
                                     x509.NameAttribute(NameOID.ORGANIZATION_NAME,
                                                        store_id)]))
            .issuer_name(_ca_name(store_id))
            .public_key(Ed25519PublicKey.from_public_bytes(public_key))
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _BACKDATE).not_valid_after(until)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, key_cert_sign=False,
                                         crl_sign=False, encipher_only=False,
                                         decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                  ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                priv.public_key()), critical=False)
            .sign(priv, None))
    return cert.public_bytes(serialization.Encoding.PEM)


def cert_fingerprint(pem_or_der: bytes) -> str:
    """SHA-256 (hex) of a certificate's DER bytes: the pin carried in join tokens."""
    if pem_or_der.startswith(b"-----BEGIN"):
        pem_or_der = x509.load_pem_x509_certificate(pem_or_der).public_bytes(
            serialization.Encoding.DER)
    return hashlib.sha256(pem_or_der).hexdigest()


@dataclass(frozen=True, slots=True)
class PeerIdentity:
    """Who a TLS certificate names (invariant 3)."""

    store_id: str
    node_id: str
    public_key: bytes


def peer_identity(der: bytes) -> PeerIdentity | None:
    """Store, node and Ed25519 key a node certificate names; None if it names none."""
    try:
        cert = x509.load_der_x509_certificate(der)
        pub = cert.public_key()
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (ValueError, x509.ExtensionNotFound):
        return None
    if not isinstance(pub, Ed25519PublicKey):
        return None
    for uri in san.get_values_for_type(x509.UniformResourceIdentifier):
        if uri.startswith(_URN) and uri.count(":") == 3:
            store, node = uri[len(_URN):].split(":")
            raw = pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
            return PeerIdentity(unquote(store), unquote(node), raw)
    return None


def ca_public_key(ca_pem: bytes) -> bytes:
    """Raw Ed25519 public key of a CA certificate (to compare with the store key)."""
    pub = x509.load_pem_x509_certificate(ca_pem).public_key()
    if not isinstance(pub, Ed25519PublicKey):
        raise ValueError("the store CA certificate does not hold an Ed25519 key")
    return pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def check_node_cert(ca_pem: bytes, cert_pem: bytes, *, store_id: str, node_id: str,
                    public_key: bytes) -> None:
    """Raise ``ValueError`` unless ``cert_pem`` is signed by ``ca_pem``'s key and names
    this store, node and key (a joiner checks what the edge sent; a node its files)."""
    try:
        ca = x509.load_pem_x509_certificate(ca_pem)
        cert = x509.load_pem_x509_certificate(cert_pem)
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature) as exc:
        raise ValueError(f"the TLS certificate is not issued by the store CA ({exc})") from None
    who = peer_identity(cert.public_bytes(serialization.Encoding.DER))
    if who != PeerIdentity(store_id, node_id, public_key):
        raise ValueError(f"the TLS certificate names {who}, not node {node_id!r} of store "
                         f"{store_id!r} with this node's key")


# --- files -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TlsFiles:
    """Where a node's TLS material is, and the CA certificate itself."""

    data_dir: Path
    ca_pem: bytes
    cert_pem: bytes

    @property
    def ca_path(self) -> Path:
        return self.data_dir / CA_FILE

    @property
    def cert_path(self) -> Path:
        return self.data_dir / CERT_FILE

    @property
    def key_path(self) -> Path:
        return self.data_dir / KEY_FILE

    @property
    def fingerprint(self) -> str:
        """SHA-256 of this node's certificate (what a join token pins)."""
        return cert_fingerprint(self.cert_pem)


def write_file(path: Path, data: bytes, mode: int) -> None:
    """Replace ``path`` with ``data`` created with ``mode`` (temp file, fsync, rename)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, mode)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def write_tls_files(data_dir: Path, key: NodeKey, ca_pem: bytes, cert_pem: bytes) -> TlsFiles:
    """Write the CA, the node certificate and the node key as PEM (key: mode 0600)."""
    key_pem = _crypto_key(key).private_bytes(serialization.Encoding.PEM,
                                             serialization.PrivateFormat.PKCS8,
                                             serialization.NoEncryption())
    write_file(data_dir / KEY_FILE, key_pem, 0o600)
    write_file(data_dir / CA_FILE, ca_pem, 0o644)
    write_file(data_dir / CERT_FILE, cert_pem, 0o644)
    dfd = os.open(data_dir, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
    return TlsFiles(data_dir, ca_pem, cert_pem)


def load_tls_files(data_dir: Path, key: NodeKey, *, store_id: str, node_id: str,
                   store_public_key: bytes) -> TlsFiles:
    """Read and check a node's TLS files; ``FileNotFoundError`` / ``ValueError`` say
    what is wrong and what to do."""
    try:
        ca_pem = (data_dir / CA_FILE).read_bytes()
        cert_pem = (data_dir / CERT_FILE).read_bytes()
        mode = (data_dir / KEY_FILE).stat().st_mode & 0o777
    except FileNotFoundError:
        raise FileNotFoundError(
            f"{data_dir} holds no TLS certificate ({CA_FILE}, {CERT_FILE}, {KEY_FILE}): it "
            "was enrolled by a storemesh without TLS. Join again with a new token, or run "
            "it with --insecure-plaintext on 127.0.0.1 for development") from None
    if mode & 0o077:
        raise ValueError(f"{data_dir / KEY_FILE} has mode {mode:04o}: group/others may read "
                         f"it, so it is not used. Fix: chmod 600 {data_dir / KEY_FILE}")
    if ca_public_key(ca_pem) != store_public_key:
        raise ValueError(f"{data_dir / CA_FILE} is not the CA of this store's key")
    check_node_cert(ca_pem, cert_pem, store_id=store_id, node_id=node_id,
                    public_key=key.public_key)
    return TlsFiles(data_dir, ca_pem, cert_pem)


# --- contexts ----------------------------------------------------------------------------


def _base(purpose: int, ca_pem: bytes) -> ssl.SSLContext:
    ctx = ssl.SSLContext(purpose)  # no load_default_certs: invariant 1
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3  # invariant 2
    if ca_pem:  # empty: trusts nothing yet (a caller adds CAs later)
        ctx.load_verify_locations(cadata=ca_pem.decode("ascii"))
    return ctx


def server_context(files: TlsFiles) -> ssl.SSLContext:
    """A listener's context. Client certificates are optional at the TLS layer, so POS
    clients (which pin the CA but hold no node certificate) can use the API on the same
    port; ``/v1/sync`` refuses a session without one (``mesh.net.transport``). A client
    certificate that is offered must chain to the store CA, or the handshake fails."""
    ctx = _base(ssl.PROTOCOL_TLS_SERVER, files.ca_pem)
    ctx.load_cert_chain(files.cert_path, files.key_path)
    ctx.verify_mode = ssl.CERT_OPTIONAL
    return ctx


def client_context(files: TlsFiles) -> ssl.SSLContext:
    """A dialer's context: pins the store CA and presents this node's certificate. The
    node id is checked after the handshake (``peer_identity``), not as a host name:
    nodes are reached by LAN address."""
    ctx = _base(ssl.PROTOCOL_TLS_CLIENT, files.ca_pem)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_cert_chain(files.cert_path, files.key_path)
    return ctx


def api_client_context(ca_pem: bytes) -> ssl.SSLContext:
    """What a till or the CLI uses: trusts only the store CA (``storemesh store ca``)."""
    ctx = _base(ssl.PROTOCOL_TLS_CLIENT, ca_pem)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def sni_name(store_id: str) -> str:
    """The TLS server name a node sends to the cloud to pick its store's certificate:
    a DNS-safe label derived from the store id (the cloud maps it back)."""
    return f"s-{hashlib.sha256(store_id.encode()).hexdigest()[:32]}.storemesh.invalid"


def check_browser_name(name: str) -> str:
    """A host name browser tills may reach a node by (``--browser-name``): a DNS name,
    not an IP address (browsers send no server name for an IP, so SNI cannot pick the
    browser certificate for one). Lower-cased; ``ValueError`` says what is wrong."""
    text = name.strip().lower().rstrip(".")
    try:
        ipaddress.ip_address(text)
    except ValueError:
        pass
    else:
        raise ValueError(f"browser name {name!r} is an IP address: browsers send no server "
                         "name for one, so it cannot be told apart; use a host name")
    if not _HOSTNAME.fullmatch(text) or len(text) > 253:
        raise ValueError(f"browser name {name!r} is not a DNS host name (letters, digits, "
                         "'-' and dots)")
    return text


def browser_hosts(node_id: str, extra: list[str] | tuple[str, ...] = ()) -> list[str]:
    """The names a node's browser certificate covers: ``localhost`` (a web POS on the
    register itself), ``NODE.local`` (its mDNS name, when the node id is a host label)
    and the ``extra`` names; in that order, without repeats."""
    names = ["localhost"]
    if _HOSTNAME.fullmatch(node_id):
        names.append(f"{node_id.lower()}.local")
    names.extend(check_browser_name(n) for n in extra)
    return list(dict.fromkeys(names))


def is_loopback_host(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# --- the listener -------------------------------------------------------------------------


def classify(exc: BaseException) -> str:
    """The refusal reason for a TLS handshake that failed (invariant 4)."""
    if isinstance(exc, TimeoutError):
        return "tls_handshake_timeout"
    if isinstance(exc, ssl.SSLError):
        reason = (exc.reason or "").upper()
        if reason in ("HTTP_REQUEST", "WRONG_VERSION_NUMBER", "HTTPS_PROXY_REQUEST",
                      "UNSUPPORTED_PROTOCOL", "PACKET_LENGTH_TOO_LONG"):
            return "tls_plaintext"
        if "CERTIFICATE" in reason or "UNKNOWN_CA" in reason:
            return "tls_bad_certificate"
        return "tls_handshake_failed"
    return "tls_aborted"


class _Guard(asyncio.Protocol):
    """Sits between the TLS layer and aiohttp's protocol, to count a connection that
    dies of a TLS error (a record that fails its MAC: bytes changed on the wire)."""

    def __init__(self, inner: asyncio.Protocol, on_refuse: Callable[[str], None]) -> None:
        self.inner = inner
        self.on_refuse = on_refuse
        #: False until the handshake is done: asyncio's TLS layer reports a failed
        #: handshake to us as a lost connection too, and that is counted already.
        self.made = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.made = True
        self.inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self.inner.eof_received()

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.made:
            return
        if isinstance(exc, ssl.SSLError):
            self.on_refuse("tls_record_error")
        self.inner.connection_lost(exc)


class _Handshake(asyncio.Protocol):
    """A fresh TCP connection: upgrade it to TLS, then hand it to aiohttp."""

    def __init__(self, site: TlsSite) -> None:
        self.site = site

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        transport.pause_reading()  # start_tls takes over the bytes from the first one
        self.site._spawn(self._upgrade(transport))

    async def _upgrade(self, transport: asyncio.Transport) -> None:
        site = self.site
        loop = asyncio.get_running_loop()
        assert site._runner.server is not None
        inner = site._runner.server()
        guard = _Guard(inner, site.on_refuse)
        try:
            tls = await loop.start_tls(transport, guard, site.context_for, server_side=True,
                                       ssl_handshake_timeout=config.HANDSHAKE_TIMEOUT_S)
        except asyncio.CancelledError:
            transport.abort()
            raise
        except (OSError, TimeoutError, ssl.SSLError, EOFError) as exc:
            transport.abort()
            log.debug("TLS handshake failed: %r", exc)
            site.on_refuse(classify(exc))
            return
        if tls is None:  # the transport closed during the handshake
            site.on_refuse("tls_aborted")
            return
        guard.connection_made(tls)


class TlsSite(web.BaseSite):
    """An aiohttp site on ``host:port`` whose every connection is TLS (invariant 4).

    Like ``web.TCPSite(ssl_context=...)``, but a failed handshake is counted by reason
    through ``on_refuse`` instead of vanishing into asyncio's debug log."""

    __slots__ = ("_host", "_port", "_tasks", "context_for", "on_refuse", "port_bound")

    def __init__(self, runner: web.BaseRunner, host: str, port: int,
                 context: ssl.SSLContext, on_refuse: Callable[[str], None]) -> None:
        super().__init__(runner)
        self._host = host
        self._port = port
        self.context_for = context
        self.on_refuse = on_refuse
        self.port_bound = 0
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def name(self) -> str:
        return f"https://{self._host}:{self.port_bound or self._port}"

    def _spawn(self, coro: Any) -> None:
        task: asyncio.Task[None] = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def start(self) -> None:
        await super().start()
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _Handshake(self), self._host,
                                                self._port)
        self.port_bound = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await super().stop()


"""Certificates for browsers: ECDSA P-256 from a CA of their own (the cloud's HQ CA; a
store node's browser CA).

Store nodes' TLS certificates are Ed25519, signed by the store key (``mesh.net.tls``); no
browser accepts those (Chromium and Firefox offer no Ed25519 signature algorithm, so
the handshake fails outright, with no "proceed anyway"). The cloud's dashboard and
fleet API are opened in browsers, so the cloud's listener also holds a P-256
certificate, and picks by the TLS server name (SNI):

* a store's node sends ``mesh.net.tls.sni_name(store_id)`` and gets that store's Ed25519
  certificate (mutual TLS pinned to the store key, as before);
* anything else (a browser, curl, ``storemesh status``: no SNI, or a host name) gets
  the HQ certificate.

The HQ certificate is either HQ's own (``cloud run --tls-cert FILE --tls-key FILE``:
from the company's CA or a public one), or made here on first start::

    ROOT/hq-ca.pem, ROOT/hq-ca.key (0600)   the HQ CA: P-256, self-signed, 10 years
    ROOT/hq-tls.pem, ROOT/hq-tls.key (0600) the cloud's certificate, signed by the HQ CA

Invariants:

1. The HQ CA never signs anything a store node trusts: store nodes load only their
   store CA (``mesh.net.tls`` invariant 1), so the HQ key cannot open a sync session or
   stand in for a store's replica.
2. The leaf is valid at most ``LEAF_VALIDITY`` (browsers refuse longer) and names
   every host given (DNS or IP SANs); ``ensure_hq_tls`` issues a new one when it is
   missing, expires within ``RENEW_BEFORE``, is not signed by the CA on disk, or does
   not name a host asked for. The CA is kept as long as it is valid, so a browser that
   trusts it keeps trusting the cloud across renewals.
3. Keys are written with mode 0600, atomically (``mesh.net.tls.write_file``).

A store node serving its API to browser tills (``Node(browser_names=…)``) keeps the same
kind of pair in its data directory (``NODE_FILES``: ``browser-ca.pem``/``.key``,
``browser-tls.pem``/``.key``), its own CA per node: the CA key never leaves the node,
so a stolen register can mint certificates only for itself. The node's listener picks it
by SNI for the names it was made for (``localhost``, ``NODE.local``, ``--browser-name``)
and keeps the Ed25519 store certificate for everything else (no SNI: peers, the CLI).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import socket
import ssl
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from mesh.net.tls import build_ca, write_file

__all__ = ["CA_FILE", "CERT_FILE", "HQ_FILES", "NODE_FILES", "BrowserFiles", "HqTls",
           "ensure_browser_tls", "ensure_hq_tls", "hq_hosts", "hq_server_context",
           "spki_sha256"]


@dataclass(frozen=True, slots=True)
class BrowserFiles:
    """The file names of one browser CA + certificate pair, and the names it signs as."""

    ca: str
    ca_key: str
    cert: str
    key: str
    ca_name: str
    org: str


HQ_FILES: Final = BrowserFiles("hq-ca.pem", "hq-ca.key", "hq-tls.pem", "hq-tls.key",
                               "storemesh HQ CA", "storemesh HQ")
NODE_FILES: Final = BrowserFiles("browser-ca.pem", "browser-ca.key", "browser-tls.pem",
                                 "browser-tls.key", "storemesh node browser CA",
                                 "storemesh store node")
CA_FILE: Final = HQ_FILES.ca
CERT_FILE: Final = HQ_FILES.cert
#: CA/Browser Forum limit for a server certificate (398 days), with a day's margin.
LEAF_VALIDITY: Final = dt.timedelta(days=397)
RENEW_BEFORE: Final = dt.timedelta(days=30)
_BACKDATE: Final = dt.timedelta(hours=1)


@dataclass(frozen=True, slots=True)
class HqTls:
    """Where the cloud's browser-facing certificate and key are; ``ca_path``: the HQ CA
    to trust in browsers and tools (None for a certificate HQ brought itself)."""

    cert_path: Path
    key_path: Path
    ca_path: Path | None


def hq_hosts(http_host: str) -> list[str]:
    """Names the made certificate covers: localhost, 127.0.0.1, the listen address, and
    this machine's host name when the cloud listens on every address."""
    hosts = ["localhost", "127.0.0.1"]
    if http_host in ("0.0.0.0", "::", ""):  # noqa: S104 -- compared, not bound
        hosts.append(socket.gethostname())
    else:
        hosts.append(http_host)
    return list(dict.fromkeys(h.lower() for h in hosts))


def _name(cn: str, org: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn[:64]),
                      x509.NameAttribute(NameOID.ORGANIZATION_NAME, org[:64])])


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _load_ca(root: Path, now: dt.datetime, f: BrowserFiles
             ) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None:
    try:
        cert = x509.load_pem_x509_certificate((root / f.ca).read_bytes())
        key = serialization.load_pem_private_key((root / f.ca_key).read_bytes(), None)
    except (FileNotFoundError, ValueError):
        return None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or cert.not_valid_after_utc <= now \
            or cert.public_key() != key.public_key():
        return None
    return cert, key


def _new_ca(root: Path, now: dt.datetime, f: BrowserFiles
            ) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = _name(f.ca_name, f.org)
    cert = build_ca(key, name, now, hashes.SHA256())
    write_file(root / f.ca_key, _key_pem(key), 0o600)
    write_file(root / f.ca, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    return cert, key


def _leaf_ok(root: Path, ca: x509.Certificate, hosts: Iterable[str], now: dt.datetime,
             f: BrowserFiles) -> bool:
    try:
        cert = x509.load_pem_x509_certificate((root / f.cert).read_bytes())
        key = serialization.load_pem_private_key((root / f.key).read_bytes(), None)
        cert.verify_directly_issued_by(ca)
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (FileNotFoundError, ValueError, TypeError, InvalidSignature,
            x509.ExtensionNotFound):
        return False
    return (cert.public_key() == key.public_key()
            and cert.not_valid_after_utc - RENEW_BEFORE > now
            and all(_san(h) in san for h in hosts))


def ensure_hq_tls(root: Path, hosts: Iterable[str], *, now_ms: int) -> HqTls:
    """The HQ CA and a certificate for ``hosts`` in ``root``, made or renewed as needed
    (invariant 2)."""
    return ensure_browser_tls(root, hosts, now_ms=now_ms, files=HQ_FILES)


def ensure_browser_tls(root: Path, hosts: Iterable[str], *, now_ms: int,
                       files: BrowserFiles) -> HqTls:
    """A browser CA and a certificate for ``hosts`` in ``root`` (file names: ``files``),
    made or renewed as needed (invariant 2)."""
    now = dt.datetime.fromtimestamp(now_ms / 1000, dt.UTC)
    hosts = list(hosts)
    f = files
    root.mkdir(parents=True, exist_ok=True)
    loaded = _load_ca(root, now, f)
    ca, ca_key = loaded if loaded is not None else _new_ca(root, now, f)
    if not _leaf_ok(root, ca, hosts, now, f):
        key = ec.generate_private_key(ec.SECP256R1())
        until = min(now + LEAF_VALIDITY, ca.not_valid_after_utc)
        cert = (x509.CertificateBuilder().subject_name(_name(hosts[0], f.org))
                .issuer_name(ca.subject).public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - _BACKDATE).not_valid_after(until)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None),
                               critical=True)
                .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                               critical=False)
                .add_extension(x509.SubjectAlternativeName([_san(h) for h in hosts]),
                               critical=False)
                .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                    ca_key.public_key()), critical=False)
                .sign(ca_key, hashes.SHA256()))
        write_file(root / f.key, _key_pem(key), 0o600)
        write_file(root / f.cert, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    return HqTls(root / f.cert, root / f.key, root / f.ca)


def hq_server_context(hq: HqTls) -> ssl.SSLContext:
    """The cloud listener's default context: the HQ certificate, TLS 1.3 only, a client
    certificate asked for but optional (a store node's, checked against the store CAs
    the caller loads; browsers send none)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)  # no default CAs (mesh.net.tls invariant 1)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    try:
        ctx.load_cert_chain(hq.cert_path, hq.key_path)
    except (OSError, ssl.SSLError) as exc:
        raise ValueError(f"cannot use the HQ certificate {hq.cert_path} with key "
                         f"{hq.key_path}: {exc}") from None
    ctx.verify_mode = ssl.CERT_OPTIONAL
    return ctx


def spki_sha256(cert_pem: bytes) -> bytes:
    """SHA-256 of a certificate's SubjectPublicKeyInfo (what Chromium's
    ``--ignore-certificate-errors-spki-list`` and HPKP-style pins name, base64)."""
    cert = x509.load_pem_x509_certificate(cert_pem)
    spki = cert.public_key().public_bytes(serialization.Encoding.DER,
                                          serialization.PublicFormat.SubjectPublicKeyInfo)
    digest = hashes.Hash(hashes.SHA256())
    digest.update(spki)
    return digest.finalize()

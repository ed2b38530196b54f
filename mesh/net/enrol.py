"""Enrolment with one-time join tokens: a new register joins with nothing but a token.

The store owner runs ``storemesh token create DIR --role register`` on the machine of the
edge node that holds the store key (``create_token``). The new register is started with
``storemesh node --join TOKEN --data NEWDIR`` (``join``): it makes its node key, finds an
edge node of the token's store (a URL given, the URL in the token, or zeroconf), POSTs the
token and its public key to ``/v1/join`` (``setup_join_routes`` → ``redeem``), checks the
answer against the store key the token pins, and writes its ``node.json``.

Invariants:

1. The edge never stores a token's secret: ``tokens.json`` maps sha256(secret) to the
   token's role, expiry and use. Reading that file (a backup, a support dump) does not
   let anyone join.
2. A token enrols at most one node. Every read-modify-write of ``tokens.json`` holds an
   exclusive ``flock`` on ``tokens.lock`` (the node process redeems while the CLI
   creates), and the token is durably marked used *before* the certificate is saved or
   sent: a crash in between wastes the token, it never lets it enrol twice.
3. ``tokens.json`` is replaced atomically (temp file, fsync, rename, fsync the directory):
   a crash leaves the old or the new file, never half of one.
4. A joining node accepts only a certificate for its own public key, its token's store
   and role, signed by the store key whose SHA-256 the token pins, inside a trust store
   holding that same key: a rogue edge (or a zeroconf impostor) cannot enrol it elsewhere.
5. Remote input (a POST, an edge's answer, a zeroconf advertisement) never crashes the
   receiver: the edge answers 400/403 with a JSON error naming the field and counts the
   refusal in ``node.rejected_sessions["join_<reason>"]``; the joiner raises a typed
   error with a message a person can act on.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import fcntl
import hashlib
import ipaddress
import logging
import os
import re
import secrets
import ssl
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit

import aiohttp
import orjson
from aiohttp import web
from zeroconf import (
    BadTypeInNameException,
    DNSQuestionType,
    InterfaceChoice,
    IPVersion,
    ServiceStateChange,
    Zeroconf,
)
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

from mesh import config
from mesh.core.identity import (
    ROLES,
    Certificate,
    NodeKey,
    TrustStore,
    fingerprint,
    issue_certificate,
)
from mesh.errors import (
    BadSignature,
    CertificateError,
    CommandError,
    EnvelopeError,
    Malformed,
    RevokedCertificate,
)
from mesh.net.discovery import (
    PROTOCOL_VERSION,
    RESOLVE_TIMEOUT_MS,
    SERVICE_TYPE,
    MalformedAdvertisement,
    parse_peer,
)
from mesh.net.tls import (
    ca_public_key,
    check_node_cert,
    is_loopback_host,
    issue_node_cert,
    write_tls_files,
)
from mesh.store.datadir import NodeIdentity, ensure_tls, write_atomic

__all__ = [
    "DEFAULT_TOKEN_TTL_MS",
    "JOIN_PATH",
    "MAX_TOKEN_TTL_MS",
    "TOKEN_PREFIX",
    "JoinRefused",
    "JoinToken",
    "TokenInfo",
    "UntrustedEdge",
    "create_token",
    "find_edge",
    "join",
    "list_tokens",
    "parse_token",
    "redeem",
    "revoke_token",
    "setup_join_routes",
    "store_fingerprint",
    "token_id",
]

log = logging.getLogger(__name__)

TOKEN_PREFIX: Final = "smj2."  # noqa: S105 -- a format tag, not a secret
JOIN_PATH: Final = "/v1/join"
TOKENS_FILE: Final = "tokens.json"
LOCK_FILE: Final = "tokens.lock"
SECRET_LEN: Final = 32
#: Roles that may enrol others (advertised in the zeroconf TXT ``role`` key).
EDGE_ROLES: Final = ("edge",)

_DAY_MS: Final = 24 * 3600 * 1000
# --- bounds (to move into mesh/config.py) -----------------------------------------
#: A token is short-lived: long enough to walk to the new register and start it.
DEFAULT_TOKEN_TTL_MS: Final = 3600 * 1000
#: Longest lifetime a token may be given: a week covers a register shipped to a store,
#: while a token forgotten in a chat log stops working soon.
MAX_TOKEN_TTL_MS: Final = 7 * _DAY_MS
#: Records kept in tokens.json (unused, used and recently expired). A store enrols tens
#: of registers; the bound stops a script gone wrong from growing the file forever.
MAX_TOKENS: Final = 1024
#: How long a used or expired token's record is kept (for "who joined with which token")
#: before ``create_token`` prunes it.
TOKEN_RETENTION_MS: Final = 30 * _DAY_MS
#: Longest edge URL embedded in a token.
MAX_URL_LEN: Final = 512
#: Longest token text accepted (~300 chars in practice, with a URL up to MAX_URL_LEN).
MAX_TOKEN_CHARS: Final = 2048
#: Largest /v1/join request body: a token, a public key and a node id (~500 bytes).
MAX_JOIN_REQUEST_BYTES: Final = 4096
#: Largest /v1/join answer: a certificate plus the trust store (≤ MAX_ORIGINS certs).
MAX_JOIN_ANSWER_BYTES: Final = config.MAX_MESSAGE_BYTES
#: Service names waiting to be resolved while looking for an edge node; more are dropped
#: (they are re-announced) so a LAN flooding us with advertisements cannot grow memory.
MAX_EDGE_CANDIDATES: Final = 64
#: Longest error message from an edge shown to the user.
_MAX_REMOTE_MESSAGE: Final = 500
# ------------------------------------------------------------------------------------

_MAX_INT: Final = (1 << 63) - 1
_B64URL: Final = re.compile(r"[A-Za-z0-9_-]+")
_HEX64: Final = re.compile(r"[0-9a-f]{64}")
#: Node ids a joining node may ask for: printable, no spaces, safe in logs and names.
_NODE_ID: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_TOKEN_KEYS: Final = frozenset({"store", "secret", "role", "exp", "fp", "tls"})
_REQUEST_KEYS: Final = frozenset({"token", "public_key", "node_id"})
_ANSWER_KEYS: Final = frozenset({"node_id", "certificate", "trust", "tls"})


# --- tokens ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class JoinToken:
    """What a join token says: who may join which store, as what, until when, and where."""

    store_id: str
    secret: bytes = field(repr=False)  # never in logs or tracebacks
    role: str
    expires_ms: int
    #: sha256 hex (64 chars) of the store public key; its first 16 chars are the key's
    #: ``fingerprint``. The full hash, because it is all that stops a rogue edge.
    store_fingerprint: str
    #: sha256 hex of the issuing edge's TLS certificate (DER): the joiner talks only to
    #: a TLS server presenting exactly that certificate.
    tls_pin: str
    url: str | None = None

    def encode(self) -> str:
        doc: dict[str, Any] = {
            "store": self.store_id,
            "secret": _b64encode(self.secret),
            "role": self.role,
            "exp": self.expires_ms,
            "fp": self.store_fingerprint,
            "tls": self.tls_pin,
        }
        if self.url is not None:
            doc["url"] = self.url
        return TOKEN_PREFIX + _b64encode(orjson.dumps(doc, option=orjson.OPT_SORT_KEYS))


def store_fingerprint(store_public_key: bytes) -> str:
    """The store key pin carried in tokens: sha256(public key) in hex."""
    return hashlib.sha256(store_public_key).hexdigest()


def token_id(secret: bytes) -> str:
    """sha256(secret) in hex: how tokens.json names a token without holding its secret."""
    return hashlib.sha256(secret).hexdigest()


def _b64encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _check_url(url: str) -> None:
    if (not isinstance(url, str) or len(url) > MAX_URL_LEN
            or not re.fullmatch(r"https?://[^\s/?#]+/?", url)):
        raise ValueError(f"edge URL must look like https://HOST:PORT (at most {MAX_URL_LEN} "
                         f"chars), got {url!r}")


def parse_token(text: str) -> JoinToken:
    """Read a join token as pasted by a person (whitespace and line breaks are ignored).

    Raises ``Malformed`` with a message saying what is wrong and what to do.
    """
    if not isinstance(text, str):
        raise Malformed("not a storemesh join token: expected text starting with 'smj2.'")
    compact = "".join(text.split())
    if not compact:
        raise Malformed("the join token is empty: paste the whole token (it starts 'smj2.')")
    if len(compact) > MAX_TOKEN_CHARS:
        raise Malformed(f"too long for a join token ({len(compact)} chars, at most "
                        f"{MAX_TOKEN_CHARS}): is this the right text?")
    if not compact.startswith(TOKEN_PREFIX):
        version = re.match(r"smj(\d+)\.", compact)
        if version and int(version.group(1)) < 2:
            raise Malformed(f"this join token has format smj{version.group(1)}, made by an "
                            "older storemesh that joins over plain HTTP and pins no TLS "
                            "certificate: this storemesh refuses it. Ask the store owner for "
                            "a new token ('storemesh token create')")
        if version:
            raise Malformed(f"this join token has format smj{version.group(1)}, but this "
                            "storemesh reads only smj2: upgrade storemesh on this machine")
        raise Malformed("not a storemesh join token: it should start with 'smj2.'")
    body = compact[len(TOKEN_PREFIX):]
    if not body:
        raise Malformed("the token is truncated: nothing follows 'smj2.'; copy the whole token")
    if not _B64URL.fullmatch(body):
        raise Malformed("the token holds characters a join token never has (only A-Z a-z "
                        "0-9 - _ after 'smj2.'): was it changed while copying?")
    try:
        doc = orjson.loads(_b64decode(body))
    except ValueError:  # bad base64 length, bad UTF-8, cut-off JSON
        raise Malformed("the token is truncated or damaged: copy the whole token again") from None
    return _token_from_doc(doc)


def _token_from_doc(doc: object) -> JoinToken:
    if not isinstance(doc, dict) or not _TOKEN_KEYS <= doc.keys() <= _TOKEN_KEYS | {"url"}:
        raise Malformed("the token is damaged: its fields are not those of a join token")

    def bad(what: str) -> Malformed:
        return Malformed(f"the token is damaged: {what}; ask the store owner for a new one")

    store, secret, role, exp, fp, pin = (doc[k] for k in ("store", "secret", "role", "exp",
                                                          "fp", "tls"))
    if not isinstance(store, str) or not 0 < len(store) <= config.MAX_ID_LEN:
        raise bad("its store id is not valid")
    if not isinstance(secret, str) or not _B64URL.fullmatch(secret):
        raise bad("its secret is not valid")
    try:
        raw = _b64decode(secret)
    except ValueError:
        raise bad("its secret is not valid") from None
    if len(raw) != SECRET_LEN:
        raise bad(f"its secret is not {SECRET_LEN} bytes")
    if role not in ROLES:
        raise bad(f"its role must be one of {sorted(ROLES)}")
    if type(exp) is not int or not 0 <= exp <= _MAX_INT:
        raise bad("its expiry is not a time")
    if not isinstance(fp, str) or not _HEX64.fullmatch(fp):
        raise bad("its store key fingerprint is not 64 hex chars")
    if not isinstance(pin, str) or not _HEX64.fullmatch(pin):
        raise bad("its TLS certificate pin is not 64 hex chars")
    url = doc.get("url")
    if url is not None:
        try:
            _check_url(url)
        except ValueError as e:
            raise bad(str(e)) from None
    return JoinToken(store, raw, role, exp, fp, pin, url)


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="seconds")


# --- tokens.json (local file, under the lock) ------------------------------------------


@contextlib.contextmanager
def _locked(data_dir: Path) -> Iterator[None]:
    """Hold the exclusive lock on DIR/tokens.lock (invariant 2). flock locks belong to
    the open file, so two threads of one process exclude each other too."""
    fd = os.open(data_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _load_tokens(data_dir: Path) -> dict[str, dict[str, Any]]:
    path = data_dir / TOKENS_FILE
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return {}
    try:
        doc = orjson.loads(raw)
    except ValueError:
        doc = None
    if not isinstance(doc, dict) or not all(isinstance(r, dict) for r in doc.values()):
        raise ValueError(f"{path} is damaged (not a token table): restore it from backup, or "
                         "move it away (its unused tokens then stop working)")
    return doc


def _write_tokens(data_dir: Path, tokens: dict[str, dict[str, Any]]) -> None:
    """Replace tokens.json atomically (invariant 3)."""
    write_atomic(data_dir / TOKENS_FILE,
                 orjson.dumps(tokens, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS))


def create_token(
    identity: NodeIdentity, *, role: str, ttl_ms: int, now_ms: int, url: str | None = None
) -> str:
    """Issue a one-time join token for one node of ``role``; only the store key's holder
    may. ``url`` (the edge's address) is embedded so the joiner need not discover it."""
    store_key = identity.store_key
    if store_key is None:
        raise CommandError(
            f"{identity.data_dir} holds no store key, so node {identity.node_id!r} cannot "
            "issue join tokens: use the data directory of the edge node made by "
            "'storemesh store init'", field="data_dir")
    if store_key.public_key != identity.trust.store_public_key:
        raise CommandError(f"{identity.data_dir}/store.key is not the key of store "
                           f"{identity.store_id!r} named in node.json", field="data_dir")
    if role not in ROLES:
        raise CommandError(f"role must be one of {sorted(ROLES)}, got {role!r}", field="role")
    if type(ttl_ms) is not int or not 0 < ttl_ms <= MAX_TOKEN_TTL_MS:
        raise CommandError(f"a token's lifetime must be 1 ms to {MAX_TOKEN_TTL_MS // _DAY_MS} "
                           f"days, got {ttl_ms} ms", field="ttl")
    if url is not None:
        try:
            _check_url(url)
        except ValueError as e:
            raise CommandError(str(e), field="url") from None
    pin = ensure_tls(identity, now_ms=now_ms).fingerprint
    token = JoinToken(identity.store_id, secrets.token_bytes(SECRET_LEN), role,
                      now_ms + ttl_ms, store_fingerprint(store_key.public_key), pin, url)
    with _locked(identity.data_dir):
        tokens = _load_tokens(identity.data_dir)
        for tid in [t for t, r in tokens.items()
                    if r.get("expires_ms", 0) + TOKEN_RETENTION_MS < now_ms]:
            del tokens[tid]
        if len(tokens) >= MAX_TOKENS:
            raise CommandError(f"{MAX_TOKENS} tokens are outstanding or recent; revoke unused "
                               "ones ('storemesh token revoke') before creating more")
        tokens[token_id(token.secret)] = {
            "role": role, "created_ms": now_ms, "expires_ms": token.expires_ms,
            "used_by": None, "used_ms": None,
        }
        _write_tokens(identity.data_dir, tokens)
    log.info("join token %s created for a %s, expires %s", token_id(token.secret)[:12], role,
             _iso(token.expires_ms))
    return token.encode()


@dataclass(frozen=True, slots=True)
class TokenInfo:
    """One row of tokens.json, safe to show: ``token_id`` is a prefix of sha256(secret)."""

    token_id: str
    role: str
    created_ms: int
    expires_ms: int
    used_by: str | None
    used_ms: int | None

    def state(self, now_ms: int) -> str:
        if self.used_by is not None:
            return "used"
        return "expired" if now_ms > self.expires_ms else "unused"


def list_tokens(data_dir: Path) -> list[TokenInfo]:
    """Tokens issued from ``data_dir``, oldest first (writes are atomic: no lock needed)."""
    rows = [TokenInfo(tid[:12], r.get("role", "?"), r.get("created_ms", 0),
                      r.get("expires_ms", 0), r.get("used_by"), r.get("used_ms"))
            for tid, r in _load_tokens(Path(data_dir)).items()]
    return sorted(rows, key=lambda t: (t.created_ms, t.token_id))


def revoke_token(data_dir: Path, which: str) -> TokenInfo:
    """Withdraw an unused token, named by its text or by a ``token_id`` prefix (≥ 6 hex
    chars, as ``list_tokens`` shows). A redeem of it is then refused as ``unknown``."""
    data_dir = Path(data_dir)
    which = which.strip()
    if which.startswith(TOKEN_PREFIX):
        try:
            prefix = token_id(parse_token(which).secret)
        except Malformed as e:
            raise CommandError(e.message, field="token") from None
    elif re.fullmatch(r"[0-9a-f]{6,64}", which):
        prefix = which
    else:
        raise CommandError("name the token by its text (smj2....) or by its id (6+ hex chars "
                           "from 'storemesh token list')", field="token")
    with _locked(data_dir):
        tokens = _load_tokens(data_dir)
        hits = [t for t in tokens if t.startswith(prefix)]
        if len(hits) != 1:
            raise CommandError(f"{'no' if not hits else 'more than one'} token matches "
                               f"{which[:16]!r}; see 'storemesh token list'", field="token")
        rec = tokens[hits[0]]
        info = TokenInfo(hits[0][:12], rec.get("role", "?"), rec.get("created_ms", 0),
                         rec.get("expires_ms", 0), rec.get("used_by"), rec.get("used_ms"))
        if info.used_by is not None:
            raise CommandError(f"token {info.token_id} was already used by node "
                               f"{info.used_by!r}: revoke that node instead", field="token")
        del tokens[hits[0]]
        _write_tokens(data_dir, tokens)
    log.info("join token %s revoked", info.token_id)
    return info


# --- redeeming (edge side) -------------------------------------------------------------


class JoinRefused(Exception):
    """The edge refused a join. ``reason``: unknown, used, expired, wrong_store,
    not_issuer or bad_request; ``message`` says what to do next."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message


class UntrustedEdge(Exception):
    """The edge's answer does not prove it belongs to the token's store; nothing was
    written but the new node key."""


def _check_node_id(node_id: str) -> None:
    if (not isinstance(node_id, str) or len(node_id) > config.MAX_ID_LEN
            or not _NODE_ID.fullmatch(node_id)):
        raise Malformed(f"node_id must be 1..{config.MAX_ID_LEN} chars of A-Z a-z 0-9 . _ - "
                        "starting with a letter or digit")


def redeem(
    identity: NodeIdentity, *, secret: bytes, public_key: bytes, node_id: str | None,
    now_ms: int,
) -> Certificate:
    """Use the token with ``secret`` to enrol ``public_key``; return its certificate.

    Blocking (file lock, fsync): call it from a worker thread. Raises ``JoinRefused`` for
    a token that is unknown, used or expired, or a node id held by another key or revoked;
    ``Malformed`` for a bad public key or node id.
    """
    store_key = identity.store_key
    if store_key is None:
        raise JoinRefused("not_issuer", f"node {identity.node_id!r} holds no store key and "
                          "cannot enrol nodes: join through the store's first edge node")
    if not isinstance(public_key, bytes) or len(public_key) != 32:
        raise Malformed("public_key must be 32 bytes (an Ed25519 public key)")
    if node_id is not None:
        _check_node_id(node_id)
    tid = token_id(secret)
    with _locked(identity.data_dir):
        tokens = _load_tokens(identity.data_dir)
        rec = _usable(tokens.get(tid), now_ms)
        nid = node_id or f"{rec['role']}-{fingerprint(public_key)[:8]}"
        _check_node_free(identity.trust, nid, public_key, now_ms)
        cert = issue_certificate(store_key, node_id=nid, store_id=identity.store_id,
                                 role=rec["role"], public_key=public_key,
                                 not_after=now_ms + identity.validity_ms)
        rec["used_by"], rec["used_ms"] = nid, now_ms
        _write_tokens(identity.data_dir, tokens)  # used before anything leaves (invariant 2)
        identity.trust.add_certificate(cert)
        identity.save()
    log.info("join token %s enrolled node %s as %s", tid[:12], nid, cert.role)
    return cert


def _usable(rec: dict[str, Any] | None, now_ms: int) -> dict[str, Any]:
    ask_again = "ask the store owner for a new token"
    if rec is None:
        raise JoinRefused("unknown", "this edge node does not know the token: it was revoked "
                          f"or issued by another node; {ask_again}")
    if rec.get("used_by") is not None:
        # when, never by whom: the node id would help an attacker holding a leaked token
        raise JoinRefused("used", f"the token was already used at {_iso(rec['used_ms'])}; a "
                          f"token enrols one node only. If that was not you, tell the store "
                          f"owner. Otherwise {ask_again}")
    if now_ms > rec["expires_ms"]:
        raise JoinRefused("expired", f"the token expired at {_iso(rec['expires_ms'])}; "
                          f"{ask_again}")
    return rec


def _check_node_free(trust: TrustStore, node_id: str, public_key: bytes, now_ms: int) -> None:
    held = trust.certificate(node_id)
    if held is not None and held.public_key != public_key:
        raise JoinRefused("bad_request", f"node id {node_id!r} is enrolled with another key: "
                          "choose another node id")
    try:
        trust.check(node_id, now_ms)
    except RevokedCertificate:
        raise JoinRefused("bad_request", f"node id {node_id!r} is revoked: choose another "
                          "node id") from None
    except CertificateError:
        pass  # not enrolled yet, or expired: both may (re-)join


class _BadRequest(Exception):
    def __init__(self, field: str | None, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.message = message


@dataclass(frozen=True, slots=True)
class _JoinRequest:
    token: JoinToken
    public_key: bytes
    node_id: str | None


def setup_join_routes(app: web.Application, node: Any) -> None:
    """Serve ``POST /v1/join`` for ``node`` (``.identity``, ``.now_ms()``,
    ``.trust_changed()``, ``.rejected_sessions``)."""

    async def post_join(request: web.Request) -> web.Response:
        return await _post_join(node, request)

    app.router.add_post(JOIN_PATH, post_join)


async def _post_join(node: Any, request: web.Request) -> web.Response:
    try:
        req = _parse_join_request(await _read_request(request))
        _check_issuer(node.identity, req.token)
        cert = await asyncio.to_thread(
            redeem, node.identity, secret=req.token.secret, public_key=req.public_key,
            node_id=req.node_id, now_ms=node.now_ms())
    except _BadRequest as e:
        return _refuse(node, request, 400, "bad_request", e.field, e.message)
    except Malformed as e:
        return _refuse(node, request, 400, "bad_request", None, e.message)
    except JoinRefused as e:
        where = "node_id" if e.reason == "bad_request" else "token"
        return _refuse(node, request, 403, e.reason, where, e.message)
    node.trust_changed()
    tls = await asyncio.to_thread(_tls_for, node.identity, cert, node.now_ms())
    answer = {"node_id": cert.node_id, "certificate": cert.to_dict(),
              "trust": node.identity.trust.to_dict(), "tls": tls}
    return web.json_response(answer, dumps=lambda o: orjson.dumps(o).decode())


def _tls_for(identity: NodeIdentity, cert: Certificate, now_ms: int) -> dict[str, str]:
    """The store CA and a TLS certificate for the node just enrolled (its own key)."""
    assert identity.store_key is not None  # redeem refused otherwise
    ca = ensure_tls(identity, now_ms=now_ms).ca_pem
    pem = issue_node_cert(identity.store_key, store_id=cert.store_id, node_id=cert.node_id,
                          public_key=cert.public_key, not_after_ms=cert.not_after,
                          now_ms=now_ms)
    return {"ca": ca.decode("ascii"), "cert": pem.decode("ascii")}


def _refuse(node: Any, request: web.Request, status: int, reason: str, where: str | None,
            message: str) -> web.Response:
    key = f"join_{reason}"
    node.rejected_sessions[key] = node.rejected_sessions.get(key, 0) + 1
    log.info("join from %s refused (%s): %s", request.remote, reason, message)
    body = {"error": {"field": where, "reason": reason, "message": message}}
    return web.json_response(body, status=status, dumps=lambda o: orjson.dumps(o).decode())


async def _read_request(request: web.Request) -> bytes:
    too_big = _BadRequest(None, f"request body over {MAX_JOIN_REQUEST_BYTES} bytes")
    if (request.content_length or 0) > MAX_JOIN_REQUEST_BYTES:
        raise too_big
    body = bytearray()
    async for chunk in request.content.iter_chunked(MAX_JOIN_REQUEST_BYTES):
        body += chunk
        if len(body) > MAX_JOIN_REQUEST_BYTES:
            raise too_big
    return bytes(body)


def _parse_join_request(body: bytes) -> _JoinRequest:
    try:
        doc = orjson.loads(body)
    except ValueError:
        raise _BadRequest(None, "the body must be a JSON object") from None
    if not isinstance(doc, dict):
        raise _BadRequest(None, "the body must be a JSON object")
    unknown = sorted(doc.keys() - _REQUEST_KEYS)
    if unknown:
        raise _BadRequest(unknown[0][:64], f"unknown field; expected {sorted(_REQUEST_KEYS)}")
    for key in ("token", "public_key"):
        if key not in doc:
            raise _BadRequest(key, "missing")
    try:
        token = parse_token(doc["token"])
    except Malformed as e:
        raise _BadRequest("token", e.message) from None
    pk = doc["public_key"]
    if not isinstance(pk, str) or not _HEX64.fullmatch(pk):
        raise _BadRequest("public_key", "must be 64 lowercase hex chars (Ed25519 public key)")
    node_id = doc.get("node_id")
    if node_id is not None:
        try:
            _check_node_id(node_id)
        except Malformed as e:
            raise _BadRequest("node_id", e.message) from None
    return _JoinRequest(token, bytes.fromhex(pk), node_id)


def _check_issuer(identity: NodeIdentity, token: JoinToken) -> None:
    if (token.store_id != identity.store_id
            or token.store_fingerprint != store_fingerprint(identity.trust.store_public_key)):
        raise JoinRefused("wrong_store", f"the token is for store {token.store_id!r} "
                          f"(key {token.store_fingerprint[:16]}), but this edge node belongs "
                          f"to store {identity.store_id!r}; join that store's edge node")


# --- joining (new node side) -----------------------------------------------------------


async def find_edge(store_id: str, *, interface: str | None, timeout_s: float) -> str:
    """URL (``https://host:port``) of the first edge node of ``store_id`` seen on the LAN.

    Raises ``TimeoutError`` if none answers within ``timeout_s``. An advertisement only
    says where to ask; who answers is checked by ``join`` against the token's store key.
    """
    if interface is not None:
        try:
            ipaddress.IPv4Address(interface)
        except ValueError:
            raise ValueError(f"interface must be an IPv4 address of this host, "
                             f"got {interface!r}") from None
    aiozc = AsyncZeroconf(interfaces=[interface] if interface else InterfaceChoice.All,
                          ip_version=IPVersion.V4Only)
    try:
        names: asyncio.Queue[str] = asyncio.Queue(MAX_EDGE_CANDIDATES)

        def on_change(zeroconf: Zeroconf, service_type: str, name: str,
                      state_change: ServiceStateChange) -> None:
            if state_change is not ServiceStateChange.Removed:
                with contextlib.suppress(asyncio.QueueFull):
                    names.put_nowait(name)

        # QM questions, as in mesh.net.discovery: a QU answer goes to just one of several
        # mDNS stacks sharing port 5353 on this host.
        browser = AsyncServiceBrowser(aiozc.zeroconf, SERVICE_TYPE, handlers=[on_change],
                                      question_type=DNSQuestionType.QM)
        try:
            async with asyncio.timeout(timeout_s):
                while True:
                    url = await _edge_url(aiozc, await names.get(), store_id)
                    if url is not None:
                        return url
        except TimeoutError:
            raise TimeoutError(
                f"no edge node of store {store_id!r} was found on the LAN within "
                f"{timeout_s:g} s (zeroconf {SERVICE_TYPE}): check that it runs on this "
                "network, or give its address with --url https://HOST:PORT") from None
        finally:
            await browser.async_cancel()
    finally:
        await aiozc.async_close()


async def _edge_url(aiozc: AsyncZeroconf, name: str, store_id: str) -> str | None:
    try:
        info = AsyncServiceInfo(SERVICE_TYPE, name)
    except BadTypeInNameException:
        return None
    if not await info.async_request(aiozc.zeroconf, RESOLVE_TIMEOUT_MS,
                                    question_type=DNSQuestionType.QM):
        return None
    try:
        peer = parse_peer(info)
    except MalformedAdvertisement as e:
        log.debug("join: ignoring advertisement %r: %s", name, e)
        return None
    if (peer.store_id != store_id or peer.role not in EDGE_ROLES
            or peer.proto != PROTOCOL_VERSION):
        return None
    return peer.url


async def join(
    data_dir: Path, token: str, *, url: str | None = None, interface: str | None = None,
    node_id: str | None = None, timeout_s: float = 10.0, insecure_plaintext: bool = False,
) -> NodeIdentity:
    """Enrol a new node in ``data_dir`` with a join token and return its identity.

    The edge is ``url``, else the token's URL, else found by zeroconf. The node key is
    made first and kept if the join fails, so a retry into the same directory reuses it.
    Raises ``Malformed`` (bad token), ``ValueError`` (bad ``url``/``node_id``/
    ``interface``), ``FileExistsError`` (already a node), ``JoinRefused``,
    ``UntrustedEdge``, ``ConnectionError`` or ``TimeoutError`` (``timeout_s`` bounds
    discovery and the request, each).

    The request goes over TLS to a server that must present exactly the certificate
    the token pins (``tls``); an ``http://`` edge is refused unless
    ``insecure_plaintext`` and the edge is on a loopback address (development).
    """
    data_dir = Path(data_dir)
    parsed = parse_token(token)
    if (data_dir / "node.json").exists():
        raise FileExistsError(f"{data_dir} already holds a node (node.json): join into a new, "
                              "empty directory, or start that node without --join")
    if node_id is not None:
        try:
            _check_node_id(node_id)
        except Malformed as e:
            raise ValueError(e.message) from None
    if url is not None:
        _check_url(url)
    key = await asyncio.to_thread(NodeKey.load_or_create, data_dir / "node.key")
    edge = (url or parsed.url
            or await find_edge(parsed.store_id, interface=interface, timeout_s=timeout_s))
    _check_scheme(edge, insecure_plaintext)
    answer = await _request_join(edge, parsed, key, node_id, timeout_s)
    ident, ca, cert = _identity_from_answer(data_dir, answer, parsed, key, node_id, edge)
    await asyncio.to_thread(write_tls_files, data_dir, key, ca, cert)
    await asyncio.to_thread(ident.save)  # node.json last: it says "joined"
    log.info("joined store %s as %s (%s) via %s", ident.store_id, ident.node_id, ident.role,
             edge)
    return ident


def _check_scheme(edge: str, insecure_plaintext: bool) -> None:
    if edge.startswith("https://"):
        return
    host = edge.split("://", 1)[-1].rsplit(":", 1)[0].strip("[]/")
    if not (insecure_plaintext and is_loopback_host(host)):
        raise ValueError(f"the edge URL {edge} is not https://: a join token travels only "
                         "over TLS (plain HTTP only with --insecure-plaintext on 127.0.0.1)")


async def _request_join(edge: str, token: JoinToken, key: NodeKey, node_id: str | None,
                        timeout_s: float) -> bytes:
    endpoint = edge.rstrip("/") + JOIN_PATH
    body: dict[str, Any] = {"token": token.encode(), "public_key": key.public_key.hex()}
    if node_id is not None:
        body["node_id"] = node_id
    pin: aiohttp.Fingerprint | None = None
    if endpoint.startswith("https://"):
        got = await _server_fingerprint(endpoint, edge, timeout_s)
        if got != token.tls_pin:
            raise _pin_mismatch(edge, got, token)
        pin = aiohttp.Fingerprint(bytes.fromhex(token.tls_pin))  # and on the request itself
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout_s)) as http,
            http.post(endpoint, data=orjson.dumps(body), ssl=pin if pin is not None else True,
                      headers={"Content-Type": "application/json"}) as resp,
        ):
            status = resp.status
            data = bytearray()
            async for chunk in resp.content.iter_chunked(64 * 1024):
                data += chunk
                if len(data) > MAX_JOIN_ANSWER_BYTES:
                    raise UntrustedEdge(f"{endpoint} sent over {MAX_JOIN_ANSWER_BYTES} bytes")
    except TimeoutError:
        raise TimeoutError(f"the edge node at {edge} did not answer within {timeout_s:g} s"
                           ) from None
    except aiohttp.ServerFingerprintMismatch as e:  # it changed since the probe
        raise _pin_mismatch(edge, e.got.hex(), token) from None
    except aiohttp.ClientError as e:
        raise ConnectionError(f"could not reach the edge node at {edge} ({e}): check the "
                              "address and that the node runs") from None
    if status == 200:
        return bytes(data)
    if status in (400, 403):
        reason, message = _remote_error(bytes(data))
        raise JoinRefused(reason if status == 403 else "bad_request", message)
    raise ConnectionError(f"{endpoint} answered HTTP {status}: is {edge} a storemesh edge node?")


async def _server_fingerprint(endpoint: str, edge: str, timeout_s: float) -> str:
    """SHA-256 (hex) of the certificate the TLS server at ``endpoint`` presents. A TLS
    handshake only: nothing is sent, and the connection is aborted at once (so a wrong
    server costs no lingering TLS shutdown, as aiohttp's own pin check leaves one)."""
    url = urlsplit(endpoint)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # the pin decides, not a CA
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    try:
        async with asyncio.timeout(timeout_s):
            _, writer = await asyncio.open_connection(url.hostname, url.port or 443, ssl=ctx)
    except TimeoutError:
        raise TimeoutError(f"the edge node at {edge} did not answer within {timeout_s:g} s"
                           ) from None
    except OSError as e:  # ssl.SSLError included
        raise ConnectionError(f"could not reach the edge node at {edge} ({e}): check the "
                              "address and that the node runs") from None
    try:
        sslobj = writer.get_extra_info("ssl_object")
        der = sslobj.getpeercert(binary_form=True) if sslobj is not None else None
    finally:
        writer.transport.abort()
    if not der:
        raise UntrustedEdge(f"the server at {edge} presents no TLS certificate; nothing was "
                            "sent")
    return hashlib.sha256(der).hexdigest()


def _pin_mismatch(edge: str, got: str, token: JoinToken) -> UntrustedEdge:
    return UntrustedEdge(f"the server at {edge} presents TLS certificate {got[:16]}, but "
                         f"the token pins {token.tls_pin[:16]}: it is not the edge node that "
                         "issued the token (or someone is in between); nothing was sent")


def _remote_error(data: bytes) -> tuple[str, str]:
    """(reason, message) from an edge's JSON error; its text is shown, so it is cleaned."""
    try:
        err = orjson.loads(data)["error"]
        reason, message = str(err.get("reason", "bad_request")), str(err["message"])
    except (ValueError, KeyError, TypeError, AttributeError):
        return "bad_request", "the edge node refused the join without a readable reason"
    clean = "".join(c if c.isprintable() else " " for c in message)[:_MAX_REMOTE_MESSAGE]
    return (reason if re.fullmatch(r"[a-z_]{1,32}", reason) else "bad_request"), clean


def _identity_from_answer(data_dir: Path, raw: bytes, token: JoinToken, key: NodeKey,
                          node_id: str | None, edge: str
                          ) -> tuple[NodeIdentity, bytes, bytes]:
    """Check an edge's answer (invariant 4) and build our identity from it; also
    returns the store CA and our TLS certificate (PEM), checked likewise."""
    try:
        doc = orjson.loads(raw)
        if not isinstance(doc, dict) or doc.keys() != _ANSWER_KEYS:
            raise Malformed(f"the answer must have exactly the keys {sorted(_ANSWER_KEYS)}")
        cert = Certificate.from_dict(doc["certificate"])
        trust = TrustStore.from_dict(doc["trust"])
    except (ValueError, EnvelopeError) as e:
        raise UntrustedEdge(f"the edge node at {edge} sent an answer that is not an enrolment "
                            f"({e}); nothing was written") from None
    got = store_fingerprint(trust.store_public_key)
    if got != token.store_fingerprint:
        raise UntrustedEdge(f"the edge node at {edge} speaks for store key {got[:16]}, but the "
                            f"token is for key {token.store_fingerprint[:16]}: refusing to join "
                            "a store the token does not name. Is this the right edge node?")
    try:
        cert.verify(trust.store_public_key)
    except BadSignature:
        raise UntrustedEdge(f"the certificate from {edge} is not signed by the store key "
                            "the token names") from None
    problems = [
        (trust.store_id != token.store_id or cert.store_id != token.store_id,
         f"it is for store {cert.store_id!r}, the token for {token.store_id!r}"),
        (cert.public_key != key.public_key, "it is for another node's key"),
        (cert.role != token.role, f"its role is {cert.role!r}, the token's {token.role!r}"),
        (doc["node_id"] != cert.node_id or node_id not in (None, cert.node_id),
         f"it names node {cert.node_id!r}"),
    ]
    for bad, why in problems:
        if bad:
            raise UntrustedEdge(f"the certificate from {edge} does not fit: {why}")
    tls = doc["tls"]
    try:
        if not isinstance(tls, dict) or tls.keys() != {"ca", "cert"} or not all(
                isinstance(v, str) for v in tls.values()):
            raise ValueError("tls must be an object with the PEM texts ca and cert")
        ca, tls_cert = tls["ca"].encode("ascii"), tls["cert"].encode("ascii")
        if ca_public_key(ca) != trust.store_public_key:
            raise ValueError("its CA is not the store key")
        check_node_cert(ca, tls_cert, store_id=cert.store_id, node_id=cert.node_id,
                        public_key=key.public_key)
    except (ValueError, UnicodeError) as e:
        raise UntrustedEdge(f"the TLS certificate from {edge} does not fit: {e}") from None
    trust.add_certificate(cert)
    return (NodeIdentity(data_dir, cert.node_id, cert.store_id, cert.role, key, cert, trust),
            ca, tls_cert)

"""Revoking enrolled nodes and API devices: ``storemesh nodes revoke``, ``storemesh
device revoke`` and ``POST /v1/revocations``.

The store owner runs ``storemesh nodes revoke DIR NODE_ID`` on the machine of the edge
node that holds the store key (``revoke_node``). It signs the store's next revocation
list (every node revoked so far plus this one), writes it to ``DIR/revocations.json``
and ``DIR/node.json``, and hands it to the running edge node (``deliver``, a POST to
``/v1/revocations``). The node adopts it (``SyncCore.learn_revocations``): it ends the
revoked node's session, refuses it from then on, and passes the list on; every node
and the cloud do the same as it reaches them (see ``mesh.core.sync``, invariant 8).

Invariants:

1. Only the store key's holder can revoke: the list is signed by the store key, and
   every replica verifies it before adopting it. So ``POST /v1/revocations`` needs no
   credential: anyone may relay a genuine list (as any peer relays one in sync), and a
   forged, foreign or older one changes nothing (400, counted in
   ``node.rejected_sessions["revocations_<reason>"]``).
2. Versions only move forward and every list names every node revoked before it, so a
   lost or delayed list is superseded by the next. Every read-modify-write of
   ``revocations.json`` holds an exclusive ``flock`` on ``revocations.lock``: two
   revokes at once get versions N+1 and N+2, never two different lists numbered N+1.
3. ``revocations.json`` is replaced atomically (temp file, fsync, rename, fsync of the
   directory) and re-verified when loaded (``load_identity`` applies it), so a node
   started after a revoke adopts it even if the running node overwrote ``node.json``
   before it heard of the list. The reason given is kept there, on the edge, only; the
   signed list holds node ids alone (its format is shared with every replica).
4. Each revoked node gets a bound in the list (``upto``, ``mesh.core.identity``
   invariant 7): the highest seq of its chain in this edge's ledger when it is first
   revoked. Every replica keeps its envelopes up to it and leaves out those above, so
   all converge whichever came first, the list or the envelopes. A bound is carried
   unchanged into every later version; a node revoked by a list older than bounds gets
   one from the next list signed here.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import sqlite3
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import orjson

from mesh.core.identity import (
    RevocationList,
    TrustStore,
    issue_revocations,
    revocation_bounds,
)
from mesh.errors import CommandError, EnvelopeError, Malformed

if TYPE_CHECKING:  # aiohttp is imported where used: load_identity (every start) needs none
    import ssl

    from aiohttp import web

    from mesh.store.datadir import NodeIdentity

__all__ = [
    "LOCK_FILE",
    "REVOCATIONS_FILE",
    "REVOCATIONS_PATH",
    "NodeInfo",
    "add_revocation",
    "deliver",
    "list_nodes",
    "load_revocations",
    "revoke_node",
    "setup_revocation_routes",
]

log = logging.getLogger(__name__)

REVOCATIONS_FILE: Final = "revocations.json"
LOCK_FILE: Final = "revocations.lock"
REVOCATIONS_PATH: Final = "/v1/revocations"
#: Largest ``POST /v1/revocations`` body: a list of ~2,000 revoked node ids of 16 chars,
#: far more than a store revokes in its life (the sync message carries bigger ones).
MAX_REVOCATION_REQUEST_BYTES: Final = 64 * 1024
#: Most revocation records kept in ``revocations.json`` (for ``nodes list``); the signed
#: list itself is bounded by ``mesh.core.identity.MAX_REVOKED``.
MAX_RECORDS: Final = 4096


# --- revocations.json ------------------------------------------------------------------


@contextlib.contextmanager
def _locked(data_dir: Path) -> Iterator[None]:
    fd = os.open(data_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _read(data_dir: Path) -> dict[str, Any]:
    path = data_dir / REVOCATIONS_FILE
    try:
        doc = orjson.loads(path.read_bytes())
    except FileNotFoundError:
        return {"crl": None, "records": {}}
    except ValueError:
        doc = None
    if (not isinstance(doc, dict) or not isinstance(doc.get("records"), dict)
            or "crl" not in doc):
        raise ValueError(f"{path} is damaged: restore it from backup (the revocations are "
                         "also in every node's node.json)")
    return doc


def load_revocations(data_dir: Path, trust: TrustStore) -> RevocationList | None:
    """The signed list in ``DIR/revocations.json``, verified against ``trust``'s store
    key, or None if there is none. A damaged or forged file raises ``ValueError``."""
    doc = _read(data_dir)
    if doc["crl"] is None:
        return None
    try:
        crl = RevocationList.from_dict(doc["crl"])
        crl.verify(trust.store_public_key)
    except EnvelopeError as exc:
        raise ValueError(f"{data_dir / REVOCATIONS_FILE}: {exc.message}") from None
    if crl.store_id != trust.store_id:
        raise ValueError(f"{data_dir / REVOCATIONS_FILE} is for store {crl.store_id!r}")
    return crl


def _write(data_dir: Path, doc: dict[str, Any]) -> None:
    from mesh.store.datadir import write_atomic  # (mesh.store.datadir imports this module lazily)

    write_atomic(data_dir / REVOCATIONS_FILE,
                 orjson.dumps(doc, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS))


def revoke_node(identity: NodeIdentity, node_id: str, *, reason: str, now_ms: int,
                force: bool = False) -> tuple[RevocationList, bool]:
    """Sign the next revocation list with ``node_id`` on it; save it in
    ``revocations.json`` and ``node.json``. Returns the list and whether it is new
    (False: ``node_id`` was revoked already; the list held is returned).

    Raises ``CommandError`` (with what to do) if this node holds no store key, if
    ``node_id`` is this node, or if this directory holds no certificate for ``node_id``
    (unless ``force``: a node id is revoked for good, so a typo must not slip through)."""
    if node_id == identity.node_id:
        raise CommandError(f"{node_id} is the node in {identity.data_dir}, which holds the "
                           "store key: it cannot revoke itself")
    trust = identity.trust

    def check() -> None:
        if trust.certificate(node_id) is None and not force:
            known = ", ".join(c.node_id for c in trust.certificates()) or "none"
            raise CommandError(f"{identity.data_dir} holds no certificate for {node_id!r} "
                               f"(it knows: {known}); check the id, or pass --force to "
                               "revoke it anyway (for good)")
        from mesh.store.datadir import check_id

        check_id(node_id, "node id")

    crl, new = add_revocation(identity, node_id, reason=reason, now_ms=now_ms, check=check)
    if new:
        log.info("node %s revoked (revocation list v%d): %s", node_id, crl.version, reason)
    return crl, new


def add_revocation(identity: NodeIdentity, name: str, *, reason: str, now_ms: int,
                   check: Callable[[], None] | None = None) -> tuple[RevocationList, bool]:
    """Sign the store's next revocation list with ``name`` on it (a node id, or
    ``device:<id>`` for an API device: ``mesh.core.auth.revoked_name``), under the lock
    (invariant 2); save it in ``revocations.json`` and ``node.json``. ``check`` runs
    under the lock once the list held is known, and may refuse (raise). Returns the list
    and whether it is new (False: ``name`` was on it already)."""
    store_key = identity.store_key
    if store_key is None:
        raise CommandError(f"{identity.data_dir} holds no store key: revoke on the edge node "
                           "that enrolled the store's nodes (the one with store.key)")
    trust = identity.trust
    with _locked(identity.data_dir):
        doc = _read(identity.data_dir)
        held = load_revocations(identity.data_dir, trust)
        if held is not None:
            trust.apply_revocations(held)
        if trust.crl is not None and name in trust.crl.revoked:
            return trust.crl, False
        if check is not None:
            check()
        revoked = set(trust.crl.revoked) if trust.crl is not None else set()
        revoked.add(name)
        with contextlib.closing(_LedgerHeads(identity.ledger_path)) as heads:
            upto = revocation_bounds(trust, revoked, heads.get)
        crl = issue_revocations(store_key, store_id=identity.store_id,
                                version=max(1, trust.crl_version + 1),
                                revoked=revoked, upto=upto)
        records: dict[str, Any] = doc["records"]
        records[name] = {"reason": reason, "revoked_ms": now_ms, "version": crl.version}
        if name in upto:
            records[name]["upto"] = upto[name]
        while len(records) > MAX_RECORDS:
            del records[next(iter(records))]
        _write(identity.data_dir, {"crl": crl.to_dict(), "records": records})
        trust.apply_revocations(crl)
        identity.save()
    return crl, True


class _LedgerHeads:
    """The highest seq per origin in a node's ledger, read-only (the node may be
    running: SQLite WAL lets us read beside its writer). 0 for an origin it lacks, or
    when there is no ledger yet."""

    def __init__(self, path: Path) -> None:
        self._conn: sqlite3.Connection | None = None
        if path.exists():
            try:
                self._conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
                self._conn.execute("PRAGMA busy_timeout=5000")
            except sqlite3.Error as exc:
                raise CommandError(f"cannot read the ledger {path}: {exc}") from None

    def get(self, origin: str) -> int:
        if self._conn is None:
            return 0
        try:
            row = self._conn.execute("SELECT COALESCE(MAX(seq), 0) FROM envelopes "
                                     "WHERE origin = ?", (origin,)).fetchone()
        except sqlite3.Error as exc:
            if "no such table" in str(exc):
                return 0
            raise CommandError(f"cannot read the ledger: {exc}") from None
        return int(row[0])

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()


# --- nodes list --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class NodeInfo:
    node_id: str
    role: str
    fingerprint: str
    not_after: int
    status: str  # "active", "expired", "revoked" or "this node"
    reason: str | None
    revoked_ms: int | None


def list_nodes(identity: NodeIdentity, now_ms: int) -> list[NodeInfo]:
    """Every node this data directory holds a certificate for, with its status."""
    from mesh.core.identity import fingerprint

    trust = identity.trust
    try:
        records: dict[str, Any] = _read(identity.data_dir)["records"]
    except ValueError:
        records = {}
    out = []
    for cert in trust.certificates():
        rec = records.get(cert.node_id) if isinstance(records.get(cert.node_id), dict) else None
        if trust.is_revoked(cert.node_id):
            status = "revoked"
        elif now_ms > cert.not_after:
            status = "expired"
        elif cert.node_id == identity.node_id:
            status = "this node"
        else:
            status = "active"
        out.append(NodeInfo(cert.node_id, cert.role, fingerprint(cert.public_key),
                            cert.not_after, status,
                            rec.get("reason") if rec else None,
                            rec.get("revoked_ms") if rec else None))
    return out


# --- delivery to the running node ------------------------------------------------------


async def deliver(url: str, crl: RevocationList, *, timeout_s: float = 5.0,
                  ssl_context: ssl.SSLContext | None = None) -> int:
    """POST ``crl`` to the node at ``url``; returns the revocation list version it holds
    afterwards. ``ssl_context``: for an ``https://`` URL, the store CA to pin
    (``mesh.net.tls.api_client_context``). Raises ``ConnectionError`` (nothing answered, or
    not a storemesh node), ``ValueError`` (it refused the list: the message says why)."""
    import aiohttp

    timeout = aiohttp.ClientTimeout(total=timeout_s)
    try:
        async with aiohttp.ClientSession(timeout=timeout) as http, http.post(
                url.rstrip("/") + REVOCATIONS_PATH, data=orjson.dumps(crl.to_dict()),
                headers={"Content-Type": "application/json"},
                ssl=ssl_context if ssl_context is not None else True) as resp:
            raw = await resp.read()
            status = resp.status
    except (aiohttp.ClientError, OSError, TimeoutError) as exc:
        raise ConnectionError(f"no storemesh node answered at {url}: {exc}") from None
    try:
        body = orjson.loads(raw)
    except ValueError:
        body = None
    if not isinstance(body, dict):
        raise ConnectionError(f"{url} answered {status} without JSON: not a storemesh node?")
    if status == 404:
        raise ConnectionError(f"{url} answered 404: not a storemesh node of this version?")
    if status != 200:
        err = body.get("error")
        msg = err.get("message") if isinstance(err, dict) else None
        raise ValueError(f"{url} refused the revocation list ({status}): {msg or body}")
    version = body.get("crl_version")
    if type(version) is not int:
        raise ConnectionError(f"{url} answered without a crl_version")
    return version


# --- POST /v1/revocations ----------------------------------------------------------------


def setup_revocation_routes(app: web.Application, node: Any) -> None:
    """Serve ``POST /v1/revocations`` for ``node`` (``.core``, ``.now_ms()``,
    ``.driver.carry_out(effects)``, ``.rejected_sessions``)."""

    async def post(request: web.Request) -> web.Response:
        return await _post_revocations(node, request)

    app.router.add_post(REVOCATIONS_PATH, post)


async def _post_revocations(node: Any, request: web.Request) -> web.Response:
    from aiohttp import web

    too_big = f"request body over {MAX_REVOCATION_REQUEST_BYTES} bytes"
    if (request.content_length or 0) > MAX_REVOCATION_REQUEST_BYTES:
        return _refuse(node, request, 413, "oversized", too_big)
    body = bytearray()
    async for chunk in request.content.iter_chunked(MAX_REVOCATION_REQUEST_BYTES):
        body += chunk
        if len(body) > MAX_REVOCATION_REQUEST_BYTES:
            return _refuse(node, request, 413, "oversized", too_big)
    try:
        crl = RevocationList.from_dict(orjson.loads(body))
    except ValueError:  # orjson.JSONDecodeError is a ValueError
        return _refuse(node, request, 400, "bad_request", "the body is not JSON")
    except Malformed as exc:
        return _refuse(node, request, 400, "bad_request", exc.message)
    before = node.core.trust.crl_version
    try:
        effects = node.core.learn_revocations(crl, node.now_ms())
    except EnvelopeError as exc:
        return _refuse(node, request, 400, exc.reason, exc.message)
    node.driver.carry_out(effects)  # ends the revoked sessions, passes the list on, saves it
    held = node.core.trust.crl_version
    if held != before:
        log.warning("revocation list v%d adopted (from %s): revoked %s", held, request.remote,
                    ", ".join(sorted(crl.revoked)))
    return web.json_response({"crl_version": held, "adopted": held != before,
                              "revoked": sorted(node.core.trust.revoked)})


def _refuse(node: Any, request: web.Request, status: int, reason: str,
            message: str) -> web.Response:
    from aiohttp import web

    key = f"revocations_{reason}"
    node.rejected_sessions[key] = node.rejected_sessions.get(key, 0) + 1
    log.info("revocation list from %s refused (%s): %s", request.remote, reason, message)
    body = {"error": {"field": None, "reason": reason, "message": message}}
    return web.json_response(body, status=status, dumps=lambda o: orjson.dumps(o).decode())

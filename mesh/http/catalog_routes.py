"""The catalog's HTTP routes and its SKU index: ``GET/PUT /v1/catalog…`` over the
pure document logic of ``mesh.core.catalog`` (docs/catalog.md, docs/api.md).

Invariants: a write is acknowledged only once its envelope is durable (the node's
``execute``); a bad field gets 400 naming it and changes nothing; reads touch only the
local copy, so they work offline."""

from __future__ import annotations

import logging
from bisect import bisect_left, bisect_right, insort
from collections.abc import Callable, Mapping
from itertools import islice
from typing import Any, Final

import orjson
import pycrdt
from aiohttp import web

from mesh import config
from mesh.core.catalog import (
    _CHECKS,
    FIELDS,
    FORBIDDEN_KEY,
    Doc,
    _check_sku,
    _read,
    _root,
    check_fields,
    make_update,
    product,
)
from mesh.core.crdt import HLC
from mesh.core.crdt.hlc import MAX_TS
from mesh.core.ops import CATALOG_ROLES
from mesh.core.replica import CommandResult, Replica
from mesh.errors import CommandError, LedgerError, StorageFull, TxnReused
from mesh.http.common import (
    DEFAULT_PAGE,
    DISK_FULL,
    MAX_PAGE,
    PATH_ID,
    ApiError,
    check_ident,
    command_fields,
    json_response,
    query_ident,
    query_int,
    read_object,
)
from mesh.http.metrics import NodeView

__all__ = ["CatalogIndex", "setup_catalog_routes", "update_product"]

log = logging.getLogger(__name__)


async def update_product(node: NodeView, sku: str, fields: Mapping[str, object],
                         staff: str | None = None, *, txn: str) -> dict[str, Any]:
    """Change product ``sku`` at ``node`` (edge/cloud roles); returns once durable.

    The update is computed inside the command, on the replica's state at that moment.
    ``txn`` makes a retry safe: a replay returns the original ``origin``/``seq`` with
    ``duplicate: True`` and changes nothing. Raises ``CommandError`` (field ``role`` if
    this node may not write the catalog), ``LedgerError``/``StorageFull`` if the write
    was not recorded."""
    if node.replica.role not in CATALOG_ROLES:
        raise CommandError(f"a {node.replica.role} node may not write the catalog; "
                           "change prices on the edge (manager) or cloud node", "role")
    _check_sku(sku)
    check_fields(fields)  # fail fast, before the command is queued

    def command(replica: Replica) -> CommandResult:
        now = node.now_ms()
        # The HLC update_catalog stamps on the envelope: the next tick of the clock.
        rev = HLC(replica.hlc.last).now(now)
        update = make_update(replica.catalog, sku, fields, rev=rev, by=replica.node_id)
        change = orjson.dumps(fields, option=orjson.OPT_SORT_KEYS).decode()
        return replica.update_catalog(update, txn=txn, now_ms=now, staff=staff, sku=sku,
                                      note=change[: config.MAX_TEXT_LEN])

    res = await node.execute(command)
    body: dict[str, Any] = {"txn_id": txn, "origin": res.origin, "seq": res.seq,
                            "duplicate": res.duplicate}
    current = product(node.replica.catalog, sku)
    assert current is not None or res.duplicate, "a recorded write leaves the product"
    body.update(current or {"sku": sku})
    return body


# --- an index for listings -----------------------------------------------------------------


class CatalogIndex:
    """Every product of one document as plain dicts, sorted by SKU, kept current from the
    document's change events (only changed SKUs are re-read).

    Listing straight from the document costs ~25 µs a product (0.5 s for 20,000), too
    much for a poll on the event loop; with the index a listing costs what it returns.
    It follows the node's current document: a replica rebuilt after a ledger failure
    has a new one, and the index re-attaches. ``close`` drops the observer."""

    def __init__(self) -> None:
        self._doc: Doc | None = None
        self._root: pycrdt.Map[Any] | None = None
        self._subscription: pycrdt.Subscription | None = None
        self._rows: dict[str, dict[str, Any]] = {}
        self._skus: list[str] = []
        self._version = 0
        self._dirty: set[str] = set()
        self._stale = True  # re-read everything

    def close(self) -> None:
        if self._root is not None and self._subscription is not None:
            self._root.unobserve(self._subscription)
        self._doc = self._root = self._subscription = None
        self._stale = True

    def _on_change(self, events: list[Any]) -> None:
        """Note which SKUs changed (invariant 5: never raises)."""
        try:
            for event in events:
                path = event.path
                if path:
                    self._dirty.add(str(path[0]))
                else:
                    self._dirty.update(str(k) for k in event.keys)
        except Exception:
            self._stale = True

    def _refresh(self, doc: Doc) -> None:
        if doc is not self._doc:
            self.close()
            self._root = _root(doc)
            self._subscription = self._root.observe_deep(self._on_change)
            self._doc = doc
        assert self._root is not None
        if self._stale:
            self._stale = False
            self._dirty.clear()
            with doc.transaction():
                rows = (_read(sku, entry) for sku, entry in self._root.items())
                self._rows = {str(r["sku"]): r for r in rows if r is not None}
            self._skus = sorted(self._rows)
            self._version = max((int(r["rev"]) for r in self._rows.values()), default=0)
            return
        if not self._dirty:
            return
        dirty, self._dirty = self._dirty, set()
        lowered = False
        with doc.transaction():
            for sku in dirty:
                old = self._rows.get(sku)
                new = _read(sku, self._root.get(sku))
                if new is None:
                    if old is not None:
                        del self._rows[sku]
                        del self._skus[bisect_left(self._skus, sku)]
                        lowered = True
                    continue
                if old is None:
                    insort(self._skus, sku)
                elif new["rev"] < old["rev"]:
                    lowered = True  # a concurrent write with a lower HLC won
                self._rows[sku] = new
                self._version = max(self._version, int(new["rev"]))
        if lowered:
            self._version = max((int(r["rev"]) for r in self._rows.values()), default=0)

    def version(self, doc: Doc) -> int:
        """``catalog_version(doc)``, from the index."""
        self._refresh(doc)
        return self._version

    def changed(self, doc: Doc, since_rev: int = 0, *, after: str | None = None,
                limit: int = MAX_PAGE) -> tuple[list[dict[str, Any]], str | None]:
        """``products(doc, since_rev)`` from the index, a page at a time: the products
        after SKU ``after``, at most ``limit``, and the cursor for the next page (None
        when this was the last)."""
        self._refresh(doc)
        start = 0 if after is None else bisect_right(self._skus, after)
        out: list[dict[str, Any]] = []
        for sku in islice(self._skus, start, None):
            row = self._rows[sku]
            if row["rev"] > since_rev:
                if len(out) == limit:
                    return out, out[-1]["sku"]
                out.append(dict(row))
        return out, None


# --- HTTP API --------------------------------------------------------------------------------


def _api_check(check: Callable[[object], object]) -> Callable[[object, str], object]:
    def run(value: object, field: str) -> object:
        try:
            return check(value)
        except CommandError as exc:
            raise ApiError(400, exc.message, exc.field) from None
    return run


_PUT: Final = {
    "txn_id": (check_ident, False), "staff_id": (check_ident, False),
    **{name: (_api_check(check), False) for name, check in _CHECKS.items()},
}
_ROUTES_KEY: Final = web.AppKey("storemesh_catalog_routes", CatalogIndex)


class _CatalogApi:
    """Route handlers bound to one node."""

    def __init__(self, node: NodeView) -> None:
        self.node = node
        self.index = CatalogIndex()

    def _forbidden(self) -> ApiError:
        node = self.node
        node.rejected_sessions[FORBIDDEN_KEY] = node.rejected_sessions.get(FORBIDDEN_KEY, 0) + 1
        role = node.identity.role
        return ApiError(403, f"a {role} node may not write the catalog; change products on "
                             "the edge (manager) or cloud node", "role")

    async def get_one(self, request: web.Request) -> web.Response:
        sku = check_ident(request.match_info["sku"], "sku")
        found = product(self.node.replica.catalog, sku)
        if found is None:
            raise ApiError(404, f"unknown product {sku!r}: this node's catalog has no such "
                                "SKU", "sku")
        return json_response(found)

    async def get_changed(self, request: web.Request) -> web.Response:
        since = query_int(request, "since", 0, MAX_TS, 0)
        after = query_ident(request, "after")
        limit = query_int(request, "limit", 1, MAX_PAGE, DEFAULT_PAGE)
        doc = self.node.replica.catalog
        version = self.index.version(doc)
        page, nxt = self.index.changed(doc, since, after=after, limit=limit)
        return json_response({"version": version, "products": page, "next": nxt})

    async def put(self, request: web.Request) -> web.Response:
        if self.node.identity.role not in CATALOG_ROLES:
            raise self._forbidden()
        sku = check_ident(request.match_info["sku"], "sku")
        f = command_fields(await read_object(request), _PUT, request)
        changes: dict[str, object] = {name: f[name] for name in FIELDS if name in f}
        if not changes:
            raise ApiError(400, f"nothing to change: send at least one of {', '.join(FIELDS)}")
        try:
            body = await update_product(self.node, sku, changes, f["staff"],
                                        txn=f["key"])
            body["txn_id"] = f["txn_id"]
        except CommandError as exc:
            if exc.field == "role":
                raise self._forbidden() from None
            raise ApiError(422 if isinstance(exc, TxnReused) else 400, exc.message,
                           exc.field) from None
        except StorageFull as exc:
            log.error("disk full: %s", exc)
            raise ApiError(507, DISK_FULL) from None
        except LedgerError as exc:
            log.error("ledger write failed: %s", exc)
            raise ApiError(503, "the ledger write failed, so the change was NOT recorded; "
                                "retry with the same txn_id") from None
        return json_response(body, 200 if body["duplicate"] else 201)

    async def on_cleanup(self, app: web.Application) -> None:
        self.index.close()


def setup_catalog_routes(app: web.Application, node: NodeView) -> None:
    """Add the catalog endpoints of ``node`` to ``app`` (see docs/catalog.md); a second
    call on the same app does nothing. JSON errors come from ``mesh.http.api``'s middleware,
    which ``mesh.http.api.setup_routes`` installs on the same app."""
    if _ROUTES_KEY in app:
        return
    api = _CatalogApi(node)
    app[_ROUTES_KEY] = api.index
    app.on_cleanup.append(api.on_cleanup)
    r = app.router
    r.add_get("/v1/catalog", api.get_changed)
    r.add_get(f"/v1/catalog/{{sku:{PATH_ID}}}", api.get_one)
    r.add_put(f"/v1/catalog/{{sku:{PATH_ID}}}", api.put)

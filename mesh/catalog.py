"""The catalog and price book: products in the replica's pycrdt document.

Only nodes whose role may write the catalog (edge manager, cloud HQ) change it; the
change travels as a Yjs update inside a signed ``cat`` op (``Replica.update_catalog``),
and every node, registers included, applies it to its own copy. Reads touch only that
local copy, so price look-ups work offline. ``docs/catalog.md`` is the reference.

Invariants:
 1. Document shape: the root ``Map`` "products" maps a SKU to a ``Map`` with ``name``
    (str), ``price_cents`` (number), ``tax_class`` (str), ``active`` (bool), ``rev``
    (the HLC of the envelope that last wrote the product) and ``by`` (its origin). A
    product is created with all four business fields (defaults filled in), so a
    concurrent creation at two writers, where Yjs keeps one writer's map whole, never
    leaves a product without a name or a price. Every write sets ``rev`` and ``by``.
 2. Money is integer cents. A write takes only a JSON integer in 0..MAX_PRICE_CENTS
    (far below 2**53, so the float pycrdt may hand back is exact) and a read turns it
    back into an int with ``round(x)``.
 3. ``make_update`` never changes the document it is given. It makes the change on a
    copy, under the writer's own Yjs client id (derived from its node id), and returns
    the update of that one transaction: small, and independent of how much history
    the document holds.
 4. Reads are total. A product with missing or mistyped fields (a faulty writer) reads
    with those fields as ``None``. It never raises.
 5. The change-event observer on a replica's document never raises: pycrdt re-raises
    an observer's exception when the transaction ends, which is inside
    ``Replica.apply``, and would refuse a valid envelope.
"""

from __future__ import annotations

import logging
import math
import re
from bisect import bisect_left, bisect_right, insort
from collections.abc import Callable, Mapping
from itertools import islice
from typing import Any, Final

import orjson
import pycrdt
from aiohttp import web

from mesh import config
from mesh.api import (
    _DISK_FULL,
    DEFAULT_PAGE,
    MAX_PAGE,
    PATH_ID,
    ApiError,
    _fields,
    _ident,
    _json,
    _query_ident,
    _query_int,
    _read_object,
)
from mesh.crdt import HLC
from mesh.crdt.hlc import MAX_TS
from mesh.errors import CommandError, LedgerError, StorageFull, TxnReused
from mesh.metrics import NodeView
from mesh.ops import CATALOG_ROLES, client_id
from mesh.replica import CommandResult, Replica

__all__ = [
    "FIELDS",
    "FORBIDDEN_KEY",
    "MAX_NAME_LEN",
    "MAX_PRICE_CENTS",
    "CatalogIndex",
    "catalog_version",
    "check_fields",
    "client_id",
    "make_update",
    "product",
    "products",
    "setup_catalog_routes",
    "update_product",
]

log = logging.getLogger(__name__)

#: Longest product name, in characters: what fits a shelf label and a receipt line.
MAX_NAME_LEN: Final = 200
#: Highest price, in cents (10 billion in major units). High enough for
#: high-denomination currencies, where prices in minor units pass 2**31, and far below
#: 2**53, where a float (as pycrdt may return numbers) stops holding every integer.
MAX_PRICE_CENTS: Final = 10**12
#: Tax classes are short codes ("standard", "reduced", "zero", "food-7").
_TAX_CLASS: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,31}")
#: Control characters have no place on a label or a receipt.
_CONTROL: Final = re.compile(r"[\x00-\x1f\x7f]")
#: The business fields of a product, in the order the API documents them.
FIELDS: Final = ("name", "price_cents", "tax_class", "active")
#: Fields a new product must be given; the others get these defaults.
_REQUIRED_NEW: Final = ("name", "price_cents")
_DEFAULTS: Final[dict[str, object]] = {"tax_class": "standard", "active": True}
#: Key in ``node.rejected_sessions`` for catalog writes refused by role. The metrics
#: export that dict with a ``session_`` prefix, so the counter reads
#: ``storemesh_envelopes_rejected_total{reason="session_catalog_write_forbidden"}``.
FORBIDDEN_KEY: Final = "catalog_write_forbidden"
_ROOT: Final = "products"

Doc = pycrdt.Doc[Any]


# --- reading -------------------------------------------------------------------------------


def _root(doc: Doc) -> pycrdt.Map[Any]:
    root: pycrdt.Map[Any] = doc.get(_ROOT, type=pycrdt.Map)
    return root


def _number(value: object) -> float | int | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return value if isinstance(value, int) or math.isfinite(value) else None


def _read(sku: str, entry: object) -> dict[str, Any] | None:
    """One product as plain values (invariants 2 and 4); None if ``entry`` is no map."""
    if not isinstance(entry, pycrdt.Map):
        return None
    raw = entry.to_py() or {}
    name, tax_class, active, by = (raw.get(k) for k in ("name", "tax_class", "active", "by"))
    price = _number(raw.get("price_cents"))
    # pycrdt keeps an int that a float cannot hold exactly as a 64-bit integer, so an
    # HLC (~2**57 today) comes back exact either way.
    rev_num = _number(raw.get("rev"))
    rev = int(rev_num) if rev_num is not None and 0 <= rev_num <= MAX_TS else 0
    return {
        "sku": sku,
        "name": name if isinstance(name, str) else None,
        "price_cents": None if price is None else round(price),
        "tax_class": tax_class if isinstance(tax_class, str) else None,
        "active": active if isinstance(active, bool) else None,
        "rev": rev,
        "changed_ms": rev >> 16,
        "by": by if isinstance(by, str) else None,
    }


def product(doc: Doc, sku: str) -> dict[str, Any] | None:
    """The product ``sku`` as this node holds it, or None if it has never seen it."""
    return _read(sku, _root(doc).get(sku))


def products(doc: Doc, since_rev: int = 0) -> list[dict[str, Any]]:
    """Products whose ``rev`` is greater than ``since_rev``, sorted by SKU.

    Reads the whole document (~25 µs a product): the HTTP API uses ``CatalogIndex``."""
    root = _root(doc)
    with doc.transaction():
        rows = [_read(sku, entry) for sku, entry in root.items()]
    return sorted((r for r in rows if r is not None and r["rev"] > since_rev),
                  key=lambda r: str(r["sku"]))


def catalog_version(doc: Doc) -> int:
    """The catalog's version: the highest ``rev`` of any product (0 when empty)."""
    return max((int(p["rev"]) for p in products(doc)), default=0)


# --- writing -------------------------------------------------------------------------------


def _check_name(value: object) -> str:
    if (not isinstance(value, str) or not value.strip() or len(value) > MAX_NAME_LEN
            or _CONTROL.search(value)):
        raise CommandError(f"name must be a non-empty string of at most {MAX_NAME_LEN} "
                           "characters without control characters", "name")
    return value


def _check_price(value: object) -> int:
    if type(value) is not int or not 0 <= value <= MAX_PRICE_CENTS:
        raise CommandError("price_cents must be an integer number of cents in "
                           f"0..{MAX_PRICE_CENTS} (1999 for 19.99; not 19.99)", "price_cents")
    return value


def _check_tax_class(value: object) -> str:
    if not isinstance(value, str) or not _TAX_CLASS.fullmatch(value):
        raise CommandError("tax_class must be a code of 1..32 letters, digits, '_', '.' or "
                           "'-' starting with a letter or digit", "tax_class")
    return value


def _check_active(value: object) -> bool:
    if not isinstance(value, bool):
        raise CommandError("active must be true or false", "active")
    return value


_CHECKS: Final[dict[str, Callable[[object], object]]] = {
    "name": _check_name, "price_cents": _check_price, "tax_class": _check_tax_class,
    "active": _check_active,
}


def check_fields(fields: Mapping[str, object]) -> dict[str, object]:
    """Validate a product change; raises ``CommandError`` naming the first bad field."""
    unknown = sorted(set(fields) - set(FIELDS))
    if unknown:
        raise CommandError(f"unknown product field {unknown[0]!r}; allowed: "
                           f"{', '.join(FIELDS)}", unknown[0])
    if not fields:
        raise CommandError(f"nothing to change: give at least one of {', '.join(FIELDS)}")
    return {name: _CHECKS[name](value) for name, value in fields.items()}


def _check_sku(sku: object) -> str:
    if not isinstance(sku, str) or not sku or len(sku) > config.MAX_ID_LEN:
        raise CommandError(f"sku must be a non-empty string of at most {config.MAX_ID_LEN} "
                           "characters", "sku")
    return sku


def make_update(doc: Doc, sku: str, fields: Mapping[str, object], *, rev: int,
                by: str) -> bytes:
    """The Yjs update that sets ``fields`` of product ``sku`` (rev ``rev``, writer ``by``).

    ``doc`` is not changed (invariant 3). A partial change keeps the other fields; a new
    product needs ``name`` and ``price_cents``. Raises ``CommandError`` for bad input."""
    _check_sku(sku)
    values = check_fields(fields)
    if type(rev) is not int or not 0 < rev <= MAX_TS:
        raise ValueError("rev must be a hybrid logical clock timestamp")
    if not isinstance(by, str) or not by:
        raise ValueError("by must be the writer's node id")
    scratch: Doc = pycrdt.Doc(client_id=client_id(by))
    scratch.apply_update(doc.get_update())
    root = _root(scratch)
    current = root.get(sku)
    if not isinstance(current, pycrdt.Map):
        for name in _REQUIRED_NEW:
            if name not in values:
                raise CommandError(f"{sku!r} is a new product: give its {name} too", name)
    updates: list[bytes] = []
    subscription = scratch.observe(lambda event: updates.append(event.update))
    try:
        with scratch.transaction():
            if isinstance(current, pycrdt.Map):
                for name, value in values.items():
                    current[name] = value
                current["rev"] = rev
                current["by"] = by
            else:
                root[sku] = pycrdt.Map({**_DEFAULTS, **values, "rev": rev, "by": by})
    finally:
        scratch.unobserve(subscription)
    assert len(updates) == 1, "one transaction makes one update"
    return updates[0]


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
    "txn_id": (_ident, False), "staff_id": (_ident, False),
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
        sku = _ident(request.match_info["sku"], "sku")
        found = product(self.node.replica.catalog, sku)
        if found is None:
            raise ApiError(404, f"unknown product {sku!r}: this node's catalog has no such "
                                "SKU", "sku")
        return _json(found)

    async def get_changed(self, request: web.Request) -> web.Response:
        since = _query_int(request, "since", 0, MAX_TS, 0)
        after = _query_ident(request, "after")
        limit = _query_int(request, "limit", 1, MAX_PAGE, DEFAULT_PAGE)
        doc = self.node.replica.catalog
        version = self.index.version(doc)
        page, nxt = self.index.changed(doc, since, after=after, limit=limit)
        return _json({"version": version, "products": page, "next": nxt})

    async def put(self, request: web.Request) -> web.Response:
        if self.node.identity.role not in CATALOG_ROLES:
            raise self._forbidden()
        sku = _ident(request.match_info["sku"], "sku")
        f = _fields(await _read_object(request), _PUT, request)
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
            raise ApiError(507, _DISK_FULL) from None
        except LedgerError as exc:
            log.error("ledger write failed: %s", exc)
            raise ApiError(503, "the ledger write failed, so the change was NOT recorded; "
                                "retry with the same txn_id") from None
        return _json(body, 200 if body["duplicate"] else 201)

    async def on_cleanup(self, app: web.Application) -> None:
        self.index.close()


def setup_catalog_routes(app: web.Application, node: NodeView) -> None:
    """Add the catalog endpoints of ``node`` to ``app`` (see docs/catalog.md); a second
    call on the same app does nothing. JSON errors come from ``mesh.api``'s middleware,
    which ``mesh.api.setup_routes`` installs on the same app."""
    if _ROUTES_KEY in app:
        return
    api = _CatalogApi(node)
    app[_ROUTES_KEY] = api.index
    app.on_cleanup.append(api.on_cleanup)
    r = app.router
    r.add_get("/v1/catalog", api.get_changed)
    r.add_get(f"/v1/catalog/{{sku:{PATH_ID}}}", api.get_one)
    r.add_put(f"/v1/catalog/{{sku:{PATH_ID}}}", api.put)

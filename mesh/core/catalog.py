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

import hashlib
import logging
import math
import re
from collections.abc import Callable, Mapping
from typing import Any, Final

import pycrdt

from mesh import config
from mesh.core.crdt.hlc import MAX_TS
from mesh.errors import CommandError

__all__ = [
    "FIELDS",
    "FORBIDDEN_KEY",
    "MAX_NAME_LEN",
    "MAX_PRICE_CENTS",
    "catalog_version",
    "check_fields",
    "client_id",
    "make_update",
    "product",
    "products",
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
_CLIENT_DOMAIN: Final = b"storemesh/catalog-client/v1\n"

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

    Reads the whole document (~25 µs a product): the HTTP API uses
    ``mesh.http.catalog_routes.CatalogIndex``."""
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


def client_id(node_id: str) -> int:
    """The Yjs client id a node writes the catalog with: stable, so the document's state
    vector holds one entry per writer rather than one per change (Yjs ids are < 2**53).

    A node continues its own client's clock from the document, which holds every change
    it made (a local command applies its envelope at once). Like the envelope chain,
    that breaks only if a node's data directory is rolled back to an old copy."""
    digest = hashlib.blake2b(_CLIENT_DOMAIN + node_id.encode(), digest_size=8).digest()
    return (int.from_bytes(digest, "big") >> 11) or 1


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

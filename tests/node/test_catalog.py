"""The catalog and price book: the document functions, and real nodes on 127.0.0.1."""

from __future__ import annotations

import asyncio
import base64
import random
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pycrdt
import pytest
import pytest_asyncio
from prometheus_client.parser import text_string_to_metric_families

from mesh.core import catalog
from mesh.core.catalog import (
    FORBIDDEN_KEY,
    MAX_NAME_LEN,
    MAX_PRICE_CENTS,
    catalog_version,
    make_update,
    product,
    products,
)
from mesh.core.envelope import seal
from mesh.core.identity import NodeKey
from mesh.core.sync import encode_batch
from mesh.errors import CommandError
from mesh.http import catalog_routes
from mesh.http.catalog_routes import CatalogIndex
from mesh.net import transport
from mesh.node.node import Node
from mesh.store.datadir import enrol_node, init_store, load_identity
from tests.meshkit import add_staff, client, issue_token, login, use_token

Json = Any
Doc = pycrdt.Doc[Any]
HLC0 = 1_790_000_000_000 << 16  # an HLC in 2026: above 2**53, as real ones are
DEADLINE_S = 15.0


def now_ms() -> int:
    return time.time_ns() // 1_000_000


# --- the document, without nodes ----------------------------------------------------------


def write(doc: Doc, sku: str, fields: dict[str, object], rev: int, by: str = "edge") -> bytes:
    update = make_update(doc, sku, fields, rev=rev, by=by)
    doc.apply_update(update)
    return update


def test_make_update_leaves_the_doc_alone_and_cents_stay_integers() -> None:
    doc: Doc = pycrdt.Doc()
    before = doc.get_update()
    update = make_update(doc, "A", {"name": "Apple", "price_cents": 1999}, rev=HLC0, by="edge")
    assert doc.get_update() == before and product(doc, "A") is None
    doc.apply_update(update)
    got = product(doc, "A")
    assert got == {"sku": "A", "name": "Apple", "price_cents": 1999, "tax_class": "standard",
                   "active": True, "rev": HLC0, "changed_ms": HLC0 >> 16, "by": "edge"}
    for i, cents in enumerate([2**31 + 7, 2**39 + 1, MAX_PRICE_CENTS - 1, MAX_PRICE_CENTS, 0]):
        write(doc, "A", {"price_cents": cents}, HLC0 + 1 + i)
        got = product(doc, "A")
        assert got is not None
        assert got["price_cents"] == cents and type(got["price_cents"]) is int
        assert got["rev"] == HLC0 + 1 + i and type(got["rev"]) is int
    # a copy of the document (as a register holds it) reads the same
    copy: Doc = pycrdt.Doc()
    copy.apply_update(doc.get_update())
    assert product(copy, "A") == product(doc, "A")


def test_partial_update_keeps_the_other_fields() -> None:
    doc: Doc = pycrdt.Doc()
    write(doc, "A", {"name": "Apple", "price_cents": 100, "tax_class": "reduced"}, HLC0)
    write(doc, "A", {"price_cents": 120}, HLC0 + 1, by="cloud")
    write(doc, "A", {"active": False}, HLC0 + 2)
    assert product(doc, "A") == {
        "sku": "A", "name": "Apple", "price_cents": 120, "tax_class": "reduced",
        "active": False, "rev": HLC0 + 2, "changed_ms": HLC0 >> 16, "by": "edge"}


@pytest.mark.parametrize(("fields", "bad"), [
    ({"price_cents": -1}, "price_cents"),
    ({"price_cents": 19.99}, "price_cents"),
    ({"price_cents": 1999.0}, "price_cents"),
    ({"price_cents": True}, "price_cents"),
    ({"price_cents": "1999"}, "price_cents"),
    ({"price_cents": MAX_PRICE_CENTS + 1}, "price_cents"),
    ({"name": "x" * (MAX_NAME_LEN + 1)}, "name"),
    ({"name": ""}, "name"),
    ({"name": "two\nlines"}, "name"),
    ({"tax_class": "has space"}, "tax_class"),
    ({"tax_class": ""}, "tax_class"),
    ({"active": 1}, "active"),
    ({"colour": "red"}, "colour"),
    ({}, None),
])
def test_bad_fields_are_refused_naming_the_field(fields: dict[str, object],
                                                 bad: str | None) -> None:
    doc: Doc = pycrdt.Doc()
    write(doc, "A", {"name": "Apple", "price_cents": 100}, HLC0)
    before = doc.get_update()
    with pytest.raises(CommandError) as err:
        make_update(doc, "A", fields, rev=HLC0 + 1, by="edge")
    assert err.value.field == bad
    assert doc.get_update() == before


def test_a_new_product_needs_a_name_and_a_price() -> None:
    doc: Doc = pycrdt.Doc()
    with pytest.raises(CommandError) as err:
        make_update(doc, "NEW", {"name": "Pear"}, rev=HLC0, by="edge")
    assert err.value.field == "price_cents"
    with pytest.raises(CommandError) as err:
        make_update(doc, "NEW", {"price_cents": 5}, rev=HLC0, by="edge")
    assert err.value.field == "name"
    with pytest.raises(CommandError) as err:
        make_update(doc, "", {"name": "x", "price_cents": 5}, rev=HLC0, by="edge")
    assert err.value.field == "sku"


def test_updates_stay_small_however_long_the_history() -> None:
    """One writer's changes carry only themselves: a diff against the document's state
    would also carry the whole (growing) delete set."""
    doc: Doc = pycrdt.Doc()
    rng = random.Random(7)
    sizes = []
    for i in range(600):
        sku = f"SKU-{rng.randrange(150):04d}"
        fields: dict[str, object] = {"price_cents": rng.randrange(10**6)}
        if product(doc, sku) is None:
            fields["name"] = f"Product {sku}"
        sizes.append(len(write(doc, sku, fields, HLC0 + i)))
    assert max(sizes[-100:]) < 256, sizes[-100:]
    ours = make_update(doc, "SKU-0001", {"price_cents": 1}, rev=HLC0 + 600, by="edge")
    # what a diff against the document's state vector carries for the same change
    scratch: Doc = pycrdt.Doc(client_id=catalog.client_id("edge"))
    scratch.apply_update(doc.get_update())
    scratch.get("products", type=pycrdt.Map)["SKU-0001"]["price_cents"] = 1
    assert len(ours) < 100 and len(scratch.get_update(doc.get_state())) > 5 * len(ours)


def test_concurrent_writers_converge_whatever_the_delivery_order() -> None:
    base: Doc = pycrdt.Doc()
    write(base, "P", {"name": "Pen", "price_cents": 100}, HLC0, by="edge")
    a: Doc = pycrdt.Doc()
    b: Doc = pycrdt.Doc()
    a.apply_update(base.get_update())
    b.apply_update(base.get_update())
    ups = [write(a, "P", {"price_cents": 111}, HLC0 + 10, by="edge"),
           write(a, "Q", {"name": "Q from edge", "price_cents": 1}, HLC0 + 11, by="edge"),
           write(b, "P", {"price_cents": 222, "name": "Pen+"}, HLC0 + 12, by="cloud"),
           write(b, "Q", {"name": "Q from cloud", "price_cents": 2}, HLC0 + 13, by="cloud")]
    seen = []
    for order in ([0, 1, 2, 3], [2, 3, 0, 1], [2, 0, 3, 1]):
        doc: Doc = pycrdt.Doc()
        doc.apply_update(base.get_update())
        for i in order:
            doc.apply_update(ups[i])
        seen.append(products(doc))
    assert seen[0] == seen[1] == seen[2]
    p, q = seen[0]
    # Fields merge one by one: where both wrote (price, rev, by) one write wins the
    # lot; the name only one of them changed survives. A product both created is one
    # writer's whole.
    assert (p["price_cents"], p["by"], p["name"]) in {(111, "edge", "Pen+"),
                                                      (222, "cloud", "Pen+")}
    assert p["rev"] == {"edge": HLC0 + 10, "cloud": HLC0 + 12}[p["by"]]
    assert (q["name"], q["price_cents"], q["by"]) in {("Q from edge", 1, "edge"),
                                                      ("Q from cloud", 2, "cloud")}


def test_since_and_version() -> None:
    doc: Doc = pycrdt.Doc()
    assert catalog_version(doc) == 0 and products(doc) == []
    write(doc, "B", {"name": "B", "price_cents": 1}, HLC0 + 1)
    write(doc, "A", {"name": "A", "price_cents": 1}, HLC0 + 2)
    write(doc, "C", {"name": "C", "price_cents": 1}, HLC0 + 3)
    v = catalog_version(doc)
    assert v == HLC0 + 3
    assert [p["sku"] for p in products(doc)] == ["A", "B", "C"]
    write(doc, "B", {"price_cents": 2}, HLC0 + 4)
    assert [p["sku"] for p in products(doc, v)] == ["B"]
    assert products(doc, HLC0 + 4) == [] and catalog_version(doc) == HLC0 + 4


def test_a_faulty_writers_product_reads_as_nulls_never_raises() -> None:
    doc: Doc = pycrdt.Doc()
    root = doc.get("products", type=pycrdt.Map)
    root["odd"] = pycrdt.Map({"price_cents": "free", "active": "yes", "rev": -5})
    root["scalar"] = 42
    assert product(doc, "scalar") is None
    assert product(doc, "odd") == {"sku": "odd", "name": None, "price_cents": None,
                                   "tax_class": None, "active": None, "rev": 0,
                                   "changed_ms": 0, "by": None}


def test_the_index_agrees_with_a_full_read() -> None:
    rng = random.Random(11)
    doc: Doc = pycrdt.Doc()
    index = CatalogIndex()
    other: Doc = pycrdt.Doc()  # a second writer, merged in now and then
    try:
        for i in range(400):
            sku = f"S{rng.randrange(60):02d}"
            target, by = (other, "cloud") if rng.random() < 0.3 else (doc, "edge")
            fields: dict[str, object] = {"price_cents": rng.randrange(1000)}
            if product(target, sku) is None:
                fields["name"] = sku
            write(target, sku, fields, HLC0 + i, by)
            if rng.random() < 0.1:
                doc.apply_update(other.get_update())
                other.apply_update(doc.get_update())
            if rng.random() < 0.03:  # a faulty writer deletes a product
                root = doc.get("products", type=pycrdt.Map)
                if sku in root:
                    del root[sku]
            if i % 7 == 0:
                since = HLC0 + rng.randrange(i + 1)
                page, nxt = index.changed(doc, since)
                assert nxt is None and page == products(doc, since)
                assert index.version(doc) == catalog_version(doc)
        everything = products(doc)
        got: list[dict[str, Any]] = []
        after = None
        while True:  # paging visits every product once, in SKU order
            page, after = index.changed(doc, 0, after=after, limit=7)
            got.extend(page)
            if after is None:
                break
        assert got == everything
        fresh: Doc = pycrdt.Doc()  # another document: the index follows it
        assert index.changed(fresh) == ([], None) and index.version(fresh) == 0
    finally:
        index.close()


def test_writer_client_ids_are_stable_and_distinct() -> None:
    ids = {catalog.client_id(f"node-{i}") for i in range(1000)}
    assert len(ids) == 1000 and all(0 < i < 2**53 for i in ids)
    assert catalog.client_id("edge") == catalog.client_id("edge")


# --- real nodes --------------------------------------------------------------------------


async def wait_until(predicate: Callable[[], bool], what: str,
                     within: float = DEADLINE_S) -> None:
    deadline = time.monotonic() + within
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within}s waiting for {what}")
        await asyncio.sleep(0.02)


@dataclass
class Store:
    """One store's data directories, and its running nodes (closed at the end)."""

    root: Path
    nodes: list[Node] = field(default_factory=list)
    store_key: NodeKey = field(init=False)

    def __post_init__(self) -> None:
        ident = init_store(self.root / "edge", "store-1", now_ms=now_ms(), node_id="edge")
        assert ident.store_key is not None
        self.store_key = ident.store_key
        # a back-office integration's credential for every request (meshkit.client),
        # and a till with a manager on the roster
        use_token(issue_token(ident))
        self.till = issue_token(ident, "till-1", role="pos")
        self.roster = add_staff(ident, "manager-ann", "manager")

    def enrol(self, node_id: str, role: str) -> Path:
        enrol_node(self.root / node_id, self.store_key, "store-1", role, now_ms=now_ms(),
                   node_id=node_id)
        return self.root / node_id

    async def start(self, node_id: str, peers: list[str] | None = None) -> Node:
        node = Node(self.root / node_id, insecure_plaintext=True,
                    http_host="127.0.0.1", http_port=0,
                    discovery=False, peers=peers or [])
        # Until Node._setup_optional_routes adds it; a second call is a no-op.
        catalog_routes.setup_catalog_routes(node.app, node)
        await node.start()
        self.nodes.append(node)
        return node

    async def stop(self, node: Node) -> None:
        """Close ``node`` and let its peers notice.

        ``Node._timer_loop`` waits with ``asyncio.wait_for``, which in Python 3.11 can
        swallow a cancellation that arrives as its wait completes (a peer's message or
        session end woke it); ``Node.close`` then waits forever for that task. Until the
        loop is fixed, cancel the node's tasks again while ``close`` is waiting."""
        closing = asyncio.ensure_future(node.close())
        while not closing.done():
            await asyncio.wait({closing}, timeout=0.5)
            if not closing.done():
                for task in list(node._tasks):
                    task.cancel()
        await closing
        node_id = node.identity.node_id
        live = [n for n in self.nodes if not n._closed]
        await wait_until(lambda: all(node_id not in n.sessions for n in live),
                         "the peers to drop the session")

    async def close(self) -> None:
        for node in reversed(self.nodes):
            if not node._closed:
                await self.stop(node)


@pytest_asyncio.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    s = Store(tmp_path)
    try:
        yield s
    finally:
        await s.close()


async def call(node: Node, method: str, path: str, body: Json = None,
               headers: dict[str, str] | None = None) -> tuple[int, Json]:
    async with client() as http, http.request(
            method, node.url + path, data=None if body is None else orjson.dumps(body),
            headers={"Content-Type": "application/json", **(headers or {})}) as resp:
        assert resp.content_type == "application/json", await resp.text()
        return resp.status, orjson.loads(await resp.read())


async def put(node: Node, sku: str, body: Json, headers: dict[str, str] | None = None
              ) -> tuple[int, Json]:
    return await call(node, "PUT", f"/v1/catalog/{sku}", body, headers)


async def get(node: Node, path: str) -> tuple[int, Json]:
    return await call(node, "GET", path)


def price(node: Node, sku: str) -> int | None:
    p = product(node.replica.catalog, sku)
    return None if p is None else p["price_cents"]


async def ledger_count(node: Node) -> int:
    return await asyncio.to_thread(node.durable.ledger.count)


@pytest.mark.asyncio
async def test_an_edge_writes_and_a_register_sees_it(store: Store) -> None:
    store.enrol("r1", "register")
    edge = await store.start("edge")
    reg = await store.start("r1", [edge.url])

    async with client() as http:  # the manager logs in at the till
        ann = await login(http, edge.url, store.till, "manager-ann", roster=store.roster)
    status, body = await put(edge, "4006381333931", {
        "txn_id": "cat-1", "name": "Pencil HB", "price_cents": 1999, "tax_class": "standard",
        "staff_id": "manager-ann"}, ann)
    assert status == 201, body
    assert body["duplicate"] is False and body["origin"] == "edge" and body["seq"] == 1
    assert (body["sku"], body["name"], body["price_cents"]) == ("4006381333931", "Pencil HB",
                                                                1999)
    # rev is the HLC of the envelope that carried the change
    status, audit = await get(edge, "/v1/audit?limit=1")
    [entry] = audit["entries"]
    assert entry["kind"] == "catalog" and entry["staff_id"] == "manager-ann"
    assert body["rev"] == entry["hlc"] and body["by"] == "edge"

    await wait_until(lambda: price(reg, "4006381333931") == 1999, "the product at the register")
    status, seen = await get(reg, "/v1/catalog/4006381333931")
    assert status == 200 and seen == {k: v for k, v in body.items()
                                      if k not in ("txn_id", "origin", "seq", "duplicate")}

    # a price change (only the price) propagates and keeps the other fields
    big = 2**31 + 12_345
    status, body = await put(edge, "4006381333931", {"txn_id": "cat-2", "price_cents": big})
    assert status == 201 and body["price_cents"] == big and body["name"] == "Pencil HB"
    await wait_until(lambda: price(reg, "4006381333931") == big, "the new price at the register")
    status, seen = await get(reg, "/v1/catalog/4006381333931")
    assert seen["price_cents"] == big and type(seen["price_cents"]) is int
    assert seen["name"] == "Pencil HB" and seen["tax_class"] == "standard"
    assert seen["active"] is True and seen["rev"] == body["rev"]

    # a retried request changes nothing and answers with the original origin/seq
    count = await ledger_count(edge)
    status, again = await put(edge, "4006381333931", {"txn_id": "cat-2", "price_cents": big})
    assert status == 200 and again["duplicate"] is True and again["seq"] == 2
    assert await ledger_count(edge) == count

    status, missing = await get(reg, "/v1/catalog/NOPE")
    assert status == 404 and missing["error"]["field"] == "sku"


@pytest.mark.asyncio
async def test_a_register_serves_prices_while_offline(store: Store) -> None:
    store.enrol("r1", "register")
    edge = await store.start("edge")
    reg = await store.start("r1", [edge.url])
    status, _ = await put(edge, "MILK", {"txn_id": "c1", "name": "Milk 1l", "price_cents": 119})
    assert status == 201
    await wait_until(lambda: price(reg, "MILK") == 119, "the product at the register")
    edge_url = edge.url
    await store.stop(edge)
    await wait_until(lambda: not any(p["up"] for p in reg.peer_status()), "the link to drop")

    status, body = await get(reg, "/v1/catalog/MILK")
    assert status == 200 and body["price_cents"] == 119
    status, listing = await get(reg, "/v1/catalog")
    assert status == 200 and [p["sku"] for p in listing["products"]] == ["MILK"]

    # and after a restart with the edge still gone (the catalog comes from its own ledger)
    await store.stop(reg)
    reg2 = await store.start("r1", [edge_url])
    status, body = await get(reg2, "/v1/catalog/MILK")
    assert status == 200 and body["price_cents"] == 119 and body["name"] == "Milk 1l"


async def scrape(node: Node) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    async with aiohttp.ClientSession() as http, http.get(node.url + "/metrics") as resp:
        text = await resp.text()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


@pytest.mark.asyncio
async def test_a_registers_write_is_refused_and_counted(store: Store) -> None:
    store.enrol("r1", "register")
    edge = await store.start("edge")
    reg = await store.start("r1", [edge.url])
    await put(edge, "TV", {"txn_id": "c1", "name": "TV", "price_cents": 49_900})
    await wait_until(lambda: price(reg, "TV") == 49_900, "the product at the register")
    await wait_until(lambda: reg.durable.ledger.last_id == 1, "the register's ledger write")

    for body in ({"txn_id": "r-1", "price_cents": 1}, {"txn_id": "r-2", "name": "Free TV",
                                                       "price_cents": 0}, {"bogus": 1}):
        status, err = await put(reg, "TV", body)
        assert status == 403 and err["error"]["field"] == "role", err
    assert reg.rejected_sessions[FORBIDDEN_KEY] == 3
    m = await scrape(reg)
    key = ("storemesh_envelopes_rejected_total", (("reason", "session_" + FORBIDDEN_KEY),))
    assert m[key] == 3
    assert price(reg, "TV") == 49_900 and await ledger_count(reg) == 1
    # reads are fine on a register
    status, body = await get(reg, "/v1/catalog/TV")
    assert status == 200 and body["price_cents"] == 49_900


@pytest.mark.asyncio
async def test_a_catalog_envelope_signed_by_a_register_is_refused(store: Store) -> None:
    """The register's own key, a real authenticated session: the edge refuses the op."""
    r1_dir = store.enrol("r1", "register")
    edge = await store.start("edge")
    await put(edge, "TV", {"txn_id": "c1", "name": "TV", "price_cents": 49_900})
    version, count = catalog_version(edge.replica.catalog), await ledger_count(edge)

    ident = load_identity(r1_dir)  # the register's NodeKey and certificate
    update = make_update(edge.replica.catalog, "TV", {"price_cents": 1}, rev=now_ms() << 16,
                         by="r1")
    env = seal(ident.key, store="store-1", origin="r1", seq=1, prev=None, hlc=now_ms() << 16,
               ops=[{"t": "cat", "u": base64.b64encode(update).decode()}],
               meta={"kind": "catalog", "txn": "forged-1"})
    async with aiohttp.ClientSession() as http:
        session = await transport.dial(http, edge.url, ident, now_ms)
        try:
            await wait_until(lambda: "r1" in edge.sessions, "the session at the edge")
            data = encode_batch([env.raw])  # as the negotiated LAN codec carries it
            await session.ws.send_bytes(session.codec.encode(data) if session.codec else data)
            await wait_until(lambda: edge.core.stats.get("forbidden", 0) >= 1,
                             "the edge to refuse the envelope")
        finally:
            await session.ws.close()
    assert edge.core.stats["forbidden"] == 1
    assert price(edge, "TV") == 49_900 and catalog_version(edge.replica.catalog) == version
    assert edge.replica.vv.get("r1") == 0 and await ledger_count(edge) == count


@pytest.mark.asyncio
async def test_since_lists_only_later_changes(store: Store) -> None:
    edge = await store.start("edge")
    for sku, cents in (("B", 200), ("A", 100), ("C", 300)):
        status, _ = await put(edge, sku, {"txn_id": f"new-{sku}", "name": sku,
                                          "price_cents": cents})
        assert status == 201
    status, first = await get(edge, "/v1/catalog")
    assert status == 200 and [p["sku"] for p in first["products"]] == ["A", "B", "C"]
    assert first["version"] == max(p["rev"] for p in first["products"]) and first["next"] is None

    status, body = await put(edge, "B", {"txn_id": "b-2", "price_cents": 250})
    assert status == 201
    status, later = await get(edge, f"/v1/catalog?since={first['version']}")
    assert status == 200 and [(p["sku"], p["price_cents"]) for p in later["products"]] == [
        ("B", 250)]
    assert later["version"] == body["rev"] > first["version"]
    status, none = await get(edge, f"/v1/catalog?since={later['version']}")
    assert none["products"] == [] and none["version"] == later["version"]

    status, page = await get(edge, "/v1/catalog?limit=2")
    assert [p["sku"] for p in page["products"]] == ["A", "B"] and page["next"] == "B"
    status, page = await get(edge, "/v1/catalog?limit=2&after=B")
    assert [p["sku"] for p in page["products"]] == ["C"] and page["next"] is None
    status, err = await get(edge, "/v1/catalog?since=-1")
    assert status == 400 and err["error"]["field"] == "since"


@pytest.mark.asyncio
async def test_concurrent_price_changes_at_two_edges_converge(store: Store) -> None:
    store.enrol("edge2", "edge")
    store.enrol("r1", "register")
    edge1 = await store.start("edge")
    edge2 = await store.start("edge2")
    status, _ = await put(edge1, "P", {"txn_id": "p-1", "name": "Pen", "price_cents": 100})
    assert status == 201
    # the register is the only link between the two edges: while it runs they share
    bridge = await store.start("r1", [edge1.url, edge2.url])
    await wait_until(lambda: price(edge2, "P") == 100, "the product at the second edge")
    await store.stop(bridge)
    await wait_until(lambda: not edge1.sessions and not edge2.sessions, "the links to drop")

    # cut off from each other, both edges change the price, and both create "N"
    results = await asyncio.gather(
        put(edge1, "P", {"txn_id": "p-e1", "price_cents": 111}),
        put(edge2, "P", {"txn_id": "p-e2", "price_cents": 222, "name": "Pen (new)"}),
        put(edge1, "N", {"txn_id": "n-e1", "name": "Notebook", "price_cents": 500}),
        put(edge2, "N", {"txn_id": "n-e2", "name": "Notepad", "price_cents": 450}))
    assert [s for s, _ in results] == [201] * 4
    assert price(edge1, "P") == 111 and price(edge2, "P") == 222

    reg = await store.start("r1", [edge1.url, edge2.url])
    nodes = (edge1, edge2, reg)

    def agreed() -> bool:
        views = [products(n.replica.catalog) for n in nodes]
        return len(views[0]) == 2 and views[0] == views[1] == views[2]

    await wait_until(agreed, "the three catalogs to agree")
    listings = [await get(n, "/v1/catalog") for n in nodes]
    assert listings[0] == listings[1] == listings[2]
    n, p = listings[0][1]["products"]
    # the same write won the price everywhere; the name only edge2 changed is kept
    assert (p["price_cents"], p["by"], p["name"]) in {(111, "edge", "Pen (new)"),
                                                      (222, "edge2", "Pen (new)")}
    assert (n["name"], n["price_cents"], n["by"]) in {("Notebook", 500, "edge"),
                                                      ("Notepad", 450, "edge2")}


BAD_PUTS = [
    ("negative price", {"price_cents": -1}, "price_cents"),
    ("float price", {"price_cents": 19.99}, "price_cents"),
    ("integral float price", {"price_cents": 1999.0}, "price_cents"),
    ("price as text", {"price_cents": "1999"}, "price_cents"),
    ("unknown field", {"price": 1999}, "price"),
    ("name too long", {"name": "n" * (MAX_NAME_LEN + 1)}, "name"),
    ("bad tax class", {"tax_class": "20%"}, "tax_class"),
    ("active not bool", {"active": "no"}, "active"),
    ("nothing to change", {}, None),
]


@pytest.mark.asyncio
@pytest.mark.parametrize(("case", "body", "bad"), BAD_PUTS, ids=[c[0] for c in BAD_PUTS])
async def test_bad_input_is_refused_naming_the_field_and_changes_nothing(
        store: Store, case: str, body: Json, bad: str | None) -> None:
    edge = await store.start("edge")
    status, _ = await put(edge, "A", {"txn_id": "a-1", "name": "Apple", "price_cents": 100})
    assert status == 201
    before = (await get(edge, "/v1/catalog/A"), await ledger_count(edge))
    status, err = await put(edge, "A", {"txn_id": "bad-1", **body})
    assert status == 400 and set(err) == {"error"}, err
    assert err["error"]["field"] == bad and err["error"]["message"]
    assert (await get(edge, "/v1/catalog/A"), await ledger_count(edge)) == before


@pytest.mark.asyncio
async def test_a_reused_txn_id_with_other_content_is_refused(store: Store) -> None:
    edge = await store.start("edge")
    status, _ = await put(edge, "A", {"txn_id": "t-1", "name": "Apple", "price_cents": 100})
    assert status == 201
    status, err = await put(edge, "A", {"txn_id": "t-1", "price_cents": 90})
    assert status == 422 and err["error"]["field"] == "txn_id", err


@pytest.mark.asyncio
async def test_new_product_and_key_refusals(store: Store) -> None:
    edge = await store.start("edge")
    status, err = await put(edge, "NEW", {"txn_id": "n-1", "name": "No price yet"})
    assert status == 400 and err["error"]["field"] == "price_cents"
    status, err = await put(edge, "NEW", {"name": "No key", "price_cents": 1})
    assert status == 400 and err["error"]["field"] == "txn_id"
    status, err = await get(edge, "/v1/catalog/NEW")
    assert status == 404 and err["error"]["field"] == "sku"
    assert await ledger_count(edge) == 0

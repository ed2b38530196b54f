"""Fleet analytics (mesh.cloud.analytics): exactly-once aggregation, catch-up, the endpoints.

* Store level (no network): the analytics store over a real ledger — re-fed envelopes,
  gaps in the live feed, a restart from an old copy of the database, and a writer
  process killed with SIGKILL at random points (this file is also the child's script:
  ``python tests/node/test_analytics.py child ...``).
* Fleet level: a CloudNode and two stores (edge + register each), real Nodes on
  127.0.0.1 in this process: sales in both stores reach the analytics; the cloud is
  stopped while the stores keep selling, then restarted, and the analytics catch up
  exactly; bad query parameters get 400 JSON.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import pytest_asyncio

from mesh.cloud.analytics import HOUR_MS, Analytics, AnalyticsStore, fact_of
from mesh.cloud.dashboard import setup_dashboard
from mesh.cloud.server import CloudNode
from mesh.core.envelope import Envelope, decode
from mesh.core.identity import NodeKey, TrustStore
from mesh.core.replica import Replica
from mesh.node.node import Node
from mesh.store.datadir import enrol_node, init_store
from mesh.store.ledger import Ledger

LOOPBACK = "127.0.0.1"


def add_hq_user(cloud_root: Path) -> None:
    from tests.meshkit import add_hq_user as add  # (not at import: the child runs alone)

    add(cloud_root)


def hq_session(cloud_url: str) -> Any:
    from tests.meshkit import hq_session as session

    return session(cloud_url)


async def hq_login(http: aiohttp.ClientSession, cloud_url: str) -> None:
    from tests.meshkit import hq_login as login

    await login(http, cloud_url)
Totals = Counter[tuple[str, str, int, str]]  # (store, sku, hour, kind) -> qty


def now_ms() -> int:
    return time.time_ns() // 1_000_000


async def until(probe: Callable[[], Awaitable[Any]], *, within: float, what: str) -> Any:
    """Poll ``probe`` until it returns something truthy (bounded); fail with the last value."""
    deadline = time.monotonic() + within
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = await probe()
        except (aiohttp.ClientError, OSError) as exc:
            last = exc
        else:
            if last:
                return last
        await asyncio.sleep(0.05)
    pytest.fail(f"not within {within} s: {what}; last seen: {last!r}"[:3000])


# --- a ledger of one store's envelopes, made without a network --------------------------------


def make_envelopes(store: str, n_per_origin: int, seed: int) -> list[Envelope]:
    """Three origins' receipts, sales, returns and adjustments, interleaved at random but
    in seq order per origin (as any ledger holds them), spread over several hours."""
    rng = random.Random(seed)
    replicas = [Replica(store, node_id, "edge" if node_id == "edge" else "register",
                        NodeKey.generate()) for node_id in ("edge", "r1", "r2")]
    queues: list[list[Envelope]] = []
    t0 = 1_790_000_000_000
    for r in replicas:
        envs: list[Envelope] = []
        for i in range(n_per_origin):
            now = t0 + i * 60_000 + rng.randrange(1000)  # a minute apart: ~hours of data
            sku = f"sku-{rng.randrange(4)}"
            if i < 4:
                res = r.receive(f"sku-{i}", 10_000, txn=f"{r.node_id}-rcv-{i}", now_ms=now)
            elif rng.random() < 0.8:
                res = r.sell(sku, rng.randint(1, 3), txn=f"{r.node_id}-s-{i}", now_ms=now)
            elif rng.random() < 0.5:
                res = r.return_(sku, 1, txn=f"{r.node_id}-ret-{i}", now_ms=now)
            else:
                res = r.adjust(sku, -1, reason="damage", txn=f"{r.node_id}-adj-{i}", now_ms=now)
            assert res.envelope is not None
            envs.append(res.envelope)
        queues.append(envs)
    out: list[Envelope] = []
    while any(queues):
        q = rng.choice([q for q in queues if q])
        out.append(q.pop(0))
    return out


def write_ledger(path: Path, envs: Sequence[Envelope]) -> None:
    with Ledger(path) as ledger:
        ledger.append_sync(envs)


def expected(store: str, envs: Sequence[Envelope]) -> Totals:
    """What the aggregates must hold for exactly these envelopes (independently computed)."""
    out: Totals = Counter()
    for env in envs:
        kind = env.meta["kind"]
        if kind in ("receipt", "sale", "return", "adjust", "fulfil"):
            out[(store, env.meta["sku"], (env.hlc >> 16) // HOUR_MS * HOUR_MS, kind)] += \
                env.meta["qty"]
    return out


def db_totals(db: Path) -> tuple[Totals, Counter[tuple[str, str, int, str]]]:
    """(qty, events) per (store, sku, hour, kind), read straight from the database."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        qty: Totals = Counter()
        events: Counter[tuple[str, str, int, str]] = Counter()
        for store, sku, hour, kind, n, q in conn.execute(
                "SELECT store, sku, hour_ms, kind, events, qty FROM movements_hourly"):
            qty[(store, sku, hour, kind)] = q
            events[(store, sku, hour, kind)] = n
        return qty, events
    finally:
        conn.close()


def db_watermarks(db: Path) -> dict[tuple[str, str], int]:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return {(s, o): q for s, o, q in conn.execute(
            "SELECT store, origin, seq FROM watermarks")}
    finally:
        conn.close()


def assert_consistent(db: Path, store: str, envs: Sequence[Envelope]) -> int:
    """The aggregates are exactly those of every origin's envelopes up to its watermark:
    nothing lost, nothing counted twice. Returns how many envelopes that covers."""
    marks = db_watermarks(db)
    covered = [e for e in envs if e.seq <= marks.get((store, e.origin), 0)]
    want = expected(store, covered)
    got, events = db_totals(db)
    assert dict(got) == dict(want), "aggregates differ from what the watermarks cover"
    want_events = Counter((store, e.meta["sku"], (e.hlc >> 16) // HOUR_MS * HOUR_MS,
                           e.meta["kind"]) for e in covered if "sku" in e.meta)
    assert events == want_events
    return len(covered)


def restore(copy: Path, db: Path) -> None:
    """Put an old copy of a database in place (with no WAL of the newer one)."""
    for suffix in ("-wal", "-shm"):
        Path(f"{db}{suffix}").unlink(missing_ok=True)
    shutil.copy(copy, db)


def feed(store: AnalyticsStore, store_id: str, envs: Sequence[Envelope], rng: random.Random,
         *, skip: float = 0.0) -> None:
    """Submit envelopes in random-sized batches, as node listeners do; ``skip`` drops
    that share of the batches (a feed with gaps)."""
    i = 0
    while i < len(envs):
        n = rng.randint(1, 20)
        if rng.random() >= skip:
            store.submit(store_id, [fact_of(e) for e in envs[i:i + n]], now_ms())
        i += n


# --- store level -------------------------------------------------------------------------


def test_refeed_and_gaps_count_once(tmp_path: Path) -> None:
    envs = make_envelopes("s1", 150, seed=1)
    write_ledger(tmp_path / "ledger.sqlite", envs)
    db = tmp_path / "analytics.sqlite"
    rng = random.Random(2)
    store = AnalyticsStore(db)
    try:
        feed(store, "s1", envs, rng)
        store.flush(10)
        assert assert_consistent(db, "s1", envs) == len(envs)
        feed(store, "s1", envs, rng)  # the same envelopes again: all skipped
        feed(store, "s1", envs[::-1], rng)
        store.flush(10)
        assert assert_consistent(db, "s1", envs) == len(envs)
        assert store.aggregated == len(envs) and store.skipped == 2 * len(envs)
    finally:
        store.close()

    # A live feed with holes (a full queue, envelopes that arrived before a restart):
    # nothing past a hole is aggregated from the feed; the ledger fills the hole.
    db2 = tmp_path / "gappy.sqlite"
    store = AnalyticsStore(db2)
    try:
        feed(store, "s1", envs, rng, skip=0.3)
        store.flush(10)
        covered = assert_consistent(db2, "s1", envs)
        assert covered < len(envs)
        with Ledger(tmp_path / "ledger.sqlite") as ledger:
            store.add_source("s1", ledger)
            store.flush(10)
            assert assert_consistent(db2, "s1", envs) == len(envs)
            feed(store, "s1", envs, rng)
            store.flush(10)
            store.remove_source("s1")
        assert assert_consistent(db2, "s1", envs) == len(envs)
    finally:
        store.close()


def test_restart_from_stale_copy_catches_up_exactly(tmp_path: Path) -> None:
    """A restart whose database is behind the ledger (a crash after the ledger append,
    or an old backup restored): catch-up adds exactly what the watermarks miss."""
    envs = make_envelopes("s1", 200, seed=3)
    ledger_path = tmp_path / "ledger.sqlite"
    write_ledger(ledger_path, envs)
    db = tmp_path / "analytics.sqlite"
    rng = random.Random(4)
    store = AnalyticsStore(db)
    feed(store, "s1", envs[:250], rng)
    store.close()  # checkpoints the WAL into the main file
    backup = tmp_path / "backup.sqlite"
    shutil.copy(db, backup)
    assert assert_consistent(db, "s1", envs) == 250

    store = AnalyticsStore(db)
    feed(store, "s1", envs, rng)
    store.close()
    assert assert_consistent(db, "s1", envs) == len(envs)

    restore(backup, db)  # the stale copy: watermarks and aggregates of 250 envelopes
    store = AnalyticsStore(db)
    try:
        with Ledger(ledger_path) as ledger:
            store.catch_up_page = 37  # many transactions
            store.add_source("s1", ledger)
            feed(store, "s1", envs[100:300], rng)  # the live feed races the catch-up
            store.flush(10)
            store.remove_source("s1")
        assert store.aggregated == len(envs) - 250
    finally:
        store.close()
    assert assert_consistent(db, "s1", envs) == len(envs)


# The crash test: a child process aggregates with a pause inside each transaction
# (between the writes and the COMMIT) and is killed with SIGKILL at random moments.


class _SlowCommit:
    """A connection proxy that pauses before each COMMIT (so a kill often lands inside a
    transaction) and reports each commit on stdout."""

    def __init__(self, conn: sqlite3.Connection, delay: float) -> None:
        self._conn = conn
        self._delay = delay

    def execute(self, sql: str, *args: Any) -> Any:
        if sql == "COMMIT":
            time.sleep(self._delay)
            result = self._conn.execute(sql, *args)
            print("commit", flush=True)
            return result
        return self._conn.execute(sql, *args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn, name)


def _child(db: str, ledger_path: str, store_id: str, mode: str, delay: float, seed: int) -> None:
    if delay:
        real_open = AnalyticsStore._open
        AnalyticsStore._open = lambda self: _SlowCommit(real_open(self), delay)  # type: ignore[method-assign,assignment,return-value]
    rng = random.Random(seed)
    with Ledger(ledger_path) as ledger:
        envs = [decode(raw) for _, raw in ledger.scan()]
        store = AnalyticsStore(db)
        store.catch_up_page = 25
        if mode == "catchup":
            store.add_source(store_id, ledger)
        else:
            # batch by batch, each its own transaction
            for i in range(0, len(envs), 10):
                if mode == "gappy" and rng.random() < 0.2:
                    continue
                store.submit(store_id, [fact_of(e) for e in envs[i:i + 10]], now_ms())
                store.flush(30)
            store.add_source(store_id, ledger)
        store.flush(60)
        store.close()
    print("done", flush=True)


def test_sigkill_mid_transaction_loses_and_doubles_nothing(tmp_path: Path) -> None:
    envs = make_envelopes("s1", 300, seed=5)
    ledger_path = tmp_path / "ledger.sqlite"
    write_ledger(ledger_path, envs)
    db = tmp_path / "analytics.sqlite"
    rng = random.Random(6)
    kills = 0
    for round_no, mode in enumerate(("live", "catchup", "gappy", "live")):
        errlog = tmp_path / f"child-{round_no}.log"
        with errlog.open("wb") as err, subprocess.Popen(
            [sys.executable, __file__, "child", str(db), str(ledger_path), "s1", mode,
             "0.01", str(round_no)],
            stdout=subprocess.PIPE, stderr=err, start_new_session=True,
        ) as proc:
            assert proc.stdout is not None
            try:
                target = rng.randint(2, 12)
                commits = 0
                for line in proc.stdout:
                    if line.strip() == b"commit":
                        commits += 1
                    if commits >= target or line.strip() == b"done":
                        break
                if proc.poll() is None:
                    os.kill(proc.pid, signal.SIGKILL)
                    kills += 1
                proc.wait(10)
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait(10)
        assert proc.returncode in (0, -signal.SIGKILL), errlog.read_text()
        covered = assert_consistent(db, "s1", envs)  # after every kill: an exact prefix
        assert 0 <= covered <= len(envs)
    assert kills >= 3

    # And a last, unhurried run: everything, exactly once.
    done = subprocess.run(
        [sys.executable, __file__, "child", str(db), str(ledger_path), "s1", "catchup", "0",
         "9"], capture_output=True, timeout=60, check=False)
    assert done.returncode == 0 and done.stdout.strip().endswith(b"done"), done.stderr
    assert assert_consistent(db, "s1", envs) == len(envs)
    got, _ = db_totals(db)
    sold = sum(-e.meta["qty"] for e in envs if e.meta["kind"] == "sale")
    assert -sum(q for k, q in got.items() if k[3] == "sale") == sold


# --- fleet level -------------------------------------------------------------------------


class Fleet:
    """A cloud peer and stores of an edge and a register each, in this process."""

    def __init__(self, base: Path, store_ids: Sequence[str], *, tls: bool = False) -> None:
        """``tls``: every link and the cloud's server TLS, as in production (the
        dashboard tests, in a browser); else the plain-text loopback mode."""
        self.base = base
        self.tls = tls
        self.cloud_root = base / "cloud"
        self.store_ids = list(store_ids)
        self.cloud: CloudNode | None = None
        self.port = 0
        self.edges: dict[str, Node] = {}
        self.regs: dict[str, Node] = {}
        #: Acknowledged sales per (store, sku): [count, units].
        self.sold: dict[tuple[str, str], list[int]] = {}
        self._txn = itertools.count(1)
        self.tokens: dict[str, str] = {}  # store id -> an integration's credential
        t = now_ms()
        for sid in store_ids:
            edge = init_store(base / sid / "edge", sid, now_ms=t, node_id=f"edge-{sid}")
            assert edge.store_key is not None
            for role, path, node_id in (("register", base / sid / "reg", f"reg-{sid}"),
                                        ("cloud", self.cloud_root / sid, f"cloud-{sid}")):
                ident = enrol_node(path, edge.store_key, sid, role, now_ms=t, node_id=node_id,
                                   trust=TrustStore.from_dict(edge.trust.to_dict()))
                edge.trust.add_certificate(ident.certificate)
            edge.save()
        add_hq_user(self.cloud_root)  # head office logs in to the fleet views

    @property
    def analytics(self) -> Analytics:
        assert self.cloud is not None
        found = Analytics.of(self.cloud)
        assert found is not None
        return found

    @property
    def url(self) -> str:
        assert self.cloud is not None
        return self.cloud.url

    async def start_cloud(self) -> CloudNode:
        cloud = CloudNode(self.cloud_root, insecure_plaintext=not self.tls,
                          http_host=LOOPBACK, http_port=self.port)
        cloud.setup_hooks.append(setup_dashboard)
        await cloud.start()
        self.cloud, self.port = cloud, cloud.http_port
        return cloud

    async def stop_cloud(self) -> None:
        if self.cloud is not None:
            await self.cloud.close()
            self.cloud = None

    async def start_stores(self) -> None:
        assert self.port, "start the cloud first: the edges dial its URL"
        for sid in self.store_ids:
            scheme = "https" if self.tls else "http"
            edge = Node(self.base / sid / "edge", insecure_plaintext=not self.tls,
                        http_host=LOOPBACK, discovery=False,
                        wan_peers=[f"{scheme}://{LOOPBACK}:{self.port}/stores/{sid}"])
            await edge.start()
            self.edges[sid] = edge
            reg = Node(self.base / sid / "reg", insecure_plaintext=not self.tls,
                       http_host=LOOPBACK, discovery=False,
                       peers=[edge.url])
            await reg.start()
            self.regs[sid] = reg
            self._use_token(sid, edge.url, reg.url)

    def _use_token(self, sid: str, *urls: str) -> None:
        """``tests.meshkit.client()`` sends store ``sid``'s integration credential to
        its nodes (its edge, its register, its replica at the cloud)."""
        from tests import meshkit

        if sid not in self.tokens:
            self.tokens[sid] = meshkit.issue_token(self.base / sid / "edge")
        meshkit.use_store_token(sid, self.tokens[sid], *urls)

    async def receive(self, sid: str, sku: str, qty: int) -> None:
        txn = f"rcv-{next(self._txn)}"
        await self.edges[sid].execute(lambda r: r.receive(sku, qty, txn=txn, now_ms=now_ms()))

        async def known() -> bool:
            return self.regs[sid].replica.knows_sku(sku)
        await until(known, within=10, what=f"register of {sid} learns {sku}")

    async def sell(self, sid: str, sku: str, qty: int) -> None:
        txn = f"sale-{next(self._txn)}"
        await self.regs[sid].execute(lambda r: r.sell(sku, qty, txn=txn, now_ms=now_ms()))
        tally = self.sold.setdefault((sid, sku), [0, 0])
        tally[0] += 1
        tally[1] += qty

    def want_sales(self) -> dict[str, Any]:
        by_store: dict[str, list[int]] = {}
        for (sid, _), (n, u) in self.sold.items():
            t = by_store.setdefault(sid, [0, 0])
            t[0] += n
            t[1] += u
        return {"totals": {"sales": sum(t[0] for t in by_store.values()),
                           "units": sum(t[1] for t in by_store.values())},
                "by_store": [{"store": s, "sales": t[0], "units": t[1]}
                             for s, t in sorted(by_store.items())]}

    async def close(self) -> None:
        for node in [*self.regs.values(), *self.edges.values()]:
            await node.close()
        await self.stop_cloud()


@pytest_asyncio.fixture
async def fleet(tmp_path: Path) -> AsyncIterator[Fleet]:
    f = Fleet(tmp_path, ["s1", "s2"])
    try:
        yield f
    finally:
        await f.close()


async def get(http: aiohttp.ClientSession, url: str) -> tuple[int, Any]:
    async with http.get(url) as resp:
        assert resp.content_type == "application/json", await resp.text()
        return resp.status, orjson.loads(await resp.read())


async def get_ok(http: aiohttp.ClientSession, url: str) -> Any:
    status, body = await get(http, url)
    assert status == 200, body
    return body


@pytest.mark.asyncio
async def test_fleet_sales_stock_health_and_exact_catch_up(fleet: Fleet) -> None:
    await fleet.start_cloud()
    await fleet.start_stores()
    await fleet.receive("s1", "sku-a", 100)
    await fleet.receive("s2", "sku-a", 50)
    await fleet.receive("s2", "sku-b", 1)
    await fleet.sell("s1", "sku-a", 1)
    await fleet.analytics.flush()

    async def first_sale() -> bool:
        return fleet.analytics.store.aggregated >= 1 + 3  # the sale + 3 receipts
    await until(first_sale, within=10, what="the first sale reaches the analytics")
    # A consistent copy of the analytics database as it is now: restored before the
    # restart below, it is a database whose watermarks lag the cloud's ledgers.
    db = fleet.cloud_root / "analytics.sqlite"
    stale = fleet.base / "stale.sqlite"
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as src, \
            sqlite3.connect(stale) as dst:
        src.backup(dst)
    src.close()
    dst.close()
    stale_covered = sum(db_watermarks(stale).values())
    assert stale_covered >= 4
    for qty in (2, 1):
        await fleet.sell("s1", "sku-a", qty)
    await fleet.sell("s2", "sku-a", 2)
    await fleet.sell("s2", "sku-b", 3)  # 2 more than there are: an oversell exception

    async with hq_session(fleet.url) as http:
        want = fleet.want_sales()

        async def sales_arrived() -> Any:
            body = await get_ok(http, f"{fleet.url}/v1/fleet/sales?hours=24")
            got = {"totals": body["totals"], "by_store": body["by_store"]}
            return body if got == want else None
        sales = await until(sales_arrived, within=20, what=f"fleet sales {want}")
        assert sum(h["units"] for h in sales["hourly"]) == want["totals"]["units"]
        assert len(sales["hourly"]) == 24
        assert {(r["store"], r["sku"]): (r["sales"], r["units"]) for r in sales["rows"]} == \
            {k: tuple(v) for k, v in fleet.sold.items()}

        one = await get_ok(http, f"{fleet.url}/v1/fleet/sales?sku=sku-a&store=s2")
        assert one["totals"] == {"sales": 1, "units": 2}

        async def stock_converged() -> Any:
            body = await get_ok(http, f"{fleet.url}/v1/fleet/stock?sku=sku-a")
            stores = {s["store"]: s["on_hand"] for s in body["stock"][0]["stores"]}
            return body if stores == {"s1": 96, "s2": 48} else None
        stock = await until(stock_converged, within=10, what="fleet stock of sku-a")
        assert stock["stock"][0]["on_hand"] == 144 and stock["next"] is None
        every = await get_ok(http, f"{fleet.url}/v1/fleet/stock")
        assert [e["sku"] for e in every["stock"]] == ["sku-a", "sku-b"]

        exc = await get_ok(http, f"{fleet.url}/v1/fleet/exceptions")
        assert [(e["store"], e["sku"], e["kind"], e["short"], e["origin"])
                for e in exc["exceptions"]] == [("s2", "sku-b", "sale", 2, "reg-s2")]
        assert exc["totals"]["by_store"] == {"s1": {"count": 0, "short_units": 0},
                                             "s2": {"count": 1, "short_units": 2}}

        health = await get_ok(http, f"{fleet.url}/v1/fleet/health")
        assert [s["store"] for s in health["stores"]] == ["s1", "s2"]
        for s in health["stores"]:
            assert s["status"] == "online" and s["peers_up"] == 1 and s["backlog"] == 0
            assert s["analytics_behind"] == 0 and s["aggregated"] == s["envelopes"]
            assert s["wan_bytes"]["in"] > 0 and s["wan_bytes"]["out"] > 0
            assert 0 <= s["lag_ms"] < 60_000
            nodes = {n["node_id"]: n for n in s["nodes"]}
            sid = s["store"]
            assert nodes[f"edge-{sid}"]["session"] == "up"
            reg = nodes[f"reg-{sid}"]
            assert reg["role"] == "register" and reg["session"] is None
            assert reg["held_seq"] == reg["aggregated_seq"] > 0
            assert reg["last_seen_ms"] is not None

        # The cloud goes away; the stores keep selling; it comes back with the stale
        # analytics database: the cloud's ledgers fill in what it lacks, the stores' sync
        # what the cloud missed while it was away.
        await fleet.stop_cloud()
        restore(stale, db)
        for i in range(30):
            await fleet.sell("s1", "sku-a", 1 + i % 2)
            await fleet.sell("s2", "sku-a", 1)
        await asyncio.sleep(0.3)
        await fleet.start_cloud()
        await hq_login(http, fleet.url)  # a restart ends every HQ session
        want = fleet.want_sales()

        async def caught_up() -> Any:
            body = await get_ok(http, f"{fleet.url}/v1/fleet/sales?hours=24")
            if {"totals": body["totals"], "by_store": body["by_store"]} != want:
                return None
            health = await get_ok(http, f"{fleet.url}/v1/fleet/health")
            regs_held = [n["held_seq"] == fleet.regs[s["store"]].replica.vv.get(n["node_id"])
                         for s in health["stores"] for n in s["nodes"]
                         if n["node_id"].startswith("reg-")]
            ok = all(regs_held) and all(s["analytics_behind"] == 0 for s in health["stores"])
            return body if ok else None
        await until(caught_up, within=30, what=f"analytics catch up to {want}")
        # ... and stay exact: nothing arrives twice later on.
        await fleet.analytics.flush()
        body = await get_ok(http, f"{fleet.url}/v1/fleet/sales?hours=24")
        assert {"totals": body["totals"], "by_store": body["by_store"]} == want
        health = await get_ok(http, f"{fleet.url}/v1/fleet/health")
        held = sum(s["envelopes"] for s in health["stores"])
        # this process aggregated exactly what the stale copy lacked, each once
        assert fleet.analytics.store.aggregated == held - stale_covered
        assert health["analytics"]["aggregated"] == held - stale_covered
        assert want["totals"] == {"sales": 65, "units": 4 + 5 + 45 + 30}


@pytest_asyncio.fixture
async def lone_cloud(tmp_path: Path) -> AsyncIterator[CloudNode]:
    edge = init_store(tmp_path / "edge", "s1", now_ms=now_ms(), node_id="edge-s1")
    assert edge.store_key is not None
    enrol_node(tmp_path / "cloud" / "s1", edge.store_key, "s1", "cloud", now_ms=now_ms(),
               node_id="cloud-s1", trust=TrustStore.from_dict(edge.trust.to_dict()))
    add_hq_user(tmp_path / "cloud")
    cloud = CloudNode(tmp_path / "cloud", insecure_plaintext=True, http_host=LOOPBACK)
    cloud.setup_hooks.append(setup_dashboard)
    await cloud.start()
    try:
        yield cloud
    finally:
        await cloud.close()


@pytest.mark.asyncio
@pytest.mark.parametrize(("path", "status", "field"), [
    ("/v1/fleet/sales?hours=0", 400, "hours"),
    ("/v1/fleet/sales?hours=2161", 400, "hours"),
    ("/v1/fleet/sales?hours=abc", 400, "hours"),
    ("/v1/fleet/sales?hours=1.5", 400, "hours"),
    ("/v1/fleet/sales?limit=0", 400, "limit"),
    ("/v1/fleet/sales?sku=", 400, "sku"),
    ("/v1/fleet/sales?sku=" + "x" * 129, 400, "sku"),
    ("/v1/fleet/sales?store=nowhere", 404, "store"),
    ("/v1/fleet/stock?limit=10001", 400, "limit"),
    ("/v1/fleet/stock?sku=never-seen", 404, "sku"),
    ("/v1/fleet/stock?after=", 400, "after"),
    ("/v1/fleet/exceptions?limit=-1", 400, "limit"),
    ("/v1/fleet/exceptions?store=", 400, "store"),
    ("/v1/fleet/nothing", 404, None),
])
async def test_bad_query_parameters_get_json_errors(lone_cloud: CloudNode, path: str,
                                                    status: int, field: str | None) -> None:
    async with hq_session(lone_cloud.url) as http:
        got, body = await get(http, lone_cloud.url + path)
    assert got == status, body
    assert body["error"]["field"] == field and body["error"]["message"]


@pytest.mark.asyncio
async def test_lone_cloud_answers_empty_fleet_and_serves_the_page(lone_cloud: CloudNode) -> None:
    async with hq_session(lone_cloud.url) as http:
        sales = await get_ok(http, lone_cloud.url + "/v1/fleet/sales?hours=3")
        assert sales["totals"] == {"sales": 0, "units": 0} and len(sales["hourly"]) == 3
        assert (await get_ok(http, lone_cloud.url + "/v1/fleet/stock")) == \
            {"stock": [], "next": None}
        health = await get_ok(http, lone_cloud.url + "/v1/fleet/health")
        assert health["stores"][0]["status"] == "offline"
        assert health["stores"][0]["lag_ms"] is None
        async with http.get(lone_cloud.url + "/") as resp:
            assert resp.status == 200 and resp.content_type == "text/html"
            assert "Content-Security-Policy" in resp.headers
            assert b"/static/dashboard.js" in await resp.read()
        for name, ctype in (("dashboard.js", "text/javascript"), ("dashboard.css", "text/css")):
            async with http.get(f"{lone_cloud.url}/static/{name}") as resp:
                assert resp.status == 200 and resp.content_type == ctype
        for bad in ("dashboard.html", "..%2fanalytics.py", "nope.js"):
            async with http.get(f"{lone_cloud.url}/static/{bad}") as resp:
                assert resp.status == 404


if __name__ == "__main__" and sys.argv[1:2] == ["child"]:
    _child(sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5], float(sys.argv[6]),
           int(sys.argv[7]))

"""Fleet analytics kept by the cloud peer: an embedded SQLite store fed by envelopes.

The cloud holds one replica per store. Every envelope that becomes durable there (local
or from the store) is handed to ``Analytics`` by a ``Node`` listener and aggregated into
``analytics.sqlite`` in the cloud's root directory: stock movements per hour, SKU, store
and kind (the ``sales_hourly`` view is the sales), and per store and origin a watermark.
Stock, reservations and oversell exceptions are read straight from the replicas. HTTP:
``/v1/fleet/stock``, ``/v1/fleet/sales``, ``/v1/fleet/exceptions``, ``/v1/fleet/health``
(see ``docs/api.md``; the design and the choice of SQLite are in ``docs/analytics.md``).

Invariants:
 1. Exactly once. An envelope's contribution to the aggregates and the advance of its
    origin's watermark (highest seq aggregated, per store) commit in ONE SQLite
    transaction, and an envelope at or below the watermark is skipped. The store's
    ledger is the source of truth: whatever the watermark does not cover is read back
    from it (catch-up). So a crash at any point, a duplicate feed or a restart from an
    old copy of the database neither loses nor double-counts an envelope.
 2. Per (store, origin) envelopes are aggregated in seq order without gaps, as every
    ledger holds them. An envelope from the live feed that does not directly follow
    the watermark is not aggregated; its store is caught up from the ledger instead.
 3. Every SQLite write, and every ledger read of a catch-up, runs on the analytics
    writer thread. The event loop only enqueues, never blocking: when the queue is full
    the store is marked for catch-up instead.
 4. HTTP reads of the database run in a worker thread on a read-only connection (WAL
    lets it read while the writer writes). Replica reads run on the loop, which owns the
    replicas.
 5. Stock and oversell exceptions come from the store replicas, never recomputed here:
    the replica is the converged CRDT state, and a second implementation could drift.
 6. Revocation bounds (``mesh.core.identity`` invariant 7): the aggregates count none of
    a revoked node's envelopes above the bound its store's list names, as no replica
    holds them. A bound the cloud learns (its trust store, ``set_bounds``) is applied
    on the writer thread before any catch-up: if the watermark is above it, the
    contributions of the rows above it (read back from the ledger, which keeps them as
    an archive) are subtracted, the watermark is lowered to the bound and the bound is
    recorded in ``revocation_bounds``, all in ONE transaction; from then on the feed
    and catch-up skip those seqs. So the correction is done once (a restart finds the
    bound recorded), and the result equals never having counted them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Protocol

import orjson
from aiohttp import web

from mesh import config
from mesh.core.envelope import Envelope
from mesh.http.common import ApiError, json_errors, json_response, query_ident, query_int
from mesh.http.metrics import rejection_counts

if TYPE_CHECKING:
    from mesh.cloud.server import CloudNode
    from mesh.node.node import Node

__all__ = [
    "DB_NAME",
    "Analytics",
    "AnalyticsStore",
    "Fact",
    "fact_of",
    "fact_of_raw",
    "setup_analytics",
    "wan_bytes",
]

log = logging.getLogger(__name__)

#: The analytics database, in the cloud's root directory (next to the store dirs).
DB_NAME: Final = "analytics.sqlite"
HOUR_MS: Final = 3_600_000
#: Live batches waiting for the writer before the loop stops enqueuing and marks the
#: store for catch-up instead (invariant 3): ~10k batches is seconds of a busy fleet,
#: and the ledger still holds everything.
MAX_QUEUE: Final = 10_000
#: Most envelopes aggregated in one transaction (group commit): amortises the commit,
#: keeps one transaction's lock short.
MAX_BATCH_FACTS: Final = 5_000
#: How often an idle writer retries a catch-up that failed (e.g. a locked database).
RETRY_S: Final = 1.0
#: Widest window of /v1/fleet/sales: 90 days of hourly buckets.
MAX_HOURS: Final = 24 * 90
#: Longest list in one response, and the default (rows of ~100 bytes of JSON).
MAX_LIMIT: Final = 10_000
DEFAULT_LIMIT: Final = 1_000
#: Envelope kinds that move stock of one SKU and carry a signed ``meta.qty``.
_MOVEMENTS: Final = frozenset({"receipt", "sale", "return", "adjust", "fulfil"})

_SCHEMA = """
CREATE TABLE IF NOT EXISTS watermarks (
    store       TEXT    NOT NULL,
    origin      TEXT    NOT NULL,
    seq         INTEGER NOT NULL,  -- highest seq aggregated; 1..seq all are
    newest_hlc  INTEGER NOT NULL,  -- highest HLC among them
    received_ms INTEGER,           -- when the live feed last brought one (null: catch-up)
    PRIMARY KEY (store, origin)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS movements_hourly (
    store   TEXT    NOT NULL,
    sku     TEXT    NOT NULL,
    hour_ms INTEGER NOT NULL,      -- start of the hour of the envelope's HLC (UTC)
    kind    TEXT    NOT NULL,      -- receipt, sale, return, adjust, fulfil
    events  INTEGER NOT NULL,
    qty     INTEGER NOT NULL,      -- sum of meta.qty: a sale's is negative
    PRIMARY KEY (store, sku, hour_ms, kind)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS movements_by_hour ON movements_hourly (kind, hour_ms);
CREATE TABLE IF NOT EXISTS revocation_bounds (
    store   TEXT    NOT NULL,      -- invariant 6: the aggregates hold none of origin's
    origin  TEXT    NOT NULL,      -- seqs above upto (applied in the transaction that
    upto    INTEGER NOT NULL,      -- took out what was counted of them)
    PRIMARY KEY (store, origin)
) WITHOUT ROWID;
CREATE VIEW IF NOT EXISTS sales_hourly AS
    SELECT store, sku, hour_ms, events AS sales, -qty AS units
    FROM movements_hourly WHERE kind = 'sale';
"""


# --- what is kept of an envelope ------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Fact:
    """What analytics keeps of one envelope."""

    origin: str
    seq: int
    hlc: int
    kind: str
    sku: str | None
    qty: int | None


def _fact(origin: str, seq: int, hlc: int, meta: dict[str, Any]) -> Fact:
    sku, qty = meta.get("sku"), meta.get("qty")
    return Fact(origin, seq, hlc, str(meta.get("kind")),
                sku if isinstance(sku, str) else None, qty if type(qty) is int else None)


def fact_of(env: Envelope) -> Fact:
    return _fact(env.origin, env.seq, env.hlc, env.meta)


def fact_of_raw(raw: bytes) -> Fact:
    """From a ledger row. The row was verified when it was accepted, so a plain parse is
    enough (about 10x cheaper than ``envelope.decode``, which matters for catch-up)."""
    body = orjson.loads(raw)["body"]
    return _fact(body["origin"], body["seq"], body["hlc"], body["meta"])


class LedgerSource(Protocol):
    """What catch-up reads of a store's ledger (``mesh.store.ledger.Ledger`` provides it)."""

    def heads(self) -> dict[str, int]: ...

    def read_origin(self, origin: str, first: int, last: int,
                    limit: int = ...) -> list[bytes]: ...


# --- the store ------------------------------------------------------------------------------

_STOP: Final = object()
_Batch = tuple[str, list[Fact], int | None]  # store, facts, received_ms (None: catch-up)


class AnalyticsStore:
    """The analytics database and its writer thread (no asyncio, no HTTP)."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self._queue: queue.Queue[object] = queue.Queue(MAX_QUEUE)
        self._sources: dict[str, LedgerSource] = {}
        self._dirty: set[str] = set()
        self._lock = threading.Lock()  # guards _sources and _dirty
        self._wm: dict[tuple[str, str], int] = {}  # committed watermarks (writer thread)
        #: committed revocation bounds (writer thread), and the newest ones the stores'
        #: trust stores name (guarded by _lock): invariant 6
        self._bounds: dict[tuple[str, str], int] = {}
        self._wanted: dict[str, dict[str, int]] = {}
        self._rconn: sqlite3.Connection | None = None
        self._rlock = threading.Lock()
        self._ready = threading.Event()
        self._open_error: BaseException | None = None
        self._closed = False
        #: Counters for health and tests (written by the writer thread only).
        self.aggregated = 0  # envelopes aggregated
        self.skipped = 0  # envelopes at or below their watermark (duplicates)
        self.catch_ups = 0  # catch-up runs
        self.excluded = 0  # counted envelopes above a revocation bound taken out again
        self.revoked_skipped = 0  # envelopes above a revocation bound not counted
        self.last_error: str | None = None
        #: Envelopes read from a ledger per catch-up transaction.
        self.catch_up_page = config.LEDGER_PAGE
        self._thread = threading.Thread(target=self._run, name=f"analytics:{self.path.name}",
                                        daemon=True)
        self._thread.start()

    # --- feeding (any thread; never blocks) -------------------------------------------------

    def add_source(self, store: str, ledger: LedgerSource,
                   bounds: Mapping[str, int] | None = None) -> None:
        """Catch-up reads ``store``'s envelopes from ``ledger``; one runs now, after the
        revocation ``bounds`` known so far are applied (invariant 6)."""
        with self._lock:
            self._sources[store] = ledger
            if bounds:
                self._wanted[store] = dict(bounds)
        self.catch_up(store)

    def set_bounds(self, store: str, bounds: Mapping[str, int]) -> None:
        """``store``'s trust store names these revocation bounds (all of them): soon
        applied on the writer thread (invariant 6). Never blocks."""
        with self._lock:
            if self._wanted.get(store, {}) == dict(bounds):
                return
            self._wanted[store] = dict(bounds)
        self.catch_up(store)

    def remove_source(self, store: str) -> None:
        with self._lock:
            self._sources.pop(store, None)
            self._dirty.discard(store)

    def submit(self, store: str, facts: list[Fact], received_ms: int | None = None) -> None:
        """Aggregate these envelopes of ``store`` (in apply order). Never blocks."""
        if not facts or self._closed:
            return
        try:
            self._queue.put_nowait((store, facts, received_ms))
        except queue.Full:
            with self._lock:
                self._dirty.add(store)

    def catch_up(self, store: str) -> None:
        """Read whatever ``store``'s ledger holds beyond the watermarks (soon, on the
        writer thread)."""
        with self._lock:
            self._dirty.add(store)
        with contextlib.suppress(queue.Full):
            self._queue.put_nowait(None)  # wake the writer

    def flush(self, timeout: float | None = None) -> None:
        """Wait until everything submitted so far, and the catch-ups it needs, is
        committed."""
        if self._closed:
            raise RuntimeError("analytics store is closed")
        fut: Future[None] = Future()
        self._queue.put(fut, timeout=timeout)
        fut.result(timeout)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._queue.put(_STOP)
        self._thread.join()
        with self._rlock:
            if self._rconn is not None:
                self._rconn.close()
                self._rconn = None

    # --- the writer thread ----------------------------------------------------------------

    def _open(self) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        # NORMAL, not FULL: a power cut may roll back the newest transactions, but each
        # takes its aggregates AND its watermarks with it (invariant 1), and catch-up
        # redoes them from the ledger, which is fsynced.
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute("PRAGMA busy_timeout=5000")
        conn.executescript(_SCHEMA)
        self._reload(conn)
        return conn

    def _reload(self, conn: sqlite3.Connection) -> None:
        """The committed watermarks (at start, and after a failure left memory unsure)."""
        self._wm = {(store, origin): seq for store, origin, seq in conn.execute(
            "SELECT store, origin, seq FROM watermarks")}
        self._bounds = {(store, origin): upto for store, origin, upto in conn.execute(
            "SELECT store, origin, upto FROM revocation_bounds")}

    def _run(self) -> None:
        try:
            conn = self._open()
        except (sqlite3.Error, OSError) as exc:
            self._open_error = exc
            self._ready.set()
            log.error("analytics database %s cannot be opened: %s", self.path, exc)
            self._drain_failed(exc)
            return
        self._ready.set()
        try:
            self._loop(conn)
        finally:
            conn.close()

    def _drain_failed(self, exc: BaseException) -> None:
        while True:
            item = self._queue.get()
            if isinstance(item, Future):
                item.set_exception(exc)
            elif item is _STOP:
                return

    def _loop(self, conn: sqlite3.Connection) -> None:
        while True:
            try:
                item: object = self._queue.get(timeout=RETRY_S)
            except queue.Empty:
                item = None
            batch: list[_Batch] = []
            waiters: list[Future[None]] = []
            n = 0
            stop = False
            while True:
                if item is _STOP:
                    stop = True
                elif isinstance(item, Future):
                    waiters.append(item)
                elif isinstance(item, tuple):
                    batch.append(item)
                    n += len(item[1])
                if stop or n >= MAX_BATCH_FACTS:
                    break
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
            try:
                if batch:
                    self._aggregate(conn, batch)
                with self._lock:
                    dirty, self._dirty = self._dirty, set()
                for store in sorted(dirty):
                    self._exclude(conn, store)  # first: catch-up must not pass a bound
                    self._catch_up(conn, store)
            except Exception:  # a bug must not stop the writer: the ledger can redo it
                log.exception("analytics writer failed; the stores will be caught up")
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
                with contextlib.suppress(sqlite3.Error):
                    self._reload(conn)
                with self._lock:
                    self._dirty |= set(self._sources)
            for fut in waiters:
                fut.set_result(None)
            if stop:
                return

    def _aggregate(self, conn: sqlite3.Connection, batch: Iterable[_Batch]) -> None:
        """Aggregate facts and advance watermarks in one transaction (invariants 1, 2)."""
        pending: dict[tuple[str, str], list[Any]] = {}  # -> [seq, newest_hlc, received]
        moves: dict[tuple[str, str, int, str], list[int]] = {}
        gaps: set[str] = set()
        skipped = done = excluded = 0
        for store, facts, received in batch:
            for f in facts:
                key = (store, f.origin)
                if f.seq > self._bounds.get(key, f.seq):  # invariant 6
                    excluded += 1
                    continue
                row = pending.get(key)
                wm = row[0] if row is not None else self._wm.get(key, 0)
                if f.seq <= wm:
                    skipped += 1
                    continue
                if f.seq != wm + 1:
                    gaps.add(store)  # the rest of this origin cannot follow either
                    continue
                if row is None:
                    row = pending[key] = [0, 0, None]
                done += 1
                row[0] = f.seq
                row[1] = max(row[1], f.hlc)
                row[2] = received if received is not None else row[2]
                if f.kind in _MOVEMENTS and f.sku is not None and f.qty is not None:
                    hour = (f.hlc >> 16) // HOUR_MS * HOUR_MS
                    m = moves.setdefault((store, f.sku, hour, f.kind), [0, 0])
                    m[0] += 1
                    m[1] += f.qty
        if pending:
            try:
                conn.execute("BEGIN IMMEDIATE")
                conn.executemany(
                    "INSERT INTO movements_hourly (store, sku, hour_ms, kind, events, qty) "
                    "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT DO UPDATE SET "
                    "events = events + excluded.events, qty = qty + excluded.qty",
                    [(*k, v[0], v[1]) for k, v in moves.items()])
                conn.executemany(
                    "INSERT INTO watermarks (store, origin, seq, newest_hlc, received_ms) "
                    "VALUES (?, ?, ?, ?, ?) ON CONFLICT DO UPDATE SET seq = excluded.seq, "
                    "newest_hlc = MAX(newest_hlc, excluded.newest_hlc), "
                    "received_ms = COALESCE(excluded.received_ms, received_ms)",
                    [(*k, *v) for k, v in pending.items()])
                conn.execute("COMMIT")
            except sqlite3.Error as exc:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
                self._failed(f"analytics write failed: {exc}", {s for s, _ in pending})
                return
            for key, row in pending.items():
                self._wm[key] = row[0]
            self.aggregated += done
            self.last_error = None
        self.skipped += skipped
        self.revoked_skipped += excluded
        if gaps:
            with self._lock:
                self._dirty |= gaps

    def _catch_up(self, conn: sqlite3.Connection, store: str) -> None:
        """Aggregate what ``store``'s ledger holds beyond the watermarks, page by page."""
        with self._lock:
            ledger = self._sources.get(store)
        if ledger is None:
            return
        self.catch_ups += 1
        try:
            for origin, head in sorted(ledger.heads().items()):
                head = min(head, self._bounds.get((store, origin), head))  # invariant 6
                wm = self._wm.get((store, origin), 0)
                while wm < head:
                    raws = ledger.read_origin(origin, wm + 1, head, self.catch_up_page)
                    if not raws:
                        break
                    self._aggregate(conn, [(store, [fact_of_raw(r) for r in raws], None)])
                    new = self._wm.get((store, origin), 0)
                    if new <= wm:
                        break  # the write failed (already reported); retried later
                    wm = new
        except sqlite3.ProgrammingError:
            log.debug("ledger of %s is closed; catch-up stopped", store)  # shutting down
        except (sqlite3.Error, OSError, ValueError, KeyError) as exc:
            self._failed(f"catch-up of {store} failed: {exc}", {store})

    def _exclude(self, conn: sqlite3.Connection, store: str) -> None:
        """Apply the revocation bounds ``store``'s trust store names and the database
        does not hold yet: take out what was counted above each, lower the watermark to
        it, record it, in one transaction (invariant 6)."""
        with self._lock:
            ledger = self._sources.get(store)
            wanted = dict(self._wanted.get(store, {}))
        todo = {o: b for o, b in wanted.items() if self._bounds.get((store, o)) != b}
        if not todo or ledger is None:
            return
        try:
            for origin, bound in sorted(todo.items()):
                self._exclude_origin(conn, ledger, store, origin, bound)
        except sqlite3.ProgrammingError:
            log.debug("ledger of %s is closed; exclusion stopped", store)  # shutting down
        except (sqlite3.Error, OSError, ValueError, KeyError) as exc:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            self._failed(f"revocation bounds of {store} not applied: {exc}", {store})

    def _exclude_origin(self, conn: sqlite3.Connection, ledger: LedgerSource, store: str,
                        origin: str, bound: int) -> None:
        key = (store, origin)
        wm = self._wm.get(key, 0)
        facts: list[Fact] = []
        while wm > bound + len(facts):  # counted above the bound: read them back
            first = bound + len(facts) + 1
            page = [fact_of_raw(r) for r in ledger.read_origin(origin, first, wm,
                                                              self.catch_up_page)]
            if not page or page[0].seq != first:
                raise ValueError(f"ledger lacks {origin} seq {first} (counted up to {wm})")
            facts.extend(page)
        newest = None
        if facts and bound > 0:
            raws = ledger.read_origin(origin, bound, bound)
            if not raws:
                raise ValueError(f"ledger lacks {origin} seq {bound}")
            newest = fact_of_raw(raws[0]).hlc  # an origin's HLC grows with its seq
        moves: dict[tuple[str, str, int, str], list[int]] = {}
        for f in facts:
            if f.kind in _MOVEMENTS and f.sku is not None and f.qty is not None:
                m = moves.setdefault((store, f.sku, (f.hlc >> 16) // HOUR_MS * HOUR_MS,
                                      f.kind), [0, 0])
                m[0] += 1
                m[1] += f.qty
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany(
            "UPDATE movements_hourly SET events = events - ?, qty = qty - ? "
            "WHERE store = ? AND sku = ? AND hour_ms = ? AND kind = ?",
            [(n, q, *k) for k, (n, q) in sorted(moves.items())])
        conn.executemany(
            "DELETE FROM movements_hourly WHERE store = ? AND sku = ? AND hour_ms = ? "
            "AND kind = ? AND events = 0", sorted(moves))
        # (nothing counted above the bound: the bound is only recorded)
        if facts and bound == 0:
            conn.execute("DELETE FROM watermarks WHERE store = ? AND origin = ?", key)
        elif facts:
            conn.execute("UPDATE watermarks SET seq = ?, newest_hlc = ? WHERE store = ? "
                         "AND origin = ?", (bound, newest, *key))
        conn.execute("INSERT INTO revocation_bounds (store, origin, upto) VALUES (?, ?, ?) "
                     "ON CONFLICT DO UPDATE SET upto = excluded.upto", (*key, bound))
        conn.execute("COMMIT")
        if facts:
            if bound == 0:
                self._wm.pop(key, None)
            else:
                self._wm[key] = bound
        self._bounds[key] = bound
        self.excluded += len(facts)
        if facts:
            log.warning("analytics of %s: %d envelope(s) of revoked %s above its bound %d "
                        "taken out", store, len(facts), origin, bound)

    def _failed(self, message: str, stores: set[str]) -> None:
        if message != self.last_error:
            log.warning("%s (retrying from the ledger every %s s)", message, RETRY_S)
        self.last_error = message
        with self._lock:
            self._dirty |= stores

    # --- reads (any thread; HTTP handlers call them through asyncio.to_thread) --------------

    def _read(self, sql: str, params: Sequence[object] = ()) -> list[tuple[Any, ...]]:
        self._ready.wait()
        if self._open_error is not None:
            raise RuntimeError(f"analytics database unavailable: {self._open_error}")
        with self._rlock:
            if self._closed:
                raise RuntimeError("analytics store is closed")
            if self._rconn is None:
                self._rconn = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True,
                                              check_same_thread=False)
                self._rconn.execute("PRAGMA busy_timeout=5000")
            return self._rconn.execute(sql, params).fetchall()

    def watermarks(self) -> dict[str, dict[str, dict[str, Any]]]:
        """store -> origin -> {seq, newest_hlc, received_ms}."""
        out: dict[str, dict[str, dict[str, Any]]] = {}
        for store, origin, seq, hlc, received in self._read(
                "SELECT store, origin, seq, newest_hlc, received_ms FROM watermarks"):
            out.setdefault(store, {})[origin] = {"seq": seq, "newest_hlc": hlc,
                                                 "received_ms": received}
        return out

    def sales(self, *, since_ms: int, until_ms: int, sku: str | None = None,
              store: str | None = None, limit: int = DEFAULT_LIMIT) -> dict[str, Any]:
        """Sales with ``since_ms <= hour_ms < until_ms``: per hour (dense), per store,
        per SKU, in total, and the (store, sku, hour) rows (at most ``limit``)."""
        if not 0 < until_ms - since_ms <= MAX_HOURS * HOUR_MS:
            raise ValueError(f"a sales window is 1..{MAX_HOURS} hours")
        where = "hour_ms >= ? AND hour_ms < ?"
        params: list[object] = [since_ms, until_ms]
        if sku is not None:
            where += " AND sku = ?"
            params.append(sku)
        if store is not None:
            where += " AND store = ?"
            params.append(store)

        def q(select: str, tail: str = "") -> list[tuple[Any, ...]]:
            return self._read(f"SELECT {select} FROM sales_hourly WHERE {where} {tail}",  # noqa: S608 -- fixed SQL, values bound
                              [*params, limit + 1] if "LIMIT" in tail else params)

        per_hour = {h: (s, u) for h, s, u in q(
            "hour_ms, SUM(sales), SUM(units)", "GROUP BY hour_ms")}
        hourly = [{"hour_ms": h, "sales": per_hour.get(h, (0, 0))[0],
                   "units": per_hour.get(h, (0, 0))[1]}
                  for h in range(since_ms, until_ms, HOUR_MS)]
        by_store = [{"store": s, "sales": n, "units": u} for s, n, u in q(
            "store, SUM(sales), SUM(units)", "GROUP BY store ORDER BY store")]
        by_sku = [{"sku": k, "sales": n, "units": u} for k, n, u in q(
            "sku, SUM(sales), SUM(units)", "GROUP BY sku ORDER BY SUM(units) DESC, sku LIMIT ?")]
        rows = [{"store": s, "sku": k, "hour_ms": h, "sales": n, "units": u}
                for s, k, h, n, u in q("store, sku, hour_ms, sales, units",
                                       "ORDER BY hour_ms, store, sku LIMIT ?")]
        return {
            "hourly": hourly, "by_store": by_store, "by_sku": by_sku[:limit],
            "rows": rows[:limit], "truncated": len(rows) > limit or len(by_sku) > limit,
            "totals": {"sales": sum(int(r["sales"]) for r in by_store),
                       "units": sum(int(r["units"]) for r in by_store)},
        }


# --- the cloud's fleet endpoints -------------------------------------------------------------


def wan_bytes(node: Node) -> dict[str, Any]:
    """Bytes on the WAN link between the cloud and one store, as the cloud's replica of
    that store counts them: what crossed the wire after compression (kernel TCP counters
    of its WAN sessions). ``out`` = cloud to store, ``in`` = store to cloud (the store's
    egress). The one place to switch the source."""
    sent, received = node.wan_bytes()
    return {"out": sent, "in": received, "source": "wire"}


_APP_KEY: Final = web.AppKey("mesh.cloud.analytics", object)


class Analytics:
    """Fleet analytics of a ``CloudNode``: listeners on every store node, the database,
    and the ``/v1/fleet/`` endpoints."""

    def __init__(self, cloud: CloudNode, store: AnalyticsStore) -> None:
        self.cloud = cloud
        self.store = store
        self._listeners: dict[str, Callable[[list[Envelope]], None]] = {}
        self._trust_listeners: dict[str, Callable[[], None]] = {}

    @classmethod
    def attach(cls, cloud: CloudNode) -> Analytics:
        """Wire analytics into ``cloud`` (a ``CloudNode.setup_hooks`` entry: after the store
        nodes start, before the server is frozen). Idempotent."""
        existing = cls.of(cloud)
        if existing is not None:
            return existing
        self = cls(cloud, AnalyticsStore(cloud.root / DB_NAME))
        for store_id, node in cloud.nodes.items():
            self.store.add_source(store_id, node.durable.ledger,
                                  node.identity.trust.revocation_bounds)
            listener = partial(self._on_durable, store_id)
            self._listeners[store_id] = listener
            node.listeners.append(listener)
            on_trust = partial(self._on_trust, store_id)
            self._trust_listeners[store_id] = on_trust
            node.driver.trust_listeners.append(on_trust)
        fleet = web.Application(middlewares=[json_errors])  # mesh.http.api's
        fleet.router.add_get("/stock", self.stock)
        fleet.router.add_get("/sales", self.sales)
        fleet.router.add_get("/exceptions", self.exceptions)
        fleet.router.add_get("/health", self.health)
        cloud.app.add_subapp("/v1/fleet/", fleet)
        cloud.app[_APP_KEY] = self
        cloud.app.on_cleanup.append(self._on_cleanup)
        return self

    @staticmethod
    def of(cloud: CloudNode) -> Analytics | None:
        """The analytics attached to ``cloud``, if any."""
        found = cloud.app.get(_APP_KEY)
        return found if isinstance(found, Analytics) else None

    def _on_durable(self, store_id: str, envs: list[Envelope]) -> None:
        """A node listener: on the loop thread, so only enqueue (invariant 3)."""
        self.store.submit(store_id, [fact_of(e) for e in envs], self._now())

    def _on_trust(self, store_id: str) -> None:
        """A driver's trust listener (on the loop): pass on the revocation bounds
        (invariant 6; ``set_bounds`` ignores the ones it has)."""
        node = self.cloud.nodes.get(store_id)
        if node is not None:
            self.store.set_bounds(store_id, node.identity.trust.revocation_bounds)

    @staticmethod
    def _now() -> int:
        return time.time_ns() // 1_000_000

    async def flush(self) -> None:
        """Wait until every envelope that became durable so far is aggregated."""
        await asyncio.to_thread(self.store.flush, 30.0)

    async def close(self) -> None:
        for store_id, listener in self._listeners.items():
            node = self.cloud.nodes.get(store_id)
            if node is not None and listener in node.listeners:
                node.listeners.remove(listener)
        self._listeners.clear()
        for store_id, on_trust in self._trust_listeners.items():
            node = self.cloud.nodes.get(store_id)
            if node is not None and on_trust in node.driver.trust_listeners:
                node.driver.trust_listeners.remove(on_trust)
        self._trust_listeners.clear()
        await asyncio.to_thread(self.store.close)

    async def _on_cleanup(self, app: web.Application) -> None:
        await self.close()

    def _node(self, store: str | None) -> None:
        if store is not None and store not in self.cloud.nodes:
            raise ApiError(404, f"this cloud holds no store {store!r}", "store")

    # --- GET /v1/fleet/stock -------------------------------------------------------------

    async def stock(self, request: web.Request) -> web.Response:
        sku = query_ident(request, "sku")
        after = query_ident(request, "after")
        limit = query_int(request, "limit", 1, MAX_LIMIT, DEFAULT_LIMIT)
        nodes = sorted(self.cloud.nodes.items())
        if sku is not None:
            skus = [sku] if any(n.replica.knows_sku(sku) for _, n in nodes) else []
            if not skus:
                raise ApiError(404, f"no store has seen SKU {sku!r}", "sku")
        else:
            skus = sorted({s for _, n in nodes for s in n.replica.skus()})
            if after is not None:
                skus = [s for s in skus if s > after]
        page = skus[:limit]
        out = []
        for s in page:
            stores: list[dict[str, Any]] = []
            for store_id, node in nodes:
                r = node.replica
                if not r.knows_sku(s):
                    continue
                hlc = r.last_change.get(s)
                stores.append({"store": store_id, "on_hand": r.on_hand(s),
                               "reserved": r.reserved(s), "available": r.available(s),
                               "last_change_ms": None if hlc is None else hlc >> 16})
            out.append({"sku": s, "on_hand": sum(x["on_hand"] for x in stores),
                        "reserved": sum(x["reserved"] for x in stores),
                        "available": sum(x["available"] for x in stores), "stores": stores})
        return json_response({"stock": out, "next": page[-1] if len(skus) > limit else None})

    # --- GET /v1/fleet/sales ----------------------------------------------------------------

    async def sales(self, request: web.Request) -> web.Response:
        sku = query_ident(request, "sku")
        store = query_ident(request, "store")
        hours = query_int(request, "hours", 1, MAX_HOURS, 24)
        limit = query_int(request, "limit", 1, MAX_LIMIT, DEFAULT_LIMIT)
        self._node(store)
        until = (self._now() // HOUR_MS + 1) * HOUR_MS  # end of the current hour
        since = until - hours * HOUR_MS
        body = await asyncio.to_thread(self.store.sales, since_ms=since, until_ms=until,
                                       sku=sku, store=store, limit=limit)
        return json_response({"sku": sku, "store": store, "hours": hours, "since_ms": since,
                      "until_ms": until, **body})

    # --- GET /v1/fleet/exceptions -----------------------------------------------------------

    async def exceptions(self, request: web.Request) -> web.Response:
        sku = query_ident(request, "sku")
        store = query_ident(request, "store")
        limit = query_int(request, "limit", 1, MAX_LIMIT, 100)
        self._node(store)
        found: list[dict[str, Any]] = []
        by_store: dict[str, dict[str, int]] = {}
        for store_id, node in sorted(self.cloud.nodes.items()):
            if store is not None and store_id != store:
                continue
            excs = node.replica.exceptions(sku)
            by_store[store_id] = {"count": len(excs), "short_units": sum(e.short for e in excs)}
            found.extend({"store": store_id, **e.to_dict(), "at_ms": e.hlc >> 16}
                         for e in excs)
        found.sort(key=lambda e: (e["hlc"], e["store"], e["origin"], e["seq"]), reverse=True)
        return json_response({
            "exceptions": found[:limit], "truncated": len(found) > limit,
            "totals": {"count": len(found), "short_units": sum(e["short"] for e in found),
                       "by_store": by_store},
        })

    # --- GET /v1/fleet/health --------------------------------------------------------------

    async def health(self, request: web.Request) -> web.Response:
        marks = await asyncio.to_thread(self.store.watermarks)
        now = self._now()  # after the read, so no lag comes out negative
        stores = [self._store_health(sid, node, marks.get(sid, {}), now)
                  for sid, node in sorted(self.cloud.nodes.items())]
        return json_response({"now_ms": now, "stores": stores,
                      "analytics": {"aggregated": self.store.aggregated,
                                    "duplicates_skipped": self.store.skipped,
                                    "catch_ups": self.store.catch_ups,
                                    "revoked_taken_out": self.store.excluded,
                                    "revoked_skipped": self.store.revoked_skipped,
                                    "error": self.store.last_error}})

    def _store_health(self, store_id: str, node: Node, marks: dict[str, dict[str, Any]],
                      now: int) -> dict[str, Any]:
        peers = {p["node_id"]: p for p in node.peer_status()}
        held = node.replica.vv.to_dict()
        # What the store's live peers told us they hold (their version vectors): the
        # envelopes they have and we lack yet are the sync backlog.
        reported: dict[str, int] = {}
        for link in node.core.peers.values():
            for origin, seq in link.acked.items():
                reported[origin] = max(reported.get(origin, 0), seq)
        live = bool(node.core.peers)
        trust = node.identity.trust
        nodes = []
        for nid in sorted(set(held) | set(marks) | {c.node_id for c in trust.certificates()}):
            mark = marks.get(nid, {})
            peer = peers.get(nid)
            cert = trust.certificate(nid)
            newest = mark.get("newest_hlc")
            newest_ms = None if newest is None else newest >> 16
            seen = [int(t) for t in (mark.get("received_ms"),
                                     None if peer is None else peer.get("last_seen_ms"))
                    if t is not None]
            nodes.append({
                "node_id": nid, "role": cert.role if cert else None,
                "session": None if peer is None else ("up" if peer["up"] else "down"),
                "held_seq": held.get(nid, 0), "aggregated_seq": mark.get("seq", 0),
                "backlog": max(0, reported.get(nid, 0) - held.get(nid, 0)) if live else None,
                "newest_ms": newest_ms,
                "lag_ms": None if newest_ms is None else max(0, now - newest_ms),
                "last_seen_ms": max(seen) if seen else None,
            })
        others = [n for n in nodes if n["node_id"] != node.identity.node_id]
        newest_all = [n["newest_ms"] for n in others if n["newest_ms"] is not None]
        seen_all = [n["last_seen_ms"] for n in others if n["last_seen_ms"] is not None]
        up = sum(1 for p in peers.values() if p["up"])
        envelopes = sum(held.values())
        aggregated = sum(int(m["seq"]) for m in marks.values())
        exceptions = node.replica.exceptions()
        return {
            "store": store_id, "cloud_node": node.identity.node_id, "url": node.url,
            "status": "online" if up else "offline", "peers_up": up,
            "backlog": sum(int(n["backlog"]) for n in nodes) if live else None,
            "newest_ms": max(newest_all) if newest_all else None,
            "lag_ms": max(0, now - max(newest_all)) if newest_all else None,
            "last_seen_ms": max(seen_all) if seen_all else None,
            "envelopes": envelopes, "aggregated": aggregated,
            "analytics_behind": max(0, envelopes - aggregated),
            "exceptions": len(exceptions), "oversold_units": sum(e.short for e in exceptions),
            "rejected": rejection_counts(node), "wan_bytes": wan_bytes(node),
            "nodes": nodes,
        }


def setup_analytics(cloud: CloudNode) -> None:
    """``CloudNode.setup_hooks`` entry: attach fleet analytics to ``cloud``."""
    Analytics.attach(cloud)

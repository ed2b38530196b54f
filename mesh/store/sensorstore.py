"""What the edge's reconciliation needs across a restart: its kept readings and the
recent events it derived from envelopes (reservation times, sales, shrink).

Readings are inputs at the edge, not replicated (``mesh.core.sensors``); before this module a
restarted edge started with none, so a disagreement seen just before a restart (or a
reservation made before it) was forgotten. ``SensorStore`` keeps them in
``<data dir>/sensors.sqlite``, apart from the ledger: they are not the store's history,
and losing the newest few on a power cut costs one reconciliation run at most (they are
written with ``synchronous=NORMAL``, not FULL; the ledger's acknowledgement rule does
not apply to them).

Invariants:
 1. Bounded as the memory it mirrors: at most ``SENSOR_READINGS_KEPT`` readings per
    sensor (the newest written), ``SENSOR_MAX_SENSORS`` sensors; per recent kind at most
    ``RECENT_KEPT + RECENT_SLACK`` rows on disk (a kind is cut back to its newest
    ``RECENT_KEPT`` once ``RECENT_SLACK`` rows were added to it since its last cut, so
    the cut, a sort of the kind's rows, runs once per ``RECENT_SLACK`` events instead
    of once per envelope batch) and exactly the newest ``RECENT_KEPT`` in what ``load``
    returns; readings older than ``SENSOR_MAX_AGE_MS`` are dropped on load.
 2. All SQLite work runs on the store's one writer thread, in submission order; the
    event loop only submits (``submit``) and awaits futures.
 3. A failed write is logged and counted (``errors``), never raised into a request:
    the readings stay accepted in memory.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Final

from mesh import config
from mesh.core.sensors import Reading

__all__ = ["RECENT_KEPT", "RECENT_SLACK", "SENSOR_DB", "Recent", "SensorStore"]

log = logging.getLogger(__name__)

SENSOR_DB: Final = "sensors.sqlite"
#: Recent events kept per kind (as ``SensorService``'s in-memory deques).
RECENT_KEPT: Final = 10_000
#: Rows a recent kind may gain past ``RECENT_KEPT`` before it is cut back (invariant 1).
#: Cutting on every batch cost the edge ~40-50 % of its CPU under sale load
#: (docs/benchmarks.md, "The edge's recent-event store").
RECENT_SLACK: Final = 1_000
#: (kind, key, sku or zone, at_ms, qty): kind ``reserve`` (key = reservation id),
#: ``sale`` (key = origin:seq), ``shrink`` (key = origin:seq, sku = the zone),
#: ``moved`` (key = sku: when the ledger last moved its stock).
Recent = tuple[str, str, str, int, int]

_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS readings (
    sensor TEXT NOT NULL, id TEXT NOT NULL, kind TEXT NOT NULL, sku TEXT NOT NULL,
    value REAL NOT NULL, at_ms INTEGER NOT NULL, confidence REAL, calibration TEXT NOT NULL,
    staff TEXT, UNIQUE (sensor, id));
CREATE INDEX IF NOT EXISTS readings_sensor ON readings (sensor);
CREATE TABLE IF NOT EXISTS recent (
    kind TEXT NOT NULL, key TEXT NOT NULL, sku TEXT NOT NULL, at_ms INTEGER NOT NULL,
    qty INTEGER NOT NULL, PRIMARY KEY (kind, key));
CREATE INDEX IF NOT EXISTS recent_kind_at ON recent (kind, at_ms);
"""


class SensorStore:
    """The edge's sensor inputs on disk (invariants 1-3)."""

    def __init__(self, data_dir: Path) -> None:
        self.path = Path(data_dir) / SENSOR_DB
        self.errors = 0
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sensorstore")
        self._conn: sqlite3.Connection | None = None
        self._closed = False
        #: rows added per recent kind since its last cut (the writer thread's own)
        self._added: dict[str, int] = {}

    # --- the writer thread ---------------------------------------------------------------

    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.executescript(_SCHEMA)
            self._conn = conn
        return self._conn

    def submit(self, fn: Callable[[sqlite3.Connection], object]) -> Future[object]:
        """Run ``fn`` on the writer thread (invariant 2); errors are logged (invariant 3)."""
        if self._closed:
            raise RuntimeError("the sensor store is closed")
        fut = self._pool.submit(lambda: fn(self._db()))
        fut.add_done_callback(self._check)
        return fut

    def _check(self, fut: Future[object]) -> None:
        exc = fut.exception()
        if exc is not None:
            self.errors += 1
            log.warning("sensor store %s: write failed: %s", self.path, exc)

    # --- writes ----------------------------------------------------------------------------

    def add_readings(self, readings: list[Reading]) -> Future[object]:
        rows = [(r.sensor, r.id, r.kind, r.sku, r.value, r.at_ms, r.confidence,
                 r.calibration, r.staff) for r in readings]
        sensors = sorted({r.sensor for r in readings})

        def write(conn: sqlite3.Connection) -> None:
            with conn:
                conn.execute("BEGIN")
                conn.executemany("INSERT OR IGNORE INTO readings VALUES (?,?,?,?,?,?,?,?,?)",
                                 rows)
                conn.executemany(
                    "DELETE FROM readings WHERE sensor = ?1 AND rowid NOT IN (SELECT rowid "
                    "FROM readings WHERE sensor = ?1 ORDER BY rowid DESC LIMIT ?2)",
                    [(s, config.SENSOR_READINGS_KEPT) for s in sensors])

        return self.submit(write)

    def add_recent(self, rows: list[Recent]) -> Future[object]:
        added: dict[str, int] = {}
        for r in rows:
            added[r[0]] = added.get(r[0], 0) + 1

        def write(conn: sqlite3.Connection) -> None:
            counts = self._added
            due = []
            for kind, n in added.items():
                counts[kind] = counts.get(kind, 0) + n
                if counts[kind] >= RECENT_SLACK:
                    due.append(kind)
            with conn:
                conn.execute("BEGIN")
                conn.executemany("INSERT OR REPLACE INTO recent VALUES (?,?,?,?,?)", rows)
                self._cut(conn, sorted(due))
            for kind in due:  # only once the cut is committed
                counts[kind] = 0

        return self.submit(write)

    @staticmethod
    def _cut(conn: sqlite3.Connection, kinds: Iterable[str]) -> None:
        """Keep the newest ``RECENT_KEPT`` rows of each of ``kinds`` (invariant 1)."""
        conn.executemany(
            "DELETE FROM recent WHERE kind = ?1 AND rowid NOT IN (SELECT rowid "
            "FROM recent WHERE kind = ?1 ORDER BY at_ms DESC, rowid DESC LIMIT ?2)",
            [(k, RECENT_KEPT) for k in kinds])

    def forget_recent(self, kind: str, keys: Iterable[str]) -> Future[object]:
        rows = [(kind, k) for k in keys]

        def write(conn: sqlite3.Connection) -> None:
            with conn:
                conn.execute("BEGIN")
                conn.executemany("DELETE FROM recent WHERE kind = ? AND key = ?", rows)

        return self.submit(write)

    # --- reads -----------------------------------------------------------------------------

    def load(self, now_ms: int) -> tuple[list[Reading], list[Recent]]:
        """Everything kept, readings in the order they were taken (invariant 1). Blocks:
        call it through ``asyncio.wrap_future(store.submit(...))`` or before serving."""

        def read(conn: sqlite3.Connection) -> tuple[list[Reading], list[Recent]]:
            with conn:
                conn.execute("BEGIN")
                conn.execute("DELETE FROM readings WHERE at_ms < ?",
                             (now_ms - config.SENSOR_MAX_AGE_MS,))
                self._cut(conn, [k for (k,) in conn.execute(
                    "SELECT DISTINCT kind FROM recent")])
                self._added.clear()
            readings = [Reading(*row) for row in conn.execute(
                "SELECT id, sensor, kind, sku, value, at_ms, confidence, calibration, staff "
                "FROM readings ORDER BY rowid")]
            recent: list[Recent] = [(k, key, sku, at, qty) for k, key, sku, at, qty in
                                    conn.execute("SELECT kind, key, sku, at_ms, qty FROM "
                                                 "recent ORDER BY at_ms, rowid")]
            return readings, recent

        result: tuple[list[Reading], list[Recent]] = self._pool.submit(
            lambda: read(self._db())).result()
        return result

    def close(self) -> None:
        """Finish the queued writes and close (blocks: run it off the event loop)."""
        if self._closed:
            return
        self._closed = True
        self._pool.submit(self._close_conn).result()
        self._pool.shutdown(wait=True)

    def _close_conn(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

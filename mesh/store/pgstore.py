"""The cloud's ledger in PostgreSQL: every store's envelopes in one partitioned table.

``PgLedger(dsn, store_id)`` is the ``Storage`` port (``mesh.ports`` contract 3) and the
rest of ``mesh.store.ledger.Ledger``'s public surface, over a database shared by every store
and every gateway (``mesh.cloud.gateway``). ``storemesh cloud run --database postgresql://...``
plugs it into each store's node; SQLite stays the default. The schema and the choice of
partitioning and indexes are explained in ``docs/analytics.md``.

Invariants:
 1. Append-only, in apply order: a store's rows get ids ``last_id + 1, ...`` in the order
    appended; ``(store_id, id)`` is the primary key and ``(store_id, origin, seq)`` is
    unique, so no envelope is ever in a store's ledger twice (a duplicate fails the
    batch, as in SQLite).
 2. ``append`` resolves its future only after PostgreSQL committed the transaction
    (``synchronous_commit`` as the server has it: ``on`` by default, i.e. WAL flushed),
    so the cloud acknowledges nothing PostgreSQL does not hold. ``sync=False`` changes
    nothing here: every commit is durable.
 3. One writer thread per store owns the write connection and groups every append
    waiting in its queue into one transaction (group commit, up to
    ``LEDGER_MAX_BATCH`` rows). A failed batch fails every append queued behind it and
    every later one until ``reset_failure``: no hole behind a failed write.
 4. The analytics rollup (``movements_hourly``) is updated in the SAME transaction as
    the envelopes it counts: committed together or not at all, and since an envelope
    is inserted at most once (1), it is counted exactly once, by construction (unless
    a revocation bound leaves it out: 8).
 5. Fencing: with ``gateway`` set, every write transaction first locks this store's
    lease row (``FOR SHARE``) and commits only while ``gateway`` holds an unexpired
    lease. A gateway that lost its lease (paused, partitioned, presumed dead) can no
    longer write, even if it does not know yet; a takeover (``UPDATE`` of the row)
    waits for a write in flight to finish, and then rebuilds from what it committed.
 6. ``scan`` and ``read_origin`` read committed rows only, on their own connection.
 7. ``after_call`` (a gateway's write-back of the node's changed control files,
    ``mesh.cloud.gateway`` invariant 6) runs in a fenced transaction of its own right
    after each ``call``, before any later append: the trust store is in PostgreSQL
    before the rows that may need it, as ``Ledger.call`` has it on disk.
 8. Revocation bounds (``mesh.core.identity`` invariant 7): the rollup counts none of a
    revoked node's envelopes above the bound its store's list names, as no replica
    holds them (the rows stay in ``envelopes``, an archive). ``apply_bounds`` runs, on the
    writer thread in a fenced transaction queued behind every append before it, the
    difference between the bound applied so far (none: every row) and the new one,
    computed in SQL from the rows themselves, and records the bound in
    ``rollup_bounds`` in the same transaction; appends after it leave those seqs out of
    the rollup. So the correction is done once (a restart reads the recorded bounds),
    and the rollup equals one that never counted them.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future
from typing import Any, Final

import orjson
import psycopg

from mesh import config
from mesh.core.envelope import Envelope
from mesh.errors import LedgerError, StorageFull
from mesh.store.writer import GroupCommitWriter

__all__ = ["PARTITIONS", "FencedOut", "PgLedger", "connect", "ensure_schema", "is_pg_dsn"]

log = logging.getLogger(__name__)

#: Hash partitions of the envelope table. Every query of the hot path names one store,
#: so it prunes to one partition; 16 keeps each partition's indexes a sixteenth of the
#: fleet's. Fixed at creation (re-partitioning is a migration): see docs/analytics.md.
PARTITIONS: Final = 16
HOUR_MS: Final = 3_600_000
#: Envelope kinds that move stock of one SKU with a signed ``meta.qty``
#: (as ``mesh.cloud.analytics``).
_MOVEMENTS: Final = frozenset({"receipt", "sale", "return", "adjust", "fulfil"})
#: "no bound": above any seq (bigint)
_NO_BOUND: Final = 2**62
_SCHEMA_LOCK: Final = 0x5704E5  # advisory lock: gateways starting together create once

_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS envelopes (
    store_id text   NOT NULL,
    id       bigint NOT NULL,       -- per store, apply order (invariant 1)
    origin   text   NOT NULL,
    seq      bigint NOT NULL,
    hlc      bigint NOT NULL,
    hash     bytea  NOT NULL,
    raw      bytea  NOT NULL,
    kind     text,                  -- meta.kind, for SQL analytics over the ledger
    sku      text,
    qty      integer,
    PRIMARY KEY (store_id, id),
    UNIQUE (store_id, origin, seq)
) PARTITION BY HASH (store_id);
CREATE TABLE IF NOT EXISTS snapshots (
    store_id text   NOT NULL,
    id       bigserial,
    upto     bigint NOT NULL,
    state    bytea  NOT NULL,
    PRIMARY KEY (store_id, id)
);
CREATE TABLE IF NOT EXISTS evidence (
    store_id text   NOT NULL,
    origin   text   NOT NULL,
    seq      bigint NOT NULL,
    first    bytea  NOT NULL,
    second   bytea  NOT NULL,
    PRIMARY KEY (store_id, origin, seq, second)
);
CREATE TABLE IF NOT EXISTS movements_hourly (
    store_id text    NOT NULL,
    sku      text    NOT NULL,
    hour_ms  bigint  NOT NULL,      -- start of the hour of the envelope's HLC (UTC)
    kind     text    NOT NULL,
    events   bigint  NOT NULL,
    qty      bigint  NOT NULL,      -- sum of meta.qty: a sale's is negative
    PRIMARY KEY (store_id, sku, hour_ms, kind)
);
CREATE INDEX IF NOT EXISTS movements_by_hour ON movements_hourly (kind, hour_ms);
CREATE TABLE IF NOT EXISTS rollup_bounds (
    store_id text   NOT NULL,       -- invariant 8: movements_hourly counts none of
    origin   text   NOT NULL,       -- origin's seqs above upto
    upto     bigint NOT NULL,
    PRIMARY KEY (store_id, origin)
);
CREATE TABLE IF NOT EXISTS leases (
    store_id   text        PRIMARY KEY,
    gateway    text        NOT NULL,
    url        text        NOT NULL,
    epoch      bigint      NOT NULL,   -- +1 on every change of holder
    expires_at timestamptz NOT NULL
);
CREATE TABLE IF NOT EXISTS gateways (
    gateway text        PRIMARY KEY,  -- mesh.cloud.gateway: live ones are seen within a ttl
    url     text        NOT NULL,
    seen_at timestamptz NOT NULL
);
CREATE TABLE IF NOT EXISTS egress (
    store_id  text        NOT NULL,   -- WAN bytes of one hold of a store by a gateway
    gateway   text        NOT NULL,
    opened_at timestamptz NOT NULL,   -- when that gateway opened the store's node
    sent      bigint      NOT NULL,   -- cloud -> store, on the wire (after compression)
    received  bigint      NOT NULL,   -- store -> cloud: the store's egress
    updated_at timestamptz NOT NULL,
    PRIMARY KEY (store_id, gateway, opened_at)
);
CREATE TABLE IF NOT EXISTS oversell_exceptions (
    store_id text    NOT NULL,      -- as the store's replica derives them (mesh.core.replica),
    sku      text    NOT NULL,      -- written by the lease holder when they change
    origin   text    NOT NULL,      -- (mesh.cloud.gateway invariant 8)
    seq      bigint  NOT NULL,
    hlc      bigint  NOT NULL,
    kind     text    NOT NULL,
    short    integer NOT NULL,      -- units of the event that were not there
    PRIMARY KEY (store_id, sku, origin, seq)
);
CREATE INDEX IF NOT EXISTS oversell_exceptions_by_hlc ON oversell_exceptions (hlc);
CREATE TABLE IF NOT EXISTS exceptions_seen (
    store_id   text        PRIMARY KEY,  -- a store's list above is as of this
    gateway    text        NOT NULL,
    exceptions integer     NOT NULL,
    updated_at timestamptz NOT NULL
);
CREATE OR REPLACE VIEW fleet_exceptions AS
    SELECT e.store_id, e.sku, e.origin, e.seq, e.hlc, e.kind, e.short,
           e.hlc >> 16 AS at_ms, s.gateway, s.updated_at
    FROM oversell_exceptions e JOIN exceptions_seen s USING (store_id);
CREATE OR REPLACE VIEW sales_hourly AS
    SELECT store_id, sku, hour_ms, events AS sales, -qty AS units
    FROM movements_hourly WHERE kind = 'sale';
"""


class FencedOut(LedgerError):
    """This gateway no longer holds the store's lease: the write was not committed."""


def is_pg_dsn(database: str | None) -> bool:
    return bool(database) and str(database).startswith(("postgresql://", "postgres://"))


def connect(dsn: str, *, autocommit: bool = False) -> psycopg.Connection[Any]:
    try:
        return psycopg.connect(dsn, autocommit=autocommit, connect_timeout=10,
                               application_name="storemesh")
    except psycopg.Error as exc:  # libpq's message has a hint on a second line
        why = " ".join(str(exc).split())
        raise LedgerError(f"cannot connect to PostgreSQL: {why}") from exc


def ensure_schema(dsn: str) -> None:
    """Create the tables once (idempotent; safe with many gateways starting at once)."""
    with connect(dsn) as conn:
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK,))
        conn.execute(_SCHEMA)
        for r in range(PARTITIONS):
            conn.execute(f"CREATE TABLE IF NOT EXISTS envelopes_p{r:02d} PARTITION OF "
                         f"envelopes FOR VALUES WITH (MODULUS {PARTITIONS}, REMAINDER {r})")
        conn.commit()


def _meta(raw: bytes) -> tuple[str | None, str | None, int | None]:
    """(kind, sku, qty) of a verified envelope's ``meta`` (a plain parse, as analytics)."""
    meta = orjson.loads(raw)["body"]["meta"]
    kind, sku, qty = meta.get("kind"), meta.get("sku"), meta.get("qty")
    return (str(kind) if kind is not None else None, sku if isinstance(sku, str) else None,
            qty if type(qty) is int else None)


def _error(exc: BaseException, what: str) -> LedgerError:
    if isinstance(exc, LedgerError):
        return exc
    state = getattr(exc, "sqlstate", None) or ""
    if state.startswith("53"):  # insufficient resources: disk full, out of memory
        return StorageFull(f"{what}: database full ({exc})")
    return LedgerError(f"{what}: {exc}")


class PgLedger(GroupCommitWriter):
    """One store's ledger in the shared PostgreSQL database (group commit on a thread)."""

    def __init__(self, dsn: str, store_id: str, *, gateway: str | None = None,
                 schema: bool = True,
                 after_call: Callable[[psycopg.Cursor[Any]], None] | None = None) -> None:
        """``gateway``: fence every write on this gateway's lease (invariant 5).
        ``after_call``: written after each ``call`` (invariant 7)."""
        self.dsn = dsn
        self.store_id = store_id
        self.gateway = gateway
        self.after_call = after_call
        if schema:
            ensure_schema(dsn)
        self._wconn = connect(dsn)
        self._rconn = connect(dsn, autocommit=True)
        self._rlock = threading.Lock()
        self.last_id = self._scalar(
            "SELECT COALESCE(MAX(id), 0) FROM envelopes WHERE store_id = %s", (store_id,))
        #: the revocation bounds the rollup honours (invariant 8; writer thread)
        self.rollup_bounds: dict[str, int] = {str(o): int(u) for o, u in self._rows(
            "SELECT origin, upto FROM rollup_bounds WHERE store_id = %s", (store_id,))}
        self._start_writer(f"pgledger:{store_id}")

    # --- writing -----------------------------------------------------------------------

    async def append_async(self, envs: Sequence[Envelope]) -> int:
        return await asyncio.wrap_future(self.append(envs))

    def _fence(self, cur: psycopg.Cursor[Any]) -> None:
        if self.gateway is None:
            return
        row = cur.execute(
            "SELECT gateway, expires_at > now() FROM leases WHERE store_id = %s FOR SHARE",
            (self.store_id,)).fetchone()
        if row is None or row[0] != self.gateway or not row[1]:
            raise FencedOut(f"gateway {self.gateway} does not hold the lease of store "
                            f"{self.store_id} (holder: {row[0] if row else None})")

    def _run_call(self, fn: Callable[[], None], fut: Future[int]) -> None:
        """As ``GroupCommitWriter._run_call``, then ``after_call`` (invariant 7)."""
        if self.after_call is None:
            super()._run_call(fn, fut)
            return
        if self._failed is not None:
            fut.set_exception(self._failed)
            return
        try:
            fn()
            with self._wconn.cursor() as cur:
                self._fence(cur)
                self.after_call(cur)
            self._wconn.commit()
        except (OSError, psycopg.Error, LedgerError) as exc:
            if not isinstance(exc, OSError):
                self._rollback()
            err = LedgerError(f"write before the ledger failed: {exc}")
            self._failed = self.last_error = err
            fut.set_exception(err)
            return
        fut.set_result(self.last_id)

    def _run_job(self, fn: Callable[[psycopg.Cursor[Any]], None], fut: Future[int]) -> None:
        try:
            with self._wconn.cursor() as cur:
                self._fence(cur)
                fn(cur)
            self._wconn.commit()
        except (psycopg.Error, LedgerError) as exc:
            self._rollback()
            fut.set_exception(exc)
            return
        fut.set_result(0)

    def _rollback(self) -> None:
        try:
            self._wconn.rollback()
        except psycopg.Error:  # the connection is gone: open a new one for what follows
            try:
                self._wconn.close()
                self._wconn = connect(self.dsn)
            except LedgerError as exc:
                log.warning("reconnect to PostgreSQL failed: %s", exc)

    def _write(self, envs: list[Envelope], sync: bool) -> int:
        # every commit is durable here: PostgreSQL's synchronous_commit (invariant 2)
        first = self.last_id + 1
        rows = []
        rollup: dict[tuple[str, int, str], list[int]] = {}
        bounds = self.rollup_bounds
        for i, e in enumerate(envs):
            kind, sku, qty = _meta(e.raw)
            rows.append((self.store_id, first + i, e.origin, e.seq, e.hlc, e.hash, e.raw,
                         kind, sku, qty))
            if e.seq > bounds.get(e.origin, e.seq):
                continue  # invariant 8: kept as an archive, not counted
            if kind in _MOVEMENTS and sku is not None and qty is not None:
                agg = rollup.setdefault((sku, (e.hlc >> 16) // HOUR_MS * HOUR_MS, kind), [0, 0])
                agg[0] += 1
                agg[1] += qty
        try:
            with self._wconn.cursor() as cur:
                self._fence(cur)
                with cur.copy("COPY envelopes (store_id, id, origin, seq, hlc, hash, raw, "
                              "kind, sku, qty) FROM STDIN") as copy:
                    for row in rows:
                        copy.write_row(row)
                if rollup:  # invariant 4: same transaction as the rows it counts
                    cur.executemany(
                        "INSERT INTO movements_hourly AS m "
                        "(store_id, sku, hour_ms, kind, events, qty) "
                        "VALUES (%s, %s, %s, %s, %s, %s) "
                        "ON CONFLICT (store_id, sku, hour_ms, kind) DO UPDATE SET "
                        "events = m.events + excluded.events, qty = m.qty + excluded.qty",
                        [(self.store_id, sku, hour, kind, n, q)
                         for (sku, hour, kind), (n, q) in sorted(rollup.items())])
            self._wconn.commit()  # invariant 2: acknowledged only after this returns
        except LedgerError:  # fenced out
            self._rollback()
            raise
        except psycopg.Error as exc:
            self._rollback()
            raise _error(exc, f"ledger write failed ({len(rows)} envelopes not written)"
                         ) from exc
        return first + len(rows) - 1

    def _job(self, fn: Callable[[psycopg.Cursor[Any]], None], what: str) -> None:
        try:
            self._queue_job(fn).result()
        except psycopg.Error as exc:
            raise _error(exc, what) from exc

    def apply_bounds(self, bounds: Mapping[str, int]) -> Future[int] | None:
        """Make the rollup honour these revocation bounds (invariant 8): None if it does
        already, else the future of the correction (queued behind every append before
        it). A bound no longer named is kept (a list drops no revoked node)."""
        todo = {o: b for o, b in bounds.items() if self.rollup_bounds.get(o) != b}
        if not todo:
            return None

        def correct(cur: psycopg.Cursor[Any]) -> None:
            for origin, bound in sorted(todo.items()):
                applied = self.rollup_bounds.get(origin)
                if applied == bound:
                    continue
                # rows counted now and not then (-1), or not now and then (+1)
                lo, hi, sign = (bound, _NO_BOUND if applied is None else applied, -1) \
                    if applied is None or bound < applied else (applied, bound, 1)
                cur.execute(
                    "INSERT INTO movements_hourly AS m (store_id, sku, hour_ms, kind, events, "
                    "qty) SELECT store_id, sku, (hlc >> 16) / %s * %s, kind, %s * count(*), "
                    "%s * sum(qty) FROM envelopes WHERE store_id = %s AND origin = %s AND "
                    "seq > %s AND seq <= %s AND kind = ANY(%s) AND sku IS NOT NULL AND qty "
                    "IS NOT NULL GROUP BY 1, 2, 3, 4 ON CONFLICT (store_id, sku, hour_ms, "
                    "kind) DO UPDATE SET events = m.events + excluded.events, "
                    "qty = m.qty + excluded.qty",
                    (HOUR_MS, HOUR_MS, sign, sign, self.store_id, origin, lo, hi,
                     sorted(_MOVEMENTS)))
                cur.execute(
                    "INSERT INTO rollup_bounds (store_id, origin, upto) VALUES (%s, %s, %s) "
                    "ON CONFLICT (store_id, origin) DO UPDATE SET upto = excluded.upto",
                    (self.store_id, origin, bound))
            cur.execute("DELETE FROM movements_hourly WHERE store_id = %s AND events = 0",
                        (self.store_id,))

        def done(fut: Future[int]) -> None:  # (on the writer thread, after the commit)
            if fut.exception() is None:
                self.rollup_bounds = {**self.rollup_bounds, **todo}
                log.warning("rollup of %s honours revocation bounds %s", self.store_id, todo)
        fut = self._queue_job(correct)
        fut.add_done_callback(done)
        return fut

    def save_snapshot(self, upto: int, state: bytes) -> None:
        """The state after row ``upto`` (which must be the last row written); keeps the
        newest two per store."""
        def write(cur: psycopg.Cursor[Any]) -> None:
            if self._failed is not None or upto != self.last_id:
                raise LedgerError(f"snapshot covers row {upto} but the ledger holds "
                                  f"{self.last_id} (failed: {self._failed})")
            cur.execute("INSERT INTO snapshots (store_id, upto, state) VALUES (%s, %s, %s)",
                        (self.store_id, upto, state))
            cur.execute("DELETE FROM snapshots WHERE store_id = %s AND id NOT IN (SELECT id "
                        "FROM snapshots WHERE store_id = %s ORDER BY id DESC LIMIT 2)",
                        (self.store_id, self.store_id))
        self._job(write, "snapshot not saved")

    def add_evidence(self, origin: str, seq: int, first: bytes, second: bytes) -> None:
        def write(cur: psycopg.Cursor[Any]) -> None:
            cur.execute("INSERT INTO evidence (store_id, origin, seq, first, second) "
                        "VALUES (%s, %s, %s, %s, %s) ON CONFLICT DO NOTHING",
                        (self.store_id, origin, seq, first, second))
        self._job(write, "evidence not saved")

    # --- reading -----------------------------------------------------------------------

    def _rows(self, sql: str, params: tuple[object, ...]) -> list[tuple[Any, ...]]:
        with self._rlock:
            try:
                return self._rconn.execute(sql, params).fetchall()
            except psycopg.OperationalError:  # connection lost: once more on a new one
                self._rconn.close()
                self._rconn = connect(self.dsn, autocommit=True)
                return self._rconn.execute(sql, params).fetchall()
            except psycopg.Error as exc:
                raise LedgerError(f"ledger read failed: {exc}") from exc

    def _scalar(self, sql: str, params: tuple[object, ...] = ()) -> int:
        return int(self._rows(sql, params)[0][0])

    def count(self) -> int:
        return self._scalar("SELECT COUNT(*) FROM envelopes WHERE store_id = %s",
                            (self.store_id,))

    def size_bytes(self) -> int:
        """Bytes of this store's rows (payload only: the table is shared by the fleet)."""
        return self._scalar("SELECT COALESCE(SUM(length(raw)), 0) FROM envelopes "
                            "WHERE store_id = %s", (self.store_id,))

    def heads(self) -> dict[str, int]:
        return {str(o): int(s) for o, s in self._rows(
            "SELECT origin, MAX(seq) FROM envelopes WHERE store_id = %s GROUP BY origin",
            (self.store_id,))}

    def read_origin(self, origin: str, first: int, last: int,
                    limit: int = config.LEDGER_PAGE) -> list[bytes]:
        out: list[bytes] = []
        for seq, raw in self._rows(
                "SELECT seq, raw FROM envelopes WHERE store_id = %s AND origin = %s "
                "AND seq BETWEEN %s AND %s ORDER BY seq LIMIT %s",
                (self.store_id, origin, first, last, limit)):
            if int(seq) != first + len(out):  # the run from ``first`` only (as Ledger's)
                break
            out.append(bytes(raw))
        return out

    def scan_origin(self, origin: str, page: int = config.LEDGER_PAGE
                    ) -> Iterator[tuple[int, bytes]]:
        """(seq, raw) of one origin's rows, ascending (``Ledger.scan_origin``)."""
        seq = 0
        while True:
            rows = self._rows("SELECT seq, raw FROM envelopes WHERE store_id = %s AND "
                              "origin = %s AND seq > %s ORDER BY seq LIMIT %s",
                              (self.store_id, origin, seq, page))
            if not rows:
                return
            for s, raw in rows:
                yield int(s), bytes(raw)
            seq = int(rows[-1][0])

    def prune(self, upto: Mapping[str, int]) -> int:
        """``Ledger.prune``, for the same surface: the cloud keeps the archive
        (``config.LEDGER_PRUNE_ROLES``), so nothing calls it there today."""
        gone = [0]

        def delete(cur: psycopg.Cursor[Any]) -> None:
            for origin, seq in sorted(upto.items()):
                cur.execute("DELETE FROM envelopes WHERE store_id = %s AND origin = %s AND "
                            "seq <= %s AND id < (SELECT max(id) FROM envelopes WHERE "
                            "store_id = %s)", (self.store_id, origin, seq, self.store_id))
                gone[0] += cur.rowcount
        self._job(delete, "ledger not pruned")
        return gone[0]

    def hash_at(self, origin: str, seq: int) -> bytes | None:
        rows = self._rows("SELECT hash FROM envelopes WHERE store_id = %s AND origin = %s "
                          "AND seq = %s", (self.store_id, origin, seq))
        return bytes(rows[0][0]) if rows else None

    def scan(self, after: int = 0, page: int = config.LEDGER_PAGE) -> Iterator[tuple[int, bytes]]:
        while True:
            rows = self._rows("SELECT id, raw FROM envelopes WHERE store_id = %s AND id > %s "
                              "ORDER BY id LIMIT %s", (self.store_id, after, page))
            if not rows:
                return
            for rid, raw in rows:
                yield int(rid), bytes(raw)
            after = int(rows[-1][0])

    def scan_by_origin(self, page: int = config.LEDGER_PAGE) -> Iterator[tuple[str, int, bytes]]:
        origin, seq = "", 0
        while True:
            rows = self._rows(
                "SELECT origin, seq, raw FROM envelopes WHERE store_id = %s AND "
                "(origin, seq) > (%s, %s) ORDER BY origin, seq LIMIT %s",
                (self.store_id, origin, seq, page))
            if not rows:
                return
            for o, s, raw in rows:
                yield str(o), int(s), bytes(raw)
            origin, seq = str(rows[-1][0]), int(rows[-1][1])

    def latest_snapshot(self) -> tuple[int, bytes] | None:
        rows = self._rows("SELECT upto, state FROM snapshots WHERE store_id = %s "
                          "ORDER BY id DESC LIMIT 1", (self.store_id,))
        return (int(rows[0][0]), bytes(rows[0][1])) if rows else None

    def evidence(self) -> list[tuple[str, int, bytes, bytes]]:
        return [(str(o), int(s), bytes(a), bytes(b)) for o, s, a, b in self._rows(
            "SELECT origin, seq, first, second FROM evidence WHERE store_id = %s "
            "ORDER BY origin, seq", (self.store_id,))]

    # --- lifecycle -----------------------------------------------------------------------

    def _close_connections(self) -> None:
        with self._rlock:
            self._rconn.close()
        self._wconn.close()

    def __enter__(self) -> PgLedger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

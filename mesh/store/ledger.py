"""The durable ledger: every applied envelope, in apply order, in one SQLite file.

Invariants:
 1. Rows are appended in the order the replica applied the envelopes, so per origin
    they are in seq order without gaps, and a replay in rowid order rebuilds the same
    state.
 2. ``append`` resolves its future only after the rows are committed in WAL mode. A
    group commit that holds any ``sync=True`` append (a local command, acknowledged to
    a POS once durable) is ``synchronous=FULL``, i.e. fsynced, and so makes every row
    before it durable too. Envelopes received from peers are appended with
    ``sync=False`` and may be committed with ``synchronous=NORMAL`` (no fsync of their
    own): a process crash loses none of them, a power cut can lose the newest ones
    since the last fsync, which is safe because they are durable at their origin and
    peers send them again (a new session starts from what the ledger holds). A crash
    therefore never loses an acknowledged local command.
 3. One writer thread owns the write connection and batches every append waiting in
    its queue into one transaction (group commit): one fsync for up to
    ``LEDGER_MAX_BATCH`` envelopes. If a batch fails, it and every append queued after
    it fail too, so the ledger never gets a hole behind a failed write.
 4. A snapshot records the state after every row up to ``upto``; rebuild = newest
    snapshot + the rows after it.
 5. Nothing here blocks an event loop: callers on asyncio wrap ``append``'s future
    (``asyncio.wrap_future``) or run reads with ``asyncio.to_thread``.
 6. One queue, one order: appends, jobs and ``call``s run on the writer thread in the
    order they were queued, so what a ``call`` writes is on disk before any row
    appended after it.
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future
from pathlib import Path

from mesh import config
from mesh.core.envelope import Envelope
from mesh.errors import LedgerError, StorageFull
from mesh.store.writer import GroupCommitWriter

__all__ = ["Ledger"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS envelopes (
    id     INTEGER PRIMARY KEY,
    origin TEXT    NOT NULL,
    seq    INTEGER NOT NULL,
    hlc    INTEGER NOT NULL,
    hash   BLOB    NOT NULL,
    raw    BLOB    NOT NULL,
    UNIQUE (origin, seq)
);
CREATE TABLE IF NOT EXISTS snapshots (
    id    INTEGER PRIMARY KEY,
    upto  INTEGER NOT NULL,
    state BLOB    NOT NULL
);
CREATE TABLE IF NOT EXISTS evidence (
    origin TEXT    NOT NULL,
    seq    INTEGER NOT NULL,
    first  BLOB    NOT NULL,
    second BLOB    NOT NULL,
    PRIMARY KEY (origin, seq, second)
);
"""

def _connect(path: Path, *, readonly: bool = False) -> sqlite3.Connection:
    if readonly:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, check_same_thread=False)
    else:
        conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")  # the writer lowers it per batch (inv. 2)
    conn.execute("PRAGMA busy_timeout=5000")
    return conn


def _is_full(exc: sqlite3.Error) -> bool:
    return isinstance(exc, sqlite3.OperationalError) and "full" in str(exc).lower()


class Ledger(GroupCommitWriter):
    """Append-only envelope log with group commit on a writer thread."""

    def __init__(self, path: Path | str, *, max_bytes: int | None = None) -> None:
        """Open (or create) the ledger at ``path``. ``max_bytes`` caps the database size
        (a quota): past it, appends fail with ``StorageFull`` just as on a full disk."""
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._wconn = _connect(self.path)
            self._sync_full = True  # the write connection's synchronous mode (inv. 2)
            self._wconn.executescript(_SCHEMA)
            if max_bytes is not None:
                page = self._wconn.execute("PRAGMA page_size").fetchone()[0]
                self._wconn.execute(f"PRAGMA max_page_count={max(1, max_bytes // page)}")
            self._rconn = _connect(self.path, readonly=True)
        except sqlite3.Error as exc:
            raise LedgerError(f"cannot open ledger {self.path}: {exc}") from exc
        self._rlock = threading.Lock()
        self.last_id = self._scalar("SELECT COALESCE(MAX(id), 0) FROM envelopes")
        self._start_writer(f"ledger:{self.path.name}")

    # --- writing -----------------------------------------------------------------------

    def _set_sync(self, full: bool) -> None:
        if full != self._sync_full:
            self._wconn.execute(f"PRAGMA synchronous={'FULL' if full else 'NORMAL'}")
            self._sync_full = full

    def _run_job(self, fn: Callable[[sqlite3.Connection], None], fut: Future[int]) -> None:
        try:
            self._set_sync(True)  # snapshots, evidence, compaction: always fsynced
            self._wconn.execute("BEGIN IMMEDIATE")
            fn(self._wconn)
            self._wconn.execute("COMMIT")
        except sqlite3.Error as exc:
            with contextlib.suppress(sqlite3.Error):
                self._wconn.execute("ROLLBACK")
            fut.set_exception(exc)
            return
        fut.set_result(0)

    def _write(self, envs: list[Envelope], sync: bool) -> int:
        rows = [(e.origin, e.seq, e.hlc, e.hash, e.raw) for e in envs]
        try:
            self._set_sync(sync)
            self._wconn.execute("BEGIN IMMEDIATE")
            cur = self._wconn.executemany(
                "INSERT INTO envelopes (origin, seq, hlc, hash, raw) "
                "VALUES (?, ?, ?, ?, ?)", rows)
            del cur
            self._wconn.execute("COMMIT")
            return int(self._wconn.execute(
                "SELECT COALESCE(MAX(id), 0) FROM envelopes").fetchone()[0])
        except sqlite3.Error as exc:
            with contextlib.suppress(sqlite3.Error):
                self._wconn.execute("ROLLBACK")
            raise (StorageFull(f"disk full: {len(rows)} envelopes not written ({exc})")
                   if _is_full(exc) else LedgerError(f"ledger write failed: {exc}")) from exc

    def _job(self, fn: Callable[[sqlite3.Connection], None], what: str) -> None:
        """Run ``fn`` in one transaction on the writer thread, after everything queued."""
        try:
            self._queue_job(fn).result()
        except sqlite3.Error as exc:
            raise (StorageFull if _is_full(exc) else LedgerError)(f"{what}: {exc}") from exc

    def save_snapshot(self, upto: int, state: bytes) -> None:
        """Store a snapshot of the state after row ``upto``; keeps only the newest two."""
        def write(conn: sqlite3.Connection) -> None:
            # On the writer thread, after every queued append: the snapshot must cover
            # exactly the rows on disk, never a state a failed write left in memory.
            if self._failed is not None or upto != self.last_id:
                raise sqlite3.IntegrityError(
                    f"snapshot covers row {upto} but the ledger holds {self.last_id} "
                    f"(failed: {self._failed})")
            conn.execute("INSERT INTO snapshots (upto, state) VALUES (?, ?)", (upto, state))
            conn.execute("DELETE FROM snapshots WHERE id NOT IN "
                         "(SELECT id FROM snapshots ORDER BY id DESC LIMIT 2)")
        self._job(write, "snapshot not saved")

    def add_evidence(self, origin: str, seq: int, first: bytes, second: bytes) -> None:
        """Keep proof of equivocation (two signed envelopes for one (origin, seq))."""
        def write(conn: sqlite3.Connection) -> None:
            conn.execute("INSERT OR IGNORE INTO evidence (origin, seq, first, second) "
                         "VALUES (?, ?, ?, ?)", (origin, seq, first, second))
        self._job(write, "evidence not saved")

    # --- reading -----------------------------------------------------------------------

    def _scalar(self, sql: str, params: tuple[object, ...] = ()) -> int:
        with self._rlock:
            return int(self._rconn.execute(sql, params).fetchone()[0])

    def count(self) -> int:
        return self._scalar("SELECT COUNT(*) FROM envelopes")

    def size_bytes(self) -> int:
        total = 0
        for suffix in ("", "-wal"):
            with contextlib.suppress(FileNotFoundError):
                total += Path(str(self.path) + suffix).stat().st_size
        return total

    def heads(self) -> dict[str, int]:
        """Highest seq per origin."""
        with self._rlock:
            return dict(self._rconn.execute(
                "SELECT origin, MAX(seq) FROM envelopes GROUP BY origin").fetchall())

    def read_origin(self, origin: str, first: int, last: int,
                    limit: int = config.LEDGER_PAGE) -> list[bytes]:
        """Raw envelopes of ``origin`` with first <= seq <= last, ascending, at most ``limit``."""
        with self._rlock:
            rows = self._rconn.execute(
                "SELECT seq, raw FROM envelopes WHERE origin = ? AND seq BETWEEN ? AND ? "
                "ORDER BY seq LIMIT ?", (origin, first, last, limit)).fetchall()
        out: list[bytes] = []
        for seq, raw in rows:  # the run from ``first`` only: nothing past a pruned prefix
            if seq != first + len(out):
                break
            out.append(raw)
        return out

    def prune(self, upto: Mapping[str, int]) -> int:
        """Delete each origin's rows with seq <= ``upto[origin]`` (a prefix a checkpoint
        and a snapshot cover, ``mesh.durable`` invariant 8), after every queued write;
        returns how many rows went. The space is reused by later rows (no VACUUM)."""
        gone = [0]

        def delete(conn: sqlite3.Connection) -> None:
            for origin, seq in sorted(upto.items()):
                # never the newest row: row ids (snapshots name them) must not restart
                gone[0] += conn.execute(
                    "DELETE FROM envelopes WHERE origin = ? AND seq <= ? AND id < "
                    "(SELECT MAX(id) FROM envelopes)", (origin, seq)).rowcount
        self._job(delete, "ledger not pruned")
        return gone[0]

    def hash_at(self, origin: str, seq: int) -> bytes | None:
        with self._rlock:
            row = self._rconn.execute(
                "SELECT hash FROM envelopes WHERE origin = ? AND seq = ?", (origin, seq)
            ).fetchone()
        return None if row is None else bytes(row[0])

    def scan(self, after: int = 0, page: int = config.LEDGER_PAGE) -> Iterator[tuple[int, bytes]]:
        """(row id, raw) in apply order, for rows after ``after``, read page by page."""
        while True:
            with self._rlock:
                rows = self._rconn.execute(
                    "SELECT id, raw FROM envelopes WHERE id > ? ORDER BY id LIMIT ?",
                    (after, page)).fetchall()
            if not rows:
                return
            yield from rows
            after = rows[-1][0]

    def scan_by_origin(self, page: int = config.LEDGER_PAGE) -> Iterator[tuple[str, int, bytes]]:
        """(origin, seq, raw) ordered by origin then seq (for verification)."""
        origin, seq = "", 0
        while True:
            with self._rlock:
                rows = self._rconn.execute(
                    "SELECT origin, seq, raw FROM envelopes WHERE (origin, seq) > (?, ?) "
                    "ORDER BY origin, seq LIMIT ?", (origin, seq, page)).fetchall()
            if not rows:
                return
            yield from rows
            origin, seq = rows[-1][0], rows[-1][1]

    def scan_origin(self, origin: str, page: int = config.LEDGER_PAGE
                    ) -> Iterator[tuple[int, bytes]]:
        """(seq, raw) of one origin's rows, ascending (from its first row: a pruned
        ledger's chain starts past seq 1)."""
        seq = 0
        while True:
            with self._rlock:
                rows = self._rconn.execute(
                    "SELECT seq, raw FROM envelopes WHERE origin = ? AND seq > ? "
                    "ORDER BY seq LIMIT ?", (origin, seq, page)).fetchall()
            if not rows:
                return
            yield from rows
            seq = rows[-1][0]

    def latest_snapshot(self) -> tuple[int, bytes] | None:
        with self._rlock:
            row = self._rconn.execute(
                "SELECT upto, state FROM snapshots ORDER BY id DESC LIMIT 1").fetchone()
        return None if row is None else (int(row[0]), bytes(row[1]))

    def evidence(self) -> list[tuple[str, int, bytes, bytes]]:
        with self._rlock:
            return [(o, s, bytes(a), bytes(b)) for o, s, a, b in self._rconn.execute(
                "SELECT origin, seq, first, second FROM evidence ORDER BY origin, seq")]

    # --- lifecycle -----------------------------------------------------------------------

    def _close_connections(self) -> None:
        with self._rlock:  # never under a reader on another thread (SQLite would crash)
            self._rconn.close()
        self._wconn.close()

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

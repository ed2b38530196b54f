"""The cloud's control plane in PostgreSQL (``mesh.cloud.control``, on ``--database``).

Tables (created with the ledger's, ``ensure_control_schema``)::

    cloud_stores       store_id -> registered_at: the store registry
    cloud_store_files  (store_id, name) -> data: each store's cloud node as files
                       (key, certificate and trust store, TLS files)
    hq_users           name -> role, verifier (scrypt), disabled, changed_ms
    hq_sessions        digest (SHA-256 of the cookie) -> user, role, csrf, vtag, times
    control_versions   name -> version: 'hq_users' and 'stores' move on every change

Invariants (besides ``mesh.cloud.control``'s):
 1. A store's registration (its row and all its files) is one transaction;
    ``ON CONFLICT DO NOTHING`` makes concurrent registrations of one store (two gateways
    importing the same ROOT) register it once.
 2. ``edit_users`` holds ``control_versions['hq_users']`` ``FOR UPDATE`` for the whole
    read-modify-write: editors are serialised by the database, and the version it bumps
    is the accounts' stamp.
 3. One connection per ``PgControl``, behind a lock; a lost connection is reopened once
    per call, and a database that stays away raises ``ControlUnavailable`` (an
    ``OSError``), so callers written for files handle it as they handle a file.
 4. Private keys stored here are as sensitive as the store directories were: the
    database's access control (role, ``pg_hba.conf``, TLS) protects them; see
    docs/operations.md.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Final, TypeVar

import psycopg

from mesh import config
from mesh.cloud.control import STORE_FILES, ControlUnavailable, HqSession, Sessions

__all__ = ["PgControl", "PgSessions", "ensure_control_schema"]

_SCHEMA_LOCK: Final = 0x5704E6  # advisory lock: gateways starting together create once
_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS cloud_stores (
    store_id      text        PRIMARY KEY,
    registered_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE IF NOT EXISTS cloud_store_files (
    store_id   text        NOT NULL REFERENCES cloud_stores ON DELETE CASCADE,
    name       text        NOT NULL,
    data       bytea       NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (store_id, name)
);
CREATE TABLE IF NOT EXISTS hq_users (
    name       text    PRIMARY KEY,
    role       text    NOT NULL,
    verifier   text    NOT NULL,
    disabled   boolean NOT NULL,
    changed_ms bigint  NOT NULL
);
CREATE TABLE IF NOT EXISTS hq_sessions (
    digest  bytea            PRIMARY KEY,
    "user"  text             NOT NULL,
    role    text             NOT NULL,
    csrf    text             NOT NULL,
    vtag    text             NOT NULL,
    created double precision NOT NULL,
    seen    double precision NOT NULL
);
CREATE INDEX IF NOT EXISTS hq_sessions_created ON hq_sessions (created);
CREATE TABLE IF NOT EXISTS control_versions (
    name    text   PRIMARY KEY,
    version bigint NOT NULL
);
INSERT INTO control_versions VALUES ('hq_users', 0), ('stores', 0) ON CONFLICT DO NOTHING;
"""

T = TypeVar("T")


def ensure_control_schema(conn: psycopg.Connection[Any]) -> None:
    """Create the control plane's tables (idempotent; safe with many gateways)."""
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK,))
        conn.execute(_SCHEMA)


class PgControl:
    """``ControlPlane`` over one PostgreSQL database (invariant 3: one connection)."""

    def __init__(self, dsn: str, *, schema: bool = True) -> None:
        self.dsn = dsn
        self._lock = threading.RLock()
        self._conn: psycopg.Connection[Any] | None = None
        if schema:
            self._run(ensure_control_schema)

    # --- the connection -----------------------------------------------------------------

    def _connect(self) -> psycopg.Connection[Any]:
        if self._conn is None or self._conn.closed:
            self._conn = psycopg.connect(self.dsn, autocommit=True, connect_timeout=10,
                                         application_name="storemesh-control")
        return self._conn

    def _run(self, fn: Callable[[psycopg.Connection[Any]], T]) -> T:
        with self._lock:
            for attempt in (1, 2):
                try:
                    return fn(self._connect())
                except psycopg.OperationalError as exc:  # lost: once more on a new one
                    with contextlib.suppress(psycopg.Error):
                        if self._conn is not None:
                            self._conn.close()
                    self._conn = None
                    if attempt == 2:
                        raise ControlUnavailable(f"control plane database: {exc}") from exc
                except psycopg.Error as exc:
                    raise ControlUnavailable(f"control plane database: {exc}") from exc
        raise AssertionError("unreachable")

    def _rows(self, sql: str, params: tuple[object, ...] = ()) -> list[tuple[Any, ...]]:
        def q(conn: psycopg.Connection[Any]) -> list[tuple[Any, ...]]:
            cur = conn.execute(sql, params)
            return cur.fetchall() if cur.description is not None else []
        return self._run(q)

    # --- the store registry -------------------------------------------------------------

    def stores(self) -> list[str]:
        return [str(r[0]) for r in self._rows(
            "SELECT store_id FROM cloud_stores ORDER BY store_id")]

    def register_store(self, store_id: str, files: Mapping[str, bytes]) -> bool:
        from mesh.store.datadir import check_id

        check_id(store_id, "store id")
        if set(files) != set(STORE_FILES):
            raise ValueError(f"a store is registered with all of {sorted(STORE_FILES)}")

        def reg(conn: psycopg.Connection[Any]) -> bool:
            with conn.transaction():  # invariant 1
                cur = conn.execute("INSERT INTO cloud_stores (store_id) VALUES (%s) "
                                   "ON CONFLICT DO NOTHING RETURNING store_id", (store_id,))
                if cur.fetchone() is None:
                    return False
                with conn.cursor() as c:
                    c.executemany("INSERT INTO cloud_store_files (store_id, name, data) "
                                  "VALUES (%s, %s, %s)",
                                  [(store_id, n, bytes(d)) for n, d in sorted(files.items())])
                conn.execute("UPDATE control_versions SET version = version + 1 "
                             "WHERE name = 'stores'")
                return True
        return self._run(reg)

    def store_files(self, store_id: str) -> dict[str, bytes]:
        rows = self._rows("SELECT name, data FROM cloud_store_files WHERE store_id = %s",
                          (store_id,))
        if not rows:
            raise KeyError(store_id)
        return {str(n): bytes(d) for n, d in rows}

    def save_store_files(self, store_id: str, files: Mapping[str, bytes]) -> None:
        unknown = set(files) - set(STORE_FILES)
        if unknown:
            raise ValueError(f"not a store control file: {sorted(unknown)}")

        def save(conn: psycopg.Connection[Any]) -> None:
            with conn.transaction():
                if conn.execute("SELECT 1 FROM cloud_stores WHERE store_id = %s FOR UPDATE",
                                (store_id,)).fetchone() is None:
                    raise KeyError(store_id)
                with conn.cursor() as c:
                    c.executemany(SAVE_FILE, [(store_id, n, bytes(d))
                                              for n, d in sorted(files.items())])
        self._run(save)

    # --- HQ accounts --------------------------------------------------------------------

    def users(self) -> dict[str, dict[str, Any]]:
        return {str(n): {"role": str(r), "verifier": str(v), "disabled": bool(d),
                         "changed_ms": int(c)}
                for n, r, v, d, c in self._rows(
                    "SELECT name, role, verifier, disabled, changed_ms FROM hq_users")}

    def users_stamp(self) -> object:
        rows = self._rows("SELECT version FROM control_versions WHERE name = 'hq_users'")
        version = int(rows[0][0]) if rows else 0
        return version or None

    @contextlib.contextmanager
    def edit_users(self) -> Iterator[dict[str, dict[str, Any]]]:
        with self._lock:  # the connection is this edit's until it commits
            conn = self._run(lambda c: c)
            try:
                with conn.transaction():  # invariant 2
                    conn.execute("SELECT version FROM control_versions WHERE name = "
                                 "'hq_users' FOR UPDATE")
                    before = self.users()
                    users = {k: dict(v) for k, v in before.items()}
                    yield users
                    gone = [k for k in before if k not in users]
                    if gone:
                        conn.execute("DELETE FROM hq_users WHERE name = ANY(%s)", (gone,))
                    changed = [(k, v["role"], v["verifier"], bool(v["disabled"]),
                                int(v.get("changed_ms", time.time_ns() // 1_000_000)))
                               for k, v in sorted(users.items()) if before.get(k) != v]
                    with conn.cursor() as c:
                        c.executemany(
                            "INSERT INTO hq_users (name, role, verifier, disabled, "
                            "changed_ms) VALUES (%s, %s, %s, %s, %s) ON CONFLICT (name) DO "
                            "UPDATE SET role = excluded.role, verifier = excluded.verifier, "
                            "disabled = excluded.disabled, changed_ms = excluded.changed_ms",
                            changed)
                    conn.execute("UPDATE control_versions SET version = version + 1 "
                                 "WHERE name = 'hq_users'")
            except psycopg.Error as exc:
                raise ControlUnavailable(f"HQ accounts not saved: {exc}") from exc

    # --- HQ sessions --------------------------------------------------------------------

    def sessions(self) -> Sessions:
        return PgSessions(self.dsn)

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None


#: Upsert of one control file (also used by a gateway's fenced write-back).
SAVE_FILE: Final = ("INSERT INTO cloud_store_files AS f (store_id, name, data) "
                    "VALUES (%s, %s, %s) ON CONFLICT (store_id, name) DO UPDATE SET "
                    "data = excluded.data, updated_at = now() "
                    "WHERE f.data IS DISTINCT FROM excluded.data")


class PgSessions:
    """``Sessions`` in table ``hq_sessions`` (its own connection: the HQ door's calls run
    in worker threads)."""

    def __init__(self, dsn: str) -> None:
        self._control = PgControl(dsn, schema=False)

    def get(self, key: bytes) -> HqSession | None:
        rows = self._control._rows('SELECT "user", role, csrf, vtag, created, seen FROM '
                                   "hq_sessions WHERE digest = %s", (key,))
        if not rows:
            return None
        u, r, c, v, created, seen = rows[0]
        return HqSession(u, r, c, v, float(created), float(seen), stored_seen=float(seen))

    def put(self, key: bytes, s: HqSession) -> None:
        def put(conn: psycopg.Connection[Any]) -> None:
            with conn.transaction():
                conn.execute(
                    'INSERT INTO hq_sessions AS s (digest, "user", role, csrf, vtag, created, '
                    "seen) VALUES (%s, %s, %s, %s, %s, %s, %s) ON CONFLICT (digest) DO UPDATE "
                    'SET "user" = excluded."user", role = excluded.role, csrf = excluded.csrf, '
                    "vtag = excluded.vtag, created = excluded.created, seen = excluded.seen",
                    (key, s.user, s.role, s.csrf, s.verifier, s.created, s.seen))
                conn.execute("DELETE FROM hq_sessions WHERE digest IN (SELECT digest FROM "
                             "hq_sessions ORDER BY created DESC OFFSET %s)",
                             (config.HQ_SESSIONS_MAX,))
        self._control._run(put)

    def touch(self, key: bytes, seen: float) -> None:
        self._control._rows("UPDATE hq_sessions SET seen = GREATEST(seen, %s) "
                            "WHERE digest = %s", (seen, key))

    def delete(self, key: bytes) -> None:
        self._control._rows("DELETE FROM hq_sessions WHERE digest = %s", (key,))

    def end_unless(self, allowed: dict[str, str]) -> int:
        now = time.time()
        rows = self._control._rows('SELECT digest, "user", vtag, created, seen '
                                   "FROM hq_sessions")
        ended = [bytes(r[0]) for r in rows if allowed.get(r[1]) != r[2]
                 or now - r[4] > config.HQ_IDLE_S or now - r[3] > config.HQ_SESSION_S]
        if ended:
            self._control._rows("DELETE FROM hq_sessions WHERE digest = ANY(%s)", (ended,))
        return len(ended)

    def count(self) -> int:
        return int(self._control._rows("SELECT count(*) FROM hq_sessions")[0][0])

    def close(self) -> None:
        self._control.close()

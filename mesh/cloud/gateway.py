"""Many cloud gateways over one PostgreSQL: each store served by one gateway at a time.

``storemesh cloud run --database postgresql://... --gateway-id g1`` makes the cloud
peer a *gateway*: N such processes share one database, which holds every store's ledger
(``mesh.store.pgstore``) and the control plane (``mesh.cloud.pgcontrol``: the store
registry, each store's cloud node key, certificate, trust store and TLS files, HQ
accounts and sessions); they need no shared directory. A store is
served by the gateway holding its **lease** (a row of ``leases``: store, gateway, URL,
epoch, ``expires_at``); the others answer its paths with a redirect to the holder (API
requests) or 503 (the sync WebSocket: an edge dials every gateway URL it was given and
keeps the session that a holder accepts).

Invariants:
 1. One writer per store: a gateway opens a store's node only after it acquired the
    lease, and every ledger write is fenced on it (``mesh.store.pgstore`` invariant 5), so a
    gateway that lost its lease cannot commit even before it notices.
 2. A lease expires ``ttl_s`` after its last renewal; the holder renews all its leases
    every ``ttl_s / 3``, on a thread of its own (``_Renewer``: a busy loop keeps
    them). A gateway that dies (kill -9) stops renewing, so its leases
    expire within ``ttl_s`` and a live gateway acquires them at its next tick: a store
    is back within ``ttl_s + ttl_s / 3`` plus the node's rebuild from PostgreSQL plus
    the edge's redial backoff (``config.DIAL_BACKOFF_MAX_S``).
 3. Fair share: with L live gateways (a heartbeat row seen within ``ttl_s``), a gateway
    holds at most ceil(stores / L) stores; above that it hands stores over (closes
    the node, then releases the lease), below it takes free or expired ones, in a
    per-gateway rendezvous order so gateways starting together pick different stores.
 4. Takeover rebuilds from what PostgreSQL committed (snapshot + ledger tail): what the
    old holder acknowledged is there (acknowledgement after COMMIT), and since the
    envelope table is unique on (store, origin, seq), nothing is counted twice.
 5. Every lease operation runs on the event loop through psycopg's async connection;
    store nodes start and stop on the loop too (their blocking parts in threads).
 6. The registry is re-read every tick: a store registered while gateways run
    (``storemesh cloud join --database``) is served within a tick, by one of them, with
    no restart (one route serves ``/stores/{store}/...``, and the TLS listener learns
    the store's CA when its node opens). Its control files are copied from the database
    into this gateway's private working directory (``ROOT/.gateways/ID``, mode 0700,
    emptied at start and close, its store directory removed when the store is handed
    over); what the node rewrites there (node.json: the trust store; its renewed TLS
    certificate) goes back to the database, fenced on the lease, right after the
    node's trust save (``PgLedger`` invariant 7) and at every tick.
 7. Stores already under ROOT (a cloud moving from files to PostgreSQL, or gateways
    sharing one ROOT) are registered at start if the database does not have them yet,
    and ROOT's HQ accounts are imported if the database has none; from then on the
    database is the control plane (``storemesh hq ... --database``).
 8. Oversell exceptions fleet-wide in SQL: the holder writes the list its replica of a
    store derives (the one rule every replica computes, ``mesh.core.replica``; not a
    second implementation in SQL) into ``oversell_exceptions`` whenever the store's
    ledger moved and the list changed, at most ``MAX_EXCEPTIONS_PER_STORE`` (the newest),
    replacing the store's rows in one transaction fenced on the lease, and stamps
    ``exceptions_seen``; any gateway answers ``/v1/fleet/exceptions`` from the view
    ``fleet_exceptions``.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import logging
import math
import os
import shutil
import socket
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, cast

import psycopg
from aiohttp import web
from yarl import URL

from mesh import config
from mesh.cloud.control import (
    CHANGING_FILES,
    FileControl,
    private_dir,
    read_store_files,
    write_store_files,
)
from mesh.cloud.pgcontrol import SAVE_FILE, PgControl
from mesh.errors import LedgerError
from mesh.store.datadir import DataDirInUse
from mesh.store.pgstore import PgLedger, ensure_schema

if TYPE_CHECKING:
    from mesh.cloud.server import CloudNode
    from mesh.store.datadir import NodeIdentity
    from mesh.store.ledger import Ledger

__all__ = ["DEFAULT_TTL_S", "Gateway", "Holder"]

log = logging.getLogger(__name__)

#: Lease lifetime: a dead gateway's stores move within about this (invariant 2). Short
#: enough that a store is not dark for long, long enough that a busy gateway (a GC pause,
#: a slow commit) does not lose leases it is using.
DEFAULT_TTL_S: Final = 6.0
#: Most stores a gateway takes or hands over per tick: a takeover of hundreds of stores
#: is spread over a few ticks instead of a burst of rebuilds.
MAX_MOVES_PER_TICK: Final = 16
#: Most oversell exceptions of one store kept in SQL (the newest by HLC): a store's list
#: is a few a day in practice; a runaway one must not fill the table.
MAX_EXCEPTIONS_PER_STORE: Final = 1000



@dataclass(frozen=True, slots=True)
class Holder:
    store_id: str
    gateway: str
    url: str
    epoch: int
    live: bool


class _Renewer:
    """Heartbeat and lease renewal on a thread of its own (invariant 2), so that a busy
    event loop (a catch-up of many stores verifying envelopes) does not lose leases it
    is using. It renews only while the loop ticked within ``STALL_TICKS`` periods: a
    wedged loop loses its stores within ``(STALL_TICKS + 3) x ttl / 3``."""

    STALL_TICKS: Final = 9

    def __init__(self, dsn: str, gateway: str, ttl_s: float) -> None:
        self.dsn, self.gateway, self.ttl_s = dsn, gateway, ttl_s
        self.url = ""
        self.loop_seen = time.monotonic()
        self.renewals = 0
        self._conn: psycopg.Connection[Any] | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"renew {gateway}",
                                        daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(10)
        elif self._conn is not None:
            self._conn.close()

    def _run(self) -> None:
        while not self._stop.wait(self.ttl_s / 3):
            if time.monotonic() - self.loop_seen > self.STALL_TICKS * self.ttl_s / 3:
                log.error("gateway %s: event loop stalled; leases left to expire",
                          self.gateway)
                continue
            self.renew_once()
        if self._conn is not None:
            self._conn.close()

    def renew_once(self) -> None:
        try:
            if self._conn is None:
                self._conn = psycopg.connect(self.dsn, autocommit=True, connect_timeout=5,
                                             application_name=f"{self.gateway}-renew")
            self._conn.execute(
                "INSERT INTO gateways (gateway, url, seen_at) VALUES (%s, %s, now()) "
                "ON CONFLICT (gateway) DO UPDATE SET url = excluded.url, seen_at = now()",
                (self.gateway, self.url))
            self._conn.execute(
                "UPDATE leases SET expires_at = now() + make_interval(secs => %s) "
                "WHERE gateway = %s AND expires_at > now()", (self.ttl_s, self.gateway))
            self.renewals += 1
        except psycopg.Error as exc:  # the database is away: leases lapse meanwhile
            log.warning("gateway %s: lease renewal failed: %s", self.gateway, exc)
            with contextlib.suppress(psycopg.Error):
                if self._conn is not None:
                    self._conn.close()
            self._conn = None


class Gateway:
    """The lease keeper and the store mounts of one ``CloudNode`` in gateway mode."""

    def __init__(self, cloud: CloudNode, dsn: str, gateway_id: str | None = None,
                 ttl_s: float = DEFAULT_TTL_S) -> None:
        if ttl_s < 1.0:
            raise ValueError("the lease ttl must be at least 1 s")
        self.cloud = cloud
        self.dsn = dsn
        self.id = gateway_id or f"gw-{socket.gethostname()}-{os.getpid()}"
        self.ttl_s = ttl_s
        #: The store registry as of the last tick (invariant 6).
        self.registry: list[str] = []
        self._registry_version: object = None
        #: This gateway's working directory: the store nodes it serves (invariant 6).
        self.work = cloud.root / ".gateways" / self.id
        self.control: PgControl | None = None
        self._pushed: dict[str, dict[str, bytes]] = {}  # store -> control files saved
        #: store -> (ledger row, exceptions) as last written to SQL (invariant 8)
        self._exc_saved: dict[str, tuple[int, list[tuple[Any, ...]]]] = {}
        self._work_lock: int | None = None
        self.holders: dict[str, Holder] = {}
        self.runners: dict[str, web.AppRunner] = {}
        self.opened_at: dict[str, datetime] = {}  # store -> when its node was opened
        self.live_gateways = 1
        #: (monotonic s, store, "took"/"handed"/"lost") of the latest lease changes
        self.moves: list[tuple[float, str, str]] = []
        self._conn: psycopg.AsyncConnection[Any] | None = None
        self._task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()
        self._closed = False
        self._renewer = _Renewer(dsn, self.id, ttl_s)

    # --- lifecycle ----------------------------------------------------------------------

    async def prepare(self, dirs: list[Path]) -> PgControl:
        """Before the server starts: the schema, ROOT's stores imported (invariant 7),
        the working directory, and the one mount of every store (invariant 6)."""
        await asyncio.to_thread(ensure_schema, self.dsn)
        control = self.control = await asyncio.to_thread(PgControl, self.dsn)
        await asyncio.to_thread(self._import, control, dirs)
        await asyncio.to_thread(self._take_work_dir)
        self._conn = await psycopg.AsyncConnection.connect(
            self.dsn, autocommit=True, connect_timeout=10, application_name=self.id)
        self.registry = await asyncio.to_thread(control.stores)
        self.cloud.app.add_subapp("/stores", self._slot())
        return control

    def _import(self, control: PgControl, dirs: list[Path]) -> None:
        for d in dirs:
            if control.register_store(d.name, read_store_files(d)):
                log.info("gateway %s registered store %s from %s", self.id, d.name, d)
        users = FileControl(self.cloud.root).users()
        if users and control.users_stamp() is None:
            with control.edit_users() as held:
                if not held:  # (another gateway may have imported them meanwhile)
                    held.update(users)
                    log.info("gateway %s imported %d HQ accounts from %s", self.id,
                             len(users), self.cloud.root)

    def _take_work_dir(self) -> None:
        """Hold ``ROOT/.gateways/ID.lock`` (one process per gateway id), then empty
        ``ROOT/.gateways/ID`` (what a killed process of this id left)."""
        self.work.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(self.work.with_name(self.work.name + ".lock"),
                     os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise DataDirInUse(self.work, None) from None
        self._work_lock = fd
        private_dir(self.work)

    async def start(self) -> None:
        """After the server listens (its URL is known): first leases, then the loop."""
        self._renewer.url = self.cloud.url
        self._renewer.renew_once()  # heartbeat before the first tick counts the live ones
        self._renewer.start()
        await self.tick()
        self._task = asyncio.create_task(self._loop(), name=f"gateway {self.id}")

    async def close(self) -> None:
        """Hand every store over (node closed first, then the lease released) and leave."""
        self._closed = True
        self._renewer.stop()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        async with self._lock:
            for store_id in list(self.cloud.nodes):
                await self._drop(store_id, release=True, why="handed")
            if self._conn is not None:
                with contextlib.suppress(psycopg.Error):
                    await self._conn.execute("DELETE FROM gateways WHERE gateway = %s",
                                             (self.id,))
                await self._conn.close()
            if self._work_lock is not None:
                await asyncio.to_thread(shutil.rmtree, self.work, True)
                os.close(self._work_lock)
                self._work_lock = None

    async def _loop(self) -> None:
        while not self._closed:
            await asyncio.sleep(self.ttl_s / 3)
            try:
                await self.tick()
            except (psycopg.Error, OSError) as exc:  # the database is away: keep trying;
                log.warning("gateway %s: lease tick failed: %s", self.id, exc)  # leases lapse
                await self._reconnect()
            except Exception:  # our bug: logged, and the gateway keeps renewing
                log.exception("gateway %s: lease tick failed", self.id)

    async def _reconnect(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(psycopg.Error):
                await self._conn.close()
        with contextlib.suppress(psycopg.Error, OSError):
            self._conn = await psycopg.AsyncConnection.connect(
                self.dsn, autocommit=True, connect_timeout=5, application_name=self.id)

    # --- leases -------------------------------------------------------------------------

    def _rank(self, store_id: str) -> bytes:
        return hashlib.sha256(f"{store_id}\0{self.id}".encode()).digest()

    async def _sql(self, sql: str, params: tuple[object, ...] = ()) -> list[tuple[Any, ...]]:
        assert self._conn is not None
        cur = await self._conn.execute(sql, params)
        return await cur.fetchall() if cur.description is not None else []

    async def tick(self) -> None:
        """Heartbeat, renew, lose what expired, then hand over or take (invariant 3)."""
        async with self._lock:
            if self._closed:
                return
            self._renewer.loop_seen = time.monotonic()
            kept = {r[0] for r in await self._sql(  # the renewer thread renews them
                "SELECT store_id FROM leases WHERE gateway = %s AND expires_at > now()",
                (self.id,))}
            for store_id in [s for s in self.cloud.nodes if s not in kept]:
                log.warning("gateway %s lost the lease of store %s", self.id, store_id)
                await self._drop(store_id, release=False, why="lost")
            live = await self._sql("SELECT count(*) FROM gateways WHERE seen_at > "
                                   "now() - make_interval(secs => %s)", (self.ttl_s,))
            self.live_gateways = max(1, int(live[0][0]))
            await self._refresh_registry()
            await self._refresh_holders()
            await self._save_egress(list(self.cloud.nodes))
            for store_id in list(self.cloud.nodes):
                await self._write_back(store_id)
                await self._save_exceptions(store_id)
                self._apply_bounds(store_id)  # (a retry, if one failed)
            target = math.ceil(len(self.registry) / self.live_gateways)
            held = sorted(self.cloud.nodes, key=self._rank)
            if len(held) > target:
                for store_id in held[target:][:MAX_MOVES_PER_TICK]:
                    await self._drop(store_id, release=True, why="handed")
            elif len(held) < target:
                free = [s for s in sorted(self.registry, key=self._rank)
                        if s not in self.cloud.nodes and
                        (s not in self.holders or not self.holders[s].live)]
                for store_id in free[: min(target - len(held), MAX_MOVES_PER_TICK)]:
                    if await self._acquire(store_id):
                        await self._serve(store_id)
            await self._refresh_holders()

    async def _refresh_registry(self) -> None:
        """Re-read the registry if its version moved (one row a tick otherwise)."""
        (version,) = (await self._sql("SELECT version FROM control_versions WHERE name = "
                                      "'stores'"))[0]
        if version == self._registry_version:
            return
        rows = await self._sql("SELECT store_id FROM cloud_stores ORDER BY store_id")
        self._registry_version = version
        registry = [str(r[0]) for r in rows]
        for store_id in set(registry) - set(self.registry):
            log.info("gateway %s: store %s is registered", self.id, store_id)
        self.registry = registry

    async def _refresh_holders(self) -> None:
        self.holders = {str(s): Holder(str(s), str(g), str(u), int(e), bool(live))
                        for s, g, u, e, live in await self._sql(
                            "SELECT store_id, gateway, url, epoch, expires_at > now() "
                            "FROM leases")}

    async def _acquire(self, store_id: str) -> bool:
        rows = await self._sql(
            "INSERT INTO leases AS l (store_id, gateway, url, epoch, expires_at) "
            "VALUES (%s, %s, %s, 1, now() + make_interval(secs => %s)) "
            "ON CONFLICT (store_id) DO UPDATE SET gateway = excluded.gateway, "
            "url = excluded.url, epoch = l.epoch + 1, expires_at = excluded.expires_at "
            "WHERE l.expires_at <= now() RETURNING epoch",
            (store_id, self.id, self.cloud.url, self.ttl_s))
        return bool(rows)

    async def _release(self, store_id: str) -> None:
        await self._sql("UPDATE leases SET expires_at = now() WHERE store_id = %s AND "
                        "gateway = %s", (store_id, self.id))

    # --- store nodes --------------------------------------------------------------------

    def _storage(self, identity: NodeIdentity) -> Ledger:
        # PgLedger has Ledger's whole public surface (tests/node/test_gateway.py checks it);
        # the node is typed against the SQLite class.
        return cast("Ledger", PgLedger(
            self.dsn, identity.store_id, gateway=self.id, schema=False,
            after_call=partial(self._write_back_now, identity.store_id, identity.data_dir)))

    @staticmethod
    def _changed_files(data_dir: Path) -> dict[str, bytes]:
        out = {}
        for name in CHANGING_FILES:
            with contextlib.suppress(FileNotFoundError):
                out[name] = (data_dir / name).read_bytes()
        return out

    def _write_back_now(self, store_id: str, data_dir: Path, cur: psycopg.Cursor[Any]) -> None:
        """On the store ledger's writer, in its fenced transaction (invariant 6)."""
        cur.executemany(SAVE_FILE, [(store_id, n, d) for n, d in
                                    sorted(self._changed_files(data_dir).items())])

    async def _write_back(self, store_id: str) -> None:
        """The files the node changed since they were saved, fenced on our lease."""
        pushed = self._pushed.get(store_id)
        if pushed is None:
            return
        files = await asyncio.to_thread(self._changed_files, self.work / store_id)
        changed = {n: d for n, d in files.items() if pushed.get(n) != d}
        if not changed or self._conn is None:
            return
        async with self._conn.transaction():
            held = await self._sql("SELECT 1 FROM leases WHERE store_id = %s AND gateway = "
                                   "%s AND expires_at > now() FOR SHARE", (store_id, self.id))
            if not held:
                return
            async with self._conn.cursor() as cur:
                await cur.executemany(SAVE_FILE, [(store_id, n, d)
                                                  for n, d in sorted(changed.items())])
        pushed.update(changed)

    async def _save_exceptions(self, store_id: str) -> None:
        """The replica's oversell exceptions into SQL if they changed (invariant 8)."""
        node = self.cloud.nodes.get(store_id)
        if node is None or self._conn is None:
            return
        at = cast("PgLedger", node.durable.ledger).last_id
        saved = self._exc_saved.get(store_id)
        if saved is not None and saved[0] == at:
            return
        found = sorted(node.replica.exceptions(), key=lambda e: e.hlc)
        rows = [(store_id, e.sku, e.origin, e.seq, e.hlc, e.kind, e.short)
                for e in found[-MAX_EXCEPTIONS_PER_STORE:]]
        if saved is not None and saved[1] == rows:
            self._exc_saved[store_id] = (at, rows)
            return
        async with self._conn.transaction():
            if not await self._sql("SELECT 1 FROM leases WHERE store_id = %s AND gateway = "
                                   "%s AND expires_at > now() FOR SHARE", (store_id, self.id)):
                return
            await self._sql("DELETE FROM oversell_exceptions WHERE store_id = %s", (store_id,))
            async with self._conn.cursor() as cur:
                await cur.executemany(
                    "INSERT INTO oversell_exceptions (store_id, sku, origin, seq, hlc, kind, "
                    "short) VALUES (%s, %s, %s, %s, %s, %s, %s)", rows)
            await self._sql(
                "INSERT INTO exceptions_seen (store_id, gateway, exceptions, updated_at) "
                "VALUES (%s, %s, %s, now()) ON CONFLICT (store_id) DO UPDATE SET "
                "gateway = excluded.gateway, exceptions = excluded.exceptions, "
                "updated_at = now()", (store_id, self.id, len(found)))
        self._exc_saved[store_id] = (at, rows)

    def _apply_bounds(self, store_id: str) -> None:
        """The rollup honours the revocation bounds the store's trust store names
        (``PgLedger.apply_bounds``; a driver trust listener, on the loop)."""
        node = self.cloud.nodes.get(store_id)
        if node is None:
            return
        ledger = cast("PgLedger", node.durable.ledger)
        fut = ledger.apply_bounds(node.identity.trust.revocation_bounds)
        if fut is not None:
            fut.add_done_callback(partial(self._bounds_applied, store_id))

    @staticmethod
    def _bounds_applied(store_id: str, fut: Future[int]) -> None:
        if fut.exception() is not None:
            log.warning("rollup of store %s does not honour its revocation bounds yet "
                        "(retried at the next tick): %s", store_id, fut.exception())

    async def _materialize(self, store_id: str) -> Path:
        """The store's control files, from the database, in our working directory."""
        assert self.control is not None
        files = await asyncio.to_thread(self.control.store_files, store_id)
        data_dir = self.work / store_id
        await asyncio.to_thread(private_dir, data_dir)
        await asyncio.to_thread(write_store_files, data_dir, files)
        self._pushed[store_id] = {n: files[n] for n in CHANGING_FILES if n in files}
        return data_dir

    async def _serve(self, store_id: str) -> None:
        """Open the store's node (rebuilt from PostgreSQL) now that we hold its lease."""
        from mesh.node.node import Node

        try:
            data_dir = await self._materialize(store_id)
        except (OSError, KeyError, ValueError) as exc:
            log.error("gateway %s cannot serve store %s: %s", self.id, store_id, exc)
            await self._release(store_id)
            return
        node = Node(data_dir, serve=False, discovery=False, wan=True,
                    insecure_plaintext=self.cloud.insecure_plaintext, storage=self._storage)
        try:
            await node.start()
            if node.identity.role != "cloud" or node.identity.store_id != store_id:
                raise ValueError(f"store {store_id} is registered with a "
                                 f"{node.identity.role} node of store "
                                 f"{node.identity.store_id}, not its cloud node")
            runner = web.AppRunner(node.app, access_log=None)
            await runner.setup()  # freezes the node's app: requests reach it by _dispatch
        except (OSError, ValueError, LedgerError, psycopg.Error, DataDirInUse) as exc:
            # DataDirInUse: the old holder's process still runs (paused?) on this ROOT.
            log.error("gateway %s cannot serve store %s: %s", self.id, store_id, exc)
            await node.close()
            await self._forget(store_id)
            await self._release(store_id)
            return
        self.runners[store_id] = runner
        self.opened_at[store_id] = datetime.now(UTC)
        self.cloud.serve_store(node)
        node.driver.trust_listeners.append(partial(self._apply_bounds, store_id))
        self._apply_bounds(store_id)  # a list learned before a crash, or by an older cloud
        self.moves.append((asyncio.get_running_loop().time(), store_id, "took"))
        with contextlib.suppress(psycopg.Error):  # (else: at the next tick)
            await self._save_exceptions(store_id)
        log.info("gateway %s serves store %s (rebuilt %d rows)", self.id, store_id,
                 node.durable.rebuild_stats.replayed)

    async def _save_egress(self, stores: list[str]) -> None:
        """WAN bytes of the stores held, per hold (a node's counters start at zero), so
        any gateway can answer a store's egress in SQL (``mesh.cloud.pganalytics``)."""
        rows = []
        for store_id in stores:
            node, opened = self.cloud.nodes.get(store_id), self.opened_at.get(store_id)
            if node is not None and opened is not None:
                sent, received = node.wan_bytes()
                rows.append((store_id, self.id, opened, sent, received))
        if not rows or self._conn is None:
            return
        async with self._conn.cursor() as cur:
            await cur.executemany(
                "INSERT INTO egress (store_id, gateway, opened_at, sent, received, "
                "updated_at) VALUES (%s, %s, %s, %s, %s, now()) ON CONFLICT (store_id, "
                "gateway, opened_at) DO UPDATE SET sent = excluded.sent, received = "
                "excluded.received, updated_at = now()", rows)

    async def _drop(self, store_id: str, *, release: bool, why: str) -> None:
        with contextlib.suppress(psycopg.Error):
            await self._save_egress([store_id])
        self.opened_at.pop(store_id, None)
        node = self.cloud.unserve_store(store_id)
        runner = self.runners.pop(store_id, None)
        if node is not None:
            await node.close()
        if runner is not None:
            await runner.cleanup()
        with contextlib.suppress(psycopg.Error, OSError):
            await self._write_back(store_id)  # what the node's close wrote (fenced)
        await self._forget(store_id)
        if release:
            with contextlib.suppress(psycopg.Error):
                await self._release(store_id)
        self.moves.append((asyncio.get_running_loop().time(), store_id, why))
        del self.moves[:-1000]

    async def _forget(self, store_id: str) -> None:
        """The store's files leave our working directory (the database keeps them)."""
        self._pushed.pop(store_id, None)
        self._exc_saved.pop(store_id, None)
        await asyncio.to_thread(shutil.rmtree, self.work / store_id, True)

    # --- HTTP ---------------------------------------------------------------------------

    def _slot(self) -> web.Application:
        app = web.Application(client_max_size=config.MAX_HTTP_BODY)
        app.router.add_route("*", "/{store}/{tail:.*}", self._dispatch)
        return app

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        """Into the store's node if we hold it; else to whoever does (invariant 1)."""
        store_id = request.match_info["store"]
        node = self.cloud.nodes.get(store_id)
        tail = request.match_info["tail"]
        if node is None and store_id not in self.registry:
            return web.json_response({"error": f"no store {store_id} is registered"},
                                     status=404)
        if node is None:
            holder = self.holders.get(store_id)
            if holder is not None and holder.live and holder.gateway != self.id \
                    and holder.url and tail != "v1/sync":
                raise web.HTTPTemporaryRedirect(holder.url + request.path_qs)
            return web.json_response(
                {"error": f"gateway {self.id} does not serve store {store_id} now",
                 "holder": holder.url if holder is not None and holder.live else None},
                status=503, headers={"Retry-After": "1"})
        sub = request.clone(rel_url=URL.build(path="/" + tail,
                                              query_string=request.query_string))
        return await node.app._handle(sub)

    async def status(self, request: web.Request) -> web.Response:
        """``GET /v1/fleet/gateways`` (behind the HQ login: ``mesh.cloud.pganalytics``)."""
        return web.json_response({
            "gateway": self.id, "url": self.cloud.url, "ttl_s": self.ttl_s,
            "live_gateways": self.live_gateways, "serving": sorted(self.cloud.nodes),
            "leases": [{"store": h.store_id, "gateway": h.gateway, "url": h.url,
                        "epoch": h.epoch, "live": h.live}
                       for h in sorted(self.holders.values(), key=lambda h: h.store_id)]})

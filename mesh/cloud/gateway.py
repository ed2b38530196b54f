"""Many cloud gateways over one PostgreSQL: each store served by one gateway at a time.

``storemesh cloud run --database postgresql://... --gateway-id g1`` makes the cloud
peer a *gateway*: N such processes share one data root (the stores' keys, certificates
and trust stores) and one database (every store's ledger, ``mesh.store.pgstore``). A store is
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
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import math
import os
import socket
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, cast

import psycopg
from aiohttp import web
from yarl import URL

from mesh import config
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
        self.dirs: dict[str, Path] = {}
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

    async def prepare(self, dirs: list[Path]) -> None:
        """Before the server starts: the schema, and one mount per store under ROOT."""
        await asyncio.to_thread(ensure_schema, self.dsn)
        self._conn = await psycopg.AsyncConnection.connect(
            self.dsn, autocommit=True, connect_timeout=10, application_name=self.id)
        for d in dirs:
            self.dirs[d.name] = d
            self.cloud.app.add_subapp(f"/stores/{d.name}/", self._slot(d.name))

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
            await self._refresh_holders()
            await self._save_egress(list(self.cloud.nodes))
            target = math.ceil(len(self.dirs) / self.live_gateways)
            held = sorted(self.cloud.nodes, key=self._rank)
            if len(held) > target:
                for store_id in held[target:][:MAX_MOVES_PER_TICK]:
                    await self._drop(store_id, release=True, why="handed")
            elif len(held) < target:
                free = [s for s in sorted(self.dirs, key=self._rank)
                        if s not in self.cloud.nodes and
                        (s not in self.holders or not self.holders[s].live)]
                for store_id in free[: min(target - len(held), MAX_MOVES_PER_TICK)]:
                    if await self._acquire(store_id):
                        await self._serve(store_id)
            await self._refresh_holders()

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
        return cast("Ledger", PgLedger(self.dsn, identity.store_id, gateway=self.id,
                                       schema=False))

    async def _serve(self, store_id: str) -> None:
        """Open the store's node (rebuilt from PostgreSQL) now that we hold its lease."""
        from mesh.node.node import Node

        node = Node(self.dirs[store_id], serve=False, discovery=False, wan=True,
                    insecure_plaintext=self.cloud.insecure_plaintext, storage=self._storage)
        try:
            await node.start()
            if node.identity.role != "cloud" or node.identity.store_id != store_id:
                raise ValueError(f"{self.dirs[store_id]} holds a {node.identity.role} node "
                                 f"of store {node.identity.store_id}, not store "
                                 f"{store_id}'s cloud node")
            runner = web.AppRunner(node.app, access_log=None)
            await runner.setup()  # freezes the node's app: requests reach it by _dispatch
        except (OSError, ValueError, LedgerError, psycopg.Error, DataDirInUse) as exc:
            # DataDirInUse: the old holder's process still runs (paused?) on this ROOT.
            log.error("gateway %s cannot serve store %s: %s", self.id, store_id, exc)
            await node.close()
            await self._release(store_id)
            return
        self.runners[store_id] = runner
        self.opened_at[store_id] = datetime.now(UTC)
        self.cloud.serve_store(node)
        self.moves.append((asyncio.get_running_loop().time(), store_id, "took"))
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
        if release:
            with contextlib.suppress(psycopg.Error):
                await self._release(store_id)
        self.moves.append((asyncio.get_running_loop().time(), store_id, why))
        del self.moves[:-1000]

    # --- HTTP ---------------------------------------------------------------------------

    def _slot(self, store_id: str) -> web.Application:
        app = web.Application(client_max_size=config.MAX_HTTP_BODY)
        app.router.add_route("*", "/{tail:.*}", partial(self._dispatch, store_id))
        return app

    async def _dispatch(self, store_id: str, request: web.Request) -> web.StreamResponse:
        """Into the store's node if we hold it; else to whoever does (invariant 1)."""
        node = self.cloud.nodes.get(store_id)
        tail = request.match_info["tail"]
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

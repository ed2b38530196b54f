"""One store node: assembly, lifecycle, HTTP, dialing and discovery around the driver.

Everything that decides what the node does with the sync core's effects (durable
acknowledgement, duplicate answers, batched receive, persist/fetch, priorities, trust
persistence, snapshots, recovery after a failed write, the one re-armed timer) is in
``mesh.driver.Driver``, which the simulator runs too. This module plugs the real ports
into it (``mesh.node.runtime``: the asyncio clock, a worker thread pool, the aiohttp sessions;
the SQLite ledger; zeroconf discovery) and keeps the glue: the HTTP server, the dial
loops, the live stream and the reservation-expiry sweep.

Everything that touches the replica, the sync core or the driver runs on the event loop
thread; the ledger's writer thread only resolves futures, which the driver takes back to
the loop (``LoopClock.call_soon`` is thread-safe).

Invariants:
 1. A local command returns only once its envelope is durable (driver invariant 1).
 2. Every task has an owner: the node's task set (cancelled and awaited on ``close``),
    a ``Session``, or the worker (awaited on ``close``). No fire-and-forget.
 3. No blocking call on the loop: ledger reads, evidence and snapshot writes run on the
    worker's threads, rebuild at start-up too; identity (trust store) writes go to the
    ledger's writer thread, ahead of the envelopes that need them (durable inv. 6).
 4. At most one session per peer node id; with discovery, only the node with the
    smaller id dials, so two nodes do not race to connect to each other. A second
    session with a peer is decided by the driver (``Driver.admit_session``, driver
    invariant 9): a restart racing its stale session here replaces it.
 5. Messages of one session reach the driver in the order received (driver invariant 2
    batches them per loop iteration).
 6. The live stream shows what the driver's ``applied`` listeners report (driver
    invariant 7): it never runs ahead of ``GET /v1/stock``, and never shows a change
    that no disk holds.
 7. One process per data directory: ``start`` takes its lock (``mesh.store.datadir``
    invariant 3) before opening anything; ``close`` releases it last.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import ssl
import time
from collections.abc import Callable, Coroutine, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from mesh import config
from mesh.core.envelope import Envelope
from mesh.core.replica import CommandResult, Replica
from mesh.core.sync import Effect, SyncCore
from mesh.driver import Driver
from mesh.durable import DurableReplica
from mesh.errors import CommandError, LedgerError
from mesh.http.httpfaults import ClientFaults, ServerLog
from mesh.net import transport
from mesh.net.hqtls import NODE_FILES, HqTls, ensure_browser_tls, hq_server_context
from mesh.net.tls import (
    TlsFiles,
    TlsSite,
    browser_hosts,
    check_browser_name,
    client_context,
    is_loopback_host,
    server_context,
    sni_name,
)
from mesh.node.runtime import LoopClock, SessionTransport, ThreadWorker
from mesh.store.datadir import DataDirLock, NodeIdentity, ensure_tls, lock_data_dir
from mesh.store.ledger import Ledger

__all__ = ["Node"]

log = logging.getLogger(__name__)


class Node:
    """One running store node."""

    def __init__(
        self, data_dir: Path, *, http_host: str = "127.0.0.1", http_port: int = 0,
        interface: str | None = None, peers: Sequence[str] = (), discovery: bool = True,
        snapshot_every: int = config.SNAPSHOT_EVERY, advertise: bool = True,
        max_bytes: int | None = None, wan_peers: Sequence[str] = (), serve: bool = True,
        wan: bool = False, insecure_plaintext: bool = False,
        cert_validity_ms: int | None = None, browser_names: Sequence[str] = (),
        storage: Callable[[NodeIdentity], Ledger] | None = None,
    ) -> None:
        """``peers``: static LAN peer URLs. ``wan_peers``: URLs reached over the WAN (the
        cloud: compressed, batched). ``serve=False``: do not listen; the caller mounts
        ``app`` (the cloud hosts one node per store). ``wan``: every session of this node
        is a WAN session (the cloud's side). Every link is mutual TLS pinned to the store
        CA (``mesh.net.tls``); ``insecure_plaintext``: plain HTTP and ``ws://``, refused
        unless ``http_host`` is a loopback address (development only).
        ``cert_validity_ms``: on the edge, how long the certificates it issues and
        renews are valid (default ``config.CERT_VALIDITY_MS``). ``browser_names``: more
        host names (besides ``localhost`` and ``NODE.local``) browser tills reach this
        node by; they get the node's P-256 browser certificate (``mesh.net.hqtls``).
        ``storage``: makes the ledger from the node's identity instead of
        ``DIR/ledger.sqlite`` (the cloud on PostgreSQL: ``mesh.store.pgstore.PgLedger``)."""
        self.storage = storage
        self.data_dir = Path(data_dir)
        self.http_host = http_host
        self.http_port = http_port
        self.interface = interface
        self.static_peers = list(peers)
        self.wan_peers = list(wan_peers)
        self.serve = serve
        self.wan = wan
        self.insecure_plaintext = insecure_plaintext
        self.cert_validity_ms = cert_validity_ms
        self.extra_browser_names = [check_browser_name(n) for n in browser_names]
        #: The names browsers are served the browser certificate for (set by start()).
        self.browser_names: list[str] = []
        self.browser_tls: HqTls | None = None
        self.browser_ssl: ssl.SSLContext | None = None
        if insecure_plaintext and serve and not is_loopback_host(http_host):
            raise ValueError(f"--insecure-plaintext serves plain HTTP: only on a loopback "
                             f"address (127.0.0.1), not {http_host}")
        self.tls: TlsFiles | None = None  # set by start() unless insecure_plaintext
        self.client_ssl: ssl.SSLContext | None = None
        #: The listener's context (the cloud's SNI callback picks it per store); reloaded
        #: in place when the edge renews our certificate, like ``client_ssl``.
        self.server_ssl: ssl.SSLContext | None = None
        #: Called on the loop thread with every batch of envelopes that became durable
        #: (local and remote), in apply order: analytics and other consumers.
        self.listeners: list[Callable[[list[Envelope]], None]] = []
        self.discovery_enabled = discovery
        self.advertise = advertise
        self.snapshot_every = snapshot_every
        self.max_bytes = max_bytes
        self.rng = random.Random()  # noqa: S311 -- backoff jitter, not cryptography
        self.started_ms = self.now_ms()
        self.rejected_sessions: dict[str, int] = {}
        self.http_faults = ClientFaults()  # malformed/abandoned HTTP requests (mesh.http.api)
        self.duplicate_sessions = 0
        self.transport = SessionTransport()
        self.sessions: dict[str, transport.Session] = self.transport.sessions
        self._wan_closed = [0, 0]  # wire bytes (sent, received) of ended WAN sessions
        self.known_urls: dict[str, str] = {}  # node id -> URL (discovery, sessions)
        self.app = web.Application(client_max_size=config.MAX_HTTP_BODY)
        self._tasks: set[asyncio.Task[Any]] = set()
        self._dialers: dict[str, asyncio.Task[None]] = {}  # URL -> dial loop
        self._subscribers: set[asyncio.Queue[dict[str, Any]]] = set()
        self._closed = False
        self._runner: web.AppRunner | None = None
        self._http: aiohttp.ClientSession | None = None
        self._discovery: Any = None
        self._lock: DataDirLock | None = None
        self.durable: DurableReplica[Ledger]
        self.core: SyncCore
        self.driver: Driver
        self._worker: ThreadWorker | None = None
        self.identity: NodeIdentity
        self.url = ""

    # --- lifecycle ----------------------------------------------------------------------

    @staticmethod
    def now_ms() -> int:
        return time.time_ns() // 1_000_000

    @property
    def replica(self) -> Replica:
        return self.durable.replica

    @property
    def last_seen(self) -> dict[str, int]:
        return self.driver.last_seen

    async def start(self) -> None:
        """Open the data dir (locked for this process: ``mesh.store.datadir.DataDirLock``),
        rebuild, listen, dial. Cancellable at any await: ``close()`` then releases
        whatever was opened (a rebuild under way is finished first, then closed)."""
        self._lock = lock_data_dir(self.data_dir)
        opening = asyncio.ensure_future(asyncio.to_thread(
            DurableReplica.open, self.data_dir, self.snapshot_every, self.max_bytes,
            self.storage))
        try:
            self.durable = await asyncio.shield(opening)
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):  # a thread cannot be cancelled: keep
                self.durable = await opening       # what it opened, so close() closes it
            raise
        except BaseException:
            self._lock.release()  # nothing else was opened
            self._lock = None
            raise
        identity = self.durable.identity
        assert isinstance(identity, NodeIdentity)
        self.identity = identity
        if self.cert_validity_ms is not None:
            identity.validity_ms = self.cert_validity_ms
        if not self.insecure_plaintext:
            self.tls = await asyncio.to_thread(ensure_tls, self.identity, now_ms=self.now_ms())
            self.client_ssl = client_context(self.tls)
            self.server_ssl = server_context(self.tls)
            if self.serve:
                await self._setup_browser_tls()
        self.core = SyncCore(self.replica, self.identity.trust,
                             random.Random())  # noqa: S311 -- sync timer jitter
        self._loop = asyncio.get_running_loop()
        self._worker = ThreadWorker(self._loop)
        self.driver = Driver(self.durable, self.core, self.transport, LoopClock(self._loop),
                             self._worker, self.identity)
        self.driver.durable_listeners = self.listeners
        self.driver.applied_listeners.append(self._applied)
        self.driver.tls_listeners.append(self._tls_renewed)
        self.driver.start()
        self.app.router.add_get("/v1/sync", self._accept)
        self._setup_optional_routes()
        if self.serve:
            self._runner = web.AppRunner(self.app, access_log=None,
                                         logger=ServerLog(self.http_faults))
            await self._runner.setup()
            site: web.BaseSite
            if self.tls is not None:
                assert self.server_ssl is not None
                site = TlsSite(self._runner, self.http_host, self.http_port,
                               self.server_ssl, self._reject)
            else:
                site = web.TCPSite(self._runner, self.http_host, self.http_port)
            await site.start()
            server = site._server
            assert server is not None and getattr(server, "sockets", None)
            self.http_port = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]
            scheme = "http" if self.tls is None else "https"
            self.url = f"{scheme}://{self.http_host}:{self.http_port}"
        self._http = aiohttp.ClientSession()
        self._spawn(self._expiry_loop(), "reservation-expiry")
        if self.browser_tls is not None:
            self._spawn(self._browser_tls_loop(), "browser-tls")
        for url in self.static_peers:
            self._ensure_dialer(url)
        for url in self.wan_peers:
            self._ensure_dialer(url, wan=True, role="cloud")
        if self.discovery_enabled:
            await self._start_discovery()
        log.info("node %s (%s) of store %s listening on %s", self.identity.node_id,
                 self.identity.role, self.identity.store_id, self.url)
        if self.browser_tls is not None:
            log.info("browser tills: https://%s:%d (%s), trusting %s", self.browser_names[0],
                     self.http_port, ", ".join(self.browser_names), self.browser_tls.ca_path)

    def _setup_optional_routes(self) -> None:
        from mesh.http import api, catalog_routes
        from mesh.net import enrol
        from mesh.store import revoke

        api.setup_routes(self.app, self)
        catalog_routes.setup_catalog_routes(self.app, self)
        enrol.setup_join_routes(self.app, self)
        revoke.setup_revocation_routes(self.app, self)
        from mesh.http import sensor_routes  # issue 14: sensors, reviews, telemetry

        sensor_routes.setup_sensor_routes(self.app, self, self.data_dir)

    async def _start_discovery(self) -> None:
        from mesh.net.discovery import Discovery

        self._discovery = Discovery(
            store_id=self.identity.store_id, node_id=self.identity.node_id,
            role=self.identity.role, fingerprint=self.identity.key.fingerprint,
            port=self.http_port, interface=self.interface, tls=self.tls is not None,
            on_peer=self._on_discovered, on_lost=self._on_lost)
        await self._discovery.start()

    async def close(self) -> None:
        """Stop discovery, sessions, tasks and the HTTP server; flush the ledger."""
        if self._closed:
            return
        self._closed = True
        driver: Driver | None = getattr(self, "driver", None)  # None: start was cancelled
        if driver is not None:
            driver.close()
        if self._discovery is not None:
            await self._discovery.close()
        for session in list(self.sessions.values()):
            session.close("shutdown")
        for q in list(self._subscribers):
            with contextlib.suppress(asyncio.QueueFull):
                q.put_nowait({"type": "shutdown"})
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._http is not None:
            await self._http.close()
        if self._runner is not None:
            await self._runner.cleanup()
        if self._worker is not None:
            await self._worker.close()
        durable: DurableReplica[Ledger] | None = getattr(self, "durable", None)
        if durable is not None:
            durable.save_trust()
            await asyncio.to_thread(durable.close)
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def _spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("task %s failed", task.get_name(), exc_info=task.exception())

    # --- local commands -----------------------------------------------------------------

    async def execute(self, fn: Callable[[Replica], CommandResult]) -> CommandResult:
        """Run a local command; returns once its envelope is durable (invariant 1).
        Raises ``CommandError`` (refused) or ``LedgerError`` (not written)."""
        fut: asyncio.Future[CommandResult] = self._loop.create_future()

        def done(result: CommandResult, exc: BaseException | None) -> None:
            if fut.done():
                return
            if exc is not None:
                fut.set_exception(exc)
            else:
                fut.set_result(result)
        self.driver.execute(fn, done)
        return await fut

    def trust_changed(self) -> None:
        """New certificates or revocations: persist them (peers learn via the core), on
        the ledger's writer thread ahead of any envelope that needs them (durable
        invariant 6)."""
        if not self._closed:
            self.driver.trust_changed()

    def _on_message(self, peer_id: str, data: bytes) -> None:
        self.driver.message(peer_id, data)

    def handle_effects(self, effects: list[Effect]) -> None:
        """Carry out effects of the core returned to someone else (the API's gate:
        a roster or revocation list picked up from the edge's files)."""
        self.driver.carry_out(effects)

    async def _setup_browser_tls(self) -> None:
        """Browser tills (no Ed25519 in any browser): a P-256 certificate from this node's
        own browser CA, chosen by SNI for ``browser_names``; every other name, and no
        name (peers, the CLI), keeps the store certificate."""
        assert self.server_ssl is not None
        self.browser_names = browser_hosts(self.identity.node_id, self.extra_browser_names)
        self.browser_tls = await asyncio.to_thread(
            ensure_browser_tls, self.data_dir, self.browser_names, now_ms=self.now_ms(),
            files=NODE_FILES)
        browser = hq_server_context(self.browser_tls)
        self.browser_ssl = browser
        names = frozenset(self.browser_names)

        def pick(sslobj: ssl.SSLObject, name: str | None, _ctx: ssl.SSLContext) -> None:
            if name is not None and name.lower() in names:
                sslobj.context = browser
        self.server_ssl.sni_callback = pick

    async def _browser_tls_loop(self) -> None:
        """Renew the browser certificate before it ends (``RENEW_BEFORE``), in place."""
        while True:
            await asyncio.sleep(config.CERT_RENEW_CHECK_MS / 1000)
            await self._renew_browser_tls()

    async def _renew_browser_tls(self) -> None:
        assert self.browser_tls is not None and self.browser_ssl is not None
        before = self.browser_tls.cert_path.read_bytes()
        try:
            files = await asyncio.to_thread(ensure_browser_tls, self.data_dir,
                                            self.browser_names, now_ms=self.now_ms(),
                                            files=NODE_FILES)
        except (OSError, ValueError) as exc:
            log.error("node %s: cannot renew the browser certificate: %s",
                      self.identity.node_id, exc)
            return
        if files.cert_path.read_bytes() != before:
            self.browser_ssl.load_cert_chain(files.cert_path, files.key_path)
            log.info("node %s: renewed browser certificate loaded", self.identity.node_id)

    def _tls_renewed(self) -> None:
        """Our renewed TLS certificate is on disk (driver invariant 8): new connections,
        accepted and dialed, present it; live ones keep theirs until they end."""
        if self.tls is None:
            return
        self.tls = TlsFiles(self.tls.data_dir, self.tls.ca_pem, self.tls.cert_path.read_bytes())
        for ctx in (self.server_ssl, self.client_ssl):
            if ctx is not None:
                ctx.load_cert_chain(self.tls.cert_path, self.tls.key_path)
        log.info("node %s: renewed TLS certificate loaded", self.identity.node_id)

    def _applied(self, envs: list[Envelope], local: bool) -> None:
        self._publish(envs)

    async def _expiry_loop(self) -> None:
        """Release reservations whose hold has run out: our own at once, others' once
        they are ``EXPIRY_TAKEOVER_MS`` overdue on an edge/cloud node (their creator may
        be offline). Concurrent sweeps remove the same dots: harmless."""
        takeover = config.EXPIRY_TAKEOVER_MS if self.identity.role in ("edge", "cloud") \
            else 10**15
        while True:
            await asyncio.sleep(config.EXPIRY_CHECK_S)
            try:
                await self.execute(partial(_sweep, now=self.now_ms(), takeover=takeover))
            except (LedgerError, CommandError) as exc:
                log.warning("reservation expiry sweep failed: %s", exc)

    # --- live stream ------------------------------------------------------------------------

    def subscribe(self) -> asyncio.Queue[dict[str, Any]]:
        q: asyncio.Queue[dict[str, Any]] = asyncio.Queue(config.SUBSCRIBER_QUEUE)
        self._subscribers.add(q)
        return q

    def unsubscribe(self, q: asyncio.Queue[dict[str, Any]]) -> None:
        self._subscribers.discard(q)

    @property
    def subscriber_count(self) -> int:
        return len(self._subscribers)

    def _publish(self, envs: list[Envelope]) -> None:
        """Tell live-stream subscribers the new stock of every SKU these envelopes
        touched (invariant 7 says when): one event per SKU and origin, naming that
        origin's newest envelope that touched the SKU. Per origin, not per SKU only: a
        batch can hold several origins' changes to one SKU, and a subscriber tracking
        (origin, seq) must see each origin's latest."""
        if not self._subscribers or not envs:
            return
        r = self.replica
        newest: dict[tuple[str, str], Envelope] = {}  # a catch-up page must not flood,
        for env in envs:                                # let alone drop, subscribers
            for sku in r.touched_skus(env):
                newest[(sku, env.origin)] = env
        events = [{"sku": sku, "on_hand": r.on_hand(sku), "reserved": r.reserved(sku),
                   "available": r.available(sku), "origin": env.origin, "seq": env.seq,
                   "kind": env.meta["kind"], "hlc": env.hlc, "at_ms": env.hlc >> 16}
                  for (sku, _), env in sorted(newest.items())]
        for q in list(self._subscribers):
            for ev in events:
                try:
                    q.put_nowait(ev)
                except asyncio.QueueFull:
                    # a subscriber that cannot keep up is told so and dropped
                    self._subscribers.discard(q)
                    with contextlib.suppress(asyncio.QueueEmpty):
                        q.get_nowait()
                    q.put_nowait({"type": "overflow"})
                    break

    # --- peers ----------------------------------------------------------------------------

    def wan_bytes(self) -> tuple[int, int]:
        """Bytes (sent, received) on the wire over WAN sessions (the cloud link), after
        compression: what the store pays for."""
        sent, received = self._wan_closed
        for session in self.sessions.values():
            if session.wan:
                s, r = session.wire_bytes()
                sent += s
                received += r
        return sent, received

    def peer_status(self) -> list[dict[str, Any]]:
        ids = set(self.sessions) | set(self.known_urls) | set(self.last_seen)
        out = []
        for pid in sorted(ids):
            session = self.sessions.get(pid)
            cert = self.identity.trust.certificate(pid)
            out.append({
                "node_id": pid, "url": self.known_urls.get(pid),
                "role": cert.role if cert else None, "up": session is not None,
                "lag": self.core.lag(pid), "last_seen_ms": self.last_seen.get(pid),
                "queued": session.queued() if session else 0,
            })
        return out

    def _on_discovered(self, info: Any) -> None:
        old = self.known_urls.get(info.node_id)
        if old is not None and old != info.url and old not in self.static_peers:
            task = self._dialers.pop(old, None)  # it moved (restart on a new port)
            if task is not None:
                task.cancel()
        self.known_urls[info.node_id] = info.url
        if self.identity.node_id < info.node_id:  # invariant 4
            self._ensure_dialer(info.url, info.node_id)

    def _on_lost(self, node_id: str) -> None:
        url = self.known_urls.get(node_id)
        if url and url not in self.static_peers and node_id not in self.sessions:
            task = self._dialers.pop(url, None)
            if task is not None:
                task.cancel()

    def _ensure_dialer(self, url: str, node_id: str | None = None, *, wan: bool = False,
                       role: str | None = None) -> None:
        task = self._dialers.get(url)
        if task is None or task.done():
            self._dialers[url] = self._spawn(
                self._dial_loop(url, wan or self.wan, node_id, role), f"dial {url}")

    async def _dial_loop(self, url: str, wan: bool, expect: str | None = None,
                         role: str | None = None) -> None:
        """Keep a session to ``url`` up: reconnect with jittered exponential backoff.
        ``expect``: the node id we mean to reach: the one discovery advertised there,
        or the one a static URL names after ``#`` (``https://10.0.0.5:8700#edge``), else
        the one the first session proved, so that a later session to this URL must
        reach that same node (``wrong_peer``). ``role``: the role it must hold (a
        ``--cloud`` URL reaches a node enrolled as ``cloud``)."""
        backoff = config.DIAL_BACKOFF_MIN_S
        assert self._http is not None
        target, _, pinned = url.partition("#")
        if pinned and expect is not None and pinned != expect:
            log.error("not dialling %s: it names node %r, discovery says %r", url, pinned,
                      expect)
            self._reject("wrong_peer")
            return
        expect = expect or pinned or None
        if url.startswith("https://") != (self.client_ssl is not None):
            self._reject("plaintext_peer" if self.client_ssl is not None else "tls_peer")
            log.error("not dialling %s: this node runs %s", url,
                      "TLS (peers are https://)" if self.client_ssl is not None
                      else "--insecure-plaintext (peers are http://)")
            return
        sni = sni_name(self.identity.store_id) if wan else None
        peer_id: str | None = expect  # else learnt at the first handshake
        while not self._closed:
            existing = self.sessions.get(peer_id) if peer_id else None
            if existing is not None:
                # It dialled us (both sides name each other as static peers): keep its
                # session, and dial again only once that one has ended.
                await existing.done.wait()
                continue
            try:
                session = await transport.dial(self._http, target, self.identity, self.now_ms,
                                               wan=wan, ssl_context=self.client_ssl,
                                               expect=peer_id, expect_role=role,
                                               server_hostname=sni)
            except transport.HandshakeError as exc:
                self._reject(exc.reason)
                log.info("dial %s refused: %s", url, exc)
            except aiohttp.ClientConnectorCertificateError as exc:
                # Someone answers there with a certificate the store CA did not sign:
                # another store's node, or something in the path. Not a network fault.
                self._reject("tls_server_certificate")
                log.info("dial %s refused: its TLS certificate is not from this store's "
                         "CA (%s)", url, exc.certificate_error)
            except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                log.debug("dial %s failed: %r", url, exc)
            else:
                peer_id = session.peer_id
                self.known_urls[peer_id] = url
                if await self._run_session(session):
                    backoff = config.DIAL_BACKOFF_MIN_S  # a session that really ran
            await asyncio.sleep(backoff * self.rng.uniform(0.5, 1.5))
            backoff = min(backoff * 2, config.DIAL_BACKOFF_MAX_S)

    async def _accept(self, request: web.Request) -> web.StreamResponse:
        return await transport.accept(request, self.identity, self.now_ms, self._accepted,
                                      self._reject, wan=self.wan)

    async def _accepted(self, session: transport.Session) -> None:
        await self._run_session(session)

    def _reject(self, reason: str) -> None:
        self.rejected_sessions[reason] = self.rejected_sessions.get(reason, 0) + 1

    async def _run_session(self, session: transport.Session) -> bool:
        """Run an authenticated session until it ends; False if it was a second one with
        a peer that has a session here and the driver kept that one (``Driver.
        admit_session``: a restart racing its stale session replaces it) and was closed
        at once."""
        pid = session.peer_id
        old = self.sessions.get(pid)
        if self._closed or not self.driver.admit_session(
                pid, outbound=session.outbound,
                old_outbound=None if old is None else old.outbound):
            self.duplicate_sessions += 1  # normal when both sides dial: not a refusal
            session.close("duplicate")
            await session.ws.close()
            session.done.set()
            return False
        if old is not None:  # the driver ended it (session_down): close its connection
            del self.sessions[pid]
            old.close("replaced")
        self.sessions[pid] = session
        session.on_refuse = self._reject  # frames it refuses: session_<reason> in /metrics
        self.trust_changed()  # the handshake may have taught us its certificate
        log.info("session up: %s (%s)", pid, "out" if session.outbound else "in")
        try:
            self.driver.session_up(pid, wan=session.wan)
            await session.run(self.driver.message)
        finally:
            if session.wan:
                sent, received = session.last_wire
                self._wan_closed[0] += sent
                self._wan_closed[1] += received
            if self.sessions.get(pid) is session:
                del self.sessions[pid]
                self.driver.session_down(pid)
            log.info("session down: %s (%s)", pid, session.close_reason)
        return True


def _sweep(replica: Replica, *, now: int, takeover: int) -> CommandResult:
    done = replica.expire(now_ms=now, txn=f"expire-{now}", others_after_ms=takeover)
    return done or CommandResult(None, replica.node_id, 0)

"""The cloud peer: one more replica of every store it is enrolled in — not a master.

``storemesh cloud run --data ROOT`` hosts one ``Node`` per store directory under ROOT
(each a normal node data dir with role ``cloud``) behind one HTTP server. Store
``s``'s node is mounted at ``/stores/s/``: its sync endpoint is
``/stores/s/v1/sync`` (store edge nodes dial out to it with ``--cloud URL``, so no
inbound access to store LANs is needed), and its full node API (reservations for
buy-online-pick-up-in-store, catalog, stock) is under ``/stores/s/v1/...``, behind that
store's device credentials (``mesh.http.gate``). Fleet-wide views (analytics, dashboard,
``/v1/stores``) are served at the root, behind the HQ login (``mesh.cloud.hq``). The
store registry, the stores' trust material and HQ's accounts and sessions are the
control plane (``mesh.cloud.control``): files on ROOT here, PostgreSQL tables with
``--database`` (``mesh.cloud.gateway``, which then serves ``/stores/{store}/`` itself).

Invariants:
 1. Every store's replica is independent: its own key, certificate, trust store,
    ledger and sync core; an envelope of one store can never reach another's replica
    (the handshake and every envelope check the store id).
 2. The cloud verifies every envelope like every other node and originates only what
    its role allows (reservations, catalog, releases).
 3. Every session of the cloud is a WAN session: compressed and batched.
 4. One TLS listener serves every store: a store's node names its store in the TLS
    server name (``mesh.net.tls.sni_name``) and the cloud answers with that store's
    certificate (signed by that store's key); a client certificate must chain to one
    of the hosted stores' CAs, and the sync handshake then checks it is enrolled in the
    store of the path it asked for (``mesh.net.transport`` invariant 7), so one store's
    CA can never open a session with another store's replica. Any other client (no
    server name, or a host name: browsers, curl, the CLI) gets the HQ certificate
    (``mesh.net.hqtls``: ECDSA P-256, which browsers accept), so the dashboard opens in a
    browser; the HQ CA signs nothing a store node trusts.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiohttp import web

from mesh.cloud.control import ControlPlane, FileControl, read_store_files
from mesh.cloud.hq import setup_hq
from mesh.http.httpfaults import CLIENT_FAULTS, ClientFaults, ServerLog
from mesh.net.enrol import join, parse_token
from mesh.net.hqtls import HqTls, ensure_hq_tls, hq_hosts, hq_server_context
from mesh.net.tls import TlsSite, is_loopback_host, sni_name
from mesh.node.node import Node

if TYPE_CHECKING:
    from mesh.cloud.gateway import Gateway

__all__ = ["CloudNode", "cloud_join"]

log = logging.getLogger(__name__)


async def cloud_join(root: Path, token: str, *, url: str | None,
                     node_id: str | None = None, insecure_plaintext: bool = False,
                     database: str | None = None) -> Path:
    """Enrol the cloud in one more store with a join token (role ``cloud``): creates
    ``ROOT/<store id>/`` and returns it. With ``database``, the node is made in a
    scratch directory under ROOT, registered in the database's control plane (running
    gateways pick it up within a tick: ``mesh.cloud.gateway`` invariant 6), and the
    scratch directory removed: the returned path no longer exists."""
    import shutil

    parsed = parse_token(token)
    if parsed.role != "cloud":
        raise ValueError(f"this token enrols a {parsed.role}; ask for one with --role cloud")
    if database is None:
        data_dir = root / parsed.store_id
        await join(data_dir, token, url=url, node_id=node_id or f"cloud-{parsed.store_id}",
                   insecure_plaintext=insecure_plaintext)
        return data_dir
    from mesh.cloud.pgcontrol import PgControl

    control = await asyncio.to_thread(PgControl, database)
    try:
        if parsed.store_id in await asyncio.to_thread(control.stores):
            raise FileExistsError(f"store {parsed.store_id} is registered already")
        scratch = root / ".joining" / parsed.store_id
        await asyncio.to_thread(shutil.rmtree, scratch, True)
        try:
            await join(scratch, token, url=url,
                       node_id=node_id or f"cloud-{parsed.store_id}",
                       insecure_plaintext=insecure_plaintext)
            files = await asyncio.to_thread(read_store_files, scratch)
            if not await asyncio.to_thread(control.register_store, parsed.store_id, files):
                raise FileExistsError(f"store {parsed.store_id} is registered already")
        finally:
            await asyncio.to_thread(shutil.rmtree, scratch, True)
    finally:
        await asyncio.to_thread(control.close)
    return scratch


class CloudNode:
    """Many store replicas in one process, behind one HTTP server."""

    def __init__(self, root: Path, *, http_host: str = "127.0.0.1", http_port: int = 0,
                 insecure_plaintext: bool = False, tls_cert: Path | None = None,
                 tls_key: Path | None = None, database: str | None = None,
                 gateway_id: str | None = None, lease_ttl_s: float | None = None) -> None:
        """``tls_cert``/``tls_key``: HQ's own certificate (PEM, with its chain) for
        browsers and tools; without them the cloud makes one from its HQ CA in ROOT
        (``mesh.net.hqtls``). ``database``: a ``postgresql://`` URL: every store's ledger in
        PostgreSQL and this process one of many gateways sharing ROOT and the database,
        each store served by the gateway holding its lease (``mesh.cloud.gateway``); without
        it, every store in ROOT is served here from its SQLite ledger."""
        if insecure_plaintext and not is_loopback_host(http_host):
            raise ValueError(f"insecure_plaintext serves plain HTTP: only on a loopback "
                             f"address, not {http_host}")
        if (tls_cert is None) != (tls_key is None):
            raise ValueError("give both the HQ certificate and its key, or neither")
        self.insecure_plaintext = insecure_plaintext
        #: The certificate browsers and tools see (set by ``start``).
        self.hq: HqTls | None = None if tls_cert is None or tls_key is None else \
            HqTls(Path(tls_cert), Path(tls_key), None)
        self.root = Path(root)
        self.http_host = http_host
        self.http_port = http_port
        self.nodes: dict[str, Node] = {}
        #: TLS handshakes refused by the shared listener, by reason (``mesh.net.tls``).
        self.tls_refused: dict[str, int] = {}
        self._opened: list[Node] = []
        self.app = web.Application()
        self.url = ""
        self._runner: web.AppRunner | None = None
        #: hooks run after the store nodes start and before the server is frozen, to add
        #: fleet-wide routes (analytics, dashboard)
        self.setup_hooks: list[Callable[[CloudNode], None]] = []
        self.database = database
        self.gateway: Gateway | None = None
        if database is not None:
            from mesh.cloud.gateway import DEFAULT_TTL_S, Gateway

            self.gateway = Gateway(self, database, gateway_id, lease_ttl_s or DEFAULT_TTL_S)
        self._sni: dict[str, ssl.SSLContext] = {}
        self._hq_ctx: ssl.SSLContext | None = None
        #: Store registry, trust material, HQ accounts and sessions (``mesh.cloud.control``):
        #: files on ROOT, or the database's (set by ``start``) on a gateway.
        self.control: ControlPlane = FileControl(self.root)

    def store_dirs(self) -> list[Path]:
        return [self.root / s for s in FileControl(self.root).stores()]

    async def start(self) -> None:
        dirs = await asyncio.to_thread(self.store_dirs)
        if not dirs and self.gateway is None:  # (a gateway may wait for its first store)
            raise FileNotFoundError(
                f"{self.root} holds no store: enrol the cloud with 'storemesh cloud join'")
        if self.gateway is not None:  # stores are opened as their leases are won
            self.control = await self.gateway.prepare(dirs)
        for data_dir in dirs if self.gateway is None else []:
            node = Node(data_dir, serve=False, discovery=False, wan=True,
                        insecure_plaintext=self.insecure_plaintext)
            self._opened.append(node)  # closed by close() even if its start is cut short
            await node.start()
            if node.identity.role != "cloud":
                raise ValueError(f"{data_dir} holds a {node.identity.role} node, not a cloud one")
            self.nodes[node.identity.store_id] = node
            self.app.add_subapp(f"/stores/{node.identity.store_id}/", node.app)
        self.app.router.add_get("/v1/stores", self._stores)
        # HQ login in front of the fleet views (mesh.cloud.hq)
        setup_hq(self.app, self.root, self.control)
        for hook in self.setup_hooks:
            hook(self)
        faults = self.app[CLIENT_FAULTS] = ClientFaults()  # for requests outside a store
        self._runner = web.AppRunner(self.app, access_log=None, logger=ServerLog(faults))
        await self._runner.setup()
        site: web.BaseSite
        if self.insecure_plaintext:
            site = web.TCPSite(self._runner, self.http_host, self.http_port)
        else:
            if self.hq is None:
                self.hq = await asyncio.to_thread(ensure_hq_tls, self.root,
                                                  hq_hosts(self.http_host),
                                                  now_ms=Node.now_ms())
            site = TlsSite(self._runner, self.http_host, self.http_port, self._tls_context(),
                           self._tls_refused)
        await site.start()
        server = site._server
        assert server is not None
        self.http_port = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]
        scheme = "http" if self.insecure_plaintext else "https"
        self.url = f"{scheme}://{self.http_host}:{self.http_port}"
        for store_id, node in self.nodes.items():
            node.url = f"{self.url}/stores/{store_id}"
        if self.gateway is not None:
            await self.gateway.start()
        log.info("cloud peer for %d store(s) listening on %s", len(self.nodes), self.url)

    def _tls_context(self) -> ssl.SSLContext:
        """Invariant 4: one context per store, chosen by the TLS server name; the HQ
        context for every other name (and none)."""
        assert self.hq is not None
        hq = self._hq_ctx = hq_server_context(self.hq)
        by_name = self._sni
        for _store_id, node in sorted(self.nodes.items()):
            self._add_tls(node)

        def pick(sslobj: ssl.SSLObject, name: str | None, _ctx: ssl.SSLContext) -> None:
            chosen = by_name.get(name or "")
            if chosen is not None:
                sslobj.context = chosen
        hq.sni_callback = pick
        return hq

    def _add_tls(self, node: Node) -> None:
        assert self._hq_ctx is not None and node.tls is not None and node.server_ssl is not None
        self._sni[sni_name(node.identity.store_id)] = node.server_ssl  # reloaded in place
        # OpenSSL keeps the first context's verify settings when the SNI callback
        # switches: the HQ context asks for a client certificate (optional) and
        # verifies one of any hosted store's CA; the sync handshake checks the rest.
        self._hq_ctx.load_verify_locations(cadata=node.tls.ca_pem.decode("ascii"))

    def serve_store(self, node: Node) -> None:
        """A store node opened after start (a gateway won its lease): TLS and routing."""
        if self._hq_ctx is not None:
            self._add_tls(node)
        node.url = f"{self.url}/stores/{node.identity.store_id}"
        self.nodes[node.identity.store_id] = node

    def unserve_store(self, store_id: str) -> Node | None:
        """A gateway lost or handed over ``store_id``: stop routing to it and stop
        presenting its certificate (its edge fails over at the TLS handshake)."""
        self._sni.pop(sni_name(store_id), None)
        return self.nodes.pop(store_id, None)

    def _tls_refused(self, reason: str) -> None:
        """A TLS handshake failed before any store was chosen: counted fleet-wide."""
        self.tls_refused[reason] = self.tls_refused.get(reason, 0) + 1

    async def close(self) -> None:
        """Close every store node opened (all of them, or those a cancelled or failed
        ``start`` got to), then the server. A gateway hands its stores over first."""
        if self.gateway is not None:
            await self.gateway.close()
        for node in self._opened:
            await node.close()
        if self._runner is not None:
            await self._runner.cleanup()  # (the HQ door reads the control plane until here)
        await asyncio.to_thread(self.control.close)

    async def _stores(self, request: web.Request) -> web.Response:
        """Every store of the cloud: the ones served here with their peers; on a gateway
        also the registered ones another gateway holds (its URL), or none yet."""
        out: list[dict[str, Any]] = []
        gw = self.gateway
        for store_id in sorted(set(self.nodes) | set(gw.registry if gw else ())):
            node = self.nodes.get(store_id)
            if node is not None:
                out.append({"store_id": store_id, "node_id": node.identity.node_id,
                            "url": node.url, "peers": node.peer_status(),
                            "gateway": gw.id if gw else None})
                continue
            holder = gw.holders.get(store_id) if gw else None
            live = holder is not None and holder.live
            out.append({"store_id": store_id, "node_id": None, "peers": None,
                        "url": f"{holder.url}/stores/{store_id}" if live and holder else None,
                        "gateway": holder.gateway if live and holder else None})
        return web.json_response({"stores": out})

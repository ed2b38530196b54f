"""Helpers for tests that run store nodes as real processes (tests/process/test_mesh_processes.py).

* ``Cluster``: the project's one process harness (``mesh.testing.cluster``, which the
  demo and the benchmarks use too) plus ``launch``, the ``storemesh node`` command line:
  starts node processes (optionally inside a network namespace), waits for each one's
  "listening on URL" line (bounded), kills and restarts them by pid, and on ``close()``
  stops every process it started (SIGTERM; a node still running after
  ``STOP_TIMEOUT_S`` gets SIGABRT, so its faulthandler writes every thread's stack to
  its log, then SIGKILL; that is reported as a failure) and every proxy registered
  with it. The ``cluster`` fixture guarantees ``close()``. Each node's stderr (its log)
  goes to ``<tmp_path>/<name>.log``.
* Stores on disk: ``new_store`` (store key + edge node), ``enrol_direct`` (the local
  path: a certificate from the store key), ``join_token`` (a one-time token).
* TLS: nodes run real TLS (``mesh.net.tls``), as in production. ``new_store`` adds the
  store's CA to ``TEST_SSL``, the context every ``client()`` uses, so tests pin the
  CAs of the stores they made and nothing else. ``launch(plaintext=True)`` starts a
  node with ``--insecure-plaintext`` (loopback development mode).
* HTTP: ``get_json``, ``post_json``, ``stock_table``, ``audit_txns``, ``wait_mesh``,
  ``wait_converged``, ``metric_families``, ``rejections``; ``SseReader`` for
  ``/v1/events``; ``until`` polls anything with a bound.
* Network namespaces: ``ip`` runs iproute2; ``run_in_netns`` runs a function in a
  thread that entered a namespace (setns), so the test's own HTTP client can reach nodes
  that live only inside namespaces the test created.

Every wait is bounded in time and in count; every failure message says what was awaited,
for how long, and what was seen last (with the tail of the node's log where useful).
Nodes bind HTTP and zeroconf to the address given (127.0.0.1 by default), so no packet
leaves the machine.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import ssl
import subprocess
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families
from yarl import URL

from mesh.core.identity import TrustStore
from mesh.net.enrol import create_token
from mesh.net.tls import api_client_context
from mesh.store import authdir
from mesh.store.authdir import issue_device_credential
from mesh.store.datadir import NodeIdentity, enrol_node, init_store
from mesh.testing.cluster import Cluster as ProcessCluster
from mesh.testing.cluster import NodeProcess

LOOPBACK = "127.0.0.1"
HTTP_TIMEOUT = aiohttp.ClientTimeout(total=10)


def now_ms() -> int:
    return time.time_ns() // 1_000_000


async def wait_until(predicate: Callable[[], bool], within: float, what: str) -> None:
    """Poll ``predicate`` every 10 ms on the running loop, for at most ``within`` s."""
    deadline = time.monotonic() + within
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within}s waiting for {what}")
        await asyncio.sleep(0.01)


def tag() -> str:
    """A short random tag: store ids and node ids are unique per test, so other test
    runs advertising ``_storemesh._tcp`` on this machine cannot interfere (and mDNS
    instance names, derived from node ids, never clash)."""
    return uuid.uuid4().hex[:6]


# --- stores on disk ------------------------------------------------------------------


#: The TLS context of every ``client()``: trusts the CA of each store ``new_store`` made
#: in this process (OpenSSL reads the context's trust store at each handshake, so CAs
#: added later count for sessions opened before).
TEST_SSL = api_client_context(b"")


def trust_ca(data_dir: Path) -> None:
    """Let ``client()`` sessions trust the store CA held in ``data_dir``."""
    TEST_SSL.load_verify_locations(cadata=(data_dir / "tls-ca.pem").read_text())


def rogue_tls_context(data_dir: Path) -> ssl.SSLContext:
    """An attacker's TLS client: presents ``data_dir``'s node certificate and checks
    nothing about the server (so only the server's checks can stop it)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.load_cert_chain(data_dir / "tls-node.pem", data_dir / "tls-node.key")
    return ctx


def new_store(base: Path, store_id: str, edge_id: str) -> NodeIdentity:
    """A store key and its first (edge) node in ``base/edge_id``, and a back-office
    integration's credential for it (``issue_token``), which ``client()`` sends to that
    store's nodes (the first store of a test is also the default: ``use_token``)."""
    edge = init_store(base / edge_id, store_id, now_ms=now_ms(), node_id=edge_id)
    trust_ca(edge.data_dir)
    token = issue_token(edge)
    # (a second store under the same id, a rogue one, does not take the first's place)
    token = _STORE_TOKENS.setdefault(store_id, token)
    if _TOKEN[0] is None:
        use_token(token)
    return edge


# --- API credentials (mesh.core.auth) ---------------------------------------------------------

#: The credential ``client()`` sessions send when a request names none, unless the
#: request goes to a node of a store in ``_STORE_TOKENS`` (set by ``new_store``; reset
#: before every test by conftest: ``reset_tokens``).
_TOKEN: list[str | None] = [None]
#: store id -> the integration credential ``new_store`` issued for it
_STORE_TOKENS: dict[str, str] = {}
#: "host:port" of a node process -> its store id (learnt as it starts: ``Cluster``)
_ORIGIN_STORE: dict[str, str] = {}


def use_store_token(store_id: str, token: str, *urls: str) -> None:
    """``client()`` sends ``token`` to the nodes of ``store_id`` (the cloud's
    ``/stores/<store_id>/``, and the nodes at ``urls``)."""
    _STORE_TOKENS[store_id] = token
    for u in urls:
        url = URL(u)
        _ORIGIN_STORE[f"{url.host}:{url.port}"] = store_id


def reset_tokens() -> None:
    _TOKEN[0] = None
    _STORE_TOKENS.clear()
    _ORIGIN_STORE.clear()


def _token_for(url: Any) -> str | None:
    """The credential for a request to ``url``: its store's (a cloud's ``/stores/S/``
    path, or a node process's address), else the default."""
    parts = url.path.split("/")
    store = parts[2] if len(parts) > 3 and parts[1] == "stores" else None
    if store is None:
        store = _ORIGIN_STORE.get(f"{url.host}:{url.port}")
    return _STORE_TOKENS.get(store, _TOKEN[0]) if store is not None else _TOKEN[0]


#: scrypt cost of test staff PINs (the CLI's default, config.PIN_SCRYPT_N, costs ~50 ms a
#: check; a cheap cost keeps PIN logins fast in tests and changes nothing else).
PIN_COST = 1024


def _edge_dir(edge: NodeIdentity | Path) -> Path:
    return edge.data_dir if isinstance(edge, NodeIdentity) else Path(edge)


def issue_token(edge: NodeIdentity | Path, device_id: str = "test-svc", role: str = "service",
                **kwargs: Any) -> str:
    """A device credential issued by the store's edge in ``edge`` as ``storemesh device
    issue`` does it (``mesh.store.authdir``: recorded in auth.json, revocable)."""
    return issue_device_credential(_edge_dir(edge), device_id=device_id, role=role,
                                   now_ms=now_ms(), ttl_ms=24 * 3600_000, **kwargs)


def add_staff(edge: NodeIdentity | Path, staff_id: str, role: str = "cashier",
              pin: str = "2468", name: str | None = None) -> int:
    """Put ``staff_id`` on the roster as ``storemesh staff add`` does; returns the new
    roster version (the nodes pick it up: ``wait_roster``)."""
    roster = authdir.add_staff(_edge_dir(edge), staff_id=staff_id, name=name or staff_id,
                               role=role, pin=pin, now_ms=now_ms(), pin_cost=PIN_COST)
    return roster.version


async def wait_roster(http: aiohttp.ClientSession, url: str, version: int,
                      within: float = 15.0) -> None:
    """Until the node at ``url`` holds roster ``version`` or later (``/v1/health``)."""
    async def probe() -> bool:
        return bool((await get_json(http, url, "/v1/health"))["roster_version"] >= version)
    await until(probe, within=within, what=f"roster v{version} at {url}")


async def login(http: aiohttp.ClientSession, url: str, token: str, staff_id: str,
                pin: str = "2468", *, roster: int | None = None) -> dict[str, str]:
    """Log ``staff_id`` in at the node at ``url`` from the device holding ``token``, as a
    till does (``POST /v1/session``); returns the headers of that till's writes. With
    ``roster``, first wait until the node holds that roster version."""
    if roster is not None:
        await wait_roster(http, url, roster)
    async with http.post(url + "/v1/session", json={"staff_id": staff_id, "pin": pin},
                         headers=bearer(token)) as resp:
        body = await resp.json()
        assert resp.status == 201, f"login of {staff_id} at {url}: {resp.status} {body}"
    return {**bearer(token), "X-Staff-Session": body["session"]}


def use_token(token: str | None) -> None:
    _TOKEN[0] = token


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def _with_token(req: aiohttp.ClientRequest, handler: aiohttp.ClientHandlerType
                      ) -> aiohttp.ClientResponse:
    token = _token_for(req.url)
    if token is not None and "Authorization" not in req.headers:
        req.headers["Authorization"] = f"Bearer {token}"
    return await handler(req)


#: The HQ account tests make on a cloud (``add_hq_user``) and its password.
HQ_USER = "hq-ann"
HQ_PASSWORD = "correct horse battery"


def add_hq_user(cloud_root: Path, name: str = HQ_USER, password: str = HQ_PASSWORD,
                role: str = "viewer") -> None:
    """An HQ account on the cloud in ``cloud_root``, as ``storemesh hq add`` makes it."""
    from mesh.cloud.hq import add_user

    add_user(cloud_root, name, password, role=role, cost=PIN_COST)


@contextlib.asynccontextmanager
async def hq_session(cloud_url: str, name: str = HQ_USER, password: str = HQ_PASSWORD,
                     ) -> AsyncIterator[aiohttp.ClientSession]:
    """A client logged in at the cloud's HQ door (``POST /v1/hq/login``), holding the
    session cookie (a cookie jar that accepts cookies from an IP address: loopback);
    it also sends the store credentials ``client()`` does."""
    jar = aiohttp.CookieJar(unsafe=True)
    async with client(cookie_jar=jar) as http:
        await hq_login(http, cloud_url, name, password)
        yield http


async def hq_login(http: aiohttp.ClientSession, cloud_url: str, name: str = HQ_USER,
                   password: str = HQ_PASSWORD) -> dict[str, Any]:
    """Log in at the cloud's HQ door (again: a restarted cloud forgot its sessions)."""
    async with http.post(cloud_url + "/v1/hq/login",
                         json={"user": name, "password": password}) as resp:
        body: dict[str, Any] = await resp.json()
        assert resp.status == 200, f"HQ login at {cloud_url}: {resp.status} {body}"
    return body


@contextlib.asynccontextmanager
async def running_node(data_dir: Path, *, plaintext: bool = True) -> AsyncIterator[Any]:
    """An in-process node on ``data_dir`` (already initialised) on 127.0.0.1 at a free
    port, no discovery; closed when the block ends. ``plaintext`` (the default): plain
    HTTP, the loopback development mode, for tests of the API itself; ``False``: TLS as
    in production (pin with ``client()``)."""
    from mesh.node.node import Node

    n = Node(data_dir, http_host="127.0.0.1", http_port=0, discovery=False,
             insecure_plaintext=plaintext)
    await n.start()
    try:
        yield n
    finally:
        await n.close()


def enrol_direct(base: Path, edge: NodeIdentity, node_id: str,
                 role: str = "register") -> NodeIdentity:
    """Enrol ``node_id`` with the edge's store key, locally (no token, no network)."""
    assert edge.store_key is not None, "the edge of new_store holds the store key"
    trust = TrustStore.from_dict(edge.trust.to_dict())
    return enrol_node(base / node_id, edge.store_key, edge.store_id, role, now_ms=now_ms(),
                      node_id=node_id, trust=trust)


def join_token(edge: NodeIdentity, role: str = "register", url: str | None = None) -> str:
    return create_token(edge, role=role, ttl_ms=600_000, now_ms=now_ms(), url=url)


# --- processes -------------------------------------------------------------------------


NodeProc = NodeProcess  # the harness's process, under the name the tests use


class Cluster(ProcessCluster):
    """Node processes (and proxies) of one test: ``mesh.testing.cluster.Cluster`` plus
    the ``storemesh node`` command line (``launch``) and the store of each URL (so
    ``client()`` sends that store's credential)."""

    def launch(self, name: str, data_dir: Path, *, interface: str = LOOPBACK,
               http_port: int = 0, peers: Sequence[str] = (), discovery: bool = True,
               join: str | None = None, node_id: str | None = None,
               netns: str | None = None, log_level: str = "INFO",
               extra: Sequence[str] = (), plaintext: bool = False) -> NodeProc:
        """Start a node process; ``wait_ready`` returns once it listens. ``extra``:
        more ``storemesh node`` arguments (e.g. ``--cloud URL``). ``plaintext``:
        ``--insecure-plaintext`` (nodes run TLS otherwise)."""
        argv = ["node", "--data", str(data_dir), "--interface", interface,
                "--http-port", str(http_port), "--log-level", log_level, *extra]
        if plaintext:
            argv.append("--insecure-plaintext")
        for url in peers:
            argv += ["--peer", url]
        if not discovery:
            argv.append("--no-discovery")
        if join is not None:
            argv += ["--join", join]
        if node_id is not None:
            argv += ["--node-id", node_id]
        # cwd: the log's folder, so mesh is imported as installed, not from the cwd
        return self.spawn(name, argv, data_dir=data_dir, netns=netns)

    def ready(self, node: NodeProc) -> None:
        if node.store_id:
            url = URL(node.url)
            _ORIGIN_STORE[f"{url.host}:{url.port}"] = node.store_id

    async def start(self, name: str, data_dir: Path, **kwargs: Any) -> NodeProc:
        node = self.launch(name, data_dir, **kwargs)
        await self.wait_ready(node)
        return node


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    """A ``Cluster`` in ``tmp_path`` whose every process is stopped after the test."""
    c = Cluster(tmp_path)
    try:
        yield c
    finally:
        c.close()


# --- HTTP --------------------------------------------------------------------------------


def client(**kwargs: Any) -> aiohttp.ClientSession:
    """An HTTP client pinned to the CAs of this test process's stores (``TEST_SSL``),
    sending the store's integration credential (``use_token``, ``use_store_token``)."""
    return aiohttp.ClientSession(timeout=HTTP_TIMEOUT,
                                 connector=aiohttp.TCPConnector(ssl=TEST_SSL),
                                 middlewares=(_with_token,), **kwargs)


async def get_json(http: aiohttp.ClientSession, url: str, path: str) -> Any:
    async with http.get(url + path) as resp:
        body = await resp.read()
        assert resp.status == 200, f"GET {url}{path} -> {resp.status} {body[:300]!r}"
        return orjson.loads(body)


async def post_json(http: aiohttp.ClientSession, url: str, path: str,
                    body: dict[str, Any]) -> tuple[int, Any]:
    async with http.post(url + path, data=orjson.dumps(body),
                         headers={"Content-Type": "application/json"}) as resp:
        raw = await resp.read()
        try:
            return resp.status, orjson.loads(raw)
        except orjson.JSONDecodeError:
            return resp.status, raw.decode(errors="replace")


async def post_ok(http: aiohttp.ClientSession, url: str, path: str,
                  body: dict[str, Any]) -> Any:
    status, data = await post_json(http, url, path, body)
    assert status in (200, 201), f"POST {url}{path} {body} -> {status} {data}"
    return data


async def until(probe: Callable[[], Awaitable[Any]], *, within: float, what: str,
                interval: float = 0.02) -> tuple[float, Any]:
    """Call ``probe`` until it returns a truthy value; returns (seconds taken, value).
    Fails after ``within`` s with the last value seen (or the last error)."""
    start = time.monotonic()
    last: Any = None
    for _attempt in range(int(within / max(interval, 0.001)) + 1000):
        try:
            last = await probe()
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            last = exc
        else:
            if last:
                return time.monotonic() - start, last
        if time.monotonic() - start > within:
            break
        await asyncio.sleep(interval)
    pytest.fail(f"not within {within} s: {what}; last seen: {last!r}"[:4000])


async def stock_table(http: aiohttp.ClientSession, url: str) -> dict[str, tuple[int, int, int]]:
    """Every SKU's (on_hand, reserved, available) at one node (all pages)."""
    out: dict[str, tuple[int, int, int]] = {}
    after: str | None = None
    for _page in range(1000):
        path = "/v1/stock?limit=10000" + ("" if after is None else f"&after={after}")
        data = await get_json(http, url, path)
        for i in data["stock"]:
            out[i["sku"]] = (i["on_hand"], i["reserved"], i["available"])
        after = data["next"]
        if after is None:
            return out
    raise AssertionError(f"{url}/v1/stock: more than 1000 pages")


async def stock_views(http: aiohttp.ClientSession,
                      nodes: Sequence[NodeProc]) -> dict[str, dict[str, tuple[int, int, int]]]:
    tables = await asyncio.gather(*(stock_table(http, n.url) for n in nodes))
    return {n.name: t for n, t in zip(nodes, tables, strict=True)}


async def wait_converged(http: aiohttp.ClientSession, nodes: Sequence[NodeProc], *,
                         within: float,
                         expect: dict[str, int] | None = None) -> tuple[float, dict[str, Any]]:
    """Wait until every node reports the same stock (and, if given, ``expect``'s on_hand
    for those SKUs); returns (seconds, the common stock table)."""
    last: dict[str, Any] = {}

    async def probe() -> dict[str, Any] | None:
        nonlocal last
        last = await stock_views(http, nodes)
        tables = list(last.values())
        if any(t != tables[0] for t in tables):
            return None
        if expect is not None and any(
                tables[0].get(sku, (None,))[0] != n for sku, n in expect.items()):
            return None
        return tables[0]

    start = time.monotonic()
    for _attempt in range(int(within / 0.02) + 1000):
        try:
            table = await probe()
        except (aiohttp.ClientError, OSError, TimeoutError):
            table = None
        if table is not None:
            return time.monotonic() - start, table
        if time.monotonic() - start > within:
            break
        await asyncio.sleep(0.02)
    pytest.fail(f"nodes did not converge within {within} s (expected on hand {expect}); "
                f"last views: {_fmt_views(last)}")


def _fmt_views(views: dict[str, dict[str, tuple[int, int, int]]]) -> str:
    return "; ".join(f"{name}: {sorted(t.items())}" for name, t in views.items())[:4000]


async def peers_up(http: aiohttp.ClientSession, node: NodeProc) -> set[str]:
    data = await get_json(http, node.url, "/v1/peers")
    return {p["node_id"] for p in data["peers"] if p["up"]}


async def wait_mesh(http: aiohttp.ClientSession, nodes: Sequence[NodeProc], *,
                    within: float) -> float:
    """Wait until every node has a live session with every other one."""
    ids = {n.node_id for n in nodes}

    async def probe() -> bool:
        ups = await asyncio.gather(*(peers_up(http, n) for n in nodes))
        return all(up >= ids - {n.node_id} for n, up in zip(nodes, ups, strict=True))

    async def show() -> str:
        ups = await asyncio.gather(*(peers_up(http, n) for n in nodes),
                                   return_exceptions=True)
        return ", ".join(f"{n.name} sees {u}" for n, u in zip(nodes, ups, strict=True))

    start = time.monotonic()
    deadline = start + within
    for _attempt in range(int(within / 0.05) + 1000):
        with contextlib.suppress(aiohttp.ClientError, OSError, TimeoutError):
            if await probe():
                return time.monotonic() - start
        if time.monotonic() > deadline:
            break
        await asyncio.sleep(0.05)
    pytest.fail(f"no full mesh of {sorted(ids)} within {within} s: {await show()}\n"
                + "\n".join(f"--- {n.name} log:\n{n.log_tail(15)}" for n in nodes))


async def audit_txns(http: aiohttp.ClientSession, url: str,
                     kind: str | None = None) -> list[tuple[str, str, int, str]]:
    """Every ledger entry at one node as (txn_id, origin, seq, kind), newest first,
    optionally only of ``kind`` (walks ``/v1/audit`` to the start of the ledger)."""
    out: list[tuple[str, str, int, str]] = []
    before: int | None = None
    for _page in range(10_000):
        path = "/v1/audit?limit=1000" + ("" if before is None else f"&before={before}")
        data = await get_json(http, url, path)
        for e in data["entries"]:
            if kind is None or e["kind"] == kind:
                out.append((e["txn_id"], e["origin"], e["seq"], e["kind"]))
        before = data["next_before"]
        if before is None:
            return out
    raise AssertionError(f"{url}/v1/audit: more than 10,000 pages")


# --- metrics -----------------------------------------------------------------------------


async def metric_families(http: aiohttp.ClientSession, url: str) -> dict[str, Any]:
    """``/metrics`` parsed with prometheus_client: family name -> Metric."""
    async with http.get(url + "/metrics") as resp:
        text = await resp.text()
        assert resp.status == 200, f"GET {url}/metrics -> {resp.status}: {text[:300]}"
    return {fam.name: fam for fam in text_string_to_metric_families(text)}


async def rejections(http: aiohttp.ClientSession, url: str) -> dict[str, float]:
    """``storemesh_envelopes_rejected_total`` by ``reason`` at one node."""
    fams = await metric_families(http, url)
    fam = fams.get("storemesh_envelopes_rejected")
    if fam is None:
        return {}
    return {s.labels["reason"]: s.value for s in fam.samples if s.name.endswith("_total")}


# --- live stream --------------------------------------------------------------------------


@dataclass
class SseEvent:
    at: float  # time.perf_counter() when the event's last line arrived
    data: dict[str, Any]
    event: str = "message"


class SseReader:
    """Reads a node's ``/v1/events`` stream in a task; events are kept with their arrival
    time. ``start()`` returns once the node confirmed the subscription; ``close()``
    cancels and awaits the task."""

    MAX_EVENTS = 100_000

    def __init__(self, http: aiohttp.ClientSession, node: NodeProc) -> None:
        self.http = http
        self.node = node
        self.events: list[SseEvent] = []
        self.subscribed = asyncio.Event()
        self.changed = asyncio.Event()
        self.error: BaseException | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self, within: float = 10.0) -> SseReader:
        self._task = asyncio.create_task(self._run(), name=f"sse {self.node.name}")
        try:
            await asyncio.wait_for(self.subscribed.wait(), within)
        except TimeoutError:
            await self.close()
            pytest.fail(f"{self.node.name}: no ': subscribed' on /v1/events within {within} s"
                        f" ({self.error!r})")
        return self

    async def _run(self) -> None:
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=5)
        try:
            async with self.http.get(self.node.url + "/v1/events", timeout=timeout) as resp:
                assert resp.status == 200, f"/v1/events -> {resp.status}"
                event, data = "message", b""
                async for raw in resp.content:
                    line = raw.rstrip(b"\r\n")
                    if line == b": subscribed":
                        self.subscribed.set()
                    elif line.startswith(b"event:"):
                        event = line[6:].strip().decode()
                    elif line.startswith(b"data:"):
                        data += line[5:].strip()
                    elif not line and data:
                        if len(self.events) < self.MAX_EVENTS:
                            self.events.append(SseEvent(time.perf_counter(),
                                                        orjson.loads(data), event))
                        event, data = "message", b""
                        self.changed.set()
        except (aiohttp.ClientError, OSError, AssertionError) as exc:
            self.error = exc

    async def wait_for(self, match: Callable[[dict[str, Any]], bool], *, within: float,
                       start_index: int = 0) -> SseEvent | None:
        """The first event from ``start_index`` on that ``match``es, waiting at most
        ``within`` s for it; None if none came."""
        deadline = time.monotonic() + within
        i = start_index
        for _round in range(self.MAX_EVENTS + 1):  # each round sees an event or times out
            while i < len(self.events):
                if match(self.events[i].data):
                    return self.events[i]
                i += 1
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self._task is None or self._task.done():
                return None
            self.changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.changed.wait(), remaining)
        return None

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


# --- network namespaces --------------------------------------------------------------------


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run ``ip ARGS`` (iproute2), bounded in time."""
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=20,
                          check=check)


def run_in_netns(netns: str, fn: Callable[[], Any]) -> Any:
    """Run ``fn`` in a new thread that has entered network namespace ``netns`` (setns(2)
    moves only the calling thread), so every socket it opens lives in that namespace.
    Returns ``fn``'s result or raises its exception."""
    import ctypes

    clone_newnet = 0x40000000
    libc = ctypes.CDLL(None, use_errno=True)
    result: list[Any] = []
    error: list[BaseException] = []

    def body() -> None:
        try:
            fd = os.open(f"/run/netns/{netns}", os.O_RDONLY)
            try:
                if libc.setns(fd, clone_newnet) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns into {netns}: {os.strerror(err)}")
            finally:
                os.close(fd)
            # Make sure before any socket opens: never run the caller's traffic in the
            # namespace this process started in.
            here = os.stat("/proc/thread-self/ns/net")
            there = os.stat(f"/run/netns/{netns}")
            if (here.st_dev, here.st_ino) != (there.st_dev, there.st_ino):
                raise OSError(f"setns into {netns} reported success but did not take effect")
            result.append(fn())
        except BaseException as exc:
            error.append(exc)

    thread = threading.Thread(target=body, name=f"in netns {netns}", daemon=True)
    thread.start()
    thread.join(300)
    if thread.is_alive():
        raise AssertionError(f"the code run in netns {netns} did not end within 300 s")
    if error:
        raise error[0]
    return result[0]

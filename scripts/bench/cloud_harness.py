"""The cloud benchmark's shared harness: a store (edge + registers as Nodes in this process),
the cloud as a child process, the baseline POST server, byte counting from TCP_INFO, the
rig and its sales (scripts/bench_cloud.py runs the experiments built on it)."""

from __future__ import annotations

import asyncio
import contextlib
import random
import secrets
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from aiohttp import web
from rich.console import Console

from mesh import config
from mesh.core.replica import CommandResult, Replica
from mesh.net import transport
from mesh.net.hqtls import CA_FILE as HQ_CA_FILE
from mesh.net.tls import api_client_context
from mesh.net.transport import tcp_bytes
from mesh.node.node import Node
from mesh.store.datadir import NodeIdentity, enrol_node, init_store
from mesh.testing.cluster import ClusterError, NodeProcess

#: Bearer key of the naive cloud API: 40 characters, like any real API key.


API_KEY = "sk_live_" + secrets.token_hex(16)
assert len(API_KEY) == 40
STAFF = {"reg-01": "st-042", "reg-02": "st-117"}
REGISTERS = tuple(STAFF)
N_SKUS = 50
RECEIPT_QTY = 1_000_000
#: TCP/IPv4 header bytes per segment (20 IP + 20 TCP + 12 timestamp option), for the
#: "with headers" estimate. Loopback's 64 KiB MTU makes big messages fewer segments than
#: on a real WAN (1,460 B MSS); for the per-sale windows the messages are small.
HDR_PER_SEGMENT = 52
#: Longest wait for any one condition: a hang is a failure, not a stall.
WAIT_S = 60.0
CHILD_START_S = 60.0
SAMPLE_S = 0.05
LIVE_SALE_EVERY_S = 0.1
#: A store uplink for the derived (not measured) catch-up estimate over a real WAN.
WAN_RTT_S = 0.050
WAN_UPLINK_BPS = 10e6 / 8
#: Goals (issue 5, WAN link discipline) and the bounds asserted by this benchmark.
GOAL_REDUCTION = 0.80
GOAL_TRANSIENT_MB = 64.0
GOAL_PEAK_MB = 500.0
#: Sales of one register issued and not yet durable before the issuer waits.
MAX_OUTSTANDING_SALES = 1_000
#: Keep-alive of the baseline's HTTP connections (client and server): longer than a run.
KEEPALIVE_S = 3600.0
#: How often the cloud's API is polled to see whether it holds everything.
POLL_S = 0.02
#: How often the live SKU's on-hand is asked of the cloud during a catch-up.
LIVE_POLL_S = 0.01
#: The industry's "near real time" bar (issue 3): the goal for a live sale made while
#: the store catches up.
GOAL_LIVE_MS = 150.0
#: SKU sold only by the live sales of the catch-up (so the cloud's on-hand of it counts
#: how many of them it holds).
console = Console(width=None if sys.stdout.isatty() else 132)


#: What the script's own API clients trust: the CA of each store it makes (the nodes
#: serve TLS pinned to the store key, docs/security.md) and the cloud's HQ CA.
TRUST = api_client_context(b"")


@dataclass(frozen=True, slots=True)
class Sizes:
    variants: tuple[str, ...]
    idle_s: float  # idle window of the production variant (>= 1 summary period)
    idle_ablation_s: float  # idle window of the other variants
    cold_s: float  # quiet selling right after link-up (production variant only)
    quiet_rate: float  # sales/s per register
    quiet_s: float
    burst_rate: float  # sales/s per register
    burst_s: float
    catchup_n: int
    catchup_variants: tuple[str, ...]
    replay_max: int
    replay_s: float


VARIANTS = ("wan", "wan-no-pack", "wan-no-linger", "lan-path")
FULL = Sizes(variants=VARIANTS, idle_s=60.0, idle_ablation_s=10.0, cold_s=8.0,
             quiet_rate=2.5,
             quiet_s=30.0, burst_rate=100.0, burst_s=10.0, catchup_n=100_000,
             catchup_variants=("wan", "wan-no-pack", "lan-path"), replay_max=10_000,
             replay_s=25.0)
QUICK = Sizes(variants=VARIANTS, idle_s=3.0, idle_ablation_s=2.0, cold_s=6.0,
              quiet_rate=2.5, quiet_s=6.0,
              burst_rate=100.0, burst_s=2.0, catchup_n=20_000,
              catchup_variants=("wan", "lan-path"), replay_max=2_000, replay_s=5.0)

VARIANT_LABEL = {
    "wan": "storemesh WAN link",
    "wan-no-pack": "WAN, WanCodec._pack = identity",
    "wan-no-linger": "WAN, linger_s = 0",
    "lan-path": "LAN path (peers=, plain node)",
}


# --- small helpers -----------------------------------------------------------------------


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def ean13(n: int) -> str:
    body = f"400638{n:06d}"
    s = sum(int(c) * (3 if i % 2 else 1) for i, c in enumerate(body))
    return body + str((10 - s % 10) % 10)


SKUS = [ean13(133_931 + 17 * i) for i in range(N_SKUS)]
LIVE_SKU = ean13(999_001)


def iso(ms: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ms / 1000)) + f".{ms % 1000:03d}Z"


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[max(0, min(len(s) - 1, round(q / 100 * len(s) + 0.5) - 1))]


def fmt(n: float, digits: int = 0) -> str:
    return f"{n:,.{digits}f}"


def tcp_full(sock: Any) -> tuple[int, int, int, int] | None:
    """(bytes acked, bytes received, segments out, segments in) from TCP_INFO (Linux)."""
    got = tcp_bytes(sock)
    if got is None:
        return None
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256)
    except OSError:
        return None
    if len(info) < 144:
        return (*got, 0, 0)
    segs_out, segs_in = struct.unpack_from("=II", info, 136)
    return got[0], got[1], int(segs_out), int(segs_in)


def tcp_idle(sock: Any) -> bool:
    """Nothing unacknowledged (``tcpi_unacked``) and nothing unsent
    (``tcpi_notsent_bytes``) on this socket: its ``tcpi_bytes_acked`` is final."""
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256)
    except (OSError, AttributeError):
        return True
    if len(info) < 148:
        return True
    unacked = struct.unpack_from("=I", info, 24)[0]
    notsent = struct.unpack_from("=I", info, 144)[0]
    return bool(unacked == 0 and notsent == 0)


async def settle(socks: list[Any], limit_s: float = 2.0) -> None:
    """Wait (bounded) until every socket's sent bytes are acknowledged. The kernel counts
    bytes when they are acknowledged, and a receiver that has nothing to send back
    delays its ACK, so bytes sent just before a window opens would otherwise be counted
    in it (the cloud no longer answers every message with a V)."""
    deadline = time.perf_counter() + limit_s
    while not all(tcp_idle(s) for s in socks if s is not None):
        if time.perf_counter() > deadline:
            return
        await asyncio.sleep(0.005)


def rss_mb(pid: int, field_name: str = "VmRSS") -> float:
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


async def wait_until(pred: Callable[[], bool], what: str, limit_s: float = WAIT_S,
                     every: float = 0.01) -> float:
    """Poll ``pred`` until true (bounded); returns the seconds waited."""
    t0 = time.perf_counter()
    deadline = t0 + limit_s
    while not pred():
        if time.perf_counter() > deadline:
            raise TimeoutError(f"waited {limit_s:.0f} s for {what}")
        await asyncio.sleep(every)
    return time.perf_counter() - t0


@dataclass(slots=True)
class Wire:
    sent: int = 0
    recv: int = 0
    segs_out: int = 0
    segs_in: int = 0
    msg_out: int = 0  # message bytes the edge's writer sent (before the WanCodec)
    env_msgs: int = 0  # of which envelope (``E``) messages

    def __sub__(self, o: Wire) -> Wire:
        return Wire(self.sent - o.sent, self.recv - o.recv, self.segs_out - o.segs_out,
                    self.segs_in - o.segs_in, self.msg_out - o.msg_out,
                    self.env_msgs - o.env_msgs)

    @property
    def total(self) -> int:
        return self.sent + self.recv

    @property
    def with_headers(self) -> int:
        return self.total + HDR_PER_SEGMENT * (self.segs_out + self.segs_in)


# --- stores on disk ------------------------------------------------------------------------


@dataclass(slots=True)
class StoreDirs:
    store_id: str
    edge: Path
    regs: dict[str, Path]
    cloud: Path  # ROOT/<store id>, a cloud node data dir
    reg_idents: dict[str, NodeIdentity] = field(default_factory=dict)

    @property
    def cloud_id(self) -> str:
        return f"cloud-{self.store_id}"


def make_store(root: Path, cloud_root: Path, store_id: str) -> StoreDirs:
    """An edge (with the store key), two registers and the cloud, each trusting all."""
    t = now_ms()
    edge = init_store(root / store_id / "edge", store_id, now_ms=t, node_id="edge-01")
    TRUST.load_verify_locations(cadata=(edge.data_dir / "tls-ca.pem").read_text())
    assert edge.store_key is not None
    regs = {rid: enrol_node(root / store_id / rid, edge.store_key, store_id, "register",
                            now_ms=t, node_id=rid) for rid in REGISTERS}
    cloud = enrol_node(cloud_root / store_id, edge.store_key, store_id, "cloud", now_ms=t,
                       node_id=f"cloud-{store_id}")
    idents = [edge, *regs.values(), cloud]
    for a in idents:
        for b in idents:
            a.trust.add_certificate(b.certificate)
        a.save()
    return StoreDirs(store_id, edge.data_dir, {r: i.data_dir for r, i in regs.items()},
                     cloud.data_dir, regs)


# --- the cloud peer as a child process -----------------------------------------------------


class CloudProcess:
    """``python -m mesh cloud run`` on 127.0.0.1 (ephemeral port): a
    ``mesh.testing.cluster.NodeProcess``, stopped by its pid. ``plain``: instead
    ``python -m mesh node`` on one store's cloud data dir (``root``): the same identity
    and data, but an ordinary (LAN) node, for the LAN-path ablation."""

    def __init__(self, root: Path, log_path: Path, *, plain: bool = False) -> None:
        self.root = root
        self.plain = plain
        where = ["--data", str(root), "--http-host", "127.0.0.1", "--http-port", "0",
                 "--log-level", "WARNING"]
        argv = ["node", *where, "--no-discovery"] if plain else ["cloud", "run", *where]
        self.process = NodeProcess("cloud", argv, log_path, root)

    @property
    def url(self) -> str:
        return self.process.url

    @property
    def pid(self) -> int:
        return self.process.pid

    def store_url(self, store_id: str) -> str:
        """Base URL of one store's node (sync and API) in this process."""
        return self.url if self.plain else f"{self.url}/stores/{store_id}"

    async def start(self) -> None:
        """Start it (again) and wait for its URL line."""
        self.process.spawn()
        try:
            await self.process.wait_ready(CHILD_START_S)
        except ClusterError:
            self.stop()
            raise
        if not self.plain:  # its API answers with the HQ certificate
            TRUST.load_verify_locations(cafile=self.root / HQ_CA_FILE)

    def stop(self) -> None:
        if self.process.alive():
            self.process.stop()
        elif self.process.proc is not None:
            self.process.reap()


class RssSampler(threading.Thread):
    """Samples a process's VmRSS every ``SAMPLE_S`` (bounded by ``max_s``)."""

    def __init__(self, pid: int, max_s: float) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.max_s = max_s
        self.samples: list[float] = []
        self._stop_ev = threading.Event()

    def run(self) -> None:
        deadline = time.monotonic() + self.max_s
        while not self._stop_ev.wait(SAMPLE_S) and time.monotonic() < deadline:
            v = rss_mb(self.pid)
            if v == v:  # not NaN
                self.samples.append(v)

    def stop(self) -> None:
        self._stop_ev.set()
        self.join(5)


# --- the naive baseline: one JSON POST per sale ---------------------------------------------


async def start_post_server() -> tuple[web.AppRunner, str]:
    """The naive cloud API: POST /v1/stores/{store}/sales -> 201 {"id","status"}."""

    async def sales(request: web.Request) -> web.Response:
        if request.headers.get("Authorization") != f"Bearer {API_KEY}":
            return web.Response(status=401)
        doc = orjson.loads(await request.read())
        return web.Response(status=201, content_type="application/json",
                            body=orjson.dumps({"id": doc["txn_id"], "status": "created"}))

    app = web.Application()
    app.router.add_post("/v1/stores/{store}/sales", sales)
    runner = web.AppRunner(app, access_log=None, keepalive_timeout=KEEPALIVE_S)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    server = site._server
    assert server is not None
    port = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]
    return runner, f"http://127.0.0.1:{port}"


def post_body(store_id: str, rid: str, sku: str, qty: int, txn: str, at_ms: int) -> bytes:
    # Compact JSON (orjson): the baseline is counted conservatively.
    return orjson.dumps({"store_id": store_id, "register_id": rid, "sku": sku, "qty": qty,
                         "txn_id": txn, "staff_id": STAFF[rid], "ts": iso(at_ms)})


class Poster:
    """One register's POST client: its own keep-alive connection, sales in order."""

    def __init__(self, base_url: str, store_id: str) -> None:
        self.url = f"{base_url}/v1/stores/{store_id}/sales"
        #: every socket the client opened (TCPConnector's public socket_factory hook):
        #: the kernel counters are read from these
        self.sockets: list[socket.socket] = []
        # keep-alive for the whole run (aiohttp's default closes an idle connection after
        # 15 s, and a replaced socket's counters can no longer be read)
        self.http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(
            limit=1, keepalive_timeout=KEEPALIVE_S, socket_factory=self._new_socket))
        self.headers = {"Authorization": f"Bearer {API_KEY}",
                        "Content-Type": "application/json"}
        self.q: asyncio.Queue[bytes] = asyncio.Queue(maxsize=200_000)
        self.posted = 0
        self.errors = 0
        self.task = asyncio.create_task(self._run(), name="poster")

    async def _run(self) -> None:
        while True:
            body = await self.q.get()
            try:
                await self.post(body)
            except (aiohttp.ClientError, OSError, TimeoutError):
                self.errors += 1
            finally:
                self.q.task_done()

    async def post(self, body: bytes) -> None:
        async with self.http.post(self.url, data=body, headers=self.headers) as resp:
            await resp.read()
            if resp.status == 201:
                self.posted += 1
            else:
                self.errors += 1

    def _new_socket(self, addr_info: Any) -> socket.socket:
        family, type_, proto, _, _ = addr_info
        sock = socket.socket(family=family, type=type_, proto=proto)
        self.sockets.append(sock)
        return sock

    def wire(self) -> Wire:
        """Kernel counters summed over the client's sockets (a closed one reads as 0:
        ``connections`` tells whether the keep-alive connection was ever replaced)."""
        w = Wire()
        for sock in self.sockets:
            got = tcp_full(sock)
            if got is not None:
                w.sent += got[0]
                w.recv += got[1]
                w.segs_out += got[2]
                w.segs_in += got[3]
        return w

    async def drain(self) -> None:
        await asyncio.wait_for(self.q.join(), WAIT_S)

    async def close(self) -> None:
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(self.task, WAIT_S)
        await self.http.close()


def wire_sum(posters: list[Poster]) -> Wire:
    w = Wire()
    for p in posters:
        x = p.wire()
        w.sent += x.sent
        w.recv += x.recv
        w.segs_out += x.segs_out
        w.segs_in += x.segs_in
    return w


# --- outside switches for the ablation variants ---------------------------------------------


def _pack_identity(self: transport.WanCodec, data: bytes) -> bytes:
    """``WanCodec._pack`` switched off: ``E`` batches go into the zlib stream as they are
    (every ``prev`` and hex signature kept); the receiver's ``decode`` passes ``E`` on."""
    return data


@contextlib.contextmanager
def variant_patches(variant: str) -> Iterator[None]:
    """Patch this process's transport for an ablation. The cloud is a child process
    running unpatched code, so each patch acts on the edge's side only; and both patch
    what the edge *sends* (its codec's packing, its writer's linger)."""
    saved_pack, saved_dial = transport.WanCodec._pack, transport.dial
    if variant == "wan-no-pack":
        transport.WanCodec._pack = _pack_identity  # type: ignore[method-assign]
    elif variant == "wan-no-linger":
        async def dial(*args: Any, **kwargs: Any) -> transport.Session:
            session = await saved_dial(*args, **kwargs)
            session.linger_s = 0.0  # read by the writer each time; .wan and .codec stay
            return session
        transport.dial = dial
    try:
        yield
    finally:
        transport.WanCodec._pack = saved_pack  # type: ignore[method-assign]
        transport.dial = saved_dial


class CloudApi:
    """The cloud's own HTTP API for one store, on a connection of its own (not counted):
    what the cloud really holds, independent of what the edge has been told."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30),
                                          connector=aiohttp.TCPConnector(ssl=TRUST))

    async def envelopes(self) -> int:
        """Rows in the cloud's durable ledger for this store."""
        async with self.http.get(f"{self.url}/v1/health") as r:
            return int((await r.json())["envelopes"])

    async def on_hand(self, sku: str) -> int | None:
        async with self.http.get(f"{self.url}/v1/stock/{sku}") as r:
            if r.status == 404:
                return None
            return int((await r.json())["on_hand"])

    async def close(self) -> None:
        await self.http.close()


def held_by_edge(edge: Node) -> int:
    """Envelopes applied at the edge (each origin's seqs are contiguous from 1)."""
    return sum(seq for _, seq in edge.replica.vv.items())


def watch_inflight(core: Any, peer_id: str, peak: list[int]) -> None:
    """Keep ``peak[0]`` = the highest ``inflight()`` toward ``peer_id``, checked after
    every call into the edge's ``SyncCore`` that can raise it (exact, not sampled)."""
    def wrap(name: str) -> None:
        fn = getattr(core, name)

        def wrapped(*args: Any, **kwargs: Any) -> Any:
            out = fn(*args, **kwargs)
            p = core.peers.get(peer_id)
            if p is not None:
                n = p.inflight()
                if n > peak[0]:
                    peak[0] = n
            return out
        setattr(core, name, wrapped)

    for name in ("peer_up", "receive", "durable", "fetched", "on_timer"):
        wrap(name)


# --- section 1: bytes per sale ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Sale:
    at: float
    sku: str
    qty: int


def make_schedule(seed: int, rate: float, seconds: float) -> list[Sale]:
    """Poisson arrivals at ``rate``/s for ``seconds``; skewed SKU picks (bounded list)."""
    rng = random.Random(seed)
    out: list[Sale] = []
    t = 0.0
    limit = int(rate * seconds * 3) + 10
    while len(out) < limit:
        t += rng.expovariate(rate)
        if t >= seconds:
            break
        out.append(Sale(t, SKUS[int(N_SKUS * rng.random() ** 3)],
                        rng.choice((1, 1, 1, 1, 1, 2, 3))))
    return out


def _sell(r: Replica, *, sku: str, qty: int, txn: str, staff: str | None,
          at: int) -> CommandResult:
    return r.sell(sku, qty, txn=txn, staff=staff, now_ms=at)


def _receive(r: Replica, *, sku: str, qty: int, txn: str, at: int) -> CommandResult:
    return r.receive(sku, qty, txn=txn, now_ms=at)


@dataclass
class Rig:
    """One store running in this process, linked to the cloud child."""

    dirs: StoreDirs
    variant: str
    edge: Node
    regs: dict[str, Node]
    api: CloudApi
    txn_no: dict[str, int] = field(default_factory=dict)
    sessions_seen: set[int] = field(default_factory=set)
    msg_out: int = 0
    env_msgs: int = 0
    vv_mark: int = 0  # the edge's next_vv for the cloud once both registers were up

    @property
    def wan(self) -> bool:
        return self.variant != "lan-path"

    def session(self) -> transport.Session | None:
        s = self.edge.sessions.get(self.dirs.cloud_id)
        if s is not None and id(s) not in self.sessions_seen:
            self.sessions_seen.add(id(s))
            self._count_messages(s)
        return s

    def _count_messages(self, s: transport.Session) -> None:
        """Count what the edge's writer sends to the cloud, before the codec (counters
        only, no copies): the WanCodec's input on WAN sessions, else the WebSocket's."""

        def count(data: bytes) -> None:
            self.msg_out += len(data)
            if data[:1] == b"E":
                self.env_msgs += 1

        if s.codec is not None:
            encode = s.codec.encode

            def encode_counted(msg: bytes) -> bytes:
                count(msg)
                return encode(msg)

            s.codec.encode = encode_counted  # type: ignore[method-assign]
        else:
            send = s.ws.send_bytes

            async def send_counted(data: bytes, *args: Any, **kwargs: Any) -> None:
                count(data)
                await send(data, *args, **kwargs)

            s.ws.send_bytes = send_counted  # type: ignore[method-assign]

    def sockets(self, posters: dict[str, Poster] | None = None) -> list[Any]:
        """The edge's cloud socket and the baseline's sockets."""
        s = self.session()
        out: list[Any] = [s.sock if s is not None else None]
        for p in (posters or {}).values():
            out.extend(p.sockets)
        return out

    def wire(self) -> Wire:
        s = self.session()
        if s is None:
            raise RuntimeError("the edge's cloud session is down")
        full = tcp_full(s.sock) or (0, 0, 0, 0)
        if self.wan:
            sent, recv = self.edge.wan_bytes()  # the figure the node exports
        else:
            sent, recv = full[0], full[1]  # LAN sessions are not in wan_bytes()
        return Wire(sent, recv, full[2], full[3], self.msg_out, self.env_msgs)

    async def current(self) -> bool:
        """The edge holds every register's sales, and the cloud's durable ledger holds
        as many envelopes as the edge has applied (asked on the cloud's API)."""
        e = self.edge
        for rid, reg in self.regs.items():
            if e.replica.vv.get(rid) < reg.replica.vv.get(rid):
                return False
        try:
            return await self.api.envelopes() >= held_by_edge(e)
        except (aiohttp.ClientError, OSError, TimeoutError):
            return False


async def wait_current(rig: Rig, what: str) -> float:
    t0 = time.perf_counter()
    while not await rig.current():
        if time.perf_counter() - t0 > WAIT_S:
            raise TimeoutError(f"waited {WAIT_S:.0f} s for {what}")
        await asyncio.sleep(POLL_S)
    return time.perf_counter() - t0


async def wait_links_known(rig: Rig) -> float:
    """Wait until the edge has sent the cloud a V written while both register sessions
    were up (so the cloud knows the edge gets their envelopes from them: steady state).
    The edge sends one every SYNC_WAN_INTERVAL_MS (+-25 %) on a WAN link, 1 s on a LAN
    one; nothing here makes it send one sooner."""
    t0 = time.perf_counter()
    peer = rig.edge.core.peers.get(rig.dirs.cloud_id)
    assert peer is not None
    first = rig.vv_mark
    limit = config.SYNC_WAN_INTERVAL_MS / 1000 * 1.25 + 5
    await wait_until(lambda: rig.edge.core.peers.get(rig.dirs.cloud_id) is not peer
                     or peer.next_vv != first, "the edge's next V to the cloud", limit, 0.05)
    await asyncio.sleep(0.2)  # and the cloud has read it
    return time.perf_counter() - t0


async def start_rig(dirs: StoreDirs, variant: str, store_url: str) -> Rig:
    if variant == "lan-path":
        edge = Node(dirs.edge, peers=[store_url], discovery=False, advertise=False)
    else:
        edge = Node(dirs.edge, wan_peers=[store_url], discovery=False, advertise=False)
    await edge.start()
    regs: dict[str, Node] = {}
    try:
        for rid, d in dirs.regs.items():
            regs[rid] = Node(d, peers=[edge.url], discovery=False, advertise=False)
            await regs[rid].start()
    except BaseException:
        for n in (*regs.values(), edge):
            await n.close()
        raise
    rig = Rig(dirs, variant, edge, regs, CloudApi(store_url), {rid: 0 for rid in regs})
    await wait_until(lambda: dirs.cloud_id in edge.sessions
                     and all(rid in edge.sessions for rid in regs), "sessions up")
    rig.session()
    peer = edge.core.peers.get(dirs.cloud_id)
    assert peer is not None
    rig.vv_mark = peer.next_vv
    t = now_ms()
    for i, sku in enumerate(SKUS):
        await asyncio.wait_for(edge.execute(partial(_receive, sku=sku, qty=RECEIPT_QTY,
                                                    txn=f"rx-{i}", at=t)), WAIT_S)
    await wait_until(lambda: all(r.replica.knows_sku(s) for r in regs.values() for s in SKUS),
                     "receipts at the registers")
    await wait_current(rig, "receipts at the cloud")
    return rig


async def close_rig(rig: Rig) -> None:
    for n in (*rig.regs.values(), rig.edge):
        await asyncio.wait_for(n.close(), WAIT_S)
    await rig.api.close()


async def sell_loop(rig: Rig, rid: str, sales: list[Sale], t0: float, deadline: float,
                    poster: Poster | None) -> tuple[int, int]:
    """Sell on register ``rid`` at the scheduled times, open loop (a sale is issued when
    it is due even if the previous one is not durable yet: the register stands in for a
    bank of tills); returns (sold, skipped)."""
    loop = asyncio.get_running_loop()
    reg = rig.regs[rid]
    pending: set[asyncio.Future[CommandResult]] = set()
    issued = 0
    for s in sales:
        now = loop.time()
        if now > deadline:
            break
        if t0 + s.at > now:
            await asyncio.sleep(t0 + s.at - now)
        rig.txn_no[rid] += 1
        txn = f"{rid}-{rig.txn_no[rid]:06d}"
        at = now_ms()
        fut = asyncio.ensure_future(reg.execute(partial(_sell, sku=s.sku, qty=s.qty, txn=txn,
                                                        staff=STAFF[rid], at=at)))
        pending.add(fut)
        fut.add_done_callback(pending.discard)
        if poster is not None:
            poster.q.put_nowait(post_body(rig.dirs.store_id, rid, s.sku, s.qty, txn, at))
        issued += 1
        if len(pending) >= MAX_OUTSTANDING_SALES:
            await asyncio.wait_for(asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED),
                                   WAIT_S)
    if pending:
        await asyncio.wait_for(asyncio.gather(*pending), WAIT_S)
    return issued, len(sales) - issued

#!/usr/bin/env python3
"""Benchmark of the cloud WAN link: bytes per sale, and catch-up after an outage.

Two sections, each bounded in count and in time, each with a baseline measured in the
same run (the machine is shared, so compare ratios, not absolute numbers):

1. **Bytes per sale on the WAN link.** A store (an edge ``Node`` and two register
   ``Node``s, in this process) sells on a Poisson schedule: a quiet store (2 registers
   x 2.5 sales/s) and a busy burst (~200 sales/s). The registers push to the edge over
   the LAN, and the edge relays to a cloud peer (``storemesh cloud run``, a child
   process) over its WAN link. The cost is the kernel's count of TCP payload bytes on
   the edge's cloud socket (``Node.wan_bytes()``: TCP_INFO, both directions) per sale.
   A window ends when the cloud's own API (``/v1/health``, on a separate connection
   that is not counted) shows it holds every envelope the edge holds.
   The baseline runs side by side with the same sales: each register POSTs each sale to
   a cloud API as its own JSON request over a keep-alive HTTP/1.1 connection (aiohttp
   client -> aiohttp server on 127.0.0.1 that answers 201 with a small JSON body), with
   an ``Authorization: Bearer`` header. The baseline is counted the same way
   (``tcp_bytes`` on the client socket). An idle window gives the link's fixed cost.
   Variants switched from the outside show what each WAN measure buys:

   * ``wan``: the production link (``Node(wan_peers=...)``: ``WanCodec`` = session-wide
     prev elision + raw signatures + one zlib level-9 stream per direction, 50 ms linger);
   * ``wan-no-pack``: ``WanCodec._pack`` patched to return its input (no prev elision,
     hex signatures; the zlib stream stays);
   * ``wan-no-linger``: the edge's WAN session gets ``linger_s = 0`` after the dial
     (``config.WAN_LINGER_S = 0`` cannot be used: ``Session.wan`` is ``linger_s > 0``,
     so it would switch the codec off too);
   * ``lan-path``: ``Node(peers=...)`` against the cloud's store data dir run as a plain
     ``storemesh node`` child (no codec, no linger, 1 s summaries on either side). The
     cloud peer itself cannot be used: it makes every session a WAN session, and a
     dialer that did not ask for WAN does not adopt it, so the session fails.

   The patches are made in this process, so they change the **edge's sending side
   only** (edge -> cloud, the direction that carries the sales); the cloud child
   always runs the production code.
2. **Catch-up after an outage.** The edge's ledger grows by N sales (default 100,000,
   from two registers) while the cloud is not connected; then the link comes up. It is
   timed until the cloud holds the whole backlog (the cloud's ``/v1/health`` ledger
   rows minus the live sales it applied, polled), with the wire bytes it took, the
   cloud process's RSS sampled every 50 ms, the edge's in-flight window (its exact
   peak: checked after every call into the edge's ``SyncCore``), a live sale of a
   dedicated SKU made at the edge every 100 ms during the catch-up (latency until the
   cloud's ``/v1/stock`` shows it applied, polled every 10 ms by a task of its own),
   and a check that nothing is lost
   (same ledger size and same on-hand for every SKU at the cloud, also after
   restarting the cloud from its disk). Baseline: the naive
   design's offline queue replayed as one POST per sale (a sample, time bounded,
   extrapolated to N).

Usage::

    .venv/bin/python scripts/bench_cloud.py --quick          # smoke run, ~2 min
    .venv/bin/python scripts/bench_cloud.py                  # full sizes, ~8 min
    .venv/bin/python scripts/bench_cloud.py --json out.json  # also dump the numbers
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import queue
import random
import secrets
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from aiohttp import web
from benchkit import (  # scripts/ is on sys.path when run as a script
    common_args,
    print_summary,
    run_dir,
)
from rich.console import Console
from rich.table import Table

from mesh import config, transport
from mesh.datadir import NodeIdentity, enrol_node, init_store
from mesh.durable import DurableReplica
from mesh.envelope import Envelope
from mesh.hqtls import CA_FILE as HQ_CA_FILE
from mesh.node import Node
from mesh.replica import CommandResult, Replica
from mesh.tls import api_client_context
from mesh.transport import tcp_bytes

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
CHILD_STOP_S = 15.0
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
    """``python -m mesh cloud run`` on 127.0.0.1 (ephemeral port); stopped by its pid.
    ``plain``: instead ``python -m mesh node`` on one store's cloud data dir (``root``):
    the same identity and data, but an ordinary (LAN) node, for the LAN-path ablation."""

    def __init__(self, root: Path, log_path: Path, *, plain: bool = False) -> None:
        self.root = root
        self.log_path = log_path
        self.plain = plain
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = ""

    def store_url(self, store_id: str) -> str:
        """Base URL of one store's node (sync and API) in this process."""
        return self.url if self.plain else f"{self.url}/stores/{store_id}"

    def start(self) -> None:
        if self.plain:
            cmd = [sys.executable, "-m", "mesh", "node", "--data", str(self.root),
                   "--http-host", "127.0.0.1", "--http-port", "0", "--no-discovery",
                   "--log-level", "WARNING"]
        else:
            cmd = [sys.executable, "-m", "mesh", "cloud", "run", "--data", str(self.root),
                   "--http-host", "127.0.0.1", "--http-port", "0", "--log-level", "WARNING"]
        log = open(self.log_path, "ab")
        try:
            self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log,
                                         stdin=subprocess.DEVNULL)
        finally:
            log.close()
        lines: queue.Queue[bytes] = queue.Queue()
        stdout = self.proc.stdout
        assert stdout is not None

        def pump() -> None:
            for line in stdout:
                lines.put(line)

        threading.Thread(target=pump, daemon=True).start()
        deadline = time.monotonic() + CHILD_START_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            try:
                line = lines.get(timeout=0.2).decode(errors="replace")
            except queue.Empty:
                continue
            if "listening on " in line:
                self.url = line.rsplit("listening on ", 1)[1].strip()
                if not self.plain:  # its API answers with the HQ certificate
                    TRUST.load_verify_locations(cafile=self.root / HQ_CA_FILE)
                return
        tail = self.log_path.read_text(errors="replace")[-3000:]
        self.stop()
        raise RuntimeError(f"cloud peer did not start within {CHILD_START_S:.0f} s:\n{tail}")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(CHILD_STOP_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(CHILD_STOP_S)


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


async def run_phase(rig: Rig, name: str, rate: float, seconds: float, seed: int,
                    posters: dict[str, Poster] | None) -> dict[str, Any]:
    """One measured window. ``rate`` 0 = idle. The window ends once the cloud holds
    every sale (its API says so) and the baseline's last response has arrived."""
    loop = asyncio.get_running_loop()
    schedules = {rid: make_schedule(seed + i, rate, seconds) if rate else []
                 for i, rid in enumerate(rig.regs)}
    await settle(rig.sockets(posters))
    w0 = rig.wire()
    b0 = wire_sum(list(posters.values())) if posters else Wire()
    t0 = loop.time()
    deadline = t0 + seconds * 3 + 10
    if rate:
        results = await asyncio.gather(*(sell_loop(rig, rid, schedules[rid], t0, deadline,
                                                   posters.get(rid) if posters else None)
                                          for rid in rig.regs))
    else:
        await asyncio.sleep(seconds)
        results = []
    sold = sum(r[0] for r in results)
    skipped = sum(r[1] for r in results)
    t_sold = loop.time() - t0
    await wait_current(rig, f"{name}: cloud current")
    if posters:
        for p in posters.values():
            await p.drain()
    elapsed = loop.time() - t0
    await settle(rig.sockets(posters))
    w = rig.wire() - w0
    out: dict[str, Any] = {"phase": name, "sales": sold, "skipped": skipped,
                           "seconds": elapsed, "selling_seconds": t_sold,
                           "rate": sold / t_sold if t_sold and sold else 0.0,
                           "wire": asdict(w), "bytes": w.total,
                           "bytes_per_s": w.total / elapsed,
                           "bytes_per_sale": w.total / sold if sold else None,
                           "with_headers_per_sale": w.with_headers / sold if sold else None,
                           "segments_per_sale": (w.segs_out + w.segs_in) / sold if sold else None,
                           "precodec_out_per_sale": w.msg_out / sold if sold else None,
                           "sales_per_env_msg": sold / w.env_msgs if w.env_msgs else None}
    if posters:
        b = wire_sum(list(posters.values())) - b0
        out["baseline"] = {"wire": asdict(b), "bytes": b.total,
                           "bytes_per_sale": b.total / sold if sold else None,
                           "with_headers_per_sale": b.with_headers / sold if sold else None,
                           "segments_per_sale": (b.segs_out + b.segs_in) / sold if sold else None,
                           "errors": sum(p.errors for p in posters.values()),
                           "connections": sum(len(p.sockets) for p in posters.values())}
    return out


def section_bytes(root: Path, sz: Sizes) -> dict[str, Any]:
    cloud_root = root / "cloud-1"
    cloud_root.mkdir(parents=True)
    lan_root = root / "cloud-lan"
    lan_root.mkdir(parents=True)
    stores = {v: make_store(root / "stores", lan_root if v == "lan-path" else cloud_root,
                            f"store-0042-{i}") for i, v in enumerate(sz.variants)}
    clouds: dict[str, CloudProcess] = {}
    try:
        clouds["wan"] = CloudProcess(cloud_root, root / "cloud-1.log")
        clouds["wan"].start()
        if "lan-path" in stores:
            clouds["lan-path"] = CloudProcess(stores["lan-path"].cloud, root / "cloud-lan.log",
                                              plain=True)
            clouds["lan-path"].start()
        return asyncio.run(_section_bytes(clouds, stores, sz))
    finally:
        for c in clouds.values():
            c.stop()


async def _section_bytes(clouds: dict[str, CloudProcess], stores: dict[str, StoreDirs],
                         sz: Sizes) -> dict[str, Any]:
    runner, api_url = await start_post_server()
    out: dict[str, Any] = {"variants": {}, "cloud_url": clouds["wan"].url}
    try:
        for variant, dirs in stores.items():
            cloud = clouds["lan-path" if variant == "lan-path" else "wan"]
            with variant_patches(variant):
                rig = await start_rig(dirs, variant, cloud.store_url(dirs.store_id))
                posters = ({rid: Poster(api_url, dirs.store_id) for rid in rig.regs}
                           if variant == "wan" else None)
                try:
                    phases = []
                    if variant == "wan":
                        # Right after link-up the cloud does not yet know that the edge
                        # has sessions with the registers (the edge's first V went before
                        # they were up; the next one is SYNC_WAN_INTERVAL_MS away). Until
                        # 8440f68 the cloud then sent every register sale back: what
                        # does a sale cost then?
                        phases.append(await run_phase(rig, "cold", sz.quiet_rate,
                                                      sz.cold_s, 50, posters))
                    res_pre: dict[str, Any] = {"echo_duplicates": rig.edge.core.stats.get(
                        "duplicate", 0)}
                    res_pre["links_wait_s"] = await wait_links_known(rig)
                    idle_s = sz.idle_s if variant == "wan" else sz.idle_ablation_s
                    phases += [
                        await run_phase(rig, "idle", 0.0, idle_s, 0, posters),
                        await run_phase(rig, "quiet", sz.quiet_rate, sz.quiet_s, 100, posters),
                        await run_phase(rig, "burst", sz.burst_rate, sz.burst_s, 200, posters),
                    ]
                    res: dict[str, Any] = {p["phase"]: p for p in phases}
                    res.update(res_pre)
                    res["session_restarts"] = len(rig.sessions_seen) - 1
                    res["rejected"] = dict(rig.edge.core.stats)
                    out["variants"][variant] = res
                    console.print(f"  {variant}: quiet {res['quiet']['bytes_per_sale']:.0f} "
                                  f"B/sale, burst {res['burst']['bytes_per_sale']:.0f} B/sale, "
                                  f"idle {res['idle']['bytes_per_s']:.1f} B/s")
                finally:
                    if posters:
                        for p in posters.values():
                            await p.close()
                    await close_rig(rig)
    finally:
        await runner.cleanup()
    print_bytes(out, sz)
    return out


def print_bytes(out: dict[str, Any], sz: Sizes) -> None:
    v = out["variants"]
    base = v["wan"]
    t = Table(title="1. Bytes per sale on the edge's cloud link (TCP payload, both directions,"
                    " kernel TCP_INFO)")
    for col in ("design", "quiet B/sale", "x POST", "burst B/sale", "x POST", "idle B/s",
                "quiet +hdr", "burst +hdr", "quiet seg/sale", "sales/msg q/b",
                "burst pre-codec"):
        t.add_column(col, justify="right")
    bq = base["quiet"]["baseline"]["bytes_per_sale"]
    bb = base["burst"]["baseline"]["bytes_per_sale"]
    t.add_row("naive POST per sale", fmt(bq), "1.00", fmt(bb), "1.00", "0",
              fmt(base["quiet"]["baseline"]["with_headers_per_sale"]),
              fmt(base["burst"]["baseline"]["with_headers_per_sale"]),
              f"{base['quiet']['baseline']['segments_per_sale']:.2f}", "1 / 1", "")
    for name, r in v.items():
        q, b = r["quiet"], r["burst"]
        t.add_row(VARIANT_LABEL[name], fmt(q["bytes_per_sale"]), f"{q['bytes_per_sale'] / bq:.2f}",
                  fmt(b["bytes_per_sale"]), f"{b['bytes_per_sale'] / bb:.2f}",
                  fmt(r["idle"]["bytes_per_s"], 1), fmt(q["with_headers_per_sale"]),
                  fmt(b["with_headers_per_sale"]), f"{q['segments_per_sale']:.2f}",
                  f"{q['sales_per_env_msg'] or 0:.2f} / {b['sales_per_env_msg'] or 0:.1f}",
                  fmt(b["precodec_out_per_sale"]))
    console.print(t)
    q, b = base["quiet"], base["burst"]
    console.print(f"  quiet: {q['sales']} sales at {q['rate']:.1f}/s over {q['seconds']:.1f} s; "
                  f"burst: {b['sales']} sales at {b['rate']:.0f}/s; baseline errors "
                  f"{q['baseline']['errors'] + b['baseline']['errors']}, connections "
                  f"{b['baseline']['connections']}; session restarts "
                  f"{sum(r['session_restarts'] for r in v.values())}")
    if "cold" in base:
        c = base["cold"]
        console.print(f"  cold start (selling at the quiet rate right after link-up, {c['sales']} "
                      f"sales): {c['bytes_per_sale']:.0f} B/sale vs "
                      f"{c['baseline']['bytes_per_sale']:.0f} for the POSTs; sent/received "
                      f"{c['wire']['sent'] / c['sales']:.1f}/"
                      f"{c['wire']['recv'] / c['sales']:.1f} B/sale; envelopes the cloud sent back "
                      f"(edge 'duplicate') {base['echo_duplicates']}; then "
                      f"{base['links_wait_s']:.1f} s until the edge's next V")
    for name, r in v.items():
        q, b = r["quiet"], r["burst"]
        qs, qr = q["wire"]["sent"] / q["sales"], q["wire"]["recv"] / q["sales"]
        bs, br = b["wire"]["sent"] / b["sales"], b["wire"]["recv"] / b["sales"]
        console.print(f"  {name}: sent/received per sale: quiet {qs:.1f}/{qr:.1f} B, "
                      f"burst {bs:.1f}/{br:.1f} B; rejected {r['rejected'] or 'none'}")


# --- section 2: catch-up ------------------------------------------------------------------------


def generate_backlog(dirs: StoreDirs, n: int, seed: int, keep_bodies: int) -> dict[str, Any]:
    """While the cloud is away: the edge receives stock, then two registers sell ``n``
    times; their envelopes land in the edge's ledger in HLC order (applied, as the edge
    would have applied them; persisted in batches of 1,000, at most 8 in flight)."""
    t0 = time.perf_counter()
    dr = DurableReplica.open(dirs.edge)
    rng = random.Random(seed)
    bodies: list[bytes] = []
    try:
        receipts: list[Envelope] = []
        futs: list[Future[int]] = []
        for i, sku in enumerate([*SKUS, LIVE_SKU]):
            res, fut = dr.execute(partial(_receive, sku=sku, qty=RECEIPT_QTY, txn=f"rx-{i}",
                                          at=now_ms()))
            assert res.envelope is not None
            receipts.append(res.envelope)
            futs.append(fut)
        regs = {}
        for rid, ident in dirs.reg_idents.items():
            regs[rid] = Replica(dirs.store_id, rid, "register", ident.key)
            for env in receipts:
                regs[rid].apply(env, None)
        in_flight: deque[Future[int]] = deque(futs)
        batch: list[Envelope] = []
        nbytes = 0
        for i in range(n):
            rid = REGISTERS[i % len(REGISTERS)] if rng.random() < 0.9 else rng.choice(REGISTERS)
            sku = SKUS[int(N_SKUS * rng.random() ** 3)]
            qty = rng.choice((1, 1, 1, 1, 1, 2, 3))
            txn = f"{rid}-{i + 1:07d}"
            at = now_ms()
            sold = regs[rid].sell(sku, qty, txn=txn, staff=STAFF[rid], now_ms=at).envelope
            assert sold is not None
            env = sold
            nbytes += len(env.raw)
            batch.extend(dr.replica.apply(env, None, check_skew=False))
            if len(bodies) < keep_bodies:
                bodies.append(post_body(dirs.store_id, rid, sku, qty, txn, at))
            if len(batch) >= 1_000:
                in_flight.append(dr.persist(batch))
                batch = []
                while len(in_flight) > 8:
                    in_flight.popleft().result(timeout=WAIT_S)
        if batch:
            in_flight.append(dr.persist(batch))
        for fut in in_flight:
            fut.result(timeout=WAIT_S)
        count = dr.ledger.count()
    finally:
        dr.close()
    secs = time.perf_counter() - t0
    return {"sales": n, "envelopes": count, "seconds": secs, "per_s": n / secs,
            "mean_envelope_bytes": nbytes / n, "bodies": bodies}


async def _cloud_state(http: aiohttp.ClientSession, url: str) -> tuple[int, dict[str, int]]:
    async with http.get(f"{url}/v1/health") as r:
        envelopes = int((await r.json())["envelopes"])
    stock: dict[str, int] = {}
    after: str | None = None
    for _ in range(100):  # pages of 10,000 SKUs: bounded
        q = f"?limit=10000{'&after=' + after if after else ''}"
        async with http.get(f"{url}/v1/stock{q}") as r:
            doc = await r.json()
        stock.update({s["sku"]: s["on_hand"] for s in doc["stock"]})
        after = doc["next"]
        if after is None:
            break
    return envelopes, stock


async def _wait_cloud(http: aiohttp.ClientSession, url: str,
                      envelopes: int) -> tuple[int, dict[str, int], float]:
    """Poll the cloud's API until its durable ledger holds ``envelopes`` (bounded)."""
    t0 = time.perf_counter()
    got, stock = -1, dict[str, int]()
    while time.perf_counter() - t0 < WAIT_S:
        with contextlib.suppress(aiohttp.ClientError, OSError, TimeoutError):
            got, stock = await _cloud_state(http, url)
            if got >= envelopes:
                break
        await asyncio.sleep(0.1)
    return got, stock, time.perf_counter() - t0


async def _poll_backlog(api: CloudApi) -> tuple[int, float]:
    """One poll: (backlog envelopes the cloud holds durably, at least; when the answer
    arrived); -1 on error. Ledger rows first, then the live SKU's on-hand: live sales
    applied by then are >= those durable when the rows were counted, so rows minus
    them never overstates the backlog held (the clock never stops early)."""
    try:
        rows = await api.envelopes()
        on_hand = await api.on_hand(LIVE_SKU)
    except (aiohttp.ClientError, OSError, TimeoutError):
        return -1, time.perf_counter()
    live = RECEIPT_QTY - on_hand if on_hand is not None else 0
    return rows - live, time.perf_counter()


class LivePoller:
    """When the cloud holds the k-th live sale of ``sku``: a task of its own asks the
    cloud's ``/v1/stock/{sku}`` every ``LIVE_POLL_S`` (its on-hand falls by one per
    live sale the cloud has applied) and timestamps each answer. A live sale is timed at
    the first answer that shows it: an upper bound, by at most one poll interval plus
    the time the busy cloud takes to answer (``rtt`` keeps those round trips). (The
    ``/v1/events`` stream cannot serve here: it carries one event per envelope, so a
    2,000-envelope backlog page overflows a subscriber's queue and drops it.)"""

    def __init__(self, api: CloudApi, sku: str) -> None:
        self.api = api
        self.sku = sku
        self.held = 0
        self.times: list[float] = []  # times[k - 1]: when the k-th was first seen
        self.rtt: list[float] = []
        self.failed: str | None = None
        self.task = asyncio.create_task(self._run())

    def held_at(self, k: int) -> float | None:
        return self.times[k - 1] if k <= len(self.times) else None

    async def _run(self) -> None:
        errors = 0
        while True:
            t0 = time.perf_counter()
            try:
                on_hand = await self.api.on_hand(self.sku)
            except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                errors += 1
                if errors > 100:
                    self.failed = repr(exc)
                    return
                on_hand = None
            now = time.perf_counter()
            self.rtt.append(now - t0)
            if on_hand is not None:
                held = RECEIPT_QTY - on_hand
                while len(self.times) < held:
                    self.times.append(now)
                self.held = max(self.held, held)
            await asyncio.sleep(LIVE_POLL_S)

    async def close(self) -> None:
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task


async def catchup_variant(variant: str, template: StoreDirs, work: Path, n: int,
                          restart: bool) -> dict[str, Any]:
    with variant_patches(variant):
        return await _catchup_variant(variant, template, work, n, restart)


async def _catchup_variant(variant: str, template: StoreDirs, work: Path, n: int,
                           restart: bool) -> dict[str, Any]:
    plain = variant == "lan-path"
    edge_dir = work / f"edge-{variant}"
    shutil.copytree(template.edge, edge_dir)
    cloud_root = work / f"cloud-{variant}"
    shutil.copytree(template.cloud, cloud_root / template.store_id)
    # Every variant starts with nothing dirty in the page cache: the backlog and these
    # copies (~100 MB for 100,000 sales) would otherwise be written back during the
    # first variant's catch-up, against the cloud's fsyncs.
    await asyncio.to_thread(os.sync)
    cloud = CloudProcess(cloud_root / template.store_id if plain else cloud_root,
                         work / f"cloud-{variant}.log", plain=plain)
    cloud.start()
    api = CloudApi(cloud.store_url(template.store_id))
    out: dict[str, Any] = {"variant": variant}
    edge: Node | None = None
    sampler: RssSampler | None = None
    stream: LivePoller | None = None
    poller: asyncio.Future[tuple[int, float]] | None = None
    try:
        await asyncio.sleep(0.5)
        out["cloud_rss_idle_mb"] = rss_mb(cloud.pid)
        stream = LivePoller(api, LIVE_SKU)
        url_kw = {"peers": [api.url]} if plain else {"wan_peers": [api.url]}
        edge = Node(edge_dir, discovery=False, advertise=False, **url_kw)  # type: ignore[arg-type]
        t_open = time.perf_counter()
        await edge.start()  # rebuilds the edge's state (not part of the catch-up time)
        out["edge_open_s"] = time.perf_counter() - t_open
        cloud_id = template.cloud_id
        peak = [0]
        watch_inflight(edge.core, cloud_id, peak)  # before the dialer's first step runs
        backlog = held_by_edge(edge)  # what the cloud must receive; it holds nothing yet
        sampler = RssSampler(cloud.pid, max_s=WAIT_S * 10)
        sampler.start()
        t_link = time.perf_counter()  # the dialer task starts now: the link comes up
        t_session: float | None = None
        t_backlog: float | None = None
        wire_at_backlog: tuple[int, int, int] = (0, 0, 0)
        sessions: set[int] = set()
        max_queued = 0
        live_made: list[float] = []  # when the k-th live sale was durable at the edge
        live_ahead: list[int] = []  # the edge's in-flight toward the cloud just then
        live_lat: list[float] = []
        next_live = t_link + LIVE_SALE_EVERY_S
        deadline = t_link + WAIT_S * 10
        state = {"envelopes": -1, "polls": 0}
        while t_backlog is None or len(live_lat) < len(live_made):
            now = time.perf_counter()
            if now > deadline:
                raise TimeoutError(f"catch-up ({variant}) not done after {WAIT_S * 10:.0f} s")
            if stream.failed:
                raise RuntimeError(f"polling the cloud's stock failed: {stream.failed}")
            s = edge.sessions.get(cloud_id)
            if s is not None:
                sessions.add(id(s))
                if t_session is None:
                    t_session = now
                max_queued = max(max_queued, s.queued())
            if t_backlog is None and now >= next_live:  # a live sale at the edge, every 100 ms
                next_live += LIVE_SALE_EVERY_S
                await asyncio.wait_for(edge.execute(partial(
                    _sell, sku=LIVE_SKU, qty=1, txn=f"live-{variant}-{len(live_made) + 1}",
                    staff="st-001", at=now_ms())), WAIT_S)
                live_made.append(time.perf_counter())
                peer = edge.core.peers.get(cloud_id)
                live_ahead.append(peer.inflight() if peer is not None else -1)
            while len(live_lat) < len(live_made) and stream.held_at(len(live_lat) + 1):
                k = len(live_lat)
                live_lat.append(stream.held_at(k + 1) - live_made[k])  # type: ignore[operator]
            if poller is None or poller.done():
                if poller is not None:
                    got, seen = poller.result()
                    state["polls"] += 1
                    if t_backlog is None and got >= backlog:
                        t_backlog = seen
                        if s is not None:
                            await settle([s.sock])
                            full = tcp_full(s.sock) or (0, 0, 0, 0)
                            sent, recv = (full[0], full[1]) if plain else edge.wan_bytes()
                            wire_at_backlog = (sent, recv, full[2] + full[3])
                if t_backlog is None:
                    poller = asyncio.ensure_future(_poll_backlog(api))
            await asyncio.sleep(POLL_S)
        polls = state["polls"]
        sampler.stop()
        t_all_live = time.perf_counter()
        # The edge learns that the cloud is current from the cloud's next V: after 500
        # more envelopes, or its periodic summary (SYNC_WAN_INTERVAL_MS on WAN links).
        edge_ack_s: float | None = None
        t_ack0 = time.perf_counter()
        while time.perf_counter() - t_ack0 < config.SYNC_WAN_INTERVAL_MS / 1000 * 1.25 + 5:
            if edge.core.is_up(cloud_id) and edge.core.lag(cloud_id) == 0:
                edge_ack_s = time.perf_counter() - t_backlog
                break
            await asyncio.sleep(0.05)
        sent, recv, segs = wire_at_backlog
        edge_count = edge.durable.ledger.last_id
        expected = {sku: edge.replica.on_hand(sku) for sku in edge.replica.skus()}
        got, stock, _ = await _wait_cloud(api.http, api.url, edge_count)
        seconds = t_backlog - t_link
        out.update({
            "envelopes": n, "backlog_envelopes": backlog, "edge_ledger": edge_count,
            "live_sales": len(live_lat), "polls": polls,
            "live_poll_rtt_p50_ms": pct(stream.rtt, 50) * 1e3,
            "live_poll_rtt_p90_ms": pct(stream.rtt, 90) * 1e3,
            "live_ahead_mean": sum(live_ahead) / len(live_ahead) if live_ahead else None,
            "live_lat_ms": [round(x * 1e3, 1) for x in live_lat], "live_ahead": live_ahead,
            "seconds": seconds, "from_session_s": t_backlog - (t_session or t_link),
            "live_tail_s": t_all_live - t_backlog, "edge_ack_after_s": edge_ack_s,
            "envelopes_per_s": backlog / seconds, "wire_sent": sent, "wire_recv": recv,
            "bytes": sent + recv, "bytes_per_sale": (sent + recv) / n,
            "with_headers_per_sale": (sent + recv + HDR_PER_SEGMENT * segs) / n,
            "session_restarts": len(sessions) - 1, "max_inflight": peak[0],
            "max_queued_msgs": max_queued,
            "live_p50_ms": pct(live_lat, 50) * 1e3, "live_p90_ms": pct(live_lat, 90) * 1e3,
            "live_max_ms": max(live_lat) * 1e3 if live_lat else float("nan"),
            "cloud_rss_peak_mb": max(sampler.samples) if sampler.samples else float("nan"),
            "cloud_rss_end_mb": rss_mb(cloud.pid), "cloud_hwm_mb": rss_mb(cloud.pid, "VmHWM"),
            "rss_samples": len(sampler.samples),
            "cloud_ledger": got, "stock_equal": stock == expected, "skus": len(expected),
            "edge_rejected": dict(edge.core.stats),
        })
        await asyncio.wait_for(edge.close(), WAIT_S)
        edge = None
        if restart:  # the cloud again, from its disk only: durable, and its state's RSS
            cloud.stop()
            cloud.start()
            api.url = cloud.store_url(template.store_id)
            got2, stock2, waited = await _wait_cloud(api.http, api.url, edge_count)
            await asyncio.sleep(0.5)
            out.update({"restart_ledger": got2, "restart_stock_equal": stock2 == expected,
                        "cloud_rss_restarted_mb": rss_mb(cloud.pid),
                        "cloud_restart_hwm_mb": rss_mb(cloud.pid, "VmHWM"),
                        "restart_s": waited})
    finally:
        if poller is not None and not poller.done():
            poller.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await poller
        if stream is not None:
            await stream.close()
        if sampler is not None and sampler.is_alive():
            sampler.stop()
        if edge is not None:
            await asyncio.wait_for(edge.close(), WAIT_S)
        await api.close()
        cloud.stop()
    return out


async def naive_replay(bodies: list[bytes], store_id: str, seconds: float) -> dict[str, Any]:
    """The naive design's offline queue, replayed one POST per sale, in order."""
    runner, api_url = await start_post_server()
    poster = Poster(api_url, store_id)
    try:
        t0 = time.perf_counter()
        n = 0
        for body in bodies:
            await asyncio.wait_for(poster.post(body), WAIT_S)
            n += 1
            if time.perf_counter() - t0 > seconds:
                break
        elapsed = time.perf_counter() - t0
        w = poster.wire()
    finally:
        await poster.close()
        await runner.cleanup()
    return {"posted": n, "errors": poster.errors, "seconds": elapsed, "per_s": n / elapsed,
            "bytes": w.total, "bytes_per_sale": w.total / n,
            "with_headers_per_sale": w.with_headers / n}


def section_catchup(root: Path, sz: Sizes, n: int) -> dict[str, Any]:
    work = root / "catchup"
    template = make_store(work / "template", work / "template-cloud", "store-0043")
    gen = generate_backlog(template, n, seed=43, keep_bodies=sz.replay_max)
    bodies = gen.pop("bodies")
    console.print(f"  backlog: {n:,} sales from {len(REGISTERS)} registers written to the edge's "
                  f"ledger in {gen['seconds']:.1f} s ({gen['per_s']:,.0f}/s), mean envelope "
                  f"{gen['mean_envelope_bytes']:.0f} B")
    out: dict[str, Any] = {"n": n, "generate": gen, "variants": {}}
    for variant in sz.catchup_variants:
        res = asyncio.run(catchup_variant(variant, template, work, n, restart=variant == "wan"))
        out["variants"][variant] = res
        console.print(f"  {variant}: backlog at the cloud after {res['seconds']:.2f} s "
                      f"({res['envelopes_per_s']:,.0f} envelopes/s), "
                      f"{res['bytes'] / 1e6:.2f} MB on the wire, in-flight peak "
                      f"{res['max_inflight']:,}, live p50 {res['live_p50_ms']:.0f} ms")
    out["naive"] = asyncio.run(naive_replay(bodies, template.store_id, sz.replay_s))
    print_catchup(out)
    return out


def print_catchup(out: dict[str, Any]) -> None:
    n = out["n"]
    nv = out["naive"]
    naive_s = n / nv["per_s"]
    t = Table(title=f"2. Catch-up: the cloud away while {n:,} sales happened, then the link "
                    "comes up")
    for col in ("design", "backlog at cloud s", "env/s", "x naive", "MB wire",
                "B/sale", "x naive", "cloud RSS idle/peak/end MB", "in-flight peak",
                "live sale p50/p90/max ms", "edge acked +s"):
        t.add_column(col, justify="right")
    t.add_row("naive POST replay (*)", f"{naive_s:.1f}",
              fmt(nv["per_s"]), "1.00", f"{nv['bytes_per_sale'] * n / 1e6:.1f}",
              fmt(nv["bytes_per_sale"]), "1.00", "", "", "", "")
    for name, r in out["variants"].items():
        ack = r["edge_ack_after_s"]
        t.add_row(VARIANT_LABEL[name], f"{r['seconds']:.2f}", fmt(r["envelopes_per_s"]),
                  f"{r['seconds'] / naive_s:.2f}", f"{r['bytes'] / 1e6:.2f}",
                  fmt(r["bytes_per_sale"], 1), f"{r['bytes_per_sale'] / nv['bytes_per_sale']:.3f}",
                  f"{r['cloud_rss_idle_mb']:.0f}/{r['cloud_rss_peak_mb']:.0f}/"
                  f"{r['cloud_rss_end_mb']:.0f}", fmt(r["max_inflight"]),
                  f"{r['live_p50_ms']:.0f}/{r['live_p90_ms']:.0f}/{r['live_max_ms']:.0f}",
                  "-" if ack is None else f"{ack:.1f}")
    console.print(t)
    console.print(f"  (*) {nv['posted']:,} POSTs replayed in order over one keep-alive connection "
                  f"in {nv['seconds']:.1f} s, extrapolated to {n:,}; errors {nv['errors']}")
    for name, r in out["variants"].items():
        ahead = r["live_ahead_mean"]
        console.print(f"  {name}: {r['live_sales']} live sales (edge in-flight when made: mean "
                      f"{'-' if ahead is None else fmt(ahead)}; stock poll round trip p50/p90 "
                      f"{r['live_poll_rtt_p50_ms']:.0f}/{r['live_poll_rtt_p90_ms']:.0f} ms); "
                      f"session restarts "
                      f"{r['session_restarts']}; most queued messages {r['max_queued_msgs']}; "
                      f"cloud ledger {r['cloud_ledger']:,} of {r['edge_ledger']:,}, on-hand "
                      f"equal {r['stock_equal']}; edge rejected {r['edge_rejected'] or 'none'}")
    w = out["variants"].get("wan")
    if w and "restart_ledger" in w:
        console.print(f"  cloud restarted from disk: ledger {w['restart_ledger']:,} rows "
                      f"(edge {w['edge_ledger']:,}), on-hand equal: {w['restart_stock_equal']}, "
                      f"RSS {w['cloud_rss_restarted_mb']:.0f} MB after replay (peak "
                      f"{w['cloud_restart_hwm_mb']:.0f}); edge open {w['edge_open_s']:.1f} s")


# --- summary -------------------------------------------------------------------------------------


def summary(results: dict[str, Any], sz: Sizes) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []

    def add(figure: str, value: str, goal: str, ok: bool | None) -> None:
        rows.append({"figure": figure, "value": value, "goal": goal, "pass": ok})

    if "bytes" in results:
        v = results["bytes"]["variants"]
        base = v["wan"]
        for ph, label in (("quiet", f"quiet store ({base['quiet']['rate']:.1f} sales/s)"),
                          ("burst", f"busy burst ({base['burst']['rate']:.0f} sales/s)")):
            p = base[ph]
            naive = p["baseline"]["bytes_per_sale"]
            red = 1 - p["bytes_per_sale"] / naive
            add(f"bytes/sale, {label}: storemesh vs POST per sale",
                f"{p['bytes_per_sale']:.0f} vs {naive:.0f} B (-{red:.1%})",
                f">= {GOAL_REDUCTION:.0%} fewer", red >= GOAL_REDUCTION)
        conns = base["burst"]["baseline"]["connections"]
        add("baseline: keep-alive connections used (one per register)", f"{conns}",
            f"{len(REGISTERS)}", conns == len(REGISTERS))
        if "cold" in base:
            c = base["cold"]
            red_c = 1 - c["bytes_per_sale"] / c["baseline"]["bytes_per_sale"]
            add("bytes/sale right after link-up (cold start), envelopes the cloud sent back",
                f"{c['bytes_per_sale']:.0f} vs {c['baseline']['bytes_per_sale']:.0f} B "
                f"(-{red_c:.1%}); {base['echo_duplicates']} echoed", "reported", None)
        q = base["quiet"]
        red_h = 1 - q["with_headers_per_sale"] / q["baseline"]["with_headers_per_sale"]
        add("bytes/sale, quiet store, with 52 B TCP/IP headers per segment",
            f"{q['with_headers_per_sale']:.0f} vs {q['baseline']['with_headers_per_sale']:.0f} B "
            f"(-{red_h:.1%})", "reported", None)
        idle = base["idle"]["bytes_per_s"]
        marginal = q["bytes_per_sale"] - idle / q["rate"] if q["rate"] else float("nan")
        gap = q["baseline"]["bytes_per_sale"] - marginal
        breakeven = idle / gap * 3600 if gap > 0 else float("inf")
        add(f"idle WAN link (no sales, {base['idle']['seconds']:.0f} s): bytes/s",
            f"{idle:.1f} B/s", "reported", None)
        add("store rate below which storemesh sends more bytes/sale than POST",
            f"{breakeven:.0f} sales/hour", "reported", None)
        for name in v:
            if name == "wan":
                continue
            add(f"ablation: {VARIANT_LABEL[name]}",
                f"quiet {v[name]['quiet']['bytes_per_sale']:.0f}, burst "
                f"{v[name]['burst']['bytes_per_sale']:.0f} B/sale", "reported", None)
    if "catchup" in results:
        c = results["catchup"]
        n = c["n"]
        nv = c["naive"]
        w = c["variants"]["wan"]
        ratio = w["seconds"] * nv["per_s"] / n
        add(f"catch-up of {n:,} sales on loopback: time until the cloud holds the backlog "
            "(x naive replay, extrapolated)",
            f"{w['seconds']:.2f} s, {w['envelopes_per_s']:,.0f}/s (x{ratio:.2f})",
            "reported", None)
        red = 1 - w["bytes_per_sale"] / nv["bytes_per_sale"]
        add(f"catch-up of {n:,}: wire bytes/sale vs POST replay",
            f"{w['bytes_per_sale']:.1f} vs {nv['bytes_per_sale']:.0f} B (-{red:.1%}); "
            f"{w['bytes'] / 1e6:.2f} MB", f">= {GOAL_REDUCTION:.0%} fewer", red >= GOAL_REDUCTION)
        bound = config.MAX_INFLIGHT_PER_PEER + config.PUSH_RESERVE
        worst = max(r["max_inflight"] for r in c["variants"].values())
        drops = sum(r["session_restarts"] for r in c["variants"].values())
        add("catch-up back-pressure: edge in-flight peak, exact (all variants) / session drops "
            "(most queued msgs)", f"{worst:,} / {drops} ({w['max_queued_msgs']})",
            f"<= {bound:,} (MAX_INFLIGHT_PER_PEER + PUSH_RESERVE) / 0",
            worst <= bound and drops == 0)
        if "cloud_rss_restarted_mb" in w:
            transient = w["cloud_rss_peak_mb"] - w["cloud_rss_restarted_mb"]
            add("cloud RSS: catch-up peak - same state restarted from disk",
                f"{w['cloud_rss_peak_mb']:.0f} - {w['cloud_rss_restarted_mb']:.0f} = "
                f"{transient:.0f} MB", f"<= {GOAL_TRANSIENT_MB:.0f} MB",
                transient <= GOAL_TRANSIENT_MB)
        add("cloud RSS peak during catch-up", f"{w['cloud_rss_peak_mb']:.0f} MB",
            f"< {GOAL_PEAK_MB:.0f} MB", w["cloud_rss_peak_mb"] < GOAL_PEAK_MB)
        lost_ok = all(r["cloud_ledger"] == r["edge_ledger"] and r["stock_equal"]
                      for r in c["variants"].values()) and (
            w.get("restart_ledger", w["edge_ledger"]) == w["edge_ledger"]
            and w.get("restart_stock_equal", True))
        add("nothing lost: cloud ledger rows / on-hand of every SKU (every variant; WAN also "
            "after a cloud restart)",
            f"{w['cloud_ledger']:,} of {w['edge_ledger']:,} / "
            f"{'equal' if w['stock_equal'] else 'DIFFERENT'}", "equal", lost_ok)
        naive_wan = n * WAN_RTT_S + n * nv["bytes_per_sale"] / WAN_UPLINK_BPS
        mesh_wan = max(w["bytes"] / WAN_UPLINK_BPS, w["seconds"]) + 3 * WAN_RTT_S
        add(f"derived: catch-up over a {WAN_UPLINK_BPS * 8 / 1e6:.0f} Mbit/s, "
            f"{WAN_RTT_S * 1e3:.0f} ms RTT uplink (storemesh vs sequential POST replay)",
            f"~{mesh_wan:.0f} s vs ~{naive_wan / 60:.0f} min", "estimate", None)
        add(f"live sale at the edge during catch-up: until the cloud's API shows it, "
            f"p50 / p90 / max ({w['live_sales']} sales)",
            f"{w['live_p50_ms']:.0f} / {w['live_p90_ms']:.0f} / {w['live_max_ms']:.0f} ms",
            f"p50 <= {GOAL_LIVE_MS:.0f} ms", w["live_p50_ms"] <= GOAL_LIVE_MS)
        if w["edge_ack_after_s"] is not None:
            add("edge learns the cloud is current (its lag -> 0) after the backlog landed",
                f"+{w['edge_ack_after_s']:.1f} s", "reported", None)
    print_summary(console, rows, sz is QUICK)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    common_args(ap, "small sizes for a smoke run (~2 min)", "keep the temporary directories")
    ap.add_argument("--catchup-n", type=int, default=None,
                    help="sales in the outage backlog (default 100,000; --quick 20,000)")
    ap.add_argument("--only", choices=("bytes", "catchup"), action="append",
                    help="run only these sections (repeatable)")
    args = ap.parse_args(argv)
    sz = QUICK if args.quick else FULL
    n = args.catchup_n if args.catchup_n is not None else sz.catchup_n
    if not 1_000 <= n <= 2_000_000:
        ap.error("--catchup-n must be within 1,000..2,000,000")
    sections = args.only or ["bytes", "catchup"]
    root, started = run_dir("bench_cloud", args.dir)
    console.print(f"bench_cloud {'--quick ' if args.quick else ''}started {started}; "
                  f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}; data in {root}")
    results: dict[str, Any] = {}
    t_all = time.perf_counter()
    try:
        if "bytes" in sections:
            results["bytes"] = section_bytes(root, sz)
        if "catchup" in sections:
            results["catchup"] = section_catchup(root, sz, n)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    rows = summary(results, sz)
    total = time.perf_counter() - t_all
    console.print(f"total {total:.1f} s; load average now {os.getloadavg()[0]:.2f}")
    if args.json is not None:
        doc = {"started": started, "quick": args.quick, "cpus": os.cpu_count(),
               "python": sys.version.split()[0], "aiohttp": aiohttp.__version__,
               "sizes": asdict(sz), "seconds": total, "results": results, "summary": rows,
               "command": " ".join([".venv/bin/python", "scripts/bench_cloud.py",
                                    *(argv if argv is not None else sys.argv[1:])])}
        args.json.write_bytes(orjson.dumps(doc, option=orjson.OPT_INDENT_2
                                           | orjson.OPT_SERIALIZE_NUMPY))
    failed = [r for r in rows if r["pass"] is False]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

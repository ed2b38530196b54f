"""The mesh benchmark's shared harness: sizes, clocks and CPU from /proc, node processes on
loopback, HTTP helpers, the SSE observer, paced open-loop sales, CPU windows, py-spy
profiles and the tables (scripts/bench_mesh.py runs the experiments built on it)."""

from __future__ import annotations

import asyncio
import bisect
import hashlib
import math
import os
import random
import re
import shutil
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from rich.console import Console
from rich.table import Table
from yarl import URL

from mesh.store import authdir
from mesh.store.datadir import enrol_node, init_store
from mesh.testing.cluster import NodeProcess, proc_cpu

STORE = "bench-mesh"
CLK_TCK = os.sysconf("SC_CLK_TCK")
REPO = Path(__file__).resolve().parents[2]  # scripts/bench/harness.py -> the checkout
#: Bounds on every wait: a hang is a failure, not a stall.
START_TIMEOUT_S = 30.0
MESH_TIMEOUT_S = 30.0
CONVERGE_TIMEOUT_S = 30.0
REQUEST_TIMEOUT_S = 10.0
VISIBILITY_DRAIN_S = 5.0
STOP_TIMEOUT_S = 15.0
CATCHUP_TIMEOUT_S = 120.0
#: Goals (issue 3, "Performance").
GOAL_P99_MS = 10.0
NEAR_REAL_TIME_MS = 150.0
GOAL_RECV_MS_PER_1K = 150.0
GOAL_CATCHUP_S = 5.0
#: Receipt quantity per SKU: sales never take stock below zero (no oversell noise).
STOCK = 1_000_000
JSON_HEADERS = {"Content-Type": "application/json"}
#: The credential of the store's back-office integration (a ``service`` device, issued by
#: each ``Cluster`` as ``storemesh device issue`` does): every write and the live streams
#: send it (docs/security.md). Sections run one cluster at a time.
AUTH: dict[str, str] = {}
_EVENT = re.compile(rb'"origin":"([^"]+)","seq":(\d+)')

console = Console(width=None if sys.stdout.isatty() else 140)


@dataclass(frozen=True, slots=True)
class Sizes:
    cost_rounds: int
    lat_ref_rate: int
    lat_ref_seconds: float
    lat_rate: int
    lat_seconds: float
    cost_rate: int
    cost_seconds: float
    idle_seconds: float
    ramp_registers: int
    ramp_steps: tuple[int, ...]
    ramp_seconds: float
    ramp_cost_rate: int
    ramp_cost_seconds: float
    catchup_n: int
    catchup_origins: int
    skus: int
    recv_seconds: float  # length of one measured round of the recv section
    recv_rounds: int


FULL = Sizes(
    lat_ref_rate=150, lat_ref_seconds=10.0, lat_rate=1_200, lat_seconds=20.0,
    cost_rate=400, cost_seconds=20.0, cost_rounds=5, idle_seconds=3.0,
    ramp_registers=8, ramp_steps=(50, 100, 200, 400, 800, 1_200, 1_600, 2_000, 2_400, 3_200),
    ramp_seconds=6.0, ramp_cost_rate=1_600, ramp_cost_seconds=8.0,
    catchup_n=100_000, catchup_origins=8, skus=200, recv_seconds=3.0, recv_rounds=5,
)
QUICK = Sizes(
    lat_ref_rate=150, lat_ref_seconds=2.0, lat_rate=1_200, lat_seconds=3.0,
    cost_rate=400, cost_seconds=3.0, cost_rounds=2, idle_seconds=1.0,
    ramp_registers=4, ramp_steps=(400, 1_200), ramp_seconds=2.0,
    ramp_cost_rate=800, ramp_cost_seconds=2.0,
    catchup_n=10_000, catchup_origins=4, skus=50, recv_seconds=2.0, recv_rounds=2,
)


# --- small helpers -----------------------------------------------------------------------


def pct(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100); NaN for an empty list. ``inf`` sorts last."""
    if not values:
        return float("nan")
    s = sorted(values)
    k = max(0, min(len(s) - 1, math.ceil(q / 100 * len(s)) - 1))
    return s[k]


def fms(seconds: float) -> str:
    return "∞" if math.isinf(seconds) else ("–" if math.isnan(seconds)
                                            else f"{seconds * 1000:.1f}")


def rate(n: float) -> str:
    return f"{n:,.0f}"


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def sku_name(i: int) -> str:
    return f"SKU-{i:05d}"


def machine_busy() -> float:
    """CPU seconds the whole machine spent busy (all CPUs; /proc/stat, steal included)."""
    with open("/proc/stat", "rb") as f:
        parts = f.readline().split()
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in parts[1:9])
    return (user + nice + system + irq + softirq + steal) / CLK_TCK


def calibrate(seconds: float = 1.5) -> dict[str, float]:
    """Ed25519 verifies per CPU-second and per wall-second of one thread of this process:
    how fast a core is right now (bench_core.py measured ~8,800/s on a quiet VM). CPU
    figures of a run with a low first number are inflated by a busy machine."""
    # the cryptography library directly: mesh's verify_signature may memoise results
    private = Ed25519PrivateKey.generate()
    public = private.public_key()
    msg = os.urandom(400)
    sig = private.sign(msg)
    n = 0
    c0, t0 = time.thread_time(), time.perf_counter()
    while n < 20_000 and time.perf_counter() - t0 < seconds:
        public.verify(sig, msg)
        n += 1
    cpu, wall = time.thread_time() - c0, time.perf_counter() - t0
    return {"verify_per_cpu_s": n / cpu if cpu else float("nan"), "verify_per_wall_s": n / wall}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def code_fingerprint(base: Path = REPO) -> str:
    """SHA-256 over ``base``/mesh/**/*.py (16 hex digits)."""
    h = hashlib.sha256()
    for p in sorted((base / "mesh").rglob("*.py")):
        h.update(str(p.relative_to(base)).encode())
        h.update(p.read_bytes())
    return h.hexdigest()[:16]


#: Where the node processes import ``mesh`` from: a copy of the working tree's mesh/ taken
#: at the start of the run, so that edits made meanwhile (the tree may be shared) cannot
#: give nodes started at different times different code.
CODE_DIR: Path | None = None


def snapshot_code(root: Path) -> Path:
    dest = root / "code"
    shutil.copytree(REPO / "mesh", dest / "mesh",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return dest


def git_head() -> str:
    try:
        out = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, timeout=10, check=False)
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--",
                                "mesh"], capture_output=True, text=True, timeout=10,
                               check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return out.stdout.strip() + (" + uncommitted changes in mesh/" if dirty.stdout.strip()
                                 else "")


# --- node processes ----------------------------------------------------------------------

#: The niceness nodes run at: this script may raise its own priority (--observer-nice) so
#: that its timestamps are not delayed by a busy run queue; the nodes keep the default.
NODE_NICE = os.getpriority(os.PRIO_PROCESS, 0)


def _node_priority() -> None:
    os.setpriority(os.PRIO_PROCESS, 0, NODE_NICE)



@dataclass(eq=False, init=False)
class NodeProc(NodeProcess):
    """One ``python -m mesh node`` of this benchmark: the project's process harness
    (``mesh.testing.cluster``) on a port chosen beforehand (``port``), importing the copy
    of mesh/ taken at the start (``code``, default ``CODE_DIR``), at the nodes' niceness."""

    code: Path | None = None
    peers: list[str] = field(default_factory=list)

    def __init__(self, name: str, data_dir: Path, log_dir: Path,
                 code: Path | None = None) -> None:
        super().__init__(name, [], log_dir / f"{name}.log", data_dir,
                         preexec_fn=_node_priority)
        self.code = code
        self.peers = []

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1]) if self.url else 0

    @port.setter
    def port(self, value: int) -> None:
        self.url = f"http://127.0.0.1:{value}"

    def spawn(self) -> subprocess.Popen[bytes]:
        assert self.data_dir is not None
        self.argv = ["node", "--data", str(self.data_dir), "--http-host", "127.0.0.1",
                     "--http-port", str(self.port), "--no-discovery", "--log-level", "WARNING",
                     # TLS is not wired into this benchmark's clients yet (issue 11): it
                     # measures the plain-text loopback mode, as before TLS.
                     "--insecure-plaintext"]
        for url in self.peers:
            self.argv += ["--peer", url]
        env = dict(os.environ)
        self.cwd = REPO
        code = self.code or CODE_DIR
        if code is not None:  # sys.path[0] (cwd) and PYTHONPATH beat the editable install
            self.cwd = code
            env["PYTHONPATH"] = str(code)
        self.env = env
        return super().spawn()

    async def wait_listening(self, limit_s: float = START_TIMEOUT_S) -> None:
        await self.wait_ready(limit_s)

    def loop_cpu(self) -> float:
        """CPU of the main thread, which runs the event loop (the ledger writer and the
        executor threads are the rest)."""
        return proc_cpu(self.pid, self.pid)

    def stop(self) -> int:
        """SIGTERM (graceful close); SIGABRT + SIGKILL if still there after the bound."""
        if self.proc is None:
            return 0
        return super().stop()


class Cluster:
    """An edge and N registers of one store, as processes, in a full mesh."""

    def __init__(self, root: Path, name: str, n_registers: int) -> None:
        self.root = root / name
        self.root.mkdir(parents=True)
        (self.root / "logs").mkdir()
        ident = init_store(self.root / "edge", STORE, now_ms=now_ms(), node_id="edge")
        assert ident.store_key is not None
        self.store_key = ident.store_key
        token = authdir.issue_device_credential(self.root / "edge", device_id="bench",
                                                role="service", now_ms=now_ms(),
                                                ttl_ms=86_400_000)
        AUTH["Authorization"] = f"Bearer {token}"
        JSON_HEADERS["Authorization"] = AUTH["Authorization"]
        self.nodes = [NodeProc("edge", self.root / "edge", self.root / "logs")]
        for i in range(1, n_registers + 1):
            nid = f"reg-{i:02d}"
            enrol_node(self.root / nid, self.store_key, STORE, "register", now_ms=now_ms(),
                       node_id=nid)
            self.nodes.append(NodeProc(nid, self.root / nid, self.root / "logs"))
        self.index = {n.name: i for i, n in enumerate(self.nodes)}

    @property
    def registers(self) -> list[int]:
        return list(range(1, len(self.nodes)))

    async def start(self, http: aiohttp.ClientSession, *, mesh: bool = True) -> float:
        """Start every node at once on pre-chosen ports; node k dials nodes 0..k-1.
        Returns the seconds until the full mesh was up."""
        t0 = time.perf_counter()
        for n in self.nodes:
            n.port = free_port()
        for k, n in enumerate(self.nodes):
            n.peers = [m.url for m in self.nodes[:k]] if mesh else []
            n.spawn()
        await asyncio.gather(*(n.wait_listening() for n in self.nodes))
        if mesh:
            await self.wait_mesh(http)
        return time.perf_counter() - t0

    async def wait_mesh(self, http: aiohttp.ClientSession) -> None:
        want = len(self.nodes) - 1
        deadline = time.perf_counter() + MESH_TIMEOUT_S
        ups: list[int] = []
        while time.perf_counter() < deadline:
            ups = []
            for n in self.nodes:
                peers = await get_json(http, n.url + "/v1/peers")
                ups.append(sum(1 for p in peers["peers"] if p["up"]))
            if all(u == want for u in ups):
                return
            await asyncio.sleep(0.1)
        raise RuntimeError(f"mesh did not form within {MESH_TIMEOUT_S} s (peers up: {ups})")

    def stop(self) -> None:
        for n in self.nodes:
            n.terminate()
        for n in self.nodes:
            n.stop()

    def cpu(self) -> list[float]:
        return [n.cpu() for n in self.nodes]


async def get_json(http: aiohttp.ClientSession, url: str) -> Any:
    async with http.get(url, timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)) as resp:
        return orjson.loads(await resp.read())


async def post_json(http: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> Any:
    async with http.post(url, data=orjson.dumps(body), headers=JSON_HEADERS,
                         timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)) as resp:
        data = orjson.loads(await resp.read())
        if resp.status >= 400:
            raise RuntimeError(f"POST {url} -> {resp.status} {data}")
        return data


async def metric(http: aiohttp.ClientSession, url: str, name: str) -> float:
    async with http.get(url + "/metrics",
                        timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)) as resp:
        text = (await resp.read()).decode()
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return float("nan")


async def sync_counters(http: aiohttp.ClientSession,
                        nodes: Sequence[NodeProc]) -> list[tuple[float, float, float]]:
    """Per node: envelopes applied from peers, envelopes sent to peers, sync bytes in."""
    names = ("storemesh_envelopes_received_total", "storemesh_envelopes_sent_total",
             'storemesh_sync_bytes_total{direction="in"}')
    vals = await asyncio.gather(*(metric(http, n.url, m) for n in nodes for m in names))
    return [(vals[3 * i], vals[3 * i + 1], vals[3 * i + 2]) for i in range(len(nodes))]


def amplification(c0: Sequence[tuple[float, float, float]],
                  c1: Sequence[tuple[float, float, float]]) -> dict[str, Any]:
    """Envelopes sent over envelopes applied, summed over the nodes: 1.0 when every
    envelope crosses each link once (a healthy full mesh); above it, relays, serving
    from storage and retransmissions sent copies the receivers dropped as duplicates."""
    recv = sum(b[0] - a[0] for a, b in zip(c0, c1, strict=True))
    sent = sum(b[1] - a[1] for a, b in zip(c0, c1, strict=True))
    bytes_in = sum(b[2] - a[2] for a, b in zip(c0, c1, strict=True))
    return {"received": recv, "sent": sent, "send_amplification": sent / recv if recv else
            float("nan"), "bytes_in_per_applied": bytes_in / recv if recv else float("nan"),
            "sent_per_node": [b[1] - a[1] for a, b in zip(c0, c1, strict=True)]}


async def ledger_counts(http: aiohttp.ClientSession, nodes: Sequence[NodeProc]) -> list[int]:
    docs = await asyncio.gather(*(get_json(http, n.url + "/v1/health") for n in nodes))
    return [int(d["envelopes"]) for d in docs]


async def converge(http: aiohttp.ClientSession, nodes: Sequence[NodeProc],
                   limit_s: float = CONVERGE_TIMEOUT_S, every_s: float = 0.05) -> float:
    """Wait until every node's ledger holds as many envelopes as the others (they only
    ever hold subsets of one set, so equal counts mean equal sets). Returns seconds."""
    t0 = time.perf_counter()
    counts: list[int] = []
    while time.perf_counter() - t0 < limit_s:
        counts = await ledger_counts(http, nodes)
        if len(set(counts)) == 1:
            return time.perf_counter() - t0
        await asyncio.sleep(every_s)
    raise RuntimeError(f"nodes did not converge within {limit_s} s: {counts}")


async def settle(http: aiohttp.ClientSession, nodes: Sequence[NodeProc],
                 limit_s: float = 10.0) -> float:
    """Converge, then wait (bounded) until no node sends envelopes any more: copies still
    in flight after convergence (served from storage, retransmitted) would otherwise be
    counted in the next measurement window. Returns seconds."""
    t0 = time.perf_counter()
    await converge(http, nodes, every_s=0.1)
    last = None
    while time.perf_counter() - t0 < limit_s:
        sent = sum(c[1] for c in await sync_counters(http, nodes))
        if sent == last:
            break
        last = sent
        await asyncio.sleep(0.3)
    return time.perf_counter() - t0


async def stock_receipts(http: aiohttp.ClientSession, url: str, skus: int) -> None:
    sem = asyncio.Semaphore(16)

    async def one(i: int) -> None:
        async with sem:
            await post_json(http, url + "/v1/receipts", {
                "sku": sku_name(i), "qty": STOCK, "txn_id": f"rx-{i}"})
    await asyncio.gather(*(one(i) for i in range(skus)))


# --- the SSE observer --------------------------------------------------------------------


class Observer:
    """Reads ``/v1/events`` of every node; remembers, per (node, origin), the times at
    which the highest seq seen so far went up. A sale (O, s) is visible on node N from
    the first event of N with origin O and seq >= s (per-origin in-order apply)."""

    def __init__(self, nodes: Sequence[NodeProc]) -> None:
        self.nodes = list(nodes)
        self.seqs: dict[tuple[int, bytes], list[int]] = {}
        self.times: dict[tuple[int, bytes], list[float]] = {}
        self.events = [0] * len(nodes)
        self.own_events = [0] * len(nodes)  # events whose origin is the node itself
        self.overflows = [0] * len(nodes)
        self.reconnects = [0] * len(nodes)
        self._tasks: list[asyncio.Task[None]] = []
        self._ready = [asyncio.Event() for _ in nodes]
        self._http: aiohttp.ClientSession | None = None
        self._stopping = False

    async def start(self) -> None:
        # A session of its own: the streams hold their connections for the whole run.
        self._http = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=None, sock_read=None, sock_connect=5))
        self._tasks = [asyncio.create_task(self._read(i)) for i in range(len(self.nodes))]
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in self._ready)),
                               START_TIMEOUT_S)

    async def stop(self) -> None:
        self._stopping = True
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._http is not None:
            await self._http.close()

    async def _read(self, i: int) -> None:
        assert self._http is not None
        node = self.nodes[i]
        own = node.name.encode()
        seqs, times = self.seqs, self.times
        while not self._stopping:
            try:
                async with self._http.get(node.url + "/v1/events", headers=AUTH) as resp:
                    buf = b""
                    async for chunk in resp.content.iter_any():
                        t = time.perf_counter()
                        buf += chunk
                        cut = buf.rfind(b"\n\n")
                        if cut < 0:
                            continue
                        block, buf = buf[:cut], buf[cut + 2:]
                        if not self._ready[i].is_set() and b": subscribed" in block:
                            self._ready[i].set()
                        if b"event: overflow" in block:
                            self.overflows[i] += 1
                        for origin, seq_b in _EVENT.findall(block):
                            seq = int(seq_b)
                            self.events[i] += 1
                            if origin == own:
                                self.own_events[i] += 1
                            key = (i, origin)
                            lst = seqs.get(key)
                            if lst is None:
                                seqs[key], times[key] = [seq], [t]
                            elif seq > lst[-1]:
                                lst.append(seq)
                                times[key].append(t)
            except (TimeoutError, aiohttp.ClientError, OSError):
                pass
            if self._stopping:
                return
            self.reconnects[i] += 1
            await asyncio.sleep(0.05)

    def visible_at(self, i: int, origin: bytes, seq: int) -> float | None:
        lst = self.seqs.get((i, origin))
        if lst is None:
            return None
        k = bisect.bisect_left(lst, seq)
        return self.times[(i, origin)][k] if k < len(lst) else None

    def high(self, i: int, origin: bytes) -> int:
        lst = self.seqs.get((i, origin))
        return lst[-1] if lst else 0


class LoopLag:
    """How late this process's event loop wakes up (it times both ends of a sale)."""

    def __init__(self) -> None:
        self.samples: list[float] = []
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while True:
            t = time.perf_counter()
            await asyncio.sleep(0.005)
            self.samples.append(time.perf_counter() - t - 0.005)

    def start(self) -> None:
        self.samples = []
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> dict[str, float]:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        return {"p50_ms": pct(self.samples, 50) * 1e3, "p99_ms": pct(self.samples, 99) * 1e3,
                "max_ms": max(self.samples, default=float("nan")) * 1e3}


# --- the load generator ------------------------------------------------------------------


@dataclass(slots=True)
class Sale:
    node: int  # index of the register it was sent to
    due: float
    sent: float = 0.0
    ack: float = 0.0
    status: int = 0
    origin: bytes = b""
    seq: int = 0


@dataclass
class LoadRun:
    sales: list[Sale]
    t0: float
    seconds: float
    target: int
    shed: int
    wall: float = 0.0


async def paced_sales(http: aiohttp.ClientSession, nodes: Sequence[NodeProc],
                      sellers: Sequence[int], target: int, seconds: float, tag: str,
                      skus: int, rng: random.Random) -> LoadRun:
    """Open loop: sale i is due at t0 + i/target, sent to ``sellers[i % len]``, whatever
    happened to earlier sales. Latency counts from the due time (no coordinated omission).
    At most ``4 s x target`` sales in flight; past that, sales are shed and counted."""
    total = int(target * seconds)
    interval = 1.0 / target
    max_outstanding = 4 * target
    urls = {i: URL(nodes[i].url + "/v1/sales") for i in sellers}
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
    pending: set[asyncio.Task[None]] = set()
    sales: list[Sale] = []

    async def one(s: Sale, body: bytes) -> None:
        s.sent = time.perf_counter()
        try:
            async with http.post(urls[s.node], data=body, headers=JSON_HEADERS,
                                 timeout=timeout) as resp:
                data = await resp.read()
                s.ack = time.perf_counter()
                s.status = resp.status
                if resp.status == 201:
                    doc = orjson.loads(data)
                    s.origin = doc["origin"].encode()
                    s.seq = doc["seq"]
        except (TimeoutError, aiohttp.ClientError, OSError):
            s.ack = time.perf_counter()
            s.status = -1

    t0 = time.perf_counter() + 0.02
    hard_deadline = t0 + 2 * seconds + 5
    shed = 0
    i = 0
    while i < total:
        now = time.perf_counter()
        if now > hard_deadline:
            break
        due = t0 + i * interval
        if due > now:
            await asyncio.sleep(due - now)
            continue
        while i < total and t0 + i * interval <= now:
            s = Sale(sellers[i % len(sellers)], t0 + i * interval)
            if len(pending) >= max_outstanding:
                shed += 1
            else:
                body = orjson.dumps({"sku": sku_name(rng.randrange(skus)), "qty": 1,
                                     "txn_id": f"{tag}-{i}"})
                task = asyncio.create_task(one(s, body))
                pending.add(task)
                task.add_done_callback(pending.discard)
                sales.append(s)
            i += 1
    if pending:
        await asyncio.wait(pending, timeout=REQUEST_TIMEOUT_S + 5)
    return LoadRun(sales, t0, seconds, target, shed + (total - i),
                   wall=time.perf_counter() - t0)


async def wait_visible(obs: Observer, run: LoadRun, limit_s: float = VISIBILITY_DRAIN_S) -> float:
    """Wait until every acknowledged sale was seen on every other node (bounded)."""
    high: dict[bytes, int] = {}
    origin_node: dict[bytes, int] = {}
    for s in run.sales:
        if s.status == 201 and s.seq > high.get(s.origin, 0):
            high[s.origin] = s.seq
            origin_node[s.origin] = s.node
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < limit_s:
        if all(obs.high(n, o) >= seq for o, seq in high.items()
               for n in range(len(obs.nodes)) if n != origin_node[o]):
            break
        await asyncio.sleep(0.02)
    return time.perf_counter() - t0


def analyse(run: LoadRun, obs: Observer | None) -> dict[str, Any]:
    ok = [s for s in run.sales if s.status == 201]
    errors = Counter(s.status for s in run.sales if s.status != 201)
    ack_due = [s.ack - s.due for s in ok]
    ack_sent = [s.ack - s.sent for s in ok]
    send_late = [s.sent - s.due for s in run.sales if s.sent]
    last_ack = max((s.ack for s in ok), default=run.t0)
    achieved = len(ok) / max(run.seconds, last_ack - run.t0)
    out: dict[str, Any] = {
        "target": run.target, "seconds": run.seconds, "issued": len(run.sales),
        "ok": len(ok), "errors": dict(errors), "shed": run.shed, "achieved": achieved,
        "ack_p50_ms": pct(ack_due, 50) * 1e3, "ack_p99_ms": pct(ack_due, 99) * 1e3,
        "ack_max_ms": max(ack_due, default=float("nan")) * 1e3,
        "ack_from_send_p99_ms": pct(ack_sent, 99) * 1e3,
        "issue_late_p99_ms": pct(send_late, 99) * 1e3,
    }
    if obs is None:
        return out
    vis: list[float] = []
    first: list[float] = []
    missing = 0
    n_nodes = len(obs.nodes)
    for s in ok:
        times = [obs.visible_at(n, s.origin, s.seq) for n in range(n_nodes) if n != s.node]
        if any(t is None for t in times):
            missing += 1
            vis.append(float("inf"))
            continue
        seen = [t for t in times if t is not None]
        vis.append(max(seen) - s.ack)
        first.append(min(seen) - s.ack)
    out.update({
        "vis_p50_ms": pct(vis, 50) * 1e3, "vis_p90_ms": pct(vis, 90) * 1e3,
        "vis_p99_ms": pct(vis, 99) * 1e3, "vis_max_ms": max(vis, default=float("nan")) * 1e3,
        "vis_min_ms": min(vis, default=float("nan")) * 1e3,
        "first_node_p50_ms": pct(first, 50) * 1e3, "first_node_p99_ms": pct(first, 99) * 1e3,
        "missing": missing,
        # from the due time: what a customer at another till would see in the worst case
        "due_to_vis_p99_ms": pct([v + (s.ack - s.due) for v, s in zip(vis, ok, strict=True)],
                                 99) * 1e3,
    })
    return out


# --- CPU accounting ----------------------------------------------------------------------


@dataclass
class CpuWindow:
    """CPU seconds each node (and this process) used over a wall-clock window."""

    names: list[str]
    cpu0: list[float]
    self0: float
    t0: float
    busy0: float
    loop0: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    loop: list[float] = field(default_factory=list)
    self_cpu: float = 0.0
    wall: float = 0.0
    busy: float = 0.0

    @classmethod
    def begin(cls, nodes: Sequence[NodeProc]) -> CpuWindow:
        return cls([n.name for n in nodes], [n.cpu() for n in nodes], time.process_time(),
                   time.perf_counter(), machine_busy(), [n.loop_cpu() for n in nodes])

    def end(self, nodes: Sequence[NodeProc]) -> CpuWindow:
        self.cpu = [n.cpu() - c for n, c in zip(nodes, self.cpu0, strict=True)]
        self.loop = [n.loop_cpu() - c for n, c in zip(nodes, self.loop0, strict=True)]
        self.self_cpu = time.process_time() - self.self0
        self.wall = time.perf_counter() - self.t0
        self.busy = machine_busy() - self.busy0
        return self

    @classmethod
    def merge(cls, windows: Sequence[CpuWindow]) -> CpuWindow:
        """Several windows over the same nodes as one (CPU, wall and busy time summed)."""
        m = cls(list(windows[0].names), [0.0] * len(windows[0].names), 0.0, 0.0, 0.0)
        m.cpu = [sum(c) for c in zip(*(w.cpu for w in windows), strict=True)]
        m.loop = [sum(c) for c in zip(*(w.loop for w in windows), strict=True)]
        m.self_cpu = sum(w.self_cpu for w in windows)
        m.wall = sum(w.wall for w in windows)
        m.busy = sum(w.busy for w in windows)
        return m

    @property
    def other_cores(self) -> float:
        """Cores used meanwhile by processes that are neither the nodes nor this one
        (other work on a shared machine, profilers): the figures' noise floor."""
        return max(0.0, self.busy - sum(self.cpu) - self.self_cpu) / self.wall

    def net(self, idle: Sequence[float]) -> list[float]:
        """CPU minus what each node burns idle (timers, version vectors) over the window."""
        return [max(0.0, c - r * self.wall) for c, r in zip(self.cpu, idle, strict=True)]


async def idle_rates(nodes: Sequence[NodeProc], seconds: float) -> list[float]:
    w = CpuWindow.begin(nodes)
    await asyncio.sleep(seconds)
    w.end(nodes)
    return [c / w.wall for c in w.cpu]


# --- profiling (py-spy, optional) --------------------------------------------------------


class Profiler:
    """``py-spy record`` on node processes (sampling, non-blocking) during a window."""

    def __init__(self, py_spy: str | None, out_dir: Path | None) -> None:
        self.py_spy = py_spy
        self.out_dir = out_dir
        self.running: list[tuple[str, subprocess.Popen[bytes], Path]] = []
        self.files: dict[str, Path] = {}
        if out_dir is not None:
            out_dir.mkdir(parents=True, exist_ok=True)

    @property
    def on(self) -> bool:
        return self.py_spy is not None and self.out_dir is not None

    def start(self, label: str, nodes: Iterable[NodeProc], seconds: float) -> None:
        if not self.on:
            return
        assert self.py_spy is not None and self.out_dir is not None
        for n in nodes:
            path = self.out_dir / f"{label}-{n.name}.txt"
            p = subprocess.Popen(
                [self.py_spy, "record", "--pid", str(n.pid), "--duration",
                 str(max(1, round(seconds))), "--rate", "200", "--format", "raw",
                 "--threads", "-o", str(path)],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            self.running.append((f"{label}-{n.name}", p, path))

    def collect(self) -> None:
        for key, p, path in self.running:
            try:
                p.wait(60)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(10)
            if path.exists():
                self.files[key] = path
        self.running = []

    def report(self, top: int = 14) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, path in self.files.items():
            self_t: Counter[str] = Counter()
            incl: Counter[str] = Counter()
            threads: Counter[str] = Counter()
            total = 0
            idle = 0
            for line in path.read_text().splitlines():
                stack, _, n_s = line.rpartition(" ")
                if not stack or not n_s.isdigit():
                    continue
                n = int(n_s)
                frames = stack.split(";")
                funcs = [_short_frame(f) for f in frames[1:]]
                # py-spy counts threads blocked in these as active here: drop them
                if not funcs or _leaf_key(funcs[-1]) in _IDLE_LEAVES:
                    idle += n
                    continue
                threads[frames[0].split(":", 1)[-1].strip()] += n
                total += n
                self_t[funcs[-1]] += n
                for f in set(funcs):
                    incl[f] += n
            div = max(total, 1)
            out[key] = {"samples": total, "idle_samples": idle,
                        "threads": dict(threads.most_common(4)),
                        "self": [(f, n / div) for f, n in self_t.most_common(top)],
                        "inclusive": [(f, n / div) for f, n in incl.most_common(80)]}
        return out


_MESH_FILES = frozenset({"api.py", "node.py", "sync.py", "transport.py", "envelope.py",
                         "replica.py", "ledger.py", "durable.py", "identity.py", "ops.py"})
#: Leaf frames of a thread that waits (epoll, a condition, an empty work queue).
_IDLE_LEAVES = frozenset({"select (selectors.py)", "wait (threading.py)",
                          "_worker (thread.py)", "get (queue.py)"})


def _leaf_key(short: str) -> str:
    """``EpollSelector.select (selectors.py)`` -> ``select (selectors.py)``."""
    name, _, where = short.partition(" (")
    return f"{name.rsplit('.', 1)[-1]} ({where}"


def _short_frame(frame: str) -> str:
    """``func (path/to/file.py:123)`` -> ``func (file.py)``."""
    name, _, where = frame.partition(" (")
    file = where.rstrip(")").rsplit(":", 1)[0]
    return f"{name} ({file.rsplit('/', 1)[-1]})"


# --- section 1: latency (1 edge + 3 registers) -------------------------------------------


def cpu_table(title: str, w: CpuWindow, idle: Sequence[float],
              envs: dict[str, tuple[str, float]]) -> list[dict[str, Any]]:
    """Rows: node, CPU s, % of one core, and ms per 1,000 of the envelopes named in ``envs``."""
    t = Table(title=title)
    for col in ("node", "CPU s", "% of a core", "loop thread % of it", "idle % of a core",
                "envelopes", "ms / 1,000"):
        t.add_column(col, justify="right")
    rows = []
    net = w.net(idle)
    loops = w.loop or [float("nan")] * len(net)
    for name, c, lc, r, gross in zip(w.names, net, loops, idle, w.cpu, strict=True):
        what, n = envs.get(name, ("", 0.0))
        per = c / n * 1e6 if n else float("nan")
        loop_share = lc / gross if gross else float("nan")
        rows.append({"node": name, "cpu_s": c, "core_share": c / w.wall, "idle_share": r,
                     "loop_share": loop_share, "what": what, "envelopes": n,
                     "ms_per_1k": per})
        t.add_row(name, f"{c:.2f}", f"{c / w.wall:.0%}", f"{loop_share:.0%}", f"{r:.1%}",
                  f"{n:,.0f} {what}" if n else "", f"{per:.0f}" if n else "")
    t.add_row("this process (load + SSE)", f"{w.self_cpu:.2f}", f"{w.self_cpu / w.wall:.0%}",
              "", "", "", "")
    t.add_row("[dim]other processes on the machine[/]", "", f"[dim]{w.other_cores:.0%}[/]",
              "", "", "", "")
    console.print(t)
    rows.append({"node": "_bench", "cpu_s": w.self_cpu, "core_share": w.self_cpu / w.wall})
    rows.append({"node": "_other", "core_share": w.other_cores})
    return rows


async def visibility_run(http: aiohttp.ClientSession, cl: Cluster, obs: Observer,
                         target: int, seconds: float, tag: str, idle: Sequence[float],
                         sz: Sizes, rng: random.Random, prof: Profiler) -> dict[str, Any]:
    """One paced run with SSE on every node: visibility, ack latency, CPU per node."""
    await settle(http, cl.nodes)
    sc0 = await sync_counters(http, cl.nodes)
    rec0 = [c[0] for c in sc0]
    ev0, own0 = list(obs.events), list(obs.own_events)
    lag = LoopLag()
    lag.start()
    w = CpuWindow.begin(cl.nodes)
    prof.start(tag, cl.nodes, seconds)
    run = await paced_sales(http, cl.nodes, cl.registers, target, seconds, tag, sz.skus, rng)
    drain = await wait_visible(obs, run)
    await settle(http, cl.nodes)
    w.end(cl.nodes)
    prof.collect()
    loop_lag = await lag.stop()
    sc1 = await sync_counters(http, cl.nodes)
    rec1 = [c[0] for c in sc1]
    res = analyse(run, obs)
    res["sync"] = amplification(sc0, sc1)
    own = [b - a for a, b in zip(own0, obs.own_events, strict=True)]
    res.update(drain_s=drain, loop_lag=loop_lag, other_cores=w.other_cores,
               sse_events=[b - a for a, b in zip(ev0, obs.events, strict=True)],
               sse_overflows=list(obs.overflows), sse_reconnects=list(obs.reconnects))
    sold = Counter(s.node for s in run.sales if s.status == 201)
    res["own_event_share"] = {cl.nodes[i].name: own[i] / sold[i]
                              for i in cl.registers if sold[i]}
    recv = [b - a for a, b in zip(rec0, rec1, strict=True)]
    res["received"] = recv
    envs = {n.name: ("recv", recv[i]) for i, n in enumerate(cl.nodes)}
    res["cpu"] = cpu_table(
        f"1. CPU per node, {target:,} sales/s over {len(cl.registers)} registers, SSE on "
        f"every node ({w.wall:.1f} s, idle subtracted)", w, idle, envs)
    res["cpu_wall_s"] = w.wall
    res["self_cpu_s"] = w.self_cpu
    return res


def visibility_table(title: str, runs: Sequence[dict[str, Any]]) -> None:
    t = Table(title=title)
    for col in ("target/s", "sales ok", "achieved/s", "ack p50", "ack p99", "vis p50",
                "vis p90", "vis p99", "vis max", "first node p50", "missing", "errors",
                "issue late p99", "loop lag p99", "sent / applied", "other work (cores)"):
        t.add_column(col, justify="right")
    for res in runs:
        t.add_row(f"{res['target']:,}", f"{res['ok']:,}", rate(res["achieved"]),
                  f"{res['ack_p50_ms']:.2f}", f"{res['ack_p99_ms']:.2f}",
                  f"{res['vis_p50_ms']:.2f}", f"{res['vis_p90_ms']:.2f}",
                  f"{res['vis_p99_ms']:.2f}", f"{res['vis_max_ms']:.1f}",
                  f"{res['first_node_p50_ms']:.2f}", str(res["missing"]),
                  str(sum(res["errors"].values()) + res["shed"]),
                  f"{res['issue_late_p99_ms']:.2f}", f"{res['loop_lag']['p99_ms']:.1f}",
                  f"{res['sync']['send_amplification']:.2f}", f"{res['other_cores']:.2f}")
    console.print(t)
    last = runs[-1]
    console.print(
        "  (ms) ack = from the due time to the HTTP response; vis = from the ack to the SSE "
        "event on the LAST of the other nodes; issue late = how far behind schedule this "
        "process sent; loop lag = how late its event loop woke up (it stamps both ends). "
        f"SSE overflows {sum(last['sse_overflows'])}. At {last['target']:,}/s the registers "
        "saw an SSE event carrying their own origin/seq for "
        + ", ".join(f"{k} {v:.0%}" for k, v in last["own_event_share"].items())
        + " of their own sales.")


def print_profiles(prof: Profiler) -> dict[str, Any]:
    rep = prof.report()
    for key, r in rep.items():
        if not r["samples"]:
            continue
        t = Table(title=f"py-spy {key}: {r['samples']:,} samples; threads "
                        + ", ".join(f"{k} {v}" for k, v in r["threads"].items()))
        t.add_column("self", justify="right")
        t.add_column("function (self time)")
        t.add_column("incl.", justify="right")
        t.add_column("mesh function (inclusive)")
        ours = [(f, v) for f, v in r["inclusive"] if f.split(" (")[-1].rstrip(")")
                in _MESH_FILES][:len(r["self"])]
        for i, (f, share) in enumerate(r["self"]):
            g, gs = ours[i] if i < len(ours) else ("", 0.0)
            t.add_row(f"{share:.1%}", f, f"{gs:.1%}" if g else "", g)
        console.print(t)
    return rep

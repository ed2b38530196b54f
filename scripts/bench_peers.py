#!/usr/bin/env python3
"""storemesh side by side with the systems a retailer would pick instead (issue 13).

Four systems, each as separate processes on 127.0.0.1, each given the same paced
open-loop sale load spread over 3 tills (latency counted from each sale's due time, so a
slow system cannot slow the load down: no coordinated omission):

* ``storemesh``: 1 edge + 3 registers, real ``python -m mesh node`` processes started by
  the mesh benchmark's ``Cluster`` (``scripts/bench/harness.py``: full mesh, static
  peers, plaintext loopback, a ``service`` credential), a sale is ``POST /v1/sales`` to
  a register (acknowledged after fsync), visibility from one ``/v1/events`` SSE subscriber per node.
* ``pouchdb``: an express-pouchdb edge (LevelDB) and 3 till processes, each a local
  LevelDB PouchDB in live two-way replication with the edge (scripts/peers/pouch_*.js).
* ``pycrdt``: a pycrdt-websocket server under hypercorn with pycrdt-store's SQLiteYStore,
  and 3 till processes, each a pycrdt Doc synced by a Provider over a WebSocket
  (scripts/peers/ycrdt_*.py).
* ``central``: one aiohttp + SQLite server (WAL, synchronous=FULL, group commit), the
  tills as thin clients: a sale is a POST, the other tills read an SSE feed
  (scripts/peers/central_server.py).

The peers are installed into their own folder (``--cache``, default ``.bench-peers/``,
gitignored): a venv for pycrdt-websocket, pycrdt-store and hypercorn, and npm packages
for pouchdb-node and express-pouchdb. A system whose install fails is reported as
skipped, with the reason.

Per system and rate: achieved rate, ack latency from the due time, p50/p99/max from the
ack to visibility at ALL the other replicas (the till or node that sold it excluded),
CPU per sale over every process of the system (utime + stime from /proc, gross, over the
window from the first sale until the last was visible everywhere), LAN bytes per sale
(TCP payload bytes, from ``ss -ti``, on the sockets between the system's processes; for
the central server, between the tills and the server; for PouchDB, whose replication
opens a connection per request, from the edge's own socket counters), whether the ack means durable,
and whether every replica ended with every sale. Ratios against the central baseline
close the table.

Usage::

    .venv/bin/python scripts/bench_peers.py --quick            # < 2 min
    .venv/bin/python scripts/bench_peers.py                    # 10 s per rate
    .venv/bin/python scripts/bench_peers.py --only storemesh --rates 1200 --seconds 5

Before/after in one run: ``--baseline DIR`` (a directory holding another ``mesh/``, e.g.
``git archive main mesh | tar -x -C DIR``) adds ``storemesh@base``, the same mesh whose
nodes import that copy, run just before ``storemesh``, and a table of the working tree's
figures as ratios to it (LAN bytes, CPU, visibility p99) per rate.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from bench import harness as bm  # scripts/ is on sys.path when run as a script
from benchkit import common_args, run_dir
from rich.table import Table

console = bm.console
HERE = Path(__file__).resolve().parent
PEERS = HERE / "peers"
DEFAULT_CACHE = bm.REPO / ".bench-peers"
TILLS = 3
SKUS = 50
#: Bounds on every wait.
START_S = 60.0
DRAIN_S = 10.0
INSTALL_S = 900.0
SS_EVERY_S = 0.25
PY_PEERS = ("pycrdt-websocket>=0.16", "pycrdt-store>=0.1", "hypercorn>=0.17", "aiohttp>=3.9")
NPM_PEERS = ("pouchdb-node@9", "express-pouchdb@4")


# --- installing the peers ------------------------------------------------------------------


def install_py(cache: Path) -> tuple[Path | None, str]:
    """The peers' own venv (pip); returns its python, or None and the reason."""
    venv = cache / "py"
    py = venv / "bin" / "python"
    probe = [str(py), "-c", "import pycrdt.websocket, pycrdt.store, hypercorn, aiohttp"]
    if py.exists() and subprocess.run(probe, capture_output=True, check=False).returncode == 0:
        return py, ""
    try:
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True,
                       capture_output=True, timeout=INSTALL_S)
        r = subprocess.run([str(py), "-m", "pip", "install", "-q", *PY_PEERS],
                           capture_output=True, text=True, timeout=INSTALL_S, check=False)
    except (OSError, subprocess.SubprocessError) as e:
        return None, f"venv/pip failed: {e}"
    if r.returncode != 0:
        return None, "pip install failed: " + r.stderr.strip().splitlines()[-1][:200]
    return py, ""


def install_js(cache: Path) -> tuple[Path | None, str]:
    """npm packages for PouchDB; returns node_modules, or None and the reason."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        return None, "node/npm not on PATH"
    js = cache / "js"
    mods = js / "node_modules"
    if (mods / "pouchdb-node").is_dir() and (mods / "express-pouchdb").is_dir():
        return mods, ""
    js.mkdir(parents=True, exist_ok=True)
    if not (js / "package.json").exists():
        (js / "package.json").write_text('{"name": "bench-peers", "private": true}\n')
    try:
        r = subprocess.run([npm, "install", "--no-audit", "--no-fund", *NPM_PEERS], cwd=js,
                           capture_output=True, text=True, timeout=INSTALL_S, check=False)
    except (OSError, subprocess.SubprocessError) as e:
        return None, f"npm failed: {e}"
    if r.returncode != 0:
        return None, "npm install failed: " + (r.stderr.strip().splitlines() or ["?"])[-1][:200]
    return mods, ""


# --- measuring -----------------------------------------------------------------------------

_SS_SOCK = re.compile(r"(\S+):(\d+)\s+(\S+):(\d+)\s+users:\(\(\"[^\"]*\",pid=(\d+)")
_SS_SENT = re.compile(r"bytes_sent:(\d+)")


def tcp_sockets() -> dict[tuple[int, int], tuple[int, int]]:
    """Established loopback TCP sockets: (local port, peer port) -> (owner pid, bytes sent)."""
    try:
        out = subprocess.run(["ss", "-tinpH", "state", "established"], capture_output=True,
                             text=True, timeout=10, check=False).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    socks: dict[tuple[int, int], tuple[int, int]] = {}
    key: tuple[int, int] | None = None
    pid = 0
    for line in out.splitlines():
        if not line.startswith(("\t", " ")):
            m = _SS_SOCK.search(line)
            key = None
            if m and m.group(1).startswith("127.") and m.group(3).startswith("127."):
                key, pid = (int(m.group(2)), int(m.group(4))), int(m.group(5))
        elif key is not None:
            s = _SS_SENT.search(line)
            socks[key] = (pid, int(s.group(1)) if s else 0)
            key = None
    return socks


class LanMeter:
    """TCP payload bytes sent between a set of processes, sampled every SS_EVERY_S (so a
    connection that closes between two samples loses at most its last interval)."""

    def __init__(self, pids: set[int]) -> None:
        self.pids = pids
        self.start: dict[tuple[int, int], tuple[int, int]] = {}
        self.last: dict[tuple[int, int], tuple[int, int]] = {}
        self._task: asyncio.Task[None] | None = None

    async def _sample(self) -> None:
        while True:
            socks = await asyncio.to_thread(tcp_sockets)
            self.last.update(socks)
            await asyncio.sleep(SS_EVERY_S)

    async def begin(self) -> None:
        self.start = await asyncio.to_thread(tcp_sockets)
        self.last = dict(self.start)
        self._task = asyncio.create_task(self._sample())

    async def end(self) -> int:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self.last.update(await asyncio.to_thread(tcp_sockets))
        total = 0
        for (lport, pport), (pid, sent) in self.last.items():
            peer = self.last.get((pport, lport))
            if pid in self.pids and peer is not None and peer[0] in self.pids:
                total += sent - self.start.get((lport, pport), (pid, 0))[1]
        return total


def cpu_of(pids: Sequence[int]) -> float:
    return sum(bm.proc_cpu(p) for p in pids)


# --- one sale, the load --------------------------------------------------------------------


@dataclass(slots=True)
class Sale:
    till: int
    due: float
    key: str = ""
    ack: float = 0.0
    ok: bool = False
    seq: int = 0  # storemesh: the envelope's seq (key holds the origin)


class System:
    """One system under test: processes, a sell operation, visibility at every replica."""

    name = ""
    durable = ""
    topology = ""
    skip_reason = ""

    def __init__(self, root: Path) -> None:
        self.root = root / self.name
        self.root.mkdir(parents=True)

    def pids(self) -> list[int]:
        raise NotImplementedError

    def lan_pids(self) -> set[int]:
        return set(self.pids())

    async def start(self, http: aiohttp.ClientSession) -> None:
        raise NotImplementedError

    async def sell(self, http: aiohttp.ClientSession, s: Sale, txn: str, sku: str) -> None:
        raise NotImplementedError

    def seen_times(self, s: Sale) -> list[float | None]:
        """When the sale became visible at each replica other than the one that sold it."""
        raise NotImplementedError

    async def converged(self, http: aiohttp.ClientSession, n_sales: int) -> bool:
        """Every replica holds every acknowledged sale."""
        raise NotImplementedError

    async def lan_bytes(self) -> int | None:
        """LAN bytes so far as the system counts them itself; None: use the socket meter."""
        return None

    async def stop(self) -> None:
        raise NotImplementedError


class LineProcs(System):
    """Systems whose processes we wrote: commands on stdin (``sale ID SKU``), and on
    stdout ``ready``, ``ack ID`` and ``seen ID``, timestamped here when read."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.aprocs: list[asyncio.subprocess.Process] = []
        self.seen: list[dict[str, float]] = []
        self.ready: list[asyncio.Future[str]] = []
        self.acks: dict[str, asyncio.Future[float]] = {}
        self.readers: list[asyncio.Task[None]] = []
        self.till_of: list[int] = []  # process index -> till index (-1: the server)
        self._bytes: asyncio.Future[int] | None = None

    def pids(self) -> list[int]:
        return [p.pid for p in self.aprocs]

    async def spawn(self, args: list[str], till: int, env: dict[str, str] | None = None) -> int:
        log = (self.root / f"proc-{len(self.aprocs)}.log").open("ab")
        p = await asyncio.create_subprocess_exec(
            *args, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=log,
            env={**os.environ, **(env or {})}, cwd=self.root)
        log.close()
        i = len(self.aprocs)
        self.aprocs.append(p)
        self.seen.append({})
        self.till_of.append(till)
        self.ready.append(asyncio.get_running_loop().create_future())
        self.readers.append(asyncio.create_task(self._read(i)))
        return i

    async def _read(self, i: int) -> None:
        p = self.aprocs[i]
        assert p.stdout is not None
        seen, acks = self.seen[i], self.acks
        while line := await p.stdout.readline():
            t = time.perf_counter()
            kind, _, rest = line.decode().strip().partition(" ")
            if kind == "seen":
                seen.setdefault(rest, t)
            elif kind == "ack":
                fut = acks.pop(rest, None)
                if fut is not None and not fut.done():
                    fut.set_result(t)
            elif kind == "err":
                fut = acks.pop(rest, None)
                if fut is not None and not fut.done():
                    fut.set_exception(RuntimeError(f"sale {rest} refused"))
            elif kind == "bytes" and self._bytes is not None and not self._bytes.done():
                self._bytes.set_result(int(rest))
            elif kind == "ready" and not self.ready[i].done():
                self.ready[i].set_result(rest)
        if not self.ready[i].done():
            self.ready[i].set_exception(RuntimeError(f"{self.name} process {i} exited"))

    async def wait_ready(self, i: int) -> str:
        return await asyncio.wait_for(self.ready[i], START_S)

    def till_proc(self, till: int) -> asyncio.subprocess.Process:
        return self.aprocs[self.till_of.index(till)]

    async def sell(self, http: aiohttp.ClientSession, s: Sale, txn: str, sku: str) -> None:
        p = self.till_proc(s.till)
        assert p.stdin is not None
        fut: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        self.acks[txn] = fut
        s.key = txn
        p.stdin.write(f"sale {txn} {sku}\n".encode())
        try:
            s.ack = await asyncio.wait_for(fut, bm.REQUEST_TIMEOUT_S)
            s.ok = True
        except (TimeoutError, RuntimeError):
            s.ack = time.perf_counter()
            self.acks.pop(txn, None)

    def seen_times(self, s: Sale) -> list[float | None]:
        return [self.seen[i].get(s.key) for i, t in enumerate(self.till_of) if t != s.till]

    async def converged(self, http: aiohttp.ClientSession, n_sales: int) -> bool:
        return True  # judged from seen_times: every replica saw every sale

    async def stop(self) -> None:
        for p in self.aprocs:
            if p.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    p.terminate()
        for p in self.aprocs:
            try:
                await asyncio.wait_for(p.wait(), 15)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    p.kill()
                await p.wait()
        for t in self.readers:
            t.cancel()
        await asyncio.gather(*self.readers, return_exceptions=True)


class PouchSystem(LineProcs):
    """LAN bytes from the edge's own socket counters: every replication request goes
    through it, on a new connection each time (``Connection: close``)."""

    name = "pouchdb"
    durable = "no: LevelDB, no fsync"
    topology = "pouchdb-server edge + 3 LevelDB tills, live sync"

    def __init__(self, root: Path, node_modules: Path) -> None:
        super().__init__(root)
        self.env = {"NODE_PATH": str(node_modules)}

    async def start(self, http: aiohttp.ClientSession) -> None:
        (self.root / "edge").mkdir()
        e = await self.spawn(["node", str(PEERS / "pouch_edge.js"), str(self.root / "edge")],
                             -1, self.env)
        port = await self.wait_ready(e)
        for t in range(TILLS):
            (self.root / f"till-{t}").mkdir()
            await self.spawn(["node", str(PEERS / "pouch_till.js"), str(self.root / f"till-{t}"),
                              f"http://127.0.0.1:{port}/store", f"t{t}"], t, self.env)
        await asyncio.gather(*(self.wait_ready(i) for i in range(1, TILLS + 1)))

    async def lan_bytes(self) -> int | None:
        edge = self.aprocs[0]
        assert edge.stdin is not None
        self._bytes = asyncio.get_running_loop().create_future()
        edge.stdin.write(b"bytes\n")
        return await asyncio.wait_for(self._bytes, bm.REQUEST_TIMEOUT_S)


class YcrdtSystem(LineProcs):
    name = "pycrdt"
    durable = "no: in memory; server SQLite later"
    topology = "pycrdt-websocket server + 3 Doc tills"

    def __init__(self, root: Path, python: Path) -> None:
        super().__init__(root)
        self.python = python

    async def start(self, http: aiohttp.ClientSession) -> None:
        port = bm.free_port()
        s = await self.spawn([str(self.python), str(PEERS / "ycrdt_server.py"), str(port),
                              str(self.root / "ystore.db")], -1)
        await self.wait_ready(s)
        for t in range(TILLS):
            await self.spawn([str(self.python), str(PEERS / "ycrdt_till.py"),
                              f"ws://127.0.0.1:{port}/store", f"t{t}"], t)
        await asyncio.gather(*(self.wait_ready(i) for i in range(1, TILLS + 1)))


class CentralSystem(LineProcs):
    name = "central"
    durable = "server only: no offline sale"
    topology = "aiohttp + SQLite server, 3 thin-client tills"

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.url = ""
        self.seen_at: list[dict[str, float]] = [{} for _ in range(TILLS)]
        self.streams: list[asyncio.Task[None]] = []
        self._subscribed = [asyncio.Event() for _ in range(TILLS)]
        self._sse_http: aiohttp.ClientSession | None = None

    def lan_pids(self) -> set[int]:
        return {*self.pids(), os.getpid()}  # the tills are this process

    async def start(self, http: aiohttp.ClientSession) -> None:
        s = await self.spawn([sys.executable, str(PEERS / "central_server.py"),
                              str(self.root / "central.db")], -1)
        self.url = f"http://127.0.0.1:{int(await self.wait_ready(s))}"
        self._sse_http = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=None, sock_read=None, sock_connect=5))
        self.streams = [asyncio.create_task(self._stream(t)) for t in range(TILLS)]
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in self._subscribed)), START_S)

    async def _stream(self, t: int) -> None:
        assert self._sse_http is not None
        seen = self.seen_at[t]
        async with self._sse_http.get(self.url + "/v1/events") as resp:
            buf = b""
            async for chunk in resp.content.iter_any():
                now = time.perf_counter()
                buf += chunk
                cut = buf.rfind(b"\n\n")
                if cut < 0:
                    continue
                block, buf = buf[:cut], buf[cut + 2:]
                if b": subscribed" in block:
                    self._subscribed[t].set()
                for line in block.split(b"\n"):
                    if line.startswith(b"data: "):
                        seen.setdefault(line[6:].decode(), now)

    async def sell(self, http: aiohttp.ClientSession, s: Sale, txn: str, sku: str) -> None:
        s.key = txn
        body = orjson.dumps({"sku": sku, "qty": 1, "txn_id": txn})
        try:
            async with http.post(self.url + "/v1/sales", data=body,
                                 headers={"Content-Type": "application/json"},
                                 timeout=aiohttp.ClientTimeout(total=bm.REQUEST_TIMEOUT_S)
                                 ) as resp:
                await resp.read()
                s.ok = resp.status == 201
        except (TimeoutError, aiohttp.ClientError, OSError):
            pass
        s.ack = time.perf_counter()

    def seen_times(self, s: Sale) -> list[float | None]:
        return [self.seen_at[t].get(s.key) for t in range(TILLS) if t != s.till]

    async def converged(self, http: aiohttp.ClientSession, n_sales: int) -> bool:
        return True  # one copy: the server's

    async def stop(self) -> None:
        for t in self.streams:
            t.cancel()
        await asyncio.gather(*self.streams, return_exceptions=True)
        if self._sse_http is not None:
            await self._sse_http.close()
        await super().stop()


class MeshSystem(System):
    name = "storemesh"
    durable = "yes: fsync on the till's node"
    topology = "1 edge + 3 register nodes, full mesh"

    def __init__(self, root: Path, code: Path | None = None) -> None:
        if code is not None:
            self.name = "storemesh@base"
            self.topology += f" (nodes import {code}/mesh)"
        super().__init__(root)
        self.cl = bm.Cluster(self.root, "mesh", TILLS)
        for node in self.cl.nodes:
            node.code = code  # None: the copy of the working tree (bm.CODE_DIR)
        self.obs: bm.Observer | None = None

    def pids(self) -> list[int]:
        return [n.pid for n in self.cl.nodes]

    async def start(self, http: aiohttp.ClientSession) -> None:
        await self.cl.start(http)
        await bm.stock_receipts(http, self.cl.nodes[0].url, SKUS)
        await bm.converge(http, self.cl.nodes)
        self.obs = bm.Observer(self.cl.nodes)
        await self.obs.start()

    async def sell(self, http: aiohttp.ClientSession, s: Sale, txn: str, sku: str) -> None:
        url = self.cl.nodes[s.till + 1].url + "/v1/sales"
        body = orjson.dumps({"sku": sku, "qty": 1, "txn_id": txn})
        try:
            async with http.post(url, data=body, headers=bm.JSON_HEADERS,
                                 timeout=aiohttp.ClientTimeout(total=bm.REQUEST_TIMEOUT_S)
                                 ) as resp:
                data = await resp.read()
                if resp.status == 201:
                    doc = orjson.loads(data)
                    s.key, s.seq, s.ok = doc["origin"], int(doc["seq"]), True
        except (TimeoutError, aiohttp.ClientError, OSError):
            pass
        s.ack = time.perf_counter()

    def seen_times(self, s: Sale) -> list[float | None]:
        assert self.obs is not None
        origin = s.key.encode()
        return [self.obs.visible_at(n, origin, s.seq) for n in range(len(self.cl.nodes))
                if n != s.till + 1]

    async def converged(self, http: aiohttp.ClientSession, n_sales: int) -> bool:
        try:
            await bm.converge(http, self.cl.nodes, limit_s=DRAIN_S)
        except RuntimeError:
            return False
        return True

    async def stop(self) -> None:
        if self.obs is not None:
            await self.obs.stop()
        self.cl.stop()


async def paced(sys_: System, http: aiohttp.ClientSession, rate: int, seconds: float,
                tag: str, rng: random.Random) -> tuple[list[Sale], float, int]:
    """Open loop: sale i is due at t0 + i/rate, at till i % 3, whatever happened to the
    earlier ones; at most 4 s x rate in flight (past that, sales are shed and counted)."""
    total = int(rate * seconds)
    pending: set[asyncio.Task[None]] = set()
    sales: list[Sale] = []
    shed = 0
    t0 = time.perf_counter() + 0.02
    hard_deadline = t0 + 2 * seconds + 5
    i = 0
    while i < total and time.perf_counter() < hard_deadline:
        now = time.perf_counter()
        due = t0 + i / rate
        if due > now:
            await asyncio.sleep(due - now)
            continue
        while i < total and t0 + i / rate <= now:
            s = Sale(i % TILLS, t0 + i / rate)
            if len(pending) >= 4 * rate:
                shed += 1
            else:
                task = asyncio.create_task(sys_.sell(http, s, f"t{s.till}-{tag}-{i}",
                                                     bm.sku_name(rng.randrange(SKUS))))
                pending.add(task)
                task.add_done_callback(pending.discard)
                sales.append(s)
            i += 1
    if pending:
        await asyncio.wait(pending, timeout=bm.REQUEST_TIMEOUT_S + 5)
    return sales, t0, shed + (total - i)


async def measure(sys_: System, http: aiohttp.ClientSession, rate: int, seconds: float,
                  rng: random.Random) -> dict[str, Any]:
    pids = sys_.pids()
    lan = LanMeter(sys_.lan_pids())
    await lan.begin()
    own0 = await sys_.lan_bytes()
    cpu0, busy0, w0 = cpu_of(pids), bm.machine_busy(), time.perf_counter()
    self0 = time.process_time()
    sales, t0, shed = await paced(sys_, http, rate, seconds, f"r{rate}", rng)
    ok = [s for s in sales if s.ok]
    # drain: until every acknowledged sale is visible everywhere (bounded)
    d0 = time.perf_counter()
    while time.perf_counter() - d0 < DRAIN_S:
        if all(t is not None for s in ok for t in sys_.seen_times(s)):
            break
        await asyncio.sleep(0.05)
    cpu, wall = cpu_of(pids) - cpu0, time.perf_counter() - w0
    other = max(0.0, bm.machine_busy() - busy0 - cpu - (time.process_time() - self0)) / wall
    lan_bytes = await lan.end()
    own1 = await sys_.lan_bytes()
    if own0 is not None and own1 is not None:
        lan_bytes = own1 - own0
    vis: list[float] = []
    missing = 0
    for s in ok:
        times = sys_.seen_times(s)
        if any(t is None for t in times):
            missing += 1
            vis.append(float("inf"))
        else:
            vis.append(max(t for t in times if t is not None) - s.ack)
    last_ack = max((s.ack for s in ok), default=t0)
    n = len(ok)
    conv = missing == 0 and await sys_.converged(http, n)
    return {
        "rate": rate, "seconds": seconds, "issued": len(sales), "ok": n, "shed": shed,
        "failed": len(sales) - n, "achieved": n / max(seconds, last_ack - t0),
        "ack_p50_ms": bm.pct([s.ack - s.due for s in ok], 50) * 1e3,
        "ack_p99_ms": bm.pct([s.ack - s.due for s in ok], 99) * 1e3,
        "vis_p50_ms": bm.pct(vis, 50) * 1e3, "vis_p99_ms": bm.pct(vis, 99) * 1e3,
        "vis_max_ms": max(vis, default=float("nan")) * 1e3, "missing": missing,
        "cpu_ms_per_sale": cpu / n * 1e3 if n else float("nan"),
        "lan_bytes_per_sale": lan_bytes / n if n else float("nan"),
        "converged": conv, "window_s": wall, "other_cores": other,
    }


# --- the run -------------------------------------------------------------------------------


def build(name: str, root: Path, cache: Path, baseline: Path | None = None) -> System | str:
    """The system, or the reason it is skipped."""
    if name == "storemesh":
        return MeshSystem(root)
    if name == "storemesh@base":
        assert baseline is not None
        return MeshSystem(root, baseline)
    if name == "central":
        return CentralSystem(root)
    if name == "pycrdt":
        py, why = install_py(cache)
        return YcrdtSystem(root, py) if py is not None else why
    if name == "pouchdb":
        mods, why = install_js(cache)
        return PouchSystem(root, mods) if mods is not None else why
    raise ValueError(name)


async def run_system(sys_: System, rates: Sequence[int], seconds: float,
                     warm_s: float, prof: bm.Profiler) -> list[dict[str, Any]]:
    rng = random.Random(13)
    http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, limit_per_host=64))
    out = []
    try:
        await sys_.start(http)
        await paced(sys_, http, 100, warm_s, "warm", rng)
        await asyncio.sleep(0.5)
        for r in rates:
            if isinstance(sys_, MeshSystem):
                prof.start(f"r{r}", sys_.cl.nodes, seconds)
            res = await measure(sys_, http, r, seconds, rng)
            prof.collect()
            console.print(f"  {sys_.name} {r}/s: achieved {res['achieved']:.0f}/s, "
                          f"vis p99 {res['vis_p99_ms']:.1f} ms, "
                          f"{res['cpu_ms_per_sale']:.2f} ms CPU/sale, "
                          f"{res['lan_bytes_per_sale']:.0f} B/sale, missing {res['missing']}")
            out.append(res)
            await asyncio.sleep(0.5)
    finally:
        await http.close()
        await sys_.stop()
    return out


def fnum(x: float, digits: int = 1) -> str:
    if x != x:  # NaN
        return "–"
    return "∞" if x == float("inf") else f"{x:,.{digits}f}"


def table(results: dict[str, Any], rates: Sequence[int]) -> None:
    t = Table(title="Sales side by side (3 tills, open loop; vis = ack → visible at all others)")
    for col in ("system", "rate/s", "achieved/s", "ack p99 ms", "vis p50 ms", "vis p99 ms",
                "vis max ms", "CPU ms/sale", "LAN B/sale", "CPU vs central",
                "vis p99 vs central", "converged", "other cores"):
        t.add_column(col, justify="right")
    base = {r["rate"]: r for r in results.get("central", {}).get("runs", [])}
    for name, res in results.items():
        if "skipped" in res:
            t.add_row(name, "", "", "", "", "", "", "", "", "", "",
                      f"skipped: {res['skipped']}", "")
            continue
        for r in res["runs"]:
            b = base.get(r["rate"])
            cpu_x = r["cpu_ms_per_sale"] / b["cpu_ms_per_sale"] if b else float("nan")
            vis_x = r["vis_p99_ms"] / b["vis_p99_ms"] if b else float("nan")
            t.add_row(name, f"{r['rate']:,}", fnum(r["achieved"], 0), fnum(r["ack_p99_ms"]),
                      fnum(r["vis_p50_ms"]), fnum(r["vis_p99_ms"]), fnum(r["vis_max_ms"]),
                      fnum(r["cpu_ms_per_sale"], 2), fnum(r["lan_bytes_per_sale"], 0),
                      f"{fnum(cpu_x, 2)}×", f"{fnum(vis_x, 1)}×",
                      "yes" if r["converged"] else f"NO ({r['missing']} missing)",
                      fnum(r["other_cores"], 2))
    console.print(t)
    g = Table(title="What each system is and guarantees")
    for col in ("system", "topology", "durable at ack"):
        g.add_column(col)
    for name, res in results.items():
        if "runs" in res:
            g.add_row(name, res["topology"], res["durable"])
    console.print(g)
    console.print("  CPU: every process of the system, gross (idle included), from the first "
                  "sale until the last was visible everywhere; the load generator and the "
                  "observers are this process and not counted (for central they are the thin "
                  "tills). LAN: TCP payload bytes between the system's processes (central: "
                  "tills <-> server). other cores: CPU used meanwhile by processes outside the "
                  "system and this one (a shared machine's noise).")


def before_after(results: dict[str, Any]) -> None:
    """The working tree's storemesh against ``storemesh@base`` of the same run."""
    base = {r["rate"]: r for r in results.get("storemesh@base", {}).get("runs", [])}
    mine = results.get("storemesh", {}).get("runs", [])
    if not base or not mine:
        return
    t = Table(title="storemesh (working tree) / storemesh@base, same run")
    for col in ("rate/s", "LAN B/sale", "base", "ratio", "CPU ms/sale", "base", "ratio",
                "vis p99 ms", "base", "ratio"):
        t.add_column(col, justify="right")
    for r in mine:
        b = base.get(r["rate"])
        if b is None:
            continue
        row = [f"{r['rate']:,}"]
        for key, digits in (("lan_bytes_per_sale", 0), ("cpu_ms_per_sale", 2),
                            ("vis_p99_ms", 1)):
            x = r[key] / b[key] if b[key] else float("nan")
            row += [fnum(r[key], digits), fnum(b[key], digits), f"{fnum(x, 2)}×"]
        t.add_row(*row)
    console.print(t)


async def run_all(args: argparse.Namespace, root: Path, prof: bm.Profiler) -> dict[str, Any]:
    results: dict[str, Any] = {}
    names = list(args.only or ["central", "storemesh", "pycrdt", "pouchdb"])
    if args.baseline is not None and "storemesh" in names:
        names.insert(names.index("storemesh"), "storemesh@base")
    for name in names:
        console.rule(f"[bold]{name}")
        s = build(name, root, args.cache, args.baseline)
        if isinstance(s, str):
            console.print(f"  skipped: {s}")
            results[name] = {"skipped": s}
            continue
        try:
            runs = await run_system(s, args.rates, args.seconds, args.warm, prof)
        except (RuntimeError, TimeoutError, OSError) as e:
            console.print(f"  [red]{name} failed: {e!r}[/]")
            results[name] = {"skipped": f"failed: {e!r}"[:200]}
            continue
        results[name] = {"runs": runs, "durable": s.durable, "topology": s.topology}
    return results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    common_args(ap, "3 s per rate (whole run < 2 min)", "keep data directories and logs")
    ap.add_argument("--rates", type=int, nargs="+", default=[100, 400, 1200])
    ap.add_argument("--seconds", type=float, default=None, help="per rate (default 10)")
    ap.add_argument("--warm", type=float, default=None, help="warm-up at 100/s (default 2 s)")
    ap.add_argument("--only", action="append",
                    choices=("central", "storemesh", "pycrdt", "pouchdb"))
    ap.add_argument("--baseline", metavar="DIR", type=Path, default=None,
                    help="also run storemesh with its nodes importing DIR/mesh (before/after "
                         "in one run)")
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE,
                    help="where the peers are installed (default .bench-peers/)")
    ap.add_argument("--profile", metavar="DIR", type=Path, default=None,
                    help="py-spy the storemesh nodes during each rate into DIR (perturbs "
                         "the figures; not for the record)")
    ap.add_argument("--py-spy", default=shutil.which("py-spy")
                    or (str(DEFAULT_CACHE / "py" / "bin" / "py-spy")
                        if (DEFAULT_CACHE / "py" / "bin" / "py-spy").exists() else None))
    args = ap.parse_args(argv)
    if args.baseline is not None and not (args.baseline / "mesh" / "__init__.py").is_file():
        ap.error(f"--baseline: {args.baseline}/mesh/__init__.py not found")
    if args.profile is not None and not args.py_spy:
        ap.error("--profile needs py-spy (pip install py-spy, or --py-spy PATH)")
    prof = bm.Profiler(args.py_spy if args.profile else None, args.profile)
    if args.seconds is None:
        args.seconds = 3.0 if args.quick else 10.0
    if args.warm is None:
        args.warm = 1.0 if args.quick else 2.0
    if not all(1 <= r <= 5_000 for r in args.rates) or not 0.5 <= args.seconds <= 120:
        ap.error("rates must be within 1..5000/s and --seconds within 0.5..120")
    root, started = run_dir("bench_peers", args.dir)
    bm.CODE_DIR = bm.snapshot_code(root)
    head = bm.git_head()
    console.print(f"bench_peers started {started}; {os.cpu_count()} CPUs, load "
                  f"{os.getloadavg()[0]:.2f}; commit {head}; rates {args.rates} x "
                  f"{args.seconds:g} s; data in {root}")
    cal = bm.calibrate(1.0)
    console.print(f"calibration: Ed25519 verify {cal['verify_per_cpu_s']:,.0f}/CPU-s")
    t0 = time.perf_counter()
    try:
        results = asyncio.run(run_all(args, root, prof))
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    table(results, args.rates)
    before_after(results)
    if prof.on:
        bm.print_profiles(prof)
    console.print(f"total {time.perf_counter() - t0:.0f} s; load average now "
                  f"{os.getloadavg()[0]:.2f}")
    if args.json is not None:
        args.json.write_bytes(orjson.dumps(
            {"started": started, "commit": head, "command": " ".join(sys.argv),
             "calibration": cal, "rates": args.rates, "seconds": args.seconds,
             "results": results}, option=orjson.OPT_INDENT_2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

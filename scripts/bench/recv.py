"""Experiment 4 of scripts/bench_mesh.py: the receive path alone (one node process fed
pre-signed envelopes over real sessions), optionally A/B against a baseline copy of mesh/."""

from __future__ import annotations

import asyncio
import os
import random
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import aiohttp
from rich.table import Table

from bench.catchup import _gen_chain
from bench.harness import (
    CONVERGE_TIMEOUT_S,
    REQUEST_TIMEOUT_S,
    STORE,
    CpuWindow,
    NodeProc,
    Profiler,
    Sizes,
    console,
    free_port,
    idle_rates,
    ledger_counts,
    now_ms,
    pct,
    rate,
)
from mesh.core.sync import encode_batch
from mesh.net import transport
from mesh.store.datadir import NodeIdentity, enrol_node, init_store, load_identity

RECV_REGIMES = ((1, 400), (3, 1_200), (3, 6_000))


class Feeder:
    """Registers of the store dialled into one node from this process (real handshake)."""

    def __init__(self, idents: Sequence[NodeIdentity], chains: Sequence[list[bytes]]) -> None:
        self.idents = idents
        self.chains = chains
        self.pos = [0] * len(chains)
        self.sessions: list[transport.Session] = []
        self.tasks: list[asyncio.Task[None]] = []

    async def connect(self, http: aiohttp.ClientSession, url: str) -> None:
        for ident in self.idents:
            s = await transport.dial(http, url, ident, now_ms)
            self.sessions.append(s)
            self.tasks.append(asyncio.create_task(s.run(lambda _p, _d: None)))

    async def feed(self, senders: int, per_s: int, n: int) -> float:
        """``n`` envelopes from the first ``senders`` registers, round-robin, ONE per
        message (written to the WebSocket directly: the session queue would merge
        them), paced at ``per_s`` in total; returns the seconds it took to send."""
        interval = 1.0 / per_s
        t0 = time.perf_counter()
        async with asyncio.timeout(2 * n * interval + REQUEST_TIMEOUT_S):
            for i in range(n):
                k = i % senders
                raw = self.chains[k][self.pos[k]]
                self.pos[k] += 1
                s = self.sessions[k]
                data = encode_batch([raw])  # coded if the node negotiated z1, as a peer's
                await s.ws.send_bytes(s.codec.encode(data) if s.codec is not None else data)
                delay = t0 + (i + 1) * interval - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
        return time.perf_counter() - t0

    async def close(self) -> None:
        for s in self.sessions:
            s.close()
        await asyncio.gather(*self.tasks, return_exceptions=True)


async def _wait_rows(http: aiohttp.ClientSession, node: NodeProc, want: int) -> None:
    deadline = time.perf_counter() + CONVERGE_TIMEOUT_S
    while (await ledger_counts(http, [node]))[0] < want:
        if time.perf_counter() > deadline:
            raise RuntimeError(f"{node.name} did not apply {want} envelopes in time")
        await asyncio.sleep(0.02)


async def section_recv(root: Path, sz: Sizes, prof: Profiler, rng: random.Random,
                       baseline: Path | None = None) -> dict[str, Any]:
    base = root / "recv"
    (base / "logs").mkdir(parents=True)
    ident = init_store(base / "recv-new", STORE, now_ms=now_ms(), node_id="recv-new")
    assert ident.store_key is not None
    codes: list[tuple[str, Path | None]] = [("working tree", None)]
    if baseline is not None:
        enrol_node(base / "recv-base", ident.store_key, STORE, "edge", now_ms=now_ms(),
                   node_id="recv-base")
        codes.insert(0, ("baseline", baseline))
    dirs = []
    for k in range(max(s for s, _ in RECV_REGIMES)):
        nid = f"reg-{k + 1:02d}"
        enrol_node(base / nid, ident.store_key, STORE, "register", now_ms=now_ms(), node_id=nid)
        dirs.append((str(base / nid), nid))
    warm = 300
    per_sender = warm + sum(int(r * sz.recv_seconds) * sz.recv_rounds // s + 1
                            for s, r in RECV_REGIMES)
    with ProcessPoolExecutor(max_workers=min(len(dirs), os.cpu_count() or 1)) as pool:
        futs = [pool.submit(_gen_chain, d, nid, sz.skus, per_sender, 7 + k, now_ms())
                for k, (d, nid) in enumerate(dirs)]
        chains = [f.result(timeout=600) for f in futs]
    idents = [load_identity(Path(d)) for d, _ in dirs]
    nodes = []
    for label, code in codes:
        name = "recv-base" if code is not None else "recv-new"
        n = NodeProc(name, base / name, base / "logs", code=code)
        n.port = free_port()
        nodes.append((label, n, Feeder(idents, [list(c) for c in chains])))
    http = aiohttp.ClientSession()
    out: dict[str, Any] = {"regimes": [], "codes": [label for label, _ in codes],
                           "baseline": str(baseline) if baseline else None}
    try:
        for _, n, f in nodes:
            n.spawn()
            await n.wait_listening()
            await f.connect(http, n.url)
            await f.feed(len(idents), 2_000, warm * len(idents))
            await _wait_rows(http, n, sum(f.pos))
        idle = await idle_rates([n for _, n, _ in nodes], sz.idle_seconds)
        for senders, per_s in RECV_REGIMES:
            count = int(per_s * sz.recv_seconds)
            rows: dict[str, list[dict[str, float]]] = {label: [] for label, _ in codes}
            for r in range(sz.recv_rounds):
                for i, (label, n, f) in enumerate(nodes):
                    w = CpuWindow.begin([n])
                    if r == 0:
                        prof.start(f"recv-{senders}x{per_s}-{n.name}", [n], sz.recv_seconds)
                    sent_s = await f.feed(senders, per_s, count)
                    await _wait_rows(http, n, sum(f.pos))
                    w.end([n])
                    prof.collect()
                    net = w.net(idle[i:i + 1])[0]
                    rows[label].append({"ms_per_1k": net / count * 1e6,
                                        "loop_ms_per_1k": w.loop[0] / count * 1e6,
                                        "achieved": count / sent_s,
                                        "other_cores": w.other_cores})
            out["regimes"].append({"senders": senders, "rate": per_s, "envelopes": count,
                                   "rounds": rows})
    finally:
        for _, _, f in nodes:
            await f.close()
        await http.close()
        for _, n, _ in nodes:
            n.stop()
    recv_table(out)
    return out


def recv_table(out: dict[str, Any]) -> None:
    t = Table(title="4. Receive path alone: CPU of ONE node per 1,000 envelopes applied, "
                    "one envelope per message (median of the rounds, idle subtracted)")
    for col in ("senders", "rate/s", "mesh/", "ms / 1,000", "min", "loop thread",
                "achieved/s", "other (cores)"):
        t.add_column(col, justify="right")
    for reg in out["regimes"]:
        for label, rounds in reg["rounds"].items():
            ms = sorted(x["ms_per_1k"] for x in rounds)
            med = pct(ms, 50)
            reg.setdefault("median_ms_per_1k", {})[label] = med
            t.add_row(str(reg["senders"]), f"{reg['rate']:,}", label, f"{med:.0f}",
                      f"{ms[0]:.0f}", f"{pct([x['loop_ms_per_1k'] for x in rounds], 50):.0f}",
                      rate(pct([x["achieved"] for x in rounds], 50)),
                      f"{pct([x['other_cores'] for x in rounds], 50):.2f}")
    console.print(t)


# --- section 3: ramp (1 edge + 8 registers) ----------------------------------------------

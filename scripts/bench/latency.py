"""Experiment 1-2 of scripts/bench_mesh.py: visibility latency at 1,200 sales/s in 1 edge + 3
registers, and the CPU cost per envelope (baseline, push, receive)."""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import aiohttp

from bench.harness import (
    STORE,
    Cluster,
    CpuWindow,
    NodeProc,
    Observer,
    Profiler,
    Sizes,
    amplification,
    analyse,
    converge,
    cpu_table,
    free_port,
    idle_rates,
    now_ms,
    paced_sales,
    rate,
    settle,
    stock_receipts,
    sync_counters,
    visibility_run,
    visibility_table,
)
from mesh.store.datadir import enrol_node


async def section_latency(root: Path, sz: Sizes, prof: Profiler,
                          rng: random.Random) -> dict[str, Any]:
    out: dict[str, Any] = {}
    cl = Cluster(root, "latency", 3)
    # a register of the same store that never gets a peer: the no-push baseline (2a)
    enrol_node(cl.root / "reg-solo", cl.store_key, STORE, "register", now_ms=now_ms(),
               node_id="reg-solo")
    solo = NodeProc("reg-solo", cl.root / "reg-solo", cl.root / "logs")
    http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, limit_per_host=64))
    obs: Observer | None = None
    try:
        out["mesh_up_s"] = await cl.start(http)
        solo.port = free_port()
        solo.spawn()
        await solo.wait_listening()
        await stock_receipts(http, cl.nodes[0].url, sz.skus)
        await stock_receipts(http, solo.url, sz.skus)
        await converge(http, cl.nodes)
        # warm-up: keep-alive connections, first pushes
        await asyncio.gather(
            paced_sales(http, cl.nodes, cl.registers, 300, 1.0, "warm", sz.skus, rng),
            paced_sales(http, [solo], [0], 300, 1.0, "warm", sz.skus, rng))
        await converge(http, cl.nodes)
        idle_all = await idle_rates([*cl.nodes, solo], sz.idle_seconds)
        idle, idle_solo = idle_all[:-1], idle_all[-1:]
        out["idle_core_share"] = dict(zip([n.name for n in [*cl.nodes, solo]], idle_all,
                                          strict=True))

        # --- 1. visibility with SSE on every node: a light reference load, then the target
        obs = Observer(cl.nodes)
        await obs.start()
        out["reference"] = await visibility_run(http, cl, obs, sz.lat_ref_rate,
                                                sz.lat_ref_seconds, "ref", idle, sz, rng, prof)
        await converge(http, cl.nodes)
        out["visibility"] = await visibility_run(http, cl, obs, sz.lat_rate, sz.lat_seconds,
                                                 "lat", idle, sz, rng, prof)
        await obs.stop()
        obs = None
        await converge(http, cl.nodes)
        visibility_table(f"1. Visibility: 1 edge + 3 registers, open loop, SSE on all 4 nodes "
                         f"({sz.lat_ref_seconds:.0f} s and {sz.lat_seconds:.0f} s)",
                         [out["reference"], out["visibility"]])

        # --- 2a/2b/2c. costs without SSE: a register with no peers vs reg-01 selling
        # into 3 peers (interleaved), then 3 registers at the full rate
        out["costs"] = await interleaved_costs(http, cl, solo, idle, idle_solo, sz, rng, prof)
        out["cost_three_sellers"] = await cost_run(
            http, cl, cl.registers, sz.lat_rate, sz.cost_seconds, idle, "c3", sz, rng, prof,
            "2c. CPU, 3 registers at {rate}/s in total, no SSE")
    finally:
        if obs is not None:
            await obs.stop()
        await http.close()
        solo.stop()
        cl.stop()
    return out


async def cost_slice(http: aiohttp.ClientSession, nodes: Sequence[NodeProc],
                     sellers: list[int], target: int, seconds: float, tag: str, sz: Sizes,
                     rng: random.Random, prof: Profiler | None
                     ) -> tuple[CpuWindow, list[float], list[int], dict[str, Any]]:
    """One paced run without SSE, CPU counted until every node holds every envelope and
    nothing is being sent any more."""
    if len(nodes) > 1:
        await settle(http, nodes)
    sc0 = await sync_counters(http, nodes)
    w = CpuWindow.begin(nodes)
    if prof is not None:
        prof.start(f"cost-{tag}", nodes, seconds)
    run = await paced_sales(http, nodes, sellers, target, seconds, tag, sz.skus, rng)
    if len(nodes) > 1:
        await settle(http, nodes)
    w.end(nodes)
    if prof is not None:
        prof.collect()
    sc1 = await sync_counters(http, nodes)
    sold = Counter(s.node for s in run.sales if s.status == 201)
    res = analyse(run, None)
    res["sync"] = amplification(sc0, sc1)
    return (w, [b[0] - a[0] for a, b in zip(sc0, sc1, strict=True)],
            [sold[i] for i in range(len(nodes))], res)


def _envs(nodes: Sequence[NodeProc], recv: Sequence[float],
          sold: Sequence[int]) -> dict[str, tuple[str, float]]:
    """What to divide each node's CPU by: its sales if it only sold, its received
    envelopes if it only received (nodes that did both get no per-1,000 figure)."""
    envs: dict[str, tuple[str, float]] = {}
    for n, r, s in zip(nodes, recv, sold, strict=True):
        if s and not r:
            envs[n.name] = ("sold", s)
        elif r and not s:
            envs[n.name] = ("recv", r)
    return envs


async def interleaved_costs(http: aiohttp.ClientSession, cl: Cluster, solo: NodeProc,
                            idle: Sequence[float], idle_solo: Sequence[float], sz: Sizes,
                            rng: random.Random, prof: Profiler) -> dict[str, Any]:
    """2a/2b: the same rate on a register with no peers and on reg-01 with 3 peers, in
    alternating slices, so that both see the same background load on a shared machine."""
    slice_s = sz.cost_seconds / sz.cost_rounds
    solo_w: list[CpuWindow] = []
    mesh_w: list[CpuWindow] = []
    solo_sold = 0
    recv = [0.0] * len(cl.nodes)
    sold = [0] * len(cl.nodes)
    runs: dict[str, list[dict[str, Any]]] = {"solo": [], "one_seller": []}
    for r in range(sz.cost_rounds):
        p = prof if r == 0 else None
        w, _, s_sold, res = await cost_slice(http, [solo], [0], sz.cost_rate, slice_s,
                                             f"solo{r}", sz, rng, p)
        solo_w.append(w)
        solo_sold += s_sold[0]
        runs["solo"].append(res)
        w, rc, sd, res = await cost_slice(http, cl.nodes, [1], sz.cost_rate, slice_s,
                                          f"c1r{r}", sz, rng, p)
        mesh_w.append(w)
        recv = [a + b for a, b in zip(recv, rc, strict=True)]
        sold = [a + b for a, b in zip(sold, sd, strict=True)]
        runs["one_seller"].append(res)
    ws = CpuWindow.merge(solo_w)
    wm = CpuWindow.merge(mesh_w)
    out: dict[str, Any] = {"rounds": sz.cost_rounds, "slice_s": slice_s, "runs": runs}
    out["solo"] = {"sold": solo_sold, "cpu": cpu_table(
        f"2a. CPU, a register with NO peers selling {sz.cost_rate:,}/s "
        f"({sz.cost_rounds} slices of {slice_s:.1f} s, interleaved with 2b)", ws, idle_solo,
        {solo.name: ("sold", solo_sold)})}
    out["one_seller"] = {"sold": sold, "received": recv, "cpu": cpu_table(
        f"2b. CPU, reg-01 selling {sz.cost_rate:,}/s into 3 peers, no SSE "
        f"({sz.cost_rounds} slices of {slice_s:.1f} s)", wm, idle, _envs(cl.nodes, recv, sold))}
    return out


async def cost_run(http: aiohttp.ClientSession, cl: Cluster, sellers: list[int], target: int,
                   seconds: float, idle: Sequence[float], tag: str, sz: Sizes,
                   rng: random.Random, prof: Profiler, title: str) -> dict[str, Any]:
    w, recv, sold, res = await cost_slice(http, cl.nodes, sellers, target, seconds, tag, sz,
                                          rng, prof)
    res["received"] = recv
    res["sold"] = sold
    res["cpu"] = cpu_table(title.format(rate=f"{target:,}") + f" ({w.wall:.1f} s; "
                           f"{rate(res['achieved'])}/s achieved; envelopes sent / applied "
                           f"{res['sync']['send_amplification']:.2f})", w, idle,
                           _envs(cl.nodes, recv, sold))
    res["cpu_wall_s"] = w.wall
    return res


# --- section 4: the receive path alone -----------------------------------------------------

#: (senders, envelopes per second in total), one envelope per message: a register's pushes
#: at a typical rate, three registers at the issue's 1,200/s, and an offered load near
#: what one core should absorb (the goal: 6,600/s).

"""Experiment 3 of scripts/bench_mesh.py: 1 edge + 8 registers, the rate stepped up until p99
visibility passes 150 ms."""

from __future__ import annotations

import contextlib
import random
from pathlib import Path
from typing import Any

import aiohttp
from rich.table import Table

from bench.harness import (
    NEAR_REAL_TIME_MS,
    Cluster,
    CpuWindow,
    LoopLag,
    Observer,
    Profiler,
    Sizes,
    amplification,
    analyse,
    console,
    converge,
    fms,
    idle_rates,
    paced_sales,
    rate,
    settle,
    stock_receipts,
    sync_counters,
    wait_visible,
)
from bench.latency import cost_run


async def section_ramp(root: Path, sz: Sizes, prof: Profiler,
                       rng: random.Random) -> dict[str, Any]:
    out: dict[str, Any] = {"steps": []}
    cl = Cluster(root, "ramp", sz.ramp_registers)
    http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, limit_per_host=64))
    obs: Observer | None = None
    try:
        out["mesh_up_s"] = await cl.start(http)
        await stock_receipts(http, cl.nodes[0].url, sz.skus)
        await converge(http, cl.nodes)
        await paced_sales(http, cl.nodes, cl.registers, 400, 1.0, "warm", sz.skus, rng)
        await converge(http, cl.nodes)
        idle = await idle_rates(cl.nodes, sz.idle_seconds)
        out["edge_absorb"] = await cost_run(
            http, cl, cl.registers, sz.ramp_cost_rate, sz.ramp_cost_seconds, idle, "r",
            sz, rng, prof, f"3a. CPU, {sz.ramp_registers} registers at {{rate}}/s in total, "
                           "no SSE")
        obs = Observer(cl.nodes)
        await obs.start()
        t = Table(title=f"3. Ramp: 1 edge + {sz.ramp_registers} registers, SSE on all "
                        f"{len(cl.nodes)} nodes, {sz.ramp_seconds:.0f} s per step")
        for col in ("target/s", "achieved/s", "ack p50", "ack p99", "vis p50", "vis p99",
                    "vis max", "missing", "errors+shed", "nodes CPU (cores)",
                    "edge % core", "edge ms/1k recv", "max reg % core", "bench % core",
                    "sent / applied", "other work (cores)",
                    "loop lag p99", "p99 < 150 ms"):
            t.add_column(col, justify="right")
        for step in sz.ramp_steps:
            with contextlib.suppress(RuntimeError):
                await settle(http, cl.nodes, limit_s=15)
            sc0 = await sync_counters(http, cl.nodes)
            lag = LoopLag()
            lag.start()
            w = CpuWindow.begin(cl.nodes)
            prof.start(f"ramp{step}", [cl.nodes[0], cl.nodes[1]], sz.ramp_seconds)
            run = await paced_sales(http, cl.nodes, cl.registers, step, sz.ramp_seconds,
                                    f"ramp{step}", sz.skus, rng)
            drain = await wait_visible(obs, run)
            with contextlib.suppress(RuntimeError):
                await settle(http, cl.nodes, limit_s=15)
            w.end(cl.nodes)
            prof.collect()
            loop_lag = await lag.stop()
            sc1 = await sync_counters(http, cl.nodes)
            res = analyse(run, obs)
            res["sync"] = amplification(sc0, sc1)
            net = w.net(idle)
            res["edge_received"] = sc1[0][0] - sc0[0][0]
            res["edge_ms_per_1k"] = (net[0] / res["edge_received"] * 1e6
                                     if res["edge_received"] else float("nan"))
            res.update(step=step, drain_s=drain, loop_lag=loop_lag,
                       nodes_cores=sum(net) / w.wall, edge_core=net[0] / w.wall,
                       max_reg_core=max(net[1:]) / w.wall, bench_core=w.self_cpu / w.wall,
                       other_cores=w.other_cores, overflows=sum(obs.overflows))
            bad = sum(res["errors"].values()) + res["shed"]
            res["pass"] = (res["vis_p99_ms"] < NEAR_REAL_TIME_MS and res["missing"] == 0
                           and bad == 0 and res["achieved"] >= 0.95 * step)
            out["steps"].append(res)
            t.add_row(f"{step:,}", rate(res["achieved"]), f"{res['ack_p50_ms']:.1f}",
                      f"{res['ack_p99_ms']:.1f}", f"{res['vis_p50_ms']:.1f}",
                      fms(res["vis_p99_ms"] / 1e3), fms(res["vis_max_ms"] / 1e3),
                      str(res["missing"]), str(bad), f"{res['nodes_cores']:.2f}",
                      f"{res['edge_core']:.0%}", f"{res['edge_ms_per_1k']:.0f}",
                      f"{res['max_reg_core']:.0%}",
                      f"{res['bench_core']:.0%}", f"{res['sync']['send_amplification']:.2f}",
                      f"{res['other_cores']:.2f}",
                      f"{loop_lag['p99_ms']:.1f}",
                      "[green]yes[/]" if res["pass"] else "[red]no[/]")
            if not res["pass"]:
                break
        console.print(t)
        passed = [s["step"] for s in out["steps"] if s["pass"]]
        out["max_sustained"] = max(passed, default=0)
        out["first_fail"] = next((s["step"] for s in out["steps"] if not s["pass"]), None)
    finally:
        if obs is not None:
            await obs.stop()
        await http.close()
        cl.stop()
    return out


# --- section 4: catch-up -----------------------------------------------------------------

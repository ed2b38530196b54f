"""Experiment 5 of scripts/bench_mesh.py: a register back after missing N envelopes; time until
it holds what the edge holds."""

from __future__ import annotations

import asyncio
import os
import random
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import aiohttp
from rich.table import Table

from bench.harness import (
    CATCHUP_TIMEOUT_S,
    STOCK,
    STORE,
    Cluster,
    CpuWindow,
    Profiler,
    Sizes,
    console,
    converge,
    get_json,
    ledger_counts,
    now_ms,
    paced_sales,
    rate,
    sku_name,
    stock_receipts,
)
from mesh.core.envelope import decode
from mesh.core.replica import Replica
from mesh.durable import DurableReplica
from mesh.store.datadir import enrol_node, load_identity


def _gen_chain(data_dir: str, node_id: str, skus: int, n_sales: int, seed: int,
               t0: int) -> list[bytes]:
    """A worker process: receipts for the SKUs, then one-unit sales (real signatures)."""
    ident = load_identity(Path(data_dir))
    r = Replica(STORE, node_id, "register", ident.key)
    rng = random.Random(seed)
    raws = []
    for i in range(skus):
        res = r.receive(sku_name(i), STOCK, txn=f"{node_id}-rx-{i}", now_ms=t0)
        assert res.envelope is not None
        raws.append(res.envelope.raw)
    for i in range(n_sales):
        res = r.sell(sku_name(rng.randrange(skus)), 1, txn=f"{node_id}-s-{i}",
                     staff="st-042", now_ms=t0 + i // 50)
        assert res.envelope is not None
        raws.append(res.envelope.raw)
    return raws


def build_backlog(cl: Cluster, n: int, origins: int, skus: int) -> dict[str, Any]:
    """Write ``n`` envelopes of ``origins`` other registers into the (stopped) edge's
    ledger, interleaved as the edge would have applied them, then a snapshot."""
    t0 = time.perf_counter()
    edge = load_identity(cl.nodes[0].data_dir)
    dirs = []
    for k in range(origins):
        nid = f"away-{k + 1:02d}"
        d = cl.root / nid
        enrol_node(d, cl.store_key, STORE, "register", now_ms=now_ms(), node_id=nid,
                   trust=edge.trust)  # the edge learns their certificates
        dirs.append((str(d), nid))
    edge.save()
    per = n // origins
    with ProcessPoolExecutor(max_workers=min(origins, os.cpu_count() or 1)) as pool:
        futs = [pool.submit(_gen_chain, d, nid, skus, per - skus, 1000 + k, now_ms() - 600_000)
                for k, (d, nid) in enumerate(dirs)]
        chains = [f.result(timeout=600) for f in futs]
    t_gen = time.perf_counter() - t0
    t1 = time.perf_counter()
    dr = DurableReplica.open(cl.nodes[0].data_dir)
    try:
        envs = []
        longest = max(len(c) for c in chains)
        for i in range(longest):  # round-robin: each origin's envelopes stay in order
            for c in chains:
                if i < len(c):
                    envs.append(decode(c[i]))
        writes = []
        for i in range(0, len(envs), 4096):
            now = now_ms()
            applied = [a for env in envs[i:i + 4096] for a in dr.replica.apply(env, now)]
            if applied:  # the sync core's Persist effect, as the driver carries it out
                writes.append(dr.persist(applied))
        for written in writes:
            written.result(timeout=600)
        dr.ledger.save_snapshot(*dr.take_snapshot())  # as a running edge would have
        total = dr.ledger.last_id
    finally:
        dr.close()
    return {"envelopes": len(envs), "generate_s": t_gen, "write_s": time.perf_counter() - t1,
            "edge_ledger": total}


async def section_catchup(root: Path, sz: Sizes, prof: Profiler,
                          rng: random.Random) -> dict[str, Any]:
    out: dict[str, Any] = {}
    cl = Cluster(root, "catchup", 1)
    edge, reg = cl.nodes
    http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, limit_per_host=16))
    try:
        await cl.start(http)
        await stock_receipts(http, edge.url, sz.skus)
        await paced_sales(http, cl.nodes, [1], 200, 1.0, "warm", sz.skus, rng)
        await converge(http, cl.nodes)
        reg.stop()
        edge.stop()
        console.print(f"  building a backlog of {sz.catchup_n:,} envelopes from "
                      f"{sz.catchup_origins} other registers in the edge's ledger ...")
        out["backlog"] = build_backlog(cl, sz.catchup_n, sz.catchup_origins, sz.skus)
        edge.peers, reg.peers = [], [edge.url]  # same ports as before
        edge.spawn()
        await edge.wait_listening()
        out["edge_start_s"] = edge.listening_at - edge.started_at
        want = (await ledger_counts(http, [edge]))[0]
        have0 = None
        w = CpuWindow.begin([edge])
        reg.spawn()
        await reg.wait_listening()
        w.cpu0.append(reg.cpu())  # the register's CPU counts from its listening
        w.loop0.append(reg.loop_cpu())
        w.names.append(reg.name)
        prof.start("catchup", cl.nodes, max(3.0, sz.catchup_n / 12_000))
        have = 0
        polls = 0
        deadline = reg.listening_at + CATCHUP_TIMEOUT_S
        while time.perf_counter() < deadline:
            have = (await ledger_counts(http, [reg]))[0]
            polls += 1
            if have0 is None:
                have0 = have
            if have >= want:
                break
            await asyncio.sleep(0.01)
        t_current = time.perf_counter()
        w.end(cl.nodes)
        # edge acknowledges via the register's version vector (every ~1 s at most)
        lag_t = None
        while time.perf_counter() - t_current < 5:
            peers = await get_json(http, edge.url + "/v1/peers")
            if all(p["lag"] == 0 for p in peers["peers"] if p["up"]) and peers["peers"]:
                lag_t = time.perf_counter() - t_current
                break
            await asyncio.sleep(0.02)
        prof.collect()
        se = await get_json(http, edge.url + "/v1/stock?limit=10000")
        sr = await get_json(http, reg.url + "/v1/stock?limit=10000")
        same = ([(i["sku"], i["on_hand"], i["reserved"]) for i in se["stock"]]
                == [(i["sku"], i["on_hand"], i["reserved"]) for i in sr["stock"]])
        missed = want - (have0 or 0)
        listen_to_current = t_current - reg.listening_at
        out.update({
            "edge_envelopes": want, "register_had": have0, "missed": missed,
            "current": have >= want, "stock_equal": same,
            "register_start_s": reg.listening_at - reg.started_at,
            "spawn_to_current_s": t_current - reg.started_at,
            "listen_to_current_s": listen_to_current,
            "rate": missed / listen_to_current if listen_to_current > 0 else float("nan"),
            "edge_lag_zero_after_s": lag_t, "polls": polls,
            "cpu": {"edge": w.cpu[0], reg.name: w.cpu[1]},
            "register_loop_cpu_s": w.loop[1], "other_cores": w.other_cores,
            "register_ms_per_1k": w.cpu[1] / missed * 1e6 if missed else float("nan"),
            "edge_ms_per_1k": w.cpu[0] / missed * 1e6 if missed else float("nan"),
        })
        t = Table(title=f"4. Catch-up: a register rejoins after missing "
                        f"{missed:,} envelopes ({sz.catchup_origins} origins)")
        for col in ("edge start (rebuild)", "register spawn -> listening",
                    "listening -> current", "spawn -> current", "envelopes/s",
                    "register CPU ms/1k", "edge CPU ms/1k", "stock equal",
                    "edge sees lag 0 after"):
            t.add_column(col, justify="right")
        t.add_row(f"{out['edge_start_s']:.2f} s", f"{out['register_start_s']:.2f} s",
                  f"{listen_to_current:.2f} s", f"{out['spawn_to_current_s']:.2f} s",
                  rate(out["rate"]), f"{out['register_ms_per_1k']:.0f}",
                  f"{out['edge_ms_per_1k']:.0f}", "yes" if same else "[red]NO[/]",
                  "–" if lag_t is None else f"{lag_t:.2f} s")
        console.print(t)
        b = out["backlog"]
        console.print(f"  register CPU {w.cpu[1]:.2f} s ({w.loop[1]:.2f} s of it on the event-loop "
                      f"thread) over {listen_to_current:.2f} s; other processes on the "
                      f"machine used {w.other_cores:.2f} cores meanwhile")
        console.print(f"  backlog: generated (signed) in {b['generate_s']:.1f} s, written to "
                      f"the edge's ledger + snapshot in {b['write_s']:.1f} s; "
                      f"edge ledger {b['edge_ledger']:,} rows")
    finally:
        await http.close()
        cl.stop()
    return out


# --- summary -----------------------------------------------------------------------------

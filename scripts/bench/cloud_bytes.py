"""Experiment 1 of scripts/bench_cloud.py: bytes per sale on the WAN link, against one JSON
POST per sale, with the ablations of each WAN measure."""

from __future__ import annotations

import asyncio
from dataclasses import asdict
from pathlib import Path
from typing import Any

from rich.table import Table

#: Bearer key of the naive cloud API: 40 characters, like any real API key.
from bench.cloud_harness import (
    VARIANT_LABEL,
    CloudProcess,
    Poster,
    Rig,
    Sizes,
    StoreDirs,
    Wire,
    close_rig,
    console,
    fmt,
    make_schedule,
    make_store,
    sell_loop,
    settle,
    start_post_server,
    start_rig,
    variant_patches,
    wait_current,
    wait_links_known,
    wire_sum,
)


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
    clouds = {"wan": CloudProcess(cloud_root, root / "cloud-1.log")}
    if "lan-path" in stores:
        clouds["lan-path"] = CloudProcess(stores["lan-path"].cloud, root / "cloud-lan.log",
                                          plain=True)

    async def run() -> dict[str, Any]:
        for c in clouds.values():
            await c.start()
        return await _section_bytes(clouds, stores, sz)
    try:
        return asyncio.run(run())
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

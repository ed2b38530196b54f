"""Experiment 2 of scripts/bench_cloud.py: catch-up after an outage (time, wire bytes, the
cloud's memory, a live sale during it), against a sequential POST replay."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import shutil
import time
from collections import deque
from concurrent.futures import Future
from functools import partial
from pathlib import Path
from typing import Any

import aiohttp
from rich.table import Table

#: Bearer key of the naive cloud API: 40 characters, like any real API key.
from bench.cloud_harness import (
    HDR_PER_SEGMENT,
    LIVE_POLL_S,
    LIVE_SALE_EVERY_S,
    LIVE_SKU,
    N_SKUS,
    POLL_S,
    RECEIPT_QTY,
    REGISTERS,
    SKUS,
    STAFF,
    VARIANT_LABEL,
    WAIT_S,
    CloudApi,
    CloudProcess,
    Poster,
    RssSampler,
    Sizes,
    StoreDirs,
    _receive,
    _sell,
    console,
    fmt,
    held_by_edge,
    make_store,
    now_ms,
    pct,
    post_body,
    rss_mb,
    settle,
    start_post_server,
    tcp_full,
    variant_patches,
    watch_inflight,
)
from mesh import config
from mesh.core.envelope import Envelope
from mesh.core.replica import Replica
from mesh.durable import DurableReplica
from mesh.node.node import Node


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
    await cloud.start()
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
            await cloud.start()
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

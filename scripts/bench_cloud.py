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
import os
import shutil
import sys
import time
from dataclasses import asdict
from typing import Any

import aiohttp
import orjson

#: Bearer key of the naive cloud API: 40 characters, like any real API key.
from bench.cloud_bytes import section_bytes
from bench.cloud_catchup import section_catchup
from bench.cloud_harness import (
    FULL,
    GOAL_LIVE_MS,
    GOAL_PEAK_MB,
    GOAL_REDUCTION,
    GOAL_TRANSIENT_MB,
    QUICK,
    REGISTERS,
    VARIANT_LABEL,
    WAN_RTT_S,
    WAN_UPLINK_BPS,
    Sizes,
    console,
)
from benchkit import (  # scripts/ is on sys.path when run as a script
    common_args,
    print_summary,
    run_dir,
)

from mesh import config


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

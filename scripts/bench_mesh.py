#!/usr/bin/env python3
"""Benchmark of a live mesh: node processes on loopback, HTTP sales, SSE visibility.

Every node is a real ``python -m mesh node`` process on 127.0.0.1 with ``--no-discovery``
and static ``--peer`` URLs (a full mesh: node k dials nodes 0..k-1), so no mDNS traffic
is involved. Identities are enrolled locally (``init_store`` + ``enrol_node``), no join
tokens. The load generator and the SSE readers run in this process and share its clock
(``time.perf_counter``, CLOCK_MONOTONIC).

Sections, each bounded in count and in time:

1. ``latency``: 1 edge + 3 registers, 1,200 sales/s in total (paced open loop, spread
   over the registers, aiohttp with keep-alive connections). For every sale: the time
   from its HTTP acknowledgement on its register to its visibility on every other node
   (``/v1/events`` SSE of every node; an event carries ``origin``/``seq``, and since a
   node applies each origin's envelopes in seq order, an event (O, s) means every seq
   <= s of O is visible there). Also the achieved rate and the HTTP ack latency.
2. costs (part of ``latency``): CPU per 1,000 envelopes from the node processes'
   /proc/PID/stat counters (utime + stime, minus each node's idle rate measured just
   before): a register of the same store with no peers (baseline: HTTP + commit) and
   reg-01 selling into 3 peers (commit + push; the 3 peers give the receive cost), in
   alternating slices so both see the same background load; then 3 registers at
   1,200/s without SSE (receive cost at the edge when pushes batch).
3. ``ramp``: 1 edge + 8 registers; first the edge's receive cost at a high offered
   rate without SSE, then the total rate stepped up (SSE on every node) until the p99
   visibility passes 150 ms (or the rate is not achieved, or a sale is not seen
   everywhere).
4. ``recv``: the receive path alone. ONE node process; this process dials it as 1 or 3
   enrolled registers (real handshake) and feeds envelopes signed beforehand, one per
   message, paced at a fixed total rate; the node's CPU per 1,000 envelopes applied.
   No sender process shares the machine's cores or the node's figures. With
   ``--baseline DIR`` (a directory holding another ``mesh/``, e.g. from
   ``git archive HEAD mesh | tar -x -C DIR``) every regime runs alternately on a node
   importing that copy and on one importing the working tree's, in the same run.
5. ``catchup``: a register is stopped, the edge's ledger gets N envelopes from 8 other
   registers (written offline: applied to the replica, then ``DurableReplica.persist``),
   the register is started again; time until its ledger holds everything the edge holds.

Every window also reports "sent / applied": envelopes sent by all nodes over envelopes
applied (1.00 when each envelope crosses each link once). Machine noise is reported as
"other processes" (busy time of the machine minus the nodes and this process) and by an
Ed25519 calibration at the start and the end. The nodes import a copy of mesh/ taken at
the start, so edits to the working tree during a run cannot mix code versions.

Usage::

    .venv/bin/python scripts/bench_mesh.py --quick          # smoke run, < 60 s
    .venv/bin/python scripts/bench_mesh.py                  # full sizes, a few minutes
    .venv/bin/python scripts/bench_mesh.py --json out.json  # also dump the numbers
    .venv/bin/python scripts/bench_mesh.py --profile DIR    # py-spy the nodes (not for the record)
    .venv/bin/python scripts/bench_mesh.py --observer-nice -5   # on a shared machine
    .venv/bin/python scripts/bench_mesh.py --only recv --baseline DIR   # A/B receive cost
"""


from __future__ import annotations

import argparse
import asyncio
import os
import random
import shutil
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import Any

import orjson
from bench import harness
from bench.catchup import section_catchup
from bench.harness import (
    FULL,
    GOAL_CATCHUP_S,
    GOAL_P99_MS,
    GOAL_RECV_MS_PER_1K,
    NEAR_REAL_TIME_MS,
    QUICK,
    Profiler,
    Sizes,
    calibrate,
    code_fingerprint,
    console,
    git_head,
    print_profiles,
    rate,
    snapshot_code,
)
from bench.latency import section_latency
from bench.ramp import section_ramp
from bench.recv import section_recv
from benchkit import (  # scripts/ is on sys.path when run as a script
    common_args,
    print_summary,
    run_dir,
)


def summary(results: dict[str, Any], sz: Sizes) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []

    def add(figure: str, value: str, goal: str, ok: bool | None) -> None:
        rows.append({"figure": figure, "value": value, "goal": goal, "pass": ok})

    lat = results.get("latency")
    if lat:
        v = lat["visibility"]
        add(f"1 edge + 3 reg, {v['target']:,} sales/s: achieved rate",
            f"{rate(v['achieved'])}/s", f">= {0.99 * v['target']:,.0f}/s (99 %)",
            v["achieved"] >= 0.99 * v["target"])
        add("  HTTP ack latency p50 / p99 (from due time)",
            f"{v['ack_p50_ms']:.2f} / {v['ack_p99_ms']:.2f} ms", "reported", None)
        add("  ack -> visible on all 3 others: p50 / p99",
            f"{v['vis_p50_ms']:.2f} / {v['vis_p99_ms']:.2f} ms", f"p99 < {GOAL_P99_MS:.0f} ms",
            v["vis_p99_ms"] < GOAL_P99_MS)
        add("  same p99 against the industry's 'near real time'",
            f"{v['vis_p99_ms']:.2f} ms", f"< {NEAR_REAL_TIME_MS:.0f} ms",
            v["vis_p99_ms"] < NEAR_REAL_TIME_MS)
        costs = lat["costs"]
        c1 = costs["one_seller"]["cpu"]
        recv_rows = [r for r in c1 if r.get("what") == "recv"]
        if recv_rows:
            worst = max(r["ms_per_1k"] for r in recv_rows)
            add(f"CPU per 1,000 remote envelopes received + applied ({sz.cost_rate}/s "
                f"from 1 sender, worst of 3 receivers)", f"{worst:.0f} ms",
                f"<= {GOAL_RECV_MS_PER_1K:.0f} ms", worst <= GOAL_RECV_MS_PER_1K)
        c3 = lat["cost_three_sellers"]
        e3 = c3["cpu"][0]
        add(f"  same at the edge, {c3['target']:,}/s from 3 senders",
            f"{e3['ms_per_1k']:.0f} ms", f"<= {GOAL_RECV_MS_PER_1K:.0f} ms",
            e3["ms_per_1k"] <= GOAL_RECV_MS_PER_1K)
        ea = (results.get("ramp") or {}).get("edge_absorb")
        if ea:
            r0 = ea["cpu"][0]
            add(f"  same at the edge, {ea['target']:,}/s offered by {sz.ramp_registers} "
                f"senders ({rate(ea['achieved'])}/s achieved)", f"{r0['ms_per_1k']:.0f} ms",
                f"<= {GOAL_RECV_MS_PER_1K:.0f} ms", r0["ms_per_1k"] <= GOAL_RECV_MS_PER_1K)
        e1 = v["cpu"][0]
        add(f"  same at the edge with an SSE subscriber ({v['target']:,}/s, section 1)",
            f"{e1['ms_per_1k']:.0f} ms", "reported", None)
        base = costs["solo"]["cpu"][0]["ms_per_1k"]
        seller = next((r for r in c1 if r.get("what") == "sold"), None)
        add(f"CPU per 1,000 local sales committed, no peers ({sz.cost_rate}/s; HTTP + sign "
            "+ fsync)", f"{base:.0f} ms", "reported", None)
        if seller:
            add("  ... committed and pushed to 3 peers (push share)",
                f"{seller['ms_per_1k']:.0f} ms ({seller['ms_per_1k'] - base:+.0f} ms)",
                "reported", None)
    ramp = results.get("ramp")
    if ramp:
        st = {s["step"]: s for s in ramp["steps"]}
        best = st.get(ramp["max_sustained"])
        detail = (f" (p99 {best['vis_p99_ms']:.1f} ms)" if best else "")
        ff = ramp["first_fail"]
        fail = "" if ff is None else f"; {ff:,}/s failed"
        add(f"1 edge + {sz.ramp_registers} reg: highest rate with p99 visibility < 150 ms",
            f"{ramp['max_sustained']:,}/s{detail}{fail}",
            "reported (this 2-core box)" if ff is not None else "not reached: raise the steps",
            None)
    rv = results.get("recv")
    if rv:
        for reg in rv["regimes"]:
            meds = reg["median_ms_per_1k"]
            mine = meds["working tree"]
            vs = (f" (baseline {meds['baseline']:.0f} ms, {mine / meds['baseline'] - 1:+.0%})"
                  if "baseline" in meds else "")
            top = reg is rv["regimes"][-1]
            add(f"receive path alone: CPU per 1,000 envelopes, {reg['senders']} sender(s) at "
                f"{reg['rate']:,}/s, 1 per message", f"{mine:.0f} ms{vs}",
                f"<= {GOAL_RECV_MS_PER_1K:.0f} ms" if top else "reported",
                mine <= GOAL_RECV_MS_PER_1K if top else None)
    cu = results.get("catchup")
    if cu:
        add(f"catch-up of {cu['missed']:,} envelopes: listening -> current",
            f"{cu['listen_to_current_s']:.2f} s ({rate(cu['rate'])}/s)",
            f"< {GOAL_CATCHUP_S:.0f} s", cu["listen_to_current_s"] < GOAL_CATCHUP_S
            and cu["current"] and cu["stock_equal"])
        add("  ... from the register's process spawn", f"{cu['spawn_to_current_s']:.2f} s",
            f"< {GOAL_CATCHUP_S:.0f} s", cu["spawn_to_current_s"] < GOAL_CATCHUP_S)
    print_summary(console, rows, sz is QUICK)
    return rows




# --- main --------------------------------------------------------------------------------


async def run_all(args: argparse.Namespace, sz: Sizes, root: Path,
                  prof: Profiler) -> dict[str, Any]:
    rng = random.Random(42)
    results: dict[str, Any] = {}
    sections = args.only or ["latency", "ramp", "recv", "catchup"]
    steps: list[tuple[str, Callable[..., Awaitable[dict[str, Any]]]]] = []
    if "latency" in sections:
        steps.append(("latency", section_latency))
    if "ramp" in sections:
        steps.append(("ramp", section_ramp))
    if "recv" in sections:
        steps.append(("recv", partial(section_recv, baseline=args.baseline)))
    if "catchup" in sections:
        steps.append(("catchup", section_catchup))
    for name, fn in steps:
        t0 = time.perf_counter()
        console.rule(f"[bold]{name}")
        results[name] = await fn(root, sz, prof, rng)
        results[name]["section_s"] = time.perf_counter() - t0
    return results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    common_args(ap, "small sizes for a smoke run (< 60 s)", "keep data directories and node logs")
    ap.add_argument("--only", choices=("latency", "ramp", "recv", "catchup"), action="append",
                    help="run only these sections (repeatable; latency includes the costs)")
    ap.add_argument("--catchup-n", type=int, default=None,
                    help="envelopes the rejoining register missed (default 100,000; "
                         "--quick 10,000)")
    ap.add_argument("--profile", metavar="DIR", type=Path, default=None,
                    help="record py-spy profiles of the nodes into DIR (perturbs the figures)")
    ap.add_argument("--py-spy", default=shutil.which("py-spy"),
                    help="path of py-spy (default: from PATH)")
    ap.add_argument("--baseline", metavar="DIR", type=Path, default=None,
                    help="recv section: also run a node importing DIR/mesh, alternately "
                         "with the working tree's (A/B in one run)")
    ap.add_argument("--observer-nice", type=int, default=0, metavar="N",
                    help="run this process (load generator + SSE readers) at niceness N, "
                         "e.g. -5 on a machine shared with other work (nodes keep the default)")
    args = ap.parse_args(argv)
    if args.observer_nice:
        os.setpriority(os.PRIO_PROCESS, 0, args.observer_nice)

    sz = QUICK if args.quick else FULL
    if args.catchup_n is not None:
        if not 1_000 <= args.catchup_n <= 1_000_000:
            ap.error("--catchup-n must be within 1,000..1,000,000")
        sz = Sizes(**{**asdict(sz), "catchup_n": args.catchup_n})
    if args.baseline is not None and not (args.baseline / "mesh" / "__init__.py").is_file():
        ap.error(f"--baseline: {args.baseline}/mesh/__init__.py not found")
    if args.profile is not None and not args.py_spy:
        ap.error("--profile needs py-spy (pip install py-spy, or --py-spy PATH)")
    prof = Profiler(args.py_spy if args.profile else None, args.profile)
    root, started = run_dir("bench_mesh", args.dir)
    harness.CODE_DIR = snapshot_code(root)  # the nodes import this copy
    code0 = code_fingerprint(harness.CODE_DIR)
    head = git_head()
    console.print(f"bench_mesh {'--quick ' if args.quick else ''}started {started}; "
                  f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}; commit {head}, "
                  f"nodes run a copy of mesh/ (fingerprint {code0}); data in {root}; "
                  f"nodes on 127.0.0.1 with "
                  f"--no-discovery and static --peer URLs"
                  + (f"; PROFILING with py-spy into {args.profile}" if prof.on else ""))
    cal0 = calibrate()
    console.print(f"calibration: Ed25519 verify {rate(cal0['verify_per_cpu_s'])}/CPU-s, "
                  f"{rate(cal0['verify_per_wall_s'])}/wall-s on one thread of this process")
    t_all = time.perf_counter()
    results: dict[str, Any] = {}
    try:
        results = asyncio.run(run_all(args, sz, root, prof))
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    rows = summary(results, sz)
    profiles = print_profiles(prof) if prof.on else {}
    total = time.perf_counter() - t_all
    cal1 = calibrate()
    console.print(f"calibration at the end: Ed25519 verify {rate(cal1['verify_per_cpu_s'])}"
                  f"/CPU-s, {rate(cal1['verify_per_wall_s'])}/wall-s")
    code1 = code_fingerprint()
    if code1 != code0:
        console.print(f"note: the working tree's mesh/ is now {code1} (the nodes ran the copy "
                      f"{code0} taken at the start)")
    console.print(f"total {total:.1f} s; load average now {os.getloadavg()[0]:.2f}")
    if args.json is not None:
        doc = {"started": started, "command": " ".join([sys.executable, *sys.argv]),
               "quick": args.quick, "cpus": os.cpu_count(), "commit": head,
               "mesh_fingerprint": [code0, code1], "python": sys.version.split()[0],
               "sizes": asdict(sz), "seconds": total, "results": results, "summary": rows,
               "calibration": [cal0, cal1], "observer_nice": args.observer_nice,
               "profiles": profiles, "profiled": prof.on}
        args.json.write_bytes(orjson.dumps(doc, option=orjson.OPT_INDENT_2
                                           | orjson.OPT_NON_STR_KEYS))
    failed = [r for r in rows if r["pass"] is False]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

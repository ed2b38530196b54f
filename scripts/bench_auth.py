"""What authentication adds to a sale: the device-credential and staff-session check
(mesh.http.gate) against the same node with the check taken out, in one run.

Three modes, each a real ``storemesh`` node process on 127.0.0.1 (plain HTTP, so the
figure is the check's alone; TLS's own cost is ``scripts/bench_tls.py``'s):

* ``baseline``: the gate's middleware replaced, in that process only, by one that hands
  every request a fixed back-office principal without looking at it (the handlers,
  key scoping included, run as usual). Nothing but this script can start a node so.
* ``token``: a back-office integration's device credential (``Authorization: Bearer``):
  route rule, credential (signature check remembered), revocation, expiry, scopes.
* ``token+session``: a till's credential and a cashier's staff session
  (``X-Staff-Session``: HMAC, roster lookup, role) -- the normal path of a sale.

Per mode and round: sequential sales on one keep-alive connection (latency), then
``concurrency`` clients selling as fast as the node answers (throughput, and the node's
CPU per sale from /proc). Modes alternate within a round; the figures are medians over
rounds; ratios are against the baseline of the same run. Then, in this process: the
check's CPU cost alone (µs), a PIN check (scrypt, once per login, not per sale), and
what a refused request (no credential) costs the node next to a sale.

Run: .venv/bin/python scripts/bench_auth.py [--quick] [--json FILE] [--dir DIR] [--keep]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import statistics
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchkit import common_args, print_summary, run_dir

from mesh import config
from mesh.core.auth import (
    DeviceVerifier,
    SessionKeys,
    make_pin_verifier,
    pin_matches,
    revoked_name,
)
from mesh.store import authdir
from mesh.store.datadir import init_store, load_identity
from mesh.testing.cluster import Cluster, NodeProcess

console = Console()
REPO = Path(__file__).resolve().parent.parent
CLK_TCK = os.sysconf("SC_CLK_TCK")
START_TIMEOUT_S = 30.0
MODES = ("baseline", "token", "token+session")
JSON_HEADERS = {"Content-Type": "application/json"}
PIN = "482913"


@dataclass(frozen=True)
class Sizes:
    rounds: int
    sequential: int
    concurrent: int
    concurrency: int
    refusals: int


FULL = Sizes(rounds=6, sequential=1500, concurrent=3000, concurrency=16, refusals=3000)
QUICK = Sizes(rounds=1, sequential=300, concurrent=600, concurrency=16, refusals=600)


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(len(s) * q))]


# --- the node process ---------------------------------------------------------------------


def serve(mode: str, data_dir: Path, port: int, token: str) -> None:
    """``--serve``: run the node; ``baseline`` takes the gate's check out (this process)."""
    from aiohttp import web

    import mesh.http.api
    from mesh.core.auth import parse_device
    from mesh.http import gate
    from mesh.node.node import Node

    if mode == "baseline":
        real_setup = gate.setup_gate

        def setup_without_check(app: web.Application, node: Any) -> gate.Gate:
            g = real_setup(app, node)
            app.middlewares.remove(g.middleware)
            ident = node.identity
            who = gate.Principal(parse_device(token, ident.store_id,
                                              ident.trust.store_public_key))

            @web.middleware
            async def trusted(request: web.Request, handler: Any) -> web.StreamResponse:
                request[gate.PRINCIPAL] = who
                return await handler(request)  # type: ignore[no-any-return]
            app.middlewares.append(trusted)
            return g
        mesh.http.api.setup_gate = setup_without_check  # type: ignore[attr-defined]

    async def run() -> None:
        node = Node(data_dir, http_host="127.0.0.1", http_port=port, discovery=False,
                    insecure_plaintext=True)
        await node.start()
        print(f"bench_auth {mode} node listening on {node.url}", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        await stop.wait()
        await node.close()

    asyncio.run(run())


# --- the load --------------------------------------------------------------------------------


async def _post(http: aiohttp.ClientSession, url: str, body: Any,
                headers: dict[str, str]) -> tuple[int, Any]:
    async with http.post(url, data=orjson.dumps(body), headers=headers) as resp:
        return resp.status, orjson.loads(await resp.read())


def sale() -> dict[str, Any]:
    return {"sku": "BENCH-A", "qty": 1, "txn_id": uuid.uuid4().hex}


async def one_mode(node: NodeProcess, headers: dict[str, str], sz: Sizes) -> dict[str, float]:
    url = node.url + "/v1/sales"
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=sz.concurrency)
                                     ) as http:
        for _ in range(50):  # warm: connections, caches
            status, body = await _post(http, url, sale(), headers)
            assert status == 201, body
        lat = []
        for _ in range(sz.sequential):
            t0 = time.perf_counter()
            status, body = await _post(http, url, sale(), headers)
            lat.append((time.perf_counter() - t0) * 1000)
            assert status == 201, body
        per = sz.concurrent // sz.concurrency

        async def client() -> None:
            for _ in range(per):
                status, body = await _post(http, url, sale(), headers)
                assert status == 201, body
        cpu0, t0 = node.cpu(), time.perf_counter()
        await asyncio.gather(*(client() for _ in range(sz.concurrency)))
        secs, cpu = time.perf_counter() - t0, node.cpu() - cpu0
    n = per * sz.concurrency
    return {"p50_ms": pct(lat, 0.5), "p99_ms": pct(lat, 0.99), "per_s": n / secs,
            "cpu_us_per_sale": cpu / n * 1e6}


async def refusal_cost(node: NodeProcess, sz: Sizes, path: str = "/v1/sales",
                       want: int = 401) -> float:
    """Node CPU per request (µs): by default a sale refused for want of a credential;
    ``path="/v1/health"``, ``want=200``: the cheapest request the node answers (the floor
    of any HTTP request). Sent by several loopback source addresses, 15 requests on one
    connection each (under the per-source throttle's burst)."""
    sources = [f"127.0.{i // 250}.{i % 250 + 2}" for i in range(sz.refusals // 15 + 1)]
    cpu0 = node.cpu()
    n = 0
    for src in sources:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(
                local_addr=(src, 0))) as http:
            for _ in range(min(15, sz.refusals - n)):
                if want == 200:
                    async with http.get(node.url + path) as resp:
                        await resp.read()
                        status = resp.status
                else:
                    status, _ = await _post(http, node.url + path, sale(), JSON_HEADERS)
                assert status == want, status
                n += 1
        if n >= sz.refusals:
            break
    return (node.cpu() - cpu0) / n * 1e6


# --- in-process micro figures -----------------------------------------------------------------


def micro(data_dir: Path, till: str) -> dict[str, float]:
    ident = load_identity(data_dir)
    trust = ident.trust
    ver = DeviceVerifier(ident.store_id, trust.store_public_key)
    ver.parse(till)
    n = 100_000
    t0 = time.perf_counter()
    for _ in range(n):
        cred = ver.parse(till)
        if trust.is_revoked(revoked_name(cred.device_id)) or cred.not_after < 1:
            raise SystemExit("unexpected")
    cached = (time.perf_counter() - t0) / n * 1e6
    t0 = time.perf_counter()
    for _ in range(200):
        DeviceVerifier(ident.store_id, trust.store_public_key).parse(till)
    first = (time.perf_counter() - t0) / 200 * 1e6
    keys = SessionKeys("edge")
    text, _ = keys.issue("till-1", "ann", 0)
    t0 = time.perf_counter()
    for _ in range(n):
        keys.check(text, "till-1", 1)
    session = (time.perf_counter() - t0) / n * 1e6
    verifier = make_pin_verifier(PIN)
    t0 = time.perf_counter()
    for _ in range(5):
        assert pin_matches(verifier, PIN)
    pin_ms = (time.perf_counter() - t0) / 5 * 1000
    return {"token_cached_us": cached, "token_first_sight_us": first,
            "session_us": session, "pin_check_ms": pin_ms}


async def gate_check(data_dir: Path, svc: str, till: str) -> dict[str, float]:
    """CPU µs of ``Gate.authenticate`` for a sale, on a live in-process node (the real
    gate, roster and caches; the request object made once): the check alone, which
    the end-to-end figures cannot resolve from their noise."""
    from aiohttp.test_utils import make_mocked_request

    from mesh.http.gate import GATE
    from mesh.node.node import Node

    shutil.copytree(data_dir.parent / "edge", data_dir, ignore=shutil.ignore_patterns("*.lock"))
    node = Node(data_dir, http_host="127.0.0.1", discovery=False, insecure_plaintext=True)
    await node.start()
    try:
        gate = node.app[GATE]
        for _ in range(100):
            if node.identity.trust.roster is not None:
                break
            await asyncio.sleep(0.1)
        session, _ = gate.sessions.issue("till-1", "ann", node.now_ms())
        out = {}
        for mode, headers in (("token", {"Authorization": f"Bearer {svc}"}),
                              ("token+session", {"Authorization": f"Bearer {till}",
                                                 "X-Staff-Session": session})):
            req = make_mocked_request("POST", "/v1/sales", headers=headers, app=node.app)
            await gate.authenticate(req, "sale", node.now_ms())
            n = 50_000
            c0 = time.thread_time()
            for _ in range(n):
                await gate.authenticate(req, "sale", node.now_ms())
            out[mode] = (time.thread_time() - c0) / n * 1e6
        return out
    finally:
        await node.close()


# --- main --------------------------------------------------------------------------------------


async def run(root: Path, sz: Sizes) -> dict[str, Any]:
    edge = root / "edge"
    init_store(edge, "bench-auth", now_ms=time.time_ns() // 1_000_000, node_id="edge")
    now = time.time_ns() // 1_000_000
    svc = authdir.issue_device_credential(edge, device_id="backoffice", role="service",
                                          now_ms=now, ttl_ms=86_400_000)
    till = authdir.issue_device_credential(edge, device_id="till-1", role="pos", now_ms=now,
                                           ttl_ms=86_400_000)
    authdir.add_staff(edge, staff_id="ann", name="Ann", role="cashier", pin=PIN, now_ms=now)
    logs = root / "logs"
    logs.mkdir()
    cluster = Cluster(logs)
    try:
        return await _rounds(root, edge, cluster, svc, till, sz)
    finally:
        cluster.close()


async def _rounds(root: Path, edge: Path, cluster: Cluster, svc: str, till: str,
                  sz: Sizes) -> dict[str, Any]:
    results: dict[str, list[dict[str, float]]] = {m: [] for m in MODES}
    refused: list[float] = []
    floor: list[float] = []
    for rnd in range(sz.rounds):
        for mode in MODES[rnd % 3:] + MODES[:rnd % 3]:  # each round starts elsewhere
            # each mode its own copy of the store: same size of ledger at every start
            data = root / f"r{rnd}-{mode.replace('+', '-')}"
            shutil.copytree(edge, data, ignore=shutil.ignore_patterns("*.lock"))
            node = cluster.spawn(data.name, ["--serve", mode, str(data), "0", svc],
                                 program=(__file__,), cwd=REPO)
            try:
                await cluster.wait_ready(node, within=START_TIMEOUT_S)
                async with aiohttp.ClientSession() as http:
                    status, body = await _post(http, node.url + "/v1/receipts", {
                        "sku": "BENCH-A", "qty": 1_000_000, "txn_id": "grn"},
                        {**JSON_HEADERS, "Authorization": f"Bearer {svc}"})
                    assert status == 201, body
                    headers = {**JSON_HEADERS, "Authorization": f"Bearer {svc}"}
                    # every mode logs a cashier in once (a PIN check: scrypt, 16 MB, in a
                    # worker thread), so its after-effects are the same in all three
                    for _ in range(100):  # the gate picks the roster up (~1 s)
                        status, body = await _post(
                            http, node.url + "/v1/session",
                            {"staff_id": "ann", "pin": PIN},
                            {**JSON_HEADERS, "Authorization": f"Bearer {till}"})
                        if status == 201:
                            break
                        await asyncio.sleep(0.1)
                    assert status == 201, body
                    if mode == "token+session":
                        headers = {**JSON_HEADERS, "Authorization": f"Bearer {till}",
                                   "X-Staff-Session": body["session"]}
                r = await one_mode(node, headers, sz)
                console.print(f"round {rnd + 1} {mode:<14} p50 {r['p50_ms']:.2f} ms  "
                              f"p99 {r['p99_ms']:.2f} ms  {r['per_s']:.0f} sales/s  "
                              f"{r['cpu_us_per_sale']:.0f} µs CPU/sale")
                if mode == "token":
                    refused.append(await refusal_cost(node, sz))
                    floor.append(await refusal_cost(node, sz, "/v1/health", 200))
            finally:
                cluster.stop(node)
            results[mode].append(r)
    med = {m: {k: statistics.median(r[k] for r in rs) for k in rs[0]}
           for m, rs in results.items()}
    gate_us = await gate_check(root / "gate", svc, till)
    return {"modes": med, "rounds": results, "refusal_cpu_us": statistics.median(refused),
            "health_cpu_us": statistics.median(floor),
            "micro": micro(edge, till), "gate_us": gate_us}


def report(out: dict[str, Any], sz: Sizes, quick: bool) -> list[dict[str, Any]]:
    med, base = out["modes"], out["modes"]["baseline"]
    t = Table(title=f"a sale through the API, by mode (medians of {sz.rounds} round(s); "
                    "ratio to baseline)")
    for col in ("mode", "p50 ms", "p99 ms", "sales/s", "node CPU µs/sale",
                "CPU added µs", "CPU ratio", "p50 ratio", "the check µs"):
        t.add_column(col, justify="right" if col != "mode" else "left")
    for m in MODES:
        r = med[m]
        t.add_row(m, f"{r['p50_ms']:.2f}", f"{r['p99_ms']:.2f}", f"{r['per_s']:.0f}",
                  f"{r['cpu_us_per_sale']:.0f}",
                  f"{r['cpu_us_per_sale'] - base['cpu_us_per_sale']:+.0f}",
                  f"{r['cpu_us_per_sale'] / base['cpu_us_per_sale']:.3f}",
                  f"{r['p50_ms'] / base['p50_ms']:.3f}",
                  "-" if m == "baseline" else f"{out['gate_us'][m]:.1f}")
    console.print(t)
    mi = out["micro"]
    console.print(f"in-process: credential check {mi['token_cached_us']:.2f} µs (signature "
                  f"remembered; first sight {mi['token_first_sight_us']:.0f} µs), staff "
                  f"session check {mi['session_us']:.2f} µs; a PIN check (scrypt n=2^14, "
                  f"once per login) {mi['pin_check_ms']:.1f} ms; a refused request costs "
                  f"the node {out['refusal_cpu_us']:.0f} µs CPU (a GET /v1/health: "
                  f"{out['health_cpu_us']:.0f} µs; a sale: "
                  f"{med['token']['cpu_us_per_sale']:.0f} µs)")
    till = med["token+session"]
    added = till["cpu_us_per_sale"] - base["cpu_us_per_sale"]
    gate_share = out["gate_us"]["token+session"] / base["cpu_us_per_sale"]
    return [
        {"figure": "the till's check (CPU per sale; share of a sale's node CPU)",
         "value": f"{out['gate_us']['token+session']:.1f} µs ({gate_share:.1%})",
         "goal": "< 5 % of a sale", "pass": gate_share < 0.05},
        {"figure": "node CPU per sale, till vs baseline (whole process, noisy)",
         "value": f"{added:+.0f} µs ({till['cpu_us_per_sale'] / base['cpu_us_per_sale']:.3f}x)",
         "goal": "-", "pass": None},
        {"figure": "sale p50 latency, till vs baseline",
         "value": f"{till['p50_ms']:.2f} vs {base['p50_ms']:.2f} ms", "goal": "-",
         "pass": None},
        {"figure": "refused request vs GET /v1/health vs sale, node CPU",
         "value": f"{out['refusal_cpu_us']:.0f} vs {out['health_cpu_us']:.0f} vs "
                  f"{med['token']['cpu_us_per_sale']:.0f} µs",
         "goal": "refusal < 1/2 of a sale",
         "pass": out["refusal_cpu_us"] < 0.5 * med["token"]["cpu_us_per_sale"]},
        {"figure": "PIN check (per login)", "value": f"{mi['pin_check_ms']:.1f} ms",
         "goal": "-", "pass": None},
    ]


def main() -> None:
    if sys.argv[1:2] == ["--serve"]:
        serve(sys.argv[2], Path(sys.argv[3]), int(sys.argv[4]), sys.argv[5])
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common_args(ap, "small sizes, one round (a smoke run)", "keep the data directories")
    args = ap.parse_args()
    sz = QUICK if args.quick else FULL
    root, started = run_dir("bench-auth", args.dir)
    console.rule(f"bench_auth ({started}; AUTH_BURST={config.AUTH_BURST}, "
                 f"{os.cpu_count()} CPUs)")
    try:
        out = asyncio.run(run(root, sz))
        rows = report(out, sz, args.quick)
        print_summary(console, rows, args.quick)
        if args.json:
            args.json.write_bytes(orjson.dumps({"started": started, "quick": args.quick,
                                                **out}, option=orjson.OPT_INDENT_2))
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()

"""`storemesh demo`: a small store mesh on this machine, doing real work.

Starts an edge node and three registers as separate processes on 127.0.0.1. The
registers join with one-time tokens and find the edge and each other with zeroconf
(mDNS bound to loopback). Then it runs a short sales workload with a buy-online-pick-up
order and a last-unit race, shows that every node converged to the same stock and the
same oversell exceptions, and tells you which URLs to open.

Nothing writes without a credential, as in a real store: ``prepare`` issues a device
credential per till (each one bound to its register), one for the back office at the
edge, one for the web shop and one for a read-only screen, puts a manager and three
cashiers on the staff roster (with PINs) and makes an HQ account for the dashboard
(``mesh.store.authdir``, ``mesh.cloud.hq``: what ``storemesh device issue``, ``staff add`` and
``hq add`` do). Each till logs its cashier in with a PIN before selling.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import shutil
import signal
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp
from rich.console import Console
from rich.table import Table

from mesh.cloud.hq import add_user
from mesh.net.enrol import create_token
from mesh.net.hqtls import CA_FILE as HQ_CA_FILE
from mesh.net.tls import api_client_context
from mesh.store import authdir
from mesh.store.datadir import init_store
from mesh.testing.cluster import Cluster, ClusterError, wait_mesh

__all__ = ["run_demo"]

console = Console()
SKUS = {"COFFEE-250G": 60, "OAT-MILK-1L": 60, "CROISSANT": 150, "TEA-GREEN": 50}
LAST = "LAST-BIKE-HELMET"
REGISTERS = ("register-1", "register-2", "register-3")


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


async def _post(http: aiohttp.ClientSession, url: str, path: str,
                body: dict[str, Any], who: dict[str, str]) -> dict[str, Any]:
    async with http.post(url + path, json=body, headers=who) as resp:
        data: dict[str, Any] = await resp.json()
        if resp.status >= 400:
            raise RuntimeError(f"{path} -> {resp.status} {data}")
        return data


async def _get(http: aiohttp.ClientSession, url: str, path: str) -> Any:
    async with http.get(url + path) as resp:
        return await resp.json()


async def _wait_roster(http: aiohttp.ClientSession, urls: dict[str, str], version: int,
                       limit_s: float) -> None:
    """Until every node holds the staff roster (sync carries it from the edge)."""
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < limit_s:
        held = [(await _get(http, u, "/v1/health"))["roster_version"] for u in urls.values()]
        if all(v >= version for v in held):
            return
        await asyncio.sleep(0.1)
    raise RuntimeError(f"the staff roster did not reach every node within {limit_s} s")


async def _converged(http: aiohttp.ClientSession, urls: dict[str, str],
                     limit_s: float) -> tuple[float, dict[str, Any]]:
    t0 = time.perf_counter()
    while True:
        views = {n: await _get(http, u, "/v1/stock") for n, u in urls.items()}
        norm = {n: [(i["sku"], i["on_hand"], i["reserved"]) for i in v["stock"]]
                for n, v in views.items()}
        if len({repr(v) for v in norm.values()}) == 1:
            return time.perf_counter() - t0, views
        if time.perf_counter() - t0 > limit_s:
            diag = {}
            for n, u in urls.items():
                async with http.get(u + "/metrics") as resp:
                    text = await resp.text()
                diag[n] = [ln for ln in text.splitlines()
                           if ln.startswith(("storemesh_envelopes_rejected", "storemesh_peers_up",
                                             "storemesh_peer_lag", "storemesh_envelopes_rec"))]
            raise RuntimeError(f"nodes did not converge within {limit_s} s: {norm} {diag}")
        await asyncio.sleep(0.02)


async def _login(http: aiohttp.ClientSession, url: str, token: str, staff_id: str,
                 pin: str) -> dict[str, str]:
    """A till logs a staff member in (``POST /v1/session``): the headers of its writes."""
    bearer = {"Authorization": f"Bearer {token}"}
    body = await _post(http, url, "/v1/session", {"staff_id": staff_id, "pin": pin}, bearer)
    return {**bearer, "X-Staff-Session": body["session"]}


async def _fleet_sales(http: aiohttp.ClientSession, cloud_url: str, want: int) -> int:
    """Sales the cloud's analytics hold for the store (waits briefly for the WAN batch);
    ``http`` holds an HQ session cookie."""
    total = 0
    for _ in range(150):
        body = await _get(http, cloud_url, "/v1/fleet/sales?store=demo-store&hours=24")
        total = int(body["totals"]["sales"])
        if total >= want:
            break
        await asyncio.sleep(0.1)
    return total


async def _workload(http: aiohttp.ClientSession, urls: dict[str, str], store_on_cloud: str,
                    everyone: dict[str, str], creds: dict[str, Any]) -> dict[str, Any]:
    edge = urls["edge"]
    toks, pins = creds["tokens"], creds["pins"]
    # The manager books the delivery at the back-office till; each cashier logs in at
    # their register (a PIN check against the roster the edge signed).
    anna = await _login(http, edge, toks["backoffice"], "manager-anna", pins["manager-anna"])
    tills = {r: await _login(http, urls[r], toks[f"till-{r[-1]}"], f"cashier-{r[-1]}",
                             pins[f"cashier-{r[-1]}"]) for r in REGISTERS}
    web = {"Authorization": f"Bearer {toks['webshop']}"}
    for sku, qty in SKUS.items():
        await _post(http, edge, "/v1/receipts", {"sku": sku, "qty": qty, "txn_id": f"po-{sku}"},
                    anna)
    await _post(http, edge, "/v1/receipts", {"sku": LAST, "qty": 1, "txn_id": "po-last"}, anna)
    await _converged(http, everyone, 10)
    # A busy few seconds at three tills.
    t0 = time.perf_counter()
    sales = 0

    async def till(name: str, n: int) -> None:
        nonlocal sales
        skus = list(SKUS)
        for i in range(n):
            await _post(http, urls[name], "/v1/sales", {
                "sku": skus[(i * 7 + len(name)) % len(skus)], "qty": 1,
                "txn_id": uuid.uuid4().hex}, tills[name])
            sales += 1
    await asyncio.gather(*(till(n, 40) for n in REGISTERS))
    took = time.perf_counter() - t0
    # Buy online, pick up in store: the web shop reserves through the cloud peer...
    res = await _post(http, store_on_cloud, "/v1/reservations", {
        "sku": "TEA-GREEN", "qty": 2, "txn_id": "web-order-1001", "channel": "webshop",
        "order": "ORD-1001"}, web)
    await _converged(http, everyone, 10)
    # ...and the customer collects it at register-2.
    await _post(http, urls["register-2"], f"/v1/reservations/{res['reservation_id']}/fulfil",
                {"txn_id": "pickup-1001"}, tills["register-2"])
    # The last-unit race: two tills sell the last helmet at the same moment.
    race = await asyncio.gather(
        _post(http, urls["register-1"], "/v1/sales",
              {"sku": LAST, "qty": 1, "txn_id": "race-a"}, tills["register-1"]),
        _post(http, urls["register-3"], "/v1/sales",
              {"sku": LAST, "qty": 1, "txn_id": "race-b"}, tills["register-3"]))
    return {"sales": sales, "seconds": took, "race": race, "tills": tills}


async def _latency(http: aiohttp.ClientSession, urls: dict[str, str], n: int,
                   till: dict[str, str], screen: str) -> list[float]:
    """Time from a sale's acknowledgement at a register to its visibility at every other
    node, observed through the other nodes' live streams (SSE)."""
    others = [u for name, u in urls.items() if name != "register-1"]
    seen: dict[int, list[float]] = {}
    arrived = asyncio.Event()
    ready = asyncio.Event()
    started = 0

    async def listen(url: str) -> None:
        nonlocal started
        async with http.get(url + "/v1/events",
                            headers={"Authorization": f"Bearer {screen}"}) as resp:
            started += 1
            if started == len(others):
                ready.set()
            async for raw in resp.content:
                line = raw.decode().strip()
                if line.startswith("data:") and '"origin":"register-1"' in line:
                    import orjson

                    ev = orjson.loads(line[5:])
                    seen.setdefault(ev["seq"], []).append(time.perf_counter())
                    arrived.set()
    tasks = [asyncio.create_task(listen(u)) for u in others]
    try:
        await asyncio.wait_for(ready.wait(), 5)
        await asyncio.sleep(0.2)
        out = []
        for i in range(n):
            r = await _post(http, urls["register-1"], "/v1/sales", {
                "sku": "CROISSANT", "qty": 1, "txn_id": f"latency-{i}"}, till)
            acked = time.perf_counter()
            while len(seen.get(r["seq"], [])) < len(others):
                arrived.clear()
                try:
                    await asyncio.wait_for(arrived.wait(), 2.0)
                except TimeoutError:
                    break
            if len(seen.get(r["seq"], [])) == len(others):
                out.append((max(seen[r["seq"]]) - acked) * 1000)
            await asyncio.sleep(0.01)
        return out
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _show(views: dict[str, Any], exceptions: dict[str, Any]) -> None:
    t = Table(title="stock on every node (on hand / reserved / available)")
    t.add_column("sku")
    for name in views:
        t.add_column(name, justify="right")
    skus = [i["sku"] for i in next(iter(views.values()))["stock"]]
    for sku in skus:
        row = [sku]
        for v in views.values():
            item = next(i for i in v["stock"] if i["sku"] == sku)
            avail = item["available"]
            cell = f"{item['on_hand']} / {item['reserved']} / {avail}"
            row.append(f"[red]{cell}[/]" if avail < 0 else cell)
        t.add_row(*row)
    console.print(t)
    t = Table(title="oversell exceptions as each node computes them")
    for col in ("node", "sku", "loser (origin, seq)", "kind", "units short"):
        t.add_column(col)
    for name, ex in exceptions.items():
        for e in ex["exceptions"]:
            t.add_row(name, e["sku"], f"{e['origin']} #{e['seq']}", e["kind"], str(e["short"]))
    console.print(t)


def prepare(base: Path) -> dict[str, Any]:
    """Wipe ``base``, create the store and its edge node, issue one token per register,
    the device credentials, the staff roster and an HQ account (module docstring)."""
    if base.exists():
        shutil.rmtree(base)
    base.mkdir(parents=True)
    console.rule("[bold]storemesh demo")
    edge = base / "edge"
    ident = init_store(edge, "demo-store", now_ms=_now_ms(), node_id="edge")
    tokens = {r: create_token(ident, role="register", ttl_ms=600_000, now_ms=_now_ms())
              for r in REGISTERS}
    tokens["cloud"] = create_token(ident, role="cloud", ttl_ms=600_000, now_ms=_now_ms())
    console.print(f"store [bold]demo-store[/] created in {base}; one-time join tokens issued "
                  "for 3 registers and the cloud peer")
    year = 365 * 86_400_000
    devices: dict[str, str] = {}
    for r in REGISTERS:  # each till may use its own register only
        devices[f"till-{r[-1]}"] = authdir.issue_device_credential(
            edge, device_id=f"till-{r[-1]}", role="pos", now_ms=_now_ms(), ttl_ms=year,
            nodes=frozenset({r}))
    devices["backoffice"] = authdir.issue_device_credential(
        edge, device_id="backoffice", role="pos", now_ms=_now_ms(), ttl_ms=year,
        nodes=frozenset({"edge"}))
    devices["webshop"] = authdir.issue_device_credential(
        edge, device_id="webshop", role="online", channel="webshop", now_ms=_now_ms(),
        ttl_ms=year)
    devices["screen"] = authdir.issue_device_credential(
        edge, device_id="screen", role="read", now_ms=_now_ms(), ttl_ms=year)
    pins = {"manager-anna": _pin(), **{f"cashier-{r[-1]}": _pin() for r in REGISTERS}}
    for staff_id, pin in pins.items():
        roster = authdir.add_staff(
            edge, staff_id=staff_id, name=staff_id.replace("-", " ").title(),
            role="manager" if staff_id.startswith("manager") else "cashier", pin=pin,
            now_ms=_now_ms())
    hq_password = secrets.token_urlsafe(12)
    add_user(base / "hq", "demo-hq", hq_password, role="viewer")
    (base / "demo-secrets.txt").touch(0o600)
    (base / "demo-secrets.txt").write_text(
        "".join(f"{k} {v}\n" for k, v in devices.items())
        + "".join(f"pin {k} {v}\n" for k, v in pins.items())
        + f"hq demo-hq {hq_password}\n")
    console.print("device credentials issued (tills bound to their registers, back office, "
                  "web shop, a read-only screen), staff on the roster (a manager, 3 "
                  "cashiers with PINs), HQ account [bold]demo-hq[/] for the dashboard; "
                  f"all in {base / 'demo-secrets.txt'} (mode 0600)")
    return {"join": tokens, "tokens": devices, "pins": pins, "hq": ("demo-hq", hq_password),
            "roster": roster.version}


def _pin() -> str:
    return f"{secrets.randbelow(10**6):06d}"


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


async def run_demo(base: Path, creds: dict[str, Any], duration: float | None) -> int:
    cluster = Cluster(base)  # every process by pid, logs in BASE/NAME.log
    common = ["--interface", "127.0.0.1", "--http-port", "0", "--log-level",
              os.environ.get("STOREMESH_LOG_LEVEL", "WARNING")]
    try:
        cloud_url = f"https://127.0.0.1:{_free_port()}"
        store_on_cloud = f"{cloud_url}/stores/demo-store"
        edge = cluster.spawn("edge", ["node", "--data", str(base / "edge"),
                                      "--cloud", store_on_cloud, *common])
        await edge.wait_ready(30)
        urls = {"edge": edge.url}
        # The cloud enrols with its token at the edge, then the edge dials out to it.
        join = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "mesh", "cloud", "join", str(base / "hq"),
            creds["join"]["cloud"],
            "--url", urls["edge"], stdout=asyncio.subprocess.DEVNULL)
        if await join.wait() != 0:
            raise RuntimeError("the cloud could not join the store")
        cloud = cluster.spawn("cloud", ["cloud", "run", "--data", str(base / "hq"),
                                        "--http-host", "127.0.0.1",
                                        "--http-port", cloud_url.rsplit(":", 1)[1],
                                        "--log-level", "WARNING"])
        await cloud.wait_ready(30)
        tills = [cluster.spawn(r, ["node", "--data", str(base / r), "--join",
                                   creds["join"][r], "--node-id", r, *common])
                 for r in REGISTERS]
        await cluster.wait_ready(*tills, within=30)
        urls.update({p.name: p.url for p in tills})
        everyone = {**urls, "cloud": store_on_cloud}
        # Every node serves TLS with a certificate the store key signed: pin that CA,
        # as a till does (what 'storemesh store ca' exports). The cloud's API and
        # dashboard answer with the HQ certificate (browsers refuse Ed25519): its CA too.
        ca = base / "edge" / "tls-ca.pem"
        hq_ca = base / "hq" / HQ_CA_FILE
        trusted = api_client_context(ca.read_bytes())
        trusted.load_verify_locations(cafile=hq_ca)
        pinned = aiohttp.TCPConnector(ssl=trusted)
        jar = aiohttp.CookieJar(unsafe=True)  # the HQ session cookie of 127.0.0.1
        async with aiohttp.ClientSession(connector=pinned, cookie_jar=jar) as http:
            formed = await wait_mesh(lambda url: _get(http, url, ""), list(urls.values()),
                                     within=30)
            console.print(f"4 nodes up; registers joined by token and found each other by "
                          f"mDNS: full mesh in {formed:.1f} s; the edge dialled out to the "
                          f"cloud peer at {cloud_url}")
            await _wait_roster(http, urls, creds["roster"], 30)
            w = await _workload(http, urls, store_on_cloud, everyone, creds)
            console.print(f"{w['sales']} sales at 3 tills in {w['seconds']:.2f} s "
                          f"({w['sales'] / w['seconds']:.0f}/s, each acknowledged after fsync)")
            console.print(f"last-unit race: both tills sold {LAST} "
                          f"(seq {w['race'][0]['seq']} and {w['race'][1]['seq']}): "
                          "offline-first, nobody is blocked")
            took, views = await _converged(http, everyone, 10)
            console.print(f"all 4 store nodes and the cloud hold identical stock (checked "
                          f"{took * 1000:.0f} ms after the race)")
            exceptions = {n: await _get(http, u, "/v1/exceptions") for n, u in everyone.items()}
            _show(views, exceptions)
            same = len({repr(e["exceptions"]) for e in exceptions.values()}) == 1
            console.print("[green]every node derived the same exception list[/]" if same
                          else "[red]exception lists differ[/]")
            lat = sorted(await _latency(http, urls, 50, w["tills"]["register-1"],
                                        creds["tokens"]["screen"]))
            if lat:
                console.print(f"sale acknowledged at register-1 -> visible on all 3 other "
                              f"nodes: p50 {lat[len(lat) // 2]:.1f} ms, "
                              f"p99 {lat[min(len(lat) - 1, int(len(lat) * 0.99))]:.1f} ms "
                              f"({len(lat)} sales, live streams)")
            made = w["sales"] + 2 + 50  # the tills, the race, the latency probe
            async with http.post(cloud_url + "/v1/hq/login", json={
                    "user": creds["hq"][0], "password": creds["hq"][1]}) as resp:
                if resp.status != 200:
                    raise RuntimeError(f"HQ login -> {resp.status} {await resp.text()}")
            fleet = await _fleet_sales(http, cloud_url, made)
            console.print(f"cloud analytics counted {fleet} of the {made} sales made in "
                          "demo-store" + (" (every one, once)" if fleet == made else ""))
        console.rule("open these")
        e = urls["edge"]
        dash = cloud_url.replace("127.0.0.1", "localhost")
        console.print(f"every link is TLS; store nodes pin the store CA {ca}, e.g.\n"
                      f"  curl --cacert {ca} --resolve edge:{e.rsplit(':', 1)[1]}:127.0.0.1 "
                      f"https://edge:{e.rsplit(':', 1)[1]}/v1/stock\n"
                      "(store certificates are Ed25519: curl, Python and the CLI accept "
                      "them, browsers do not; a browser till opens "
                      f"https://localhost:{e.rsplit(':', 1)[1]} trusting the node's own "
                      f"{base / 'edge' / 'browser-ca.pem'}: docs/security.md)\n"
                      f"the dashboard's certificate (ECDSA) comes from the HQ CA {hq_ca}: "
                      "trust it in your browser, or accept the browser's warning once")
        console.print(f"dashboard    {dash}/   (the cloud peer's fleet view; log in as "
                      f"{creds['hq'][0]}, password in {base / 'demo-secrets.txt'})\n"
                      f"stock        {e}/v1/stock\nlive stream  {e}/v1/events   (with the "
                      "'screen' credential: -H 'Authorization: Bearer ...')\n"
                      f"exceptions   {e}/v1/exceptions\nmetrics      {e}/metrics\n"
                      f"status       .venv/bin/storemesh status {e} --ca {ca}\n"
                      f"audit trail  .venv/bin/storemesh ledger show {base / 'edge'}   "
                      "(who: device and staff member of every change)\n"
                      f"writes       need a device credential (and at a till a staff "
                      f"login): see {base / 'demo-secrets.txt'}, docs/api.md, "
                      "docs/security.md")
        for name, url in urls.items():
            console.print(f"  {name:<11} {url}")
        if not same:
            return 1
        if duration is None:
            console.print("the mesh keeps running; Ctrl-C stops it")
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, stop.set)
            await stop.wait()
        elif duration > 0:
            await asyncio.sleep(duration)
        return 0
    finally:
        try:
            cluster.close()
        except ClusterError as exc:  # a node had to be killed: its stacks are in its log
            console.print(f"[yellow]{exc}[/]")
        with contextlib.suppress(OSError):
            os.sync()

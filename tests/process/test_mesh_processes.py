"""The live store mesh as separate processes on loopback (issue 3, "Tests").

Every node is ``python -m mesh node --data DIR --interface 127.0.0.1 --http-port 0``
(zeroconf bound to 127.0.0.1; store ids and node ids are random per test, so other
runs on this machine cannot interfere). The test talks to the nodes over their HTTP
API only, as a POS or a web shop would, and stops every process it started by pid
(``meshkit.cluster``).

1. ``test_zeroconf_mesh_sales_visible_everywhere``: an edge and three registers (two
   joined with one-time tokens, one enrolled directly) find each other by mDNS; each
   sale is seen on every other node's live stream within ``VISIBILITY_BOUND_S``.
2. ``test_register_sigkill_mid_workload``: SIGKILL under a concurrent load, restart on
   the same data dir; nothing acknowledged lost, nothing duplicated, retries idempotent.
3. ``test_partitioned_register_keeps_selling_and_converges``: a register behind TCP
   proxies the test cuts; it sells the last unit while another register does too; after
   healing, stock and oversell exceptions are identical everywhere.
4. ``test_refusals_counted_in_metrics``: tampered envelope, other store, unenrolled key,
   replayed join token: refused, state unchanged, counted in ``/metrics``.
5. ``test_mesh_across_network_namespaces`` (``netns``): test 1 across namespaces the
   test creates (veth pairs on a bridge), skipped where ``ip netns add`` is not allowed.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import subprocess
import time
from collections import Counter
from functools import partial
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from mesh.core.identity import NodeKey
from mesh.core.replica import Replica
from mesh.core.sync import encode_batch
from mesh.net.transport import HandshakeError, Session, dial
from mesh.store.datadir import load_identity
from tests import meshkit
from tests.meshkit import (
    Cluster,
    NodeProc,
    SseReader,
    audit_txns,
    client,
    enrol_direct,
    get_json,
    join_token,
    new_store,
    now_ms,
    peers_up,
    post_json,
    post_ok,
    rejections,
    stock_views,
    tag,
    until,
    wait_converged,
    wait_mesh,
)
from tests.tcp_proxy import TcpProxy

cluster = meshkit.cluster  # the fixture: every process started is stopped after the test

#: A sale acknowledged at one register must be on every other node's live stream within
#: this. The design aims at milliseconds (a push per envelope over a live WebSocket);
#: 2 s leaves room for a loaded 2-core machine running four nodes and the test.
VISIBILITY_BOUND_S = 2.0
#: Mesh formation: mDNS probing (~1 s per node) plus browse and dial; generous.
MESH_WITHIN_S = 20.0
#: Convergence after a restart or a healed partition: reconnect backoff (at most
#: ~2.4 s after a few seconds down) + one anti-entropy round (1 s ±25 %) + catch-up.
CONVERGE_WITHIN_S = 20.0


def _pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(len(s) * q))]


async def _receipts(http: aiohttp.ClientSession, node: NodeProc, stock: dict[str, int]) -> None:
    for sku, qty in stock.items():
        await post_ok(http, node.url, "/v1/receipts",
                      {"sku": sku, "qty": qty, "txn_id": f"grn-{sku}"})


# --- 1. discovery and visibility ---------------------------------------------------------


async def _start_store_mesh(cluster: Cluster, base: Path,
                            interfaces: dict[str, str] | None = None,
                            netns: dict[str, str] | None = None) -> dict[str, NodeProc]:
    """An edge and three registers with mDNS on their interface (127.0.0.1 unless
    ``interfaces`` says otherwise): r1 and r2 join with one-time tokens (finding the
    edge by mDNS), r3 is enrolled directly."""
    t = tag()
    names = ("edge", "r1", "r2", "r3")
    ifaces = interfaces or dict.fromkeys(names, meshkit.LOOPBACK)
    netns = netns or {}
    edge_ident = new_store(base, f"store-{t}", f"edge-{t}")
    tokens = {r: join_token(edge_ident) for r in ("r1", "r2")}
    enrol_direct(base, edge_ident, f"r3-{t}")
    edge = await cluster.start("edge", base / f"edge-{t}", interface=ifaces["edge"],
                               netns=netns.get("edge"))
    regs = [cluster.launch(r, base / f"{r}-{t}", interface=ifaces[r], join=tokens.get(r),
                           node_id=f"{r}-{t}" if r in tokens else None, netns=netns.get(r))
            for r in names[1:]]
    await cluster.wait_ready(*regs)
    nodes = {"edge": edge, **{n.name: n for n in regs}}
    for name, n in nodes.items():
        assert n.store_id == f"store-{t}", f"{name} runs store {n.store_id}"
        assert n.role == ("edge" if name == "edge" else "register"), f"{name}: {n.role}"
        assert n.node_id == f"{name}-{t}", f"{name} runs as {n.node_id}"
    return nodes


async def _visibility(http: aiohttp.ClientSession, nodes: dict[str, NodeProc],
                      rounds: int, start_stock: int) -> list[float]:
    """Each register in turn sells one unit of its own SKU; for every sale, the time
    from its acknowledgement to its arrival on the live stream of each other node.
    Returns one figure per sale: when the *last* other node had it (ms)."""
    readers = {name: await SseReader(http, n).start() for name, n in nodes.items()}
    try:
        latencies: list[float] = []
        for i in range(rounds):
            for reg in ("r1", "r2", "r3"):
                sku = f"SKU-{reg}"
                marks = {name: len(r.events) for name, r in readers.items()}
                res = await post_ok(http, nodes[reg].url, "/v1/sales",
                                    {"sku": sku, "qty": 1, "txn_id": f"vis-{reg}-{i}"})
                acked = time.perf_counter()
                want = start_stock - (i + 1)
                assert res["on_hand"] == want, f"{reg} acked {res}, expected on hand {want}"
                arrivals = []
                for name, reader in readers.items():
                    if name == reg:
                        continue
                    ev = await reader.wait_for(partial(_shows, sku, want),
                                               within=VISIBILITY_BOUND_S,
                                               start_index=marks[name])
                    assert ev is not None, (
                        f"sale {res['origin']} seq {res['seq']} ({sku} -> {want}) acknowledged"
                        f" by {reg} did not reach {name}'s /v1/events within "
                        f"{VISIBILITY_BOUND_S} s (stream error: {reader.error!r})")
                    # the event may beat the HTTP answer to the test: count that as 0
                    arrivals.append(max(0.0, ev.at - acked))
                latencies.append(max(arrivals) * 1000)
        return latencies
    finally:
        for r in readers.values():
            await r.close()


def _shows(sku: str, on_hand: int, event: dict[str, Any]) -> bool:
    """Whether a stock-change event shows ``sku`` at ``on_hand`` or below."""
    return bool(event.get("sku") == sku and event.get("on_hand", on_hand + 1) <= on_hand)


async def _run_mesh_scenario(http: aiohttp.ClientSession, nodes: dict[str, NodeProc],
                             label: str) -> None:
    all_nodes = list(nodes.values())
    formed = await wait_mesh(http, all_nodes, within=MESH_WITHIN_S)
    print(f"\n[{label}] full mesh of 4 by mDNS in {formed:.2f} s after the last node listened")
    start = 1000
    stock = {"SKU-r1": start, "SKU-r2": start, "SKU-r3": start, "SHARED": start}
    await _receipts(http, nodes["edge"], stock)
    await wait_converged(http, all_nodes, within=10, expect=stock)
    rounds = 10
    lat = await _visibility(http, nodes, rounds, start)
    print(f"[{label}] sale acked at a register -> on every other node's /v1/events: "
          f"p50 {_pct(lat, 0.5):.1f} ms, p99 {_pct(lat, 0.99):.1f} ms, max {max(lat):.1f} ms "
          f"({len(lat)} sales)")
    assert max(lat) < VISIBILITY_BOUND_S * 1000

    # Then all three registers at once, several tills each, on one shared SKU.
    per_till, tills = 15, 3

    async def till(reg: str, k: int) -> None:
        for i in range(per_till):
            await post_ok(http, nodes[reg].url, "/v1/sales",
                          {"sku": "SHARED", "qty": 1, "txn_id": f"rush-{reg}-{k}-{i}"})

    await asyncio.gather(*(till(r, k) for r in ("r1", "r2", "r3") for k in range(tills)))
    done = time.perf_counter()
    expect = {f"SKU-{r}": start - rounds for r in ("r1", "r2", "r3")}
    expect["SHARED"] = start - 3 * tills * per_till
    _, table = await wait_converged(http, all_nodes, within=5, expect=expect)
    print(f"[{label}] {3 * tills * per_till} concurrent sales at 3 registers: identical stock "
          f"on all 4 nodes {1000 * (time.perf_counter() - done):.0f} ms after the last ack")
    assert table == {sku: (n, 0, n) for sku, n in expect.items()}, table
    for n in all_nodes:
        exc = await get_json(http, n.url, "/v1/exceptions")
        assert exc["exceptions"] == [], f"{n.name} reports oversells: {exc}"
        # A healthy mesh of one store refuses nothing (no duplicate sessions either).
        refused = {k: v for k, v in (await rejections(http, n.url)).items() if v}
        assert refused == {}, f"{n.name} counted refusals in a healthy mesh: {refused}"


@pytest.mark.asyncio
async def test_zeroconf_mesh_sales_visible_everywhere(cluster: Cluster, tmp_path: Path) -> None:
    nodes = await _start_store_mesh(cluster, tmp_path)
    async with client() as http:
        await _run_mesh_scenario(http, nodes, "loopback")
        # Nobody was given a peer URL: every session came from mDNS (plus the tokens'
        # edge lookup). Each register's /v1/peers names the others with their URLs.
        for name, n in nodes.items():
            peers = (await get_json(http, n.url, "/v1/peers"))["peers"]
            urls = {p["node_id"]: p["url"] for p in peers}
            others = {o.node_id: o.url for o in nodes.values() if o is not n}
            assert set(urls) >= set(others), f"{name} peers {urls}"


# --- 2. SIGKILL under load ---------------------------------------------------------------


async def _sell(http: aiohttp.ClientSession, url: str,
                body: dict[str, Any]) -> tuple[int, Any] | None:
    """POST a sale; None if no answer came (connection refused, reset, timeout)."""
    try:
        return await post_json(http, url, "/v1/sales", body)
    except (aiohttp.ClientError, OSError, TimeoutError):
        return None


@pytest.mark.asyncio
async def test_register_sigkill_mid_workload(cluster: Cluster, tmp_path: Path) -> None:
    t = tag()
    edge_ident = new_store(tmp_path, f"store-{t}", f"edge-{t}")
    token = join_token(edge_ident)
    enrol_direct(tmp_path, edge_ident, f"r2-{t}")
    edge = await cluster.start("edge", tmp_path / f"edge-{t}")
    r1 = cluster.launch("r1", tmp_path / f"r1-{t}", join=token, node_id=f"r1-{t}")
    r2 = cluster.launch("r2", tmp_path / f"r2-{t}")
    await cluster.wait_ready(r1, r2)
    nodes = [edge, r1, r2]
    received = {"K-A": 100_000, "K-B": 100_000, "K-C": 100_000}
    skus = sorted(received)

    acked: dict[str, dict[str, Any]] = {}  # txn -> body: a 201 came back
    unknown: dict[str, dict[str, Any]] = {}  # txn -> body: no answer (killed under it)
    r2_running = True
    into_load = asyncio.Event()  # r1 has acknowledged KILL_AFTER sales

    async def r1_till(w: int) -> None:
        for i in range(5_000):  # bounded; ends at the first unanswered request
            body: dict[str, Any] = {"sku": skus[(w + i) % 3], "qty": 1,
                                    "txn_id": f"r1-w{w}-{i}"}
            got = await _sell(http, r1.url, body)
            if got is None:
                unknown[body["txn_id"]] = body
                return
            status, data = got
            assert status == 201 and data["duplicate"] is False, f"{body} -> {status} {data}"
            acked[body["txn_id"]] = body
            if sum(k.startswith("r1-") for k in acked) >= 200:
                into_load.set()

    async def r2_till(w: int) -> None:
        for i in range(5_000):
            if not r2_running:
                return
            body: dict[str, Any] = {"sku": skus[(w + i) % 3], "qty": 1,
                                    "txn_id": f"r2-w{w}-{i}"}
            status, data = await post_json(http, r2.url, "/v1/sales", body)
            assert status == 201, f"r2 refused {body}: {status} {data}"
            acked[body["txn_id"]] = body
            await asyncio.sleep(0.005)

    async with client() as http:
        await wait_mesh(http, nodes, within=MESH_WITHIN_S)
        await _receipts(http, edge, received)
        await wait_converged(http, nodes, within=10, expect=received)

        r1_tills = [asyncio.create_task(r1_till(w)) for w in range(4)]
        r2_tills = [asyncio.create_task(r2_till(w)) for w in range(2)]
        try:
            # Kill r1 once it is well into the load (or after 4 s, whichever is first).
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(into_load.wait(), 4)
            cluster.kill(r1)
            r2_before_kill = sum(k.startswith("r2-") for k in acked)
            await asyncio.wait_for(asyncio.gather(*r1_tills), 15)
            acked_r1 = {k for k in acked if k.startswith("r1-")}
            assert len(acked_r1) >= 20, f"r1 acknowledged only {len(acked_r1)} sales before "\
                f"the kill: the load never got going\n{r1.log_tail()}"
            await asyncio.sleep(0.5)  # r2 keeps selling while r1 is down
            r2_running = False
            await asyncio.gather(*r2_tills, return_exceptions=True)
            restarted_at = time.monotonic()
            cluster.restart(r1)  # same data dir, same port
            await cluster.wait_ready(r1)
            up_at = time.monotonic()
        finally:
            r2_running = False
            await asyncio.gather(*r2_tills, return_exceptions=True)
            for task in r1_tills:
                task.cancel()
            await asyncio.gather(*r1_tills, return_exceptions=True)
        for task in r2_tills:
            task.result()  # an r2 failure is a failure of this test
        # Catch-up: the same stock everywhere, including r2's sales made while r1 was down.
        await wait_converged(http, nodes, within=CONVERGE_WITHIN_S)
        caught_up = time.monotonic() - restarted_at
        recorded = _check_ledgers(await _sale_entries(http, nodes), acked, unknown, r1.node_id)
        print(f"\n[sigkill] r1 acknowledged {len(acked_r1)} sales before SIGKILL, "
              f"{len(unknown)} were in flight unanswered ({len(recorded & set(unknown))} of "
              f"them recorded); r2 acknowledged {len(acked) - len(acked_r1)}, "
              f"{len(acked) - len(acked_r1) - r2_before_kill} while r1 was down; "
              f"restarted r1 printed its URL {up_at - restarted_at:.2f} s and had caught up "
              f"{caught_up:.2f} s after its launch")
        views = await stock_views(http, nodes)
        for name, table in views.items():
            for sku in skus:
                sold = sum(1 for txn in recorded if (acked.get(txn) or unknown[txn])["sku"] == sku)
                assert table[sku][0] == received[sku] - sold, (
                    f"{name}: {sku} on hand {table[sku][0]}, but {received[sku]} received and "
                    f"{sold} sales in the ledger")

        # Retry everything r1 was asked, with the same txn ids: what it recorded (every
        # acknowledged sale, some unanswered ones) must come back as a duplicate.
        for txn, body in {**{k: acked[k] for k in sorted(acked_r1)}, **unknown}.items():
            status, data = await post_json(http, r1.url, "/v1/sales", body)
            if txn in recorded:
                assert (status, data.get("duplicate")) == (200, True), (
                    f"retry of recorded sale {txn} -> {status} {data}: not a duplicate")
            else:
                assert (status, data.get("duplicate")) == (201, False), (
                    f"retry of unrecorded sale {txn} -> {status} {data}")
        everything = {**acked, **unknown}
        expect = {sku: received[sku] - sum(1 for b in everything.values() if b["sku"] == sku)
                  for sku in skus}
        await wait_converged(http, nodes, within=CONVERGE_WITHIN_S, expect=expect)
        final = _check_ledgers(await _sale_entries(http, nodes), everything, {}, r1.node_id)
        assert final == set(everything), "every sale asked for is recorded exactly once"


async def _sale_entries(http: aiohttp.ClientSession,
                        nodes: list[NodeProc]) -> dict[str, list[tuple[str, str, int, str]]]:
    """Every node's sale entries, read from its ledger (``/v1/audit``) once all ledgers
    hold the same number of envelopes: a node applies a peer's envelope to its stock a
    moment before that envelope is on its own disk, so equal stock does not yet mean
    equal ledgers."""
    async def sizes() -> dict[str, int] | None:
        got = {n.name: (await get_json(http, n.url, "/v1/health"))["envelopes"] for n in nodes}
        return got if len(set(got.values())) == 1 else None

    await until(sizes, within=10, what="every node's ledger holds as many envelopes")
    return {n.name: await audit_txns(http, n.url, kind="sale") for n in nodes}


def _check_ledgers(entries: dict[str, list[tuple[str, str, int, str]]],
                   acked: dict[str, Any], unknown: dict[str, Any], r1_id: str) -> set[str]:
    """Every node's ledger holds every acknowledged sale once, nothing twice, nothing
    never asked for, and all nodes hold the same sales. Returns their txn ids."""
    views: dict[str, set[str]] = {}
    for name, rows in entries.items():
        counts = Counter(txn for txn, _, _, _ in rows)
        twice = {txn: n for txn, n in counts.items() if n > 1}
        assert not twice, f"{name}: sales recorded more than once: {twice}"
        txns = set(counts)
        lost = set(acked) - txns
        assert not lost, f"{name}: {len(lost)} acknowledged sales missing: {sorted(lost)[:10]}"
        stray = txns - set(acked) - set(unknown)
        assert not stray, f"{name}: sales nobody asked for: {sorted(stray)[:10]}"
        wrong = [(txn, o) for txn, o, _, _ in rows if txn.startswith("r1-") and o != r1_id]
        assert not wrong, f"{name}: r1's sales under another origin: {wrong[:5]}"
        views[name] = txns
    first = next(iter(views.values()))
    assert all(v == first for v in views.values()), {n: len(v) for n, v in views.items()}
    return first


# --- 3. partition through TCP proxies ------------------------------------------------------


@pytest.mark.asyncio
async def test_partitioned_register_keeps_selling_and_converges(cluster: Cluster,
                                                                tmp_path: Path) -> None:
    t = tag()
    edge_ident = new_store(tmp_path, f"store-{t}", f"edge-{t}")
    for r in ("r1", "r2", "r3"):
        enrol_direct(tmp_path, edge_ident, f"{r}-{t}")
    edge = await cluster.start("edge", tmp_path / f"edge-{t}")
    r2 = cluster.launch("r2", tmp_path / f"r2-{t}")
    r3 = cluster.launch("r3", tmp_path / f"r3-{t}")
    await cluster.wait_ready(r2, r3)
    # r1 reaches the store only through proxies: no mDNS (so nobody learns its address
    # and dials it directly), static peers = the proxies.
    to_edge = cluster.add(TcpProxy(edge.port, name="r1->edge").start())
    to_r2 = cluster.add(TcpProxy(r2.port, name="r1->r2").start())
    proxies = [to_edge, to_r2]
    r1 = await cluster.start("r1", tmp_path / f"r1-{t}", discovery=False,
                             peers=[to_edge.url, to_r2.url])
    nodes = [edge, r1, r2, r3]
    stock = {"LAST": 1, "GEN": 100}

    async with client() as http:
        await wait_mesh(http, [edge, r2, r3], within=MESH_WITHIN_S)
        await until(lambda: _sees(http, r1, {edge.node_id, r2.node_id}), within=MESH_WITHIN_S,
                    what="r1 has sessions with edge and r2 through the proxies")
        await _receipts(http, edge, stock)
        await wait_converged(http, nodes, within=10, expect=stock)

        # --- cut: drop r1's connections, refuse its reconnects -------------------------
        refused_before = sum(p.stats.refused for p in proxies)
        for p in proxies:
            p.cut()
        await until(lambda: _sees(http, r1, set()), within=10, what="r1 sees no peer up")
        for n in (edge, r2, r3):
            await until(partial(_lacks, http, n, r1.node_id), within=10,
                        what=f"{n.name} has no session with r1")
        await until(lambda: _async_true(sum(p.stats.refused for p in proxies) > refused_before),
                    within=10, what="r1 tries to reconnect (and the cut proxy refuses it)")
        assert all(p.live == 0 for p in proxies), [p.live for p in proxies]

        # Both sides sell the last unit, and some more, with every link of r1 down.
        race = {}
        for reg, node in (("r1", r1), ("r2", r2)):
            status, data = await post_json(http, node.url, "/v1/sales",
                                           {"sku": "LAST", "qty": 1, "txn_id": f"last-{reg}"})
            assert status == 201, f"{reg} refused the last unit while cut off: {status} {data}"
            assert data["on_hand"] == 0, f"{reg} saw the other's sale while cut: {data}"
            race[reg] = (data["origin"], data["seq"])
        sales = {r1: 5, r2: 3, r3: 2, edge: 1}
        for seller, count in sales.items():
            for i in range(count):
                status, data = await post_json(http, seller.url, "/v1/sales",
                                               {"sku": "GEN", "qty": 1,
                                                "txn_id": f"gen-{seller.name}-{i}"})
                assert status == 201, f"{seller.name} refused a sale while r1 is cut off: "\
                    f"{status} {data}"
        assert await peers_up(http, r1) == set(), "r1 got a link back while cut"
        # The cut really separates: the main side sees its own sales, not r1's.
        main_gen = 100 - sales[r2] - sales[r3] - sales[edge]
        await wait_converged(http, [edge, r2, r3], within=10,
                             expect={"LAST": 0, "GEN": main_gen})
        await asyncio.sleep(0.5)
        views = await stock_views(http, nodes)
        assert views["r1"]["GEN"][0] == 100 - sales[r1], views
        assert views["edge"]["GEN"][0] == main_gen and views["edge"]["LAST"][0] == 0, views
        for n in nodes:
            assert (await get_json(http, n.url, "/v1/exceptions"))["exceptions"] == [], n.name

        # --- heal: r1 reconnects through the proxies and everything converges -----------
        healed = time.monotonic()
        for p in proxies:
            p.heal()
        took, table = await wait_converged(
            http, nodes, within=CONVERGE_WITHIN_S,
            expect={"LAST": -1, "GEN": 100 - sum(sales.values())})
        print(f"\n[partition] converged {took:.2f} s after the cut was lifted "
              f"(proxies carried {sum(p.stats.accepted for p in proxies)} connections, "
              f"refused {sum(p.stats.refused for p in proxies)} while cut)")
        assert table["LAST"] == (-1, 0, -1), table
        await until(lambda: _sees(http, r1, {edge.node_id, r2.node_id}), within=15,
                    what="r1 has both links back after healing")

        exceptions = {n.name: await get_json(http, n.url, "/v1/exceptions") for n in nodes}
        first = exceptions["edge"]
        for name, ex in exceptions.items():
            assert ex == first, f"exceptions differ: edge {first} vs {name} {ex}"
        assert first["totals"]["count"] == 1, first
        loser = first["exceptions"][0]
        assert (loser["sku"], loser["kind"], loser["short"]) == ("LAST", "sale", 1), loser
        assert (loser["origin"], loser["seq"]) in race.values(), (loser, race)
        print(f"[partition] both registers sold the last unit; every node names "
              f"{loser['origin']} seq {loser['seq']} as the oversell "
              f"({time.monotonic() - healed:.2f} s after healing)")


async def _sees(http: aiohttp.ClientSession, node: NodeProc, want: set[str]) -> bool:
    """Whether ``node``'s live sessions are exactly with the node ids ``want``."""
    return await peers_up(http, node) == want


async def _lacks(http: aiohttp.ClientSession, node: NodeProc, peer_id: str) -> bool:
    return peer_id not in await peers_up(http, node)


async def _async_true(value: bool) -> bool:
    return value


# --- 4. refusals and metrics ----------------------------------------------------------------


async def _drain(session: Session) -> None:
    """Read what the edge sends us (certificates, version vectors, pings) and drop it."""
    with contextlib.suppress(aiohttp.ClientError, asyncio.CancelledError):
        async for _msg in session.ws:
            pass


def _wire(session: Session, data: bytes) -> bytes:
    """``data`` as the session's negotiated encoding carries it (the LAN codec)."""
    return session.codec.encode(data) if session.codec is not None else data


def _flip_signature(raw: bytes) -> bytes:
    """Change the last hex digit of the signature: still well formed, no longer valid."""
    assert raw.endswith(b'"}') and raw[-131:-130] == b'"', raw[-140:]
    last = raw[-3:-2]
    return raw[:-3] + (b"1" if last == b"0" else b"0") + raw[-2:]


@pytest.mark.asyncio
async def test_refusals_counted_in_metrics(cluster: Cluster, tmp_path: Path) -> None:
    t = tag()
    store = f"store-{t}"
    edge_ident = new_store(tmp_path, store, f"edge-{t}")
    token = join_token(edge_ident)
    # An enrolled node that never runs as a process: the test speaks as it.
    enrol_direct(tmp_path, edge_ident, f"ra-{t}")
    # A node of another store, and a "node" whose certificate names our store but is
    # signed by some other store key (not enrolled here).
    other = new_store(tmp_path / "other", f"other-{t}", f"other-edge-{t}")
    rogue = new_store(tmp_path / "rogue", store, f"rogue-{t}")
    edge = await cluster.start("edge", tmp_path / f"edge-{t}", discovery=False)
    r1 = await cluster.start("r1", tmp_path / f"r1-{t}", discovery=False, join=token,
                             node_id=f"r1-{t}", peers=[edge.url])
    honest = [edge, r1]

    async with client() as http:
        await until(lambda: _sees(http, edge, {r1.node_id}), within=MESH_WITHIN_S,
                    what="r1 joined by token and connected to the edge")
        await _receipts(http, edge, {"BASE": 10})
        await wait_converged(http, honest, within=10, expect={"BASE": 10})
        base = await rejections(http, edge.url)

        async def counted(reason: str, at_least: int = 1) -> float:
            def delta(now: dict[str, float]) -> float:
                return now.get(reason, 0) - base.get(reason, 0)

            async def probe() -> float:
                return delta(await rejections(http, edge.url))

            _, n = await until(probe, within=10, what=f"edge counts {reason!r} in /metrics "
                               f"(storemesh_envelopes_rejected_total)")
            assert n >= at_least, (reason, n)
            return float(n)

        # (a) a real handshake as enrolled node ra, then forged envelopes.
        ra = load_identity(tmp_path / f"ra-{t}")
        session = await dial(http, edge.url, ra, now_ms)
        drain = asyncio.create_task(_drain(session))
        try:
            await until(lambda: _sees(http, edge, {r1.node_id, ra.node_id}), within=10,
                        what="edge accepted ra's authenticated session")
            ledger_before = (await get_json(http, edge.url, "/v1/health"))["envelopes"]
            mine = Replica(store, ra.node_id, ra.role, ra.key)
            genuine = mine.receive("FORGED", 7, txn="ra-grn-1", now_ms=now_ms()).envelope
            assert genuine is not None
            forged = encode_batch([_flip_signature(genuine.raw)])
            await session.ws.send_bytes(_wire(session, forged))
            assert await counted("bad_signature") == 1
            # An envelope signed by a node of another store, relayed by ra.
            theirs = Replica(other.store_id, other.node_id, other.role, other.key)
            foreign = theirs.receive("FORGED", 5, txn="x-grn-1", now_ms=now_ms()).envelope
            assert foreign is not None
            await session.ws.send_bytes(_wire(session, encode_batch([foreign.raw])))
            assert await counted("wrong_store") == 1
            # An envelope of our store id by a node nobody enrolled here, relayed by ra.
            stranger = Replica(store, rogue.node_id, rogue.role, rogue.key)
            unknown = stranger.receive("FORGED", 3, txn="r-grn-1", now_ms=now_ms()).envelope
            assert unknown is not None
            await session.ws.send_bytes(_wire(session, encode_batch([unknown.raw])))
            assert await counted("not_enrolled") == 1
            await asyncio.sleep(0.3)  # anything wrongly applied would show by now
            for n in honest:
                status, _ = await _stock_status(http, n, "FORGED")
                assert status == 404, f"{n.name} applied a refused envelope"
            health = await get_json(http, edge.url, "/v1/health")
            assert health["envelopes"] == ledger_before, health
            # Control: the untampered envelope over the same session is applied (and
            # relayed to r1), so the refusals above were for the reasons counted.
            await session.ws.send_bytes(_wire(session, encode_batch([genuine.raw])))
            await wait_converged(http, honest, within=10, expect={"FORGED": 7, "BASE": 10})
        finally:
            await session.ws.close()
            drain.cancel()
            await asyncio.gather(drain, return_exceptions=True)

        # (b) a node of another store, as a process dialling the edge again and again.
        # Its TLS pins its own store's CA, so it abandons the handshake with our edge
        # (whose certificate our store key signed) before a byte of storemesh is said.
        intruder = await cluster.start("other", tmp_path / "other" / f"other-edge-{t}",
                                       discovery=False, peers=[edge.url])
        await counted("session_tls_aborted")
        assert other.node_id not in await peers_up(http, edge)
        intruder_view = await get_json(http, intruder.url, "/v1/stock")
        assert intruder_view["stock"] == [], f"the other store got our stock: {intruder_view}"
        cluster.stop(intruder)

        # (c) a key whose certificate claims this store but is signed by another store key.
        # Its own TLS context refuses our edge's certificate (another CA) ...
        with pytest.raises(aiohttp.ClientConnectorCertificateError):
            bad = await dial(http, edge.url, rogue, now_ms)
            await bad.ws.close()
        # ... and one that skips that check is refused by the edge: its client
        # certificate is not signed by our store key.
        sloppy = meshkit.rogue_tls_context(rogue.data_dir)
        with pytest.raises((aiohttp.ClientError, HandshakeError)):
            bad = await dial(http, edge.url, rogue, now_ms, ssl_context=sloppy)
            await bad.ws.close()
        await counted("session_tls_bad_certificate")
        assert rogue.node_id not in await peers_up(http, edge)

        # (d) a join token that was already used (by r1) is refused and counted.
        key = NodeKey.generate()
        status, body = await post_json(http, edge.url, "/v1/join",
                                       {"token": token, "public_key": key.public_key.hex()})
        assert status == 403 and body["error"]["reason"] == "used", (status, body)
        assert await counted("session_join_used") == 1

        # None of it reached the honest nodes' state or the edge's peer table.
        assert await peers_up(http, edge) == {r1.node_id}
        views = await stock_views(http, honest)
        assert all(v == {"BASE": (10, 0, 10), "FORGED": (7, 0, 7)} for v in views.values()), views
        final = await rejections(http, edge.url)
        print("\n[refusals] edge counted: " + ", ".join(
            f"{k}=+{final[k] - base.get(k, 0):g}" for k in sorted(final)
            if final[k] != base.get(k, 0)))


async def _stock_status(http: aiohttp.ClientSession, node: NodeProc, sku: str) -> tuple[int, Any]:
    async with http.get(f"{node.url}/v1/stock/{sku}") as resp:
        return resp.status, orjson.loads(await resp.read())


# --- 5. network namespaces --------------------------------------------------------------------


@pytest.mark.netns
@pytest.mark.asyncio
async def test_mesh_across_network_namespaces(cluster: Cluster, tmp_path: Path) -> None:
    """Test 1 with each node in a network namespace of its own, linked by veth pairs to a
    bridge in a hub namespace; the test's HTTP client runs in the hub namespace. All of
    it (namespaces, links, 10.x addresses) exists only for this test and is removed in
    ``finally`` (only a SIGKILL of pytest itself could leave ``smhub-*``/``sm*-*``
    namespaces behind: ``ip netns del`` them)."""
    if shutil.which("ip") is None:
        pytest.skip("iproute2 'ip' is not installed")
    t = tag()
    hub = f"smhub-{t}"
    names = {n: f"sm{n}-{t}" for n in ("edge", "r1", "r2", "r3")}
    made: list[str] = []
    try:
        probe = meshkit.ip("netns", "add", hub, check=False)
        if probe.returncode != 0:
            pytest.skip(f"'ip netns add' is not permitted here: {probe.stderr.strip()}")
        made.append(hub)
        try:
            addrs = _build_namespaces(hub, names, made)
        except subprocess.CalledProcessError as exc:  # e.g. no veth or bridge support
            pytest.skip(f"cannot build the test network ({' '.join(exc.cmd)}): "
                        f"{(exc.stderr or '').strip()}")
        nodes = await _start_store_mesh(cluster, tmp_path, interfaces=addrs, netns=names)

        def scenario() -> None:
            async def run() -> None:
                async with client() as http:
                    await _run_mesh_scenario(http, nodes, "netns")
            asyncio.run(run())

        await asyncio.to_thread(meshkit.run_in_netns, hub, scenario)
    finally:
        cluster.close()  # the nodes must be gone before their namespaces
        for ns in reversed(made):
            meshkit.ip("netns", "del", ns, check=False)
    left = meshkit.ip("netns", "list", check=False).stdout
    assert not any(ns in left for ns in made), f"namespaces left behind: {left}"


def _build_namespaces(hub: str, names: dict[str, str], made: list[str]) -> dict[str, str]:
    """hub: bridge br0 10.231.0.1/24; each node namespace: veth eth0 10.231.0.N/24 with
    its peer end on br0. Returns the node -> address map."""
    ipx = meshkit.ip
    ipx("-n", hub, "link", "add", "br0", "type", "bridge")
    ipx("-n", hub, "addr", "add", "10.231.0.1/24", "dev", "br0")
    ipx("-n", hub, "link", "set", "br0", "up")
    ipx("-n", hub, "link", "set", "lo", "up")
    addrs: dict[str, str] = {}
    for i, (node, ns) in enumerate(names.items(), start=2):
        ipx("netns", "add", ns)
        made.append(ns)
        ipx("-n", ns, "link", "set", "lo", "up")
        # Created inside the node's namespace, the peer end moved straight to the hub:
        # no interface ever appears in the namespace this test runs in.
        ipx("-n", ns, "link", "add", "eth0", "type", "veth", "peer", "name", f"v{node}",
            "netns", hub)
        ipx("-n", hub, "link", "set", f"v{node}", "master", "br0")
        ipx("-n", hub, "link", "set", f"v{node}", "up")
        addrs[node] = f"10.231.0.{i}"
        ipx("-n", ns, "addr", "add", f"{addrs[node]}/24", "dev", "eth0")
        ipx("-n", ns, "link", "set", "eth0", "up")
        ipx("-n", ns, "route", "add", "224.0.0.0/4", "dev", "eth0")  # mDNS multicast
    return addrs


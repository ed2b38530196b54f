"""Two stores and one cloud peer, every node a real process on 127.0.0.1 (issue 5).

Sales in both stores reach the cloud's analytics; a buy-online reservation made through
the cloud reaches the store's register; the cloud is stopped while the stores keep
selling and, restarted, its analytics catch up exactly; a price set in the cloud reaches
a register, which serves it with its edge and the cloud gone; a register may not write
the price book.
"""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from mesh.net.hqtls import ensure_hq_tls, hq_hosts
from tests import meshkit as mk

pytestmark = pytest.mark.asyncio
cluster = mk.cluster  # the fixture: every process started is stopped after the test


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _start_cloud(cluster: mk.Cluster, root: Path, port: int) -> mk.NodeProc:
    """``cloud run`` on 127.0.0.1:``port``. Its HQ certificate (what clients without a
    store's SNI, like ``mk.client()``, see) is made here first, so the test's clients
    can trust its CA as a browser would."""
    hq = ensure_hq_tls(root, hq_hosts("127.0.0.1"), now_ms=mk.now_ms())
    assert hq.ca_path is not None
    mk.TEST_SSL.load_verify_locations(cafile=hq.ca_path)
    node = cluster.spawn("cloud", ["cloud", "run", "--data", str(root), "--http-host",
                                   "127.0.0.1", "--http-port", str(port)], data_dir=root)
    node.url = f"https://127.0.0.1:{port}"
    return node


async def _put(http: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> tuple[int, Any]:
    async with http.put(url, data=orjson.dumps(body),
                        headers={"Content-Type": "application/json"}) as resp:
        return resp.status, orjson.loads(await resp.read())


async def _fleet_sales(http: aiohttp.ClientSession, cloud: str) -> dict[str, int]:
    body = await mk.get_json(http, cloud, "/v1/fleet/sales?hours=24")
    return {row["store"]: row["sales"] for row in body["by_store"]}


async def _refuses(http: aiohttp.ClientSession, cloud: str) -> bool:
    """The dashboard and the fleet API refuse a client without an HQ session: the page
    sends it to the login page, the API answers 401 with the usual JSON error."""
    async with http.get(cloud + "/", allow_redirects=False) as resp:
        if resp.status != 303 or resp.headers.get("Location") != "/login":
            return False
    for path in ("/v1/fleet/sales?hours=24", "/v1/stores", "/v1/fleet/health"):
        async with http.get(cloud + path) as resp:
            body = await resp.json()
            assert resp.status == 401 and body["error"]["reason"] == "login_required", body
    async with http.get(cloud + "/login") as resp:
        assert resp.status == 200 and "HQ login" in await resp.text()
    return True


async def _relogin(http: aiohttp.ClientSession, cloud: str) -> bool:
    await mk.hq_login(http, cloud)
    return True


async def _sell(http: aiohttp.ClientSession, reg: mk.NodeProc, n: int, prefix: str) -> None:
    for i in range(n):
        await mk.post_ok(http, reg.url, "/v1/sales",
                         {"sku": "BIKE", "qty": 1, "txn_id": f"{prefix}-{i}"})


async def test_two_stores_and_a_cloud(cluster: mk.Cluster, tmp_path: Path) -> None:
    t = mk.tag()
    stores = {}
    for s in ("a", "b"):
        edge = mk.new_store(tmp_path, f"store-{s}-{t}", f"edge-{s}-{t}")
        reg = mk.enrol_direct(tmp_path, edge, f"reg-{s}-{t}")
        mk.enrol_direct(tmp_path / "hq", edge, f"cloud-{s}-{t}", role="cloud")
        stores[s] = (edge, reg)
    port = _free_port()
    cloud_url = f"https://127.0.0.1:{port}"
    mk.add_hq_user(tmp_path / "hq")  # head office's account for the fleet views
    cloud = _start_cloud(cluster, tmp_path / "hq", port)
    nodes: dict[str, mk.NodeProc] = {}
    for s, (edge, reg) in stores.items():
        nodes[f"edge-{s}"] = await cluster.start(
            f"edge-{s}", edge.data_dir, discovery=False,
            extra=["--cloud", f"{cloud_url}/stores/{edge.store_id}"])
        nodes[f"reg-{s}"] = await cluster.start(
            f"reg-{s}", reg.data_dir, discovery=False, peers=[nodes[f"edge-{s}"].url])
    sid = {s: stores[s][0].store_id for s in stores}
    async with mk.client() as anon:  # 0. no fleet view without an HQ login
        await mk.until(lambda: _refuses(anon, cloud_url), within=30,
                       what="the cloud answers, and refuses the fleet views")
    async with mk.hq_session(cloud_url) as http:
        await mk.until(lambda: mk.get_json(http, cloud_url, "/v1/stores"), within=30,
                       what="the cloud peer answers")
        for s in stores:
            await mk.post_ok(http, nodes[f"edge-{s}"].url, "/v1/receipts",
                             {"sku": "BIKE", "qty": 20, "txn_id": "po-1"})

        async def reg_knows(s: str) -> bool:
            table = await mk.stock_table(http, nodes[f"reg-{s}"].url)
            return "BIKE" in table
        for s in stores:
            await mk.until(lambda s=s: reg_knows(s), within=20, what=f"reg-{s} knows BIKE")

        # 1. sales in both stores show up in the cloud's analytics
        await _sell(http, nodes["reg-a"], 5, "a1")
        await _sell(http, nodes["reg-b"], 3, "b1")

        async def sales_are(want: dict[str, int]) -> bool:
            return await _fleet_sales(http, cloud_url) == want
        await mk.until(lambda: sales_are({sid["a"]: 5, sid["b"]: 3}), within=30,
                       what="cloud analytics count 5 + 3 sales")

        # 2. a reservation made through the cloud reaches the store's register
        res = await mk.post_ok(http, f"{cloud_url}/stores/{sid['a']}", "/v1/reservations",
                               {"sku": "BIKE", "qty": 2, "txn_id": "web-1",
                                "channel": "webshop", "order": "ORD-1"})
        assert res["origin"].startswith("cloud-")

        async def reserved_at_register() -> bool:
            item = await mk.get_json(http, nodes["reg-a"].url, "/v1/stock/BIKE")
            return item["reserved"] == 2 and item["available"] == item["on_hand"] - 2
        await mk.until(reserved_at_register, within=20, what="the reservation at reg-a")

        # 3. a price set in the cloud reaches the register; a register may not write it
        status, body = await _put(http, f"{cloud_url}/stores/{sid['a']}/v1/catalog/BIKE",
                                  {"txn_id": "price-1", "name": "City bike",
                                   "price_cents": 49_900})
        assert status in (200, 201), body

        async def price_at_register() -> bool:
            async with http.get(nodes["reg-a"].url + "/v1/catalog/BIKE") as resp:
                return resp.status == 200 and (await resp.json())["price_cents"] == 49_900
        await mk.until(price_at_register, within=20, what="the price at reg-a")
        status, body = await _put(http, nodes["reg-a"].url + "/v1/catalog/BIKE",
                                  {"txn_id": "price-x", "price_cents": 1})
        assert status == 403 and body["error"]["field"] == "role", body

        # 4. the cloud is cut off (stopped) while the stores keep selling ...
        assert cluster.stop(cloud) == 0
        await _sell(http, nodes["reg-a"], 4, "a2")
        await _sell(http, nodes["reg-b"], 2, "b2")
        # ... and restarted: its analytics catch up exactly, nothing double-counted
        cluster._spawn(cloud)
        await mk.until(lambda: _relogin(http, cloud_url), within=30,
                       what="an HQ login at the restarted cloud")
        await mk.until(lambda: sales_are({sid["a"]: 9, sid["b"]: 5}), within=40,
                       what="cloud analytics catch up to 9 + 5 sales")
        await asyncio.sleep(1.5)
        assert await _fleet_sales(http, cloud_url) == {sid["a"]: 9, sid["b"]: 5}

        # 5. with its edge and the cloud gone, the register still serves the price
        cluster.stop(nodes["edge-a"])
        assert cluster.stop(cloud) == 0
        assert await price_at_register()

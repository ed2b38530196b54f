"""Certificate renewal with real processes and real TLS (mesh.driver invariant 8).

An edge, a register and the cloud run on 127.0.0.1. The register and the cloud hold
certificates valid 40 s; the edge renews with ``--cert-validity 60`` (renewal once a
third is left). Past the register's original expiry it still sells, its sales reach the
edge and the cloud, and after a restart (a new TLS handshake, which an expired
certificate would fail) it syncs again: the renewed TLS certificate is on its disk.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from cryptography import x509

from mesh.core.identity import TrustStore
from mesh.store.datadir import NodeIdentity, enrol_node, load_identity
from tests import meshkit as mk
from tests.process.test_cloud_processes import _free_port, _start_cloud

pytestmark = [pytest.mark.asyncio, pytest.mark.slow]  # ~60 s: it waits out a validity
cluster = mk.cluster

SHORT_MS = 40_000  #: the register's and the cloud's first certificates


def _tls_not_after(data_dir: Path) -> float:
    pem = (data_dir / "tls-node.pem").read_bytes()
    return x509.load_pem_x509_certificate(pem).not_valid_after_utc.timestamp()


def _enrol_short(base: Path, edge: NodeIdentity, node_id: str, role: str) -> Path:
    assert edge.store_key is not None
    ident = enrol_node(base / node_id, edge.store_key, edge.store_id, role,
                       now_ms=mk.now_ms(), node_id=node_id, validity_ms=SHORT_MS,
                       trust=TrustStore.from_dict(edge.trust.to_dict()))
    edge.trust.add_certificate(ident.certificate)
    edge.save()
    return ident.data_dir


async def test_the_edge_renews_certificates_so_a_register_and_the_cloud_outlive_them(
        cluster: mk.Cluster, tmp_path: Path) -> None:
    t = mk.tag()
    edge_id, r1_id = f"edge-{t}", f"reg1-{t}"
    edge_ident = mk.new_store(tmp_path, f"store-{t}", edge_id)
    r1_dir = _enrol_short(tmp_path, edge_ident, r1_id, "register")
    cloud_dir = _enrol_short(tmp_path / "hq", edge_ident, f"cloud-{t}", "cloud")
    expires_s = time.time() + SHORT_MS / 1000
    first = {d: _tls_not_after(d) for d in (r1_dir, cloud_dir)}
    sid = edge_ident.store_id
    port = _free_port()
    cloud_url = f"https://127.0.0.1:{port}"
    _start_cloud(cluster, tmp_path / "hq", port)
    edge = await cluster.start("edge", tmp_path / edge_id, discovery=False,
                               extra=["--cloud", f"{cloud_url}/stores/{sid}",
                                      "--cert-validity", "60"])
    r1 = await cluster.start("r1", r1_dir, discovery=False, peers=[edge.url])
    store_on_cloud = f"{cloud_url}/stores/{sid}"
    async with mk.client() as http:
        await mk.wait_mesh(http, [edge, r1], within=30)
        await mk.post_ok(http, edge.url, "/v1/receipts",
                         {"sku": "BIKE", "qty": 20, "txn_id": "po-1"})

        async def on_hand(url: str) -> int:
            async with http.get(url + "/v1/stock/BIKE") as resp:
                return -1 if resp.status != 200 else int((await resp.json())["on_hand"])

        async def everywhere(n: int) -> bool:
            return all([await on_hand(u) == n for u in (edge.url, r1.url, store_on_cloud)])

        await mk.until(lambda: everywhere(20), within=30, what="the receipt everywhere")

        async def renewed() -> bool:
            return all(_tls_not_after(d) > first[d] for d in (r1_dir, cloud_dir))
        await mk.until(renewed, within=SHORT_MS / 1000, what="renewed TLS certificates on disk")
        for d in (r1_dir, cloud_dir):
            own = load_identity(d).certificate
            assert own.not_after > expires_s * 1000, d  # node.json followed

        # past the first certificates' expiry: the register sells, everyone applies it
        wait = expires_s + 2 - time.time()
        if wait > 0:
            await mk.until(lambda: _later(expires_s + 2), within=wait + 5, what="expiry",
                           interval=0.2)
        await mk.post_ok(http, r1.url, "/v1/sales", {"sku": "BIKE", "qty": 1, "txn_id": "s1"})
        await mk.until(lambda: everywhere(19), within=30, what="a sale after expiry")

        # a new TLS session with the renewed certificate
        cluster.stop(r1)
        cluster.restart(r1)
        await cluster.wait_ready(r1)
        await mk.wait_mesh(http, [edge, r1], within=30)
        await mk.post_ok(http, r1.url, "/v1/sales", {"sku": "BIKE", "qty": 1, "txn_id": "s2"})
        await mk.until(lambda: everywhere(18), within=30, what="a sale after the restart")
        for url in (edge.url, r1.url):
            rej = await mk.rejections(http, url)
            assert not any("expired" in k for k in rej), (url, rej)


async def _later(when_s: float) -> bool:
    return time.time() >= when_s

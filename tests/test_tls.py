"""TLS on every link (issue 11, deliverable 1): real processes, real TLS on 127.0.0.1.

* the certificates ``mesh.tls`` issues (unit level);
* a plain-text client, a TLS client without a node certificate and one with a
  certificate of another store's CA cannot open a sync session, and each refusal is
  counted in ``/metrics``;
* a node with a valid certificate of ANOTHER node id cannot stand in for the node
  dialled (``wrong_peer``), nor speak as another node inside its TLS session
  (``tls_identity_mismatch``);
* bytes flipped or replayed on a live session (through ``tests/tcp_proxy.py``) break
  the TLS session, which is counted, and nothing of them is applied;
* ``--insecure-plaintext`` is refused off loopback.
"""

from __future__ import annotations

import asyncio
import os
import stat
from pathlib import Path

import aiohttp
import pytest
from click.testing import CliRunner
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from mesh.cli import main
from mesh.datadir import init_store, load_identity
from mesh.node import Node
from mesh.tls import (
    KEY_FILE,
    api_client_context,
    client_context,
    load_tls_files,
    peer_identity,
)
from mesh.transport import HandshakeError, dial
from tests import meshkit
from tests.meshkit import (
    Cluster,
    client,
    enrol_direct,
    get_json,
    join_token,
    new_store,
    now_ms,
    peers_up,
    post_ok,
    rejections,
    tag,
    until,
    wait_converged,
)
from tests.tcp_proxy import TcpProxy

cluster = meshkit.cluster

WITHIN_S = 20.0


# --- certificates ----------------------------------------------------------------------------


def test_store_init_issues_a_node_certificate_for_the_node_key(tmp_path: Path) -> None:
    ident = init_store(tmp_path / "e", "Berlin.mitte_1-x", now_ms=now_ms(), node_id="edge_1")
    files = load_tls_files(ident.data_dir, ident.key, store_id=ident.store_id,
                           node_id=ident.node_id, store_public_key=ident.trust.store_public_key)
    assert stat.S_IMODE(os.stat(tmp_path / "e" / KEY_FILE).st_mode) == 0o600
    cert = x509.load_pem_x509_certificate(files.cert_pem)
    who = peer_identity(cert.public_bytes(Encoding.DER))
    # the TLS key IS the node key: the session proves the key of the storemesh certificate
    assert who is not None and (who.store_id, who.node_id, who.public_key) == (
        "Berlin.mitte_1-x", "edge_1", ident.key.public_key)
    ca = x509.load_pem_x509_certificate(files.ca_pem)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    cert.verify_directly_issued_by(ca)
    # the CA is the store key itself
    assert ca.public_key().public_bytes_raw() == ident.trust.store_public_key  # type: ignore[union-attr]


def test_a_tampered_certificate_file_is_refused(tmp_path: Path) -> None:
    ident = init_store(tmp_path / "e", "s", now_ms=now_ms())
    other = init_store(tmp_path / "o", "s", now_ms=now_ms())  # same store id, other key
    (tmp_path / "e" / "tls-node.pem").write_bytes((tmp_path / "o" / "tls-node.pem").read_bytes())
    with pytest.raises(ValueError, match=r"not issued by the store CA|names"):
        load_tls_files(ident.data_dir, ident.key, store_id="s", node_id=ident.node_id,
                       store_public_key=ident.trust.store_public_key)
    assert other.node_id


def test_insecure_plaintext_is_refused_off_loopback(tmp_path: Path) -> None:
    init_store(tmp_path / "e", "s", now_ms=now_ms())
    with pytest.raises(ValueError, match="loopback"):
        Node(tmp_path / "e", http_host="0.0.0.0", insecure_plaintext=True)
    result = CliRunner().invoke(main, ["node", "--data", str(tmp_path / "e"), "--http-host",
                                       "0.0.0.0", "--insecure-plaintext"])
    assert result.exit_code == 2 and "loopback" in result.output, result.output


def test_store_ca_exports_the_pinned_certificate(tmp_path: Path) -> None:
    init_store(tmp_path / "e", "s", now_ms=now_ms())
    result = CliRunner().invoke(main, ["store", "ca", str(tmp_path / "e")])
    assert result.exit_code == 0, result.output
    assert result.output.encode() == (tmp_path / "e" / "tls-ca.pem").read_bytes()


# --- sync sessions: who may open one ------------------------------------------------------------


async def _delta(http: aiohttp.ClientSession, url: str, base: dict[str, float],
                 reason: str) -> float:
    async def probe() -> float:
        return (await rejections(http, url)).get(reason, 0) - base.get(reason, 0)

    _, n = await until(probe, within=10, what=f"{url} counts {reason!r} in /metrics")
    return float(n)


@pytest.mark.asyncio
async def test_only_store_nodes_open_sync_sessions(cluster: Cluster, tmp_path: Path) -> None:
    t = tag()
    edge_ident = new_store(tmp_path, f"s-{t}", f"edge-{t}")
    ra = enrol_direct(tmp_path, edge_ident, f"ra-{t}")
    rb = enrol_direct(tmp_path, edge_ident, f"rb-{t}")
    alien = init_store(tmp_path / "alien", f"s-{t}", now_ms=now_ms(), node_id=f"ra-{t}")
    edge = await cluster.start("edge", edge_ident.data_dir, discovery=False)
    assert edge.url.startswith("https://")
    async with client() as http:
        base = await rejections(http, edge.url)

        # 1. plain text: HTTP and ws:// to the TLS port
        plain = edge.url.replace("https://", "http://")
        async with aiohttp.ClientSession() as raw:
            with pytest.raises(aiohttp.ClientError):
                await raw.ws_connect(plain + "/v1/sync")
        assert await _delta(http, edge.url, base, "session_tls_plaintext") >= 1

        # 2. TLS pinned to the store CA, but no node certificate (a till): HTTP 403
        with pytest.raises(aiohttp.WSServerHandshakeError) as no_cert:
            await http.ws_connect(edge.url + "/v1/sync")
        assert no_cert.value.status == 403
        assert await _delta(http, edge.url, base, "session_no_client_cert") == 1

        # 3. a certificate from another CA (same store id, same node id, its own key),
        # by a client that does not even check the server: the TLS handshake fails
        sloppy = meshkit.rogue_tls_context(alien.data_dir)
        with pytest.raises((aiohttp.ClientError, HandshakeError)):
            s = await dial(http, edge.url, alien, now_ms, ssl_context=sloppy)
            await s.ws.close()
        assert await _delta(http, edge.url, base, "session_tls_bad_certificate") >= 1

        # 4. a valid TLS certificate (rb's) carrying a hello of another node (ra, with
        # ra's own storemesh certificate and key): refused, TLS and hello disagree
        with pytest.raises(HandshakeError):
            s = await dial(http, edge.url, ra, now_ms, ssl_context=client_context(
                load_tls_files(rb.data_dir, rb.key, store_id=rb.store_id, node_id=rb.node_id,
                               store_public_key=rb.trust.store_public_key)))
            await s.ws.close()
        assert await _delta(http, edge.url, base, "session_tls_identity_mismatch") == 1

        # control: ra as itself gets a session
        s = await dial(http, edge.url, ra, now_ms)
        try:
            await until(lambda: _has(http, edge, ra.node_id), within=10,
                        what="edge accepts ra's own session")
        finally:
            await s.ws.close()
        assert await peers_up(http, edge) <= {ra.node_id}
        # a till pins the CA (what 'storemesh store ca' exports) and uses the API
        ca = (edge_ident.data_dir / "tls-ca.pem").read_bytes()
        async with aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=api_client_context(ca))) as till:
            assert (await get_json(till, edge.url, "/v1/health"))["node_id"] == edge.node_id
        # ... and a client pinning nothing, or the system CAs, cannot
        async with aiohttp.ClientSession() as stranger:
            with pytest.raises(aiohttp.ClientConnectorCertificateError):
                await get_json(stranger, edge.url, "/v1/health")


async def _has(http: aiohttp.ClientSession, node: meshkit.NodeProc, peer: str) -> bool:
    return peer in await peers_up(http, node)


@pytest.mark.asyncio
async def test_another_node_cannot_stand_in_for_the_one_dialled(
        cluster: Cluster, tmp_path: Path) -> None:
    """r1 dials the edge through a proxy and learns its node id. Then the proxy sends
    r1's next connection to r2, which holds a valid certificate of the same store, for
    another node id: r1 refuses it (``wrong_peer``) and keeps no session with it."""
    t = tag()
    edge_ident = new_store(tmp_path, f"s-{t}", f"edge-{t}")
    enrol_direct(tmp_path, edge_ident, f"r1-{t}")
    enrol_direct(tmp_path, edge_ident, f"r2-{t}")
    edge = await cluster.start("edge", edge_ident.data_dir, discovery=False)
    r2 = await cluster.start("r2", tmp_path / f"r2-{t}", discovery=False)
    proxy = cluster.add(TcpProxy(edge.port, name="r1->edge").start())
    r1 = await cluster.start("r1", tmp_path / f"r1-{t}", discovery=False, peers=[proxy.url])
    async with client() as http:
        await until(lambda: _has(http, r1, edge.node_id), within=WITHIN_S,
                    what="r1's session with the edge through the proxy")
        base = await rejections(http, r1.url)
        proxy.target_port = r2.port  # the next connection reaches r2 instead
        proxy.cut()
        proxy.heal()
        assert await _delta(http, r1.url, base, "session_wrong_peer") >= 1
        assert r2.node_id not in await peers_up(http, r1)
        assert r1.node_id not in await peers_up(http, r2)


# --- a live session: flipped and replayed bytes -------------------------------------------------


@pytest.mark.asyncio
async def test_tampered_or_replayed_bytes_break_the_session(
        cluster: Cluster, tmp_path: Path) -> None:
    """A machine in the middle flips one bit of, or replays recorded bytes into, a live
    sync session. TLS refuses the record (its MAC fails, or its sequence number is not
    the next one): the session ends, counted as ``tls_record_error``, and nothing of it
    reaches the sync layer (no envelope refusal counted, nothing applied). The nodes
    reconnect and the genuine sales converge, each counted once."""
    t = tag()
    edge_ident = new_store(tmp_path, f"s-{t}", f"edge-{t}")
    token = join_token(edge_ident)
    edge = await cluster.start("edge", edge_ident.data_dir, discovery=False)
    proxy = cluster.add(TcpProxy(edge.port, name="r1->edge").start())
    r1 = await cluster.start("r1", tmp_path / f"r1-{t}", discovery=False, join=token,
                             node_id=f"r1-{t}", peers=[proxy.url])
    async with client() as http:
        await until(lambda: _has(http, edge, r1.node_id), within=WITHIN_S,
                    what="r1 joined over TLS and has a session with the edge")
        await post_ok(http, edge.url, "/v1/receipts",
                      {"sku": "X", "qty": 100, "txn_id": "grn-x", "staff_id": "mgr"})
        await wait_converged(http, [edge, r1], within=WITHIN_S, expect={"X": 100})
        sales = 0
        for attack in ("flip", "replay"):
            base = await rejections(http, edge.url)
            envelopes = (await get_json(http, edge.url, "/v1/health"))["envelopes"]
            if attack == "flip":
                proxy.tamper(up=True, flip_at=40)
            else:
                chunks = proxy.recorded(up=True)
                assert len(chunks) > 3
                proxy.tamper(up=True, inject=chunks[-2])  # a record sent before, again
            sales += 1
            await post_ok(http, r1.url, "/v1/sales",
                          {"sku": "X", "qty": 1, "txn_id": f"sale-{attack}"})
            assert await _delta(http, edge.url, base, "session_tls_record_error") >= 1, \
                proxy.tampered
            after = await rejections(http, edge.url)
            changed = {k for k in after if after[k] != base.get(k, 0)}
            assert changed <= {"session_tls_record_error", "session_tls_aborted",
                               "session_tls_handshake_failed"}, changed
            health = await get_json(http, edge.url, "/v1/health")
            assert health["envelopes"] <= envelopes + 1  # at most the genuine sale
            await until(lambda: _has(http, edge, r1.node_id), within=WITHIN_S,
                        what=f"r1 reconnects after the {attack}")
            await wait_converged(http, [edge, r1], within=WITHIN_S,
                                 expect={"X": 100 - sales})
        assert len(proxy.tampered) == 2, proxy.tampered


@pytest.mark.asyncio
async def test_plaintext_mode_still_works_on_loopback(cluster: Cluster, tmp_path: Path) -> None:
    t = tag()
    edge_ident = new_store(tmp_path, f"s-{t}", f"edge-{t}")
    enrol_direct(tmp_path, edge_ident, f"r1-{t}")
    edge = await cluster.start("edge", edge_ident.data_dir, discovery=False, plaintext=True)
    r1 = await cluster.start("r1", tmp_path / f"r1-{t}", discovery=False, plaintext=True,
                             peers=[edge.url])
    assert edge.url.startswith("http://")
    async with aiohttp.ClientSession() as http:
        await until(lambda: _has(http, edge, r1.node_id), within=WITHIN_S,
                    what="plain-text session on loopback")
    assert load_identity(edge_ident.data_dir).node_id == edge.node_id


@pytest.mark.asyncio
async def test_status_pins_the_store_ca(cluster: Cluster, tmp_path: Path) -> None:
    t = tag()
    edge_ident = new_store(tmp_path, f"s-{t}", f"edge-{t}")
    edge = await cluster.start("edge", edge_ident.data_dir, discovery=False)
    runner = CliRunner()
    ca = tmp_path / "ca.pem"
    assert runner.invoke(main, ["store", "ca", str(edge_ident.data_dir), "-o", str(ca)]
                         ).exit_code == 0
    ok = await asyncio.to_thread(runner.invoke, main, ["status", edge.url, "--ca", str(ca)])
    assert ok.exit_code == 0 and edge.node_id in ok.output, ok.output
    unpinned = await asyncio.to_thread(runner.invoke, main, ["status", edge.url])
    assert unpinned.exit_code == 2 and "--ca" in unpinned.output, unpinned.output
    other = init_store(tmp_path / "other", f"s-{t}", now_ms=now_ms())
    wrong = await asyncio.to_thread(runner.invoke, main, ["status", edge.url, "--ca",
                                                         str(other.data_dir)])
    assert wrong.exit_code != 0 and "CERTIFICATE_VERIFY_FAILED" in wrong.output, wrong.output

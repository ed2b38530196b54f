"""TLS on every link (issue 11, deliverable 1): real processes, real TLS on 127.0.0.1.

* the certificates ``mesh.net.tls`` issues (unit level);
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
import datetime as dt
import os
import shutil
import socket
import ssl
import stat
import subprocess
from pathlib import Path

import aiohttp
import orjson
import pytest
from click.testing import CliRunner
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding

from mesh.app.cli import main
from mesh.cloud.server import CloudNode
from mesh.core.identity import TrustStore
from mesh.net.enrol import UntrustedEdge, join, parse_token
from mesh.net.hqtls import LEAF_VALIDITY, NODE_FILES, RENEW_BEFORE, ensure_hq_tls
from mesh.net.tls import (
    KEY_FILE,
    api_client_context,
    browser_hosts,
    check_browser_name,
    client_context,
    load_tls_files,
    peer_identity,
    sni_name,
)
from mesh.net.transport import HandshakeError, dial
from mesh.node.node import Node
from mesh.store.datadir import enrol_node, init_store, load_identity
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
                      {"sku": "X", "qty": 100, "txn_id": "grn-x"})
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


# --- the attack of issue 11: a forged summary injected on a live session -----------------------


def _client_ws_frame(payload: bytes) -> bytes:
    """One binary WebSocket frame as a client sends it (RFC 6455: FIN, opcode 2,
    masked), carrying ``payload``: what a machine on the path would insert."""
    mask = os.urandom(4)
    n = len(payload)
    head = bytes([0x82]) + (bytes([0x80 | n]) if n < 126
                            else bytes([0x80 | 126]) + n.to_bytes(2, "big"))
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def _z1_message(payload: bytes) -> bytes:
    """``payload`` as one message of the LAN session encoding ``z1`` (which the two nodes
    negotiate): a deflate *stored* block needs none of the stream's history, so anyone
    on a plain-text path can forge one; then the empty stored block every message ends
    with. The encoding is compression, not integrity: only TLS keeps this out."""
    n = len(payload)
    return (b"Z\x00" + n.to_bytes(2, "little") + (n ^ 0xFFFF).to_bytes(2, "little") + payload
            + b"\x00\x00\x00\xff\xff")


def _forged_summary(origins: list[str]) -> bytes:
    """A sync summary (``V``, mesh.core.sync) claiming the register holds a million envelopes
    of every origin, with an ``rx`` no genuine summary will reach: a receiver that
    believes it never pushes that register anything again, and takes every later
    genuine summary for a stale one."""
    return b"V" + orjson.dumps({"vv": dict.fromkeys(origins, 1_000_000), "links": [],
                                "nc": "0" * 16, "crl": -1, "rx": 10**9, "ad": 0})


@pytest.mark.parametrize("tls", [False, True], ids=["control-plaintext", "tls"])
@pytest.mark.asyncio
async def test_a_forged_summary_injected_on_a_live_session(
        cluster: Cluster, tmp_path: Path, tls: bool) -> None:
    """A machine between a register and the edge inserts a well-formed sync frame into
    the register's live session (issue 11: "one injected summary on a live session
    stopped the edge from sending a register anything while /v1/peers still showed
    up=true lag=0").

    Control, over ``--insecure-plaintext`` (ws://): the edge takes the frame for the
    register's and stops sending it anything; the register misses the edge's next sale
    while the session stays up. That shows the proxy's injection reaches the sync layer.
    Over TLS the same bytes are no valid TLS record: the edge ends the session
    (``tls_record_error``), nothing of the frame is applied, the register reconnects and
    gets the sale."""
    t = tag()
    edge_ident = new_store(tmp_path, f"s-{t}", f"edge-{t}")
    r1_ident = enrol_direct(tmp_path, edge_ident, f"r1-{t}")
    plain = not tls
    edge = await cluster.start("edge", edge_ident.data_dir, discovery=False, plaintext=plain)
    proxy = cluster.add(TcpProxy(edge.port, name="r1->edge",
                                 scheme="https" if tls else "http").start())
    r1 = await cluster.start("r1", r1_ident.data_dir, discovery=False, plaintext=plain,
                             peers=[proxy.url])
    async with client() as http:  # (plain http too: the TLS context is not used)
        await until(lambda: _has(http, edge, r1.node_id), within=WITHIN_S,
                    what="r1's session with the edge through the proxy")
        await post_ok(http, edge.url, "/v1/receipts",
                      {"sku": "X", "qty": 100, "txn_id": "grn-x"})
        await wait_converged(http, [edge, r1], within=WITHIN_S, expect={"X": 100})
        base = await rejections(http, edge.url)
        # r1 sends a summary every second or so: the frame goes in just before it
        proxy.tamper(up=True, inject=_client_ws_frame(
            _z1_message(_forged_summary([edge.node_id, r1.node_id]))))
        await until(lambda: _true(bool(proxy.tampered)), within=10,
                    what="the proxy injected the frame")
        await post_ok(http, edge.url, "/v1/sales",
                      {"sku": "X", "qty": 1, "txn_id": "sale-after-injection"})
        if plain:
            await asyncio.sleep(5.0)  # far beyond the push and summary intervals
            assert (await get_json(http, r1.url, "/v1/stock/X"))["on_hand"] == 100, \
                "the control failed: the injected summary did not reach the sync layer"
            assert r1.node_id in await peers_up(http, edge)  # and nobody noticed
            return
        assert await _delta(http, edge.url, base, "session_tls_record_error") >= 1
        after = await rejections(http, edge.url)
        changed = {k for k in after if after[k] != base.get(k, 0)}
        assert changed <= {"session_tls_record_error", "session_tls_aborted",
                           "session_tls_handshake_failed"}, changed
        await until(lambda: _has(http, edge, r1.node_id), within=WITHIN_S,
                    what="r1 reconnects")
        await wait_converged(http, [edge, r1], within=WITHIN_S, expect={"X": 99})
        assert len(proxy.tampered) == 1 and proxy.tampered[0].startswith("injected"), \
            proxy.tampered


async def _true(value: bool) -> bool:
    return value


# --- the dialer reaches the node it means --------------------------------------------------------


@pytest.mark.asyncio
async def test_a_pinned_peer_url_and_a_cloud_url_reach_only_the_node_meant(
        cluster: Cluster, tmp_path: Path) -> None:
    """A static peer URL may name its node after ``#``; a ``--cloud`` URL must reach a
    node enrolled as ``cloud``. A valid node of the same store answering there instead
    (here: the edge) is refused as ``wrong_peer`` before any sync message, and
    counted; the same URL pinned to the right node id opens the session. A server whose
    certificate another CA signed (same store id and node id) is refused at the TLS
    handshake and counted (``tls_server_certificate``)."""
    t = tag()
    edge_ident = new_store(tmp_path, f"s-{t}", f"edge-{t}")
    enrol_direct(tmp_path, edge_ident, f"r1-{t}")
    enrol_direct(tmp_path, edge_ident, f"r2-{t}")
    edge = await cluster.start("edge", edge_ident.data_dir, discovery=False)
    r1 = await cluster.start("r1", tmp_path / f"r1-{t}", discovery=False,
                             peers=[f"{edge.url}#r9-{t}"], extra=["--cloud", edge.url])
    # same store id and node id as the edge, another store key: not this store's CA
    alien_ident = init_store(tmp_path / "alien", f"s-{t}", now_ms=now_ms(),
                             node_id=edge.node_id)
    alien = await cluster.start("alien", alien_ident.data_dir, discovery=False)
    r2 = await cluster.start("r2", tmp_path / f"r2-{t}", discovery=False,
                             peers=[f"{edge.url}#{edge.node_id}", alien.url])
    async with client() as http:
        await until(lambda: _has(http, r2, edge.node_id), within=WITHIN_S,
                    what="r2's session with the edge it pinned")
        # the server with a certificate of another CA: refused at the dialer, counted
        assert await _delta(http, r2.url, {}, "session_tls_server_certificate") >= 1
        # both of r1's dialers were refused (and retry with backoff: >= 2 counted)
        assert await _delta(http, r1.url, {}, "session_wrong_peer") >= 2
        assert edge.node_id not in await peers_up(http, r1)
        assert r1.node_id not in await peers_up(http, edge)
    log = r1.log_tail(400)
    assert f"is node '{edge.node_id}', not 'r9-{t}'" in log, log
    assert "enrolled as 'edge', not 'cloud'" in log, log


@pytest.mark.asyncio
async def test_dial_checks_the_node_id_it_meant(cluster: Cluster, tmp_path: Path) -> None:
    t = tag()
    edge_ident = new_store(tmp_path, f"s-{t}", f"edge-{t}")
    ra = enrol_direct(tmp_path, edge_ident, f"ra-{t}")
    edge = await cluster.start("edge", edge_ident.data_dir, discovery=False)
    async with client() as http:
        with pytest.raises(HandshakeError) as refused:
            await dial(http, edge.url, ra, now_ms, expect=f"edge2-{t}")
        assert refused.value.reason == "wrong_peer"
        # the TLS certificate is checked before a hello is sent: the edge saw no session
        assert ra.node_id not in await peers_up(http, edge)
        s = await dial(http, edge.url, ra, now_ms, expect=edge.node_id)
        await until(lambda: _has(http, edge, ra.node_id), within=10, what="ra's session")
        await s.ws.close()
        # until the edge has ended it too: the TLS shutdown of that connection is then
        # done, before this test's event loop closes (else a transport is left unclosed)
        await until(lambda: _lacks(http, edge, ra.node_id), within=10,
                    what="the edge ends ra's session")


async def _lacks(http: aiohttp.ClientSession, node: meshkit.NodeProc, peer: str) -> bool:
    return peer not in await peers_up(http, node)


# --- join over TLS through a machine in the middle --------------------------------------------


@pytest.mark.asyncio
async def test_join_through_a_machine_in_the_middle(cluster: Cluster, tmp_path: Path) -> None:
    """A join token pins the issuing edge's TLS certificate. A machine in the middle
    that sends the joiner to another node of the store (a valid certificate from the
    store key: an enrolled, malicious register) gets refused before the token is sent;
    forwarding to the real edge, it sees only TLS records: neither the token nor its
    secret crosses the wire readable."""
    t = tag()
    edge_ident = new_store(tmp_path, f"s-{t}", f"edge-{t}")
    enrol_direct(tmp_path, edge_ident, f"evil-{t}")
    edge = await cluster.start("edge", edge_ident.data_dir, discovery=False)
    evil = await cluster.start("evil", tmp_path / f"evil-{t}", discovery=False)
    proxy = cluster.add(TcpProxy(evil.port, name="joiner->?").start())
    token = join_token(edge_ident)
    secret_b64 = token.split(".", 1)[1]
    with pytest.raises(UntrustedEdge, match="nothing was sent"):
        await join(tmp_path / "new", token, url=proxy.url, timeout_s=10)
    assert not (tmp_path / "new" / "node.json").exists()
    async with client() as http:
        assert not {k for k in await rejections(http, evil.url) if "join" in k}
    proxy.target_port = edge.port  # now it forwards to the genuine edge
    ident = await join(tmp_path / "new", token, url=proxy.url, timeout_s=10)
    assert ident.node_id and (tmp_path / "new" / "tls-node.pem").exists()
    wire = b"".join(proxy.recorded(up=True))
    raw_secret = parse_token(token).secret
    assert wire and secret_b64[:24].encode() not in wire and raw_secret not in wire
    assert b"/v1/join" not in wire and b"public_key" not in wire


# --- the POS API: a till pins the store CA -----------------------------------------------------


@pytest.mark.asyncio
async def test_a_till_pins_the_store_ca_with_curl(cluster: Cluster, tmp_path: Path) -> None:
    """What docs/security.md tells a till: export the CA, verify the node's certificate
    against it (the node id is its DNS name). A store's CA accepts its node; another
    store's CA (same store id) and the system CAs do not."""
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    t = tag()
    edge_ident = new_store(tmp_path, f"s-{t}", f"edge-{t}")
    other = init_store(tmp_path / "other", f"s-{t}", now_ms=now_ms(), node_id=f"edge-{t}")
    edge = await cluster.start("edge", edge_ident.data_dir, discovery=False)
    ca = tmp_path / "ca.pem"
    assert CliRunner().invoke(main, ["store", "ca", str(edge_ident.data_dir), "-o", str(ca)]
                              ).exit_code == 0
    host = edge.node_id

    def curl(*extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["curl", "-sS", "--max-time", "10", "--resolve", f"{host}:{edge.port}:127.0.0.1",
             *extra, f"https://{host}:{edge.port}/v1/health"],
            capture_output=True, text=True, check=False, timeout=20)

    ok = await asyncio.to_thread(curl, "--cacert", str(ca))
    assert ok.returncode == 0 and f'"node_id":"{host}"' in ok.stdout, ok.stderr
    wrong = await asyncio.to_thread(curl, "--cacert", str(other.data_dir / "tls-ca.pem"))
    assert wrong.returncode == 60, (wrong.returncode, wrong.stderr)  # peer cert unverified
    system = await asyncio.to_thread(curl)
    assert system.returncode == 60, (system.returncode, system.stderr)
    plain = await asyncio.to_thread(subprocess.run, [
        "curl", "-sS", "--max-time", "10", f"http://127.0.0.1:{edge.port}/v1/health"],
        capture_output=True, text=True, check=False, timeout=20)
    assert plain.returncode != 0 and '"node_id"' not in plain.stdout  # no plain HTTP


# --- the cloud: one TLS listener, many stores ---------------------------------------------------


@pytest.mark.asyncio
async def test_at_the_cloud_a_store_reaches_only_its_own_replica(tmp_path: Path) -> None:
    """The cloud serves two stores on one TLS port (their certificates chosen by SNI).
    Store A's edge opens a session with A's replica; with B's replica it cannot: asking
    for B's certificate (B's SNI) it meets a CA it does not trust, and with A's SNI on
    B's path it is refused by B's replica, which counts it."""
    t = tag()
    a = new_store(tmp_path / "a", f"sa-{t}", f"edge-a-{t}")
    b = new_store(tmp_path / "b", f"sb-{t}", f"edge-b-{t}")
    for e in (a, b):
        assert e.store_key is not None
        enrol_node(tmp_path / "hq" / e.store_id, e.store_key, e.store_id, "cloud",
                   now_ms=now_ms(), node_id=f"cloud-{e.store_id}",
                   trust=TrustStore.from_dict(e.trust.to_dict()))
    cloud = CloudNode(tmp_path / "hq", http_host="127.0.0.1")
    await cloud.start()
    try:
        assert cloud.url.startswith("https://")
        async with client() as http:
            own = await dial(http, f"{cloud.url}/stores/{a.store_id}", a, now_ms, wan=True,
                             server_hostname=sni_name(a.store_id), expect_role="cloud")
            assert own.peer_id == f"cloud-{a.store_id}"
            await own.ws.close()
            with pytest.raises(aiohttp.ClientConnectorCertificateError):
                await dial(http, f"{cloud.url}/stores/{b.store_id}", a, now_ms, wan=True,
                           server_hostname=sni_name(b.store_id))
            with pytest.raises(HandshakeError):
                await dial(http, f"{cloud.url}/stores/{b.store_id}", a, now_ms, wan=True,
                           server_hostname=sni_name(a.store_id))
            replica_b = cloud.nodes[b.store_id]
            assert sum(replica_b.rejected_sessions.values()) == 1, replica_b.rejected_sessions
            assert not replica_b.sessions
    finally:
        await cloud.close()


def test_the_hq_certificate_is_made_once_and_renewed_for_new_hosts(tmp_path: Path) -> None:
    first = ensure_hq_tls(tmp_path, ["localhost", "127.0.0.1"], now_ms=now_ms())
    assert first.ca_path is not None
    ca_pem, leaf_pem = first.ca_path.read_bytes(), first.cert_path.read_bytes()
    for key in (tmp_path / "hq-ca.key", first.key_path):
        assert stat.S_IMODE(os.stat(key).st_mode) == 0o600
    leaf = x509.load_pem_x509_certificate(leaf_pem)
    assert isinstance(leaf.public_key(), ec.EllipticCurvePublicKey)  # what browsers take
    leaf.verify_directly_issued_by(x509.load_pem_x509_certificate(ca_pem))
    assert leaf.not_valid_after_utc - leaf.not_valid_before_utc <= dt.timedelta(days=398)
    again = ensure_hq_tls(tmp_path, ["localhost", "127.0.0.1"], now_ms=now_ms())
    assert again.cert_path.read_bytes() == leaf_pem  # nothing to do
    more = ensure_hq_tls(tmp_path, ["localhost", "127.0.0.1", "hq.example"], now_ms=now_ms())
    assert more.cert_path.read_bytes() != leaf_pem  # a new leaf for the new name ...
    assert tmp_path.joinpath("hq-ca.pem").read_bytes() == ca_pem  # ... from the same CA
    san = x509.load_pem_x509_certificate(more.cert_path.read_bytes()).extensions \
        .get_extension_for_class(x509.SubjectAlternativeName).value
    assert "hq.example" in san.get_values_for_type(x509.DNSName)
    renewed = more.cert_path.read_bytes()
    late = now_ms() + 380 * 24 * 3600 * 1000  # within RENEW_BEFORE of its expiry
    assert ensure_hq_tls(tmp_path, ["localhost"], now_ms=late).cert_path.read_bytes() != \
        renewed


def test_cloud_run_wants_both_tls_cert_and_key(tmp_path: Path) -> None:
    (tmp_path / "c.pem").write_text("x")
    res = CliRunner().invoke(main, ["cloud", "run", "--data", str(tmp_path), "--tls-cert",
                                    str(tmp_path / "c.pem")])
    assert res.exit_code == 2 and "--tls-key" in res.output, res.output


@pytest.mark.asyncio
async def test_the_cloud_answers_browsers_with_the_hq_certificate(tmp_path: Path) -> None:
    """No SNI (a browser at an IP, the CLI): the HQ certificate (ECDSA, HQ CA). A store's
    SNI: that store's Ed25519 certificate. A client holding a certificate of the HQ CA
    cannot open a sync session (the HQ CA signs nothing a store node trusts)."""
    t = tag()
    a = new_store(tmp_path / "a", f"sa-{t}", f"edge-a-{t}")
    assert a.store_key is not None
    enrol_node(tmp_path / "hq" / a.store_id, a.store_key, a.store_id, "cloud",
               now_ms=now_ms(), node_id=f"cloud-{a.store_id}",
               trust=TrustStore.from_dict(a.trust.to_dict()))
    cloud = CloudNode(tmp_path / "hq", http_host="127.0.0.1")
    await cloud.start()
    try:
        assert cloud.hq is not None and cloud.hq.ca_path is not None
        port = cloud.http_port

        def presented(sni: str | None) -> x509.Certificate:
            return presented_certificate(port, sni)

        browser = await asyncio.to_thread(presented, None)
        assert isinstance(browser.public_key(), ec.EllipticCurvePublicKey)
        assert (await asyncio.to_thread(presented, "localhost")).serial_number == \
            browser.serial_number
        store = await asyncio.to_thread(presented, sni_name(a.store_id))
        assert store.public_key().public_bytes_raw() == cloud.nodes[  # type: ignore[union-attr]
            a.store_id].identity.key.public_key
        # the CLI pins the HQ CA for the cloud (--ca ROOT)
        ok = await asyncio.to_thread(CliRunner().invoke, main, [
            "status", f"{cloud.url}/stores/{a.store_id}", "--ca", str(tmp_path / "hq")])
        assert ok.exit_code == 0 and f"cloud-{a.store_id}" in ok.output, ok.output
        # a sync session with the HQ certificate as client certificate: refused
        hq_client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        hq_client.check_hostname, hq_client.verify_mode = False, ssl.CERT_NONE
        hq_client.load_cert_chain(cloud.hq.cert_path, cloud.hq.key_path)
        async with aiohttp.ClientSession() as http:
            with pytest.raises((aiohttp.ClientError, HandshakeError)):
                s = await dial(http, f"{cloud.url}/stores/{a.store_id}", a, now_ms,
                               wan=True, ssl_context=hq_client,
                               server_hostname=sni_name(a.store_id))
                await s.ws.close()
        assert not cloud.nodes[a.store_id].sessions
    finally:
        await cloud.close()


def presented_certificate(port: int, sni: str | None) -> x509.Certificate:
    """The certificate a listener on 127.0.0.1:``port`` presents for server name ``sni``
    (not verified: the test looks at which one it is)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, \
            ctx.wrap_socket(raw, server_hostname=sni) as tls_sock:
        der = tls_sock.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der)


def test_browser_names_are_host_names_not_addresses() -> None:
    assert browser_hosts("register-1") == ["localhost", "register-1.local"]
    assert browser_hosts("Till_7", ["POS-3.Store12.example."]) == [
        "localhost", "pos-3.store12.example"]  # "Till_7" is no host label: no .local
    for bad in ("192.168.1.20", "::1", "bad name", "", "a..b", "x" * 300):
        with pytest.raises(ValueError):
            check_browser_name(bad)


@pytest.mark.asyncio
async def test_a_node_answers_browser_tills_with_its_p256_certificate(tmp_path: Path) -> None:
    """Browsers offer no Ed25519: for the names a till's browser uses (localhost,
    NODE.local, --browser-name) the node presents a P-256 certificate of its own browser
    CA, which verifies by host name; without a server name (peers, the CLI, an IP URL)
    and for any other name it keeps the Ed25519 certificate of the store CA, so sync and
    the pinned CLI are unchanged."""
    t = tag()
    edge = new_store(tmp_path, f"s-{t}", f"edge-{t}")
    node = Node(edge.data_dir, http_host="127.0.0.1", http_port=0, discovery=False,
                browser_names=["pos.store.example"])
    await node.start()
    try:
        port = node.http_port
        ca = (edge.data_dir / NODE_FILES.ca).read_bytes()
        assert (edge.data_dir / NODE_FILES.key).stat().st_mode & 0o777 == 0o600
        assert (edge.data_dir / NODE_FILES.ca_key).stat().st_mode & 0o777 == 0o600

        def browser_like(name: str) -> x509.Certificate:
            """A client that checks the host name against the browser CA, as a browser
            that trusts it does."""
            ctx = ssl.create_default_context(cadata=ca.decode("ascii"))
            with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, \
                    ctx.wrap_socket(raw, server_hostname=name) as tls_sock:
                der = tls_sock.getpeercert(binary_form=True)
            assert der is not None
            return x509.load_der_x509_certificate(der)

        def presented(sni: str | None) -> x509.Certificate:
            return presented_certificate(port, sni)

        for name in ("localhost", f"edge-{t}.local", "pos.store.example", "LOCALHOST"):
            cert = await asyncio.to_thread(browser_like, name)
            key = cert.public_key()
            assert isinstance(key, ec.EllipticCurvePublicKey), name
            assert key.curve.name == "secp256r1"
        for sni in (None, f"edge-{t}", "other.example"):
            cert = await asyncio.to_thread(presented, sni)
            assert cert.public_key().public_bytes_raw() == edge.key.public_key, sni  # type: ignore[union-attr]
        # the browser certificate does not open a sync session: it is no store CA's
        with pytest.raises(ssl.SSLCertVerificationError):
            await asyncio.to_thread(browser_like, f"edge-{t}")
        # the API answers over it (what a web POS on the register does)
        ctx = ssl.create_default_context(cadata=ca.decode("ascii"))
        async with aiohttp.ClientSession() as http, http.get(
                f"https://localhost:{port}/v1/health", ssl=ctx) as resp:
            assert resp.status == 200
        # renewal in place: a leaf close to its end is replaced, the CA kept
        before = (edge.data_dir / NODE_FILES.cert).read_bytes()
        soon = now_ms() + int((LEAF_VALIDITY - RENEW_BEFORE).total_seconds() * 1000) + 86_400_000
        node.now_ms = lambda: soon  # type: ignore[method-assign]
        await node._renew_browser_tls()
        assert (edge.data_dir / NODE_FILES.cert).read_bytes() != before
        assert (edge.data_dir / NODE_FILES.ca).read_bytes() == ca
        again = await asyncio.to_thread(presented, "localhost")  # (dated in the future)
        assert again.serial_number != x509.load_pem_x509_certificate(before).serial_number
        assert again.serial_number == x509.load_pem_x509_certificate(
            (edge.data_dir / NODE_FILES.cert).read_bytes()).serial_number
    finally:
        await node.close()

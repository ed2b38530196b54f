"""``POST /v1/revocations`` on real nodes in this process (issue 10 item 23): a genuine
newer list is adopted, ends the revoked node's session and is saved; a forged, older,
malformed or oversized one changes nothing and is counted."""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import orjson
import pytest
import pytest_asyncio

from mesh.core.identity import NodeKey, issue_revocations
from mesh.net.tls import api_client_context
from mesh.node.node import Node
from mesh.store.datadir import NodeIdentity, enrol_node, init_store, load_identity
from mesh.store.revoke import deliver
from tests.meshkit import now_ms, wait_until

pytestmark = pytest.mark.asyncio


def _pin(node: Node) -> ssl.SSLContext:
    """A client pinned to ``node``'s store CA, as the CLI's 'nodes revoke' is."""
    assert node.tls is not None, "the node runs TLS"
    return api_client_context(node.tls.ca_pem)


@pytest_asyncio.fixture
async def pair(tmp_path: Path) -> AsyncIterator[tuple[Node, Node, NodeIdentity]]:
    """An edge and a register (static peer) with a live session."""
    edge_ident = init_store(tmp_path / "edge", "store-1", now_ms=now_ms(), node_id="edge")
    assert edge_ident.store_key is not None
    reg = enrol_node(tmp_path / "r1", edge_ident.store_key, "store-1", "register",
                     now_ms=now_ms(), node_id="r1", trust=None)
    edge_ident.trust.add_certificate(reg.certificate)
    edge_ident.save()
    edge = Node(tmp_path / "edge", http_host="127.0.0.1", http_port=0, discovery=False)
    await edge.start()
    r1 = Node(tmp_path / "r1", http_host="127.0.0.1", http_port=0, discovery=False,
              peers=(edge.url,))
    try:
        await r1.start()
        await wait_until(lambda: "r1" in edge.sessions and "edge" in r1.sessions, 10,
                         "the session edge-r1")
        yield edge, r1, edge_ident
    finally:
        await r1.close()
        await edge.close()


async def test_a_genuine_list_ends_the_session_and_later_ones_are_refused(
        pair: tuple[Node, Node, NodeIdentity]) -> None:
    edge, r1, ident = pair
    assert ident.store_key is not None
    crl = issue_revocations(ident.store_key, store_id="store-1", version=1, revoked={"r1"})
    assert await deliver(edge.url, crl, ssl_context=_pin(edge)) == 1
    await wait_until(lambda: "r1" not in edge.sessions and "edge" not in r1.sessions, 5,
                     "the session with r1 to end")
    assert edge.core.stats.get("revoked_session") == 1
    # r1 dials again: refused at the handshake, counted
    await wait_until(lambda: edge.rejected_sessions.get("revoked", 0) >= 1, 15,
                     "r1's redial refused as revoked")
    assert "r1" not in edge.sessions
    await wait_until(lambda: load_identity(ident.data_dir).trust.crl_version == 1, 5,
                     "the list saved in node.json")
    # the same list again: accepted, changes nothing
    assert await deliver(edge.url, crl, ssl_context=_pin(edge)) == 1


async def test_forged_older_malformed_and_oversized_lists_change_nothing(
        pair: tuple[Node, Node, NodeIdentity]) -> None:
    edge, _r1, ident = pair
    assert ident.store_key is not None
    v2 = issue_revocations(ident.store_key, store_id="store-1", version=2, revoked=set())
    assert await deliver(edge.url, v2, ssl_context=_pin(edge)) == 2
    older = issue_revocations(ident.store_key, store_id="store-1", version=1, revoked={"r1"})
    assert await deliver(edge.url, older, ssl_context=_pin(edge)) == 2  # ignored: not newer
    forged = issue_revocations(NodeKey.from_bytes(b"\x03" * 32), store_id="store-1",
                               version=9, revoked={"r1"})
    with pytest.raises(ValueError, match="not signed by the store key"):
        await deliver(edge.url, forged, ssl_context=_pin(edge))
    other = issue_revocations(ident.store_key, store_id="store-2", version=9, revoked={"r1"})
    with pytest.raises(ValueError, match="store-2"):
        await deliver(edge.url, other, ssl_context=_pin(edge))
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=_pin(edge))) as http:
        for body, status in ((b"not json", 400), (b'{"store_id": "store-1"}', 400),
                             (b"x" * 70_000, 413)):
            async with http.post(edge.url + "/v1/revocations", data=body,
                                 headers={"Content-Type": "application/json"}) as resp:
                assert resp.status == status, await resp.text()
                assert "error" in orjson.loads(await resp.read())
    assert edge.rejected_sessions.get("revocations_bad_signature") == 1
    assert edge.rejected_sessions.get("revocations_wrong_store") == 1
    assert edge.rejected_sessions.get("revocations_bad_request") == 2
    assert edge.rejected_sessions.get("revocations_oversized") == 1
    assert "r1" in edge.sessions and edge.identity.trust.crl_version == 2

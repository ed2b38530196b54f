"""The real node applies the driver's rule for a second session with a peer (driver
invariant 9), as the simulator does: a restarted register's new session replaces the
stale one the edge still holds, instead of being refused until the heartbeat."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
import pytest

from mesh.net import transport
from mesh.node.node import Node
from mesh.store.datadir import enrol_node, init_store
from tests.meshkit import now_ms, wait_until


@pytest.mark.asyncio
async def test_a_restarted_register_replaces_its_stale_session(tmp_path: Path) -> None:
    edge_id = init_store(tmp_path / "edge", "store-1", now_ms=now_ms(), node_id="edge")
    assert edge_id.store_key is not None
    reg = enrol_node(tmp_path / "reg", edge_id.store_key, "store-1", "register",
                     now_ms=now_ms(), node_id="reg-1")
    edge = Node(tmp_path / "edge", insecure_plaintext=True, http_host="127.0.0.1",
                http_port=0, discovery=False)
    await edge.start()
    try:
        async with aiohttp.ClientSession() as http:
            # The register's first process: a session the edge holds ...
            old = await transport.dial(http, edge.url, reg, now_ms)
            old_got: list[bytes] = []
            old_run = asyncio.create_task(old.run(lambda _p, d: old_got.append(d)))
            await wait_until(lambda: edge.core.is_up("reg-1") and old_got, 5, "first session")
            # ... and, before the edge's heartbeat notices that process is gone, the
            # restarted register dials again (the same dialer: it has lost the old one).
            new = await transport.dial(http, edge.url, reg, now_ms)
            got: list[bytes] = []
            new_run = asyncio.create_task(new.run(lambda _p, d: got.append(d)))
            await wait_until(lambda: edge.driver.replaced_sessions == 1, 5, "the replacement")
            await asyncio.wait_for(old_run, 5)  # the edge closed the stale one
            await wait_until(lambda: bool(got), 5, "a summary on the new session")
            assert edge.duplicate_sessions == 0 and edge.core.is_up("reg-1")
            assert old.close_reason == "peer_closed" and not new_run.done()
            new.close()
            await asyncio.wait_for(new_run, 5)
            await wait_until(lambda: not edge.core.is_up("reg-1"), 5, "session down")
    finally:
        await edge.close()

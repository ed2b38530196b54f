"""The real node proposes live checkpoints through the one driver (driver invariant 11),
as the simulator does: the store's first edge (named by every node's trust store)
proposes on the clock port's timer, the ``ck`` envelope is durable in its ledger, a
register folds it to the same hash, and a restarted register rebuilds to it."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from mesh import config
from mesh.app.cli import verify_ledger
from mesh.core.envelope import decode
from mesh.node.node import Node
from mesh.store.datadir import init_store, load_identity
from mesh.store.ledger import Ledger
from tests.meshkit import enrol_direct, now_ms, wait_until


def _node(data_dir: Path, peers: list[str] | None = None) -> Node:
    return Node(data_dir, insecure_plaintext=True, http_host="127.0.0.1", http_port=0,
                discovery=False, peers=peers or [])


def _checkpoints_in(path: Path) -> list[int]:
    led = Ledger(path)
    try:
        return [e.seq for e in (decode(raw) for _, raw in led.scan(0))
                if e.meta.get("kind") == "checkpoint"]
    finally:
        led.close()


@pytest.mark.asyncio
async def test_the_edge_proposes_checkpoints_and_a_register_folds_them(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(config, "CHECKPOINT_EVERY_MS", 150)
    edge_id = init_store(tmp_path / "edge", "store-1", now_ms=now_ms(), node_id="edge")
    reg_id = enrol_direct(tmp_path, edge_id, "reg-1")
    # the checkpointer is fixed at store creation and copied at enrolment
    assert edge_id.trust.checkpointer == "edge"
    assert load_identity(reg_id.data_dir).trust.checkpointer == "edge"
    edge = _node(tmp_path / "edge")
    await edge.start()
    reg = _node(tmp_path / "reg-1", [edge.url])
    await reg.start()
    try:
        assert edge.driver.is_checkpointer and not reg.driver.is_checkpointer
        await reg.execute(lambda r: r.receive("SKU-1", 10, txn="rx-1", now_ms=now_ms()))
        for i in range(3):
            await reg.execute(lambda r, i=i: r.sell("SKU-1", 1, txn=f"s-{i}", now_ms=now_ms()))
        await wait_until(lambda: reg.replica.folds >= 1 and edge.replica.folds >= 1, 10,
                         "a checkpoint folded at both nodes")
        await wait_until(lambda: reg.replica.vv.get("edge") == edge.replica.vv.get("edge"),
                         10, "the register holds the edge's envelopes")
        common = set(edge.replica.checkpoint_hashes) & set(reg.replica.checkpoint_hashes)
        assert common
        for seq in common:
            assert edge.replica.checkpoint_hashes[seq] == reg.replica.checkpoint_hashes[seq]
        assert reg.driver.checkpoints_proposed == 0 and edge.driver.checkpoints_proposed >= 1
        assert reg.replica.on_hand("SKU-1") == 7
        # equal replicas: every fold matched the ck op's fold hash and chain heads
        for n in (edge, reg):
            assert n.replica.ck_mismatches == 0
            assert not [a for a in n.driver.alerts if a.kind == "checkpoint_mismatch"]
        folded = reg.replica.folds
    finally:
        await reg.close()
        await edge.close()
    # durable like any local op: in the edge's ledger, relayed into the register's
    cks = _checkpoints_in(edge_id.ledger_path)
    assert cks and set(cks) <= set(_checkpoints_in(reg_id.ledger_path)) | {max(cks)}
    for d in (edge_id.data_dir, reg_id.data_dir):  # and `storemesh ledger verify` holds
        report = verify_ledger(d)
        assert report.ok, report.problems
    # a restart replays to the same folds (no snapshot was due: the whole ledger)
    again = _node(tmp_path / "reg-1")
    await again.start()
    try:
        assert again.replica.folds >= folded and again.replica.on_hand("SKU-1") == 7
        assert again.replica.ck_mismatches == 0
    finally:
        await again.close()


@pytest.mark.asyncio
async def test_a_register_prunes_its_ledger_behind_checkpoints_and_the_edge_keeps_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Registers keep a bounded tail (``mesh.durable`` invariant 8): rows within the
    frontier of a checkpoint two folds back are deleted after a snapshot; `ledger
    verify` proves the tail from the chain heads that checkpoint names; a restart
    rebuilds from the snapshot; the edge keeps the archive."""
    monkeypatch.setattr(config, "CHECKPOINT_EVERY_MS", 100)
    monkeypatch.setattr(config, "SNAPSHOT_CHECK_S", 0.1)
    edge_id = init_store(tmp_path / "edge", "store-1", now_ms=now_ms(), node_id="edge")
    reg_id = enrol_direct(tmp_path, edge_id, "reg-1")
    edge = _node(tmp_path / "edge")
    await edge.start()
    reg = _node(tmp_path / "reg-1", [edge.url])
    await reg.start()
    reg.durable.snapshot_every = edge.durable.snapshot_every = 1
    assert reg.durable.prune_ledger and not edge.durable.prune_ledger
    try:
        await reg.execute(lambda r: r.receive("SKU-1", 100, txn="rx-1", now_ms=now_ms()))
        i = 0

        async def sell_until_pruned() -> bool:
            nonlocal i
            i += 1
            await reg.execute(lambda r: r.sell("SKU-1", 1, txn=f"s-{i}", now_ms=now_ms()))
            return reg.durable.pruned_rows > 0 and i > 5

        for _ in range(200):
            if await sell_until_pruned():
                break
            await asyncio.sleep(0.05)
        assert reg.durable.pruned_rows > 0, "the register never pruned"
        sold = i
        await wait_until(lambda: edge.replica.on_hand("SKU-1") == 100 - sold, 10,
                         "the edge holds every sale")
        want = reg.replica.state_digest()
    finally:
        await reg.close()
        await edge.close()
    with Ledger(reg_id.ledger_path) as led:
        first = next(iter(led.scan_origin("reg-1")))[0]
    assert first > 1  # the register's own chain starts past seq 1 now
    with Ledger(edge_id.ledger_path) as led:
        assert next(iter(led.scan_origin("reg-1")))[0] == 1  # the edge: the archive
    for d in (edge_id.data_dir, reg_id.data_dir):
        report = verify_ledger(d)
        assert report.ok, report.problems
    pruned = verify_ledger(reg_id.data_dir)
    assert pruned.origins["reg-1"].pruned == first - 1 and pruned.checkpoints >= 1
    # a restart of the pruned register: from its snapshot and the tail, the same state
    again = _node(tmp_path / "reg-1")
    await again.start()
    try:
        assert again.replica.on_hand("SKU-1") == 100 - sold
        assert again.replica.state_digest() == want
    finally:
        await again.close()
    # one more row gone below the tail: no checkpoint names that head, verify fails
    with Ledger(reg_id.ledger_path) as led:
        led.prune({"reg-1": first})
    broken = verify_ledger(reg_id.data_dir)
    assert not broken.ok and any(f"reg-1: seq 1..{first}" in p for p in broken.problems)


@pytest.mark.asyncio
async def test_a_new_register_catches_up_from_the_edges_checkpoint_state(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Catch-up from a checkpoint over the real session (``mesh.core.catchup``, driver
    invariant 12): a register enrolled later asks the edge for its checkpoint state,
    installs it (durably) and fetches only the tail; it holds what the edge holds, with
    nothing below the frontier in its ledger, and restarts to the same state."""
    monkeypatch.setattr(config, "CHECKPOINT_EVERY_MS", 150)
    monkeypatch.setattr(config, "CATCHUP_MIN_BEHIND", 20)
    edge_id = init_store(tmp_path / "edge", "store-1", now_ms=now_ms(), node_id="edge")
    enrol_direct(tmp_path, edge_id, "reg-1")
    edge = _node(tmp_path / "edge")
    await edge.start()
    reg = _node(tmp_path / "reg-1", [edge.url])
    await reg.start()
    try:
        await reg.execute(lambda r: r.receive("SKU-1", 500, txn="rx-1", now_ms=now_ms()))
        for i in range(60):
            await reg.execute(lambda r, i=i: r.sell("SKU-1", 1, txn=f"s-{i}", now_ms=now_ms()))
        await wait_until(lambda: edge.core.state_offer is not None
                         and edge.core.state_offer[1] >= 50, 10, "a checkpoint state")
        new_id = enrol_direct(tmp_path, edge_id, "reg-2")
        new = _node(tmp_path / "reg-2", [edge.url])
        await new.start()
        try:
            await wait_until(lambda: new.replica.vv == edge.replica.vv, 10,
                             "the new register holds what the edge holds")
            assert new.core.stats.get("state_installed") == 1, new.core.stats
            assert edge.core.stats.get("state_served", 0) >= 1
            assert new.replica.state_digest() == edge.replica.state_digest()
            want = new.replica.state_digest()
        finally:
            await new.close()
    finally:
        await reg.close()
        await edge.close()
    with Ledger(new_id.ledger_path) as led:
        assert led.read_origin("reg-1", 1, 1) == []  # not fetched from seq 1
    again = _node(tmp_path / "reg-2")
    await again.start()
    try:
        assert again.replica.state_digest() == want
    finally:
        await again.close()

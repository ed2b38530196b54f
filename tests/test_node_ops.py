"""Operating a node: what its data directory keeps and who may run it (issue 10 items 2,
3, 20, 22). In-process nodes on 127.0.0.1 where that shows the fault; real
``storemesh`` processes where it is the process that matters (locks, signals)."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import pytest

from mesh.cli import verify_ledger
from mesh.node import Node
from mesh.replica import Replica
from tests.meshkit import enrol_direct, new_store, now_ms, tag, wait_until


def _receive(r: Replica, *, sku: str, qty: int, txn: str) -> object:
    return r.receive(sku, qty, txn=txn, now_ms=now_ms())


# --- item 2: a certificate learned in a handshake is saved ---------------------------------


@pytest.mark.asyncio
async def test_a_certificate_learned_in_the_handshake_survives_a_restart(tmp_path: Path) -> None:
    """r2 learns r1's certificate only from the session handshake (static peers, no
    discovery, no certificate message with anything new in it), stores r1's envelopes,
    stops: its data dir must still verify every one of them."""
    edge = new_store(tmp_path, f"s-{tag()}", "edge")
    enrol_direct(tmp_path, edge, "r1")
    r2_ident = enrol_direct(tmp_path, edge, "r2")  # its trust store: edge and r2 only
    assert r2_ident.trust.certificate("r1") is None
    r1 = Node(tmp_path / "r1", discovery=False)
    await r1.start()
    r2 = Node(tmp_path / "r2", discovery=False, peers=[r1.url])
    try:
        await r2.start()
        for i in range(5):
            await r1.execute(partial(_receive, sku="A", qty=1, txn=f"r1-{i}"))
        await wait_until(lambda: r2.replica.on_hand("A") == 5, 20, "r2 to hold r1's receipts")
        # in a loop iteration or two the writes are queued; close() flushes them
    finally:
        await r2.close()
        await r1.close()
    report = verify_ledger(tmp_path / "r2")
    assert report.ok, report.problems[:5]
    assert report.origins["r1"].envelopes == 5


# --- item 3: one process per data directory -------------------------------------------------


def test_the_data_dir_lock_is_reentrant_in_a_process_and_released(tmp_path: Path) -> None:
    from mesh.datadir import lock_data_dir

    d = tmp_path / "n"
    outer = lock_data_dir(d)
    inner = lock_data_dir(d)  # the CLI holds it, the node's start takes it again
    inner.release()
    inner.release()  # a second release of one holder is a no-op
    outer.release()
    with lock_data_dir(d):
        pass
    assert (d / "node.lock").exists()


def test_a_trust_store_change_is_on_disk_before_the_envelopes_after_it(tmp_path: Path) -> None:
    """The lowest layer of item 2: ``DurableReplica`` writes node.json on the ledger's
    writer thread ahead of the rows appended after a trust store change (durable
    invariant 6), whoever changed the trust store."""
    from mesh.datadir import load_identity
    from mesh.durable import DurableReplica

    edge = new_store(tmp_path, f"s-{tag()}", "edge")
    r1 = enrol_direct(tmp_path, edge, "r1")
    enrol_direct(tmp_path, edge, "r2")
    seller = Replica(r1.store_id, "r1", "register", r1.key)
    env = seller.receive("A", 3, txn="r1-0", now_ms=now_ms()).envelope
    assert env is not None
    dur = DurableReplica.open(tmp_path / "r2")
    try:
        dur.identity.trust.add_certificate(r1.certificate)  # as the handshake does
        applied, fut = dur.ingest(env.raw, now_ms())
        assert applied and fut is not None
        fut.result(10)
        # no close, no flush: what is on disk now is what a SIGKILL would leave
        assert load_identity(tmp_path / "r2").trust.certificate("r1") == r1.certificate
    finally:
        dur.close()


def test_a_failed_trust_store_write_fails_the_appends_behind_it(tmp_path: Path) -> None:
    """If node.json cannot be written, the envelopes needing it are not written either
    (the ledger fails as on a full disk, and the node rebuilds from disk)."""
    from mesh.durable import DurableReplica
    from mesh.errors import LedgerError

    edge = new_store(tmp_path, f"s-{tag()}", "edge")
    r1 = enrol_direct(tmp_path, edge, "r1")
    enrol_direct(tmp_path, edge, "r2")
    seller = Replica(r1.store_id, "r1", "register", r1.key)
    env = seller.receive("A", 3, txn="r1-0", now_ms=now_ms()).envelope
    assert env is not None
    dur = DurableReplica.open(tmp_path / "r2")
    try:
        dur.identity.trust.add_certificate(r1.certificate)
        dur.identity.data_dir = tmp_path / "gone"  # node.json cannot be written there
        _, fut = dur.ingest(env.raw, now_ms())
        assert fut is not None
        with pytest.raises(LedgerError):
            fut.result(10)
        assert dur.ledger.count() == 0
        dur.identity.data_dir = tmp_path / "r2"
        dur.recover()
        _, fut = dur.ingest(env.raw, now_ms())
        assert fut is not None and fut.result(10) == 1
    finally:
        dur.close()

"""Durable replica + ledger: every refusal leaves state and ledger unchanged; disk full;
group commit; snapshot + tail equals full replay; `storemesh ledger verify` finds damage."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import pytest
from click.testing import CliRunner

from mesh.app.cli import main as cli
from mesh.core.envelope import Envelope, decode, seal
from mesh.core.identity import issue_revocations
from mesh.core.replica import Replica
from mesh.durable import DurableReplica, rebuild
from mesh.errors import (
    BadSignature,
    BrokenChain,
    EnvelopeError,
    Equivocation,
    ExpiredCertificate,
    Forbidden,
    Malformed,
    NotEnrolled,
    Oversized,
    RevokedCertificate,
    StorageFull,
    WrongStore,
)
from mesh.store.datadir import NodeIdentity, enrol_node, init_store, load_identity
from mesh.store.ledger import Ledger
from tests.conftest import NOW, StoreKit, ingest


@pytest.fixture
def store(tmp_path: Path) -> tuple[NodeIdentity, dict[str, Replica], StoreKit]:
    """An edge node on disk, plus in-memory registers r1, r2 enrolled in its trust store."""
    edge = init_store(tmp_path / "edge", "store-1", now_ms=NOW, node_id="edge")
    assert edge.store_key is not None
    kit = StoreKit(store_id="store-1", store_key=edge.store_key)
    kit.trust = edge.trust
    kit.enrol("r1")
    kit.enrol("r2")
    kit.enrol("short", not_after=NOW + 1000)
    edge.save()
    regs = {n: kit.replica(n) for n in ("r1", "r2")}
    return edge, regs, kit


def _ledger_rows(path: Path) -> list[bytes]:
    with Ledger(path) as led:
        return [raw for _, raw in led.scan()]


def test_refusals_leave_state_and_ledger_unchanged(
    store: tuple[NodeIdentity, dict[str, Replica], StoreKit], tmp_path: Path
) -> None:
    edge_ident, regs, kit = store
    r1 = regs["r1"]
    good = [r1.receive("SKU-1", 10, txn="rcv", now_ms=NOW).envelope,
            r1.sell("SKU-1", 1, txn="s1", now_ms=NOW).envelope]
    nxt = r1.sell("SKU-1", 1, txn="s2", now_ms=NOW).envelope
    assert nxt is not None
    dr = DurableReplica.open(edge_ident.data_dir)
    for env in good:
        assert env is not None
        _, fut = ingest(dr, env.raw, NOW)
        assert fut is not None
        fut.result()
    digest = dr.replica.state_digest()
    rows = _ledger_rows(edge_ident.ledger_path)

    flipped_sig = bytearray(nxt.raw)
    flipped_sig[-5] = ord("0") if flipped_sig[-5] != ord("0") else ord("1")
    flipped_body = nxt.raw.replace(b'"n":2', b'"n":9')
    broken_prev = seal(kit.keys["r1"], store="store-1", origin="r1", seq=3, prev=b"\x01" * 32,
                       hlc=nxt.hlc, ops=nxt.ops, meta=nxt.meta)
    fork = kit.replica("r1")
    fork.apply(decode(good[0].raw), NOW)  # type: ignore[union-attr]
    equivocating = fork.sell("SKU-1", 5, txn="twin", now_ms=NOW).envelope
    assert equivocating is not None and equivocating.seq == 2
    forged_entry = seal(kit.keys["r1"], store="store-1", origin="r1", seq=3,
                        prev=r1.hash_at("r1", 2), hlc=nxt.hlc,
                        ops=[{"t": "pn", "sku": "SKU-1", "r": "r2", "p": 0, "n": 50}],
                        meta={"kind": "sale", "txn": "forge"})
    catalog_write = seal(kit.keys["r1"], store="store-1", origin="r1", seq=3,
                         prev=r1.hash_at("r1", 2), hlc=nxt.hlc,
                         ops=[{"t": "cat", "u": "AAA="}], meta={"kind": "catalog", "txn": "c"})
    other = StoreKit(store_id="store-2")
    other.enrol("r1")
    foreign = other.replica("r1").receive("SKU-1", 1, txn="x", now_ms=NOW).envelope
    stranger = StoreKit(store_id="store-1")  # same store id, a different (rogue) store key
    stranger.enrol("r9")
    unenrolled = stranger.replica("r9").receive("SKU-1", 1, txn="x", now_ms=NOW).envelope
    later = NOW + 10_000  # "short"'s certificate ended at NOW + 1 s (the store fixture)
    expired = kit.replica("short").receive("SKU-1", 1, txn="x", now_ms=later).envelope

    cases: list[tuple[bytes, type[EnvelopeError], int]] = [
        (bytes(flipped_sig), BadSignature, NOW),
        (flipped_body, BadSignature, NOW),
        (broken_prev.raw, BrokenChain, NOW),
        (equivocating.raw, Equivocation, NOW),
        (nxt.raw[:-7], Malformed, NOW),  # truncated JSON
        (b"\x00garbage" * 10, Malformed, NOW),
        (forged_entry.raw, Forbidden, NOW),
        (catalog_write.raw, Forbidden, NOW),
        (foreign.raw, WrongStore, NOW),  # type: ignore[union-attr]
        (unenrolled.raw, NotEnrolled, NOW),  # type: ignore[union-attr]
        (expired.raw, ExpiredCertificate, later),  # type: ignore[union-attr]
        (b"{" + b" " * (10 * 1024 * 1024) + b"}", Oversized, NOW),
    ]
    for raw, err, now in cases:
        with pytest.raises(err):
            ingest(dr, raw, now)
        assert dr.replica.state_digest() == digest, err
    # Replays change nothing and are not errors.
    for env in good:
        assert ingest(dr, env.raw, NOW) == ([], None)  # type: ignore[union-attr]
    # Revocation: r1 revoked by a signed list; its next envelope is refused.
    assert edge_ident.store_key is not None
    crl = issue_revocations(edge_ident.store_key, store_id="store-1", version=1,
                            revoked=frozenset({"r1"}))
    dr.identity.trust.apply_revocations(crl)
    with pytest.raises(RevokedCertificate):
        ingest(dr, nxt.raw, NOW)
    assert dr.replica.state_digest() == digest
    dr.ledger.flush()
    assert _ledger_rows(edge_ident.ledger_path) == rows
    dr.close()


def test_pending_future_seq_is_applied_once_gap_fills(
    store: tuple[NodeIdentity, dict[str, Replica], StoreKit]
) -> None:
    edge_ident, regs, _ = store
    r1 = regs["r1"]
    envs = [r1.receive("SKU-1", 10, txn="rcv", now_ms=NOW).envelope]
    envs += [r1.sell("SKU-1", 1, txn=f"s{i}", now_ms=NOW).envelope for i in range(3)]
    dr = DurableReplica.open(edge_ident.data_dir)
    digest = dr.replica.state_digest()
    assert ingest(dr, envs[3].raw, NOW)[0] == []  # type: ignore[union-attr]
    assert ingest(dr, envs[2].raw, NOW)[0] == []  # type: ignore[union-attr]
    assert dr.replica.state_digest() == digest
    assert _ledger_rows(edge_ident.ledger_path) == []
    applied, fut = ingest(dr, envs[1].raw, NOW)  # type: ignore[union-attr]
    assert applied == [] and fut is None  # seq 2 still waits for seq 1
    applied, fut = ingest(dr, envs[0].raw, NOW)  # type: ignore[union-attr]
    assert [e.seq for e in applied] == [1, 2, 3, 4] and fut is not None
    fut.result()
    assert [decode(r).seq for r in _ledger_rows(edge_ident.ledger_path)] == [1, 2, 3, 4]
    assert dr.replica.on_hand("SKU-1") == 7
    dr.close()


def test_disk_full_fails_loudly_and_loses_nothing_acknowledged(tmp_path: Path) -> None:
    ident = init_store(tmp_path / "n", "store-1", now_ms=NOW, node_id="edge")
    dr = DurableReplica(ident, Ledger(ident.ledger_path, max_bytes=64 * 1024))
    acked: list[str] = []
    dr.execute(lambda r: r.receive("SKU-1", 1_000_000, txn="rcv", now_ms=NOW))[1].result()
    error: BaseException | None = None
    for i in range(5000):
        _, fut = dr.execute(lambda r, i=i: r.sell("SKU-1", 1, txn=f"s{i}", now_ms=NOW + i,
                                                  note="x" * 200))
        try:
            fut.result()
        except StorageFull as exc:
            error = exc
            break
        acked.append(f"s{i}")
    assert isinstance(error, StorageFull) and "disk full" in str(error)
    assert len(acked) > 10
    # The next command rebuilds from disk first: the failed sale is gone from memory.
    dr.ledger.close()
    dr = DurableReplica(ident, Ledger(ident.ledger_path))  # the operator freed space
    assert dr.replica.on_hand("SKU-1") == 1_000_000 - len(acked)
    result, fut = dr.execute(lambda r: r.sell("SKU-1", 1, txn="after", now_ms=NOW))
    fut.result()
    assert result.seq == len(acked) + 2
    dr.close()
    txns = [decode(r).meta["txn"] for r in _ledger_rows(ident.ledger_path)]
    assert txns == ["rcv", *acked, "after"]


def test_recover_after_failure_in_process(tmp_path: Path) -> None:
    ident = init_store(tmp_path / "n", "store-1", now_ms=NOW, node_id="edge")
    dr = DurableReplica(ident, Ledger(ident.ledger_path, max_bytes=48 * 1024))
    dr.execute(lambda r: r.receive("SKU-1", 100_000, txn="rcv", now_ms=NOW))[1].result()
    ok = 0
    for chunk in range(40):  # ten in flight at a time: several group commits succeed
        futs = [dr.execute(lambda r, i=i: r.sell("SKU-1", 1, txn=f"s{i}", now_ms=NOW,
                                                 note="y" * 300))[1]
                for i in range(chunk * 10, chunk * 10 + 10)]
        for fut in futs:
            try:
                fut.result()
                ok += 1
            except StorageFull:
                pass
        if dr.ledger.failed is not None:
            break
    assert 0 < ok < 400
    assert dr.ledger.failed is not None
    # Memory still holds the failed sales until recover() (which the next command runs
    # first): then it drops what never reached the disk.
    assert dr.replica.on_hand("SKU-1") < 100_000 - ok
    dr.recover()
    assert dr.replica.on_hand("SKU-1") == 100_000 - ok
    assert dr.replica.vv.get("edge") == ok + 1
    assert dr.ledger.failed is None
    dr.close()


def test_group_commit_batches_concurrent_appends(tmp_path: Path) -> None:
    ident = init_store(tmp_path / "n", "store-1", now_ms=NOW, node_id="edge")
    dr = DurableReplica.open(ident.data_dir)
    dr.execute(lambda r: r.receive("SKU-1", 10_000, txn="rcv", now_ms=NOW))[1].result()
    # Hold the writer while the sales queue up (as a slow fsync would), so the test does
    # not depend on how fast this machine's disk is; then every waiting append must
    # share a commit with the others.
    gate = threading.Event()

    def hold() -> None:
        gate.wait(30)

    held = dr.ledger.call(hold)
    futs = [dr.execute(lambda r, i=i: r.sell("SKU-1", 1, txn=f"s{i}", now_ms=NOW))[1]
            for i in range(2000)]
    before = dr.ledger.batches
    gate.set()
    held.result()
    for fut in futs:
        fut.result()
    assert dr.ledger.count() == 2001
    assert dr.ledger.batches - before < 50, "appends were not grouped into shared commits"
    dr.close()


def test_snapshot_plus_tail_equals_full_replay(tmp_path: Path) -> None:
    ident = init_store(tmp_path / "n", "store-1", now_ms=NOW, node_id="edge")
    dr = DurableReplica.open(ident.data_dir, snapshot_every=50)
    dr.execute(lambda r: r.receive("SKU-1", 500, txn="rcv", now_ms=NOW))[1].result()
    res = dr.execute(lambda r: r.reserve("SKU-1", 3, txn="w", now_ms=NOW, channel="web"))
    res[1].result()
    snaps = 0
    for i in range(180):
        dr.execute(lambda r, i=i: r.sell("SKU-1", 1, txn=f"s{i}", now_ms=NOW + i))[1].result()
        snaps += dr.maybe_snapshot()
    assert snaps >= 2
    digest = dr.replica.state_digest()
    dr.close()
    again = DurableReplica.open(ident.data_dir)
    assert again.rebuild_stats.snapshot_upto > 0 and again.rebuild_stats.replayed < 60
    assert again.replica.state_digest() == digest
    # Full replay from row 1, without the snapshot, gives the same state.
    fresh = Replica("store-1", "edge", "edge", ident.key)
    for _, raw in again.ledger.scan():
        fresh.apply(decode(raw), None, check_skew=False)
    assert fresh.state_digest() == digest
    # The restored node keeps going where it stopped (seq, prev, idempotency).
    assert again.execute(lambda r: r.sell("SKU-1", 1, txn="s5", now_ms=NOW))[0].duplicate
    again.close()


def test_ledger_verify_cli_finds_damage(tmp_path: Path) -> None:
    ident = init_store(tmp_path / "n", "store-1", now_ms=NOW, node_id="edge")
    reg = enrol_node(tmp_path / "r", ident.store_key, "store-1", "register",  # type: ignore[arg-type]
                     now_ms=NOW, node_id="r1")
    ident.trust.add_certificate(reg.certificate)
    ident.save()
    dr = DurableReplica.open(ident.data_dir)
    r1 = Replica("store-1", "r1", "register", reg.key)
    dr.execute(lambda r: r.receive("SKU-1", 10, txn="rcv", now_ms=NOW))[1].result()
    assert r1.apply(decode(dr.ledger.read_origin("edge", 1, 1)[0]), NOW)
    for i in range(5):
        env = r1.sell("SKU-1", 1, txn=f"s{i}", now_ms=NOW).envelope
        assert env is not None
        fut = ingest(dr, env.raw, NOW)[1]
        assert fut is not None
        fut.result()
    dr.close()
    runner = CliRunner()
    ok = runner.invoke(cli, ["ledger", "verify", str(ident.data_dir)])
    assert ok.exit_code == 0, ok.output
    assert "OK 6 envelopes verified" in ok.output
    # Tamper with the disk: flip a byte inside r1's seq 3, delete seq 4.
    db = sqlite3.connect(ident.ledger_path)
    raw = db.execute("SELECT raw FROM envelopes WHERE origin='r1' AND seq=3").fetchone()[0]
    bad = raw.replace(b'"n":3', b'"n":7')
    assert bad != raw
    db.execute("UPDATE envelopes SET raw=? WHERE origin='r1' AND seq=3", (bad,))
    db.execute("DELETE FROM envelopes WHERE origin='r1' AND seq=4")
    db.commit()
    db.close()
    out = runner.invoke(cli, ["ledger", "verify", str(ident.data_dir)])
    assert out.exit_code == 1
    assert "r1 seq 3: bad signature" in out.output
    assert "r1: seq 4..4 missing" in out.output
    assert "FAILED" in out.output


def test_ledger_reads_do_not_block_on_writer(tmp_path: Path) -> None:
    ident = init_store(tmp_path / "n", "store-1", now_ms=NOW, node_id="edge")
    dr = DurableReplica.open(ident.data_dir)
    dr.execute(lambda r: r.receive("SKU-1", 10, txn="rcv", now_ms=NOW))[1].result()
    seen: list[int] = []
    t = threading.Thread(target=lambda: seen.append(dr.ledger.count()))
    t.start()
    t.join(5)
    assert seen == [1]
    assert dr.ledger.heads() == {"edge": 1}
    assert load_identity(ident.data_dir).node_id == "edge"
    stats = rebuild(Replica("store-1", "edge", "edge", ident.key), dr.ledger)
    assert stats.replayed == 1
    dr.close()


def _sales(tmp_path: Path, n: int) -> list[Envelope]:
    ident = init_store(tmp_path / "origin", "store-1", now_ms=NOW, node_id="edge")
    r = Replica(ident.store_id, ident.node_id, ident.role, ident.key)
    out = [r.receive("SKU-1", 10_000, txn="rcv", now_ms=NOW).envelope]
    out += [r.sell("SKU-1", 1, txn=f"s{i}", now_ms=NOW).envelope for i in range(n - 1)]
    return [e for e in out if e is not None]


def test_peers_envelopes_are_committed_without_an_fsync_local_ones_with(
        tmp_path: Path) -> None:
    """Ledger invariant 2: a group commit of peers' envelopes only is synchronous=NORMAL
    (they are durable at their origin); one holding a local command's envelope is FULL,
    which also makes every row before it durable; jobs (snapshots) are always FULL."""
    envs = _sales(tmp_path, 8)
    lg = Ledger(tmp_path / "l" / "ledger.db")
    lg.append(envs[:3], sync=False).result()
    assert lg._sync_full is False
    lg.append(envs[3:4]).result()  # a local command: fsynced, and the rows before it
    assert lg._sync_full is True
    lg.append(envs[4:6], sync=False).result()
    assert lg._sync_full is False
    lg.save_snapshot(6, b"{}")
    assert lg._sync_full is True
    assert lg.count() == 6
    lg.close()


def test_a_process_crash_loses_no_peer_envelope_committed_without_fsync(
        tmp_path: Path) -> None:
    """synchronous=NORMAL loses nothing on a process crash (the WAL is in the OS page
    cache); only a power cut can lose the newest such rows, and peers resend those."""
    import subprocess
    import sys

    envs = _sales(tmp_path, 50)
    blob = tmp_path / "envs.bin"
    blob.write_bytes(b"".join(len(e.raw).to_bytes(4, "big") + e.raw for e in envs))
    db = tmp_path / "l" / "ledger.db"
    child = subprocess.Popen([sys.executable, "-c", (
        "import sys, time\n"
        "from mesh.core.envelope import decode\n"
        "from mesh.store.ledger import Ledger\n"
        "data = open(sys.argv[1], 'rb').read(); envs = []; i = 0\n"
        "while i < len(data):\n"
        "    n = int.from_bytes(data[i:i + 4], 'big'); envs.append(decode(data[i + 4:i + 4 + n]))\n"
        "    i += 4 + n\n"
        "lg = Ledger(sys.argv[2])\n"
        "for k in range(0, len(envs), 5):\n"
        "    lg.append(envs[k:k + 5], sync=False).result()\n"
        "print('done', flush=True)\n"
        "time.sleep(60)\n"), str(blob), str(db)], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "done"
    finally:
        child.kill()
        child.wait(timeout=10)
        if child.stdout is not None:
            child.stdout.close()
    lg = Ledger(db)
    assert lg.count() == 50
    assert lg.read_origin("edge", 1, 50) == [e.raw for e in envs]
    lg.close()


def _hold_writer(ledger: Ledger) -> threading.Event:
    """Occupy the ledger's writer thread until the returned event is set: whatever is
    appended meanwhile is queued, not yet written (the window a crash can hit)."""
    release = threading.Event()
    started = threading.Event()

    def job(_conn: sqlite3.Connection) -> None:
        started.set()
        release.wait(10)

    threading.Thread(target=ledger._job, args=(job, "hold"), daemon=True).start()
    assert started.wait(5)
    return release


def test_replay_is_acknowledged_only_once_the_original_is_durable(tmp_path: Path) -> None:
    """Issue 10 item 1: a till retrying a sale while the original is still being written
    must not get its ``duplicate`` answer before the original is on disk."""
    ident = init_store(tmp_path / "n", "store-1", now_ms=NOW, node_id="edge")
    dr = DurableReplica.open(ident.data_dir)
    dr.execute(lambda r: r.receive("SKU-1", 10, txn="rcv", now_ms=NOW))[1].result()
    release = _hold_writer(dr.ledger)
    first, fut1 = dr.execute(lambda r: r.sell("SKU-1", 1, txn="sale-1", now_ms=NOW))
    again, fut2 = dr.execute(lambda r: r.sell("SKU-1", 1, txn="sale-1", now_ms=NOW))
    assert again.duplicate and again.seq == first.seq
    assert not fut1.done()
    assert not fut2.done(), "the replay was acknowledged before the original was durable"
    release.set()
    assert fut2.result(5) == fut1.result(5)
    # once durable, a replay is answered at once
    late, fut3 = dr.execute(lambda r: r.sell("SKU-1", 1, txn="sale-1", now_ms=NOW))
    assert late.duplicate and fut3.done()
    dr.close()


def test_replay_of_a_failed_write_fails_too(tmp_path: Path) -> None:
    ident = init_store(tmp_path / "n", "store-1", now_ms=NOW, node_id="edge")
    dr = DurableReplica(ident, Ledger(ident.ledger_path, max_bytes=40 * 1024))
    dr.execute(lambda r: r.receive("SKU-1", 10**6, txn="rcv", now_ms=NOW))[1].result()
    failed = None
    for i in range(2000):
        release = _hold_writer(dr.ledger)
        _, fut1 = dr.execute(lambda r, i=i: r.sell("SKU-1", 1, txn=f"s{i}", now_ms=NOW,
                                                   note="z" * 300))
        again, fut2 = dr.execute(lambda r, i=i: r.sell("SKU-1", 1, txn=f"s{i}", now_ms=NOW,
                                                       note="z" * 300))
        assert again.duplicate
        release.set()
        try:
            fut1.result(5)
        except StorageFull as exc:
            failed = exc
            with pytest.raises(StorageFull):
                fut2.result(5)
            break
        fut2.result(5)
    assert failed is not None
    dr.close()


def test_a_revocation_bound_is_left_out_of_every_rebuild_of_the_sqlite_ledger(
    store: tuple[NodeIdentity, dict[str, Replica], StoreKit],
) -> None:
    """The real ledger (SQLite, UNIQUE (origin, seq)): r1's 1..6 applied, 5 and 6 still
    queued when the list (bound 5) is adopted. ``exclude_revoked`` rebuilds from what is
    on disk plus what is queued (5 from the queue), without 6; the rows all land (an
    archive, each once); a reopen leaves 6 out again; r2's envelopes stay."""
    edge_ident, regs, kit = store
    r1, r2 = regs["r1"], regs["r2"]
    envs = [r1.receive("SKU-1", 10, txn="rcv", now_ms=NOW).envelope]
    envs += [r1.sell("SKU-1", 1, txn=f"s{i}", now_ms=NOW).envelope for i in range(5)]
    other = r2.receive("SKU-2", 5, txn="rcv2", now_ms=NOW).envelope
    assert other is not None and all(e is not None for e in envs)
    dr = DurableReplica.open(edge_ident.data_dir)
    for env in [*envs[:4], other]:
        assert env is not None
        fut = ingest(dr, env.raw, NOW)[1]
        assert fut is not None
        fut.result()
    dr.ledger.save_snapshot(*dr.take_snapshot())  # holds r1's 1..4
    gate = threading.Event()
    dr.ledger.call(lambda: gate.wait(5))  # hold the writer: 5 and 6 stay queued
    futs = [ingest(dr, env.raw, NOW)[1] for env in envs[4:] if env is not None]
    assert dr.replica.vv.get("r1") == 6
    dr.identity.trust.apply_revocations(issue_revocations(
        kit.store_key, store_id="store-1", version=1, revoked={"r1"}, upto={"r1": 5}))
    stats = dr.exclude_revoked()
    gate.set()
    for fut in futs:
        assert fut is not None
        fut.result()
    assert dr.replica.vv.get("r1") == 5 and dr.replica.vv.get("r2") == 1
    assert stats.excluded == 1
    assert [seq for (seq,) in sqlite3.connect(edge_ident.ledger_path).execute(
        "SELECT seq FROM envelopes WHERE origin = 'r1' ORDER BY seq")] == [1, 2, 3, 4, 5, 6]
    digest = dr.replica.state_digest()
    dr.identity.save()
    dr.close()
    again = DurableReplica.open(edge_ident.data_dir)
    assert again.replica.state_digest() == digest
    assert again.rebuild_stats.excluded == 1 and again.rebuild_stats.snapshot_upto > 0
    again.close()


def test_a_revocation_on_a_pruned_ledger_falls_back_to_the_snapshot(
    store: tuple[NodeIdentity, dict[str, Replica], StoreKit],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A pruned ledger (``mesh.durable`` invariant 8) cannot replay from seq 1: a
    revocation that leaves out envelopes the snapshot holds rebuilds from the snapshot
    (said loudly), never a replica missing the pruned prefix, never a crash."""
    edge_ident, regs, kit = store
    r1, r2 = regs["r1"], regs["r2"]
    envs = [r1.receive("SKU-1", 10, txn="rcv", now_ms=NOW).envelope]
    envs += [r1.sell("SKU-1", 1, txn=f"s{i}", now_ms=NOW).envelope for i in range(5)]
    envs.append(r2.receive("SKU-2", 5, txn="rcv2", now_ms=NOW).envelope)
    dr = DurableReplica.open(edge_ident.data_dir)
    dr.prune_ledger = True  # as a register's
    for env in envs:
        assert env is not None
        fut = ingest(dr, env.raw, NOW)[1]
        assert fut is not None
        fut.result()
    want = dr.replica.state_digest()
    dr.save_snapshot_and_prune(*dr.take_snapshot(), {"r1": 2})
    assert dr.pruned_rows == 2
    dr.identity.trust.apply_revocations(issue_revocations(
        kit.store_key, store_id="store-1", version=1, revoked={"r1"}, upto={"r1": 4}))
    with caplog.at_level("ERROR"):
        dr.exclude_revoked()
    assert "ledger pruned" in caplog.text
    assert dr.replica.pending_count() == 0 and dr.replica.state_digest() == want
    dr.close()

"""Crash test: a child process sells as fast as it can and is killed with SIGKILL at random
moments, many times. After every kill:

* every sale (and receipt) the child acknowledged has exactly one envelope in the ledger,
  no txn id appears twice, and per origin the seqs are 1..n with each ``prev`` equal to
  the hash of the envelope before it;
* the state ``DurableReplica.open`` rebuilds (snapshot + tail) equals a replay of every
  ledger row from row 1 into a fresh ``Replica`` (and so does every stored snapshot plus
  its tail);
* on hand per SKU = received - number of sale envelopes for it.

Sales acknowledged in the previous run are re-submitted by the next child (``--retry``)
and must come back as duplicates: idempotency across restarts.

The ledger is append-only, so instead of re-decoding and re-applying every row after
every kill (quadratic), the test keeps one replay replica and applies only the new rows,
after checking that every old row is still byte-identical (same hash of ``raw`` at the
same row id). That is the same state as a replay from row 1; the last round also does
the literal replay from row 1 into a brand-new replica.

The kill schedule comes from ``random.Random(seed)``; the seed is printed and every
failure says how to reproduce it (``CRASH_SEED=N``). The interleaving inside the child
still depends on the machine, so a seed reproduces the schedule, not the exact bytes.
"""

from __future__ import annotations

import hashlib
import os
import random
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import pytest

from mesh.core.envelope import decode
from mesh.core.replica import Replica
from mesh.durable import DurableReplica
from mesh.store.datadir import init_store, load_identity
from mesh.store.ledger import Ledger

sys.path.insert(0, str(Path(__file__).parent.parent))
import crash_child  # the child's constants: SKUS, RECEIVED, sku_of

CHILD = Path(__file__).parent.parent.joinpath("crash_child.py")
#: Total acknowledged sales below this means the child never really got going.
MIN_ACKED_SALES = 500


def _seed() -> int:
    env = os.environ.get("CRASH_SEED")
    return int(env) if env else random.SystemRandom().randrange(1 << 32)


# --- one child run ---------------------------------------------------------------------


@dataclass
class ChildOutput:
    """What a child printed before it died (only complete lines count)."""

    acks: list[str] = field(default_factory=list)
    dups: list[str] = field(default_factory=list)
    snapshots: int = 0
    ready: threading.Event = field(default_factory=threading.Event)
    other: list[str] = field(default_factory=list)

    def read(self, stream: IO[str]) -> None:
        for line in stream:
            if not line.endswith("\n"):
                break  # cut off by the kill: never acknowledged
            word, _, rest = line.rstrip("\n").partition(" ")
            if word == "ACK":
                self.acks.append(rest)
            elif word == "DUP":
                self.dups.append(rest)
            elif word == "SNAP":
                self.snapshots += 1
            elif word == "READY":
                self.ready.set()
            else:
                self.other.append(line)


@dataclass(frozen=True)
class KillAt:
    """When to kill: ``delay`` seconds after start, or after the child said READY."""

    delay: float
    after_ready: bool = False

    def __str__(self) -> str:
        return f"{self.delay * 1000:.0f} ms after {'READY' if self.after_ready else 'start'}"


def kill_schedule(rng: random.Random) -> KillAt:
    r = rng.random()
    if r < 0.15:  # interpreter start-up, imports, opening the ledger, rebuild
        return KillAt(rng.uniform(0.0, 0.4))
    if r < 0.30:  # just after the rebuild: retries, receipts, the first appends
        return KillAt(rng.uniform(0.0, 0.05), after_ready=True)
    return KillAt(rng.uniform(0.05, 2.0))


@contextmanager
def child_process(data_dir: Path, run_id: str, retries: list[str],
                  stderr_path: Path) -> Iterator[tuple[subprocess.Popen[str], ChildOutput]]:
    """Start the child; always kill (by pid) and reap it on the way out."""
    args = [sys.executable, str(CHILD), str(data_dir), run_id]
    for txn in retries:
        args += ["--retry", txn]
    out = ChildOutput()
    with open(stderr_path, "w") as err:
        proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=err, text=True,
                                bufsize=1)
    assert proc.stdout is not None
    reader = threading.Thread(target=out.read, args=(proc.stdout,), daemon=True)
    reader.start()
    try:
        yield proc, out
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        reader.join(timeout=10)
        proc.stdout.close()


# --- checks after a kill -----------------------------------------------------------------


@dataclass
class LedgerModel:
    """What the test has verified of the ledger so far (it only ever grows)."""

    store_id: str
    node_id: str
    role: str
    row_hashes: list[bytes] = field(default_factory=list)  # sha256(raw) of row id i+1
    heads: dict[str, tuple[int, bytes]] = field(default_factory=dict)  # origin -> seq, hash
    txns: set[str] = field(default_factory=set)
    sales: Counter[str] = field(default_factory=Counter)  # sku -> sale envelopes
    received: Counter[str] = field(default_factory=Counter)  # sku -> units received
    replay: Replica = field(init=False)

    def __post_init__(self) -> None:
        self.replay = self.fresh_replica()

    def fresh_replica(self) -> Replica:
        return Replica(self.store_id, self.node_id, self.role)

    def check_rows(self, rows: list[tuple[int, bytes]]) -> int:
        """Check every row; apply the new ones to the replay replica. Returns how many
        rows were new."""
        seen = len(self.row_hashes)
        assert len(rows) >= seen, f"ledger shrank from {seen} to {len(rows)} rows"
        for i, (row_id, raw) in enumerate(rows):
            assert row_id == i + 1, f"row ids not 1..n: row {i + 1} has id {row_id}"
            if i < seen:
                assert hashlib.sha256(raw).digest() == self.row_hashes[i], (
                    f"row {row_id} changed after it was committed")
                continue
            env = decode(raw)
            assert env.store == self.store_id
            seq, head = self.heads.get(env.origin, (0, None))
            assert env.seq == seq + 1, (
                f"row {row_id}: {env.origin} seq {env.seq} follows seq {seq} (gap/duplicate)")
            assert env.prev == head, f"row {row_id}: {env.origin} seq {env.seq}: prev != hash"
            self.heads[env.origin] = (env.seq, env.hash)
            txn = env.meta["txn"]
            assert txn not in self.txns, f"row {row_id}: txn {txn} has two envelopes"
            self.txns.add(txn)
            kind, sku = env.meta["kind"], env.meta["sku"]
            if kind == "sale":
                assert env.meta["qty"] == -1 and sku == crash_child.sku_of(txn), env.meta
                self.sales[sku] += 1
            else:
                assert kind == "receipt" and txn == crash_child.receipt_txn(sku), env.meta
                self.received[sku] += env.meta["qty"]
            self.replay.apply(env, None, check_skew=False)
            self.row_hashes.append(env.hash)
        return len(rows) - seen


def read_ledger(path: Path) -> list[tuple[int, bytes]]:
    ledger = Ledger(path)
    try:
        return [(row_id, bytes(raw)) for row_id, raw in ledger.scan()]
    finally:
        ledger.close()


def stored_snapshots(path: Path) -> list[tuple[int, bytes]]:
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return [(int(u), bytes(s)) for u, s in
                conn.execute("SELECT upto, state FROM snapshots ORDER BY id")]
    finally:
        conn.close()


def check_after_kill(data_dir: Path, model: LedgerModel, acked: set[str],
                     final: bool) -> int:
    path = load_identity(data_dir).ledger_path
    rows = read_ledger(path)
    new = model.check_rows(rows)

    missing = sorted(acked - model.txns)
    assert not missing, (
        f"{len(missing)} acknowledged txns have no envelope (lost acks), e.g. {missing[:5]}")

    replay_digest = model.replay.state_digest()
    if final:  # the literal replay from row 1 into a brand-new replica
        fresh = model.fresh_replica()
        for _, raw in rows:
            fresh.apply(decode(raw), None, check_skew=False)
        assert fresh.state_digest() == replay_digest, "incremental replay != replay from row 1"

    dr = DurableReplica.open(data_dir)
    try:
        assert dr.replica.state_digest() == replay_digest, (
            f"rebuilt state (snapshot at row {dr.rebuild_stats.snapshot_upto} + "
            f"{dr.rebuild_stats.replayed} rows) != replay of the {len(rows)} ledger rows")
        assert dr.ledger.last_id == len(rows)
        for sku in crash_child.SKUS:
            expected = model.received[sku] - model.sales[sku]
            assert dr.replica.on_hand(sku) == expected, (
                f"{sku}: on hand {dr.replica.on_hand(sku)}, received {model.received[sku]} "
                f"- {model.sales[sku]} sales = {expected}")
        assert dr.replica.exceptions() == []
    finally:
        dr.close()

    # Every stored snapshot (the newest two are kept) + its tail is the same state.
    for upto, blob in stored_snapshots(path):
        assert 0 < upto <= len(rows), f"snapshot upto {upto} outside 1..{len(rows)}"
        rep = model.fresh_replica()
        rep.restore(blob)
        for _, raw in rows[upto:]:
            rep.apply(decode(raw), None, check_skew=False)
        assert rep.state_digest() == replay_digest, f"snapshot at row {upto} + tail != replay"
    return new


# --- the loop ------------------------------------------------------------------------------


def crash_loop(tmp_path: Path, kills: int) -> None:
    seed = _seed()
    print(f"crash test seed {seed} (CRASH_SEED={seed} to reproduce), {kills} kills")
    rng = random.Random(seed)  # the kill schedule: independent of what the runs did
    pick = random.Random(seed + 1)  # which acked sales to retry (depends on the acks)
    data_dir = tmp_path / "node"
    ident = init_store(data_dir, "crash-store", now_ms=time.time_ns() // 1_000_000)
    model = LedgerModel(ident.store_id, ident.node_id, ident.role)
    acked: set[str] = set()
    acked_sales: list[str] = []
    previous: list[str] = []
    total_snapshots = 0
    run = -1
    when = KillAt(0.0)
    try:
        for run in range(kills):
            when = kill_schedule(rng)
            retries = pick.sample(previous, min(3, len(previous)))
            if acked_sales and pick.random() < 0.5:
                retries.append(pick.choice(acked_sales))  # an older run's sale
            run_id = f"r{run:03d}"
            with child_process(data_dir, run_id, retries,
                               tmp_path / f"{run_id}.stderr") as (proc, out):
                if when.after_ready:
                    deadline = time.monotonic() + 30
                    while not out.ready.wait(0.01) and proc.poll() is None:
                        assert time.monotonic() < deadline, "child never said READY"
                    time.sleep(when.delay)
                else:
                    time.sleep(max(0.0, when.delay))
                if proc.poll() is None:
                    os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
            stderr = (tmp_path / f"{run_id}.stderr").read_text()
            assert proc.returncode == -signal.SIGKILL, (
                f"child exited by itself with {proc.returncode}: {stderr}")
            assert not out.other, f"unexpected output from the child: {out.other[:5]}"
            assert set(out.dups) <= set(retries), (out.dups, retries)
            sales = [t for t in out.acks if t.startswith(run_id + "-")]
            acked.update(out.acks)
            acked_sales.extend(sales)
            previous = sales
            total_snapshots += out.snapshots
            new = check_after_kill(data_dir, model, acked, final=run == kills - 1)
            print(f"run {run}: killed {when}: {len(sales)} sales acked, {new} rows new, "
                  f"{out.snapshots} snapshots, {len(out.dups)}/{len(retries)} retries "
                  f"confirmed; ledger {len(model.row_hashes)} rows")
        assert len(acked_sales) > MIN_ACKED_SALES, (
            f"only {len(acked_sales)} sales acknowledged in {kills} runs")
        assert total_snapshots > 0, "no snapshot was ever written: kills never hit one"
        print(f"{kills} kills, {len(acked_sales)} sales acked, {len(model.row_hashes)} rows, "
              f"{total_snapshots} snapshots")
    except AssertionError as exc:
        raise AssertionError(
            f"run {run} (killed {when}): {exc}\nreproduce with seed {seed}: "
            f"CRASH_SEED={seed} pytest {Path(__file__).name}") from exc


def test_crash_loop(tmp_path: Path) -> None:
    crash_loop(tmp_path, kills=20)


@pytest.mark.slow
def test_crash_loop_long(tmp_path: Path) -> None:
    crash_loop(tmp_path, kills=100)

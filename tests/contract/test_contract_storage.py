"""The storage contract (mesh.testing.contracts.check_storage) over the real SQLite
ledger and the simulator's SimDisk: the same checks, two implementations."""

from __future__ import annotations

from pathlib import Path

import pytest

from mesh.core.envelope import Envelope
from mesh.core.identity import NodeKey, TrustStore
from mesh.ports import Storage
from mesh.sim.ports import SimDisk, SimIdentity
from mesh.sim.world import World
from mesh.store.ledger import Ledger
from mesh.testing.contracts import check_pruning, check_storage
from mesh.testing.ledger_child import crash_after_acks

ROOT = Path(__file__).resolve().parents[2]


def _identity(seed: int) -> SimIdentity:
    store_key = NodeKey.from_bytes(bytes([seed]) * 32)
    key = NodeKey.from_bytes(bytes([seed + 1]) * 32)
    trust = TrustStore("contract-store", store_key.public_key)
    return SimIdentity("reg-1", "contract-store", "register", key, trust, None)  # type: ignore[arg-type]


class RealRig:
    """``Ledger`` in a directory; the crash is a child process killed with SIGKILL."""

    def __init__(self, path: Path) -> None:
        path.mkdir(parents=True, exist_ok=True)
        self.path = path / "ledger.sqlite"
        self.identity = _identity(7)

    def open(self) -> Storage:
        return Ledger(self.path)

    def settle(self, storage: Storage) -> None:
        assert isinstance(storage, Ledger)
        storage.append([]).exception()  # everything queued before has completed

    def crash_while_appending(self, batches: list[list[Envelope]]) -> int:
        return crash_after_acks(["sqlite", str(self.path)], self.path.with_suffix(".batches"),
                                batches, cwd=ROOT)

    def fail_commits(self, storage: Storage) -> None:
        assert isinstance(storage, Ledger)
        pages = storage._scalar("PRAGMA page_count")  # a quota: the disk is full now
        storage._job(lambda c: c.execute(f"PRAGMA max_page_count={pages}"), "quota")

    def heal(self, storage: Storage) -> None:
        assert isinstance(storage, Ledger)
        storage._job(lambda c: c.execute("PRAGMA max_page_count=1073741823"), "quota")


class SimRig:
    """``SimDisk`` in a world; the crash is ``SimDisk.crash`` (power loss)."""

    def __init__(self) -> None:
        self.world = World(11)
        self.disk = SimDisk(self.world, fsync_ms=2.0)
        self.identity = _identity(7)

    def open(self) -> Storage:
        return self.disk  # a new process reads the same disk

    def settle(self, storage: Storage) -> None:
        self.world.run_until(self.world.now + 10_000)

    def crash_while_appending(self, batches: list[list[Envelope]]) -> int:
        acked = [0]

        def next_batch(i: int) -> None:  # one after the other, as the real child does
            if i < len(batches):
                self.disk.append(batches[i]).add_done_callback(lambda f: ok(i, f))

        def ok(i: int, f: object) -> None:
            acked[0] += 1
            next_batch(i + 1)
        next_batch(0)
        self.world.run_until(self.world.now + 25.0)  # about a dozen commits
        self.disk.crash()
        return acked[0]

    def fail_commits(self, storage: Storage) -> None:
        self.disk.faults.full = True

    def heal(self, storage: Storage) -> None:
        self.disk.faults.full = False


def test_real_ledger_passes_the_storage_contract(tmp_path: Path) -> None:
    n = [0]

    def make() -> RealRig:
        n[0] += 1
        return RealRig(tmp_path / str(n[0]))
    check_storage(make)


def test_simdisk_passes_the_storage_contract() -> None:
    check_storage(SimRig)


def test_real_ledger_and_simdisk_pass_the_pruning_contract(tmp_path: Path) -> None:
    check_pruning(lambda: RealRig(tmp_path / "prune"))
    check_pruning(SimRig)


def test_the_pruning_contract_catches_a_read_past_a_pruned_prefix() -> None:
    class Sloppy(SimRig):
        def __init__(self) -> None:
            super().__init__()
            disk = self.disk

            def read_origin(origin: str, first: int, last: int, limit: int = 512) -> list[bytes]:
                rows = disk.by_origin.get(origin, [])  # ignores the floor
                return rows[max(first, disk.pruned.get(origin, 0) + 1) - 1 : last]
            disk.read_origin = read_origin  # type: ignore[method-assign]

    with pytest.raises(AssertionError, match="later run"):
        check_pruning(Sloppy)


def test_the_contract_catches_a_disk_that_acknowledges_before_fsync() -> None:
    class Lying(SimRig):
        def __init__(self) -> None:
            super().__init__()
            self.disk.lie_about_fsync = True

    with pytest.raises(AssertionError, match="acknowledged but only"):
        check_storage(Lying)


def test_the_contract_catches_a_disk_that_commits_behind_a_failure() -> None:
    class Forgetful(SimRig):
        def __init__(self) -> None:
            super().__init__()
            real = self.disk.fail

            def fail_only_the_batch(err: object, batch: list) -> None:  # type: ignore[type-arg]
                real(err, batch)  # type: ignore[arg-type]
                self.disk.failed = None  # ...and accepts the next append at once
            self.disk.fail = fail_only_the_batch  # type: ignore[method-assign]

    with pytest.raises(AssertionError):
        check_storage(Forgetful)

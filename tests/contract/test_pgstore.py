"""The storage contract (mesh.testing.contracts.check_storage) over PgLedger, the
cloud's ledger in PostgreSQL: the same checks as the SQLite ledger and SimDisk pass,
on a real server (tests.pgkit), plus what only the shared database adds: stores are
isolated in one partitioned table, the analytics rollup commits with the rows, and a
gateway without the lease cannot write."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("psycopg")

import psycopg

from mesh.core.envelope import Envelope
from mesh.errors import LedgerError, StorageFull
from mesh.ports import Storage
from mesh.store.pgstore import FencedOut, PgLedger
from mesh.testing.contracts import check_pruning, check_storage, sales
from mesh.testing.ledger_child import crash_after_acks
from tests.contract.test_contract_storage import _identity

ROOT = Path(__file__).resolve().parents[2]


class PgRig:
    """One store's ``PgLedger`` in a shared database; the crash is a child process
    killed with SIGKILL, followed by an immediate (crash) restart of the server."""

    def __init__(self, cluster, dsn: str, store: str, tmp: Path) -> None:  # type: ignore[no-untyped-def]
        self.cluster, self.dsn, self.store, self.tmp = cluster, dsn, store, tmp
        self.identity = _identity(7)

    def open(self) -> Storage:
        return PgLedger(self.dsn, self.store)

    def settle(self, storage: Storage) -> None:
        storage.append([]).exception()

    def crash_while_appending(self, batches: list[list[Envelope]]) -> int:
        acks = crash_after_acks(["pg", self.dsn, self.store],
                                self.tmp / f"{self.store}.batches", batches, cwd=ROOT)
        # The server crashes too: what it committed must come back from its WAL.
        self.cluster._run("pg_ctl", "-D", str(self.cluster.data), "-m", "immediate", "stop")
        res = self.cluster._run("pg_ctl", "-D", str(self.cluster.data), "-l",
                                str(self.cluster.dir / "log"), "-w", "start")
        assert res.returncode == 0, res.stderr
        return acks

    def fail_commits(self, storage: Storage) -> None:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            conn.execute(
                "CREATE OR REPLACE FUNCTION full_disk() RETURNS trigger LANGUAGE plpgsql AS "
                "$$ BEGIN RAISE EXCEPTION 'could not extend file: No space left on device' "
                "USING ERRCODE = 'disk_full'; END $$")
            conn.execute("CREATE TRIGGER full_disk BEFORE INSERT ON envelopes "
                         "FOR EACH ROW EXECUTE FUNCTION full_disk()")

    def heal(self, storage: Storage) -> None:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            conn.execute("DROP TRIGGER full_disk ON envelopes")


def test_pg_ledger_passes_the_storage_contract(pg_cluster, pg_dsn: str, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    n = [0]

    def make() -> PgRig:
        n[0] += 1
        return PgRig(pg_cluster, pg_dsn, f"contract-{n[0]}", tmp_path)
    check_storage(make)


def test_pg_ledger_passes_the_pruning_contract(pg_cluster, pg_dsn: str, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    # the cloud keeps the archive (config.LEDGER_PRUNE_ROLES); the same surface as Ledger's
    check_pruning(lambda: PgRig(pg_cluster, pg_dsn, "contract-prune", tmp_path))


def test_stores_share_the_table_but_not_their_rows(pg_dsn: str) -> None:
    a, b = PgLedger(pg_dsn, "store-a"), PgLedger(pg_dsn, "store-b")
    envs = sales(_identity(7), 20)
    a.append(envs[:12]).result()
    b.append(envs[:5]).result()
    assert [raw for _, raw in a.scan()] == [e.raw for e in envs[:12]]
    assert [rid for rid, _ in b.scan()] == [1, 2, 3, 4, 5]
    assert b.heads() == {"reg-1": 5} and a.heads() == {"reg-1": 12}
    with pytest.raises(LedgerError):  # nothing in a store's ledger twice
        a.append(envs[11:13]).result()
    assert a.failed is not None
    a.reset_failure()
    a.append(envs[12:]).result()
    assert a.count() == 20
    with psycopg.connect(pg_dsn) as conn:  # declaratively partitioned, by hash of store
        parts = conn.execute("SELECT count(*) FROM pg_inherits WHERE inhparent = "
                             "'envelopes'::regclass").fetchone()
        assert parts is not None and parts[0] == 16
        # the rollup committed with the rows: 19 sales of one unit, 1 receipt
        rows = conn.execute("SELECT store_id, kind, sum(events), sum(qty) FROM "
                            "movements_hourly GROUP BY 1, 2 ORDER BY 1, 2").fetchall()
        assert rows == [("store-a", "receipt", 1, 1_000_000), ("store-a", "sale", 19, -19),
                        ("store-b", "receipt", 1, 1_000_000), ("store-b", "sale", 4, -4)]
    a.close()
    b.close()


def test_a_gateway_without_the_lease_cannot_write(pg_dsn: str) -> None:
    led = PgLedger(pg_dsn, "store-f", gateway="gw-1")
    envs = sales(_identity(7), 6)
    with pytest.raises(FencedOut):  # no lease row at all
        led.append(envs[:2]).result()
    led.reset_failure()
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute("INSERT INTO leases VALUES ('store-f', 'gw-1', 'u', 1, "
                     "now() + interval '1 minute')")
        led.append(envs[:2]).result()
        conn.execute("UPDATE leases SET gateway = 'gw-2', epoch = 2 WHERE store_id = 'store-f'")
    with pytest.raises(FencedOut):
        led.append(envs[2:4]).result()
    assert led.count() == 2
    led.close()


def test_a_full_database_is_storage_full(pg_cluster, pg_dsn: str, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    rig = PgRig(pg_cluster, pg_dsn, "full", tmp_path)
    led = rig.open()
    rig.fail_commits(led)
    with pytest.raises(StorageFull):
        led.append(sales(_identity(7), 2)).result()
    led.close()

"""The throw-away PostgreSQL cluster of tests.pgkit: it starts, listens only on its
Unix socket, commits with fsync, and stops."""

from __future__ import annotations

from pathlib import Path

import pytest


def test_cluster_listens_only_on_a_unix_socket(pg_cluster, pg_dsn: str) -> None:  # type: ignore[no-untyped-def]
    import psycopg

    assert (Path(pg_cluster.dir) / ".s.PGSQL.5432").is_socket()
    with psycopg.connect(pg_dsn) as conn:
        assert conn.execute("SHOW listen_addresses").fetchone() == ("",)
        assert conn.execute("SHOW fsync").fetchone() == ("on",)
        conn.execute("CREATE TABLE t (x int)")
        conn.execute("INSERT INTO t VALUES (1)")
        conn.commit()
        assert conn.execute("SELECT sum(x) FROM t").fetchone() == (1,)
    assert pg_cluster.backend_cpu_s() >= 0.0


def test_a_second_cluster_starts_and_stops_cleanly() -> None:
    pytest.importorskip("psycopg")
    from tests.pgkit import PgCluster, PgUnavailable

    try:
        cluster = PgCluster().start()
    except PgUnavailable as exc:
        pytest.skip(str(exc))
    d = cluster.dir
    assert (d / "data" / "postmaster.pid").exists()
    cluster.stop()
    assert not d.exists()

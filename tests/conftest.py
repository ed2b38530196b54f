"""Shared test helpers: a store with real keys and certificates, and replicas of it."""

from __future__ import annotations

import os
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import pytest

from mesh.core.envelope import Envelope, verify
from mesh.core.identity import NodeKey, TrustStore, issue_certificate
from mesh.core.replica import Replica

if TYPE_CHECKING:
    from mesh.durable import DurableReplica

NOW = 1_790_000_000_000  # a fixed "now" in ms (2026-09); the core never reads a clock
YEAR_MS = 365 * 24 * 3600 * 1000


@dataclass
class StoreKit:
    """A store key, its trust store and enrolled nodes (with their keys)."""

    store_id: str = "store-1"
    store_key: NodeKey = field(default_factory=NodeKey.generate)
    keys: dict[str, NodeKey] = field(default_factory=dict)
    roles: dict[str, str] = field(default_factory=dict)
    trust: TrustStore = field(init=False)

    def __post_init__(self) -> None:
        self.trust = TrustStore(self.store_id, self.store_key.public_key)

    def enrol(self, node_id: str, role: str = "register", not_after: int = NOW + YEAR_MS,
              trust: TrustStore | None = None) -> NodeKey:
        key = self.keys.get(node_id) or NodeKey.generate()
        self.keys[node_id] = key
        self.roles[node_id] = role
        cert = issue_certificate(self.store_key, node_id=node_id, store_id=self.store_id,
                                 role=role, public_key=key.public_key, not_after=not_after)
        (trust or self.trust).add_certificate(cert)
        return key

    def replica(self, node_id: str) -> Replica:
        return Replica(self.store_id, node_id, self.roles[node_id], self.keys[node_id])


@pytest.fixture
def kit() -> StoreKit:
    k = StoreKit()
    k.enrol("edge", "edge")
    k.enrol("r1")
    k.enrol("r2")
    k.enrol("cloud", "cloud")
    return k


@pytest.fixture(autouse=True)
def _no_leftover_token() -> None:
    """Each test starts without a current API credential (tests.meshkit.use_token)."""
    from tests import meshkit

    meshkit.reset_tokens()


def ingest(dr: DurableReplica, raw: bytes,
           now_ms: int) -> tuple[list[Envelope], Future[int] | None]:
    """A peer's envelope into a durable replica the way a node takes one: verified against
    its trust store and applied (the sync core), then appended (the driver's ``Persist``).
    Returns what was applied, with any buffered successors, and the append's future;
    raises the ``EnvelopeError`` of a refusal."""
    env = verify(raw, dr.identity.trust, now_ms)
    applied = dr.replica.apply(env, now_ms)
    return applied, (dr.persist(applied) if applied else None)


@pytest.fixture(scope="session")
def pg_cluster():  # type: ignore[no-untyped-def]
    """A throw-away PostgreSQL server on a Unix socket (``tests.pgkit``), one per test
    session; skips with the reason only where it cannot be installed or started."""
    pytest.importorskip("psycopg", reason="psycopg (PostgreSQL driver) is not installed")
    from tests.pgkit import PgCluster, PgUnavailable

    try:
        cluster = PgCluster().start()
    except PgUnavailable as exc:
        pytest.skip(f"no PostgreSQL here: {exc}")
    yield cluster
    cluster.stop()


_pg_dbs = [0]


@pytest.fixture
def pg_dsn(pg_cluster) -> str:  # type: ignore[no-untyped-def]
    """A fresh, empty database on the session's PostgreSQL: its DSN."""
    _pg_dbs[0] += 1
    return str(pg_cluster.create_database(f"t{os.getpid()}_{_pg_dbs[0]}"))

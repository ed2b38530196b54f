"""A fleet of simulated stores for tests and the load generator (``scripts/bench_fleet.py``).

Each simulated store is a real edge ``Node`` (its own store key, Ed25519 node key,
certificate, SQLite ledger and sync core), many per process, with discovery off, dialing
the cloud over the WAN protocol like any edge (``--cloud URL``): so every envelope the
cloud ingests is signed, hash-chained and verified for real. Only the POS in front is
simulated: ``Fleet.sell`` runs the sale command on the edge and counts it as acknowledged
once its envelope is durable there (``Node.execute``).

``provision`` enrols the stores and the cloud locally (store key in hand:
``mesh.store.datadir.enrol_node``), the way ``tests.meshkit`` and the benchmarks do.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from mesh.core.replica import CommandResult, Replica
from mesh.errors import CommandError, LedgerError
from mesh.node.node import Node
from mesh.store.datadir import enrol_node, init_store

__all__ = ["SKU", "Fleet", "provision"]

#: The SKU every simulated store sells (received in bulk first, so none goes negative).
SKU = "SKU-FLEET"
STOCK = 1_000_000


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def provision(base: Path, cloud_root: Path, n: int, *, prefix: str = "st") -> list[str]:
    """``n`` stores: ``base/<store>/edge`` (store key + edge node) and the cloud's node of
    each in ``cloud_root/<store>``. Returns the store ids."""
    stores = []
    now = _now_ms()
    for i in range(n):
        store_id = f"{prefix}{i:04d}"
        edge = init_store(base / store_id / "edge", store_id, now_ms=now, node_id="edge")
        assert edge.store_key is not None
        enrol_node(cloud_root / store_id, edge.store_key, store_id, "cloud", now_ms=now,
                   node_id=f"cloud-{store_id}", checkpointer=edge.node_id)
        stores.append(store_id)
    return stores


def _receive(r: Replica, *, txn: str, now_ms: int) -> CommandResult:
    return r.receive(SKU, STOCK, txn=txn, now_ms=now_ms)


def _sell(r: Replica, *, txn: str, now_ms: int) -> CommandResult:
    return r.sell(SKU, 1, txn=txn, now_ms=now_ms)


@dataclass
class Fleet:
    """Edges of ``stores`` (provisioned under ``base``) dialing every URL of ``clouds``
    (the gateways: ``http(s)://host:port``)."""

    base: Path
    stores: list[str]
    clouds: list[str]
    plaintext: bool = True
    nodes: dict[str, Node] = field(default_factory=dict)
    #: sales whose envelope is durable at the edge, per store
    acked: dict[str, int] = field(default_factory=dict)
    failed: int = 0

    async def start(self, *, concurrency: int = 16, connect: bool = True) -> None:
        """Start every edge (``concurrency`` at a time) and stock it on first start;
        ``connect=False``: do not dial the cloud yet (``connect`` does, for all at once:
        a benchmark's clock then starts with every edge already open)."""
        sem = asyncio.Semaphore(concurrency)

        async def one(s: str) -> None:
            async with sem:
                node = Node(self.base / s / "edge", serve=False, discovery=False,
                            wan_peers=[self.url(u, s) for u in self.clouds]
                            if connect else [],
                            insecure_plaintext=self.plaintext, advertise=False)
                self.nodes[s] = node
                await node.start()
                if node.replica.on_hand(SKU) == 0:
                    await node.execute(partial(_receive, txn=f"{s}-stock", now_ms=_now_ms()))
                self.acked.setdefault(s, 0)
        async with asyncio.TaskGroup() as tg:
            for s in self.stores:
                tg.create_task(one(s))

    @staticmethod
    def url(cloud: str, store: str) -> str:
        """The store's URL at one gateway, pinned to the cloud's node of the store
        (``#NODE_ID``): the edge then knows whom every gateway URL reaches, keeps one
        session, and dials the other URLs only once it ended (failover from 0.2 s of
        backoff instead of where refusals by non-holders had left it)."""
        return f"{cloud}/stores/{store}#cloud-{store}"

    def connect(self) -> None:
        """Dial the cloud URLs from every edge started with ``connect=False``."""
        for s, node in self.nodes.items():
            for u in self.clouds:
                url = self.url(u, s)
                if url not in node.wan_peers:
                    node.wan_peers.append(url)
                    node._ensure_dialer(url, wan=True, role="cloud")  # as Node.start does

    async def sell(self, store: str, n: int = 1) -> None:
        """``n`` sales at ``store``, one after the other, each acknowledged when durable."""
        node = self.nodes[store]
        for _ in range(n):
            i = self.acked[store] + 1
            try:
                await node.execute(partial(_sell, txn=f"{store}-sale-{i}", now_ms=_now_ms()))
            except (LedgerError, CommandError):  # counted, not acknowledged
                self.failed += 1
                continue
            self.acked[store] = i

    async def sell_all(self, per_store: int, *, concurrency: int = 64) -> None:
        """``per_store`` sales in every store, stores in parallel (bounded)."""
        sem = asyncio.Semaphore(concurrency)

        async def one(s: str) -> None:
            async with sem:
                await self.sell(s, per_store)
        async with asyncio.TaskGroup() as tg:
            for s in self.stores:
                tg.create_task(one(s))

    def held(self, store: str) -> int:
        """Envelopes of ``store``'s edge (its own seq): what the cloud must end up with."""
        node = self.nodes[store]
        return node.replica.vv.to_dict().get(node.identity.node_id, 0)

    def cloud_acked(self, store: str) -> int:
        """The edge's own seq the cloud told the edge it holds (its version vector)."""
        node = self.nodes[store]
        best = 0
        for link in node.core.peers.values():
            best = max(best, link.acked.get(node.identity.node_id))
        return best

    async def close(self) -> None:
        for node in self.nodes.values():
            await node.close()

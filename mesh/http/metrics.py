"""Prometheus metrics of one node, read from the node at scrape time.

Nothing here counts anything itself: the sync core, the durable replica and the node
already keep the counters, and a scrape reads them. So the numbers cannot drift from
the state they describe, and a node that is never scraped pays nothing.

Invariants:
 1. Each node has its own ``CollectorRegistry`` (never the process-global one), so
    several nodes can live in one process (tests, the simulator, benchmarks).
 2. A scrape runs on the node's event loop thread (the state it reads is owned by that
    loop) and does no blocking I/O beyond two ``stat`` calls for the ledger size.
 3. Counters only grow while the node runs; they restart from zero with the process
    (Prometheus ``rate()`` handles resets).
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Final, Protocol

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric

from mesh.core.replica import CommandResult, Replica
from mesh.core.sync import NOT_REFUSALS, Effect, SyncCore
from mesh.durable import DurableReplica
from mesh.http.httpfaults import ClientFaults
from mesh.store.datadir import NodeIdentity
from mesh.store.ledger import Ledger

__all__ = [
    "CONTENT_TYPE",
    "NodeCollector",
    "NodeView",
    "add_source",
    "make_registry",
    "rejection_counts",
    "render",
]

#: Content type of ``render``'s output (Prometheus text exposition format 0.0.4).
CONTENT_TYPE: Final = CONTENT_TYPE_PLAIN_0_0_4

#: Sync-core stats keys that are not refusals (expected traffic: see mesh.core.sync).
_NOT_REFUSALS: Final = NOT_REFUSALS


class NodeView(Protocol):
    """What the metrics and the HTTP API (``mesh.http.api``) use of a node; ``mesh.node.node.Node``
    provides it. A protocol rather than an import of ``Node``: the node imports these
    modules, and this keeps the dependency one-way."""

    identity: NodeIdentity
    durable: DurableReplica[Ledger]
    core: SyncCore
    rejected_sessions: dict[str, int]
    http_faults: ClientFaults
    started_ms: int

    @property
    def replica(self) -> Replica: ...

    @property
    def subscriber_count(self) -> int: ...

    def now_ms(self) -> int: ...

    async def execute(self, fn: Callable[[Replica], CommandResult]) -> CommandResult: ...

    def subscribe(self) -> asyncio.Queue[dict[str, Any]]: ...

    def unsubscribe(self, q: asyncio.Queue[dict[str, Any]]) -> None: ...

    def peer_status(self) -> list[dict[str, Any]]: ...

    def wan_bytes(self) -> tuple[int, int]: ...

    def handle_effects(self, effects: list[Effect]) -> None: ...


def rejection_counts(node: NodeView) -> dict[str, int]:
    """Refused envelopes and sessions by reason: the sync core's refusals plus the
    durable replica's (they count different paths, so equal reasons add up) plus the
    transport's refused sessions as ``session_<reason>``."""
    out: dict[str, int] = {}

    def add(counts: Mapping[str, int], prefix: str = "") -> None:
        for reason, n in counts.items():
            if reason in _NOT_REFUSALS and not prefix:
                continue
            key = prefix + reason
            out[key] = out.get(key, 0) + n

    add(node.core.stats)
    add(node.rejected_sessions, "session_")
    return dict(sorted(out.items()))


class NodeCollector:
    """A custom collector that reads one ``Node`` whenever it is scraped."""

    def __init__(self, node: NodeView) -> None:
        self.node = node

    def collect(self) -> Iterable[Metric]:
        node = self.node
        core = node.core
        ledger = node.durable.ledger
        peers = node.peer_status()

        yield CounterMetricFamily(
            "storemesh_envelopes_received",
            "Envelopes from peers applied to this replica.",
            value=core.received,
        )
        yield CounterMetricFamily(
            "storemesh_envelopes_sent",
            "Envelopes sent to peers (pushes, relays and catch-up).",
            value=core.sent_envelopes,
        )
        rejected = CounterMetricFamily(
            "storemesh_envelopes_rejected",
            "Envelopes and peer sessions refused, by reason (session_* = transport).",
            labels=["reason"],
        )
        for reason, n in rejection_counts(node).items():
            rejected.add_metric([reason], n)
        yield rejected

        yield GaugeMetricFamily(
            "storemesh_peers_up", "Peers with a live session.",
            value=sum(1 for p in peers if p.get("up")),
        )
        lag = GaugeMetricFamily(
            "storemesh_peer_lag_envelopes",
            "Envelopes this node holds that the peer has not acknowledged.",
            labels=["peer"],
        )
        for p in sorted(peers, key=lambda p: str(p.get("node_id"))):
            lag.add_metric([str(p.get("node_id"))], int(p.get("lag") or 0))
        yield lag

        yield GaugeMetricFamily(
            "storemesh_ledger_envelopes",
            "Envelopes in the durable ledger (append-only, so its highest row id).",
            value=ledger.last_id,
        )
        yield GaugeMetricFamily(
            "storemesh_ledger_bytes", "Size of the ledger database and its WAL, in bytes.",
            value=ledger.size_bytes(),
        )
        yield GaugeMetricFamily(
            "storemesh_pending_envelopes",
            "Envelopes buffered ahead of a sequence gap, waiting for it to fill.",
            value=node.replica.pending_count(),
        )
        yield GaugeMetricFamily(
            "storemesh_oversold_units",
            "Units sold or reserved that were not there (sum of oversell exceptions).",
            value=node.replica.oversold_units(),
        )
        yield CounterMetricFamily(
            "storemesh_checkpoint_mismatches",
            "Checkpoint folds here that differed from their ck op (the proposer's fold "
            "hash, or a chain head it names): each one also raised as an alert.",
            value=node.replica.ck_mismatches,
        )
        sync_bytes = CounterMetricFamily(
            "storemesh_sync_bytes", "Sync message bytes exchanged with peers.",
            labels=["direction"],
        )
        sync_bytes.add_metric(["in"], core.bytes_in)
        sync_bytes.add_metric(["out"], core.bytes_out)
        yield sync_bytes
        wan = CounterMetricFamily(
            "storemesh_wan_bytes", "Bytes on the wire over WAN sessions (the cloud link), "
            "after compression, from the kernel's TCP counters.", labels=["direction"],
        )
        sent, received = node.wan_bytes()
        wan.add_metric(["out"], sent)
        wan.add_metric(["in"], received)
        yield wan
        faults = CounterMetricFamily(
            "storemesh_http_client_errors",
            "HTTP requests that failed by the client's doing, by reason (bad_request: "
            "unparseable; disconnected: hung up mid-body). Logged at most once a minute.",
            labels=["reason"],
        )
        for reason, n in node.http_faults.counts.items():
            faults.add_metric([reason], n)
        yield faults
        yield GaugeMetricFamily(
            "storemesh_subscribers", "Live stock-change subscribers (e.g. SSE streams).",
            value=node.subscriber_count,
        )
        for source in _SOURCES.get(node, ()):
            yield from source()


#: Metric families of optional modules (``mesh.http.sensor_routes``), per node: each source is
#: called at scrape time like the collector above (invariant 2).
_SOURCES: weakref.WeakKeyDictionary[Any, list[Callable[[], Iterable[Metric]]]] = (
    weakref.WeakKeyDictionary())


def add_source(node: Any, source: Callable[[], Iterable[Metric]]) -> None:
    """Export ``source()``'s metric families in ``node``'s ``/metrics`` too."""
    _SOURCES.setdefault(node, []).append(source)


def make_registry(node: NodeView) -> CollectorRegistry:
    """A registry of its own for ``node`` (invariant 1)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(NodeCollector(node))
    return registry


def render(registry: CollectorRegistry) -> bytes:
    """The registry in Prometheus text format (call on the node's loop: invariant 2)."""
    return generate_latest(registry)

"""The ports the driver runs over: what a node needs from the world, as Protocols.

``mesh.driver.Driver`` (the one effect interpreter) is written against these and
nothing else; the real node plugs in asyncio/aiohttp/SQLite implementations
(``mesh.node.node``), the simulator plugs in simulated ones (``mesh.sim.ports``). Both
implementations of a port pass the same contract suite (``mesh.testing.contracts``).

The driver's upcalls (what a port tells the driver) are plain methods of the driver:
``session_up(peer, wan)``, ``message(peer, data)``, ``session_down(peer)``.

Contracts (checked by ``mesh.testing.contracts``):
 1. ``Clock``: ``monotonic_ms`` never goes back and drives every timer; ``realtime_ms``
    (wall time: HLC, skew checks, certificate expiry) may jump either way and must not
    stall a timer. ``call_at`` runs callbacks in time order, FIFO at equal times;
    ``call_soon`` is the batch boundary: it runs after everything already runnable now
    (one loop iteration; in the simulator, one virtual instant), and may be called from
    any thread.
 2. ``Transport``: per peer session, messages arrive in the order sent; a HIGH message
    queued with LOW ones goes first; nothing crosses from one session into the next;
    ``send`` to a peer without a session is dropped.
 3. ``Storage``: ``append`` never reorders: rows replay (``scan``) in append order. Its
    future resolves only once the rows survive a crash of the process (``sync=True``;
    ``sync=False`` rows may be lost by a power cut, never by a process crash); a crash
    loses exactly what was not yet durable. A failed batch fails every append queued
    behind it, until ``reset_failure``. A snapshot covers exactly the rows on disk.
    Futures may complete on any thread.
 4. ``Worker``: runs a blocking call away from the driver's thread; ``done`` is called
    on the driver's thread with the finished future.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future
from typing import TYPE_CHECKING, Protocol, TypeVar, runtime_checkable

if TYPE_CHECKING:
    from mesh.core.envelope import Envelope
    from mesh.core.identity import Certificate, NodeKey, TrustStore

__all__ = ["Cancel", "Clock", "Discovery", "Identity", "Issuer", "Prunable", "Storage",
           "Transport", "Worker"]

T = TypeVar("T")


class Cancel(Protocol):
    def cancel(self) -> object: ...


class Clock(Protocol):
    """Two clocks, not one (TigerBeetle's ``Time``): timers on monotonic time, wall time
    for what is stamped and compared with other nodes."""

    def monotonic_ms(self) -> float: ...

    def realtime_ms(self) -> int: ...

    def call_at(self, monotonic_ms: float, fn: Callable[[], None]) -> Cancel: ...

    def call_soon(self, fn: Callable[[], None]) -> None: ...


class Transport(Protocol):
    """Sessions with peers, named by peer node id (authenticated before any message)."""

    def send(self, peer: str, data: bytes, priority: int) -> None: ...

    def close(self, peer: str, reason: str) -> None: ...


class Storage(Protocol):
    """The ledger as the durability layer and the driver need it (``mesh.store.ledger.Ledger``
    for real, ``mesh.sim.ports.SimDisk`` in the simulator)."""

    @property
    def last_id(self) -> int: ...

    @property
    def failed(self) -> BaseException | None: ...

    def append(self, envs: Sequence[Envelope], *, sync: bool = True) -> Future[int]: ...

    def reset_failure(self) -> None: ...

    def call(self, fn: Callable[[], None]) -> Future[int]: ...

    def read_origin(self, origin: str, first: int, last: int) -> list[bytes]: ...

    def scan(self, after: int = 0) -> Iterator[tuple[int, bytes]]: ...

    def latest_snapshot(self) -> tuple[int, bytes] | None: ...

    def save_snapshot(self, upto: int, state: bytes) -> None: ...

    def add_evidence(self, origin: str, seq: int, first: bytes, second: bytes) -> None: ...

    def close(self) -> None: ...


@runtime_checkable
class Prunable(Protocol):
    """A ``Storage`` that can delete the prefix of each origin's chain a checkpoint
    covers (a register's ledger, ``mesh.durable`` invariant 8); edges and the cloud keep
    the archive. After ``prune``, ``read_origin`` of a pruned seq returns nothing (never
    a later run) and ``scan`` skips the pruned rows."""

    def prune(self, upto: Mapping[str, int]) -> int: ...


class Worker(Protocol):
    """Blocking calls (ledger reads, evidence, snapshots, identity saves) off the
    driver's thread; inline in the simulator."""

    def run(self, fn: Callable[[], T], done: Callable[[Future[T]], None]) -> None: ...


class Identity(Protocol):
    """Who this node is, and the persistence of its trust store (``save``: after new
    certificates or revocations)."""

    @property
    def node_id(self) -> str: ...

    @property
    def store_id(self) -> str: ...

    @property
    def role(self) -> str: ...

    @property
    def key(self) -> NodeKey: ...

    @property
    def trust(self) -> TrustStore: ...

    def save(self) -> None: ...

    def encode(self) -> bytes: ...

    def write(self, data: bytes) -> None: ...

    @property
    def issuer(self) -> Issuer | None:
        """The store key's holder (the edge) renews certificates; None elsewhere."""

    def write_tls(self, pem: str) -> bool:
        """A renewed TLS certificate for this node (from the edge): check it (store CA,
        this node and key; ``ValueError`` if not), save it durably, and return whether
        it replaced an older one. Blocking: the driver calls it on the worker."""


class Issuer(Protocol):
    """Certificate renewal by the store key's holder (``mesh.core.identity.renewal_due``)."""

    @property
    def validity_ms(self) -> int:
        """How long the certificates it issues are valid."""

    def renew(self, cert: Certificate, now_ms: int) -> tuple[Certificate, str | None]:
        """``cert`` renewed from ``now_ms``, and a TLS certificate (PEM) for it (None
        where there is no TLS: the simulator)."""


class Discovery(Protocol):
    """Finds peers of the same store (zeroconf for real); tells the node through the
    ``on_peer(info)`` / ``on_lost(node_id)`` callbacks given at construction. The node,
    not the driver, uses it: it decides whom to dial."""

    async def start(self) -> None: ...

    async def close(self) -> None: ...

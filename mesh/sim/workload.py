"""The workload of a simulation run: initial stock, Poisson command streams per node,
last-unit races, and the POS retrying what a crash left unacknowledged.

Every command goes through ``SimNode.command`` into the real ``Replica`` (``sell``,
``return_``, ``receive``, ``adjust``, ``reserve``, ``fulfil``, ``release``, ``expire``);
refusals (``CommandError``: unknown SKU, not enough available for a reservation, no
such reservation) are business outcomes and are counted, not failures.

Invariants:
 1. Every random choice comes from the ``random.Random`` given at construction, drawn
    in event order (which the world makes deterministic).
 2. A txn id is unique per origin; a retry after a crash reuses the original txn id
    (the replica's idempotency makes it exactly-once).
 3. After ``stop`` no new command is issued.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

from mesh.core.replica import CommandResult, Replica
from mesh.errors import CommandError
from mesh.sim.scenario import RaceSpec, Scenario, StreamSpec, resolve
from mesh.sim.world import SimNode, World

__all__ = ["Counts", "Workload"]

Command = Callable[[Replica], CommandResult]


@dataclass(slots=True)
class Counts:
    ok: int = 0
    refused: int = 0
    offline: int = 0


@dataclass(slots=True)
class _InFlight:
    kind: str
    fn: Command


@dataclass(slots=True)
class Workload:
    world: World
    sc: Scenario
    rng: random.Random
    skus: list[str] = field(default_factory=list)
    counts: dict[str, Counts] = field(default_factory=dict)
    unacked_at_crash: int = 0
    retried: int = 0
    retry_duplicates: int = 0
    stopped: bool = False
    _seq: int = 0
    _inflight: dict[str, dict[str, _InFlight]] = field(default_factory=dict)
    _orphans: dict[str, dict[str, _InFlight]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._inflight = {n: {} for n in self.world.nodes}
        self._orphans = {n: {} for n in self.world.nodes}
        self.world.observers.append(self._observe)

    # --- plumbing --------------------------------------------------------------------------

    def _txn(self, kind: str, node: str) -> str:
        self._seq += 1
        return f"{kind}-{node}-{self._seq}"

    def issue(self, node_id: str, kind: str, txn: str, fn: Command) -> None:
        """Run ``fn`` as a local command at ``node_id`` and count the outcome."""
        counts = self.counts.setdefault(kind, Counts())
        node = self.world.nodes[node_id]
        if not node.alive or node.frozen:
            counts.offline += 1
            return
        inflight = self._inflight[node_id]
        inflight[txn] = _InFlight(kind, fn)

        def on_ack(res: CommandResult) -> None:
            if inflight.pop(txn, None) is not None:
                counts.ok += 1
                if res.duplicate:
                    self.retry_duplicates += 1
        try:
            node.command(fn, on_ack)
        except CommandError:
            inflight.pop(txn, None)
            counts.refused += 1

    def _observe(self, kind: str, data: dict[str, object]) -> None:
        node = data.get("node")
        if not isinstance(node, str):
            return
        if kind == "crash":
            lost = self._inflight[node]
            self.unacked_at_crash += len(lost)
            self._orphans[node].update(lost)
            self._inflight[node] = {}
        elif kind == "restart" and self.sc.retry_unacked:
            orphans, self._orphans[node] = self._orphans[node], {}
            # The POS resubmits what it never got an answer for, once the node is back.
            for i, (txn, job) in enumerate(orphans.items()):
                self.world.after(5.0 + i, partial(self._retry, node, txn, job))

    def _retry(self, node: str, txn: str, job: _InFlight) -> None:
        if self.stopped:
            return
        self.retried += 1
        self.issue(node, job.kind, txn, job.fn)

    def stop(self) -> None:
        self.stopped = True

    # --- set-up -----------------------------------------------------------------------------

    def start(self) -> None:
        sc = self.sc
        stock = list(sc.stock)
        if sc.stock_generate is not None:
            count, prefix, (lo, hi) = sc.stock_generate
            stock += [(f"{prefix}{i}", self.rng.randint(lo, hi)) for i in range(1, count + 1)]
        self.skus = [s for s, _ in stock]
        at = sc.stock_at
        node = self.world.nodes[at]
        for sku, qty in stock:
            fn = partial(_initial_receipt, sku, qty, node)
            self.world.at(1.0, partial(self.issue, at, "receipt", f"init-{sku}", fn))
        warm = sc.warmup_s * 1000
        for stream in sc.streams:
            for n in resolve(stream.nodes, sc.nodes):
                start = max(warm, (stream.start_s or 0.0) * 1000)
                self._next(stream, n, start)
        for race in sc.races:
            self._race(race)

    def _next(self, stream: StreamSpec, node: str, after: float) -> None:
        if stream.rate_per_min <= 0:
            return
        t = after + self.rng.expovariate(stream.rate_per_min / 60_000.0)
        end = min(self.sc.duration_s, stream.end_s if stream.end_s is not None else 1e18) * 1000
        if t >= end:
            return

        def fire() -> None:
            if self.stopped:
                return
            self._fire(stream, node)
            self._next(stream, node, self.world.now)
        self.world.at(t, fire)

    def _race(self, race: RaceSpec) -> None:
        racers = resolve(race.nodes, self.sc.nodes)
        for i, n in enumerate(racers):
            offset = race.spread_ms * i / max(1, len(racers) - 1)
            self.world.at(race.at_s * 1000 + offset, partial(
                self._take, n, race.kind, race.sku, race.qty,
                StreamSpec(race.kind, (n,), 0.0, shelf_check=False)))

    # --- commands ----------------------------------------------------------------------------

    def _sku(self, stream: StreamSpec) -> str:
        if stream.skus:
            return self.rng.choice(stream.skus)
        if self.sc.hot and self.rng.random() < stream.hot_share:
            return self.rng.choice(self.sc.hot)
        return self.rng.choice(self.skus)

    def _fire(self, s: StreamSpec, node_id: str) -> None:
        if not self.world.nodes[node_id].alive:
            self.counts.setdefault(s.kind, Counts()).offline += 1
            return
        if s.kind in ("sale", "reserve", "return", "receipt", "adjust"):
            qty = self.rng.randint(*s.qty)
            sku = self._sku(s)
            if (s.kind == "sale" and s.shelf_check
                    and self.world.nodes[node_id].replica.available(sku) < qty):
                self.counts.setdefault("sale", Counts()).refused += 1  # not on the shelf
                return
            self._take(node_id, s.kind, sku, qty, s)
        elif s.kind == "fulfil":
            self._fulfil(node_id)
        elif s.kind == "release":
            self._release(node_id)
        elif s.kind == "expire":
            self._expire(node_id)

    def _take(self, node_id: str, kind: str, sku: str, qty: int, s: StreamSpec) -> None:
        node = self.world.nodes[node_id]
        txn = self._txn(kind, node_id)
        fn: Command
        if kind == "sale":
            strict = s.strict
            fn = lambda r: r.sell(sku, qty, txn=txn, now_ms=node.clock(),  # noqa: E731
                                  strict=strict)
        elif kind == "return":
            fn = lambda r: r.return_(sku, qty, txn=txn, now_ms=node.clock(),  # noqa: E731
                                     reason="customer")
        elif kind == "receipt":
            fn = lambda r: r.receive(sku, qty, txn=txn, now_ms=node.clock())  # noqa: E731
        elif kind == "adjust":
            fn = lambda r: r.adjust(sku, -qty, reason="damage", txn=txn,  # noqa: E731
                                    now_ms=node.clock())
        else:
            pickups = resolve(s.pickup, self.sc.nodes) if s.pickup else [node_id]
            order = f"{txn}@{self.rng.choice(pickups)}"
            ttl = s.ttl_s
            channel = s.channel
            fn = lambda r: r.reserve(  # noqa: E731
                sku, qty, txn=txn, now_ms=node.clock(), channel=channel, order=order,
                expires=None if ttl is None else node.clock() + int(ttl * 1000))
        self.issue(node_id, kind, txn, fn)

    def _fulfil(self, node_id: str) -> None:
        """Hand over an order whose pickup is this node (one pickup point per order, so
        two tills never hand over the same parcel)."""
        node = self.world.nodes[node_id]
        mine = [r.id for r in node.replica.active_reservations()
                if r.order is not None and r.order.endswith("@" + node_id)]
        if not mine:
            self.counts.setdefault("fulfil", Counts()).refused += 1
            return
        rid = self.rng.choice(mine)
        txn = self._txn("fulfil", node_id)
        self.issue(node_id, "fulfil", txn,
                   lambda r: r.fulfil(rid, txn=txn, now_ms=node.clock()))

    def _release(self, node_id: str) -> None:
        """The customer cancels an order this channel took."""
        node = self.world.nodes[node_id]
        mine = [r.id for r in node.replica.active_reservations()
                if r.id.startswith(node_id + ":")]
        if not mine:
            self.counts.setdefault("release", Counts()).refused += 1
            return
        rid = self.rng.choice(mine)
        txn = self._txn("release", node_id)
        self.issue(node_id, "release", txn,
                   lambda r: r.release(rid, txn=txn, now_ms=node.clock(), reason="cancel"))

    def _expire(self, node_id: str) -> None:
        node = self.world.nodes[node_id]
        now = node.clock()
        if not any(r.expires is not None and r.expires <= now
                   for r in node.replica.active_reservations()):
            return
        txn = self._txn("expire", node_id)

        def fn(r: Replica) -> CommandResult:
            res = r.expire(now_ms=node.clock(), txn=txn)
            if res is None:
                raise CommandError("nothing to expire")
            return res
        self.issue(node_id, "expire", txn, fn)

    def retry_now(self, node_id: str) -> bool:
        """The POS resubmits the newest command still waiting for its answer at
        ``node_id`` (same txn id: a retry after a timeout); False if none waits."""
        inflight = self._inflight[node_id]
        if not inflight:
            return False
        txn = next(reversed(inflight))
        job = inflight[txn]
        self.retried += 1
        self.issue(node_id, job.kind, txn, job.fn)
        return True

    def mid_sale(self, node_id: str) -> None:
        """A sale at ``node_id`` right now (the crash fault cuts its fsync short)."""
        sku = self.rng.choice(self.sc.hot or self.skus) if (self.sc.hot or self.skus) else None
        if sku is not None:
            self._take(node_id, "sale", sku, 1, StreamSpec("sale", (node_id,), 0.0))


def _initial_receipt(sku: str, qty: int, node: SimNode, r: Replica) -> CommandResult:
    return r.receive(sku, qty, txn=f"init-{sku}", now_ms=node.clock(), reason="initial")

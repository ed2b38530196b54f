"""The safety checker of a simulation run: it watches the world, never steers it.

It sees every envelope a node signs (``created``), acknowledges (``acked``) or applies
from a peer (``applied``), and every crash, through ``World.observers``; it samples
every replica periodically; and it runs the end-of-run checks.

Invariants checked on every step (the safety phase, as in TigerBeetle's VOPR):
 1. Per node and origin, envelopes are applied in seq order, each exactly once: an
    (origin, seq) applied twice at one node is a *duplicate apply*, one that skips a
    seq is an *out-of-order apply*. A crash resets a node's marks to what its disk
    kept (what was lost may, and must, be applied again).
 2. No forged or tampered envelope (``forged``, filled by the injector) is applied.
 3. No replica holds more of an origin's chain than that origin ever made durable
    (*phantom* envelopes). A replica's chain grows only by an apply, and an origin's
    chain shrinks only at its crash or recovery, so it is checked there (each applied
    envelope against its origin's chain; every replica's hold of an origin when that
    origin crashes or recovers) instead of scanning every replica at every sample.
 6. No replica applies an envelope of an origin its trust store holds as revoked
    (*revoked_accepted*), above the bound its revocation names: after a node is
    revoked, every replica that has the list refuses its envelopes past the bound
    (those up to it are kept everywhere: ``mesh.core.identity`` invariant 7).
Checked at the end (the liveness phase, after the heal):
 4. Every acknowledged operation is present, byte for byte (its envelope hash), at
    every live replica (in memory, or, below a checkpoint fold, on its disk or handed
    to it and not yet fsynced; a register that pruned it from its disk behind a
    checkpoint holds it if a live node keeping the archive does): otherwise it is
    *lost*. One acknowledged by a node that is
    ``gone`` (crashed for good by a fault kept into the liveness phase) may instead be
    at no live replica and on the gone node's disk: *stranded* (unavailable, not lost);
    at some live replicas but not all, it is lost.
 5. Every replica derives the same oversell exception list.
 7. Every replica that folds a checkpoint computes the same checkpoint hash
    (``Replica.checkpoint_hash``): compared at every sample and at the end, over what
    each replica holds (its newest folds), against the first hash seen for that
    checkpoint (*checkpoint_mismatches*).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from mesh.core.envelope import Envelope
from mesh.core.replica import CommandResult
from mesh.sim.world import SimNode, World

__all__ = ["Checker", "Sample", "percentiles"]

#: Sync-core stats that count refusals of a peer's input (the rest are bookkeeping).
NOT_REJECTIONS = ("duplicate", "not_connected")
#: Failures described in detail; the counts go on regardless.
MAX_EXAMPLES = 10


@dataclass(slots=True)
class Sample:
    """Availability of the tracked SKUs at every replica at one instant (None: down)."""

    t_ms: float
    available: dict[str, list[int | None]]
    partitioned: bool


@dataclass(slots=True)
class _CatchUp:
    label: str
    healed_ms: float
    target: dict[str, int]
    done_ms: float | None = None


@dataclass(slots=True)
class Checker:
    world: World
    tracked: list[str]
    #: Divergence counts from here on (before it, the initial stock is still spreading).
    watch_from_ms: float = 0.0
    duplicate_applies: int = 0
    out_of_order_applies: int = 0
    invalid_accepted: int = 0
    phantom_envelopes: int = 0
    revoked_accepted: int = 0
    examples: list[str] = field(default_factory=list)
    forged: dict[bytes, tuple[str, int]] = field(default_factory=dict)
    lags: list[float] = field(default_factory=list)
    samples: list[Sample] = field(default_factory=list)
    peak_divergence: int = 0
    peak_divergence_partitioned: int = 0
    peak_at_ms: float | None = None
    peak_sku: str | None = None
    catchups: list[_CatchUp] = field(default_factory=list)
    #: nodes dead for good (a crash kept into the liveness phase, no end)
    gone: list[str] = field(default_factory=list)
    carried_stats: dict[str, int] = field(default_factory=dict)
    _marks: dict[str, dict[str, int]] = field(default_factory=dict)
    _ack_at: dict[tuple[str, int], float] = field(default_factory=dict)
    _acked_high: dict[str, int] = field(default_factory=dict)
    _accepted_forged: list[bytes] = field(default_factory=list)
    #: invariant 7: ``Checkpoint.key`` -> (first node seen folding it, its fold's hash)
    checkpoint_hashes: dict[bytes, tuple[str, bytes]] = field(default_factory=dict)
    checkpoint_mismatches: int = 0
    _mismatched: set[tuple[str, bytes]] = field(default_factory=set)
    #: node -> checkpoints it was seen to have folded (their keys)
    checkpoint_folds: dict[str, set[bytes]] = field(default_factory=dict)
    #: (virtual ms, cut, frontier) of every checkpoint proposed, in order
    checkpoints_created: list[tuple[float, int, dict[str, int]]] = field(default_factory=list)

    #: node -> frontier of the checkpoint state it installed (``mesh.core.catchup``):
    #: held there without being on its disk, like a pruned prefix (invariant 4)
    installed: dict[str, dict[str, int]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._marks = {n: {} for n in self.world.nodes}
        self.world.observers.append(self.observe)

    def _fail(self, text: str) -> None:
        if len(self.examples) < MAX_EXAMPLES:
            self.examples.append(f"t={self.world.now / 1000:.3f}s {text}")

    # --- every step ------------------------------------------------------------------------

    def observe(self, kind: str, data: dict[str, Any]) -> None:
        if kind == "applied":
            node = data["node"]
            now = self.world.now
            trust = self.world.nodes[node].trust
            envs = data["envelopes"]
            for env in envs:
                self._mark(node, env)
                if (trust.is_revoked(env.origin)
                        and env.seq > (trust.revocation_bound(env.origin) or 0)):
                    self.revoked_accepted += 1
                    self._fail(f"{node} applied {env.origin} seq {env.seq}, revoked")
                t = self._ack_at.get((env.origin, env.seq))
                if t is not None:
                    self.lags.append(now - t)
            self._check_applied(node, envs)
        elif kind == "created":
            env = data["envelope"]
            self._mark(data["node"], env)
            for op in env.ops:
                if op["t"] == "ck":
                    self.checkpoints_created.append((self.world.now, op["cut"], op["f"]))
        elif kind == "acked":
            res: CommandResult = data["result"]
            self._ack_at[(res.origin, res.seq)] = self.world.now
            if res.seq > self._acked_high.get(res.origin, 0):
                self._acked_high[res.origin] = res.seq
        elif kind == "crash":
            node = self.world.nodes[data["node"]]
            self._marks[node.node_id] = self._kept(node)
            for reason, n in node.core.stats.items():
                self.carried_stats[reason] = self.carried_stats.get(reason, 0) + n
            self._check_holders(node.node_id)
        elif kind == "recovered":  # memory rebuilt from disk after a failed write
            node = self.world.nodes[data["node"]]
            self._marks[node.node_id] = self._kept(node)
            self._check_holders(node.node_id)
        elif kind == "state_installed":  # a checkpoint state (mesh.core.catchup)
            self.installed[data["node"]] = dict(data["frontier"])
            self._marks[data["node"]] = dict(data["vv"])

    def _kept(self, node: SimNode) -> dict[str, int]:
        """What a node holds after a crash or a rebuild: its disk's rows, above the
        frontier of a checkpoint state it installed (its snapshot holds that)."""
        kept = node.disk.durable_seqs()
        for origin, seq in self.installed.get(node.node_id, {}).items():
            kept[origin] = max(kept.get(origin, 0), seq)
        return kept

    def _mark(self, node: str, env: Envelope) -> None:
        marks = self._marks[node]
        have = marks.get(env.origin, 0)
        if env.seq <= have:
            self.duplicate_applies += 1
            self._fail(f"{node} applied {env.origin} seq {env.seq} twice")
        elif env.seq != have + 1:
            self.out_of_order_applies += 1
            self._fail(f"{node} applied {env.origin} seq {env.seq} after seq {have}")
        if env.seq > have:
            marks[env.origin] = env.seq
        if env.hash in self.forged:
            self.invalid_accepted += 1
            self._accepted_forged.append(env.hash)
            self._fail(f"{node} applied a forged envelope {env.origin} seq {env.seq}")

    # --- samples ----------------------------------------------------------------------------

    def check_checkpoints(self) -> None:
        """Invariant 7 over what every live replica holds now."""
        for n in self.world.nodes.values():
            if not n.alive:
                continue
            folds = self.checkpoint_folds.setdefault(n.node_id, set())
            for ck, h in n.replica.checkpoint_hashes.items():
                folds.add(ck)
                first = self.checkpoint_hashes.setdefault(ck, (n.node_id, h))
                if first[1] != h and (n.node_id, ck) not in self._mismatched:
                    self._mismatched.add((n.node_id, ck))
                    self.checkpoint_mismatches += 1
                    self._fail(f"{n.node_id} folded checkpoint {ck.hex()[:12]} to "
                               f"{h.hex()[:12]}, {first[0]} to {first[1].hex()[:12]}")

    def sample(self, partitioned: bool) -> None:
        self.check_checkpoints()
        # (the replicas looked up once per sample, not once per SKU and node)
        replicas = [n.replica if n.alive else None for n in self.world.nodes.values()]
        avail: dict[str, list[int | None]] = {}
        now = self.world.now
        for sku in self.tracked:
            row = [r.available(sku) if r is not None else None for r in replicas]
            avail[sku] = row
            live = [x for x in row if x is not None]
            if len(live) > 1 and now >= self.watch_from_ms:
                div = max(live) - min(live)
                if div > self.peak_divergence:
                    self.peak_divergence, self.peak_at_ms, self.peak_sku = div, now, sku
                if partitioned and div > self.peak_divergence_partitioned:
                    self.peak_divergence_partitioned = div
        self.samples.append(Sample(now, avail, partitioned))

    def _made(self, origin: str) -> int | None:
        """How much of its chain ``origin`` has made (durable, if it is down)."""
        n = self.world.nodes.get(origin)
        if n is None:
            return None
        if n.alive:
            return n.replica.vv.get(origin)
        return len(n.disk.by_origin.get(origin, ()))

    def _phantom(self, holder: str, origin: str, seq: int, made: int) -> None:
        self.phantom_envelopes += 1
        self._fail(f"{holder} holds {origin} seq {seq}, but {origin} made only {made}")

    def _check_applied(self, node: str, envs: tuple[Envelope, ...]) -> None:
        """Invariant 3 at an apply: nothing beyond what its origin has made."""
        top: dict[str, int] = {}
        for env in envs:
            if env.seq > top.get(env.origin, 0):
                top[env.origin] = env.seq
        for origin, seq in top.items():
            made = self._made(origin)
            if made is not None and seq > made:
                self._phantom(node, origin, seq, made)

    def _check_holders(self, origin: str) -> None:
        """Invariant 3 when ``origin``'s chain shrinks (crash, recovery)."""
        made = self._made(origin)
        if made is None:
            return
        for n in self.world.nodes.values():
            if n.alive and n.node_id != origin:
                seq = n.replica.vv.get(origin)
                if seq > made:
                    self._phantom(n.node_id, origin, seq, made)

    def healed(self, label: str) -> None:
        """A cut or crash ended: time how long until everyone holds what was acked."""
        if not self._acked_high:
            return
        c = _CatchUp(label, self.world.now, dict(self._acked_high))
        self.catchups.append(c)

        def watch() -> None:
            self._check_catchup(c)
            if c.done_ms is None:
                # Resolution ~10% of the time taken so far: fine early, cheap late.
                elapsed = self.world.now - c.healed_ms
                self.world.after(min(1000.0, 10.0 + elapsed / 10), watch)
        self.world.after(0.0, watch)

    def check_catchups(self) -> None:
        for c in self.catchups:
            self._check_catchup(c)

    def _check_catchup(self, c: _CatchUp) -> None:
        if c.done_ms is None and all(
            n.alive and all(n.replica.vv.get(o) >= s for o, s in c.target.items()
                            if o not in self.gone)
            for n in self.world.nodes.values() if n.node_id not in self.gone
        ):
            c.done_ms = self.world.now

    def pending_catchups(self) -> bool:
        return any(c.done_ms is None for c in self.catchups)

    # --- the end ----------------------------------------------------------------------------

    def lost_ops(self) -> tuple[int, int, int]:
        """(acknowledged operations, those missing or different at some live replica,
        those stranded on a gone node's disk: invariant 4)."""
        live = [n for n in self.world.nodes.values() if n.alive and n.node_id not in self.gone]
        acked = lost = stranded = 0
        for node in self.world.nodes.values():
            for res in node.acked:
                if res.envelope is None:
                    continue
                acked += 1
                h = res.envelope.hash
                missing = _missing_at(live, res.origin, res.seq, h, self.installed)
                if (missing and node.node_id in self.gone and len(missing) == len(live)
                        and node.disk.hash_at(res.origin, res.seq) == h):
                    stranded += 1
                    continue
                if missing:
                    lost += 1
                    self._fail(f"acknowledged {res.origin} seq {res.seq} "
                               f"({res.envelope.meta.get('kind')}) missing at {missing[:5]}")
        return acked, lost, stranded

    def forged_in_state(self) -> int:
        """Forged envelopes found in any replica's chain at the end (belt and braces)."""
        found = 0
        for h, (origin, seq) in self.forged.items():
            if h in self._accepted_forged:
                continue
            for n in self.world.nodes.values():
                if n.replica.hash_at(origin, seq) == h:
                    found += 1
                    self._fail(f"forged {origin} seq {seq} is in {n.node_id}'s chain")
                    break
        return found

    def stats(self) -> dict[str, int]:
        out = dict(self.carried_stats)
        for n in self.world.nodes.values():
            for reason, k in n.core.stats.items():
                out[reason] = out.get(reason, 0) + k
        return dict(sorted(out.items()))


def _missing_at(live: list[SimNode], origin: str, seq: int, h: bytes,
                installed: dict[str, dict[str, int]] | None = None) -> list[str]:
    """The live replicas that do not hold the envelope ``h`` at (origin, seq). A register
    that pruned it from its ledger behind a checkpoint it folded (``SimDisk.pruned``,
    ``mesh.durable`` invariant 8), or a node that installed a checkpoint state holding
    it (``installed``: its frontier), holds it if a live node keeping the archive does."""
    installed = installed or {}
    missing: list[str] = []
    archived: bool | None = None
    for m in live:
        if _held(m, origin, seq) == h:
            continue
        if (seq <= m.disk.pruned.get(origin, 0)
                or seq <= installed.get(m.node_id, {}).get(origin, 0)):
            if archived is None:
                archived = any(_held(a, origin, seq) == h for a in live
                               if not a.durable.prune_ledger)
            if archived:
                continue
        missing.append(m.node_id)
    return missing


def _held(node: SimNode, origin: str, seq: int) -> bytes | None:
    """The hash of the envelope ``node`` holds at (origin, seq): from memory, or, below
    a checkpoint fold (memory keeps no hash there), from its disk, where it may still be
    on its way (applied, handed to the disk, not yet fsynced: a crash now would have
    its peers send it again)."""
    h = node.replica.hash_at(origin, seq)
    if h is not None or node.replica.vv.get(origin) < seq:
        return h
    for env in reversed(node.disk.rows[node.disk.durable:]):
        if env.origin == origin and env.seq == seq:
            return env.hash
    return None


def percentiles(values: list[float], ps: tuple[float, ...] = (50, 90, 99)) -> dict[str, Any]:
    """Nearest-rank percentiles in ms (rounded to µs), plus max and count."""
    if not values:
        return {"count": 0, "max": None, **{f"p{p:g}": None for p in ps}}
    xs = sorted(values)
    out: dict[str, Any] = {"count": len(xs), "max": round(xs[-1], 3)}
    for p in ps:
        k = max(0, min(len(xs) - 1, -(-len(xs) * p // 100) - 1))
        out[f"p{p:g}"] = round(xs[int(k)], 3)
    return out

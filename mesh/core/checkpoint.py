"""The store's stable frontier: what every live enrolled node is known to hold.

The checkpointer (one node per store, ``Replica.checkpointer``) keeps a ``Frontier``
fed with the version vectors peers send in their summaries (a summary proves its
sender held that vector when it sent it; vectors only grow, so the newest is kept by
pointwise max). ``stable`` is the pointwise minimum over the *members*: the enrolled,
not revoked nodes heard from within the horizon. ``Replica.propose_checkpoint`` turns
it into a ``ck`` envelope (docs/architecture.md, "Bounded history").

Invariants:
 1. Pure: time comes in as ``now_ms``; no I/O.
 2. A member's entry never decreases; ``stable`` never exceeds what a member reported.
 3. A node not heard from for ``horizon_ms`` (counted from when it was first listed as
    enrolled, if it was never heard) is not a member; a retired (revoked) node is not a
    member from the moment it is retired, and stays out.
 4. Bounded: at most ``config.MAX_ORIGINS`` nodes are tracked; reports from nodes that
    are not enrolled are ignored by ``stable`` (the caller passes the enrolled set).
 5. A summary may carry the sender's clock floor ``c`` (``Replica.clock_floor``): a
    promise that every envelope it signs after that summary has an HLC above ``c``,
    so every envelope of it above its own seq ``s`` of then. Per node the promises
    are kept as (s, c) pairs, ascending in both, the greatest ``c`` per ``s``, at most
    ``FLOORS_KEPT`` (the oldest go first); summaries without one (older peers) add none.
 6. ``state``/``restore`` carry the vectors and heard times across a restart (in the
    replica's snapshot), so the horizon counts from when a node was really last heard
    (or first listed); since the snapshot may be older than the crash, every node is
    counted as heard at least until ``config.FRONTIER_RESUME_GRACE_MS`` after the first
    ``now_ms`` seen after the restore. Clock floors are not carried: after a restart a
    member's bound falls back to its newest stamp until it sends a floor again.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from mesh import config
from mesh.core.crdt import VersionVector

__all__ = ["FLOORS_KEPT", "Frontier"]

#: Clock promises kept per node (invariant 5): the checkpointer uses the newest one
#: whose seq the frontier holds, which is one of the last few while the node writes.
FLOORS_KEPT = 8


class Frontier:
    """Per node, the newest version vector it is known to hold, and when it was heard."""

    def __init__(self, horizon_ms: int = config.FRONTIER_HORIZON_MS) -> None:
        self.horizon_ms = horizon_ms
        self._held: dict[str, VersionVector] = {}
        self._heard: dict[str, int] = {}
        self._listed: dict[str, int] = {}  # enrolled node -> when first listed
        self._retired: set[str] = set()
        #: node -> its (own seq, clock floor) promises, ascending (invariant 5)
        self._floor: dict[str, list[tuple[int, int]]] = {}
        #: restored from a snapshot and no time seen since (invariant 6)
        self._resuming = False
        self._resumed_at: int | None = None  # the first now_ms after the restore

    def observe(self, node: str, vv: VersionVector | Mapping[str, int], now_ms: int,
                floor: int | None = None) -> None:
        """``node`` held ``vv`` at ``now_ms`` (its summary, or our own vector), and, if
        ``floor`` is given, promised that it signs nothing more with an HLC up to it."""
        self._resume(now_ms)
        if node in self._retired:
            return
        held = self._held.get(node)
        if held is None:
            if len(self._held) >= config.MAX_ORIGINS:
                return
            held = self._held[node] = VersionVector()
        vector = vv if isinstance(vv, VersionVector) else VersionVector(vv)
        held.merge(vector)
        self._heard[node] = max(self._heard.get(node, now_ms), now_ms)
        if floor is not None:
            # Own seq s, floor c: the envelopes it signs after this summary are its seqs
            # above s (or re-signed ones after a crash lost them), all stamped above c.
            # A pair not above the newest in both is an older summary, reordered: a
            # promise already covered.
            seq, kept = vector.get(node), self._floor.setdefault(node, [])
            if kept and seq == kept[-1][0] and floor > kept[-1][1]:
                kept[-1] = (seq, floor)
            elif not kept or (seq > kept[-1][0] and floor > kept[-1][1]):
                kept.append((seq, floor))
                del kept[:-FLOORS_KEPT]

    def retire(self, node: str) -> None:
        """``node`` was revoked or retired: it stops holding the frontier back now."""
        self._retired.add(node)
        self._held.pop(node, None)
        self._heard.pop(node, None)
        self._floor.pop(node, None)

    def members(self, enrolled: Iterable[str], now_ms: int) -> list[str]:
        """The enrolled nodes that hold the frontier back: not retired, and heard from
        (or, never heard, listed) within the horizon."""
        self._resume(now_ms)
        floor = (self._resumed_at - self.horizon_ms + config.FRONTIER_RESUME_GRACE_MS
                 if self._resumed_at is not None else None)
        out = []
        for node in enrolled:
            if node in self._retired:
                continue
            first = self._listed.setdefault(node, now_ms)
            heard = self._heard.get(node, first)
            if floor is not None:
                heard = max(heard, floor)
            if now_ms - heard <= self.horizon_ms:
                out.append(node)
        return sorted(out)

    def _resume(self, now_ms: int) -> None:
        if self._resuming:
            self._resuming = False
            self._resumed_at = now_ms

    def state(self, index: Callable[[str], int]) -> dict[str, Any]:
        """What a restart needs (invariant 5), nodes and origins as ``index`` numbers
        them (the snapshot's small integers): per tracked node [node, heard, listed,
        [[origin, seq], ...]] (None: not known), and the retired nodes."""
        nodes = list(dict.fromkeys([*self._held, *self._heard, *self._listed]))
        return {
            "nodes": [[index(n), self._heard.get(n), self._listed.get(n),
                       [[index(o), q] for o, q in self._held[n].to_dict().items()]
                       if n in self._held else None] for n in nodes],
            "retired": sorted(index(n) for n in self._retired),
        }

    def restore(self, state: Mapping[str, Any], names: Sequence[str]) -> None:
        """Load ``state`` (from ``state``, ``names`` the snapshot's node names by
        index) into this fresh frontier; the horizon stays this frontier's own."""
        for n, heard, listed, held in state["nodes"]:
            node = names[n]
            if heard is not None:
                self._heard[node] = heard
            if listed is not None:
                self._listed[node] = listed
            if held is not None:
                self._held[node] = VersionVector({names[o]: q for o, q in held})
        self._retired = {names[n] for n in state["retired"]}
        self._resuming = True

    def stable(self, enrolled: Iterable[str], now_ms: int) -> tuple[VersionVector, list[str]]:
        """The pointwise minimum of the members' vectors, and the members. A member
        never heard from holds nothing: the frontier is empty until it reports."""
        members = self.members(enrolled, now_ms)
        held = [self._held.get(m, VersionVector()) for m in members]
        if not held:
            return VersionVector(), members
        origins = set().union(*(h.to_dict() for h in held))
        return VersionVector({o: min(h.get(o) for h in held) for o in origins}), members

    def floors(self, nodes: Iterable[str]) -> dict[str, tuple[tuple[int, int], ...]]:
        """Per node of ``nodes`` that sent any, its (own seq, clock floor) promises,
        ascending (invariant 5), for ``Replica.propose_checkpoint``."""
        return {n: tuple(self._floor[n]) for n in nodes if self._floor.get(n)}

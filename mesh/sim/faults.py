"""The fault plane of a simulation run: schedules partitions, heals, flapping links,
degraded links, crashes, restarts and clock jumps onto the world, and the driver-level
faults: a retry of a command while its original is still being written followed by a
crash, slow disks and fsync spikes, a full disk, I/O errors, a frozen process.

Invariants:
 1. A link is down while at least one active fault cuts it (cuts are counted per
    fault), so overlapping partitions heal only when the last one ends.
 2. ``heal_all`` ends every cut, blackhole, degradation, disk fault and freeze and
    restarts every crashed node; afterwards nothing scheduled by this plane changes the
    world any more.
 4. A link's physics are its own (``base``) overridden by the newest degrade still in
    force on it; when the last one ends, the link has its own physics again, whatever
    the order in which overlapping degrades end.
 3. Every random choice (flap timings) comes from the ``random.Random`` given at
    construction, drawn while scheduling, in fault order.
 5. A repeatable fault (``every_s``, ``repeat``) is one occurrence per period, each
    with its own cut count, degrade and interval, as if written out one by one.
 6. A fault marked ``liveness`` is left alone by ``heal_all``: its windows and repeats
    go on in the liveness phase (to ``until_ms``); nodes it crashes without an end are
    ``gone`` (dead for good): convergence is judged on the others.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

from mesh.sim.ports import DiskFaults
from mesh.sim.scenario import CUTTING, FaultSpec, LinkSpec, Scenario, resolve
from mesh.sim.world import LinkModel, World

__all__ = ["FaultPlane", "Interval", "link_model"]

Pair = tuple[str, str]

#: How soon an enrolment or revocation is tried again while the edge is not running.
ENROL_RETRY_MS = 1_000.0


def link_model(spec: LinkSpec, kind: str, back: bool = False) -> LinkModel:
    """One direction of a link (``back``: the spec's ``back`` physics, else ``out``)."""
    spec = spec.direction(back)
    return LinkModel(
        latency_ms=spec.latency_ms, jitter_ms=spec.jitter_ms, loss=spec.loss,
        duplicate=spec.duplicate,
        bandwidth=None if spec.bandwidth_mbps is None else spec.bandwidth_mbps * 125.0,
        kind=kind, distribution=spec.distribution, reorder=spec.reorder,
        reorder_ms=spec.reorder_ms, fifo=spec.fifo,
    )


@dataclass(slots=True)
class Interval:
    """When a fault was in force, for the report and the plot's shading."""

    kind: str
    label: str
    start_ms: float
    end_ms: float | None = None
    kept: bool = False  #: in force into the liveness phase


_PHYSICS = ("latency_ms", "jitter_ms", "loss", "duplicate", "bandwidth", "distribution",
            "reorder", "reorder_ms", "fifo")


class FaultPlane:
    def __init__(self, world: World, sc: Scenario, rng: random.Random,
                 on_heal: Callable[[str], None], mid_sale: Callable[[str], None],
                 retry: Callable[[str], object] | None = None) -> None:
        self.world = world
        self.sc = sc
        self.rng = rng
        self.on_heal = on_heal
        self.mid_sale = mid_sale
        self.retry = retry or (lambda node: None)
        self.order = {n: i for i, n in enumerate(world.nodes)}
        self._cuts: dict[Pair, list[int]] = {}
        self._holes: dict[Pair, list[int]] = {}
        #: per degraded link: its own physics, and the degrades in force (uid, model)
        self._base: dict[Pair, dict[str, object]] = {}
        self._degrades: dict[Pair, list[tuple[int, LinkModel]]] = {}
        self._disk_faults: set[str] = set()
        #: uids of the occurrences that stay in force into the liveness phase, and the
        #: nodes they hold crashed or frozen (heal_all leaves those alone)
        self._kept: set[int] = set()
        self._keep = False  # the fault being scheduled or run is kept
        self._held: dict[str, str] = {}  # node -> "crash" | "freeze" | "disk"
        #: nodes crashed by a kept fault that never ends: dead for good
        self.gone: list[str] = []
        #: nodes revoked by a ``revoke`` fault (from when the edge signed the list)
        self.revoked: list[str] = []
        #: kept faults are scheduled up to here (the liveness phase's deadline)
        self.until_ms = sc.duration_s * 1000 + sc.converge_timeout_s * 1000
        #: when the last kept occurrence ends (or starts, if it has no end): the
        #: liveness phase judges convergence only from here
        self.kept_until_ms = 0.0
        self.intervals: list[Interval] = []
        self.crashes = 0
        self.restarts = 0
        self.closed = False
        self.last_heal_ms = 0.0

    # --- helpers --------------------------------------------------------------------------

    def _pair(self, a: str, b: str) -> Pair:
        return (a, b) if self.order[a] < self.order[b] else (b, a)

    def _pairs(self, xs: list[str], ys: list[str]) -> list[Pair]:
        out: list[Pair] = []
        for a in xs:
            for b in ys:
                if a != b and (a, b) in self.world.links:
                    p = self._pair(a, b)
                    if p not in out:
                        out.append(p)
        return out

    def _at(self, t_ms: float, fn: Callable[[], None]) -> None:
        keep = self._keep

        def guarded() -> None:
            if self.closed and not keep:
                return
            outer, self._keep = self._keep, keep
            try:
                fn()
            finally:
                self._keep = outer
        self.world.at(t_ms, guarded)

    def cut(self, pair: Pair, uid: int) -> None:
        users = self._cuts.setdefault(pair, [])
        users.append(uid)
        if len(users) == 1:
            self.world.set_link(pair[0], pair[1], False)

    def uncut(self, pair: Pair, uid: int) -> None:
        users = self._cuts.get(pair, [])
        if uid in users:
            users.remove(uid)
            if not users:
                del self._cuts[pair]
                self.world.set_link(pair[0], pair[1], True)

    def cut_all(self, pairs: list[Pair], uid: int) -> None:
        for p in pairs:
            self.cut(p, uid)

    def uncut_all(self, pairs: list[Pair], uid: int) -> None:
        for p in pairs:
            self.uncut(p, uid)

    def _hole(self, a: str, b: str, uid: int, on: bool) -> None:
        users = self._holes.setdefault((a, b), [])
        if on:
            users.append(uid)
        elif uid in users:
            users.remove(uid)
        self.world.links[(a, b)].blackhole = bool(users)
        if not users:
            del self._holes[(a, b)]

    def partitioned(self) -> bool:
        return bool(self._cuts) or bool(self._holes)

    # --- scheduling ---------------------------------------------------------------------------

    def schedule(self, faults: tuple[FaultSpec, ...]) -> None:
        end_ms = self.sc.duration_s * 1000
        uid = 0
        for f in faults:
            # After the safety phase only a kept fault happens (the heal ends the rest).
            until = self.until_ms if f.liveness else end_ms
            starts = f.occurrences(until / 1000)
            self._keep = f.liveness
            for at_s in starts:
                uid += 1
                at = at_s * 1000
                if f.liveness:
                    self._kept.add(uid)
                    self.kept_until_ms = max(self.kept_until_ms,
                                             at + (f.duration_s or 0.0) * 1000)
                self._schedule_one(uid, f, at, None if f.duration_s is None
                                   else at + f.duration_s * 1000)
            self._keep = False
            if f.liveness and f.kind == "crash" and f.duration_s is None and starts:
                for n in resolve(f.nodes, self.sc.nodes):
                    if n not in self.gone:
                        self.gone.append(n)

    def _schedule_one(self, uid: int, f: FaultSpec, at: float, end: float | None) -> None:
        nodes = self.sc.nodes
        sel = resolve(f.nodes, nodes) if f.nodes else []
        interval = Interval(f.kind, f.label or f.kind, at, end, f.liveness)
        if f.kind in CUTTING or f.kind == "crash":
            self._at(at, lambda: self.intervals.append(interval))
        if f.kind == "partition":
            groups = [resolve(g, nodes) for g in f.groups]
            listed = [n for g in groups for n in g]
            rest = [n for n in self.sc.node_ids() if n not in listed]
            if rest:
                groups.append(rest)
            pairs: list[Pair] = []
            for i, g in enumerate(groups):
                for h in groups[i + 1:]:
                    pairs += [p for p in self._pairs(g, h) if p not in pairs]
            self._cut_window(uid, pairs, at, end, interval)
        elif f.kind == "isolate":
            self._cut_window(uid, self._pairs(sel, self.sc.node_ids()), at, end, interval)
        elif f.kind == "link_down":
            self._cut_window(uid, self._pairs(sel, resolve(f.to, nodes)), at, end, interval)
        elif f.kind == "asymmetric":
            self._asymmetric(uid, sel, resolve(f.to, nodes), f.detect_s * 1000, at, end,
                             interval)
        elif f.kind == "flap":
            assert end is not None
            self._flap(uid, f, self._pairs(sel, self.sc.node_ids()), at, end, interval)
        elif f.kind == "crash":
            for n in sel:
                self._crash(n, at, end, f.mid_sale, interval)
        elif f.kind == "restart":
            for n in sel:
                self._at(at, partial(self._restart, n, "restart"))
        elif f.kind == "clock_jump":
            for n in sel:
                self._at(at, partial(self._jump, n, f.skew_ms))
        elif f.kind == "degrade":
            assert f.link is not None
            self._degrade(uid, f, sel, at, end)
        elif f.kind == "heal":
            self._at(at, self._heal_cuts)
        elif f.kind == "enrol":
            for n in sel:
                self._at(at, partial(self._enrol, n))
        elif f.kind == "revoke":
            self._at(at, partial(self._revoke, sel))
        elif f.kind in ("retry_crash", "disk_slow", "disk_full", "disk_error", "freeze"):
            for n in sel:
                self._driver_fault(f, n, at, end, interval)

    def _cut_window(self, uid: int, pairs: list[Pair], at: float, end: float | None,
                    interval: Interval) -> None:
        def up() -> None:
            self.uncut_all(pairs, uid)
            self._healed(interval)
        self._at(at, partial(self.cut_all, pairs, uid))
        if end is not None:
            self._at(end, up)

    def _asymmetric(self, uid: int, src: list[str], dst: list[str], detect_ms: float,
                    at: float, end: float | None, interval: Interval) -> None:
        """One direction eats everything while both ends still think the session lives;
        the transport's heartbeat notices after ``detect_ms`` and the session drops (and
        cannot re-open: a handshake needs both directions) until the heal."""
        directed = [(a, b) for a in src for b in dst if a != b and (a, b) in self.world.links]
        pairs = self._pairs(src, dst)
        state = {"cut": False, "over": False}

        def start() -> None:
            for a, b in directed:
                self._hole(a, b, uid, True)

        def detect() -> None:
            if not state["over"]:
                state["cut"] = True
                self.cut_all(pairs, uid)

        def stop() -> None:
            state["over"] = True
            for a, b in directed:
                self._hole(a, b, uid, False)
            if state["cut"]:
                self.uncut_all(pairs, uid)
            self._healed(interval)
        self._at(at, start)
        if end is None or at + detect_ms < end:
            self._at(at + detect_ms, detect)
        if end is not None:
            self._at(end, stop)

    def _flap(self, uid: int, f: FaultSpec, pairs: list[Pair], at: float, end: float,
              interval: Interval) -> None:
        down = partial(self.cut_all, pairs, uid)
        up = partial(self.uncut_all, pairs, uid)
        t = at
        while t < end:
            d_end = min(t + self.rng.uniform(*f.down_s) * 1000, end)
            self._at(t, down)
            self._at(d_end, up)
            t = d_end + self.rng.uniform(*f.up_s) * 1000
        self._at(end, lambda: self._healed(interval))

    def _crash(self, node: str, at: float, end: float | None, mid_sale: bool,
               interval: Interval) -> None:
        def crash() -> None:
            n = self.world.nodes[node]
            if not n.alive:
                return
            if mid_sale:
                # A sale goes in, and the power goes before its fsync completes.
                self.mid_sale(node)
                self._at(self.world.now + n.disk.fsync_ms / 2, lambda: self._do_crash(node))
            else:
                self._do_crash(node)
        self._at(at, crash)
        if end is not None:
            self._at(end, lambda: self._restart(node, interval.label, interval))

    def _enrol(self, node: str) -> None:
        """A join mid-run; while the edge is down the till waits and tries again."""
        if not self.world.enrol(node):
            self._at(self.world.now + ENROL_RETRY_MS, partial(self._enrol, node))

    def _revoke(self, nodes: list[str]) -> None:
        """A revocation mid-run, done on the edge (again later while it is down)."""
        if not self.world.revoke(nodes):
            self._at(self.world.now + ENROL_RETRY_MS, partial(self._revoke, nodes))
            return
        for n in nodes:
            if n not in self.revoked:
                self.revoked.append(n)

    def excluded(self) -> list[str]:
        """Nodes the end checks leave out: gone for good, revoked, never enrolled."""
        out = [*self.gone, *self.revoked]
        out += [n for n, node in self.world.nodes.items() if not node.enrolled]
        return list(dict.fromkeys(out))

    def _jump(self, node: str, skew_ms: float) -> None:
        """The node's wall clock steps (NTP correction, a dead RTC battery)."""
        self.world.nodes[node].skew_ms = skew_ms

    def _do_crash(self, node: str) -> None:
        n = self.world.nodes[node]
        if n.alive:
            self.crashes += 1
            n.crash()
            if self._keep:
                self._held[node] = "crash"

    def _restart(self, node: str, label: str, interval: Interval | None = None) -> None:
        n = self.world.nodes[node]
        if self._held.get(node) == "crash" and not self._keep:
            return  # a kept fault holds it down; only its own end restarts it
        if not n.alive and n.enrolled:
            self._held.pop(node, None)
            self.restarts += 1
            n.restart()
            if interval is not None:
                self._healed(interval)
            else:
                self.last_heal_ms = self.world.now
                self.on_heal(label)

    def _degrade(self, uid: int, f: FaultSpec, sel: list[str], at: float,
                 end: float | None) -> None:
        assert f.link is not None
        spec = f.link
        targets = [k for k in self.world.links
                   if (not sel or k[0] in sel or k[1] in sel)
                   and (f.link_class in (None, "any") or self.world.links[k].kind == f.link_class)]

        def start() -> None:
            for k in targets:
                link = self.world.links[k]
                if k not in self._base:
                    self._base[k] = {a: getattr(link, a) for a in _PHYSICS}
                # from the fault's nodes: outbound; only to them: inbound
                inbound = bool(sel) and k[0] not in sel
                self._degrades.setdefault(k, []).append(
                    (uid, link_model(spec, link.kind, inbound)))
                self._physics(k)

        def stop() -> None:
            for k in targets:
                active = self._degrades.get(k, [])
                self._degrades[k] = [(u, m) for u, m in active if u != uid]
                self._physics(k)
        self._at(at, start)
        if end is not None:
            self._at(end, stop)

    def _physics(self, k: Pair) -> None:
        """Invariant 4: the newest degrade in force, else the link's own physics."""
        link = self.world.links[k]
        active = self._degrades.get(k)
        if active:
            model = active[-1][1]
            for a in _PHYSICS:
                setattr(link, a, getattr(model, a))
            return
        for a, v in self._base.pop(k, {}).items():
            setattr(link, a, v)
        self._degrades.pop(k, None)

    # --- driver-level faults --------------------------------------------------------------

    def _driver_fault(self, f: FaultSpec, node: str, at: float, end: float | None,
                      interval: Interval) -> None:
        n = self.world.nodes[node]
        disk = n.disk
        if f.kind == "retry_crash":
            self._at(at, lambda: self.intervals.append(interval))
            self._at(at, partial(self._retry_crash, node))
            if end is not None:
                self._at(end, lambda: self._restart(node, interval.label, interval))
            return
        if f.kind == "freeze":
            def freeze() -> None:
                n.freeze()
                if self._keep:
                    self._held[node] = "freeze"

            def thaw() -> None:
                self._held.pop(node, None)
                n.resume()
            self._at(at, freeze)
            if end is not None:
                self._at(end, thaw)
            return

        def start() -> None:
            self._disk_faults.add(node)
            if self._keep:
                self._held.setdefault(node, "disk")
            if f.kind == "disk_slow":
                disk.faults.slow_ms, disk.faults.spike_ms = f.slow_ms, f.spike_ms
                disk.faults.spike_every = f.spike_every
            elif f.kind == "disk_full":
                disk.faults.full = True
            elif f.kind == "disk_error":
                disk.faults.io_error += f.count

        def stop() -> None:
            if self._keep and self._held.get(node) == "disk":
                del self._held[node]
            if f.kind == "disk_slow":
                disk.faults.slow_ms = disk.faults.spike_ms = 0.0
                disk.faults.spike_every = 0
            elif f.kind == "disk_full":
                disk.faults.full = False
        self._at(at, start)
        if end is not None:
            self._at(end, stop)

    def _retry(self, node: str) -> None:
        self.retry(node)

    def _retry_crash(self, node: str) -> None:
        """A sale goes in; the POS, not answered yet, sends it again while the original
        is still being written; the power goes before the fsync completes."""
        n = self.world.nodes[node]
        if not n.alive or n.frozen:
            return
        self.mid_sale(node)
        fsync = n.disk.fsync_ms + n.disk.faults.slow_ms
        self._at(self.world.now + fsync / 4, lambda: self._retry(node))
        self._at(self.world.now + fsync / 2, lambda: self._do_crash(node))

    def _healed(self, interval: Interval) -> None:
        interval.end_ms = self.world.now
        self.last_heal_ms = self.world.now
        self.on_heal(interval.label)

    def _heal_cuts(self, notify: bool = True) -> None:
        for pair in list(self._cuts):
            del self._cuts[pair]
            self.world.set_link(pair[0], pair[1], True)
        for a, b in list(self._holes):
            del self._holes[(a, b)]
            self.world.links[(a, b)].blackhole = False
        for iv in self.intervals:
            if iv.end_ms is None and iv.kind != "crash":
                iv.end_ms = self.world.now
        if notify:
            self.last_heal_ms = self.world.now
            self.on_heal("heal")

    def heal_all(self) -> bool:
        """End every fault now (the start of the liveness phase) but those kept into
        it (invariant 6); True if any was active."""
        nodes = self.world.nodes.values()
        active = self.partitioned() or bool(self._base) or bool(self._disk_faults) or any(
            not n.alive or n.frozen for n in nodes)
        if not self._kept:
            self._heal_cuts(notify=active)
        else:
            self._heal_unkept(active)
        for k in list(self._degrades):
            self._degrades[k] = [(u, m) for u, m in self._degrades[k] if u in self._kept]
            self._physics(k)
        for n in nodes:
            if n.node_id in self._held:
                continue
            n.disk.faults = DiskFaults()
            n.resume()
            self._disk_faults.discard(n.node_id)
        for node in self.world.nodes:
            self._restart(node, "restart at heal")
        for iv in self.intervals:
            if iv.end_ms is None and not iv.kept:
                iv.end_ms = self.world.now
        self.closed = True
        return active

    def _heal_unkept(self, notify: bool) -> None:
        for pair in list(self._cuts):
            self._cuts[pair] = [u for u in self._cuts[pair] if u in self._kept]
            if not self._cuts[pair]:
                del self._cuts[pair]
                self.world.set_link(pair[0], pair[1], True)
        for a, b in list(self._holes):
            self._holes[(a, b)] = [u for u in self._holes[(a, b)] if u in self._kept]
            self.world.links[(a, b)].blackhole = bool(self._holes[(a, b)])
            if not self._holes[(a, b)]:
                del self._holes[(a, b)]
        if notify:
            self.last_heal_ms = self.world.now
            self.on_heal("heal")

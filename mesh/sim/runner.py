"""Run one scenario on the world: build the store, drive workload and faults, check.

A run has two phases, as TigerBeetle's VOPR does:

1. **Safety** (``0 .. duration``): workload, faults and forgeries run; the checker
   watches every apply and samples every replica (``mesh.sim.checker``).
2. **Liveness** (from ``duration``): the workload stops, every fault heals (but those
   a scenario keeps into this phase: ``liveness = true``), crashed nodes restart; once
   the last kept fault has ended, the run continues until every replica's
   ``state_digest()`` is equal (converged; a node a kept fault crashed for good is left
   out) or ``converge_timeout_s`` passes. Then the end checks run.

Every node is a real ``Replica`` + ``SyncCore`` (``mesh.sim.world``); nothing here
replicates anything. One seed drives the run: the world's generator, and from it (in a
fixed order) the generators of the workload, the fault plane and the injector.

``RunResult.to_json`` holds no wall-clock value, so the same scenario and seed give a
byte-identical report in any process.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson

from mesh.sim.byzantine import Injector
from mesh.sim.checker import NOT_REJECTIONS, Checker, Sample, percentiles
from mesh.sim.faults import FaultPlane, Interval, link_model
from mesh.sim.scenario import Scenario, random_faults, resolve
from mesh.sim.sensorwork import SensorWorkload
from mesh.sim.workload import Workload
from mesh.sim.world import World

__all__ = ["RunContext", "RunResult", "derive_seed", "run_scenario"]

#: How often the liveness phase checks for convergence (virtual ms): the resolution of
#: ``convergence_ms``.
CONVERGE_CHECK_MS = 10.0
#: Exceptions listed in the report (the full list is compared, and hashed, regardless).
MAX_LISTED_EXCEPTIONS = 20


def derive_seed(seed: int, index: int) -> int:
    """The seed of run ``index`` of a swarm started from ``seed`` (stable everywhere:
    a str seed goes through SHA-512, not ``hash()``)."""
    return random.Random(f"storemesh-swarm:{seed}:{index}").getrandbits(48)


@dataclass(slots=True)
class RunResult:
    scenario: str
    seed: int
    random_faults: bool
    duration_ms: float
    report: dict[str, Any]
    failures: list[str]
    samples: list[Sample] = field(default_factory=list)
    tracked: list[str] = field(default_factory=list)
    node_ids: list[str] = field(default_factory=list)
    roles: list[str] = field(default_factory=list)
    intervals: list[Interval] = field(default_factory=list)
    wall_s: float = 0.0  # not part of the JSON report (not deterministic)

    @property
    def ok(self) -> bool:
        return not self.failures

    def to_json(self) -> bytes:
        return orjson.dumps(self.report, option=orjson.OPT_SORT_KEYS | orjson.OPT_INDENT_2)

    def reproduce(self, path: str = "SCENARIO") -> str:
        flag = " --random-faults" if self.random_faults else ""
        return f"storemesh sim run {path} --seed {self.seed}{flag}"


@dataclass(frozen=True, slots=True)
class RunContext:
    """What a test's ``setup`` hook may reach into before the run starts."""

    world: World
    checker: Checker
    workload: Workload
    faults: FaultPlane


def build_world(sc: Scenario, seed: int) -> World:
    """The store: nodes, LAN links between the store's nodes, WAN links to the cloud."""
    w = World(seed, store_id=f"sim-{sc.name}"[:64], discovery_ms=sc.discovery_ms,
              discovery_jitter_ms=sc.discovery_jitter_ms)
    late = sc.late_nodes()
    # the checkpointer is the store's first edge, at every node (TrustStore.checkpointer)
    w.checkpointer = next((n.id for n in sc.nodes if n.role == "edge"), None)
    w.lan_codec = sc.lan_codec
    if sc.checkpoint_every_s is not None:
        w.checkpoint_every_ms = round(sc.checkpoint_every_s * 1000)
    if sc.horizon_s is not None:
        w.horizon_ms = round(sc.horizon_s * 1000)
    for n in sc.nodes:
        w.add_node(n.id, n.role, skew_ms=n.skew_ms, fsync_ms=n.fsync_ms,
                   enrolled=n.id not in late)
    return w


def _connect(w: World, sc: Scenario) -> None:
    wan_peers = resolve(sc.wan_peers, sc.nodes)
    nodes = list(sc.nodes)
    for i, a in enumerate(nodes):
        for b in nodes[i + 1:]:
            if a.site == b.site:
                w.connect(a.id, b.id, link_model(sc.lan, "lan"), link_model(sc.lan, "lan"))
            elif (a.id in wan_peers and a.site == "store") or (
                    b.id in wan_peers and b.site == "store"):
                # per direction: ``up`` is store -> cloud, ``down`` cloud -> store
                down = a.site != "store"
                w.connect(a.id, b.id, link_model(sc.wan, "wan", down),
                          link_model(sc.wan, "wan", not down))


def _tracked(sc: Scenario, skus: list[str]) -> list[str]:
    out = list(sc.hot)
    for race in sc.races:
        if race.sku not in out:
            out.append(race.sku)
    if not out:
        out = skus[:3]
    return out[:6]


def run_scenario(sc: Scenario, seed: int | None = None, *, randomise: bool = False,
                 setup: Callable[[RunContext], None] | None = None,
                 timer: Callable[[], float] | None = None) -> RunResult:
    """Run ``sc`` with ``seed`` (default: the scenario's). ``randomise`` replaces the
    fault schedule by one drawn from the seed (what a swarm run does); ``setup`` is a
    test hook called once the world is built, before anything runs. ``timer`` (e.g.
    ``time.perf_counter``, from the CLI: the simulator itself reads no clock) measures
    ``RunResult.wall_s``."""
    wall0 = timer() if timer is not None else 0.0
    seed = sc.seed if seed is None else seed
    if randomise:
        sc = sc.with_faults(random_faults(sc, random.Random(f"storemesh-faults:{seed}")))
    w = build_world(sc, seed)
    work_rng = random.Random(w.rng.random())
    fault_rng = random.Random(w.rng.random())
    byz_rng = random.Random(w.rng.random())
    end_ms = sc.duration_s * 1000

    workload = Workload(w, sc, work_rng)
    sensors = None if sc.sensors is None else SensorWorkload(
        w, sc.sensors, random.Random(f"storemesh-sensors:{seed}"), lambda: workload.skus,
        lambda: workload.stopped, sc.warmup_s * 1000, end_ms)
    checker = Checker(w, [], watch_from_ms=sc.warmup_s * 1000)
    injector = Injector(w, sc.byzantine, byz_rng, checker,
                        max(sc.warmup_s * 1000, (sc.byzantine.start_s or 0) * 1000),
                        min(end_ms, (sc.byzantine.end_s or sc.duration_s) * 1000))
    _connect(w, sc)
    faults = FaultPlane(w, sc, fault_rng, checker.healed, workload.mid_sale,
                        workload.retry_now)
    if setup is not None:
        setup(RunContext(w, checker, workload, faults))
    workload.start()
    if sensors is not None:
        sensors.start()
    checker.tracked = _tracked(sc, workload.skus)
    faults.schedule(sc.faults)
    injector.start()

    sample_ms = sc.sample_ms or min(10_000.0, max(100.0, end_ms / 3000))

    def sample() -> None:
        checker.sample(faults.partitioned())
        if w.now + sample_ms <= end_ms:
            w.after(sample_ms, sample)
    w.at(0.0, sample)

    # --- safety phase ------------------------------------------------------------------------
    w.run_until(end_ms)

    # --- liveness phase ----------------------------------------------------------------------
    workload.stop()
    injector.stop()
    faults.heal_all()
    checker.gone = faults.excluded()
    checker.sample(False)
    quiesce = w.now
    # Faults kept into the liveness phase end first (invariant 6 of mesh.sim.faults).
    judge_from = max(quiesce, faults.kept_until_ms)
    deadline = judge_from + sc.converge_timeout_s * 1000
    converged_at: float | None = None
    while True:
        if w.now >= judge_from and _converged(w, faults.excluded()):
            converged_at = w.now
            break
        if w.now >= deadline:
            break
        w.run_until(w.now + CONVERGE_CHECK_MS)
    checker.sample(False)
    checker.check_catchups()
    result = _report(sc, seed, randomise, w, workload, checker, faults, injector,
                     quiesce, converged_at)
    if sensors is not None:
        result.report["sensors"] = sensors.report()
    result.wall_s = timer() - wall0 if timer is not None else 0.0
    return result


def _converged(w: World, gone: list[str]) -> bool:
    """Every node up and holding the same state; a node a kept fault crashed for good,
    a revoked one and one never enrolled (``gone``) are left out, as the store would
    carry on without them."""
    nodes = [n for n in w.nodes.values() if n.node_id not in gone]
    if not nodes or not all(n.alive for n in nodes):
        return False
    first = nodes[0].replica.vv
    if any(n.replica.vv != first or n.replica.pending_count() for n in nodes):
        return False
    digest = nodes[0].replica.state_digest()
    return all(n.replica.state_digest() == digest for n in nodes[1:])


def _state_equal(w: World) -> bool:
    """Stock, reservations and version vectors equal everywhere (exceptions aside): tells
    "the replicas hold different data" from "they derive different exception lists"."""
    views = []
    for n in w.nodes.values():
        d = orjson.loads(n.replica.state_digest())
        d.pop("exceptions", None)
        views.append(d)
    return all(v == views[0] for v in views[1:])


def _session_refused(w: World) -> dict[str, int]:
    out: dict[str, int] = {}
    for n in w.nodes.values():
        for reason, k in n.session_refused.items():
            out[reason] = out.get(reason, 0) + k
    return dict(sorted(out.items()))


def _checkpoints(w: World, checker: Checker) -> dict[str, Any]:
    """Live checkpoints (checker invariant 7): proposed, folded where, hashes equal."""
    created = checker.checkpoints_created
    return {
        "checkpointer": w.checkpointer,
        "every_ms": w.checkpoint_every_ms,
        "horizon_ms": w.horizon_ms,
        "proposed": len(created),
        "proposed_at_ms": [round(t, 3) for t, _, _ in created[:MAX_LISTED_EXCEPTIONS]],
        "hashed": len(checker.checkpoint_hashes),
        "folded_by_node": {n: len(s) for n, s in sorted(checker.checkpoint_folds.items())},
        "hashes_identical": checker.checkpoint_mismatches == 0,
        "mismatches": checker.checkpoint_mismatches,
        # folds that differed from their ck op's fold hash or chain heads, at any node
        "fold_checks_failed": sum(n.replica.ck_mismatches for n in w.nodes.values()),
    }


def _traffic(w: World) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for key in ("messages", "bytes", "wire_bytes", "summary_bytes", "lost", "duplicated"):
        per: dict[str, int] = {"lan": 0, "wan": 0}
        for link in w.links.values():
            per[link.kind] = per.get(link.kind, 0) + getattr(link, key)
        per["total"] = sum(per.values())
        out[key] = per
    return out


def _report(sc: Scenario, seed: int, randomise: bool, w: World, workload: Workload,
            checker: Checker, faults: FaultPlane, injector: Injector, quiesce: float,
            converged_at: float | None) -> RunResult:
    acked, lost, stranded = checker.lost_ops()
    forged_left = checker.forged_in_state()
    checker.check_checkpoints()
    excluded = faults.excluded()
    live = [n for n in w.nodes.values() if n.alive and n.node_id not in excluded]
    lists = [[e.to_dict() for e in n.replica.exceptions()] for n in live]
    identical = all(x == lists[0] for x in lists[1:]) if lists else True
    exceptions = lists[0] if lists else []
    oversold = [n.replica.oversold_units() for n in live]
    # (a revoked node's alerts are about the honest nodes refusing it: not counted)
    equivocations = sum(a.kind != "checkpoint_mismatch" for n in w.nodes.values()
                        if n.node_id not in faults.revoked for a in n.alerts)
    ck_alerts = sum(a.kind == "checkpoint_mismatch" for n in w.nodes.values() for a in n.alerts)
    pending = sum(n.replica.pending_count() for n in live)
    stats = checker.stats()
    rejected = {k: v for k, v in stats.items() if k not in NOT_REJECTIONS}
    traffic = _traffic(w)
    invalid = checker.invalid_accepted + forged_left
    converged = converged_at is not None

    failures: list[str] = []
    if not converged:
        failures.append(f"did not converge within {sc.converge_timeout_s:g} s after the heal")
    checks = (("lost_ops", lost, "acknowledged operations lost"),
              ("duplicate_applies", checker.duplicate_applies, "envelopes applied twice"),
              ("out_of_order_applies", checker.out_of_order_applies,
               "envelopes applied out of order"),
              ("invalid_accepted", invalid, "forged or invalid envelopes accepted"),
              ("revoked_accepted", checker.revoked_accepted,
               "envelopes of a revoked origin above its bound accepted after the revocation"),
              ("phantom_envelopes", checker.phantom_envelopes,
               "envelopes held beyond what their origin made durable"),
              ("equivocations", equivocations, "equivocation alerts between honest nodes"),
              ("checkpoint_mismatches", checker.checkpoint_mismatches,
               "checkpoints folded to different hashes"),
              ("checkpoint_alerts", ck_alerts,
               "checkpoint folds that did not match their ck op (alerts)"),
              ("pending_at_end", pending if converged else 0, "envelopes stuck pending"))
    for _, n, text in checks:
        if n:
            failures.append(f"{n} {text}")
    if not identical:
        failures.append("replicas disagree on the oversell exception list")

    catchups = [{"label": c.label, "healed_ms": round(c.healed_ms, 3),
                 "catch_up_ms": None if c.done_ms is None else round(c.done_ms - c.healed_ms, 3)}
                for c in checker.catchups]
    report: dict[str, Any] = {
        "scenario": sc.name,
        "seed": seed,
        "random_faults": randomise,
        "ok": not failures,
        "failures": failures,
        "examples": checker.examples,
        "nodes": {"total": len(w.nodes),
                  "by_role": {r: sum(1 for n in w.nodes.values() if n.role == r)
                              for r in ("register", "edge", "cloud")}},
        "duration_ms": round(sc.duration_s * 1000, 3),
        "converged": converged,
        "state_converged": converged or _state_equal(w),
        "convergence_ms": None if converged_at is None else round(converged_at - quiesce, 3),
        "quiesce_ms": round(quiesce, 3),
        "last_heal_ms": round(faults.last_heal_ms, 3),
        "heal_catch_up": catchups,
        "acked_ops": acked,
        "lost_ops": lost,
        "stranded_ops": stranded,
        "gone_nodes": list(faults.gone),
        "revoked_nodes": list(faults.revoked),
        "revoked_accepted": checker.revoked_accepted,
        "enrolled_mid_run": [n for n in sc.late_nodes() if w.nodes[n].enrolled],
        "duplicate_applies": checker.duplicate_applies,
        "out_of_order_applies": checker.out_of_order_applies,
        "invalid_accepted": invalid,
        "forged_injected": dict(sorted(injector.injected.items())),
        "rejected": rejected,
        "duplicates_ignored": stats.get("duplicate", 0),
        "session_refused": _session_refused(w),
        "phantom_envelopes": checker.phantom_envelopes,
        "equivocations": equivocations,
        "pending_at_end": pending,
        "oversold_units": oversold[0] if oversold else 0,
        "oversold_units_by_replica_identical": len(set(oversold)) <= 1,
        "exceptions_identical": identical,
        "exception_count": len(exceptions),
        "exceptions": exceptions[:MAX_LISTED_EXCEPTIONS],
        "exceptions_sha256": hashlib.sha256(orjson.dumps(exceptions)).hexdigest(),
        "checkpoints": _checkpoints(w, checker),
        "messages": traffic["messages"],
        "bytes": traffic["bytes"],
        "wire_bytes": traffic["wire_bytes"],
        "summary_bytes": traffic["summary_bytes"],
        "lost_messages": traffic["lost"],
        "duplicated_messages": traffic["duplicated"],
        "tracked_skus": checker.tracked,
        "peak_divergence": checker.peak_divergence,
        "peak_divergence_partitioned": checker.peak_divergence_partitioned,
        "peak_divergence_at_ms": None if checker.peak_at_ms is None
        else round(checker.peak_at_ms, 3),
        "peak_divergence_sku": checker.peak_sku,
        "sync_lag_ms": percentiles(checker.lags),
        "commands": {k: {"ok": c.ok, "refused": c.refused, "offline": c.offline}
                     for k, c in sorted(workload.counts.items())},
        "crashes": faults.crashes,
        "restarts": faults.restarts,
        "unacked_at_crash": workload.unacked_at_crash,
        "retried_after_restart": workload.retried,
        "faults": [{"kind": iv.kind, "label": iv.label, "start_ms": round(iv.start_ms, 3),
                    "end_ms": None if iv.end_ms is None else round(iv.end_ms, 3)}
                   for iv in faults.intervals],
        "events": w.events,
        "final_digest": None if not converged
        else hashlib.sha256(live[0].replica.state_digest()).hexdigest(),
        "envelopes": live[0].replica.vv.total() if live else 0,
    }
    return RunResult(sc.name, seed, randomise, sc.duration_s * 1000, report, failures,
                     checker.samples, checker.tracked, list(w.nodes),
                     [n.role for n in w.nodes.values()], faults.intervals)

"""Sensor streams as a workload of the simulated world: try reconciliation rules on a
whole store (registers selling, the LAN and WAN, faults) before rollout.

Where ``mesh.sim.sensors`` drives the pure ``mesh.core.reconcile`` alone, this runs on
``mesh.sim.world``: the sensor registry is written at the edge as real signed catalog
envelopes, reconciliation reads the edge replica's ``on_hand`` (which lags registers'
sales as sync does), and every outcome is a real command on the edge's driver
(``reviews.auto_adjust``, ``open_item``, ``resolve``) that replicates like any other.
The decisions are the ones ``mesh.http.sensor_routes.SensorService`` takes: the same
``reconcile_sku``, the same stable txn ids, one open item per (SKU, why), a drift item
per sensor per day, a count that agrees settling the SKU's count requests.

**Ground truth.** The units physically on each shelf: every acknowledged stock change
(the cumulative PN entries of acknowledged envelopes, so a replay or a retry counts
once) moves it, except reconciliation's own corrections (``sensor_reconcile``,
``review_accept``), which fix the ledger, not the shelf; shrink (units vanishing
without a sale) moves only the truth. An automatic adjustment is *false* when its
estimate is not the truth at that moment.

**Faults** (``[sensors]`` in the scenario, docs/simulation.md): noise on every scale
and missed RFID tags, vision estimates ±1 with the model's confidence, ``drifting``
scales (+``drift_g_per_hour``), ``failing`` scales (stuck at 0 from ``failing_from_s``),
``mismapped`` RFID readers (registered for one SKU, reading another shelf). Staff work
the queue: an open ``sensor_disagree`` item older than ``review_delay_s`` is resolved
with a count (``count``), and the count (the truth) is posted as a reading; drift items
are acknowledged (``reject``) after the same delay.

Invariants:
 1. Every random choice comes from the generator given at construction (derived from
    the run seed apart from the world's, so adding ``[sensors]`` to a scenario does not
    change the draws of its other parts), in event order: same seed, same report.
 2. Nothing here replicates or applies anything: commands go through ``SimNode.command``.
 3. After the workload stops (the liveness phase) no reading or command is issued.
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import orjson

from mesh import config
from mesh.core import reviews
from mesh.core.envelope import Envelope
from mesh.core.reconcile import DEFAULT_RULES, Outcome, Rules, reconcile_sku
from mesh.core.replica import CommandResult, Replica
from mesh.core.sensors import Reading, SensorInfo, make_sensor_update, registry
from mesh.errors import CommandError
from mesh.sim.world import SimNode, World

__all__ = ["SensorSpec", "SensorWorkload"]

_DAY_MS = 86_400_000
#: Corrections of the ledger, not movements of goods (they do not move the truth).
_CORRECTIONS = ("sensor_reconcile", "review_accept")
_ZONE = 20  # SKUs per zone (one RFID reader each would cover them; one count sheet)


@dataclass(frozen=True, slots=True)
class SensorSpec:
    """The ``[sensors]`` table of a scenario (docs/simulation.md, "Sensor streams")."""

    node: str
    skus: int = 40
    vision_share: float = 0.3
    every_s: float = 30.0
    reconcile_every_s: float = 60.0
    unit_grams: float = 250.0
    scale_noise_g: float = 15.0
    rfid_miss: float = 0.02
    shrink_per_sku_hour: float = 0.05
    drifting: int = 1
    drift_g_per_hour: float = 600.0
    failing: int = 1
    failing_from_s: float = 300.0
    mismapped: int = 1
    review_delay_s: float = 300.0
    rules: str = "{}"  # JSON (merged over DEFAULT_RULES), checked when the scenario loads

    def rules_doc(self) -> dict[str, Any]:
        doc: dict[str, Any] = {**DEFAULT_RULES, **orjson.loads(self.rules)}
        return doc


class SensorWorkload:
    """Sensors, shrink, reconciliation runs and staff at one edge of the world."""

    def __init__(self, world: World, spec: SensorSpec, rng: random.Random,
                 skus: Callable[[], list[str]], stopped: Callable[[], bool],
                 warmup_ms: float, end_ms: float) -> None:
        self.world = world
        self.spec = spec
        self.rng = rng
        self.rules = Rules.from_dict(spec.rules_doc())
        self._skus = skus
        self._stopped = stopped
        self.warmup_ms = warmup_ms
        self.end_ms = end_ms
        self.truth: dict[str, int] = {}
        #: (origin, sku) -> (seq, p - n) of the newest acknowledged envelope touching it
        self._cum: dict[tuple[str, str], tuple[int, int]] = {}
        self._count_of: dict[str, str] = {}  # sku -> the count sheet (sensor) of its zone
        self.moved: dict[str, int] = {}  # sku -> the edge's last stock movement (ms)
        self.per_sku: dict[str, list[str]] = {}
        self.history: dict[str, deque[Reading]] = {}
        self.drift: set[str] = set()
        self.failing: set[str] = set()
        self.mismap: dict[str, str] = {}
        self._registry: tuple[bytes, dict[str, SensorInfo]] | None = None
        self._seq = 0
        self.r: dict[str, Any] = {
            "readings": 0, "checks": 0, "auto": 0, "false_auto": 0, "warn": 0, "ok": 0,
            "reviews_opened": {}, "shrink_events": 0, "shrink_units": 0,
            "flagged_drifting": [], "false_auto_examples": [], "refused_commands": 0}
        world.observers.append(self._observe)

    @property
    def edge(self) -> SimNode:
        return self.world.nodes[self.spec.node]

    # --- ground truth ---------------------------------------------------------------------

    def _observe(self, kind: str, data: dict[str, object]) -> None:
        if data.get("node") == self.spec.node and kind in ("created", "applied"):
            raw = data.get("envelopes") or (data.get("envelope"),)
            envs: tuple[Envelope, ...] = raw if isinstance(raw, tuple) else ()
            for e in envs:
                at = e.hlc >> 16
                for op in e.ops:
                    if op.get("t") == "pn" and at > self.moved.get(op["sku"], -1):
                        self.moved[op["sku"]] = at  # as SensorService.on_envelopes
            return
        if kind != "acked":
            return
        res = data["result"]
        env = getattr(res, "envelope", None)
        if env is None:
            return
        correction = env.meta.get("reason") in _CORRECTIONS
        for op in env.ops:
            if op.get("t") != "pn":
                continue
            key = (op["r"], op["sku"])
            seq, before = self._cum.get(key, (0, 0))
            if env.seq <= seq:
                continue  # a replay acknowledged again: its goods moved once
            value = op["p"] - op["n"]
            self._cum[key] = (env.seq, value)
            if not correction:
                self.truth[op["sku"]] = self.truth.get(op["sku"], 0) + value - before

    # --- set-up ---------------------------------------------------------------------------

    def start(self) -> None:
        self.world.at(max(10.0, self.warmup_ms / 2), self._register)
        self.world.at(self.warmup_ms, self._tick)
        self.world.at(self.warmup_ms + self.spec.reconcile_every_s * 1000, self._reconcile)

    def _register(self) -> None:
        sp = self.spec
        skus = self._skus()[: sp.skus]
        edge = self.edge
        cal = edge.clock() - 10 * _DAY_MS
        entries: dict[str, dict[str, Any]] = {}
        for i, sku in enumerate(skus):
            zone = f"z{i // _ZONE}"
            ids = [f"scale-{i}", f"rfid-{i}"]
            entries[ids[0]] = {"kind": "weight", "zone": zone, "skus": [sku],
                               "unit_grams": sp.unit_grams, "calibrated_ms": cal}
            entries[ids[1]] = {"kind": "rfid", "zone": zone, "skus": [sku],
                               "calibrated_ms": cal}
            if self.rng.random() < sp.vision_share:
                ids.append(f"cam-{i}")
                entries[ids[2]] = {"kind": "vision", "zone": zone, "skus": [sku],
                                   "calibrated_ms": cal, "drift_tolerance": 0.1}
            self.per_sku[sku] = ids
            self._count_of[sku] = f"count-{zone}"
        for z in range(0, len(skus), _ZONE):
            entries[f"count-z{z // _ZONE}"] = {"kind": "count", "zone": f"z{z // _ZONE}",
                                               "skus": skus[z: z + _ZONE],
                                               "calibrated_ms": cal}
        faulty = self.rng.sample(skus, min(len(skus), sp.drifting + sp.failing + sp.mismapped))
        idx = {s: i for i, s in enumerate(skus)}
        self.drift = {f"scale-{idx[s]}" for s in faulty[: sp.drifting]}
        self.failing = {f"scale-{idx[s]}" for s in faulty[sp.drifting: sp.drifting + sp.failing]}
        self.mismap = {f"rfid-{idx[s]}": self.rng.choice([x for x in skus if x != s] or skus)
                       for s in faulty[sp.drifting + sp.failing:]}
        for sid, entry in entries.items():
            self.history[sid] = deque(maxlen=config.SENSOR_READINGS_KEPT)
            self._command(partial(_register_sensor, sid, entry, edge))

    def _command(self, fn: Callable[[Replica], CommandResult],
                 on_new: Callable[[], None] | None = None) -> bool:
        """Run ``fn`` at the edge; ``on_new`` once it is acknowledged and not a replay."""
        edge = self.edge
        if not edge.alive or edge.frozen:
            return False

        def acked(res: CommandResult) -> None:
            if on_new is not None and not res.duplicate and not self._stopped():
                on_new()
        try:
            edge.command(fn, acked)
        except CommandError:
            self.r["refused_commands"] += 1
            return False
        return True

    # --- the shelves and their sensors ----------------------------------------------------

    def _tick(self) -> None:
        if self._stopped():
            return
        sp = self.spec
        now_world = self.world.now
        at = self.edge.clock()
        p_shrink = sp.shrink_per_sku_hour * sp.every_s / 3600
        for sku, ids in self.per_sku.items():
            if self.rng.random() < p_shrink and self.truth.get(sku, 0) > 0:
                lost = min(self.truth[sku], self.rng.randint(1, 3))
                self.truth[sku] -= lost
                self.r["shrink_events"] += 1
                self.r["shrink_units"] += lost
            for sid in ids:
                self._read(sid, sku, at - self.rng.randint(0, 2_000), now_world)
        self.world.after(sp.every_s * 1000, self._tick)

    def _read(self, sid: str, sku: str, at: int, now_world: float) -> None:
        sp = self.spec
        shelf = max(0, self.truth.get(self.mismap.get(sid, sku), 0))
        conf = None
        if sid.startswith("scale-"):
            grams = shelf * sp.unit_grams + self.rng.gauss(0, sp.scale_noise_g)
            if sid in self.drift:
                grams += sp.drift_g_per_hour * (now_world - self.warmup_ms) / 3_600_000
            if sid in self.failing and now_world >= sp.failing_from_s * 1000:
                grams = 0.0
            value, kind = max(0.0, grams), "weight"
        elif sid.startswith("rfid-"):
            value = float(sum(1 for _ in range(shelf) if self.rng.random() > sp.rfid_miss))
            kind = "rfid"
        else:
            value = float(max(0, shelf + self.rng.choice((-1, 0, 0, 0, 1))))
            conf, kind = round(self.rng.uniform(0.6, 0.95), 2), "vision"
        self._add(Reading(self._rid(), sid, kind, sku, value, at, conf))

    def _rid(self) -> str:
        self._seq += 1
        return f"sim-{self._seq}"

    def _add(self, reading: Reading) -> None:
        self.history[reading.sensor].append(reading)
        self.r["readings"] += 1

    # --- reconciliation (as SensorService._reconcile) ------------------------------------

    def sensors(self) -> dict[str, SensorInfo]:
        doc = self.edge.replica.catalog
        state = doc.get_state()
        if self._registry is None or self._registry[0] != state:
            self._registry = (state, registry(doc))
        return self._registry[1]

    def _reconcile(self) -> None:
        if self._stopped():
            return
        self.world.after(self.spec.reconcile_every_s * 1000, self._reconcile)
        edge = self.edge
        if not edge.alive or edge.frozen:
            return
        now = edge.clock()
        self._staff(now)
        sensors = self.sensors()
        budget = config.RECONCILE_MAX_ACTIONS
        for sku, ids in sorted(self.per_sku.items()):
            if budget <= 0:
                break
            hist = {sid: sorted((x for x in self.history[sid] if x.sku == sku),
                                key=lambda x: (x.at_ms, x.id))
                    for sid in [*ids, *self._count_sensors(sku)] if sid in sensors}
            hist = {sid: rs for sid, rs in hist.items() if rs}  # as SensorState.by_sku
            if not hist:
                continue
            out = reconcile_sku(sku, edge.replica.on_hand(sku), hist, sensors, self.rules,
                                now, self.moved.get(sku))
            self.r["checks"] += 1
            budget -= self._act(out, sensors, now)

    def _count_sensors(self, sku: str) -> list[str]:
        sid = self._count_of.get(sku)
        return [] if sid is None else [sid]

    def _open(self, sku: str, why: str, mark: str | None = None) -> bool:
        return any(i.why == why and (mark is None or mark in i.evidence)
                   for i in self.edge.replica.reviews.open_items(sku))

    def _opened(self, why: str) -> None:
        opened = self.r["reviews_opened"]
        opened[why] = opened.get(why, 0) + 1

    def _act(self, out: Outcome, sensors: dict[str, SensorInfo], now: int) -> int:
        n = 0
        for sid in out.drifting:
            if sid not in self.r["flagged_drifting"]:
                self.r["flagged_drifting"].append(sid)
            if not self._open(out.sku, "sensor_drift", sid):
                txn = reviews.stable_txn("drift", sid, out.sku, now // _DAY_MS)
                if self._command(partial(_open_item, out.sku, "sensor_drift", 0, 0, [sid],
                                         sensors[sid].zone, now, txn),
                                 partial(self._opened, "sensor_drift")):
                    n += 1
        if out.action == "auto":
            assert out.estimate is not None
            txn = reviews.stable_txn("rec", out.sku, out.expected, out.evidence)
            truth = self.truth.get(out.sku, 0)  # the shelf when the edge decided
            if self._command(partial(_auto, out, now, txn),
                             partial(self._auto_done, out, truth, now)):
                n += 1
        elif out.action == "review" and not self._open(out.sku, "sensor_disagree"):
            zone = next((sensors[s.sensor].zone for s in out.signals), None)
            txn = reviews.stable_txn("rv", out.sku, out.expected, out.evidence)
            if self._command(partial(_open_item, out.sku, "sensor_disagree", out.delta,
                                     out.score, list(out.evidence), zone, now, txn),
                             partial(self._opened, "sensor_disagree")):
                n += 1
        elif out.action == "warn":
            self.r["warn"] += 1
        elif out.action == "ok":
            self.r["ok"] += 1
        if out.action in ("ok", "auto") and any(
                s.kind == "count" and s.agrees for s in out.signals):
            for item in self.edge.replica.reviews.open_items(out.sku):
                if item.why == "count_requested":
                    self._command(partial(_resolve, item.id, "accept", now,
                                          reviews.stable_txn("cnt", item.id)))
        return n

    def _auto_done(self, out: Outcome, truth: int, now: int) -> None:
        self.r["auto"] += 1
        if out.estimate != truth:
            self.r["false_auto"] += 1
            if len(self.r["false_auto_examples"]) < 5:
                self.r["false_auto_examples"].append(
                    {"sku": out.sku, "truth": truth, "at_ms": now, **out.to_dict()})

    def _staff(self, now: int) -> None:
        """Staff work the queue after ``review_delay_s``: a count for a disagreement
        (the truth, posted as a count reading), an acknowledgement for a drift item."""
        delay = self.spec.review_delay_s * 1000
        for item in self.edge.replica.reviews.open_items():
            if now - item.opened < delay or item.sku not in self.per_sku:
                continue
            if item.why == "sensor_disagree":
                if self._command(partial(_resolve, item.id, "count", now,
                                         reviews.stable_txn("staff", item.id))):
                    for sid in self._count_sensors(item.sku):
                        self._add(Reading(self._rid(), sid, "count", item.sku,
                                          float(max(0, self.truth.get(item.sku, 0))), now))
            elif item.why == "sensor_drift":
                self._command(partial(_resolve, item.id, "reject", now,
                                      reviews.stable_txn("staff", item.id)))

    # --- the report -----------------------------------------------------------------------

    def report(self) -> dict[str, Any]:
        r = dict(self.r)
        disagree = r["reviews_opened"].get("sensor_disagree", 0)
        decided = r["auto"] + disagree
        r["auto_share"] = round(r["auto"] / decided, 4) if decided else None
        r["false_auto_per_1000_auto"] = (round(1000 * r["false_auto"] / r["auto"], 2)
                                         if r["auto"] else 0.0)
        r["false_auto_per_1000_checks"] = round(1000 * r["false_auto"]
                                                / max(r["checks"], 1), 3)
        r["reviews_opened"] = dict(sorted(r["reviews_opened"].items()))
        r["review_items_opened"] = sum(r["reviews_opened"].values())
        r["flagged_drifting"] = sorted(r["flagged_drifting"])
        faulty = sorted(self.drift | self.failing | set(self.mismap))
        r["faults"] = {"drifting": sorted(self.drift), "failing": sorted(self.failing),
                       "mismapped": dict(sorted(self.mismap.items()))}
        r["faulty_flagged"] = sum(1 for s in faulty if s in r["flagged_drifting"])
        r["faulty_sensors"] = len(faulty)
        edge = self.edge
        r["ledger_off_at_end"] = sum(
            1 for s in self.per_sku if edge.replica.on_hand(s) != self.truth.get(s, 0))
        r["skus"] = len(self.per_sku)
        r["sensors"] = sum(len(v) for v in self.per_sku.values())
        return r


# --- the commands (each runs on the edge's real replica through its driver) -------------


def _register_sensor(sid: str, entry: dict[str, Any], node: SimNode, r: Replica
                     ) -> CommandResult:
    from mesh.core.crdt import HLC

    now = node.clock()
    update = make_sensor_update(r.catalog, sid, entry, rev=HLC(r.hlc.last).now(now),
                                by=r.node_id)
    return r.update_catalog(update, txn=f"sensor-{sid}", now_ms=now,
                            note=f"sensor:{sid}"[: config.MAX_TEXT_LEN])


def _open_item(sku: str, why: str, delta: int, score: int, evidence: list[str],
               zone: str | None, now: int, txn: str, r: Replica) -> CommandResult:
    return reviews.open_item(r, sku=sku, why=why, delta=delta, score=score,
                             evidence=evidence, zone=zone, now_ms=now, txn=txn)


def _auto(out: Outcome, now: int, txn: str, r: Replica) -> CommandResult:
    return reviews.auto_adjust(r, sku=out.sku, delta=out.delta, score=out.score,
                               readings=list(out.evidence), rule=out.rule, now_ms=now,
                               txn=txn)


def _resolve(rid: str, resolution: str, now: int, txn: str, r: Replica) -> CommandResult:
    return reviews.resolve(r, rid, resolution, now_ms=now, txn=txn)

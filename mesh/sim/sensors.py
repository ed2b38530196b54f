"""Sensor streams as a workload: try reconciliation rules before rollout.

A seeded, deterministic harness over the *pure* reconciliation (``mesh.core.reconcile``): it
does not run replicas or the network (``mesh.sim.world`` does that for replication);
the ledger's expectation per SKU is an integer that sales, receipts and accepted
adjustments move, and the simulated ground truth is another that shrink moves too.

Each SKU has a shelf scale and an RFID reader (some also a vision camera), with noise;
the fault modes of the issue are injected: a scale that **drifts**, a **failing**
sensor (stuck at zero), a **mis-mapped** sensor (reporting another shelf). Staff work
the review queue: an item is resolved after ``review_delay_min`` by a manual count
(the truth). The report: auto-reconciled share, false auto-adjustments (an automatic
adjustment to a value that was not the truth) per 1,000 automatic adjustments and per
1,000 SKU-checks, review items opened, drift flags, shrink caught.

    python -m mesh.sim.sensors [--seed 7] [--skus 200] [--hours 24] [--rules FILE]

Invariants:
 1. Same seed and rules, same report (one ``random.Random``; no clock).
 2. The harness calls ``reconcile_sku`` exactly as the edge does (``mesh.http.sensor_routes``):
    the newest readings per sensor, a bounded history, ``now``.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mesh import config
from mesh.core.reconcile import DEFAULT_RULES, Rules, reconcile_sku
from mesh.core.sensors import Reading, SensorInfo

__all__ = ["Scenario", "run"]

T0 = 1_790_000_000_000
MIN = 60_000


@dataclass
class Scenario:
    seed: int = 7
    skus: int = 200
    hours: float = 24.0
    reconcile_every_min: int = 5
    sales_per_sku_hour: float = 0.5
    shrink_per_sku_day: float = 0.3
    scale_noise_g: float = 15.0
    unit_grams: float = 250.0
    rfid_miss: float = 0.02  # chance a tag is not read
    vision_share: float = 0.3
    drifting: int = 2  # scales that drift
    drift_g_per_hour: float = 40.0
    failing: int = 2  # sensors stuck at 0
    mismapped: int = 1  # RFID readers reporting another SKU's shelf
    review_delay_min: int = 30
    rules: dict[str, Any] = field(default_factory=lambda: DEFAULT_RULES)


def _sensors(sc: Scenario, rng: random.Random) -> tuple[dict[str, SensorInfo],
                                                        dict[str, list[str]]]:
    sensors: dict[str, SensorInfo] = {}
    per_sku: dict[str, list[str]] = {}
    cal = T0 - 10 * 86_400_000
    for i in range(sc.skus):
        sku = f"SKU{i:04d}"
        ids = [f"scale-{i}", f"rfid-{i}"]
        sensors[ids[0]] = SensorInfo(ids[0], "weight", f"z{i // 20}", (sku,), sc.unit_grams,
                                     0.0, cal, 0.05, None, "active")
        sensors[ids[1]] = SensorInfo(ids[1], "rfid", f"z{i // 20}", (sku,), None, 0.0, cal,
                                     0.05, None, "active")
        if rng.random() < sc.vision_share:
            ids.append(f"cam-{i}")
            sensors[ids[2]] = SensorInfo(ids[2], "vision", f"z{i // 20}", (sku,), None, 0.0,
                                         cal, 0.1, None, "active")
        per_sku[sku] = ids
    return sensors, per_sku


def run(sc: Scenario) -> dict[str, Any]:
    """Run the scenario; returns the report (invariant 1)."""
    rng = random.Random(sc.seed)
    rules = Rules.from_dict(sc.rules)
    sensors, per_sku = _sensors(sc, rng)
    skus = sorted(per_sku)
    truth = {s: rng.randint(8, 30) for s in skus}
    ledger = dict(truth)
    faulty = rng.sample(skus, sc.drifting + sc.failing + sc.mismapped)
    drift = {f"scale-{int(s[3:])}" for s in faulty[: sc.drifting]}
    failing = {f"scale-{int(s[3:])}" for s in faulty[sc.drifting: sc.drifting + sc.failing]}
    mismap = {f"rfid-{int(s[3:])}": rng.choice(skus) for s in faulty[sc.drifting + sc.failing:]}
    history: dict[str, deque[Reading]] = {sid: deque(maxlen=config.SENSOR_READINGS_KEPT)
                                          for sid in sensors}
    open_reviews: dict[str, int] = {}  # sku -> opened at
    r: dict[str, Any] = {"checks": 0, "auto": 0, "false_auto": 0, "reviews": 0, "warn": 0,
                         "shrink_units": 0, "shrink_events": 0, "drift_flags": 0,
                         "flagged_drifting": [], "false_auto_examples": []}
    minutes = int(sc.hours * 60)
    seq = 0
    for m in range(minutes):
        now = T0 + m * MIN
        for s in skus:
            if rng.random() < sc.sales_per_sku_hour / 60 and truth[s] > 0:
                truth[s] -= 1
                ledger[s] -= 1
            if rng.random() < sc.shrink_per_sku_day / 1440 and truth[s] > 0:
                lost = min(truth[s], rng.randint(1, 3))
                truth[s] -= lost
                r["shrink_units"] += lost
                r["shrink_events"] += 1
            if truth[s] < 4 and rng.random() < 0.02:  # a delivery
                truth[s] += 12
                ledger[s] += 12
        if m % sc.reconcile_every_min:
            continue
        for s in skus:  # each sensor reports once per reconciliation interval
            for sid in per_sku[s]:
                info = sensors[sid]
                seq += 1
                at = now - rng.randint(0, 20_000)
                if info.kind == "weight":
                    grams = truth[s] * sc.unit_grams + rng.gauss(0, sc.scale_noise_g)
                    if sid in drift:
                        grams += sc.drift_g_per_hour * m / 60
                    if sid in failing and m > minutes // 4:
                        grams = 0.0
                    value = max(0.0, grams)
                elif info.kind == "rfid":
                    shelf = truth[mismap.get(sid, s)]
                    value = float(sum(1 for _ in range(shelf) if rng.random() > sc.rfid_miss))
                else:
                    value = float(max(0, truth[s] + rng.choice((-1, 0, 0, 0, 1))))
                conf = round(rng.uniform(0.6, 0.95), 2) if info.kind == "vision" else None
                history[sid].append(Reading(f"r{seq}", sid, info.kind, s, value, at, conf))
        for s in skus:
            if s in open_reviews:
                if now - open_reviews[s] >= sc.review_delay_min * MIN:
                    ledger[s] = truth[s]  # staff counted the shelf
                    del open_reviews[s]
                continue
            hist = {sid: list(history[sid]) for sid in per_sku[s]}
            out = reconcile_sku(s, ledger[s], hist, sensors, rules, now)
            r["checks"] += 1
            for sid in out.drifting:
                if sid not in r["flagged_drifting"]:
                    r["flagged_drifting"].append(sid)
                    r["drift_flags"] += 1
            if out.action == "auto":
                assert out.estimate is not None
                r["auto"] += 1
                if out.estimate != truth[s]:
                    r["false_auto"] += 1
                    if len(r["false_auto_examples"]) < 5:
                        r["false_auto_examples"].append(
                            {"sku": s, "truth": truth[s], **out.to_dict()})
                ledger[s] = out.estimate
            elif out.action == "review":
                r["reviews"] += 1
                open_reviews[s] = now
            elif out.action == "warn":
                r["warn"] += 1
    decided = r["auto"] + r["reviews"]
    r["auto_share"] = round(r["auto"] / decided, 4) if decided else None
    r["false_auto_per_1000_auto"] = round(1000 * r["false_auto"] / r["auto"], 2) \
        if r["auto"] else 0.0
    r["false_auto_per_1000_checks"] = round(1000 * r["false_auto"] / max(r["checks"], 1), 3)
    r["ledger_off_at_end"] = sum(1 for s in skus if ledger[s] != truth[s])
    r["faults"] = {"drifting": sorted(drift), "failing": sorted(failing),
                   "mismapped": dict(sorted(mismap.items()))}
    r["flagged_drifting"].sort()
    r["scenario"] = {k: v for k, v in sc.__dict__.items() if k != "rules"}
    return r


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="sensor-stream workload over mesh.core.reconcile")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--skus", type=int, default=200)
    ap.add_argument("--hours", type=float, default=24.0)
    ap.add_argument("--rules", type=Path, help="a rules JSON document (docs/sensors.md)")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args(argv)
    rules = json.loads(a.rules.read_text()) if a.rules else DEFAULT_RULES
    rep = run(Scenario(seed=a.seed, skus=a.skus, hours=a.hours, rules=rules))
    keys = ("checks", "auto", "reviews", "warn", "auto_share", "false_auto",
            "false_auto_per_1000_auto", "false_auto_per_1000_checks", "shrink_events",
            "drift_flags", "flagged_drifting", "ledger_off_at_end", "faults")
    for k in keys:
        print(f"{k:28} {rep[k]}")
    if a.json:
        a.json.write_text(json.dumps(rep, indent=2))
    sys.stdout.flush()


if __name__ == "__main__":
    main()

"""Edge telemetry filtering: WAN egress per store per day, with and without it.

A realistic store in virtual time: hundreds of devices each reporting one reading a
second (cooler temperatures, door contacts, scanner/printer health, node disk and
sync-queue depth), one cooler failing mid-run. Two ways to ship it to the cloud:

* raw: every reading, batched once a second into one signed envelope (what a naive
  edge would forward), and
* filtered: ``mesh.core.telemetry`` windows and alerts, flushed every
  ``TELEMETRY_FLUSH_S`` into signed ``telemetry`` envelopes (what the edge sends).

Bytes are the envelopes' wire form, and the same after zlib (the WAN session deflates
each message; zlib per envelope is a fair stand-in). The run covers ``--hours`` of
virtual time and scales to a day.

    .venv/bin/python scripts/bench_telemetry.py [--sensors 300] [--hours 1] [--json F]
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
import zlib
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import orjson

from mesh import config
from mesh.core.envelope import seal
from mesh.core.identity import NodeKey
from mesh.core.telemetry import Telemetry, ops_for

DAY_S = 86_400
T0 = 1_790_000_000_000


def devices(n: int) -> list[tuple[str, str, float, float]]:
    """(device, metric, base value, noise) for a store of ``n`` devices."""
    mix = [("cooler", "cooler_temp_c", 3.0, 0.3), ("door", "door_open", 0.0, 0.0),
           ("scanner", "scanner_ok", 1.0, 0.0), ("printer", "printer_paper_pct", 80.0, 0.5),
           ("shelf-env", "ambient_temp_c", 21.0, 0.2), ("node", "disk_free_pct", 60.0, 0.01),
           ("node", "sync_queue", 5.0, 3.0)]
    weights = [0.2, 0.1, 0.15, 0.05, 0.4, 0.05, 0.05]
    out = []
    for i in range(n):
        kind = mix[min(len(mix) - 1, int(_bucket(i, n, weights)))]
        out.append((f"{kind[0]}-{i:04d}", kind[1], kind[2], kind[3]))
    return out


def _bucket(i: int, n: int, weights: list[float]) -> int:
    x, acc = (i + 0.5) / n, 0.0
    for k, w in enumerate(weights):
        acc += w
        if x < acc:
            return k
    return len(weights) - 1


def run(n_sensors: int, hours: float, seed: int) -> dict[str, Any]:
    rng = random.Random(seed)
    key = NodeKey.generate()
    devs = devices(n_sensors)
    seconds = int(hours * 3600)
    failing = next(d for d, m, _, _ in devs if m == "cooler_temp_c")
    tel = Telemetry()
    raw_bytes = raw_z = raw_envs = 0
    fil_bytes = fil_z = fil_envs = 0
    seq_raw = seq_fil = 0
    alerts_sent: list[dict[str, Any]] = []
    flush_every = int(config.TELEMETRY_FLUSH_S)
    started = time.perf_counter()
    for s in range(seconds):
        now = T0 + s * 1000
        rows = []
        for device, metric, base, noise in devs:
            value = base + rng.gauss(0, noise) if noise else base
            if device == failing and s > seconds // 3:  # the compressor dies: it warms up
                value = min(12.0, base + (s - seconds // 3) / 60.0)
            value = round(value, 2)
            rows.append([device, metric, value, now])
            tel.add(device, metric, value, now)
        seq_raw += 1
        # The same envelope framing (sealing validates op types, and there is no raw
        # op): body as seal encodes it, plus the signature's 128 hex digits and framing.
        raw = orjson.dumps({"v": 1, "store": "s", "origin": "edge", "seq": seq_raw,
                            "prev": "0" * 64, "hlc": now << 16,
                            "ops": [{"t": "raw", "r": rows}],
                            "meta": {"kind": "telemetry", "txn": str(s)}},
                           option=orjson.OPT_SORT_KEYS) + b"0" * (128 + 20)
        raw_bytes += len(raw)
        raw_z += len(zlib.compress(raw, 6))
        raw_envs += 1
        alerts = tel.take_alerts() if tel.pending_alerts else []
        due = (s + 1) % flush_every == 0
        if alerts or due:
            summaries = tel.flush(now + 1) if due else []
            if summaries or alerts:
                seq_fil += 1
                prev = None if seq_fil == 1 else bytes(32)
                env = seal(key, store="s", origin="edge", seq=seq_fil, prev=prev,
                           hlc=now << 16, ops=ops_for(summaries, alerts),
                           meta={"kind": "telemetry", "txn": f"tm{s}"})
                fil_bytes += len(env.raw)
                fil_z += len(zlib.compress(env.raw, 6))
                fil_envs += 1
                alerts_sent += [a.wire() for a in alerts]
    elapsed = time.perf_counter() - started
    scale = DAY_S / seconds
    return {
        "sensors": n_sensors, "hours": hours, "readings": n_sensors * seconds,
        "raw_mb_per_day": raw_bytes * scale / 1e6, "raw_mb_per_day_zlib": raw_z * scale / 1e6,
        "filtered_mb_per_day": fil_bytes * scale / 1e6,
        "filtered_mb_per_day_zlib": fil_z * scale / 1e6,
        "ratio": raw_bytes / max(fil_bytes, 1), "ratio_zlib": raw_z / max(fil_z, 1),
        "raw_envelopes_per_day": raw_envs * scale, "filtered_envelopes_per_day": fil_envs * scale,
        "alerts": alerts_sent, "window_ms": config.TELEMETRY_WINDOW_MS,
        "cpu_s_per_reading_us": elapsed / (n_sensors * seconds) * 1e6,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sensors", type=int, default=300)
    ap.add_argument("--hours", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=14)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    r = run(args.sensors, args.hours, args.seed)
    print(f"store: {r['sensors']} devices at 1 reading/s, {r['hours']:g} h of virtual time "
          f"({r['readings']:,} readings), window {r['window_ms'] // 1000} s, scaled to a day")
    print(f"{'':28}{'MB/day':>12}{'MB/day zlib':>14}{'envelopes/day':>16}")
    print(f"{'raw (every reading)':28}{r['raw_mb_per_day']:>12.1f}"
          f"{r['raw_mb_per_day_zlib']:>14.1f}{r['raw_envelopes_per_day']:>16,.0f}")
    print(f"{'edge-filtered':28}{r['filtered_mb_per_day']:>12.2f}"
          f"{r['filtered_mb_per_day_zlib']:>14.2f}{r['filtered_envelopes_per_day']:>16,.0f}")
    print(f"reduction: {r['ratio']:.0f}x on the wire form, {r['ratio_zlib']:.0f}x compressed")
    shown = [(a["device"], a["rule"], a["state"]) for a in r["alerts"][:6]]
    print(f"alerts sent: {len(r['alerts'])} {shown}")
    print(f"cost: {r['cpu_s_per_reading_us']:.1f} µs per reading (aggregation + raw sealing)")
    if args.json:
        args.json.write_text(json.dumps(r, indent=2))
    assert math.isfinite(r["ratio"])


if __name__ == "__main__":
    main()

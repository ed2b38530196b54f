"""Catch-up of a new till: from a checkpoint state plus the tail vs the full history.

Runs the simulator (the one driver, ``mesh.driver``, over simulated ports) on
``simulations/live_checkpoints.toml`` with registers that prune (snapshots every 20
envelopes) and a new till ``r9`` enrolled at ``--join-s``; the sales rate is scaled by
``--rate`` to make the history longer. The same seed runs twice in this one process:
with catch-up from a checkpoint (``mesh.core.catchup``) and with it off (the full fetch
from seq 1, as before). Reported per run: virtual time from the enrolment until r9
holds everything the edge held at that instant, bytes and envelopes r9 received, how
many envelopes r9's ledger holds, and the wall time of the run; then the ratios.

    python scripts/bench_catchup_state.py                  # quick
    python scripts/bench_catchup_state.py --rate 10 --join-s 280
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mesh.sim.runner import RunContext, run_scenario
from mesh.sim.scenario import load_scenario

ROOT = Path(__file__).resolve().parents[1]
SCENARIO = ROOT / "simulations" / "live_checkpoints.toml"


def one(rate: float, join_s: float, seed: int, catchup: bool) -> dict[str, Any]:
    text = SCENARIO.read_text().replace("rate_per_min = 20", f"rate_per_min = {20 * rate:g}")
    text += f"""
[[nodes]]
id = "r9"
role = "register"

[[faults]]
kind = "enrol"
at_s = {join_s}
nodes = ["r9"]
"""
    path = Path(tempfile.mkdtemp()) / "join.toml"
    path.write_text(text)
    out: dict[str, Any] = {"caught_up_ms": None}
    target: dict[str, int] = {}
    ctxs: list[RunContext] = []

    def tune(driver: Any) -> None:
        driver.core.catchup_min_behind = 200 if catchup else 1 << 62

    def observe(kind: str, data: dict[str, Any]) -> None:
        w = ctxs[0].world
        if kind == "enrolled" and data["node"] == "r9":
            target.update(w.nodes["edge"].replica.vv.to_dict())
            out["join_ms"] = w.now
            out["history"] = sum(target.values())
        elif (target and out["caught_up_ms"] is None and data.get("node") == "r9"
              and kind in ("applied", "state_installed")):
            vv = w.nodes["r9"].replica.vv
            if all(vv.get(o) >= q for o, q in target.items()):
                out["caught_up_ms"] = w.now - out["join_ms"]

    def setup(ctx: RunContext) -> None:
        ctxs.append(ctx)
        ctx.world.observers.append(observe)
        for n in ctx.world.nodes.values():
            n.snapshot_every = n.durable.snapshot_every = 20
            n.on_boot.append(tune)

    t0 = time.perf_counter()
    r = run_scenario(load_scenario(path), seed, setup=setup)
    out["wall_s"] = time.perf_counter() - t0
    r9 = ctxs[0].world.nodes["r9"]
    out.update(ok=r.ok, failures=r.failures[:3], bytes_in=r9.core.bytes_in,
               received=r9.core.received, ledger_rows=len(r9.disk.rows),
               installed=r9.core.stats.get("state_installed", 0),
               state_bytes=len(ctxs[0].world.nodes["edge"].core.state_offer[2])
               if ctxs[0].world.nodes["edge"].core.state_offer else 0)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rate", type=float, default=4.0, help="sales rate x live_checkpoints")
    ap.add_argument("--join-s", type=float, default=250.0)
    ap.add_argument("--seed", type=int, default=12)
    a = ap.parse_args()
    print(f"load: {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} (1, 5 min)")
    runs = {k: one(a.rate, a.join_s, a.seed, k) for k in (False, True)}
    for k, v in runs.items():
        name = "checkpoint state + tail" if k else "full fetch (baseline)"
        print(f"{name:26} history {v['history']:>7} envelopes | caught up in "
              f"{v['caught_up_ms']} ms (virtual) | received {v['bytes_in']:>10} B, "
              f"{v['received']:>7} envelopes | ledger rows {v['ledger_rows']:>7} | "
              f"state msg {v['state_bytes']} B | installed {v['installed']} | "
              f"run ok {v['ok']} {v['failures']} | wall {v['wall_s']:.1f} s")
    base, new = runs[False], runs[True]
    if base["caught_up_ms"] and new["caught_up_ms"]:
        print(f"ratios (state / full): time {new['caught_up_ms'] / base['caught_up_ms']:.2f}"
              f"  bytes {new['bytes_in'] / base['bytes_in']:.2f}"
              f"  envelopes {new['received'] / max(1, base['received']):.2f}"
              f"  ledger rows {new['ledger_rows'] / max(1, base['ledger_rows']):.2f}")


if __name__ == "__main__":
    main()

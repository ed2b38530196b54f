"""Catch-up of a new till: from a checkpoint state plus the tail vs the full history.

Runs the simulator (the one driver, ``mesh.driver``, over simulated ports) on
``simulations/live_checkpoints.toml`` with registers that prune (snapshots every 20
envelopes) and a new till ``r9`` enrolled at ``--join-s``; the sales rate is scaled by
``--rate`` to make the history longer (the generated SKUs get 1,000 times the stock,
so sales never run out). The same seed runs twice in this one process:
with catch-up from a checkpoint (``mesh.core.catchup``) and with it off (the full fetch
from seq 1, as before). Reported per run: virtual time from the enrolment until r9
holds everything the edge held at that instant, bytes and envelopes r9 received, how
many envelopes r9's ledger holds, and the wall time of the run; then the ratios.

    python scripts/bench_catchup_state.py                  # quick
    python scripts/bench_catchup_state.py --rate 10 --join-s 280

Then, in the same run, the real node's storage and verification path in this process
(``real_path``: SQLite ledgers, Ed25519; no network): the same two catch-ups of a new
till over a history of ``--real`` sales with a checkpoint every tenth of it, and
half a tenth more after the newest (the tail).
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
    text = text.replace("qty = [5, 30]", "qty = [5000, 30000]")  # never sold out
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


def real_path(n: int, every: int, seed: int) -> dict[str, Any]:
    """The real node's storage and verification, in this process: an edge (the
    checkpointer) and a till r1 on SQLite ledgers, ``n`` sales of r1 with a checkpoint
    every ``every``; then a new till r9 (its own ledger) fetches (a) everything from
    seq 1, (b) the edge's checkpoint state plus the tail, each page verified as one
    hash chain (``verify_chain``, as the sync core does), applied and appended."""
    import random as _random

    from mesh.core.catchup import decode_state, verify_state
    from mesh.core.envelope import decode, verify, verify_chain
    from mesh.durable import DurableReplica
    from mesh.store.datadir import enrol_node, init_store

    root = Path(tempfile.mkdtemp())
    t = 1_790_000_000_000
    edge_id = init_store(root / "edge", "s", now_ms=t, node_id="edge")
    assert edge_id.store_key is not None
    for node in ("r1", "r9a", "r9b"):
        enrol_node(root / node, edge_id.store_key, "s", "register", now_ms=t, node_id=node,
                   trust=edge_id.trust)
    edge_id.save()
    edge, r1 = DurableReplica.open(root / "edge"), DurableReplica.open(root / "r1")
    rng = _random.Random(seed)
    for i in range(20):
        edge.execute(lambda r, i=i: r.receive(f"S{i}", 10**6, txn=f"rx{i}", now_ms=t))[1].result()

    def sync(dst: DurableReplica[Any], src: DurableReplica[Any]) -> None:
        for o, top in src.replica.vv.items():
            for raw in src.ledger.read_origin(o, dst.replica.vv.get(o) + 1, top):
                env = verify(decode(raw), dst.identity.trust, t)
                dst.persist(dst.replica.apply(env, t))
        dst.ledger.call(lambda: None).result()

    sync(r1, edge)
    futs = []
    for k in range(n + every // 2):  # the last half period: the tail above the newest ck
        t += rng.randrange(1, 400)
        futs.append(r1.execute(lambda r, k=k, t=t: r.sell(f"S{rng.randrange(20)}", 1,
                                                           txn=f"s{k}", now_ms=t))[1])
        if (k + 1) % every == 0 and k < n:
            futs[-1].result()
            sync(edge, r1)
            edge.replica.frontier.observe("r1", r1.replica.vv, t)
            got = edge.maybe_checkpoint(t, ["edge", "r1"])
            if got is not None:
                got[1].result()
            sync(r1, edge)
    futs[-1].result()
    sync(edge, r1)
    assert edge.state_offer is not None
    msg = edge.state_offer[2]

    def fetch(dst: DurableReplica[Any]) -> int:
        got = 0
        for o, top in sorted(edge.replica.vv.items()):
            while dst.replica.vv.get(o) < top:
                first = dst.replica.vv.get(o) + 1
                raws = edge.ledger.read_origin(o, first, top)
                got += sum(len(r) for r in raws)
                envs = verify_chain([decode(r) for r in raws], dst.identity.trust, t,
                                    prev=dst.replica.head(o))
                applied = [a for e in envs for a in dst.replica.apply(e, t)]
                dst.persist(applied)
        dst.ledger.call(lambda: None).result()
        return got

    out: dict[str, Any] = {"history": edge.replica.vv.total(), "state_bytes": len(msg)}
    full = DurableReplica.open(root / "r9a")
    t0 = time.perf_counter()
    out["full_bytes"] = fetch(full)
    out["full_s"] = time.perf_counter() - t0
    new = DurableReplica.open(root / "r9b")
    t0 = time.perf_counter()
    ck_raw, blob = decode_state(msg)
    env = verify(decode(ck_raw), new.identity.trust, t)
    ck, state = verify_state(env, blob, "s", "register", new.checkpointer)
    assert new.install_state(env, ck, state) == "ok"
    out["tail_bytes"] = fetch(new)
    out["state_s"] = time.perf_counter() - t0
    assert new.replica.state_digest() == full.replica.state_digest() \
        == edge.replica.state_digest()
    out["rows_full"] = sum(1 for _ in full.ledger.scan())
    out["rows_state"] = sum(1 for _ in new.ledger.scan())
    for d in (edge, r1, full, new):
        d.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rate", type=float, default=4.0, help="sales rate x live_checkpoints")
    ap.add_argument("--join-s", type=float, default=250.0)
    ap.add_argument("--seed", type=int, default=12)
    ap.add_argument("--real", type=int, default=20_000, metavar="N",
                    help="sales in the real-storage measurement (0: skip)")
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
    if a.real:
        x = real_path(a.real, max(1, a.real // 10), a.seed)
        print(f"real storage (SQLite, signatures), history {x['history']} envelopes: "
              f"full fetch {x['full_s']:.2f} s, {x['full_bytes']} B, {x['rows_full']} rows | "
              f"state + tail {x['state_s']:.2f} s, {x['state_bytes']} + {x['tail_bytes']} B, "
              f"{x['rows_state']} rows")
        print(f"ratios (state / full): time {x['state_s'] / x['full_s']:.2f}  bytes "
              f"{(x['state_bytes'] + x['tail_bytes']) / x['full_bytes']:.2f}  rows "
              f"{x['rows_state'] / max(1, x['rows_full']):.2f}")


if __name__ == "__main__":
    main()

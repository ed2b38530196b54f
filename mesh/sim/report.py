"""Human-readable rendering of a simulation run (rich); the JSON is ``RunResult.to_json``."""

from __future__ import annotations

from typing import Any

from rich.console import Console, Group
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from mesh.sim.runner import RunResult

__all__ = ["render", "render_swarm"]


def _ok(good: bool) -> str:
    return "[green]ok[/]" if good else "[bold red]FAIL[/]"


def _ms(x: float | None) -> str:
    if x is None:
        return "-"
    if x >= 60_000:
        return f"{x / 60_000:.1f} min"
    if x >= 1000:
        return f"{x / 1000:.2f} s"
    return f"{x:.1f} ms"


def _bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


def _safety(r: dict[str, Any]) -> Table:
    t = Table(title="safety", title_justify="left", expand=False)
    t.add_column("check")
    t.add_column("value", justify="right")
    t.add_column("", justify="center")
    conv = r["convergence_ms"]
    rows: list[tuple[str, str, bool]] = [
        ("converged after the heal", "yes, in " + _ms(conv) if r["converged"] else "no",
         r["converged"]),
        ("acknowledged ops lost", f"{r['lost_ops']} of {r['acked_ops']}", r["lost_ops"] == 0),
        ("duplicate applies", str(r["duplicate_applies"]), r["duplicate_applies"] == 0),
        ("out-of-order applies", str(r["out_of_order_applies"]),
         r["out_of_order_applies"] == 0),
        ("forged/invalid accepted",
         f"{r['invalid_accepted']} of {sum(r['forged_injected'].values())} injected",
         r["invalid_accepted"] == 0),
        ("phantom envelopes", str(r["phantom_envelopes"]), r["phantom_envelopes"] == 0),
        ("revoked origins accepted", str(r.get("revoked_accepted", 0)),
         r.get("revoked_accepted", 0) == 0),
        ("equivocation alerts", str(r["equivocations"]), r["equivocations"] == 0),
        ("exception lists identical", "yes" if r["exceptions_identical"] else "no",
         r["exceptions_identical"]),
    ]
    ck = r.get("checkpoints")
    if ck and ck["proposed"]:
        rows.append(("checkpoint hashes identical",
                     f"{ck['hashed']} checkpoints, {ck['proposed']} proposed"
                     if ck["hashes_identical"] else f"no: {ck['mismatches']} differ",
                     ck["hashes_identical"]))
    for name, value, good in rows:
        t.add_row(name, value, _ok(good))
    left_out = [*r.get("gone_nodes", []), *r.get("revoked_nodes", [])]
    if left_out:
        t.caption = (f"left out of the end checks: {', '.join(left_out)} (gone or revoked); "
                     f"{r.get('stranded_ops', 0)} acknowledged ops only on their disks")
    return t


def _traffic(r: dict[str, Any]) -> Table:
    t = Table(title="traffic per link class", title_justify="left")
    for col in ("class", "messages", "bytes", "on the wire", "lost", "duplicated"):
        t.add_column(col, justify="left" if col == "class" else "right")
    for k in ("lan", "wan", "total"):
        t.add_row(k.upper() if k != "total" else "total", f"{r['messages'][k]:,}",
                  _bytes(r["bytes"][k]), _bytes(r["wire_bytes"][k]),
                  f"{r['lost_messages'][k]:,}", f"{r['duplicated_messages'][k]:,}")
    t.caption = "on the wire: after the WAN codec (prev elided, raw signatures, zlib)"
    return t


def _lag_and_divergence(r: dict[str, Any]) -> Table:
    t = Table(title="sync lag (ack at origin -> applied elsewhere) and divergence",
              title_justify="left")
    t.add_column("measure")
    t.add_column("value", justify="right")
    lag = r["sync_lag_ms"]
    for p in ("p50", "p90", "p99", "max"):
        t.add_row(f"sync lag {p}", _ms(lag[p]))
    t.add_row("lag samples", f"{lag['count']:,}")
    t.add_row("peak divergence (max-min available)",
              f"{r['peak_divergence']} ({r['peak_divergence_sku'] or '-'} at "
              f"{_ms(r['peak_divergence_at_ms'])})")
    t.add_row("peak divergence during partitions", str(r["peak_divergence_partitioned"]))
    for c in r["heal_catch_up"]:
        t.add_row(f"catch-up after '{c['label']}' at {_ms(c['healed_ms'])}",
                  _ms(c["catch_up_ms"]) if c["catch_up_ms"] is not None else "[red]never[/]")
    return t


def _commands(r: dict[str, Any]) -> Table:
    t = Table(title="workload", title_justify="left")
    for col in ("command", "acknowledged", "refused", "node down"):
        t.add_column(col, justify="left" if col == "command" else "right")
    for kind, c in r["commands"].items():
        t.add_row(kind, f"{c['ok']:,}", f"{c['refused']:,}", f"{c['offline']:,}")
    t.caption = (f"{r['crashes']} crashes, {r['restarts']} restarts, "
                 f"{r['unacked_at_crash']} commands unacknowledged at a crash, "
                 f"{r['retried_after_restart']} retried")
    return t


def _exceptions(r: dict[str, Any]) -> Table:
    t = Table(title=f"oversell exceptions: {r['exception_count']} events, "
                    f"{r['oversold_units']} units (same list at every replica: "
                    f"{'yes' if r['exceptions_identical'] else 'NO'})", title_justify="left")
    for col in ("sku", "origin", "seq", "kind", "short"):
        t.add_column(col)
    for e in r["exceptions"]:
        t.add_row(e["sku"], e["origin"], str(e["seq"]), e["kind"], str(e["short"]))
    if r["exception_count"] > len(r["exceptions"]):
        t.caption = f"... {r['exception_count'] - len(r['exceptions'])} more"
    return t


def _forgeries(r: dict[str, Any]) -> Table:
    t = Table(title="byzantine injector", title_justify="left")
    t.add_column("forgery / rejection reason")
    t.add_column("count", justify="right")
    for k, v in r["forged_injected"].items():
        t.add_row(f"injected {k}", str(v))
    for k, v in r["rejected"].items():
        t.add_row(f"rejected: {k}", str(v))
    t.add_row("duplicates ignored", f"{r['duplicates_ignored']:,}")
    return t


def _sensors(s: dict[str, Any]) -> Table:
    t = Table(title=f"sensors: {s['skus']} SKUs, {s['sensors']} sensors, "
                    f"{s['readings']:,} readings", title_justify="left")
    t.add_column("reconciliation")
    t.add_column("value", justify="right")
    share = "-" if s["auto_share"] is None else f"{100 * s['auto_share']:.0f} %"
    rows = [
        ("SKU-checks", f"{s['checks']:,}"),
        ("automatic adjustments", f"{s['auto']:,}"),
        ("auto-reconciled share (auto / (auto + disagreements))", share),
        ("false auto-adjustments (estimate != simulated truth)",
         f"{s['false_auto']} ({s['false_auto_per_1000_auto']:g} per 1,000 auto, "
         f"{s['false_auto_per_1000_checks']:g} per 1,000 checks)"),
        ("review items opened", f"{s['review_items_opened']:,} "
         + ", ".join(f"{k} {v}" for k, v in s["reviews_opened"].items())),
        ("low-confidence warnings", f"{s['warn']:,}"),
        ("faulty sensors flagged", f"{s['faulty_flagged']} of {s['faulty_sensors']}"),
        ("shrink injected", f"{s['shrink_events']} events, {s['shrink_units']} units"),
        ("SKUs whose edge ledger is off the truth at the end", str(s["ledger_off_at_end"])),
    ]
    for name, value in rows:
        t.add_row(name, value)
    return t


def render(result: RunResult, console: Console, path: str = "SCENARIO") -> None:
    r = result.report
    head = Text.assemble(
        (f"{r['scenario']}", "bold"), f"  seed {r['seed']}",
        "  (random faults)" if r["random_faults"] else "",
        f"\n{r['nodes']['total']} nodes, {_ms(r['duration_ms'])} virtual, "
        f"{r['events']:,} events, {result.wall_s:.2f} s wall "
        f"(x{r['duration_ms'] / 1000 / max(result.wall_s, 1e-9):,.0f})",
    )
    faults = Table(title="faults", title_justify="left")
    for col in ("kind", "label", "from", "to"):
        faults.add_column(col)
    for f in r["faults"]:
        faults.add_row(f["kind"], f["label"], _ms(f["start_ms"]), _ms(f["end_ms"]))
    parts: list[Any] = [head, _safety(r)]
    if r["faults"]:
        parts.append(faults)
    parts += [_traffic(r), _lag_and_divergence(r), _commands(r), _exceptions(r)]
    if r["forged_injected"] or r["rejected"]:
        parts.append(_forgeries(r))
    if "sensors" in r:
        parts.append(_sensors(r["sensors"]))
    console.print(Panel(Group(*parts), title="storemesh sim run", expand=False))
    for ex in r["examples"]:
        console.print(f"[red]  {ex}[/]")
    if result.ok:
        console.print("[bold green]all safety checks passed[/]")
    else:
        for f in result.failures:
            console.print(f"[bold red]FAILED[/] {f}")
        console.print(f"reproduce with --seed {result.seed}  ({result.reproduce(path)})")


def render_swarm(rows: list[dict[str, Any]], console: Console, path: str) -> None:
    failed = [row for row in rows if not row["ok"]]
    t = Table(title=f"swarm: {len(rows)} runs, {len(failed)} failed", title_justify="left")
    for col in ("seed", "ok", "converged in", "lost", "dup", "invalid", "faults", "failure"):
        t.add_column(col)
    for row in failed[:50]:
        t.add_row(str(row["seed"]), _ok(False), _ms(row["convergence_ms"]),
                  str(row["lost_ops"]), str(row["duplicate_applies"]),
                  str(row["invalid_accepted"]), str(row["faults"]), "; ".join(row["failures"]))
    if failed:
        console.print(t)
        for row in failed[:10]:
            console.print(f"reproduce with --seed {row['seed']}:  storemesh sim run {path} "
                          f"--random-faults --seed {row['seed']}")
    conv = sorted(row["convergence_ms"] for row in rows if row["convergence_ms"] is not None)
    if conv:
        console.print(f"convergence after heal: median {_ms(conv[len(conv) // 2])}, "
                      f"max {_ms(conv[-1])}")
    console.print("[bold green]every run passed[/]" if not failed
                  else f"[bold red]{len(failed)} of {len(rows)} runs failed[/]")

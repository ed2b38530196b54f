"""The ``storemesh`` command line.

Commands here are thin: they parse arguments, call into the package and render with
rich. Errors the user can fix exit with status 2 and a one-line message.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from mesh import __version__
from mesh.datadir import init_store, load_identity
from mesh.envelope import DOMAIN, body_bytes, decode
from mesh.errors import EnvelopeError
from mesh.identity import verify_signature
from mesh.ledger import Ledger

__all__ = ["main"]

console = Console()


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


@click.group()
@click.version_option(__version__, prog_name="storemesh")
def main() -> None:
    """storemesh: offline-first, peer-to-peer stock and reservations for retail stores."""


# --- store ------------------------------------------------------------------------------


@main.group()
def store() -> None:
    """Create and inspect stores."""


@store.command("init")
@click.argument("data_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--store", "store_id", required=True, help="Store id, e.g. 'berlin-mitte'.")
@click.option("--node-id", default=None, help="Node id of the edge node (default: derived).")
def store_init(data_dir: Path, store_id: str, node_id: str | None) -> None:
    """Create a store key and the store's first (edge) node in DATA_DIR."""
    try:
        ident = init_store(data_dir, store_id, now_ms=_now_ms(), node_id=node_id)
    except (FileExistsError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None
    console.print(f"store [bold]{ident.store_id}[/] created; edge node [bold]{ident.node_id}[/]"
                  f" in {data_dir} (key fingerprint {ident.key.fingerprint})")


# --- ledger -----------------------------------------------------------------------------


@main.group()
def ledger() -> None:
    """Inspect and check a node's durable ledger."""


@dataclass
class _OriginReport:
    envelopes: int = 0
    last_seq: int = 0
    gaps: list[tuple[int, int]] = field(default_factory=list)
    bad_signatures: int = 0
    broken_links: int = 0
    malformed: int = 0


@dataclass
class VerifyReport:
    origins: dict[str, _OriginReport] = field(default_factory=dict)
    unknown_origins: set[str] = field(default_factory=set)
    problems: list[str] = field(default_factory=list)
    rows: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems


def verify_ledger(data_dir: Path, max_problems: int = 1000) -> VerifyReport:
    """Check every signature, every seq gap and every hash link of a node's ledger."""
    ident = load_identity(data_dir)
    report = VerifyReport()

    def problem(text: str) -> None:
        if len(report.problems) < max_problems:
            report.problems.append(text)

    with Ledger(ident.ledger_path) as led:
        prev_hash: bytes | None = None  # hash of the row before, same origin, no gap
        for origin, seq, raw in led.scan_by_origin():
            report.rows += 1
            rep = report.origins.setdefault(origin, _OriginReport())
            if seq != rep.last_seq + 1:
                rep.gaps.append((rep.last_seq + 1, seq - 1))
                problem(f"{origin}: seq {rep.last_seq + 1}..{seq - 1} missing")
            linked = prev_hash if seq == rep.last_seq + 1 and seq > 1 else None
            rep.envelopes += 1
            rep.last_seq = seq
            prev_hash = None
            try:
                env = decode(raw)
            except EnvelopeError as exc:
                rep.malformed += 1
                problem(f"{origin} seq {seq}: {exc}")
                continue
            if env.origin != origin or env.seq != seq:
                problem(f"{origin} seq {seq}: row holds {env.origin} seq {env.seq}")
            if linked is not None and env.prev != linked:
                rep.broken_links += 1
                problem(f"{origin} seq {seq}: prev does not match the hash of seq {seq - 1}")
            prev_hash = env.hash
            cert = ident.trust.certificate(origin)
            if cert is None:
                report.unknown_origins.add(origin)
                problem(f"{origin} seq {seq}: origin has no certificate here")
                continue
            if not verify_signature(cert.public_key, env.signature, DOMAIN + body_bytes(raw)):
                rep.bad_signatures += 1
                problem(f"{origin} seq {seq}: bad signature")
        for origin, seq, _, _ in led.evidence():
            problem(f"{origin} seq {seq}: equivocation evidence on file")
    return report


@ledger.command("verify")
@click.argument("data_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
def ledger_verify(data_dir: Path) -> None:
    """Verify DATA_DIR's ledger end to end: every signature, hash link and seq gap."""
    t0 = time.perf_counter()
    try:
        report = verify_ledger(data_dir)
    except FileNotFoundError as exc:
        raise click.ClickException(str(exc)) from None
    table = Table(title=f"ledger {data_dir}")
    for col in ("origin", "envelopes", "last seq", "gaps", "bad sigs", "broken links",
                "malformed"):
        table.add_column(col, justify="left" if col == "origin" else "right")
    for origin in sorted(report.origins):
        r = report.origins[origin]
        table.add_row(origin, str(r.envelopes), str(r.last_seq), str(len(r.gaps)),
                      str(r.bad_signatures), str(r.broken_links), str(r.malformed))
    console.print(table)
    for text in report.problems:
        console.print(f"[red]problem[/] {text}")
    took = time.perf_counter() - t0
    if report.ok:
        console.print(f"[green]OK[/] {report.rows} envelopes verified in {took:.1f} s")
    else:
        console.print(f"[red]FAILED[/] {len(report.problems)} problem(s) in {report.rows} "
                      f"envelopes")
        raise SystemExit(1)


@ledger.command("show")
@click.argument("data_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--limit", default=20, show_default=True, help="Newest N envelopes.")
def ledger_show(data_dir: Path, limit: int) -> None:
    """The audit trail: the newest envelopes with who, which device, when and why."""
    ident = load_identity(data_dir)
    with Ledger(ident.ledger_path) as led:
        rows = [raw for _, raw in led.scan(max(0, led.last_id - limit))]
    table = Table(title=f"ledger {data_dir} (newest {len(rows)})")
    for col in ("origin", "seq", "time (UTC)", "kind", "sku", "qty", "txn", "staff", "reason"):
        table.add_column(col)
    for raw in rows:
        env = decode(raw)
        m = env.meta
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime((env.hlc >> 16) / 1000))
        table.add_row(env.origin, str(env.seq), when, m["kind"], str(m.get("sku", "")),
                      str(m.get("qty", "")), m["txn"], str(m.get("staff") or ""),
                      str(m.get("reason") or ""))
    console.print(table)


if __name__ == "__main__":  # pragma: no cover
    main()

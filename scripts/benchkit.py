"""Shared pieces of the benchmark scripts (scripts/bench_*.py)."""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

__all__ = ["common_args", "print_summary", "run_dir"]


def print_summary(console: Console, rows: list[dict[str, Any]], quick: bool) -> None:
    """The closing table every benchmark prints: figure, value, goal, pass/FAIL/-."""
    t = Table(title="Summary" + (" (--quick sizes)" if quick else ""))
    for col in ("figure", "value", "goal", "pass"):
        t.add_column(col)
    for row in rows:
        mark = {True: "[green]pass[/]", False: "[red]FAIL[/]", None: "-"}[row["pass"]]
        t.add_row(row["figure"], row["value"], row["goal"], mark)
    console.print(t)


def common_args(ap: argparse.ArgumentParser, quick_help: str, keep_help: str) -> None:
    """The options every benchmark takes: --quick, --json FILE, --dir DIR, --keep."""
    ap.add_argument("--quick", action="store_true", help=quick_help)
    ap.add_argument("--json", metavar="FILE", type=Path, help="also write the numbers as JSON")
    ap.add_argument("--dir", type=Path, default=None,
                    help="parent of the temporary data directories (default: system temp)")
    ap.add_argument("--keep", action="store_true", help=keep_help)


def run_dir(name: str, parent: Path | None) -> tuple[Path, str]:
    """A fresh data directory for one run (under ``--dir`` if given) and the start time
    as printed in the banner and stored in the JSON."""
    if parent is not None:
        parent.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=parent))
    return root, time.strftime("%Y-%m-%d %H:%M:%S %Z")

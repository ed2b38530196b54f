"""Shared pieces of the benchmark scripts (scripts/bench_*.py)."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table

__all__ = ["print_summary"]


def print_summary(console: Console, rows: list[dict[str, Any]], quick: bool) -> None:
    """The closing table every benchmark prints: figure, value, goal, pass/FAIL/-."""
    t = Table(title="Summary" + (" (--quick sizes)" if quick else ""))
    for col in ("figure", "value", "goal", "pass"):
        t.add_column(col)
    for row in rows:
        mark = {True: "[green]pass[/]", False: "[red]FAIL[/]", None: "-"}[row["pass"]]
        t.add_row(row["figure"], row["value"], row["goal"], mark)
    console.print(t)

"""Plot of a simulation run: available stock of the hottest SKUs at every replica over
virtual time, partitions shaded red and crashes grey (matplotlib, Agg backend)."""

from __future__ import annotations

from pathlib import Path

from mesh.sim.runner import RunResult
from mesh.sim.scenario import CUTTING

__all__ = ["plot_run"]

MAX_PANELS = 4
#: Up to this many replicas get their own colour and legend entry; beyond, by role.
MAX_NODE_LEGEND = 10
_STYLES = ("-", "--", "-.", ":")
_ROLE_COLOURS = {"register": "tab:blue", "edge": "tab:green", "cloud": "tab:purple"}


def plot_run(result: RunResult, path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    skus = result.tracked[:MAX_PANELS]
    if not skus or not result.samples:
        raise ValueError("nothing to plot: the run tracked no SKU")
    span_s = result.duration_ms / 1000
    unit, div = ("min", 60_000.0) if span_s > 1200 else ("s", 1000.0)
    if span_s > 48 * 3600:
        unit, div = "h", 3_600_000.0
    fig, axes = plt.subplots(len(skus), 1, figsize=(11, 2.6 * len(skus) + 0.6), sharex=True,
                             squeeze=False)
    xs = [s.t_ms / div for s in result.samples]
    seen_roles: list[str] = []
    for ax, sku in zip((a[0] for a in axes), skus, strict=True):
        for iv in result.intervals:
            end = iv.end_ms if iv.end_ms is not None else result.samples[-1].t_ms
            shade = "tab:red" if iv.kind in CUTTING else "0.6"
            ax.axvspan(iv.start_ms / div, end / div, color=shade, alpha=0.12, lw=0)
        lows, highs = [], []
        for s in result.samples:
            live = [y for y in s.available[sku] if y is not None]
            lows.append(min(live) if live else float("nan"))
            highs.append(max(live) if live else float("nan"))
        ax.fill_between(xs, lows, highs, step="post", color="tab:orange", alpha=0.3, lw=0,
                        label="spread between replicas" if ax is axes[0][0] else None)
        per_node = len(result.node_ids) <= MAX_NODE_LEGEND
        for i, node in enumerate(result.node_ids):
            role = result.roles[i]
            label: str | None
            colour: str | None
            ys = [s.available[sku][i] for s in result.samples]
            if per_node:
                label = node if ax is axes[0][0] else None
                colour = None
            else:
                label = role if role not in seen_roles else None
                if label:
                    seen_roles.append(role)
                colour = _ROLE_COLOURS.get(role, "tab:gray")
            ax.step(xs, [float("nan") if y is None else y for y in ys], where="post",
                    lw=1.0, alpha=0.8, color=colour, label=label,
                    linestyle=_STYLES[i % len(_STYLES)] if per_node else "-")
        ax.axhline(0, color="black", lw=0.6)
        ax.set_ylabel(f"{sku}\navailable")
        ax.grid(alpha=0.3)
    axes[0][0].set_title(f"{result.scenario}  seed {result.seed}: available stock per replica "
                         f"(red: partitions, grey: crashes)", fontsize=10)
    axes[0][0].legend(loc="upper right", fontsize=7, ncol=2)
    axes[-1][0].set_xlabel(f"virtual time ({unit})")
    fig.tight_layout()
    fig.savefig(str(path), dpi=110)
    plt.close(fig)

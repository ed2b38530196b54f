"""Edge telemetry filtering: device health and environment readings in, summaries out.

Cooler temperatures, door sensors, scanner/printer health, disk and sync-queue depth
arrive at the edge as raw readings (``POST /v1/telemetry``, ``mesh.http.sensor_routes``).
They are aggregated here into fixed windows (min/max/mean/count per device and metric)
and watched by alert rules (a threshold held for a duration, a rate of change). Only the
summaries and the alerts leave the edge: in a ``tm`` op, in an envelope of kind
``telemetry`` that the sync core sends at low priority, so the cloud receives a few
kilobytes a window instead of every reading. ``scripts/bench_telemetry.py`` measures it.

Pure: no clock, no I/O; time comes in as ``at_ms``/``now_ms``.

Invariants:
 1. A reading belongs to the window ``[k*W, (k+1)*W)`` holding its time; a window is
    emitted once, when ``flush(now)`` finds it closed (``now >= end``), and never again.
    A reading for a window already emitted is dropped and counted (``late``).
 2. A threshold alert is raised once when a rule's condition has held continuously for
    its ``for_ms`` (a reading that breaks the condition restarts the clock) and cleared
    once when a reading breaks it again; a rate alert is raised once when the change
    over a span of at least ``span_ms`` exceeds its rate, cleared once a later span's
    does not. So a steady (or merely noisy) state sends nothing.
 3. Memory is bounded: at most ``config.TELEMETRY_MAX_SERIES`` (device, metric) series;
    readings of further series are dropped and counted (``series_full``).
 4. ``validate_tm`` is pure and total (``mesh.core.ops`` invariant 6).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from mesh import config
from mesh.errors import Malformed

__all__ = ["Alert", "AlertRule", "Summary", "Telemetry", "default_rules", "validate_tm"]


@dataclass(frozen=True, slots=True)
class AlertRule:
    """``metric`` readings above ``above`` (or below ``below``) for ``for_ms``; or, with
    ``rate_per_min``, changing faster than that per minute, measured over at least
    ``span_ms`` (between consecutive 1 Hz readings the rate is mostly sensor noise)."""

    name: str
    metric: str
    above: float | None = None
    below: float | None = None
    for_ms: int = 0
    rate_per_min: float | None = None
    span_ms: int = 60_000

    def breached(self, value: float) -> bool:
        return ((self.above is not None and value > self.above)
                or (self.below is not None and value < self.below))


def default_rules() -> list[AlertRule]:
    """The rules a store starts with (the cooler rule is the issue's example)."""
    return [
        AlertRule("cooler_warm", "cooler_temp_c", above=5.0, for_ms=10 * 60_000),
        AlertRule("cooler_rising", "cooler_temp_c", rate_per_min=2.0),
        AlertRule("door_open", "door_open", above=0.5, for_ms=5 * 60_000),
        AlertRule("disk_low", "disk_free_pct", below=10.0, for_ms=60_000),
        AlertRule("sync_queue_deep", "sync_queue", above=10_000, for_ms=5 * 60_000),
    ]


@dataclass(frozen=True, slots=True)
class Summary:
    device: str
    metric: str
    start_ms: int
    count: int
    min: float
    max: float
    mean: float

    def wire(self) -> list[Any]:
        return [self.device, self.metric, self.start_ms, self.count, self.min, self.max,
                round(self.mean, 4)]


@dataclass(frozen=True, slots=True)
class Alert:
    device: str
    metric: str
    rule: str
    state: str  # "raised" | "cleared"
    at_ms: int
    value: float

    def wire(self) -> dict[str, Any]:
        return {"device": self.device, "metric": self.metric, "rule": self.rule,
                "state": self.state, "at_ms": self.at_ms, "value": self.value}


@dataclass(slots=True)
class _Window:
    start: int
    count: int = 0
    lo: float = math.inf
    hi: float = -math.inf
    total: float = 0.0


@dataclass(slots=True)
class _Series:
    windows: dict[int, _Window] = field(default_factory=dict)
    emitted_until: int = -1  # windows starting before this were emitted
    last: tuple[int, float] | None = None
    anchor: dict[str, tuple[int, float]] = field(default_factory=dict)  # rate rule -> start
    since: dict[str, int | None] = field(default_factory=dict)  # rule -> breach start
    raised: set[str] = field(default_factory=set)


class Telemetry:
    """Windows and alert state of one edge (invariants 1-3)."""

    def __init__(self, rules: list[AlertRule] | None = None,
                 window_ms: int = config.TELEMETRY_WINDOW_MS) -> None:
        self.rules = default_rules() if rules is None else rules
        self.window_ms = window_ms
        self._by_metric: dict[str, list[AlertRule]] = {}
        for rule in self.rules:
            self._by_metric.setdefault(rule.metric, []).append(rule)
        self._series: dict[tuple[str, str], _Series] = {}
        self.counts: dict[str, int] = {"accepted": 0, "late": 0, "series_full": 0}
        self.pending_alerts: list[Alert] = []

    def add(self, device: str, metric: str, value: float, at_ms: int) -> list[Alert]:
        """Take one reading; returns the alerts it raised or cleared (also queued in
        ``pending_alerts`` for the next envelope)."""
        key = (device, metric)
        series = self._series.get(key)
        if series is None:
            if len(self._series) >= config.TELEMETRY_MAX_SERIES:
                self.counts["series_full"] += 1
                return []
            series = self._series[key] = _Series()
        start = at_ms - at_ms % self.window_ms
        if start < series.emitted_until:
            self.counts["late"] += 1
            return []
        win = series.windows.get(start)
        if win is None:
            win = series.windows[start] = _Window(start)
        win.count += 1
        win.lo = min(win.lo, value)
        win.hi = max(win.hi, value)
        win.total += value
        self.counts["accepted"] += 1
        alerts = self._watch(device, metric, series, value, at_ms)
        series.last = (at_ms, value)
        self.pending_alerts.extend(alerts)
        return alerts

    def _watch(self, device: str, metric: str, series: _Series, value: float,
               at_ms: int) -> list[Alert]:
        out: list[Alert] = []
        for rule in self._by_metric.get(metric, ()):
            if rule.rate_per_min is not None:
                anchor = series.anchor.get(rule.name)
                if anchor is None or at_ms < anchor[0]:
                    series.anchor[rule.name] = (at_ms, value)
                    continue
                if at_ms - anchor[0] < rule.span_ms:
                    continue  # judged once a span, on the change over the whole span
                per_min = (value - anchor[1]) * 60_000 / (at_ms - anchor[0])
                series.anchor[rule.name] = (at_ms, value)
                hit = abs(per_min) > rule.rate_per_min
            else:
                if not rule.breached(value):
                    series.since[rule.name] = None
                    hit = False
                else:
                    since = series.since.get(rule.name)
                    if since is None:
                        since = series.since[rule.name] = at_ms
                    hit = at_ms - since >= rule.for_ms
            was = rule.name in series.raised
            if hit and not was:
                series.raised.add(rule.name)
                out.append(Alert(device, metric, rule.name, "raised", at_ms, value))
            elif not hit and was and (rule.rate_per_min is not None
                                      or not rule.breached(value)):
                series.raised.discard(rule.name)
                out.append(Alert(device, metric, rule.name, "cleared", at_ms, value))
        return out

    def flush(self, now_ms: int) -> list[Summary]:
        """Summaries of every window closed by ``now_ms``, in (device, metric, start)
        order; each window is emitted once (invariant 1)."""
        out: list[Summary] = []
        for (device, metric), series in sorted(self._series.items()):
            for start in sorted(series.windows):
                if start + self.window_ms > now_ms:
                    break
                w = series.windows.pop(start)
                out.append(Summary(device, metric, start, w.count, w.lo, w.hi,
                                   w.total / w.count))
                series.emitted_until = start + self.window_ms
        return out

    def take_alerts(self) -> list[Alert]:
        alerts, self.pending_alerts = self.pending_alerts, []
        return alerts

    def active_alerts(self) -> list[dict[str, Any]]:
        return [{"device": d, "metric": m, "rule": r}
                for (d, m), s in sorted(self._series.items()) for r in sorted(s.raised)]


def ops_for(summaries: list[Summary], alerts: list[Alert]) -> list[dict[str, Any]]:
    """``tm`` ops carrying ``summaries`` and ``alerts``, each within the op bounds."""
    per = config.TELEMETRY_MAX_PER_OP
    ops: list[dict[str, Any]] = []
    rows = [s.wire() for s in summaries]
    for i in range(0, max(len(rows), 1), per):
        ops.append({"t": "tm", "s": rows[i:i + per], "a": []})
    ops[0]["a"] = [a.wire() for a in alerts[:per]]
    return ops


def _num(value: object, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise Malformed(f"{what} must be a finite number")
    return float(value)


def _name(value: object, what: str) -> str:
    if not isinstance(value, str) or not value or len(value) > config.MAX_ID_LEN:
        raise Malformed(f"{what} must be a non-empty string of at most {config.MAX_ID_LEN} chars")
    return value


def validate_tm(op: dict[str, Any]) -> None:
    """Shape of a ``tm`` op: ``s`` summaries ``[device, metric, start, count, min, max,
    mean]`` and ``a`` alerts; raises ``Malformed``."""
    if set(op) != {"t", "s", "a"} or not isinstance(op["s"], list) or not isinstance(
            op["a"], list):
        raise Malformed("tm op needs t, s (a list of summaries) and a (a list of alerts)")
    if len(op["s"]) > config.TELEMETRY_MAX_PER_OP or len(op["a"]) > config.TELEMETRY_MAX_PER_OP:
        raise Malformed(f"tm op: at most {config.TELEMETRY_MAX_PER_OP} summaries and alerts")
    for row in op["s"]:
        if not isinstance(row, list) or len(row) != 7:
            raise Malformed("tm summary must be [device, metric, start, count, min, max, mean]")
        _name(row[0], "tm device")
        _name(row[1], "tm metric")
        if type(row[2]) is not int or type(row[3]) is not int or row[2] < 0 or row[3] < 1:
            raise Malformed("tm summary start and count must be integers (count >= 1)")
        for v in row[4:]:
            _num(v, "tm summary value")
    for a in op["a"]:
        if not isinstance(a, dict) or set(a) != {"device", "metric", "rule", "state", "at_ms",
                                                 "value"}:
            raise Malformed("tm alert needs device, metric, rule, state, at_ms, value")
        for name in ("device", "metric", "rule"):
            _name(a[name], f"tm alert {name}")
        if a["state"] not in ("raised", "cleared") or type(a["at_ms"]) is not int:
            raise Malformed("tm alert state must be raised/cleared, at_ms an integer")
        _num(a["value"], "tm alert value")

"""The sensors at a node: HTTP endpoints, the reconciliation and telemetry loops.

``SensorService`` binds the pure parts (``mesh.core.sensors``, ``mesh.core.reconcile``,
``mesh.core.reviews``, ``mesh.core.telemetry``) to one node: it validates readings and keeps
them, runs reconciliation every ``RECONCILE_INTERVAL_S`` (and on
``POST /v1/sensors/reconcile``), turns outcomes into signed envelopes through
``Node.execute``, flushes telemetry summaries, and exports its counters in
``/metrics``. ``docs/sensors.md`` is the reference.

Invariants:
 1. A refused request changes nothing: readings are validated as a whole batch
    (``mesh.core.sensors`` invariant 1) before any is kept; each refusal is counted by reason
    (``storemesh_sensor_readings_refused_total``).
 2. Reconciliation actions are idempotent: their txn ids derive from their evidence
    (``mesh.core.reviews.stable_txn``), so a rerun on the same readings is a replay; and at
    most one open item per (SKU, why) (per sensor for drift, per zone for zone shrink)
    is opened, so a steady disagreement does not flood the queue.
 3. Only an ``edge`` node takes readings and reconciles (the shelf is there);
    replenishment runs on ``edge`` (back room) and ``cloud`` (distribution centre)
    nodes; registry writes need an ``edge`` or ``cloud`` role, as the catalog.
 4. Every task this module starts is cancelled and awaited on the app's cleanup.
 5. An edge's kept readings and the recent events its phantom checks use survive a
    restart (``mesh.store.sensorstore``, ``<data dir>/sensors.sqlite``): restored before the
    first run, written before a readings request is answered.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import Any, Final

import orjson
from aiohttp import web
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric

from mesh import config
from mesh.core import reviews, telemetry
from mesh.core.crdt import HLC
from mesh.core.envelope import Envelope
from mesh.core.ops import CATALOG_ROLES
from mesh.core.reconcile import (
    DEFAULT_RULES,
    Outcome,
    Rules,
    absent_sales,
    phantom_reservations,
    reconcile_sku,
    reorder_suggestions,
    zone_shrink,
)
from mesh.core.replica import CommandResult, Replica
from mesh.core.sensors import (
    BadReading,
    Reading,
    SensorInfo,
    SensorState,
    check_batch,
    make_sensor_update,
    registry,
)
from mesh.errors import CommandError, LedgerError, StorageFull, TxnReused
from mesh.http import metrics
from mesh.http.common import (
    PATH_ID,
    ApiError,
    Spec,
    check_ident,
    check_text,
    command_fields,
    json_response,
    query_ident,
    read_object,
)
from mesh.http.gate import PRINCIPAL
from mesh.http.metrics import NodeView
from mesh.store.sensorstore import Recent, SensorStore

__all__ = ["SENSORS_KEY", "SensorService", "load_rules", "setup_fleet_sensors",
           "setup_sensor_routes"]

log = logging.getLogger(__name__)

RULES_FILE: Final = "sensor_rules.json"
#: Recent sales and shrink adjustments kept for phantom-stock checks (edge inputs).
_RECENT: Final = 10_000
#: Window of sales the replenishment rate is computed over (days).
_RATE_DAYS: Final = 7.0
_DAY_MS: Final = 86_400_000
#: Warnings (low-confidence outcomes) kept for GET /v1/sensors/outcomes.
_WARNINGS: Final = 200
_PUT: Final[Spec] = {"txn_id": (check_ident, False), "staff_id": (check_ident, False),
               **{k: ((lambda v, f: v), False) for k in (
                   "kind", "zone", "skus", "unit_grams", "tare_grams", "calibrated_ms",
                   "drift_tolerance", "owner", "status")}}
_RESOLVE: Final[Spec] = {"resolution": (check_ident, True), "txn_id": (check_ident, False),
                   "staff_id": (check_ident, False), "note": (check_text, False)}


def load_rules(data_dir: Path | None) -> Rules:
    """The node's rules: ``<data dir>/sensor_rules.json`` if present, else the defaults.
    A file that does not parse is an operator's mistake: raise with its reason."""
    if data_dir is not None and (data_dir / RULES_FILE).exists():
        return Rules.from_dict(orjson.loads((data_dir / RULES_FILE).read_bytes()))
    return Rules.from_dict(DEFAULT_RULES)


class SensorService:
    """Sensors, reconciliation, telemetry and replenishment of one node."""

    def __init__(self, node: NodeView, rules: Rules, data_dir: Path | None = None) -> None:
        self.node = node
        self.rules = rules
        self.data_dir = data_dir
        #: the edge's readings and recent events on disk (``mesh.store.sensorstore``)
        self.store: SensorStore | None = None
        self.state = SensorState()
        self.telemetry = telemetry.Telemetry()
        self.outcomes: dict[str, Outcome] = {}
        self.warnings: deque[dict[str, Any]] = deque(maxlen=_WARNINGS)
        self.actions: dict[str, int] = {a: 0 for a in ("auto", "review", "warn", "ok",
                                                       "drift", "phantom", "replenish")}
        self.reserved_at: dict[str, int] = {}
        #: sku -> when the ledger (as this node saw it) last moved its stock
        self.moved: dict[str, int] = {}
        self.sales: deque[tuple[str, str, int, int]] = deque(maxlen=_RECENT)
        self.shrink: deque[tuple[str, int, int]] = deque(maxlen=_RECENT)
        #: replicated telemetry seen (every node): (origin, device, metric, rule) -> alert
        self.alerts: dict[tuple[str, str, str, str], dict[str, Any]] = {}
        self.summaries_seen = 0
        self.auto_seen = 0
        self.reviews_seen = 0
        self.suggestions: list[dict[str, Any]] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._lock = asyncio.Lock()
        self._registry: tuple[int, bytes, dict[str, SensorInfo]] | None = None

    def sensors(self) -> dict[str, SensorInfo]:
        """The registry, parsed again only when the catalog document changed: parsing
        costs ~60 µs a sensor (128 ms for 2,000), too much per batch of readings on the
        event loop; the document's state vector (~5 µs) tells whether it changed."""
        doc = self.node.replica.catalog
        state = doc.get_state()
        cached = self._registry
        if cached is None or cached[0] != id(doc) or cached[1] != state:
            self._registry = cached = (id(doc), state, registry(doc))
        return cached[2]

    @property
    def role(self) -> str:
        return self.node.identity.role

    # --- envelopes seen (local and remote) -------------------------------------------

    def on_envelopes(self, batch: list[Envelope]) -> None:
        kept: list[Recent] = []  # what the phantom checks need after a restart
        for env in batch:
            meta = env.meta
            kind = meta.get("kind")
            at = env.hlc >> 16
            for op in env.ops:
                sku = op.get("sku") if op.get("t") == "pn" else None
                if isinstance(sku, str) and at > self.moved.get(sku, -1) and (
                        sku in self.moved or len(self.moved) < _RECENT):
                    self.moved[sku] = at  # reconcile_sku's moved_ms (reconcile inv. 5)
                    kept.append(("moved", sku, sku, at, 0))
            if kind == "reserve":
                for op in env.ops:
                    for rid in op.get("rec", {}) if op.get("t") == "rs" else ():
                        if len(self.reserved_at) < config.MAX_PENDING_PER_ORIGIN * 4:
                            self.reserved_at[rid] = at
                            kept.append(("reserve", rid, "", at, 0))
            elif kind == "sale" and isinstance(meta.get("sku"), str):
                sale = (f"{env.origin}:{env.seq}", meta["sku"], at,
                        -int(meta.get("qty") or 0))
                self.sales.append(sale)
                kept.append(("sale", *sale))
            elif kind == "adjust" and meta.get("reason") in ("sensor_reconcile",
                                                             "review_accept"):
                if meta.get("reason") == "sensor_reconcile":
                    self.auto_seen += 1
                qty = meta.get("qty")
                if type(qty) is int and qty < 0:
                    zone = self._zone_of(str(meta.get("sku")))
                    self.shrink.append((zone, at, qty))
                    kept.append(("shrink", f"{env.origin}:{env.seq}", zone, at, qty))
            elif kind == "review" and meta.get("reason") == "open:sensor_disagree":
                self.reviews_seen += 1
            elif kind == "telemetry":
                for op in env.ops:
                    if op.get("t") != "tm":
                        continue
                    self.summaries_seen += len(op["s"])
                    for a in op["a"]:
                        key = (env.origin, a["device"], a["metric"], a["rule"])
                        if a["state"] == "cleared":
                            self.alerts.pop(key, None)
                        elif len(self.alerts) < config.TELEMETRY_MAX_SERIES:
                            self.alerts[key] = {**a, "origin": env.origin}
        if kept and self.store is not None:
            self.store.add_recent(kept)  # the store's thread owns it (sensorstore inv. 2)

    def _zone_of(self, sku: str) -> str:
        zones = sorted(s.zone for s in self.sensors().values() if sku in s.skus)
        return zones[0] if zones else "-"

    # --- commands ------------------------------------------------------------------------

    async def _run(self, fn: Callable[[Replica], CommandResult]) -> CommandResult | None:
        try:
            return await self.node.execute(fn)
        except (CommandError, LedgerError) as exc:
            log.warning("sensor action refused: %s", exc)
            return None

    def _open_exists(self, sku: str, why: str, mark: str | None = None) -> bool:
        return any(i.why == why and (mark is None or mark in i.evidence or i.zone == mark)
                   for i in self.node.replica.reviews.open_items(sku))

    async def _open(self, *, sku: str, why: str, delta: int, score: int, evidence: list[str],
                    zone: str | None, txn: str, now: int) -> bool:
        res = await self._run(lambda r: reviews.open_item(
            r, sku=sku, why=why, delta=delta, score=score, evidence=evidence, zone=zone,
            now_ms=now, txn=txn))
        return res is not None and not res.duplicate

    async def reconcile(self) -> dict[str, Any]:
        """One reconciliation run (invariants 2, 3); returns what it did."""
        async with self._lock:
            return await self._reconcile()

    async def _reconcile(self) -> dict[str, Any]:
        now = self.node.now_ms()
        replica = self.node.replica
        sensors = self.sensors()
        done: dict[str, list[Any]] = {"auto": [], "review": [], "warn": [], "drift": [],
                                      "phantom": [], "replenish": []}
        budget = config.RECONCILE_MAX_ACTIONS
        if self.role == "edge":
            for sku, history in sorted(self.state.by_sku().items()):
                if budget <= 0:
                    break
                out = reconcile_sku(sku, replica.on_hand(sku), history, sensors, self.rules,
                                    now, self.moved.get(sku))
                self.outcomes[sku] = out
                budget -= await self._act(out, sensors, now, done)
            budget -= await self._phantoms(now, sensors, done, budget)
        if self.role in ("edge", "cloud") and budget > 0:
            await self._replenish(now, done, budget)
        return {k: v for k, v in done.items()}

    async def _act(self, out: Outcome, sensors: dict[str, Any], now: int,
                   done: dict[str, list[Any]]) -> int:
        n = 0
        zone = next((sensors[s.sensor].zone for s in out.signals), None)
        for sid in out.drifting:
            if not self._open_exists(out.sku, "sensor_drift", sid):
                txn = reviews.stable_txn("drift", sid, out.sku, now // _DAY_MS)
                if await self._open(sku=out.sku, why="sensor_drift", delta=0, score=0,
                                    evidence=[sid], zone=sensors[sid].zone, txn=txn, now=now):
                    done["drift"].append(sid)
                    self.actions["drift"] += 1
                    n += 1
        if out.action == "auto":
            txn = reviews.stable_txn("rec", out.sku, out.expected, out.evidence)
            staff = self._counted_by(out)
            res = await self._run(lambda r: reviews.auto_adjust(
                r, sku=out.sku, delta=out.delta, score=out.score, readings=list(out.evidence),
                rule=out.rule, now_ms=now, txn=txn, staff=staff))
            if res is not None and not res.duplicate:
                done["auto"].append({"sku": out.sku, "delta": out.delta, "score": out.score,
                                     "seq": res.seq})
                self.actions["auto"] += 1
                n += 1
        elif out.action == "review":
            if not self._open_exists(out.sku, "sensor_disagree"):
                txn = reviews.stable_txn("rv", out.sku, out.expected, out.evidence)
                if await self._open(sku=out.sku, why="sensor_disagree", delta=out.delta,
                                    score=out.score, evidence=list(out.evidence), zone=zone,
                                    txn=txn, now=now):
                    done["review"].append({"sku": out.sku, "delta": out.delta,
                                           "score": out.score})
                    self.actions["review"] += 1
                    n += 1
        elif out.action == "warn":
            self.actions["warn"] += 1
            self.warnings.append({"at_ms": now, **out.to_dict()})
            done["warn"].append({"sku": out.sku, "delta": out.delta, "score": out.score})
        elif out.action == "ok":
            self.actions["ok"] += 1
        if out.action in ("ok", "auto") and any(
                sig.kind == "count" and sig.agrees for sig in out.signals):
            n += await self._close_counts(out.sku, now)
        return n

    def _counted_by(self, out: Outcome) -> str | None:
        """The staff (from their sessions) whose agreeing manual counts back ``out``."""
        names: set[str] = set()
        for sig in out.signals:
            if sig.kind == "count" and sig.agrees:
                for r in self.state.readings.get(sig.sensor, ()):
                    if r.id == sig.reading and r.staff is not None:
                        names.add(r.staff)
        return ",".join(sorted(names))[: config.MAX_ID_LEN] or None

    async def _close_counts(self, sku: str, now: int) -> int:
        """A manual count settled the SKU: close its ``count_requested`` items."""
        n = 0
        for item in self.node.replica.reviews.open_items(sku):
            if item.why != "count_requested":
                continue
            res = await self._run(partial(reviews.resolve, rid=item.id, resolution="accept",
                                          now_ms=now, note="counted",
                                          txn=reviews.stable_txn("cnt", item.id)))
            n += res is not None and not res.duplicate
        return n

    async def _phantoms(self, now: int, sensors: dict[str, Any], done: dict[str, list[Any]],
                        budget: int) -> int:
        replica = self.node.replica
        active = replica.active_reservations()
        live = {r.id for r in active}
        gone = [r for r in self.reserved_at if r not in live]
        for rid in gone:
            del self.reserved_at[rid]
        if gone and self.store is not None:
            self.store.forget_recent("reserve", gone)
        found: list[tuple[str, str, str | None, list[str]]] = []  # why, sku, zone, evidence
        for rid, sku in phantom_reservations(
                [(r.id, r.sku, r.qty, self.reserved_at.get(r.id)) for r in active],
                self.rules, now):
            found.append(("phantom_reservation", sku, None, [rid]))
        shelf: dict[str, list[tuple[int, float, str]]] = {}
        for sku, history in self.state.by_sku().items():
            for sid, rs in history.items():
                info = sensors.get(sid)
                if info is None or info.kind not in ("weight", "rfid"):
                    continue
                for r in rs:
                    units = r.value if info.kind == "rfid" else (
                        (r.value - info.tare_grams) / (info.unit_grams or 1.0))
                    shelf.setdefault(sku, []).append((r.at_ms, units, r.id))
        for points in shelf.values():
            points.sort()
        for key, sku in absent_sales([(k, s, at) for k, s, at, _ in self.sales], shelf):
            found.append(("absent_sale", sku, None, [key]))
        zone_skus: dict[str, str] = {}
        for info in sensors.values():
            zone_skus.setdefault(info.zone, info.skus[0])
        for z, count in zone_shrink(list(self.shrink), self.rules, now):
            found.append(("zone_shrink", zone_skus.get(z, z), z, [f"{z}:{count}"]))
        n = 0
        for why, sku, zone, evidence in found:
            if n >= budget:
                break
            if why == "zone_shrink" and self._open_exists(sku, why, zone):
                continue
            txn = reviews.stable_txn("ph", why, sku, evidence)
            if await self._open(sku=sku, why=why, delta=0, score=0, evidence=evidence,
                                zone=zone, txn=txn, now=now):
                done["phantom"].append({"why": why, "sku": sku, "evidence": evidence})
                self.actions["phantom"] += 1
                n += 1
        return n

    async def _replenish(self, now: int, done: dict[str, list[Any]], budget: int) -> None:
        replica = self.node.replica
        since = now - int(_RATE_DAYS * _DAY_MS)
        sold: dict[str, int] = {}
        for _, sku, at, qty in self.sales:
            if at >= since:
                sold[sku] = sold.get(sku, 0) + qty
        available = {sku: replica.available(sku) for sku in replica.skus()}
        self.suggestions = reorder_suggestions(available, sold, _RATE_DAYS, self.rules)
        source = "dc" if self.role == "cloud" else "backroom"
        for s in self.suggestions[:budget]:
            if self._open_exists(s["sku"], "replenish"):
                continue
            evidence = [f"source:{source}", f"qty:{s['suggested_qty']}",
                        f"point:{s['reorder_point']}", f"available:{s['available']}"]
            txn = reviews.stable_txn("rp", s["sku"], source, now // 60_000)
            if await self._open(sku=s["sku"], why="replenish", delta=0, score=0,
                                evidence=evidence, zone=None, txn=txn, now=now):
                done["replenish"].append({**s, "source": source})
                self.actions["replenish"] += 1

    async def flush_telemetry(self, *, force_until: int | None = None) -> int | None:
        """Send closed windows' summaries and pending alerts in one ``telemetry``
        envelope (low priority on the WAN); returns its seq, or None if nothing to send."""
        now = self.node.now_ms() if force_until is None else force_until
        summaries = self.telemetry.flush(now)
        alerts = self.telemetry.take_alerts()
        if not summaries and not alerts:
            return None
        ops = telemetry.ops_for(summaries, alerts)
        txn = reviews.stable_txn("tm", self.node.identity.node_id, now,
                                 len(summaries), len(alerts))
        meta = {"kind": "telemetry", "txn": txn,
                "note": f"{len(summaries)} summaries, {len(alerts)} alerts"}

        def command(r: Replica) -> CommandResult:
            env = r._local(ops, meta, self.node.now_ms())  # no idempotency: a new batch
            return CommandResult(env, r.node_id, env.seq)

        res = await self._run(command)
        return None if res is None else res.seq

    # --- loops ------------------------------------------------------------------------

    async def _every(self, seconds: float, step: Callable[[], Awaitable[Any]],
                     name: str) -> None:
        while True:
            await asyncio.sleep(seconds)
            try:
                await step()
            except (LedgerError, CommandError, StorageFull) as exc:
                log.warning("%s failed: %s", name, exc)

    async def _restore(self) -> None:
        """Readings and recent events kept before a restart (``mesh.store.sensorstore``)."""
        assert self.data_dir is not None
        self.store = store = SensorStore(self.data_dir)
        readings, recent = await asyncio.to_thread(store.load, self.node.now_ms())
        self.state.restore(readings)
        for kind, key, sku, at, qty in recent:
            if kind == "reserve":
                self.reserved_at[key] = at
            elif kind == "sale":
                self.sales.append((key, sku, at, qty))
            elif kind == "shrink":
                self.shrink.append((sku, at, qty))
            elif kind == "moved":
                self.moved[key] = at
        if readings or recent:
            log.info("sensors: %d readings and %d recent events kept from before the "
                     "restart", len(readings), len(recent))

    async def on_startup(self, app: web.Application) -> None:
        if self.role == "edge" and self.data_dir is not None:
            await self._restore()
        if self.role in ("edge", "cloud"):
            self._tasks.append(asyncio.create_task(self._every(
                config.RECONCILE_INTERVAL_S, self.reconcile, "reconciliation")))
        if self.role == "edge":
            self._tasks.append(asyncio.create_task(self._every(
                config.TELEMETRY_FLUSH_S, self.flush_telemetry, "telemetry flush")))

    async def on_cleanup(self, app: web.Application) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
        if self.store is not None:
            await asyncio.to_thread(self.store.close)

    # --- metrics ----------------------------------------------------------------------

    def collect(self) -> Iterable[Metric]:
        st = self.state
        readings = CounterMetricFamily(
            "storemesh_sensor_readings", "Sensor readings taken at this edge, by outcome.",
            labels=["outcome"])
        readings.add_metric(["accepted"], st.accepted)
        readings.add_metric(["duplicate"], st.duplicates)
        yield readings
        refused = CounterMetricFamily(
            "storemesh_sensor_readings_refused",
            "Sensor reading batches refused, by reason (nothing of the batch was kept).",
            labels=["reason"])
        for reason, n in sorted(st.refused.items()):
            refused.add_metric([reason], n)
        yield refused
        actions = CounterMetricFamily(
            "storemesh_reconcile_actions",
            "Reconciliation outcomes at this node (auto = signed sensor_reconcile "
            "adjustments, review = items opened, warn = low confidence only).",
            labels=["action"])
        for action, n in sorted(self.actions.items()):
            actions.add_metric([action], n)
        yield actions
        open_items = GaugeMetricFamily(
            "storemesh_review_items_open", "Open review items held here, by why.",
            labels=["why"])
        counts: dict[str, int] = {w: 0 for w in sorted(reviews.WHY)}
        for item in self.node.replica.reviews.open_items():
            counts[item.why] = counts.get(item.why, 0) + 1
        for why, n in counts.items():
            open_items.add_metric([why], n)
        yield open_items
        yield CounterMetricFamily(
            "storemesh_review_items_retired",
            "Resolved review items retired here after REVIEW_RETAIN_MS (mesh.core.reviews inv. 6).",
            value=self.node.replica.reviews.retired)
        yield GaugeMetricFamily(
            "storemesh_replenishment_suggestions",
            "SKUs at or below their reorder point at the last run.",
            value=len(self.suggestions))
        yield GaugeMetricFamily(
            "storemesh_telemetry_alerts_active",
            "Telemetry alerts raised and not cleared, as replicated to this node.",
            value=len(self.alerts))
        yield CounterMetricFamily(
            "storemesh_sensor_store_errors",
            "Failed writes of readings or recent events to sensors.sqlite (they stay in "
            "memory; a restart then forgets them).",
            value=0 if self.store is None else self.store.errors)
        tele = CounterMetricFamily(
            "storemesh_telemetry_readings", "Telemetry readings at this edge, by outcome.",
            labels=["outcome"])
        for k, n in sorted(self.telemetry.counts.items()):
            tele.add_metric([k], n)
        yield tele

    # --- fleet view (the cloud dashboard) ----------------------------------------------

    def fleet_row(self, now: int) -> dict[str, Any]:
        items = self.node.replica.reviews.open_items()
        decided = self.auto_seen + self.reviews_seen
        return {
            "review_open": len(items),
            "review_oldest_age_ms": max((now - i.opened for i in items), default=None),
            "auto_adjustments": self.auto_seen,
            "reviews_opened": self.reviews_seen,
            "auto_share": None if decided == 0 else round(self.auto_seen / decided, 3),
            "alerts": sorted(self.alerts.values(), key=lambda a: (a["origin"], a["device"])),
            "replenish": [i.to_dict() for i in items if i.why == "replenish"],
        }


# --- HTTP ---------------------------------------------------------------------------------

SENSORS_KEY: Final = web.AppKey("storemesh_sensors", SensorService)


class _Routes:
    def __init__(self, svc: SensorService) -> None:
        self.svc = svc
        self.node = svc.node

    def _edge_only(self, what: str) -> None:
        if self.svc.role != "edge":
            raise ApiError(403, f"{what} are taken by the store's edge node, not a "
                                f"{self.svc.role} node", "role")

    async def put_sensor(self, request: web.Request) -> web.Response:
        node = self.node
        if node.identity.role not in CATALOG_ROLES:
            raise ApiError(403, f"a {node.identity.role} node may not write the sensor "
                                "registry; change it on the edge (manager) or cloud node",
                           "role")
        sid = check_ident(request.match_info["sid"], "sensor_id")
        f = command_fields(await read_object(request), _PUT, request)
        entry = {k: v for k, v in f.items() if k not in ("txn_id", "staff_id", "key", "staff")}
        try:
            from mesh.core.sensors import check_entry

            check_entry(entry)
        except CommandError as exc:
            raise ApiError(400, exc.message, exc.field) from None
        change = orjson.dumps(entry, option=orjson.OPT_SORT_KEYS).decode()

        def command(r: Replica) -> CommandResult:
            now = node.now_ms()
            rev = HLC(r.hlc.last).now(now)
            update = make_sensor_update(r.catalog, sid, entry, rev=rev, by=r.node_id)
            return r.update_catalog(update, txn=f["key"], now_ms=now, staff=f["staff"],
                                    note=f"sensor:{sid} {change}"[: config.MAX_TEXT_LEN])

        res = await self._execute(command)
        info = self.svc.sensors().get(sid)
        return json_response({"txn_id": f["txn_id"], "origin": res.origin, "seq": res.seq,
                      "duplicate": res.duplicate, **(info.to_dict() if info else {})},
                     200 if res.duplicate else 201)

    async def _execute(self, fn: Callable[[Replica], CommandResult]) -> CommandResult:
        try:
            return await self.node.execute(fn)
        except TxnReused as exc:
            raise ApiError(422, exc.message, "txn_id") from None
        except CommandError as exc:
            status = 409 if exc.field == "review_id" else 400
            raise ApiError(status, exc.message, exc.field) from None
        except StorageFull:
            raise ApiError(507, "this node's disk is full: NOT recorded; retry with the "
                                "same txn_id") from None
        except LedgerError:
            raise ApiError(503, "the ledger write failed: NOT recorded; retry with the "
                                "same txn_id") from None

    async def list_sensors(self, request: web.Request) -> web.Response:
        reg = self.svc.sensors()
        return json_response({"sensors": [s.to_dict() for s in reg.values()]})

    async def get_sensor(self, request: web.Request) -> web.Response:
        sid = check_ident(request.match_info["sid"], "sensor_id")
        info = self.svc.sensors().get(sid)
        if info is None:
            raise ApiError(404, f"unknown sensor {sid!r}", "sensor_id")
        kept = [asdict(r) for r in self.svc.state.readings.get(sid, ())]
        return json_response({**info.to_dict(), "recent_readings": kept})

    async def readings(self, request: web.Request) -> web.Response:
        st = self.svc.state
        try:
            self._edge_only("sensor readings")
            try:
                body = await read_object(request)
            except ApiError as exc:
                raise BadReading(exc.status, "body_too_large" if exc.status == 413
                                 else "malformed", exc.field, exc.message) from None
            p = request[PRINCIPAL]
            batch = check_batch(body, self.svc.sensors(), self.node.now_ms(), p.staff_meta)
            if p.device.role == "pos" and any(r.kind != "count" for r in batch):
                raise BadReading(403, "till_not_count", "readings",
                                 "a till posts manual counts only (kind count); other "
                                 "readings come from a sensor gateway's credential")
        except ApiError:
            st.refuse("wrong_role")
            raise
        except BadReading as exc:
            st.refuse(exc.reason)
            raise ApiError(exc.status, exc.message, exc.field) from None
        kept: list[Reading] = []
        new = st.add(batch, kept)
        if kept and self.svc.store is not None:
            with contextlib.suppress(Exception):  # logged and counted by the store (inv. 3)
                await asyncio.wrap_future(self.svc.store.add_readings(kept))
        return json_response({"accepted": new, "duplicates": len(batch) - new}, 200)

    async def reconcile(self, request: web.Request) -> web.Response:
        if self.svc.role not in ("edge", "cloud"):
            raise ApiError(403, "reconciliation runs on the edge (and replenishment on "
                                "the cloud)", "role")
        return json_response(await self.svc.reconcile())

    async def outcomes(self, request: web.Request) -> web.Response:
        sku = query_ident(request, "sku")
        rows = [o.to_dict() for s, o in sorted(self.svc.outcomes.items())
                if sku is None or s == sku]
        return json_response({"outcomes": rows, "warnings": list(self.svc.warnings)})

    async def list_reviews(self, request: web.Request) -> web.Response:
        sku = query_ident(request, "sku")
        why = request.query.get("why")
        rs = self.node.replica.reviews
        if request.query.get("all") == "1":
            ids = sorted(rs.records)
        else:
            ids = [i.id for i in rs.open_items(sku)]
        out = []
        for rid in ids:
            v = rs.view(rid)
            if v is not None and (sku is None or v["sku"] == sku) and (
                    why is None or v["why"] == why):
                out.append(v)
        return json_response({"reviews": out[: 10_000]})

    async def get_review(self, request: web.Request) -> web.Response:
        rid = check_ident(request.match_info["rid"], "review_id")
        v = self.node.replica.reviews.view(rid)
        if v is None:
            raise ApiError(404, f"no review item {rid!r}", "review_id")
        return json_response(v)

    async def resolve(self, request: web.Request) -> web.Response:
        rid = check_ident(request.match_info["rid"], "review_id")
        f = command_fields(await read_object(request), _RESOLVE, request)
        if f["resolution"] not in reviews.RESOLUTIONS:
            raise ApiError(400, f"resolution must be one of {', '.join(reviews.RESOLUTIONS)}",
                           "resolution")
        now = self.node.now_ms
        res = await self._execute(lambda r: reviews.resolve(
            r, rid, f["resolution"], now_ms=now(), txn=f["key"], staff=f["staff"],
            note=f.get("note")))
        view = self.node.replica.reviews.view(rid) or {}
        return json_response({"txn_id": f["txn_id"], "origin": res.origin, "seq": res.seq,
                      "duplicate": res.duplicate, **view}, 200 if res.duplicate else 201)

    async def replenishment(self, request: web.Request) -> web.Response:
        items = [i.to_dict() for i in self.node.replica.reviews.open_items()
                 if i.why == "replenish"]
        return json_response({"suggestions": self.svc.suggestions, "open": items})

    async def post_telemetry(self, request: web.Request) -> web.Response:
        self._edge_only("telemetry readings")
        if request[PRINCIPAL].device.role == "pos":
            raise ApiError(403, "telemetry comes from a sensor gateway's credential, not a "
                                "till's", "Authorization")
        body = await read_object(request)
        rows = body.get("readings")
        if set(body) != {"readings"} or not isinstance(rows, list) or not rows:
            raise ApiError(400, 'the body must be {"readings": [...]}', "readings")
        if len(rows) > config.TELEMETRY_MAX_BATCH:
            raise ApiError(413, f"at most {config.TELEMETRY_MAX_BATCH} readings per request",
                           "readings")
        now = self.node.now_ms()
        parsed = []
        for i, r in enumerate(rows):
            at = f"readings[{i}]"
            if not isinstance(r, dict) or set(r) != {"device", "metric", "value", "at_ms"}:
                raise ApiError(400, "a telemetry reading is {device, metric, value, at_ms}", at)
            check_ident(r["device"], f"{at}.device")
            check_ident(r["metric"], f"{at}.metric")
            try:
                v = telemetry._num(r["value"], "value")
            except Exception:
                raise ApiError(400, "value must be a finite number", f"{at}.value") from None
            t = r["at_ms"]
            if type(t) is not int or t > now + config.SENSOR_MAX_FUTURE_MS or (
                    t < now - config.SENSOR_MAX_AGE_MS):
                raise ApiError(400, "at_ms must be a time in ms, not in the future nor "
                                    "older than an hour", f"{at}.at_ms")
            parsed.append((r["device"], r["metric"], v, t))
        alerts = []
        for device, metric, v, t in parsed:
            alerts.extend(self.svc.telemetry.add(device, metric, v, t))
        if alerts:  # alerts go out at once; summaries with the next flush
            await self.svc.flush_telemetry()
        return json_response({"accepted": len(parsed), "alerts": [a.wire() for a in alerts]})

    async def get_alerts(self, request: web.Request) -> web.Response:
        return json_response({"alerts": sorted(self.svc.alerts.values(),
                                       key=lambda a: (a["origin"], a["device"], a["rule"])),
                      "local_active": self.svc.telemetry.active_alerts()})


def setup_sensor_routes(app: web.Application, node: NodeView,
                        data_dir: Path | None = None) -> SensorService:
    """Add the sensor endpoints of ``node`` to ``app`` (docs/sensors.md)."""
    if SENSORS_KEY in app:
        return app[SENSORS_KEY]
    svc = SensorService(node, load_rules(data_dir), data_dir)
    app[SENSORS_KEY] = svc
    listeners = getattr(node, "listeners", None)
    if isinstance(listeners, list):
        listeners.append(svc.on_envelopes)
    metrics.add_source(node, svc.collect)
    app.on_startup.append(svc.on_startup)
    app.on_cleanup.append(svc.on_cleanup)
    h = _Routes(svc)
    r = app.router
    r.add_get("/v1/sensors", h.list_sensors)
    r.add_post("/v1/sensors/readings", h.readings)
    r.add_post("/v1/sensors/reconcile", h.reconcile)
    r.add_get("/v1/sensors/outcomes", h.outcomes)
    r.add_get(f"/v1/sensors/{{sid:{PATH_ID}}}", h.get_sensor)
    r.add_put(f"/v1/sensors/{{sid:{PATH_ID}}}", h.put_sensor)
    r.add_get("/v1/reviews", h.list_reviews)
    r.add_get(f"/v1/reviews/{{rid:{PATH_ID}}}", h.get_review)
    r.add_post(f"/v1/reviews/{{rid:{PATH_ID}}}/resolve", h.resolve)
    r.add_get("/v1/replenishment", h.replenishment)
    r.add_post("/v1/telemetry", h.post_telemetry)
    r.add_get("/v1/telemetry/alerts", h.get_alerts)
    return svc


# --- the fleet view (cloud) ------------------------------------------------------------


def setup_fleet_sensors(cloud: Any) -> None:
    """``CloudNode.setup_hooks`` entry: ``GET /v1/fleet/sensors``, one row per store: open
    review items and the oldest one's age, the auto-reconciled share (seen since the
    cloud started), active telemetry alerts and open replenishment suggestions."""

    async def fleet(request: web.Request) -> web.Response:
        rows = []
        for store_id, node in sorted(cloud.nodes.items()):
            svc = node.app.get(SENSORS_KEY)
            if svc is not None:
                rows.append({"store": store_id, **svc.fleet_row(node.now_ms())})
        return json_response({"stores": rows})

    cloud.app.router.add_get("/v1/fleet/sensors", fleet)

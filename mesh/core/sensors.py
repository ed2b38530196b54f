"""Sensors: the registry (replicated) and their readings (edge inputs, not replicated).

The **registry** lives in the replica's catalog document (root map ``"sensors"``), so it
travels like the catalog: as a Yjs update inside a signed ``cat`` op, written only by
``edge`` and ``cloud`` roles (``mesh.core.ops.check_rights``), every write in the audit log
(kind ``catalog``, note ``sensor:<id> ...``). Each entry is one JSON string (a registry
change rewrites the sensor's entry whole: changes are rare and made by one manager).

**Readings** (shelf-scale grams, RFID tag counts, vision estimates, manual counts) are
inputs at the edge: validated here, kept in a bounded window per sensor
(``SensorState``), and turned by ``mesh.core.reconcile`` into adjustments and review items,
which *are* replicated. Raw readings never leave the edge.

Invariants:
 1. ``check_batch`` is total and all-or-nothing: it returns every reading of the batch
    validated, or raises ``BadReading`` for the first bad one (its index, field and a
    reason counted in ``/metrics``); nothing is stored then.
 2. A reading is accepted only from a sensor in the registry that is ``active``, has a
    calibration date, reports its own kind, and maps the reading's SKU; its value is a
    finite, non-negative number within ``SENSOR_MAX_VALUE``; its time is no more than
    ``SENSOR_MAX_FUTURE_MS`` ahead of the edge's clock nor ``SENSOR_MAX_AGE_MS`` behind.
 3. Memory is bounded: ``SENSOR_READINGS_KEPT`` readings and ``SENSOR_SEEN_IDS`` ids per
    sensor, at most ``SENSOR_MAX_SENSORS`` sensors. A reading id seen before for its
    sensor is a replay: dropped and counted (``duplicate``), never an error.
 4. Registry reads are total: an entry that does not parse reads as absent.
 5. Who made a manual count is the caller's staff session, never a body field: a
    reading naming ``staff_id`` (or ``staff``) is refused (``staff_in_body``).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Any, Final

import orjson
import pycrdt

from mesh import config
from mesh.core.catalog import client_id
from mesh.core.crdt.hlc import MAX_TS
from mesh.errors import CommandError

__all__ = [
    "CALIBRATION",
    "KINDS",
    "BadReading",
    "Reading",
    "SensorInfo",
    "SensorState",
    "check_batch",
    "check_entry",
    "make_sensor_update",
    "registry",
    "sensor",
]

KINDS: Final = ("weight", "rfid", "vision", "count")
#: A reading's report of its sensor's calibration: ok, due (past its date: trusted
#: less), failed (the sensor knows it is off: refused as uncalibrated).
CALIBRATION: Final = ("ok", "due", "failed")
_ROOT: Final = "sensors"
_ENTRY: Final = ("kind", "zone", "skus", "unit_grams", "tare_grams", "calibrated_ms",
                 "drift_tolerance", "owner", "status")
_READING: Final = frozenset({"id", "sensor", "kind", "sku", "value", "at_ms", "confidence",
                             "calibration"})

Doc = pycrdt.Doc[Any]


@dataclass(frozen=True, slots=True)
class SensorInfo:
    id: str
    kind: str
    zone: str
    skus: tuple[str, ...]
    unit_grams: float | None
    tare_grams: float
    calibrated_ms: int | None
    drift_tolerance: float
    owner: str | None
    status: str
    rev: int = 0
    by: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "kind": self.kind, "zone": self.zone, "skus": list(self.skus),
                "unit_grams": self.unit_grams, "tare_grams": self.tare_grams,
                "calibrated_ms": self.calibrated_ms, "drift_tolerance": self.drift_tolerance,
                "owner": self.owner, "status": self.status, "rev": self.rev, "by": self.by}


@dataclass(frozen=True, slots=True)
class Reading:
    id: str
    sensor: str
    kind: str
    sku: str
    value: float
    at_ms: int
    confidence: float | None = None  # vision: the model's own confidence, 0..1
    calibration: str = "ok"
    staff: str | None = None  # a manual count: who counted (the staff session's, never the body's)


# --- the registry ---------------------------------------------------------------------


def _root(doc: Doc) -> pycrdt.Map[Any]:
    root: pycrdt.Map[Any] = doc.get(_ROOT, type=pycrdt.Map)
    return root


def _err(message: str, field: str) -> CommandError:
    return CommandError(message, field)


def _id(value: object, field: str) -> str:
    if not isinstance(value, str) or not value or len(value) > config.MAX_ID_LEN:
        raise _err(f"{field} must be a non-empty string of at most {config.MAX_ID_LEN} "
                   "characters", field)
    return value


def _finite(value: object, field: str, lo: float, hi: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(
            value) or not lo <= value <= hi:
        raise _err(f"{field} must be a finite number in {lo:g}..{hi:g}", field)
    return float(value)


def check_entry(fields: dict[str, Any]) -> dict[str, Any]:
    """A registry entry as written (all fields; ``CommandError`` naming the first bad one)."""
    unknown = sorted(set(fields) - set(_ENTRY))
    if unknown:
        raise _err(f"unknown sensor field {unknown[0]!r}; allowed: {', '.join(_ENTRY)}",
                   unknown[0])
    kind = fields.get("kind")
    if kind not in KINDS:
        raise _err(f"kind must be one of {', '.join(KINDS)}", "kind")
    zone = _id(fields.get("zone"), "zone")
    skus = fields.get("skus")
    if not isinstance(skus, list) or not 0 < len(skus) <= config.SENSOR_MAX_SKUS or len(
            set(skus)) != len(skus):
        raise _err(f"skus must be a list of 1..{config.SENSOR_MAX_SKUS} distinct SKUs", "skus")
    for s in skus:
        _id(s, "skus")
    unit = fields.get("unit_grams")
    if kind == "weight":
        unit = _finite(unit, "unit_grams", 0.001, config.SENSOR_MAX_VALUE)
        if len(skus) != 1:
            raise _err("a weight sensor (shelf scale) weighs exactly one SKU", "skus")
    elif unit is not None:
        raise _err("unit_grams is for weight sensors only", "unit_grams")
    tare = _finite(fields.get("tare_grams", 0), "tare_grams", 0, config.SENSOR_MAX_VALUE)
    cal = fields.get("calibrated_ms")
    if cal is not None and (type(cal) is not int or not 0 <= cal < 1 << 47):
        raise _err("calibrated_ms must be a time in ms since the epoch, or null (not "
                   "calibrated: its readings are refused)", "calibrated_ms")
    drift = _finite(fields.get("drift_tolerance", 0.05), "drift_tolerance", 0.0, 1.0)
    owner = fields.get("owner")
    if owner is not None:
        _id(owner, "owner")
    status = fields.get("status", "active")
    if status not in ("active", "revoked"):
        raise _err("status must be active or revoked", "status")
    return {"kind": kind, "zone": zone, "skus": skus, "unit_grams": unit, "tare_grams": tare,
            "calibrated_ms": cal, "drift_tolerance": drift, "owner": owner, "status": status}


def _parse(sid: str, raw: object) -> SensorInfo | None:
    if not isinstance(raw, str):
        return None
    try:
        d = orjson.loads(raw)
        rev, by = d.pop("rev", 0), d.pop("by", None)
        e = check_entry(d)
    except (orjson.JSONDecodeError, CommandError, AttributeError, TypeError):
        return None
    return SensorInfo(sid, e["kind"], e["zone"], tuple(e["skus"]), e["unit_grams"],
                      e["tare_grams"], e["calibrated_ms"], e["drift_tolerance"], e["owner"],
                      e["status"], rev if type(rev) is int else 0,
                      by if isinstance(by, str) else None)


def sensor(doc: Doc, sid: str) -> SensorInfo | None:
    return _parse(sid, _root(doc).get(sid))


def registry(doc: Doc) -> dict[str, SensorInfo]:
    """Every parsable sensor entry, by id (invariant 4)."""
    root = _root(doc)
    with doc.transaction():
        items = list(root.items())
    out = {}
    for sid, raw in items:
        info = _parse(sid, raw)
        if info is not None:
            out[sid] = info
    return dict(sorted(out.items()))


def make_sensor_update(doc: Doc, sid: str, entry: dict[str, Any], *, rev: int,
                       by: str) -> bytes:
    """The Yjs update that writes sensor ``sid``'s entry (``doc`` is not changed)."""
    _id(sid, "sensor_id")
    values = check_entry(entry)
    if type(rev) is not int or not 0 < rev <= MAX_TS:
        raise ValueError("rev must be a hybrid logical clock timestamp")
    scratch: Doc = pycrdt.Doc(client_id=client_id(by))
    scratch.apply_update(doc.get_update())
    root = _root(scratch)
    updates: list[bytes] = []
    sub = scratch.observe(lambda event: updates.append(event.update))
    try:
        with scratch.transaction():
            root[sid] = orjson.dumps({**values, "rev": rev, "by": by},
                                     option=orjson.OPT_SORT_KEYS).decode()
    finally:
        scratch.unobserve(sub)
    assert len(updates) == 1
    return updates[0]


# --- readings -------------------------------------------------------------------------


class BadReading(Exception):
    """A refused reading: HTTP ``status``, ``field`` (``readings[i].x``), ``reason`` (the
    ``/metrics`` label) and a message saying what to do."""

    def __init__(self, status: int, reason: str, field: str | None, message: str) -> None:
        super().__init__(message)
        self.status, self.reason, self.field, self.message = status, reason, field, message


def _reading(i: int, r: object, sensors: dict[str, SensorInfo], now_ms: int,
             staff: str | None) -> Reading:
    at = f"readings[{i}]"
    if not isinstance(r, dict):
        raise BadReading(400, "malformed", at, f"{at} must be an object")
    for name in ("staff_id", "staff"):
        if name in r:
            raise BadReading(400, "staff_in_body", f"{at}.{name}",
                             "who counted comes from the staff session (X-Staff-Session "
                             "of a till), never from the body: leave it out")
    unknown = sorted(set(r) - _READING)
    if unknown:
        raise BadReading(400, "malformed", f"{at}.{unknown[0]}",
                         f"unknown field {unknown[0]!r}; allowed: {', '.join(sorted(_READING))}")
    for name in ("id", "sensor"):
        v = r.get(name)
        if not isinstance(v, str) or not v or len(v) > config.MAX_ID_LEN:
            raise BadReading(400, "malformed", f"{at}.{name}",
                             f"{name} must be a non-empty string of at most "
                             f"{config.MAX_ID_LEN} characters")
    sid = r["sensor"]
    info = sensors.get(sid)
    if info is None:
        raise BadReading(422, "unknown_sensor", f"{at}.sensor",
                         f"unknown sensor {sid!r}: register it first (PUT /v1/sensors/{{id}})")
    if info.status == "revoked":
        raise BadReading(422, "revoked_sensor", f"{at}.sensor",
                         f"sensor {sid!r} is revoked: its readings are refused")
    calibration = r.get("calibration", "ok")
    if calibration not in CALIBRATION:
        raise BadReading(400, "malformed", f"{at}.calibration",
                         f"calibration must be one of {', '.join(CALIBRATION)}")
    if info.calibrated_ms is None or calibration == "failed":
        raise BadReading(422, "uncalibrated_sensor", f"{at}.sensor",
                         f"sensor {sid!r} is not calibrated: calibrate it and record the "
                         "date in the registry (calibrated_ms)")
    kind = r.get("kind", info.kind)
    if kind != info.kind:
        raise BadReading(422, "wrong_kind", f"{at}.kind",
                         f"sensor {sid!r} is a {info.kind} sensor, not {kind!r}")
    sku = r.get("sku")
    if sku is None and len(info.skus) == 1:
        sku = info.skus[0]
    if sku not in info.skus:
        raise BadReading(422, "unmapped_sku", f"{at}.sku",
                         f"sensor {sid!r} is not mapped to SKU {sku!r}; it maps "
                         f"{', '.join(info.skus[:5])} (send sku for a multi-SKU sensor)")
    value = r.get("value")
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(
            value):
        raise BadReading(400, "not_finite", f"{at}.value",
                         "value must be a finite number (no NaN, no infinity)")
    if value < 0:
        raise BadReading(400, "negative", f"{at}.value",
                         f"value must not be negative (a {kind} reading is a weight or "
                         "a count)")
    if value > config.SENSOR_MAX_VALUE:
        raise BadReading(400, "too_large", f"{at}.value",
                         f"value must be at most {config.SENSOR_MAX_VALUE:g}")
    t = r.get("at_ms")
    if type(t) is not int or not 0 <= t < 1 << 47:
        raise BadReading(400, "malformed", f"{at}.at_ms",
                         "at_ms must be the reading's time in ms since the epoch")
    if t > now_ms + config.SENSOR_MAX_FUTURE_MS:
        raise BadReading(400, "future", f"{at}.at_ms",
                         f"at_ms is {t - now_ms} ms ahead of this node's clock (at most "
                         f"{config.SENSOR_MAX_FUTURE_MS}): fix the sensor gateway's clock")
    if t < now_ms - config.SENSOR_MAX_AGE_MS:
        raise BadReading(400, "stale", f"{at}.at_ms",
                         f"at_ms is {now_ms - t} ms old (at most "
                         f"{config.SENSOR_MAX_AGE_MS}): too old to say anything about now")
    conf = r.get("confidence")
    if conf is not None:
        if kind != "vision" or isinstance(conf, bool) or not isinstance(
                conf, int | float) or not math.isfinite(conf) or not 0 <= conf <= 1:
            raise BadReading(400, "malformed", f"{at}.confidence",
                             "confidence (vision only) must be a number in 0..1")
        conf = float(conf)
    return Reading(r["id"], sid, kind, sku, float(value), t, conf, calibration,
                   staff if kind == "count" else None)


def check_batch(body: object, sensors: dict[str, SensorInfo], now_ms: int,
                staff: str | None = None) -> list[Reading]:
    """Validate a ``POST /v1/sensors/readings`` body (invariants 1, 2). ``staff`` is the
    staff session's id (``None`` for a gateway): manual counts are recorded as theirs."""
    if not isinstance(body, dict) or set(body) != {"readings"}:
        raise BadReading(400, "malformed", "readings",
                         'the body must be {"readings": [...]}')
    rows = body["readings"]
    if not isinstance(rows, list) or not rows:
        raise BadReading(400, "malformed", "readings", "readings must be a non-empty list")
    if len(rows) > config.SENSOR_MAX_BATCH:
        raise BadReading(413, "batch_too_large", "readings",
                         f"at most {config.SENSOR_MAX_BATCH} readings per request "
                         f"({len(rows)} sent): split the batch")
    return [_reading(i, r, sensors, now_ms, staff) for i, r in enumerate(rows)]


class SensorState:
    """Readings the edge holds per sensor, and what it refused (invariant 3)."""

    def __init__(self) -> None:
        self.readings: dict[str, deque[Reading]] = {}
        self._seen: dict[str, tuple[deque[str], set[str]]] = {}
        self.refused: dict[str, int] = {}
        self.accepted = 0
        self.duplicates = 0
        self.dropped = 0  # sensors beyond SENSOR_MAX_SENSORS

    def refuse(self, reason: str) -> None:
        self.refused[reason] = self.refused.get(reason, 0) + 1

    def add(self, readings: list[Reading], out: list[Reading] | None = None) -> int:
        """Keep ``readings``; returns how many were new (appended to ``out`` if given)."""
        new = 0
        for r in readings:
            ring = self.readings.get(r.sensor)
            if ring is None:
                if len(self.readings) >= config.SENSOR_MAX_SENSORS:
                    self.dropped += 1
                    continue
                ring = self.readings[r.sensor] = deque(maxlen=config.SENSOR_READINGS_KEPT)
                self._seen[r.sensor] = (deque(), set())
            order, seen = self._seen[r.sensor]
            if r.id in seen:
                self.duplicates += 1
                continue
            order.append(r.id)
            seen.add(r.id)
            if len(order) > config.SENSOR_SEEN_IDS:
                seen.discard(order.popleft())
            ring.append(r)
            new += 1
            if out is not None:
                out.append(r)
        self.accepted += new
        return new

    def restore(self, readings: list[Reading]) -> None:
        """Readings kept before a restart (``mesh.store.sensorstore``): kept and their ids
        remembered as seen, not counted as accepted again."""
        accepted, duplicates = self.accepted, self.duplicates
        self.add(readings)
        self.accepted, self.duplicates = accepted, duplicates

    def by_sku(self) -> dict[str, dict[str, list[Reading]]]:
        """sku -> sensor -> its kept readings for that SKU, oldest first."""
        out: dict[str, dict[str, list[Reading]]] = {}
        for sid, ring in self.readings.items():
            for r in sorted(ring, key=lambda x: (x.at_ms, x.id)):
                out.setdefault(r.sku, {}).setdefault(sid, []).append(r)
        return out

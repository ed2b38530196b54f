"""Simulation scenarios: what a store looks like and what happens to it, from TOML.

A scenario names the nodes and their roles, the initial stock, the workload (Poisson
streams of sales, returns, receipts, reservations, fulfilments... per node; last-unit
races), the network model per link class (LAN inside the store, WAN to the cloud), a
fault schedule and a duration. ``docs/simulation.md`` documents every key.

Invariants:
 1. Loading is total over its input: any TOML either yields a valid ``Scenario`` or
    raises ``ScenarioError`` naming the offending key. Nothing later re-validates.
 2. A ``Scenario`` is immutable; ``scaled`` and ``with_faults`` return new ones.
 3. Node selectors resolve in declaration order, so every derived list is
    deterministic (no set iteration).
 4. ``random_faults`` draws only from the ``random.Random`` it is given: a swarm run is
    reproduced from its seed alone.
"""

from __future__ import annotations

import fnmatch
import random
import tomllib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Final

import orjson

from mesh.core.reconcile import Rules
from mesh.sim.sensorwork import SensorSpec
from mesh.sim.world import DISTRIBUTIONS

__all__ = [
    "FAULT_KINDS",
    "STREAM_KINDS",
    "ByzantineSpec",
    "FaultSpec",
    "LinkSpec",
    "NodeSpec",
    "RaceSpec",
    "Scenario",
    "ScenarioError",
    "StreamSpec",
    "SwarmSpec",
    "load_scenario",
    "parse_scenario",
    "random_faults",
    "resolve",
]

ROLES: Final = ("register", "edge", "cloud")
STREAM_KINDS: Final = (
    "sale", "return", "receipt", "adjust", "reserve", "fulfil", "release", "expire",
)
FAULT_KINDS: Final = (
    "partition", "isolate", "asymmetric", "link_down", "flap", "crash", "restart",
    "clock_jump", "degrade", "heal",
    # driver-level faults (docs/simulation.md)
    "retry_crash", "disk_slow", "disk_full", "disk_error", "freeze",
    # trust changes mid-run: a till joins, a node is revoked
    "enrol", "revoke",
)
FORGERY_KINDS: Final = (
    "bad_signature", "tampered", "unenrolled", "wrong_store", "forbidden", "garbage",
)
#: Kinds of fault that cut links; they are shaded as partitions in plots.
CUTTING: Final = ("partition", "isolate", "asymmetric", "link_down", "flap")
#: Bounds (STYLE.md: bound everything): a scenario larger than this is a typo.
MAX_NODES: Final = 512
MAX_SKUS: Final = 100_000
MAX_DURATION_S: Final = 7 * 24 * 3600
MAX_FAULTS: Final = 10_000


class ScenarioError(ValueError):
    """The scenario file is wrong; the message names the key and what to do."""


@dataclass(frozen=True, slots=True)
class LinkSpec:
    """Network model of one link class (each direction drawn independently). ``out``
    and ``back`` override it for one direction (link physics per direction): on the
    WAN ``out`` is store -> cloud (``up``), ``back`` cloud -> store (``down``); in a
    ``degrade`` fault ``out`` is from the fault's nodes (``outbound``), ``back`` to
    them (``inbound``)."""

    latency_ms: float = 0.3
    jitter_ms: float = 0.2
    distribution: str = "uniform"
    loss: float = 0.0
    duplicate: float = 0.0
    reorder: float = 0.0
    reorder_ms: float = 0.0
    fifo: bool = False
    bandwidth_mbps: float | None = None
    out: LinkSpec | None = None
    back: LinkSpec | None = None

    def direction(self, back: bool) -> LinkSpec:
        """The physics of one direction: ``back`` or ``out`` if given, else these."""
        one = self.back if back else self.out
        return self if one is None else one


@dataclass(frozen=True, slots=True)
class NodeSpec:
    id: str
    role: str
    site: str
    skew_ms: float = 0.0
    fsync_ms: float = 0.5


@dataclass(frozen=True, slots=True)
class StreamSpec:
    """A Poisson stream of one command kind at each node the selectors match."""

    kind: str
    nodes: tuple[str, ...]
    rate_per_min: float
    qty: tuple[int, int] = (1, 1)
    hot_share: float = 0.0
    skus: tuple[str, ...] = ()
    start_s: float | None = None
    end_s: float | None = None
    channel: str = "online"
    ttl_s: float | None = None
    pickup: tuple[str, ...] = ()
    strict: bool = False
    #: sale/fulfil-free streams: a customer only brings to the till what the shelf holds,
    #: so a sale is skipped (counted as refused) when the till's own view says fewer than
    #: ``qty`` are available. Oversells then come only from stale views (partitions,
    #: lag) and races, as in a real store. False: sell blindly.
    shelf_check: bool = True


@dataclass(frozen=True, slots=True)
class RaceSpec:
    """At ``at_s``, every node the selectors match takes ``qty`` of ``sku`` within
    ``spread_ms`` of each other: the last-unit race."""

    at_s: float
    sku: str
    nodes: tuple[str, ...]
    kind: str = "sale"
    qty: int = 1
    spread_ms: float = 0.0


@dataclass(frozen=True, slots=True)
class FaultSpec:
    kind: str
    at_s: float
    duration_s: float | None = None
    nodes: tuple[str, ...] = ()
    groups: tuple[tuple[str, ...], ...] = ()
    to: tuple[str, ...] = ()
    detect_s: float = 10.0
    down_s: tuple[float, float] = (1.0, 5.0)
    up_s: tuple[float, float] = (1.0, 10.0)
    skew_ms: float = 0.0
    mid_sale: bool = False
    link: LinkSpec | None = None
    link_class: str | None = None
    label: str = ""
    #: disk_slow: added to every fsync; every ``spike_every``-th fsync ``spike_ms`` more
    slow_ms: float = 0.0
    spike_every: int = 0
    spike_ms: float = 0.0
    #: disk_error: how many commits fail
    count: int = 1
    #: Repeatable faults: the fault happens again every ``every_s`` seconds after
    #: ``at_s``, ``repeat`` times in all (None: until the end of the phases it runs in).
    every_s: float | None = None
    repeat: int | None = None
    #: The heal at the start of the liveness phase leaves this fault alone: it keeps
    #: its own windows (and repeats) there; without ``duration_s`` it never ends (a
    #: dead node that never returns).
    liveness: bool = False

    @property
    def end_s(self) -> float | None:
        return None if self.duration_s is None else self.at_s + self.duration_s

    def occurrences(self, until_s: float) -> list[float]:
        """The start times (s) of this fault before ``until_s``, in order."""
        if self.every_s is None:
            return [self.at_s] if self.at_s < until_s else []
        out: list[float] = []
        t = self.at_s
        while t < until_s and (self.repeat is None or len(out) < self.repeat):
            out.append(t)
            if len(out) >= MAX_FAULTS:
                break
            t = self.at_s + len(out) * self.every_s
        return out


@dataclass(frozen=True, slots=True)
class ByzantineSpec:
    """Forged and tampered envelopes injected into live sessions."""

    rate_per_min: float = 0.0
    kinds: tuple[str, ...] = FORGERY_KINDS
    start_s: float | None = None
    end_s: float | None = None


@dataclass(frozen=True, slots=True)
class SwarmSpec:
    """How ``storemesh sim swarm`` draws a fault schedule per run."""

    faults: tuple[int, int] = (1, 4)
    kinds: tuple[str, ...] = ("partition", "isolate", "asymmetric", "crash", "flap",
                              "degrade", "clock_jump")
    max_fault_s: float = 60.0
    keep_faults: bool = False


@dataclass(frozen=True, slots=True)
class Scenario:
    name: str
    description: str
    duration_s: float
    seed: int
    nodes: tuple[NodeSpec, ...]
    lan: LinkSpec
    wan: LinkSpec
    wan_peers: tuple[str, ...]
    discovery_ms: float
    discovery_jitter_ms: float
    stock: tuple[tuple[str, int], ...]
    stock_generate: tuple[int, str, tuple[int, int]] | None
    stock_at: str
    hot: tuple[str, ...]
    streams: tuple[StreamSpec, ...]
    races: tuple[RaceSpec, ...]
    faults: tuple[FaultSpec, ...]
    byzantine: ByzantineSpec
    swarm: SwarmSpec
    warmup_s: float = 2.0
    sample_ms: float | None = None
    converge_timeout_s: float = 120.0
    retry_unacked: bool = True
    source: str = ""
    #: sensor streams at an edge (``mesh.sim.sensorwork``); None: no sensors
    sensors: SensorSpec | None = None
    #: ``[checkpoints]``: how often the store's checkpointer (the first edge) proposes
    #: one and the frontier horizon, in s (None: ``config.CHECKPOINT_EVERY_MS``,
    #: ``config.FRONTIER_HORIZON_MS``)
    checkpoint_every_s: float | None = None
    horizon_s: float | None = None
    #: ``[sim] lan_codec``: LAN sessions run the real transport's ``z1`` codec
    #: (``World.lan_codec``)
    lan_codec: bool = False

    def node_ids(self) -> list[str]:
        return [n.id for n in self.nodes]

    def late_nodes(self) -> list[str]:
        """Nodes an ``enrol`` fault lets join mid-run (they start unenrolled)."""
        return [n for f in self.faults if f.kind == "enrol" for n in resolve(f.nodes, self.nodes)]

    def scaled(self, factor: float) -> Scenario:
        """Every scheduled time (duration, fault and race times, stream windows)
        multiplied by ``factor``; rates, link physics and flap periods stay."""
        if not 0 < factor <= 1000:
            raise ScenarioError("--duration-scale must be in (0, 1000]")

        def t(x: float | None) -> float | None:
            return None if x is None else x * factor

        return replace(
            self,
            duration_s=self.duration_s * factor,
            streams=tuple(replace(s, start_s=t(s.start_s), end_s=t(s.end_s))
                          for s in self.streams),
            races=tuple(replace(r, at_s=r.at_s * factor) for r in self.races),
            faults=tuple(replace(f, at_s=f.at_s * factor, duration_s=t(f.duration_s),
                                 every_s=t(f.every_s))
                         for f in self.faults),
            byzantine=replace(self.byzantine, start_s=t(self.byzantine.start_s),
                              end_s=t(self.byzantine.end_s)),
            warmup_s=min(self.warmup_s, self.duration_s * factor / 4),
            sensors=None if self.sensors is None else replace(
                self.sensors, failing_from_s=self.sensors.failing_from_s * factor),
            checkpoint_every_s=t(self.checkpoint_every_s),
            horizon_s=t(self.horizon_s),
        )

    def with_faults(self, faults: tuple[FaultSpec, ...]) -> Scenario:
        return replace(self, faults=faults)


# --- selectors ------------------------------------------------------------------------


def resolve(selectors: tuple[str, ...] | list[str], nodes: tuple[NodeSpec, ...]) -> list[str]:
    """Node ids matching any selector, in declaration order. A selector is ``*``, an id,
    a glob (``r*``), ``role:register`` or ``site:cloud``; ``!sel`` excludes."""
    chosen: list[str] = []
    excluded: list[str] = []
    for sel in selectors:
        target = excluded if sel.startswith("!") else chosen
        pat = sel[1:] if sel.startswith("!") else sel
        for n in nodes:
            if _matches(pat, n) and n.id not in target:
                target.append(n.id)
    return [n.id for n in nodes if n.id in chosen and n.id not in excluded]


def _matches(pat: str, n: NodeSpec) -> bool:
    if pat.startswith("role:"):
        return n.role == pat[5:]
    if pat.startswith("site:"):
        return n.site == pat[5:]
    return fnmatch.fnmatchcase(n.id, pat)


# --- parsing ----------------------------------------------------------------------------


class _Table:
    """A TOML table being read: typed getters that name the key on error, and a check
    that no unknown key was left over (a typo must not be silently ignored)."""

    def __init__(self, data: object, where: str) -> None:
        if not isinstance(data, dict):
            raise ScenarioError(f"{where} must be a table")
        self.data: dict[str, Any] = data
        self.where = where
        self.used: list[str] = []

    def _get(self, key: str) -> Any:
        self.used.append(key)
        return self.data.get(key)

    def has(self, key: str) -> bool:
        return key in self.data

    def num(self, key: str, default: float | None = None, *, lo: float = 0.0,
            hi: float = float("inf")) -> float:
        v = self._get(key)
        if v is None:
            if default is None:
                raise ScenarioError(f"{self.where}.{key} is required")
            return default
        if isinstance(v, bool) or not isinstance(v, int | float) or not lo <= v <= hi:
            raise ScenarioError(f"{self.where}.{key} must be a number in [{lo}, {hi}], got {v!r}")
        return float(v)

    def opt_num(self, key: str, *, lo: float = 0.0, hi: float = float("inf")) -> float | None:
        if self.data.get(key) is None:
            self.used.append(key)
            return None
        return self.num(key, lo=lo, hi=hi)

    def int_(self, key: str, default: int | None = None, *, lo: int = 0,
             hi: int = 2**63 - 1) -> int:
        v = self._get(key)
        if v is None:
            if default is None:
                raise ScenarioError(f"{self.where}.{key} is required")
            return default
        if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
            raise ScenarioError(f"{self.where}.{key} must be an integer in [{lo}, {hi}]")
        return v

    def str_(self, key: str, default: str | None = None,
             choices: tuple[str, ...] | None = None) -> str:
        v = self._get(key)
        if v is None:
            if default is None:
                raise ScenarioError(f"{self.where}.{key} is required")
            return default
        if not isinstance(v, str) or not v:
            raise ScenarioError(f"{self.where}.{key} must be a non-empty string")
        if choices is not None and v not in choices:
            raise ScenarioError(f"{self.where}.{key} must be one of {list(choices)}, got {v!r}")
        return v

    def bool_(self, key: str, default: bool) -> bool:
        v = self._get(key)
        if v is None:
            return default
        if not isinstance(v, bool):
            raise ScenarioError(f"{self.where}.{key} must be true or false")
        return v

    def strs(self, key: str, default: tuple[str, ...] = ()) -> tuple[str, ...]:
        v = self._get(key)
        if v is None:
            return default
        if isinstance(v, str):
            v = [v]
        if not isinstance(v, list) or not all(isinstance(x, str) and x for x in v):
            raise ScenarioError(f"{self.where}.{key} must be a list of strings")
        return tuple(v)

    def range_(self, key: str, default: tuple[float, float], *, lo: float = 0.0,
               integer: bool = False) -> tuple[float, float]:
        v = self._get(key)
        if v is None:
            return default
        if isinstance(v, int | float) and not isinstance(v, bool):
            v = [v, v]
        ok = (isinstance(v, list) and len(v) == 2
              and all(isinstance(x, int | float) and not isinstance(x, bool) for x in v)
              and lo <= v[0] <= v[1]
              and (not integer or all(isinstance(x, int) for x in v)))
        if not ok:
            kind = "integers" if integer else "numbers"
            raise ScenarioError(f"{self.where}.{key} must be [min, max] {kind} >= {lo}, "
                                f"or one number")
        return (v[0], v[1])

    def sub(self, key: str) -> _Table | None:
        v = self._get(key)
        return None if v is None else _Table(v, f"{self.where}.{key}")

    def subs(self, key: str) -> list[_Table]:
        v = self._get(key)
        if v is None:
            return []
        if not isinstance(v, list):
            raise ScenarioError(f"{self.where}.{key} must be an array of tables ([[{key}]])")
        return [_Table(x, f"{self.where}.{key}[{i}]") for i, x in enumerate(v)]

    def done(self) -> None:
        unknown = sorted(set(self.data) - set(self.used))
        if unknown:
            raise ScenarioError(f"{self.where}: unknown key(s) {unknown}; see docs/simulation.md")


def _link(t: _Table | None, default: LinkSpec,
          directions: tuple[str, str] | None = None) -> LinkSpec:
    """A link table; ``directions`` names its per-direction sub-tables (out, back),
    each any key of the table, defaulting to the table's own values."""
    if t is None:
        return default
    subs = (t.sub(directions[0]), t.sub(directions[1])) if directions else (None, None)
    spec = LinkSpec(
        latency_ms=t.num("latency_ms", default.latency_ms, hi=600_000),
        jitter_ms=t.num("jitter_ms", default.jitter_ms, hi=600_000),
        distribution=t.str_("distribution", default.distribution, DISTRIBUTIONS),
        loss=t.num("loss", default.loss, hi=1.0),
        duplicate=t.num("duplicate", default.duplicate, hi=1.0),
        reorder=t.num("reorder", default.reorder, hi=1.0),
        reorder_ms=t.num("reorder_ms", default.reorder_ms, hi=600_000),
        fifo=t.bool_("fifo", default.fifo),
        bandwidth_mbps=t.opt_num("bandwidth_mbps", lo=0.001) if t.has("bandwidth_mbps")
        else default.bandwidth_mbps,
    )
    t.done()
    if spec.fifo and spec.reorder:
        raise ScenarioError(f"{t.where}: a fifo link cannot reorder; drop one of the two")
    if subs[0] is not None or subs[1] is not None:
        spec = replace(spec, out=None if subs[0] is None else _link(subs[0], spec),
                       back=None if subs[1] is None else _link(subs[1], spec))
    return spec


_LAN_DEFAULT: Final = LinkSpec(latency_ms=0.3, jitter_ms=0.2)
_WAN_DEFAULT: Final = LinkSpec(latency_ms=25.0, jitter_ms=10.0, distribution="lognormal",
                               bandwidth_mbps=10.0)


def _nodes(root: _Table) -> tuple[NodeSpec, ...]:
    out: list[NodeSpec] = []
    for t in root.subs("nodes"):
        role = t.str_("role", "register", ROLES)
        site = t.str_("site", "cloud" if role == "cloud" else "store")
        skew = t.range_("skew_ms", (0.0, 0.0), lo=-MAX_DURATION_S * 1000)
        fsync = t.num("fsync_ms", 0.5, lo=0.001, hi=10_000)
        if t.has("id"):
            if t.has("count") or t.has("prefix"):
                raise ScenarioError(f"{t.where}: give either id, or prefix and count")
            ids = [t.str_("id")]
        else:
            prefix = t.str_("prefix")
            count = t.int_("count", lo=1, hi=MAX_NODES)
            first = t.int_("first", 1)
            ids = [f"{prefix}{i}" for i in range(first, first + count)]
        t.done()
        for i, node_id in enumerate(ids):
            # A skew range is spread evenly over the nodes of the entry: deterministic,
            # and independent of the run seed so one scenario has one clock layout.
            frac = i / (len(ids) - 1) if len(ids) > 1 else 0.5
            out.append(NodeSpec(node_id, role, site, skew[0] + frac * (skew[1] - skew[0]),
                                fsync))
    if not out:
        raise ScenarioError("a scenario needs [[nodes]]")
    if len(out) > MAX_NODES:
        raise ScenarioError(f"at most {MAX_NODES} nodes")
    ids_seen = [n.id for n in out]
    dup = sorted({x for x in ids_seen if ids_seen.count(x) > 1})
    if dup:
        raise ScenarioError(f"node ids must be unique: {dup}")
    return tuple(out)


def _check_selectors(sels: tuple[str, ...], nodes: tuple[NodeSpec, ...], where: str,
                     *, required: bool = True) -> tuple[str, ...]:
    if required and not sels:
        raise ScenarioError(f"{where} must name at least one node")
    for sel in sels:
        if not resolve((sel.lstrip("!"),), nodes):
            raise ScenarioError(f"{where}: selector {sel!r} matches no node")
    return sels


def _stream(t: _Table, nodes: tuple[NodeSpec, ...]) -> StreamSpec:
    kind = t.str_("kind", choices=STREAM_KINDS)
    qty = t.range_("qty", (1, 1), lo=1, integer=True)
    spec = StreamSpec(
        kind=kind,
        nodes=_check_selectors(t.strs("nodes"), nodes, f"{t.where}.nodes"),
        rate_per_min=t.num("rate_per_min", hi=60_000),
        qty=(int(qty[0]), int(qty[1])),
        hot_share=t.num("hot_share", 0.0, hi=1.0),
        skus=t.strs("skus"),
        start_s=t.opt_num("start_s"),
        end_s=t.opt_num("end_s"),
        channel=t.str_("channel", "online"),
        ttl_s=t.opt_num("ttl_s", lo=0.001),
        pickup=_check_selectors(t.strs("pickup"), nodes, f"{t.where}.pickup", required=False),
        strict=t.bool_("strict", False),
        shelf_check=t.bool_("shelf_check", True),
    )
    t.done()
    return spec


def _fault(t: _Table, nodes: tuple[NodeSpec, ...]) -> FaultSpec:
    kind = t.str_("kind", choices=FAULT_KINDS)
    where = t.where
    groups_raw = t._get("groups")
    groups: list[tuple[str, ...]] = []
    if groups_raw is not None:
        if not isinstance(groups_raw, list) or not all(
            isinstance(g, list) and all(isinstance(x, str) for x in g) for g in groups_raw
        ):
            raise ScenarioError(f"{where}.groups must be a list of lists of node selectors")
        groups = [_check_selectors(tuple(g), nodes, f"{where}.groups") for g in groups_raw]
    link_t = t.sub("link")
    down = t.range_("down_s", (1.0, 5.0), lo=0.001)
    up = t.range_("up_s", (1.0, 10.0), lo=0.001)
    spec = FaultSpec(
        kind=kind,
        at_s=t.num("at_s", hi=MAX_DURATION_S),
        duration_s=t.opt_num("duration_s", hi=MAX_DURATION_S),
        nodes=t.strs("nodes"),
        groups=tuple(groups),
        to=t.strs("to"),
        detect_s=t.num("detect_s", 10.0, hi=3600),
        down_s=down,
        up_s=up,
        skew_ms=t.num("skew_ms", 0.0, lo=-MAX_DURATION_S * 1000),
        mid_sale=t.bool_("mid_sale", False),
        link=_link(link_t, LinkSpec(), ("outbound", "inbound")) if link_t is not None
        else None,
        link_class=t.str_("link_class", "any", ("lan", "wan", "any")) if t.has("link_class")
        else None,
        label=t.str_("label", kind),
        slow_ms=t.num("slow_ms", 0.0, hi=3_600_000),
        spike_every=t.int_("spike_every", 0, hi=1_000_000),
        spike_ms=t.num("spike_ms", 0.0, hi=3_600_000),
        count=t.int_("count", 1, lo=1, hi=1_000_000),
        every_s=t.opt_num("every_s", lo=0.001, hi=MAX_DURATION_S),
        repeat=t.int_("repeat", 1, lo=1, hi=MAX_FAULTS) if t.has("repeat") else None,
        liveness=t.bool_("liveness", False),
    )
    t.done()
    need_nodes = kind in ("isolate", "asymmetric", "crash", "restart", "clock_jump", "flap",
                          "link_down", "retry_crash", "disk_slow", "disk_full", "disk_error",
                          "freeze", "enrol", "revoke")
    if need_nodes:
        _check_selectors(spec.nodes, nodes, f"{where}.nodes")
    elif spec.nodes:
        _check_selectors(spec.nodes, nodes, f"{where}.nodes")
    if kind in ("asymmetric", "link_down"):
        _check_selectors(spec.to, nodes, f"{where}.to")
    if kind == "partition" and not spec.groups:
        raise ScenarioError(f"{where}: a partition needs groups = [[...], ...]")
    if kind == "degrade" and spec.link is None:
        raise ScenarioError(f"{where}: degrade needs a [faults.link] table")
    if (spec.link is not None and not spec.nodes
            and (spec.link.out is not None or spec.link.back is not None)):
        raise ScenarioError(f"{where}: [faults.link.outbound] / [faults.link.inbound] "
                            "need nodes (the direction is from / to them)")
    if kind in ("flap", "freeze", "disk_slow", "disk_full") and spec.duration_s is None:
        raise ScenarioError(f"{where}: {kind} needs duration_s")
    if spec.repeat is not None and spec.every_s is None:
        raise ScenarioError(f"{where}: repeat needs every_s (the period)")
    if spec.every_s is not None:
        if kind == "heal":
            raise ScenarioError(f"{where}: a heal cannot repeat")
        if spec.duration_s is not None and spec.duration_s >= spec.every_s:
            raise ScenarioError(f"{where}: every_s must be longer than duration_s "
                                "(one window ends before the next starts)")
    if kind in ("enrol", "revoke"):
        if spec.every_s is not None:
            raise ScenarioError(f"{where}: {kind} cannot repeat")
        issuer = next((n.id for n in nodes if n.role == "edge"), None)
        if issuer is None:
            raise ScenarioError(f"{where}: {kind} needs an edge node (it holds the store key)")
        if issuer in resolve(spec.nodes, nodes):
            raise ScenarioError(f"{where}: the edge {issuer!r} holds the store key: it "
                                f"cannot be {'enrolled' if kind == 'enrol' else 'revoked'}")
    if spec.liveness and kind in CUTTING and spec.duration_s is None:
        raise ScenarioError(f"{where}: a {kind} kept into the liveness phase needs "
                            "duration_s (a cut that never heals cannot converge)")
    return spec


def parse_scenario(data: dict[str, Any], source: str = "<scenario>") -> Scenario:
    """Build a ``Scenario`` from parsed TOML (raises ``ScenarioError``)."""
    root = _Table(data, "scenario")
    name = root.str_("name", Path(source).stem or "scenario")
    description = root.str_("description", name)
    duration = root.num("duration_s", lo=0.001, hi=MAX_DURATION_S)
    seed = root.int_("seed", 1)
    nodes = _nodes(root)

    net = root.sub("network") or _Table({}, "network")
    lan = _link(net.sub("lan"), _LAN_DEFAULT)
    wan = _link(net.sub("wan"), _WAN_DEFAULT, ("up", "down"))
    discovery_ms = net.num("discovery_ms", 150.0, hi=600_000)
    discovery_jitter = net.num("discovery_jitter_ms", 100.0, hi=600_000)
    edges = [n.id for n in nodes if n.role == "edge"]
    wan_peers = _check_selectors(net.strs("wan_peers", ("role:edge",) if edges else ("*",)),
                                 nodes, "network.wan_peers", required=False)
    net.done()

    stock_t = root.sub("stock") or _Table({}, "stock")
    items = stock_t.sub("items")
    stock: list[tuple[str, int]] = []
    if items is not None:
        for sku in list(items.data):
            stock.append((sku, items.int_(sku, lo=1, hi=1_000_000)))
        items.done()
    gen = stock_t.sub("generate")
    generate: tuple[int, str, tuple[int, int]] | None = None
    if gen is not None:
        q = gen.range_("qty", (10, 10), lo=1, integer=True)
        generate = (gen.int_("count", lo=1, hi=MAX_SKUS), gen.str_("prefix", "SKU-"),
                    (int(q[0]), int(q[1])))
        gen.done()
    hot = stock_t.strs("hot")
    store_nodes = [n for n in nodes if n.site == "store"] or list(nodes)
    default_at = edges[0] if edges else store_nodes[0].id
    stock_at = stock_t.str_("at", default_at)
    stock_t.done()
    if stock_at not in [n.id for n in nodes]:
        raise ScenarioError(f"stock.at names no node: {stock_at!r}")
    known = {s for s, _ in stock}
    if generate is not None:
        known |= {f"{generate[1]}{i}" for i in range(1, generate[0] + 1)}
    for sku in hot:
        if sku not in known:
            raise ScenarioError(f"stock.hot: {sku!r} is not in the initial stock")

    work = root.sub("workload") or _Table({}, "workload")
    streams = tuple(_stream(t, nodes) for t in work.subs("streams"))
    races: list[RaceSpec] = []
    for t in work.subs("races"):
        race = RaceSpec(
            at_s=t.num("at_s", hi=MAX_DURATION_S), sku=t.str_("sku"),
            nodes=_check_selectors(t.strs("nodes"), nodes, f"{t.where}.nodes"),
            kind=t.str_("kind", "sale", ("sale", "reserve")),
            qty=t.int_("qty", 1, lo=1, hi=1_000_000),
            spread_ms=t.num("spread_ms", 0.0, hi=600_000),
        )
        t.done()
        if race.sku not in known:
            raise ScenarioError(f"{t.where}.sku: {race.sku!r} is not in the initial stock")
        races.append(race)
    work.done()

    faults = tuple(_fault(t, nodes) for t in root.subs("faults"))
    if len(faults) > MAX_FAULTS:
        raise ScenarioError(f"at most {MAX_FAULTS} faults")
    late = [n for f in faults if f.kind == "enrol" for n in resolve(f.nodes, nodes)]
    if len(late) != len(set(late)):
        raise ScenarioError("faults: a node can be enrolled once")
    if stock_at in late:
        raise ScenarioError(f"stock.at names a node enrolled later: {stock_at!r}")

    byz_t = root.sub("byzantine")
    byz = ByzantineSpec()
    if byz_t is not None:
        kinds = byz_t.strs("kinds", FORGERY_KINDS)
        for k in kinds:
            if k not in FORGERY_KINDS:
                raise ScenarioError(f"byzantine.kinds: {k!r} is not one of {list(FORGERY_KINDS)}")
        byz = ByzantineSpec(byz_t.num("rate_per_min", 0.0, hi=60_000), kinds,
                            byz_t.opt_num("start_s"), byz_t.opt_num("end_s"))
        byz_t.done()

    sw_t = root.sub("swarm")
    swarm = SwarmSpec()
    if sw_t is not None:
        fr = sw_t.range_("faults", (1, 4), integer=True)
        kinds = sw_t.strs("kinds", swarm.kinds)
        for k in kinds:
            if k not in FAULT_KINDS or k in ("heal", "restart", "enrol", "revoke"):
                raise ScenarioError(f"swarm.kinds: {k!r} cannot be drawn at random")
        swarm = SwarmSpec((int(fr[0]), int(fr[1])), kinds,
                          sw_t.num("max_fault_s", 60.0, lo=0.001, hi=MAX_DURATION_S),
                          sw_t.bool_("keep_faults", False))
        sw_t.done()

    sensors = _sensors(root.sub("sensors"), nodes, known)

    ck_t = root.sub("checkpoints") or _Table({}, "checkpoints")
    ck_every = ck_t.opt_num("every_s", lo=0.01)
    horizon = ck_t.opt_num("horizon_s", lo=0.01)
    ck_t.done()

    sim = root.sub("sim") or _Table({}, "sim")
    warmup = sim.num("warmup_s", 2.0, hi=MAX_DURATION_S)
    sample_ms = sim.opt_num("sample_ms", lo=1.0)
    converge = sim.num("converge_timeout_s", 120.0, lo=1.0, hi=MAX_DURATION_S)
    retry = sim.bool_("retry_unacked", True)
    lan_codec = sim.bool_("lan_codec", False)
    sim.done()
    root.done()
    return Scenario(
        name=name, description=description, duration_s=duration, seed=seed, nodes=nodes,
        lan=lan, wan=wan, wan_peers=wan_peers, discovery_ms=discovery_ms,
        discovery_jitter_ms=discovery_jitter, stock=tuple(stock), stock_generate=generate,
        stock_at=stock_at, hot=hot, streams=streams, races=tuple(races), faults=faults,
        byzantine=byz, swarm=swarm, warmup_s=warmup, sample_ms=sample_ms,
        converge_timeout_s=converge, retry_unacked=retry, source=source, sensors=sensors,
        checkpoint_every_s=ck_every, horizon_s=horizon, lan_codec=lan_codec,
    )


def _sensors(t: _Table | None, nodes: tuple[NodeSpec, ...], known: set[str]
             ) -> SensorSpec | None:
    if t is None:
        return None
    edges = [n.id for n in nodes if n.role == "edge"]
    node = t.str_("node", edges[0] if edges else None)
    if node not in edges:
        raise ScenarioError(f"{t.where}.node must name an edge node (the shelf is there), "
                            f"got {node!r}")
    d = SensorSpec(node)
    raw_rules = t._get("rules")
    rules = "{}"
    if raw_rules is not None:
        if not isinstance(raw_rules, dict):
            raise ScenarioError(f"{t.where}.rules must be a table (docs/sensors.md, rules)")
        rules = orjson.dumps(raw_rules).decode()
    spec = SensorSpec(
        node=node,
        skus=t.int_("skus", d.skus, lo=1, hi=MAX_SKUS),
        vision_share=t.num("vision_share", d.vision_share, hi=1.0),
        every_s=t.num("every_s", d.every_s, lo=1.0, hi=3600),
        reconcile_every_s=t.num("reconcile_every_s", d.reconcile_every_s, lo=1.0, hi=86_400),
        unit_grams=t.num("unit_grams", d.unit_grams, lo=0.001, hi=1e6),
        scale_noise_g=t.num("scale_noise_g", d.scale_noise_g, hi=1e6),
        rfid_miss=t.num("rfid_miss", d.rfid_miss, hi=1.0),
        shrink_per_sku_hour=t.num("shrink_per_sku_hour", d.shrink_per_sku_hour, hi=3600),
        drifting=t.int_("drifting", d.drifting, hi=MAX_SKUS),
        drift_g_per_hour=t.num("drift_g_per_hour", d.drift_g_per_hour, hi=1e7),
        failing=t.int_("failing", d.failing, hi=MAX_SKUS),
        failing_from_s=t.num("failing_from_s", d.failing_from_s, hi=MAX_DURATION_S),
        mismapped=t.int_("mismapped", d.mismapped, hi=MAX_SKUS),
        review_delay_s=t.num("review_delay_s", d.review_delay_s, hi=MAX_DURATION_S),
        rules=rules,
    )
    t.done()
    if spec.skus > len(known):
        raise ScenarioError(f"{t.where}.skus: {spec.skus} SKUs with sensors, but the "
                            f"initial stock has {len(known)}")
    if spec.drifting + spec.failing + spec.mismapped > spec.skus:
        raise ScenarioError(f"{t.where}: more faulty sensors than SKUs with sensors")
    try:
        Rules.from_dict(spec.rules_doc())
    except ValueError as exc:
        raise ScenarioError(f"{t.where}.rules: {exc}") from None
    return spec


def load_scenario(path: str | Path) -> Scenario:
    """Read a scenario TOML file (raises ``ScenarioError`` with the key at fault)."""
    p = Path(path)
    try:
        data = tomllib.loads(p.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ScenarioError(f"{p}: not valid TOML: {exc}") from None
    except OSError as exc:
        raise ScenarioError(f"cannot read {p}: {exc}") from None
    return parse_scenario(data, str(p))


# --- random fault schedules (swarm) --------------------------------------------------------


def random_faults(sc: Scenario, rng: random.Random) -> tuple[FaultSpec, ...]:
    """A random fault schedule within the scenario's duration, drawn from ``rng``."""
    ids = sc.node_ids()
    start = min(sc.warmup_s, sc.duration_s / 4)
    end = sc.duration_s * 0.9
    lo, hi = sc.swarm.faults
    out: list[FaultSpec] = list(sc.faults) if sc.swarm.keep_faults else []
    for _ in range(rng.randint(lo, hi)):
        kind = rng.choice(sc.swarm.kinds)
        at = rng.uniform(start, end)
        dur = rng.uniform(0.05, 1.0) * min(sc.swarm.max_fault_s, max(0.001, end - at))
        some = rng.sample(ids, rng.randint(1, max(1, len(ids) // 2)))
        if kind == "partition":
            shuffled = ids[:]
            rng.shuffle(shuffled)
            cut = rng.randint(1, len(ids) - 1) if len(ids) > 1 else 1
            out.append(FaultSpec("partition", at, dur, groups=(tuple(shuffled[:cut]),),
                                 label="partition"))
        elif kind == "isolate":
            out.append(FaultSpec("isolate", at, dur, nodes=(rng.choice(ids),)))
        elif kind == "asymmetric":
            a = rng.choice(ids)
            others = [x for x in ids if x != a] or ids
            out.append(FaultSpec("asymmetric", at, dur, nodes=(a,),
                                 to=tuple(rng.sample(others, rng.randint(1, len(others)))),
                                 detect_s=rng.uniform(1.0, 12.0)))
        elif kind == "link_down":
            a, b = rng.choice(ids), rng.choice(ids)
            out.append(FaultSpec("link_down", at, dur, nodes=(a,), to=(b,)))
        elif kind == "crash":
            out.append(FaultSpec("crash", at, dur, nodes=(rng.choice(ids),),
                                 mid_sale=rng.random() < 0.5))
        elif kind == "flap":
            out.append(FaultSpec("flap", at, dur, nodes=(rng.choice(ids),),
                                 down_s=(0.2, 3.0), up_s=(0.2, 5.0)))
        elif kind == "degrade":
            out.append(FaultSpec("degrade", at, dur, nodes=tuple(some), link=LinkSpec(
                latency_ms=rng.uniform(0.5, 50), jitter_ms=rng.uniform(0, 100),
                distribution=rng.choice(DISTRIBUTIONS), loss=rng.uniform(0, 0.5),
                duplicate=rng.uniform(0, 0.3), reorder=rng.uniform(0, 0.3),
                reorder_ms=rng.uniform(0, 200))))
        elif kind == "clock_jump":
            out.append(FaultSpec("clock_jump", at, None, nodes=(rng.choice(ids),),
                                 skew_ms=rng.uniform(-3_600_000, 3_600_000)))
    out.sort(key=lambda f: f.at_s)
    return tuple(out)

"""The API's door: who is calling (device credential, staff session, approver PIN) and
whether they may, checked before a handler reads the body. Rules in docs/security.md.

``mesh.http.api.setup_routes`` installs it. The checks themselves live in ``mesh.core.auth``
(sans-I/O); this module is the aiohttp glue: the middleware, ``POST /v1/session``
(staff login), ``POST /v1/staff/{id}/unlock``, the refusal counters in ``/metrics`` and
the task that picks up ``auth.json`` changes on the edge.

Invariants:
 1. A refusal (401/403/429) is decided from headers alone, before the body is read, and
    never reaches a handler: it changes nothing. It is counted by reason and charged to
    the source address (``SourceThrottle``); a throttled source is answered 429 before
    any parsing.
 2. A request that passes carries a ``Principal`` (``request[PRINCIPAL]``); the staff
    id written into an envelope is the principal's, never the body's.
 3. PIN checks (scrypt, ~50 ms) run in a worker thread, never on the event loop, and
    only for staff on the roster, within the ``PinGuard``'s delays.
 4. The reload task is owned by the app (``cleanup_ctx``): cancelled and awaited on
    shutdown. It reads ``auth.json`` only when its mtime changed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import orjson
from aiohttp import web
from aiohttp.typedefs import Handler
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric

from mesh import config
from mesh.core.auth import (
    APPROVER_ROLES,
    STAFF_PERMISSIONS,
    WRITES,
    AuthError,
    DeviceCredential,
    DeviceVerifier,
    PinGuard,
    Roster,
    SessionKeys,
    SourceThrottle,
    StaffEntry,
    pin_limit,
    pin_matches,
    revoked_name,
)
from mesh.core.identity import RevocationList
from mesh.errors import EnvelopeError
from mesh.http.metrics import NodeView

__all__ = ["GATE", "PRINCIPAL", "Gate", "Principal", "setup_gate"]

log = logging.getLogger(__name__)

#: (method, path after ``/v1/``) -> the command it runs. Anything else is public:
#: health, metrics, stock, exceptions, peers and catalog reads (docs/security.md).
_RULES: Final = {
    ("POST", "sales"): "sale", ("POST", "returns"): "return",
    ("POST", "receipts"): "receipt", ("POST", "adjustments"): "adjust",
    ("POST", "reservations"): "reserve", ("GET", "reservations"): "read",
    ("POST", "reservations/{rid}/release"): "release",
    ("POST", "reservations/{rid}/fulfil"): "fulfil",
    ("PUT", "catalog/{sku}"): "price", ("GET", "audit"): "audit",
    ("GET", "events"): "read", ("POST", "session"): "login",
    ("POST", "staff/{sid}/unlock"): "login",
    # the sensors (mesh.http.sensor_routes)
    ("GET", "sensors"): "read", ("GET", "sensors/outcomes"): "read",
    ("GET", "sensors/{sid}"): "read", ("PUT", "sensors/{sid}"): "price",
    ("POST", "sensors/readings"): "sensor", ("POST", "telemetry"): "sensor",
    ("POST", "sensors/reconcile"): "adjust", ("GET", "reviews"): "read",
    ("GET", "reviews/{rid}"): "read", ("POST", "reviews/{rid}/resolve"): "review",
    ("GET", "replenishment"): "read", ("GET", "telemetry/alerts"): "read",
}
#: Commands a ``pos`` device runs only with a staff session (``sensor``: a manual count
#: posted at a till is the logged-in staff member's, docs/sensors.md).
_STAFFED: Final = WRITES | {"audit", "sensor"}


@dataclass(frozen=True, slots=True)
class Principal:
    """Who a request is: the device, and at a till the staff member (and approver)."""

    device: DeviceCredential
    staff: StaffEntry | None = None
    approver: StaffEntry | None = None

    @property
    def staff_meta(self) -> str | None:
        """The envelope's staff field: ``staff`` or ``staff+approver``."""
        if self.staff is None:
            return None
        if self.approver is None:
            return self.staff.staff_id
        return f"{self.staff.staff_id}+{self.approver.staff_id}"

    def scoped(self, txn: str) -> str:
        """The idempotency key as stored: scoped to the device (``<device>:<txn>``)."""
        return f"{self.device.device_id}:{txn}"


PRINCIPAL: Final = web.RequestKey("storemesh_principal", Principal)


def _error(status: int, reason: str, message: str, field: str | None,
           retry_after: int | None = None) -> web.Response:
    resp = web.Response(body=orjson.dumps({"error": {"field": field, "message": message,
                                                     "reason": reason}}),
                        status=status, content_type="application/json")
    if status == 401:
        resp.headers["WWW-Authenticate"] = 'Bearer realm="storemesh"'
    if retry_after is not None:
        resp.headers["Retry-After"] = str(retry_after)
    return resp


class Gate:
    """Authentication and authorisation of one node's API."""

    def __init__(self, node: NodeView) -> None:
        self.node = node
        ident = node.identity
        self.verifier = DeviceVerifier(ident.store_id, ident.trust.store_public_key)
        self.pins = PinGuard()
        self._pin_limit_at = -1
        self._pin_limit_cached = config.PIN_MAX_FAILURES
        self.sessions = SessionKeys(ident.node_id)
        self.throttle = SourceThrottle()
        self.refusals: dict[str, int] = {}
        self.logins = 0
        self._stamps: list[int | None] | None = None  # mtimes of auth/revocations.json

    # --- the middleware -----------------------------------------------------------------

    def rule(self, request: web.Request) -> str | None:
        route = request.match_info.route
        resource = route.resource
        if resource is None:
            return None
        canonical = resource.canonical
        at = canonical.rfind("/v1/")
        if at < 0:
            return None
        return _RULES.get((request.method, canonical[at + 4:]))

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        command = self.rule(request)
        if command is None:
            return await handler(request)
        now = self.node.now_ms()
        source = request.remote or "?"
        if self.throttle.blocked(source, now):
            self._count("throttled")
            return _error(429, "throttled", "too many refused requests from this address; "
                          "wait a few seconds", None, 1)
        try:
            request[PRINCIPAL] = await self.authenticate(request, command, now)
        except AuthError as exc:
            self.refuse(source, exc.reason, now)
            return _error(exc.status, exc.reason, exc.message, exc.field, exc.retry_after_s)
        return await handler(request)

    def refuse(self, source: str, reason: str, now: int) -> None:
        self._count(reason)
        self.throttle.refused(source, now)

    def _count(self, reason: str) -> None:
        self.refusals[reason] = self.refusals.get(reason, 0) + 1

    def device(self, request: web.Request, now: int) -> DeviceCredential:
        header = request.headers.get("Authorization")
        if header is None:
            raise AuthError(401, "no_token", "this endpoint needs a device credential: send "
                            "'Authorization: Bearer <token>' (issued by 'storemesh device "
                            "issue' on the store's edge)")
        scheme, _, text = header.partition(" ")
        if scheme.lower() != "bearer":
            raise AuthError(401, "bad_token", "the Authorization header must be "
                            "'Bearer <device credential>'")
        cred = self.verifier.parse(text.strip())
        if self.node.identity.trust.is_revoked(revoked_name(cred.device_id)):
            raise AuthError(401, "revoked", f"device {cred.device_id!r} is revoked")
        if now > cred.not_after:
            raise AuthError(401, "token_expired", f"the credential of device "
                            f"{cred.device_id!r} expired; ask the edge for a new one")
        if cred.nodes is not None and self.node.identity.node_id not in cred.nodes:
            raise AuthError(403, "wrong_node", f"device {cred.device_id!r} may not use node "
                            f"{self.node.identity.node_id!r}")
        return cred

    async def authenticate(self, request: web.Request, command: str, now: int) -> Principal:
        cred = self.device(request, now)
        if command not in cred.commands:
            raise AuthError(403, "scope", f"device {cred.device_id!r} may not {command} "
                            f"(it may: {', '.join(sorted(cred.commands))})", None)
        if cred.role != "pos" or command not in _STAFFED:
            return Principal(cred)
        session = request.headers.get("X-Staff-Session")
        if session is None:
            raise AuthError(401, "staff_login_required", "a till's writes need a staff "
                            "session: log in with POST /v1/session {staff_id, pin} and send "
                            "its 'X-Staff-Session' header", "X-Staff-Session")
        staff = self.staff_entry(self.sessions.check(session, cred.device_id, now), now,
                                 "X-Staff-Session")
        approver = None
        if command not in STAFF_PERMISSIONS[staff.role]:
            approver = await self.approver(request, command, staff, now)
        return Principal(cred, staff, approver)

    def roster(self, now: int) -> Roster:
        roster = self.node.identity.trust.roster
        if roster is None:
            raise AuthError(403, "no_roster", "this node holds no staff roster yet (add staff "
                            "with 'storemesh staff add' on the edge)", "staff_id")
        if now > roster.not_after:
            raise AuthError(403, "roster_expired", "this node's staff roster expired: it has "
                            "not heard from the edge for too long; reconnect it", "staff_id")
        return roster

    def staff_entry(self, staff_id: str, now: int, field: str) -> StaffEntry:
        entry = self.roster(now).staff.get(staff_id)
        if entry is None or entry.disabled:
            raise AuthError(401, "staff_disabled", f"staff {staff_id!r} is not on the roster "
                            "or is disabled", field)
        return entry

    async def check_pin(self, staff_id: object, pin: object, now: int, field: str
                        ) -> StaffEntry:
        """The roster entry of ``staff_id`` if ``pin`` is its PIN (throttled: PinGuard)."""
        if not isinstance(staff_id, str) or not isinstance(pin, str):
            raise AuthError(400, "bad_request", "staff_id and pin must be strings", field)
        roster = self.roster(now)
        entry = roster.staff.get(staff_id)
        if entry is None or entry.disabled:
            raise AuthError(401, "bad_pin", "unknown staff id or wrong PIN", field)
        self.pins.max_failures = self._pin_limit()
        self.pins.check(entry, now)
        if await asyncio.to_thread(pin_matches, entry.pin, pin):
            self.pins.succeeded(staff_id)
            return entry
        n = self.pins.failed(entry, self.node.now_ms())
        left = self.pins.max_failures - n
        raise AuthError(401, "bad_pin", "unknown staff id or wrong PIN"
                        + (f" ({left} tries left before lockout)" if left > 0 else
                           "; the staff member is now locked out"), field)

    def _pin_limit(self) -> int:
        """This node's share of the store-wide PIN bound: every enrolled, unrevoked node
        but the cloud checks PINs on its own (cached per trust-store version)."""
        trust = self.node.identity.trust
        if self._pin_limit_at != trust.version:
            nodes = sum(1 for c in trust.certificates()
                        if c.role != "cloud" and not trust.is_revoked(c.node_id))
            self._pin_limit_cached = pin_limit(nodes)
            self._pin_limit_at = trust.version
        return self._pin_limit_cached

    async def approver(self, request: web.Request, need: str, staff: StaffEntry, now: int
                       ) -> StaffEntry:
        """The supervisor approving this request (``X-Approver-Id``/``X-Approver-Pin``)."""
        aid, pin = request.headers.get("X-Approver-Id"), request.headers.get("X-Approver-Pin")
        if aid is None or pin is None:
            raise AuthError(403, "role", f"a {staff.role} may not {need.replace('_', ' ')} "
                            "alone: a supervisor approves it with the X-Approver-Id and "
                            "X-Approver-Pin headers on the same request", "staff_id")
        if aid == staff.staff_id:
            raise AuthError(403, "self_approval", "an approver must be another staff "
                            "member", "X-Approver-Id")
        entry = await self.check_pin(aid, pin, now, "X-Approver-Pin")
        if entry.role not in APPROVER_ROLES or need not in STAFF_PERMISSIONS[entry.role]:
            raise AuthError(403, "role", f"approver {aid!r} is a {entry.role}, who may not "
                            "approve this", "X-Approver-Id")
        return entry

    async def require(self, request: web.Request, need: str) -> None:
        """Inside a handler: the staff member must hold ``need`` (else an approver must);
        e.g. ``return_large``. Refusals are counted like the middleware's."""
        p: Principal = request[PRINCIPAL]
        if p.staff is None or need in STAFF_PERMISSIONS[p.staff.role]:
            return
        if p.approver is not None and need in STAFF_PERMISSIONS[p.approver.role]:
            return
        now = self.node.now_ms()
        try:
            approver = await self.approver(request, need, p.staff, now)
        except AuthError as exc:
            self.refuse(request.remote or "?", exc.reason, now)
            raise
        request[PRINCIPAL] = Principal(p.device, p.staff, approver)

    # --- endpoints ----------------------------------------------------------------------

    async def login(self, request: web.Request) -> web.Response:
        p: Principal = request[PRINCIPAL]
        now = self.node.now_ms()
        try:
            body = await _small_json(request)
            entry = await self.check_pin(body.get("staff_id"), body.get("pin"), now, "pin")
        except AuthError as exc:
            self.refuse(request.remote or "?", exc.reason, now)
            return _error(exc.status, exc.reason, exc.message, exc.field, exc.retry_after_s)
        token, exp = self.sessions.issue(p.device.device_id, entry.staff_id, now)
        self.logins += 1
        return web.json_response({"session": token, "staff_id": entry.staff_id,
                                  "name": entry.name, "role": entry.role, "expires_ms": exp},
                                 status=201)

    async def unlock(self, request: web.Request) -> web.Response:
        now = self.node.now_ms()
        sid = request.match_info["sid"]
        try:
            target = self.staff_entry(sid, now, "staff_id")
            aid = request.headers.get("X-Approver-Id")
            pin = request.headers.get("X-Approver-Pin")
            if aid is None or pin is None or aid == sid:
                raise AuthError(403, "role", "another supervisor or manager unlocks a staff "
                                "member: send X-Approver-Id and X-Approver-Pin", "X-Approver-Id")
            approver = await self.check_pin(aid, pin, now, "X-Approver-Pin")
            if approver.role not in APPROVER_ROLES:
                raise AuthError(403, "role", f"{aid!r} may not unlock staff", "X-Approver-Id")
        except AuthError as exc:
            self.refuse(request.remote or "?", exc.reason, now)
            return _error(exc.status, exc.reason, exc.message, exc.field, exc.retry_after_s)
        self.pins.unlock(target.staff_id)
        log.info("staff %s unlocked by %s", target.staff_id, approver.staff_id)
        return web.json_response({"staff_id": target.staff_id, "unlocked_by": aid})

    # --- picking up the edge's auth.json --------------------------------------------------

    def apply(self, roster: Roster | None, crl: RevocationList | None) -> bool:
        """Adopt a newer roster or revocation list from the edge's files through the sync
        core, so it is pushed to every peer at once (``SyncCore.learn_*``)."""
        core = self.node.core
        trust = self.node.identity.trust
        before = trust.version
        try:
            if crl is not None:
                self.node.handle_effects(core.learn_revocations(crl, self.node.now_ms()))
            if roster is not None:
                self.node.handle_effects(core.learn_roster(roster))
        except EnvelopeError as exc:
            log.error("the edge's files hold something the store key did not sign: %s", exc)
        if trust.roster is not None:
            self.pins.forget_except(trust.roster.staff.keys())
        return trust.version != before

    async def reload_once(self) -> None:
        """Re-sign the roster when due (the edge), then adopt what changed in
        ``auth.json`` (roster) and ``revocations.json`` (devices and nodes revoked)."""
        from mesh.store.authdir import AUTH_FILE, load_auth, refresh_roster
        from mesh.store.revoke import REVOCATIONS_FILE, load_revocations

        ident = self.node.identity
        data_dir: Path = ident.data_dir
        trust = ident.trust
        roster = trust.roster
        if (ident.store_key is not None and roster is not None
                and roster.not_after - self.node.now_ms() <= config.ROSTER_VALIDITY_MS // 2):
            await asyncio.to_thread(refresh_roster, data_dir, self.node.now_ms())
        stamps: list[int | None] = []
        for name in (AUTH_FILE, REVOCATIONS_FILE):
            try:
                stamps.append((await asyncio.to_thread(os.stat, data_dir / name)).st_mtime_ns)
            except FileNotFoundError:
                stamps.append(None)
        if stamps == self._stamps:
            return
        self._stamps = stamps
        new_roster = new_crl = None
        if stamps[0] is not None:
            doc = await asyncio.to_thread(load_auth, data_dir)
            new_roster = None if doc["roster"] is None else Roster.from_dict(doc["roster"])
        if stamps[1] is not None:
            new_crl = await asyncio.to_thread(load_revocations, data_dir, trust)
        if self.apply(new_roster, new_crl):
            log.info("picked up the edge's files: roster v%d, revocation list v%d",
                     trust.roster_version, trust.crl_version)

    async def _reload_loop(self) -> None:
        while True:
            try:
                await self.reload_once()
            except (OSError, ValueError, EnvelopeError) as exc:
                log.warning("cannot read auth.json or revocations.json: %s", exc)
            await asyncio.sleep(config.AUTH_RELOAD_S)

    async def run(self, app: web.Application) -> AsyncIterator[None]:
        """``cleanup_ctx``: the reload task lives as long as the app (invariant 4)."""
        task = asyncio.create_task(self._reload_loop(), name="auth-reload")
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    # --- metrics ------------------------------------------------------------------------

    def collect(self) -> Iterable[Metric]:
        refused = CounterMetricFamily("storemesh_api_auth_refusals",
                                      "API requests refused by authentication or "
                                      "authorisation, by reason", labels=["reason"])
        for reason, n in sorted(self.refusals.items()):
            refused.add_metric([reason], n)
        yield refused
        yield CounterMetricFamily("storemesh_api_staff_logins",
                                  "Staff sessions opened at this node", value=self.logins)
        yield GaugeMetricFamily("storemesh_api_auth_sources",
                                "Source addresses whose refusals are being tracked",
                                value=len(self.throttle))


async def _small_json(request: web.Request) -> dict[str, Any]:
    raw = await request.content.read(4096)
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        body = None
    if not isinstance(body, dict):
        raise AuthError(400, "bad_request", "send a JSON object {staff_id, pin}", None)
    return body


GATE: Final = web.AppKey("storemesh_gate", Gate)


def setup_gate(app: web.Application, node: NodeView) -> Gate:
    gate = Gate(node)
    app[GATE] = gate
    app.middlewares.append(gate.middleware)
    app.cleanup_ctx.append(gate.run)
    app.router.add_post("/v1/session", gate.login)
    app.router.add_post("/v1/staff/{sid}/unlock", gate.unlock)
    return gate

"""The HTTP API of a node: POS and e-commerce commands, stock queries, audit, SSE, metrics.

Handlers are thin: parse and validate the request, run one replica command through
``Node.execute`` (which returns once the envelope is durable), answer in JSON. The
endpoint reference is ``docs/api.md``. What every route module shares (errors, body and
field checks, command fields) is ``mesh.http.common``.

Invariants:
 1. Nothing is half-applied: a request is fully validated (JSON shape, every field's
    type and bounds, the idempotency key) before ``Node.execute`` is called, and a
    replica command raises before any mutation. A 4xx answer means nothing changed;
    507/503 mean the change was not recorded (retry with the same ``txn_id``).
 2. Every error under ``/v1/`` and ``/metrics`` is a JSON body
    ``{"error": {"field": <name or null>, "message": <what to do>}}``; a handler's
    unexpected exception is logged and answered with a 500, never crashes the server.
 3. The idempotency key is ``txn_id`` (body) or the ``Idempotency-Key`` header; a replay
    with the same key and content returns the original ``origin``/``seq`` (and
    ``reservation_id``) with ``duplicate: true`` and status 200, no earlier than the
    original is durable, and changes nothing. The same key with other content is
    refused (422). What counts as the same content: docs/api.md, "Idempotency".
 4. No blocking I/O on the event loop: ledger reads (audit) run in a worker thread;
    everything else reads the in-memory replica.
 5. Every response is bounded: request bodies (``MAX_BODY_BYTES``), list pages
    (``MAX_PAGE``), audit pages and the ledger rows one audit request may examine.
 6. An SSE stream always unsubscribes from the node when it ends, however it ends.
 7. A request that fails by the client's doing (cut short mid-body, unparseable) is
    counted by reason in ``/metrics`` and logged at most once a minute
    (``mesh.http.httpfaults``), never with a traceback per request: anyone who can reach
    the port can send them.
"""

from __future__ import annotations

import asyncio
import logging
from bisect import bisect_right
from collections.abc import Callable, Iterator
from typing import Any, Final

import orjson
from aiohttp import web

from mesh import config
from mesh.core.auth import AuthError, who
from mesh.core.envelope import Envelope, decode
from mesh.core.replica import CommandResult, Replica, Reservation
from mesh.errors import (
    CommandError,
    EnvelopeError,
    LedgerError,
    NodeCertificateExpired,
    StorageFull,
    TxnReused,
    UnknownSku,
)
from mesh.http.common import (
    DEFAULT_PAGE,
    DISK_FULL,
    MAX_PAGE,
    PATH_ID,
    ApiError,
    Spec,
    check_ident,
    check_text,
    command_fields,
    json_errors,
    json_response,
    query_ident,
    query_int,
    query_opt_int,
    read_object,
)
from mesh.http.gate import PRINCIPAL, Gate, Principal, setup_gate
from mesh.http.httpfaults import CLIENT_FAULTS
from mesh.http.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from mesh.http.metrics import NodeView, make_registry, render
from mesh.store.ledger import Ledger

__all__ = ["AUDIT_MAX_LIMIT", "AUDIT_MAX_SCAN", "setup_routes"]

log = logging.getLogger(__name__)

#: Most audit entries in one response, and the default.
AUDIT_MAX_LIMIT: Final = 1_000
AUDIT_DEFAULT_LIMIT: Final = 100
#: Most ledger rows one audit request decodes while looking for matches (``sku``
#: filter): ~1 s of a worker thread. Past it the response says where to continue.
AUDIT_MAX_SCAN: Final = 50_000
#: Ledger rows read per query while walking the ledger backwards for the audit.
_AUDIT_WINDOW: Final = 500
#: Seconds between SSE keepalive comments: under the 30-60 s idle timeouts of common
#: proxies and load balancers, so an idle stream is not cut. (Not Final: tests shorten it.)
SSE_KEEPALIVE_S = 15.0
#: Most live-stream events written to a client in one write: the events already queued
#: go out together (one write, not one per event) up to this many (~30 KB).
SSE_MAX_WRITE_EVENTS: Final = 256
#: Body fields whose replica-side name differs from the API's.
_API_FIELD: Final = {"expires": "expires_ms"}








# --- validation of request fields ---------------------------------------------------------







def _qty(value: object, field: str) -> int:
    if type(value) is not int or not 0 < value <= config.MAX_QTY:
        raise ApiError(400, f"{field} must be an integer in 1..{config.MAX_QTY}", field)
    return value


def _delta(value: object, field: str) -> int:
    if type(value) is not int or value == 0 or abs(value) > config.MAX_QTY:
        raise ApiError(400, f"{field} must be a non-zero integer within ±{config.MAX_QTY}",
                       field)
    return value


def _flag(value: object, field: str) -> bool:
    if not isinstance(value, bool):
        raise ApiError(400, f"{field} must be true or false", field)
    return value


def _time_ms(value: object, field: str) -> int:
    if type(value) is not int or not 0 <= value < 1 << 47:
        raise ApiError(400, f"{field} must be a wall-clock time in ms since the epoch", field)
    return value


_COMMON: Final[Spec] = {"txn_id": (check_ident, False), "staff_id": (check_ident, False),
                         "note": (check_text, False)}
_RECEIPT: Final[Spec] = {"sku": (check_ident, True), "qty": (_qty, True),
                          "reason": (check_ident, False), **_COMMON}
_SALE: Final[Spec] = {"sku": (check_ident, True), "qty": (_qty, True),
                       "strict": (_flag, False), **_COMMON}
_RETURN: Final[Spec] = _RECEIPT
_ADJUST: Final[Spec] = {"sku": (check_ident, True), "delta": (_delta, True),
                         "reason": (check_ident, True), **_COMMON}
_RESERVE: Final[Spec] = {"sku": (check_ident, True), "qty": (_qty, True),
                          "channel": (check_ident, True), "order": (check_text, False),
                          "expires_ms": (_time_ms, False), "txn_id": (check_ident, False),
                          "staff_id": (check_ident, False)}
_RELEASE: Final[Spec] = {"txn_id": (check_ident, False), "staff_id": (check_ident, False),
                          "reason": (check_ident, False)}
_FULFIL: Final[Spec] = {"txn_id": (check_ident, False), "staff_id": (check_ident, False)}
















# --- error middleware ---------------------------------------------------------------------












# --- the API ------------------------------------------------------------------------------


class _Api:
    """Route handlers bound to one node."""

    def __init__(self, node: NodeView, gate: Gate) -> None:
        self.node = node
        self.gate = gate
        self.registry = make_registry(node)
        self.registry.register(gate)  # a Collector by shape (collect())
        self._streams: set[asyncio.Queue[dict[str, Any]]] = set()
        self._closing = False

    # --- helpers ----------------------------------------------------------------------

    def _staleness_ms(self, now: int) -> int | None:
        """How old our view of the other nodes' changes may be, in ms.

        With live peers: ms since we last heard from the least recently heard of them.
        With peers but none live: ms since we last heard from any peer (null if never).
        Without peers: null (nothing to be stale against)."""
        peers = self.node.peer_status()
        if not peers:
            return None
        live = [int(p["last_seen_ms"]) for p in peers if p.get("up") and
                p.get("last_seen_ms") is not None]
        if live:
            return max(0, now - min(live))
        seen = [int(p["last_seen_ms"]) for p in peers if p.get("last_seen_ms") is not None]
        return max(0, now - max(seen)) if seen else None

    @staticmethod
    def _stock(replica: Replica, sku: str, staleness: int | None) -> dict[str, Any]:
        hlc = replica.last_change.get(sku)
        return {
            "sku": sku,
            "on_hand": replica.on_hand(sku),
            "reserved": replica.reserved(sku),
            "available": replica.available(sku),
            "last_change_ms": None if hlc is None else hlc >> 16,
            "staleness_ms": staleness,
        }

    async def _execute(self, fn: Callable[[Replica], CommandResult], *,
                       conflict: tuple[str, ...] = ()) -> CommandResult:
        """Run a command; map refusals to statuses. ``conflict`` lists the replica fields
        whose refusal means "not possible with the current stock" (409)."""
        try:
            return await self.node.execute(fn)
        except UnknownSku as exc:
            raise ApiError(404, exc.message, "sku") from None
        except TxnReused as exc:
            raise ApiError(422, exc.message, "txn_id") from None
        except CommandError as exc:
            field = _API_FIELD.get(exc.field or "", exc.field)
            raise ApiError(409 if exc.field in conflict else 400, exc.message, field) from None
        except NodeCertificateExpired as exc:
            log.error("%s", exc)
            raise ApiError(503, str(exc)) from None
        except StorageFull as exc:
            log.error("disk full: %s", exc)
            raise ApiError(507, DISK_FULL) from None
        except LedgerError as exc:
            log.error("ledger write failed: %s", exc)
            raise ApiError(503, "the ledger write failed, so the operation was NOT recorded; "
                                "retry with the same txn_id") from None

    def _done(self, txn: str, res: CommandResult, sku: str) -> web.Response:
        replica = self.node.replica
        body: dict[str, Any] = {
            "txn_id": txn, "origin": res.origin, "seq": res.seq, "duplicate": res.duplicate,
        }
        if res.reservation_id is not None:
            body["reservation_id"] = res.reservation_id
        body.update(sku=sku, on_hand=replica.on_hand(sku), reserved=replica.reserved(sku),
                    available=replica.available(sku))
        return json_response(body, 200 if res.duplicate else 201)

    # --- stock commands ------------------------------------------------------------------

    async def receipts(self, request: web.Request) -> web.Response:
        f = command_fields(await read_object(request), _RECEIPT, request)
        now = self.node.now_ms
        res = await self._execute(lambda r: r.receive(
            f["sku"], f["qty"], txn=f["key"], now_ms=now(), staff=f["staff"],
            reason=f.get("reason"), note=f.get("note")))
        return self._done(f["txn_id"], res, f["sku"])

    async def sales(self, request: web.Request) -> web.Response:
        f = command_fields(await read_object(request), _SALE, request)
        now = self.node.now_ms
        res = await self._execute(lambda r: r.sell(
            f["sku"], f["qty"], txn=f["key"], now_ms=now(), staff=f["staff"],
            note=f.get("note"), strict=f.get("strict", False)), conflict=("qty",))
        return self._done(f["txn_id"], res, f["sku"])

    async def returns(self, request: web.Request) -> web.Response:
        f = command_fields(await read_object(request), _RETURN, request)
        if f["qty"] > config.RETURN_APPROVAL_QTY:
            try:
                await self.gate.require(request, "return_large")
            except AuthError as exc:
                raise ApiError(exc.status, exc.message, exc.field) from None
            f["staff"] = request[PRINCIPAL].staff_meta
        now = self.node.now_ms
        res = await self._execute(lambda r: r.return_(
            f["sku"], f["qty"], txn=f["key"], now_ms=now(), staff=f["staff"],
            reason=f.get("reason"), note=f.get("note")))
        return self._done(f["txn_id"], res, f["sku"])

    async def adjustments(self, request: web.Request) -> web.Response:
        f = command_fields(await read_object(request), _ADJUST, request)
        now = self.node.now_ms
        res = await self._execute(lambda r: r.adjust(
            f["sku"], f["delta"], reason=f["reason"], txn=f["key"], now_ms=now(),
            staff=f["staff"], note=f.get("note")))
        return self._done(f["txn_id"], res, f["sku"])

    # --- reservations ---------------------------------------------------------------------

    async def reserve(self, request: web.Request) -> web.Response:
        f = command_fields(await read_object(request), _RESERVE, request)
        channel = request[PRINCIPAL].device.channel
        if channel is not None and f["channel"] != channel:
            raise ApiError(403, f"this device reserves for channel {channel!r} only",
                           "channel")
        now = self.node.now_ms
        res = await self._execute(lambda r: r.reserve(
            f["sku"], f["qty"], txn=f["key"], now_ms=now(), channel=f["channel"],
            order=f.get("order"), expires=f.get("expires_ms"), staff=f["staff"]),
            conflict=("qty",))
        return self._done(f["txn_id"], res, f["sku"])

    def _reservation_path(self, request: web.Request) -> str:
        rid = check_ident(request.match_info["rid"], "reservation_id")
        if rid not in self.node.replica.records:
            raise ApiError(404, f"no reservation {rid!r}", "reservation_id")
        return rid

    async def _end_reservation(self, request: web.Request, spec: Spec,
                               command: Callable[[Replica, str, dict[str, Any]], CommandResult]
                               ) -> web.Response:
        rid = self._reservation_path(request)
        f = command_fields(await read_object(request), spec, request)
        p: Principal = request[PRINCIPAL]
        channel = p.device.channel
        if channel is not None and self.node.replica.records[rid].channel != channel:
            raise ApiError(403, f"this device may end only its own channel's ({channel!r}) "
                                "reservations", "reservation_id")
        res = await self._execute(lambda r: command(r, rid, f), conflict=("reservation_id",))
        return self._done(f["txn_id"], res, self.node.replica.records[rid].sku)

    async def release(self, request: web.Request) -> web.Response:
        now = self.node.now_ms
        return await self._end_reservation(request, _RELEASE, lambda r, rid, f: r.release(
            rid, txn=f["key"], now_ms=now(), staff=f["staff"],
            reason=f.get("reason")))

    async def fulfil(self, request: web.Request) -> web.Response:
        now = self.node.now_ms
        return await self._end_reservation(request, _FULFIL, lambda r, rid, f: r.fulfil(
            rid, txn=f["key"], now_ms=now(), staff=f["staff"]))

    async def reservations(self, request: web.Request) -> web.Response:
        sku = query_ident(request, "sku")
        after = query_ident(request, "after")
        limit = query_int(request, "limit", 1, MAX_PAGE, DEFAULT_PAGE)
        active = self.node.replica.active_reservations(sku)  # sorted by id
        if after is not None:
            active = [r for r in active if r.id > after]
        page = active[:limit]
        return json_response({
            "reservations": [_reservation(r) for r in page],
            "next": page[-1].id if len(active) > limit else None,
        })

    # --- queries ------------------------------------------------------------------------

    async def stock_one(self, request: web.Request) -> web.Response:
        sku = check_ident(request.match_info["sku"], "sku")
        replica = self.node.replica
        if not replica.knows_sku(sku):
            raise ApiError(404, f"unknown SKU {sku!r}: this node has never seen it", "sku")
        return json_response(self._stock(replica, sku, self._staleness_ms(self.node.now_ms())))

    async def stock_all(self, request: web.Request) -> web.Response:
        after = query_ident(request, "after")
        limit = query_int(request, "limit", 1, MAX_PAGE, DEFAULT_PAGE)
        replica = self.node.replica
        skus = replica.skus()
        if after is not None:
            skus = skus[bisect_right(skus, after):]
        page = skus[:limit]
        staleness = self._staleness_ms(self.node.now_ms())
        return json_response({
            "stock": [self._stock(replica, s, staleness) for s in page],
            "next": page[-1] if len(skus) > limit else None,
        })

    async def exceptions(self, request: web.Request) -> web.Response:
        sku = query_ident(request, "sku")
        limit = query_int(request, "limit", 1, MAX_PAGE, DEFAULT_PAGE)
        found = self.node.replica.exceptions(sku)
        by_sku: dict[str, dict[str, int]] = {}
        for e in found:
            t = by_sku.setdefault(e.sku, {"count": 0, "short_units": 0})
            t["count"] += 1
            t["short_units"] += e.short
        return json_response({
            "exceptions": [{**e.to_dict(), "at_ms": e.hlc >> 16} for e in found[:limit]],
            "truncated": len(found) > limit,
            "totals": {"count": len(found), "short_units": sum(e.short for e in found),
                       "by_sku": by_sku},
        })

    async def peers(self, request: web.Request) -> web.Response:
        ident = self.node.identity
        return json_response({"node_id": ident.node_id, "store_id": ident.store_id,
                      "role": ident.role, "peers": self.node.peer_status()})

    async def health(self, request: web.Request) -> web.Response:
        node = self.node
        ledger = node.durable.ledger
        failed = ledger.failed or ledger.last_error
        body: dict[str, Any] = {
            "status": "ok" if failed is None else "degraded",
            "node_id": node.identity.node_id,
            "store_id": node.identity.store_id,
            "role": node.identity.role,
            "peers_up": sum(1 for p in node.peer_status() if p.get("up")),
            # = ledger.count() without a table scan: rows are only appended, never
            # deleted, and SQLite assigns row ids without gaps then.
            "envelopes": ledger.last_id,
            "uptime_s": round(max(0, node.now_ms() - node.started_ms) / 1000, 3),
            # which revocation list this node holds (-1: none): how far one has spread
            "crl_version": node.identity.trust.crl_version,
            # and which staff roster, valid until when (-1/None: none): PIN logins stop
            # there once it has passed (docs/security.md, "Staff")
            "roster_version": node.identity.trust.roster_version,
            "roster_not_after_ms": (None if node.identity.trust.roster is None
                                    else node.identity.trust.roster.not_after),
        }
        if failed is not None:
            body["reason"] = f"ledger failed: {failed}"
        return json_response(body, 200 if failed is None else 503)

    async def audit(self, request: web.Request) -> web.Response:
        limit = query_int(request, "limit", 1, AUDIT_MAX_LIMIT, AUDIT_DEFAULT_LIMIT)
        before = query_opt_int(request, "before", 1, (1 << 63) - 1)
        sku = query_ident(request, "sku")
        rids: frozenset[str] = frozenset()
        if sku is not None:  # releases name only the reservation: map it to its SKU here
            rids = frozenset(rid for rid, rec in self.node.replica.records.items()
                             if rec.sku == sku)
        entries, next_before = await asyncio.to_thread(
            _read_audit, self.node.durable.ledger, limit, before, sku, rids)
        return json_response({"entries": entries, "next_before": next_before})

    async def metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=render(self.registry),
                            headers={"Content-Type": METRICS_CONTENT_TYPE})

    # --- live events --------------------------------------------------------------------

    async def events(self, request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Cache-Control": "no-cache",
                                           "X-Accel-Buffering": "no"})
        resp.content_type = "text/event-stream"
        queue = self.node.subscribe()
        self._streams.add(queue)
        try:
            await resp.prepare(request)
            # Sent at once so the client knows it is subscribed (headers alone may wait).
            await resp.write(b"retry: 2000\n: subscribed\n\n")
            await self._stream(queue, resp)
        except ConnectionResetError:
            pass  # the client went away
        except Exception:
            # Headers are out: a JSON error is no longer possible, so log and end.
            log.exception("SSE stream failed")
        finally:
            self._streams.discard(queue)
            self.node.unsubscribe(queue)
        return resp

    async def _stream(self, queue: asyncio.Queue[dict[str, Any]],
                      resp: web.StreamResponse) -> None:
        """Write the queued events, all that are waiting in one write (a batch of durable
        envelopes queues one event per SKU and origin at once); a keepalive when idle."""
        while not self._closing:
            if queue.empty():
                try:
                    async with asyncio.timeout(SSE_KEEPALIVE_S):
                        events = [await queue.get()]
                except TimeoutError:
                    await resp.write(b": keepalive\n\n")
                    continue
            else:
                events = [queue.get_nowait()]
            while len(events) < SSE_MAX_WRITE_EVENTS and not queue.empty():
                events.append(queue.get_nowait())
            chunks = []
            end = False
            for event in events:
                kind = event.get("type")
                # overflow: the node dropped us, the client must resync; shutdown: the end
                if kind in ("overflow", "shutdown"):
                    chunks.append(f"event: {kind}\ndata: ".encode() + orjson.dumps(event)
                                  + b"\n\n")
                    end = True
                    break
                chunks.append(b"data: " + orjson.dumps(event) + b"\n\n")
            await resp.write(b"".join(chunks))
            if end:
                return

    async def on_shutdown(self, app: web.Application) -> None:
        """End the SSE streams so the server's graceful shutdown does not wait on them."""
        self._closing = True
        for queue in list(self._streams):
            try:
                queue.put_nowait({"type": "shutdown"})
            except asyncio.QueueFull:
                pass  # the stream has items to read and checks ``_closing`` after each


def _reservation(r: Reservation) -> dict[str, Any]:
    return {"reservation_id": r.id, "sku": r.sku, "qty": r.qty, "channel": r.channel,
            "order": r.order, "expires_ms": r.expires}


# --- audit (runs in a worker thread) ------------------------------------------------------


def _rows_backwards(ledger: Ledger, hi: int, budget: int) -> Iterator[tuple[int, bytes]]:
    """Ledger rows with id <= ``hi``, newest first, at most ``budget`` of them."""
    while hi > 0 and budget > 0:
        lo = max(0, hi - min(_AUDIT_WINDOW, budget))
        window: list[tuple[int, bytes]] = []
        for rid, raw in ledger.scan(lo, page=hi - lo):
            if rid <= hi:
                window.append((rid, raw))
            if rid >= hi:
                break
        yield from reversed(window)
        budget -= hi - lo
        hi = lo


def _audit_entry(rid: int, env: Envelope) -> dict[str, Any]:
    """Who (staff_id), on which device (origin), when (at_ms) and why (reason, note)."""
    meta = env.meta
    kind = meta.get("kind")
    entry: dict[str, Any] = {
        "row": rid, "origin": env.origin, "seq": env.seq, "hlc": env.hlc,
        "at_ms": env.hlc >> 16, "kind": kind, **who(meta),
        "reason": meta.get("reason"),
        "note": meta.get("note"), "sku": meta.get("sku"), "qty": meta.get("qty"),
        "hash": env.hash.hex(),
    }
    if "evidence" in meta:  # an automatic or reviewed adjustment explains itself
        entry["evidence"] = meta["evidence"]
    if kind == "reserve":
        added = [r for op in env.ops if op.get("t") == "rs" for r in op.get("rec", {})]
        entry["reservation_id"] = added[0] if added else None
    elif kind in ("release", "fulfil"):
        entry["reservation_id"] = meta.get("note")
    return entry


def _touches(env: Envelope, entry: dict[str, Any], sku: str, rids: frozenset[str]) -> bool:
    if entry["sku"] == sku or entry.get("reservation_id") in rids:
        return True
    for op in env.ops:
        if op.get("sku") == sku:
            return True
        if any(rec.get("sku") == sku for rec in op.get("rec", {}).values()):
            return True
    return False


def _read_audit(ledger: Ledger, limit: int, before: int | None, sku: str | None,
                rids: frozenset[str]) -> tuple[list[dict[str, Any]], int | None]:
    """Newest ledger entries (only those touching ``sku`` if given), and the ``before``
    cursor that continues the walk (None once the start of the ledger was reached).

    An expiry envelope releases reservations by their dots alone, so the SKU filter does
    not attribute it (it shows without the filter)."""
    hi = ledger.last_id if before is None else min(before - 1, ledger.last_id)
    out: list[dict[str, Any]] = []
    lowest = hi + 1
    for rid, raw in _rows_backwards(ledger, hi, AUDIT_MAX_SCAN):
        lowest = rid
        try:
            env = decode(raw)
        except EnvelopeError as exc:  # cannot happen for rows we wrote; show, don't fail
            if sku is None:
                out.append({"row": rid, "error": str(exc)})
            continue
        entry = _audit_entry(rid, env)
        if sku is None or _touches(env, entry, sku, rids):
            out.append(entry)
        if len(out) >= limit:
            break
    return out, (lowest if lowest > 1 else None)


def setup_routes(app: web.Application, node: NodeView) -> None:
    """Add the HTTP API of ``node`` to ``app`` (see docs/api.md)."""
    app[CLIENT_FAULTS] = node.http_faults
    app.middlewares.append(json_errors)
    api = _Api(node, setup_gate(app, node))  # its middleware runs inside json_errors
    app.on_shutdown.append(api.on_shutdown)
    r = app.router
    r.add_post("/v1/receipts", api.receipts)
    r.add_post("/v1/sales", api.sales)
    r.add_post("/v1/returns", api.returns)
    r.add_post("/v1/adjustments", api.adjustments)
    r.add_post("/v1/reservations", api.reserve)
    r.add_get("/v1/reservations", api.reservations)
    r.add_post(f"/v1/reservations/{{rid:{PATH_ID}}}/release", api.release)
    r.add_post(f"/v1/reservations/{{rid:{PATH_ID}}}/fulfil", api.fulfil)
    r.add_get("/v1/stock", api.stock_all)
    r.add_get(f"/v1/stock/{{sku:{PATH_ID}}}", api.stock_one)
    r.add_get("/v1/exceptions", api.exceptions)
    r.add_get("/v1/peers", api.peers)
    r.add_get("/v1/health", api.health)
    r.add_get("/v1/events", api.events, allow_head=False)
    r.add_get("/v1/audit", api.audit)
    r.add_get("/metrics", api.metrics)

"""What every route module of the HTTP API shares (docs/api.md, "Conventions"): the JSON
error body and the middleware that makes every failure one, the bounded body reader,
field and query checks, and the command fields (idempotency key scoped to the calling
device, ``staff`` from the staff session, never the body).

Invariants: every refusal is an ``ApiError`` naming the field; a body is read at most
``MAX_BODY_BYTES``; an exception a client caused is counted (``mesh.http.httpfaults``), never
logged as our failure."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Final

import orjson
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.typedefs import Handler

from mesh import config
from mesh.errors import StorageFull
from mesh.http.gate import PRINCIPAL
from mesh.http.httpfaults import CLIENT_FAULTS, ClientFaults

log = logging.getLogger(__name__)


#: Largest request body (``config.MAX_HTTP_BODY``, 64 KiB; the node also creates its
#: aiohttp app with it as ``client_max_size``). A command is a few hundred bytes.
MAX_BODY_BYTES: Final = config.MAX_HTTP_BODY


#: Largest page of a list endpoint (stock, reservations, exceptions): ~150 bytes an item,
#: so at most ~1.5 MB of JSON per response.
MAX_PAGE: Final = 10_000


DEFAULT_PAGE: Final = 1_000


DISK_FULL: Final = ("this node's disk is full: the operation was NOT recorded; free disk "
                     "space, then retry with the same txn_id")


#: Pattern of an identifier in a path (``{rid:...}``): any characters but ``/``, which the
#: client percent-encodes (``%2F``) with everything reserved. aiohttp's default,
#: ``[^{}/]+``, would leave ids holding ``{`` or ``}`` unaddressable (issue 10 item 8):
#: every id a write accepts must be addressable. (``%2F`` and ``%25`` stay encoded while
#: routes match and are decoded in ``match_info``.)
PATH_ID: Final = "[^/]+"


class ApiError(Exception):
    """A request refused with ``status``; ``field`` names the offending input (or None)."""

    def __init__(self, status: int, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.field = field


def json_response(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")


def error_response(status: int, message: str, field: str | None = None) -> web.Response:
    return json_response({"error": {"field": field, "message": message}}, status)


Check = Callable[[object, str], Any]


def check_ident(value: object, field: str) -> str:
    if not isinstance(value, str) or not value or len(value) > config.MAX_ID_LEN:
        raise ApiError(400, f"{field} must be a non-empty string of at most "
                            f"{config.MAX_ID_LEN} characters", field)
    return value


def check_text(value: object, field: str) -> str:
    if not isinstance(value, str) or len(value) > config.MAX_TEXT_LEN:
        raise ApiError(400, f"{field} must be a string of at most {config.MAX_TEXT_LEN} "
                            "characters", field)
    return value


#: (check, required) per body field, for each command. ``txn_id`` is handled apart
#: (it may come from the Idempotency-Key header).
Spec = dict[str, tuple[Check, bool]]


async def read_object(request: web.Request) -> dict[str, Any]:
    """The request body as a JSON object (400/413 otherwise)."""
    too_large = f"request body is larger than {MAX_BODY_BYTES} bytes"
    if request.content_length is not None and request.content_length > MAX_BODY_BYTES:
        raise ApiError(413, too_large)
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise ApiError(413, too_large) from None
    if len(raw) > MAX_BODY_BYTES:
        raise ApiError(413, too_large)
    if not raw.strip():
        raise ApiError(400, "empty body: send a JSON object")
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ApiError(400, f"malformed JSON: {exc}") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the body must be a JSON object")
    return body


def command_fields(body: dict[str, Any], spec: Spec, request: web.Request) -> dict[str, Any]:
    """Check ``body`` against ``spec``; returns the present fields plus ``txn_id``."""
    unknown = sorted(set(body) - set(spec))
    if unknown:
        raise ApiError(400, f"unknown field {unknown[0]!r}; allowed: {', '.join(spec)}",
                       unknown[0])
    for name, (_, required) in spec.items():
        if required and name not in body:
            raise ApiError(400, f"{name} is required", name)
    # An optional field sent as null counts as absent.
    out = {name: check(body[name], name) for name, (check, required) in spec.items()
           if name in body and (required or body[name] is not None)}
    out["txn_id"] = _txn_id(out.get("txn_id"), request)
    _authorised(out, request)
    return out


def _authorised(out: dict[str, Any], request: web.Request) -> None:
    """Add ``key`` (the idempotency key scoped to the calling device) and ``staff`` (from
    the staff session, never the body: a body ``staff_id`` must name the same person)."""
    p = request.get(PRINCIPAL)
    if p is None:  # (only the gate's public routes get here without one)
        raise ApiError(401, "this endpoint needs a device credential", "Authorization")
    staff = p.staff_meta
    given = out.get("staff_id")
    if given is not None and (p.staff is None or given != p.staff.staff_id):
        raise ApiError(403, "staff_id comes from the staff session (X-Staff-Session), not "
                            "the body: leave it out or send the logged-in staff id",
                       "staff_id")
    limit = config.MAX_ID_LEN - len(p.device.device_id) - 1
    if len(out["txn_id"]) > limit:
        raise ApiError(400, f"txn_id has at most {limit} characters for this device (keys "
                            "are stored as '<device id>:<txn_id>')", "txn_id")
    out["key"] = p.scoped(out["txn_id"])
    out["staff"] = staff


def _txn_id(body_txn: str | None, request: web.Request) -> str:
    header = request.headers.get("Idempotency-Key")
    if header is not None:
        header = check_ident(header, "txn_id")
        if body_txn is not None and body_txn != header:
            raise ApiError(400, "the Idempotency-Key header and txn_id differ; send one key "
                                "or the same key in both", "txn_id")
        return header
    if body_txn is None:
        raise ApiError(400, "txn_id is required (or an Idempotency-Key header): it makes "
                            "a retried request safe", "txn_id")
    return body_txn


def query_opt_int(request: web.Request, name: str, lo: int, hi: int) -> int | None:
    raw = request.query.get(name)
    if raw is None:
        return None
    try:
        value = int(raw)
    except ValueError:
        value = lo - 1
    if not lo <= value <= hi:
        raise ApiError(400, f"{name} must be an integer in {lo}..{hi}", name)
    return value


def query_int(request: web.Request, name: str, lo: int, hi: int, default: int) -> int:
    value = query_opt_int(request, name, lo, hi)
    return default if value is None else value


def query_ident(request: web.Request, name: str) -> str | None:
    raw = request.query.get(name)
    return None if raw is None else check_ident(raw, name)


def _ours(path: str) -> bool:
    # Also under a mount prefix: the cloud serves each store's node at /stores/<id>/.
    return "/v1/" in path or path.endswith("/metrics")


@web.middleware
async def json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Turn every failure under /v1/ and /metrics into a JSON error (invariant 2).
    Other routes (the node's peer transport) keep their own handling."""
    if not _ours(request.path):
        return await handler(request)
    try:
        return await handler(request)
    except ApiError as exc:
        return error_response(exc.status, exc.message, exc.field)
    except web.HTTPRequestEntityTooLarge:
        return error_response(413, f"request body is larger than {MAX_BODY_BYTES} bytes")
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        message = exc.reason
        if exc.status == 404:
            message = f"no such endpoint: {request.method} {request.path} (see docs/api.md)"
        resp = error_response(exc.status, message)
        if "Allow" in exc.headers:
            resp.headers["Allow"] = exc.headers["Allow"]
        return resp
    except StorageFull:
        return error_response(507, DISK_FULL)
    except Exception as exc:
        reason = _client_fault(request, exc)
        if reason is None:
            log.exception("%s %s failed", request.method, request.path)
            return error_response(500, "internal error (logged on the node); retrying a command "
                               "with the same txn_id is safe")
        # Counted, and logged at most once a minute: anyone can cause these.
        _client_faults(request).note(reason, f"{request.method} {request.path} from "
                                             f"{request.remote}: {exc}")
        return error_response(400, "the request body was cut short or malformed; nothing changed")


def _client_fault(request: web.Request, exc: Exception) -> str | None:
    """The ``mesh.http.httpfaults`` reason if reading the request failed by the client's
    doing (it hung up mid-body, or sent a body aiohttp cannot parse), else None."""
    if isinstance(exc, HttpProcessingError):  # e.g. a broken chunked body
        return "bad_request"
    if isinstance(exc, ConnectionResetError) and (
            request.transport is None or request.transport.is_closing()):
        return "disconnected"
    return None


#: Faults of requests to an app that keeps no counters of its own (not a node's).
_UNATTRIBUTED: Final = ClientFaults()


def _client_faults(request: web.Request) -> ClientFaults:
    """The counters of the innermost app of the request that keeps them (a node's)."""
    for app in reversed(request.match_info.apps):
        faults = app.get(CLIENT_FAULTS)
        if faults is not None:
            return faults
    return _UNATTRIBUTED

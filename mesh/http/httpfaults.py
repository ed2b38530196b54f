"""HTTP requests that fail by the client's doing: counted by reason, logged rarely.

Anyone who can reach the HTTP port can send a malformed request line or hang up half
way through a body. aiohttp logs the first with an ERROR and a traceback, and a body
read that fails used to reach ``mesh.http.api``'s 500 path, which does the same: one client
in a loop could flood the log. Here such requests are counted
(``storemesh_http_client_errors_total{reason}`` in ``/metrics``) and summarised in at
most one log line per ``config.HTTP_FAULT_LOG_INTERVAL_S``.

Invariants:
 1. The reasons are a fixed set (``REASONS``), so the metric's labels are bounded
    whatever clients send.
 2. At most one log line per interval per ``ClientFaults``, whatever the rate; the
    first fault after a quiet interval is logged at once, with the count since the
    previous line, so an operator sees that it happens. The metric has every one.
 3. Only the client's faults are counted and kept quiet: anything else (a handler's
    bug, a failure of ours) keeps its ERROR with traceback.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any, Final

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from mesh import config

__all__ = ["CLIENT_FAULTS", "REASONS", "ClientFaults", "ServerLog"]

log = logging.getLogger(__name__)

#: ``bad_request``: aiohttp could not parse the request (request line, headers, chunked
#: framing). ``disconnected``: the client hung up before its request body was complete.
REASONS: Final = ("bad_request", "disconnected")


class ClientFaults:
    """Counters of one server's client faults, and the rate limit of their log line."""

    def __init__(self, interval_s: float = config.HTTP_FAULT_LOG_INTERVAL_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.interval_s = interval_s
        self.counts: dict[str, int] = dict.fromkeys(REASONS, 0)
        self._clock = clock
        self._unlogged: dict[str, int] = dict.fromkeys(REASONS, 0)
        self._logged_at: float | None = None

    def note(self, reason: str, detail: str) -> None:
        """Count one fault (``reason`` from ``REASONS``); log a summary if one is due."""
        assert reason in self.counts, reason  # our own call sites name the reason
        self.counts[reason] += 1
        self._unlogged[reason] += 1
        now = self._clock()
        if self._logged_at is not None and now - self._logged_at < self.interval_s:
            return
        first = self._logged_at is None
        self._logged_at = now
        summary = ", ".join(f"{n} {r}" for r, n in self._unlogged.items() if n)
        self._unlogged = dict.fromkeys(REASONS, 0)
        log.warning("HTTP requests refused by the client's doing %s: %s (latest: %s); "
                    "counted in storemesh_http_client_errors_total, logged at most every "
                    "%.0f s", "so far" if first else "since the last report", summary,
                    detail, self.interval_s)


#: Where ``mesh.http.api``'s middleware finds the ``ClientFaults`` of the app a request is for.
CLIENT_FAULTS: Final = web.AppKey("storemesh_client_faults", ClientFaults)


class ServerLog(logging.LoggerAdapter[logging.Logger]):
    """The logger for aiohttp's request handler (``web.AppRunner(logger=...)``): a
    request aiohttp could not parse is counted in ``faults`` (reason ``bad_request``)
    instead of logged with its traceback; everything else goes on to
    ``aiohttp.server`` unchanged (invariant 3)."""

    def __init__(self, faults: ClientFaults) -> None:
        super().__init__(logging.getLogger("aiohttp.server"), {})
        self.faults = faults

    def log(self, level: int, msg: object, *args: object, **kwargs: Any) -> None:
        exc = kwargs.get("exc_info")
        if isinstance(exc, HttpProcessingError):
            peer = args[0] if args else None
            self.faults.note("bad_request", f"{type(exc).__name__} from {peer}")
            return
        super().log(level, msg, *args, **kwargs)

"""The fleet dashboard: one HTML page served by the cloud peer at ``/``.

No build step and nothing from outside: ``mesh/static/`` holds the page, one vanilla
JavaScript file and one stylesheet (package data). The script polls the
``/v1/fleet/...`` endpoints (``mesh.cloud.analytics``) and draws its charts as inline SVG.

Invariants:
 1. Only the files named in ``_FILES`` are served: a request names an entry of that
    table, never a path, so nothing else on disk can be reached.
 2. Files are read once, in a worker thread (never on the loop), and kept in memory.
"""

from __future__ import annotations

import asyncio
from importlib import resources
from typing import TYPE_CHECKING, Final

from aiohttp import web

from mesh.cloud.analytics import Analytics

if TYPE_CHECKING:
    from mesh.cloud.server import CloudNode

__all__ = ["Dashboard", "setup_dashboard"]

#: Served name -> (file in mesh/static, content type).
_FILES: Final = {
    "dashboard.html": ("dashboard.html", "text/html"),
    "dashboard.js": ("dashboard.js", "text/javascript"),
    "dashboard.css": ("dashboard.css", "text/css"),
}
#: (``/login`` is served by ``mesh.cloud.hq``, from mesh/static/login.html.)
#: A strict policy: the page needs nothing beyond its own origin (no CDN, no inline
#: script), so an injected SKU name could not run script even if it were rendered as HTML.
_CSP: Final = ("default-src 'none'; script-src 'self'; style-src 'self'; "
               "connect-src 'self'; img-src 'self' data:; base-uri 'none'; "
               "frame-ancestors 'none'; form-action 'none'")


def _read(name: str) -> bytes:
    return resources.files("mesh").joinpath("static", name).read_bytes()


class Dashboard:
    """Route handlers for the page and its two static files."""

    def __init__(self) -> None:
        self._cache: dict[str, bytes] = {}

    async def _file(self, name: str) -> web.Response:
        file, ctype = _FILES[name]
        body = self._cache.get(name)
        if body is None:
            body = self._cache[name] = await asyncio.to_thread(_read, file)
        return web.Response(body=body, content_type=ctype, charset="utf-8", headers={
            "Cache-Control": "no-cache", "Content-Security-Policy": _CSP,
            "X-Content-Type-Options": "nosniff"})

    async def page(self, request: web.Request) -> web.Response:
        return await self._file("dashboard.html")

    async def static(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name not in _FILES or name == "dashboard.html":
            raise web.HTTPNotFound(text=f"no static file {name!r}")
        return await self._file(name)


def setup_dashboard(cloud: CloudNode) -> None:
    """``CloudNode.setup_hooks`` entry: serve the dashboard at ``/`` (and attach the fleet
    analytics it reads, if no hook did yet)."""
    Analytics.attach(cloud)
    from mesh.http.sensor_routes import setup_fleet_sensors  # issue 14: the sensors panel

    setup_fleet_sensors(cloud)
    dash = Dashboard()
    cloud.app.router.add_get("/", dash.page)
    cloud.app.router.add_get("/static/{name}", dash.static)

"""Fleet analytics of the cloud on PostgreSQL: SQL over the ledger schema (``mesh.store.pgstore``).

With ``--database postgresql://...`` there is no analytics database beside the ledger:
``movements_hourly`` is updated in the same transaction as the envelopes it counts
(``mesh.store.pgstore`` invariant 4), so it is exact by construction, and every gateway serves
the fleet views from the one database, whichever stores it holds itself:

* ``GET /v1/fleet/sales``  (same shape as the SQLite cloud's: ``mesh.cloud.analytics``)
* ``GET /v1/fleet/stock``  on hand per SKU and store = the sum of the signed movements
  (receipts, sales, returns, adjustments, fulfilments) in the ledger; reservations are
  CRDT state held by the store replicas, so ``reserved`` is given only for the stores
  this gateway serves (``reserved_known``)
* ``GET /v1/fleet/health`` per store: envelopes, newest HLC and lag, the lease holder,
  WAN bytes (``egress``: saved by the holding gateway every tick and at hand-over)
* ``GET /v1/fleet/gateways`` this gateway, the live ones, and who holds which lease
* ``GET /v1/fleet/exceptions`` oversell exceptions of the whole fleet, in SQL over the
  view ``fleet_exceptions``: each store's list as the replica holding it derived it
  (the rule lives in the replica: ``mesh.cloud.analytics`` invariant 5), written by its
  lease holder (``mesh.cloud.gateway`` invariant 8); ``partial`` while a registered
  store has none written yet.

Every query runs in a worker thread on a connection of its own per request (bounded by
``MAX_LIMIT`` rows), never on the loop.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any, Final

import psycopg
from aiohttp import web

from mesh.cloud.analytics import DEFAULT_LIMIT, HOUR_MS, MAX_HOURS, MAX_LIMIT
from mesh.http.common import ApiError, json_errors, json_response, query_ident, query_int

if TYPE_CHECKING:
    from mesh.cloud.server import CloudNode

__all__ = ["PgAnalytics", "fleet_sales", "setup_pg_analytics", "setup_pg_dashboard"]

_APP_KEY: Final = web.AppKey("pg_analytics", object)


def _rows(dsn: str, sql: str, params: tuple[object, ...]) -> list[tuple[Any, ...]]:
    with psycopg.connect(dsn, autocommit=True, connect_timeout=10) as conn:
        return conn.execute(sql, params).fetchall()


def fleet_sales(dsn: str, *, since_ms: int, until_ms: int, sku: str | None = None,
                store: str | None = None, limit: int = DEFAULT_LIMIT) -> dict[str, Any]:
    """Sales with ``since_ms <= hour_ms < until_ms`` (as ``AnalyticsStore.sales``)."""
    if not 0 < until_ms - since_ms <= MAX_HOURS * HOUR_MS:
        raise ValueError(f"a sales window is 1..{MAX_HOURS} hours")
    where = "hour_ms >= %s AND hour_ms < %s"
    params: list[object] = [since_ms, until_ms]
    if sku is not None:
        where += " AND sku = %s"
        params.append(sku)
    if store is not None:
        where += " AND store_id = %s"
        params.append(store)
    with psycopg.connect(dsn, autocommit=True, connect_timeout=10) as conn:
        def q(select: str, tail: str = "") -> list[tuple[Any, ...]]:
            sql = f"SELECT {select} FROM sales_hourly WHERE {where} {tail}"  # noqa: S608 -- fixed SQL, values bound
            return conn.execute(sql, (*params, limit + 1) if "LIMIT" in tail
                                else tuple(params)).fetchall()

        per_hour = {int(h): (int(s), int(u)) for h, s, u in q(
            "hour_ms, SUM(sales), SUM(units)", "GROUP BY hour_ms")}
        by_store = [{"store": s, "sales": int(n), "units": int(u)} for s, n, u in q(
            "store_id, SUM(sales), SUM(units)", "GROUP BY store_id ORDER BY store_id")]
        by_sku = [{"sku": k, "sales": int(n), "units": int(u)} for k, n, u in q(
            "sku, SUM(sales), SUM(units)", "GROUP BY sku ORDER BY SUM(units) DESC, sku LIMIT %s")]
        rows = [{"store": s, "sku": k, "hour_ms": int(h), "sales": int(n), "units": int(u)}
                for s, k, h, n, u in q("store_id, sku, hour_ms, sales, units",
                                       "ORDER BY hour_ms, store_id, sku LIMIT %s")]
    hourly = [{"hour_ms": h, "sales": per_hour.get(h, (0, 0))[0],
               "units": per_hour.get(h, (0, 0))[1]} for h in range(since_ms, until_ms, HOUR_MS)]
    return {"hourly": hourly, "by_store": by_store, "by_sku": by_sku[:limit],
            "rows": rows[:limit], "truncated": len(rows) > limit or len(by_sku) > limit,
            "totals": {"sales": sum(int(r["sales"]) for r in by_store),
                       "units": sum(int(r["units"]) for r in by_store)}}


class PgAnalytics:
    """The ``/v1/fleet/`` endpoints of a gateway, over the shared database."""

    def __init__(self, cloud: CloudNode, dsn: str) -> None:
        self.cloud = cloud
        self.dsn = dsn

    @staticmethod
    def _now() -> int:
        return time.time_ns() // 1_000_000

    async def sales(self, request: web.Request) -> web.Response:
        sku = query_ident(request, "sku")
        store = query_ident(request, "store")
        hours = query_int(request, "hours", 1, MAX_HOURS, 24)
        limit = query_int(request, "limit", 1, MAX_LIMIT, DEFAULT_LIMIT)
        until = (self._now() // HOUR_MS + 1) * HOUR_MS
        since = until - hours * HOUR_MS
        body = await asyncio.to_thread(fleet_sales, self.dsn, since_ms=since, until_ms=until,
                                       sku=sku, store=store, limit=limit)
        return json_response({"sku": sku, "store": store, "hours": hours, "since_ms": since,
                      "until_ms": until, **body})

    async def stock(self, request: web.Request) -> web.Response:
        sku = query_ident(request, "sku")
        after = query_ident(request, "after") or ""
        limit = query_int(request, "limit", 1, MAX_LIMIT, DEFAULT_LIMIT)
        rows = await asyncio.to_thread(
            _rows, self.dsn,
            "WITH skus AS (SELECT DISTINCT sku FROM movements_hourly WHERE sku > %s "
            "AND (%s::text IS NULL OR sku = %s) ORDER BY sku LIMIT %s) "
            "SELECT m.sku, m.store_id, SUM(m.qty) FROM movements_hourly m JOIN skus "
            "USING (sku) GROUP BY m.sku, m.store_id ORDER BY m.sku, m.store_id",
            (after, sku, sku, limit + 1))
        if sku is not None and not rows:
            raise ApiError(404, f"no store has seen SKU {sku!r}", "sku")
        by_sku: dict[str, list[dict[str, Any]]] = {}
        for s, store_id, on_hand in rows:
            node = self.cloud.nodes.get(store_id)
            entry: dict[str, Any] = {"store": store_id, "on_hand": int(on_hand)}
            if node is not None:
                entry["reserved"] = node.replica.reserved(s)
            by_sku.setdefault(s, []).append(entry)
        skus = sorted(by_sku)
        page = skus[:limit]
        out = [{"sku": s, "on_hand": sum(x["on_hand"] for x in by_sku[s]),
                "stores": by_sku[s],
                "reserved_known": all("reserved" in x for x in by_sku[s])} for s in page]
        return json_response({"stock": out, "next": page[-1] if len(skus) > limit else None})

    async def health(self, request: web.Request) -> web.Response:
        rows = await asyncio.to_thread(
            _rows, self.dsn,
            "SELECT d.store_id, d.n, d.newest, l.gateway, l.url, l.epoch, "
            "l.expires_at > now(), COALESCE(w.sent, 0), COALESCE(w.received, 0) "
            "FROM (SELECT store_id, MAX(id) AS n, MAX(hlc) AS newest "
            "FROM envelopes GROUP BY store_id) d LEFT JOIN leases l USING (store_id) "
            "LEFT JOIN (SELECT store_id, SUM(sent) AS sent, SUM(received) AS received "
            "FROM egress GROUP BY store_id) w USING (store_id) "
            "ORDER BY d.store_id", ())
        now = self._now()
        stores = [{"store": s, "envelopes": int(n),
                   "newest_ms": int(h) >> 16, "lag_ms": max(0, now - (int(h) >> 16)),
                   "gateway": g if live else None, "gateway_url": u if live else None,
                   "lease_epoch": e,
                   # as the SQLite cloud's wan_bytes: out = cloud to store, in = egress
                   "wan_bytes": {"out": int(out), "in": int(inn), "source": "wire"}}
                  for s, n, h, g, u, e, live, out, inn in rows]
        gw = self.cloud.gateway
        return json_response({"now_ms": now, "stores": stores,
                      "gateway": None if gw is None else gw.id,
                      "analytics": {"source": "postgresql", "exact": True}})

    async def exceptions(self, request: web.Request) -> web.Response:
        """Fleet-wide, from SQL: the view ``fleet_exceptions`` (each store's list as its
        lease holder's replica derived it: ``mesh.cloud.gateway`` invariant 8), newest
        first, with the SQLite cloud's ``totals``; ``partial`` if a registered store has
        no list in the database yet."""
        sku = query_ident(request, "sku")
        store = query_ident(request, "store")
        limit = query_int(request, "limit", 1, MAX_LIMIT, 100)
        rows, by_store, missing = await asyncio.to_thread(self._exceptions, store, sku,
                                                          limit)
        found = [{"store": s, "sku": k, "origin": o, "seq": int(q), "hlc": int(h),
                  "kind": kind, "short": int(short), "at_ms": int(at)}
                 for s, k, o, q, h, kind, short, at in rows]
        totals = {"count": sum(t["count"] for t in by_store.values()),
                  "short_units": sum(t["short_units"] for t in by_store.values()),
                  "by_store": by_store}
        return json_response({"exceptions": found[:limit], "truncated": len(found) > limit,
                              "totals": totals, "stores": sorted(by_store),
                              "partial": missing > 0, "source": "postgresql"})

    def _exceptions(self, store: str | None, sku: str | None, limit: int
                    ) -> tuple[list[tuple[Any, ...]], dict[str, dict[str, int]], int]:
        with psycopg.connect(self.dsn, autocommit=True, connect_timeout=10) as conn:
            rows = conn.execute(
                "SELECT store_id, sku, origin, seq, hlc, kind, short, at_ms FROM "
                "fleet_exceptions WHERE (%s::text IS NULL OR store_id = %s) AND "
                "(%s::text IS NULL OR sku = %s) ORDER BY hlc DESC, store_id DESC, "
                "origin DESC, seq DESC LIMIT %s",
                (store, store, sku, sku, limit + 1)).fetchall()
            by_store = {str(s): {"count": int(n), "short_units": int(u)}
                        for s, n, u in conn.execute(
                "SELECT s.store_id, count(e.seq), COALESCE(sum(e.short), 0) FROM "
                "exceptions_seen s LEFT JOIN oversell_exceptions e ON e.store_id = "
                "s.store_id AND (%s::text IS NULL OR e.sku = %s) WHERE (%s::text IS NULL "
                "OR s.store_id = %s) GROUP BY s.store_id ORDER BY s.store_id",
                (sku, sku, store, store)).fetchall()}
            (missing,) = conn.execute(
                "SELECT count(*) FROM cloud_stores c WHERE (%s::text IS NULL OR "
                "c.store_id = %s) AND NOT EXISTS (SELECT 1 FROM exceptions_seen s WHERE "
                "s.store_id = c.store_id)", (store, store)).fetchone() or (0,)
        return rows, by_store, int(missing)


def setup_pg_analytics(cloud: CloudNode) -> None:
    """``CloudNode.setup_hooks`` entry for a cloud on PostgreSQL."""
    if cloud.app.get(_APP_KEY) is not None or cloud.database is None:
        return
    pa = PgAnalytics(cloud, cloud.database)
    fleet = web.Application(middlewares=[json_errors])
    fleet.router.add_get("/stock", pa.stock)
    fleet.router.add_get("/sales", pa.sales)
    fleet.router.add_get("/exceptions", pa.exceptions)
    fleet.router.add_get("/health", pa.health)
    if cloud.gateway is not None:
        fleet.router.add_get("/gateways", cloud.gateway.status)
    cloud.app.add_subapp("/v1/fleet/", fleet)
    cloud.app[_APP_KEY] = pa


def setup_pg_dashboard(cloud: CloudNode) -> None:
    """The dashboard page over the PostgreSQL fleet views (``mesh.cloud.dashboard``)."""
    from mesh.cloud.dashboard import Dashboard

    setup_pg_analytics(cloud)
    dash = Dashboard()
    cloud.app.router.add_get("/", dash.page)
    cloud.app.router.add_get("/static/{name}", dash.static)

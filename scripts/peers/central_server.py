"""The central baseline of scripts/bench_peers.py: one aiohttp + SQLite server, tills as
thin clients (they cannot sell while the server or the LAN is down).

``POST /v1/sales`` {"sku", "qty", "txn_id"} -> 201 {"id": N} after the row is committed
(WAL, synchronous=FULL, group commit: every sale waiting when the writer thread is free
goes into one transaction). ``GET /v1/events`` is an SSE feed of the committed sales
(``data: TXN_ID``), which the other tills read. Prints ``ready PORT`` when listening.

Usage: python central_server.py DB_PATH
"""

from __future__ import annotations

import asyncio
import sqlite3
import sys
import threading
from typing import Any

import orjson
from aiohttp import web

#: Bounds: sales per transaction, queued sales, events per subscriber.
MAX_BATCH = 1_000
MAX_QUEUE = 20_000
MAX_SUB_QUEUE = 50_000


class Store:
    def __init__(self, path: str) -> None:
        self.db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.execute("CREATE TABLE IF NOT EXISTS sales (txn_id TEXT PRIMARY KEY, "
                        "sku TEXT NOT NULL, qty INTEGER NOT NULL)")
        self.db.execute("CREATE TABLE IF NOT EXISTS stock (sku TEXT PRIMARY KEY, "
                        "on_hand INTEGER NOT NULL)")
        self.lock = threading.Lock()

    def commit(self, rows: list[tuple[str, str, int]]) -> None:
        with self.lock:
            self.db.execute("BEGIN")
            self.db.executemany("INSERT OR IGNORE INTO sales VALUES (?, ?, ?)", rows)
            self.db.executemany(
                "INSERT INTO stock VALUES (?, ?) ON CONFLICT(sku) DO UPDATE "
                "SET on_hand = on_hand + excluded.on_hand",
                [(sku, -qty) for _, sku, qty in rows])
            self.db.execute("COMMIT")


class Server:
    def __init__(self, path: str) -> None:
        self.store = Store(path)
        self.queue: asyncio.Queue[tuple[tuple[str, str, int], asyncio.Future[None]]] = (
            asyncio.Queue(MAX_QUEUE))
        self.subs: set[asyncio.Queue[bytes]] = set()

    async def writer(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self.queue.get()]
            while not self.queue.empty() and len(batch) < MAX_BATCH:
                batch.append(self.queue.get_nowait())
            await loop.run_in_executor(None, self.store.commit, [r for r, _ in batch])
            for _, fut in batch:  # the sellers' responses first, then the feed
                if not fut.done():
                    fut.set_result(None)
            feed = b"".join(b"data: " + r[0].encode() + b"\n\n" for r, _ in batch)
            for q in self.subs:
                if q.qsize() < MAX_SUB_QUEUE:
                    q.put_nowait(feed)

    async def sales(self, request: web.Request) -> web.Response:
        try:
            doc: Any = orjson.loads(await request.read())
            row = (str(doc["txn_id"]), str(doc["sku"]), int(doc["qty"]))
        except (ValueError, KeyError, TypeError):
            return web.json_response({"error": "body needs sku, qty, txn_id"}, status=400)
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if self.queue.full():
            return web.json_response({"error": "busy"}, status=503)
        self.queue.put_nowait((row, fut))
        await fut
        return web.Response(body=b'{"id":"' + row[0].encode() + b'"}', status=201,
                            content_type="application/json")

    async def events(self, request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        q: asyncio.Queue[bytes] = asyncio.Queue()
        self.subs.add(q)
        try:
            await resp.write(b": subscribed\n\n")
            while True:
                await resp.write(await q.get())
        finally:
            self.subs.discard(q)


async def main(path: str) -> None:
    srv = Server(path)
    app = web.Application()
    app.router.add_post("/v1/sales", srv.sales)
    app.router.add_get("/v1/events", srv.events)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    print(f"ready {port}", flush=True)
    await srv.writer()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))

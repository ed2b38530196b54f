"""The pycrdt-websocket edge of scripts/bench_peers.py: a WebsocketServer under
hypercorn, one room ("store") whose updates pycrdt-store's SQLiteYStore writes to disk.

Prints ``ready`` once listening and ``seen TXN_ID`` for every sale that reaches the
room's document (the server's replica). Runs in the peers' own venv.

Usage: python ycrdt_server.py PORT DB_PATH
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any

from hypercorn.asyncio import serve
from hypercorn.config import Config
from pycrdt import Map
from pycrdt.store import SQLiteYStore
from pycrdt.websocket import ASGIServer, WebsocketServer, YRoom

OUT: list[str] = []
LOOP = asyncio.new_event_loop()


def flush() -> None:
    if OUT:
        sys.stdout.write("".join(OUT))
        sys.stdout.flush()
        OUT.clear()


class Server(WebsocketServer):
    db_path = ""

    async def get_room(self, name: str) -> YRoom:
        if name not in self.rooms:
            store_cls = type("Store", (SQLiteYStore,), {"db_path": self.db_path})
            room = YRoom(ready=True, ystore=store_cls(name), log=self.log)
            sales = room.ydoc.get("sales", type=Map)

            def seen(event: Any) -> None:
                for key in event.keys:
                    OUT.append(f"seen {key}\n")
                LOOP.call_soon(flush)

            # keep the map and the subscription alive: pycrdt drops a collected one's observers
            room.bench_keep = (sales, sales.observe(seen))  # type: ignore[attr-defined]
            self.rooms[name] = room
        room = self.rooms[name]
        await self.start_room(room)
        return room


async def main(port: int, db: str) -> None:
    server = Server(auto_clean_rooms=False)
    server.db_path = db
    config = Config()
    config.bind = [f"127.0.0.1:{port}"]
    config.accesslog = None
    config.errorlog = None
    async with server:
        await server.get_room("store")
        task = asyncio.create_task(serve(ASGIServer(server), config))  # type: ignore[arg-type]
        await asyncio.sleep(0.3)
        print("ready", flush=True)
        await task


if __name__ == "__main__":
    LOOP.run_until_complete(main(int(sys.argv[1]), sys.argv[2]))

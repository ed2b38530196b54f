"""A till of the pycrdt-websocket system in scripts/bench_peers.py: a pycrdt Doc synced
with the server by a pycrdt Provider over an aiohttp WebSocket.

stdin ``sale TXN_ID SKU`` -> the sale goes into the local document's "sales" map, then
``ack TXN_ID`` (in memory only: Yjs acknowledges locally; the server stores it later).
Prints ``seen TXN_ID`` for every other till's sale that reaches this document.

Usage: python ycrdt_till.py WS_URL TILL_NAME
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any

import aiohttp
from pycrdt import Doc, Map, Provider

OUT: list[str] = []


def flush() -> None:
    if OUT:
        sys.stdout.write("".join(OUT))
        sys.stdout.flush()
        OUT.clear()


class Channel:
    """pycrdt's Channel protocol over an aiohttp client WebSocket."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse, path: str) -> None:
        self._ws, self._path = ws, path

    @property
    def path(self) -> str:
        return self._path

    def __aiter__(self) -> Channel:
        return self

    async def __anext__(self) -> bytes:
        msg = await self._ws.receive()
        if msg.type == aiohttp.WSMsgType.BINARY:
            return bytes(msg.data)
        raise StopAsyncIteration

    async def send(self, message: bytes) -> None:
        await self._ws.send_bytes(message)

    async def recv(self) -> bytes:
        return await self.__anext__()


async def main(url: str, me: str) -> None:
    loop = asyncio.get_running_loop()
    doc: Doc = Doc()
    sales = doc.get("sales", type=Map)
    mine = me + "-"

    def seen(event: Any) -> None:
        for key in event.keys:
            if not key.startswith(mine):
                OUT.append(f"seen {key}\n")
        loop.call_soon(flush)

    subscription = sales.observe(seen)  # kept: a collected subscription stops firing
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    async with aiohttp.ClientSession() as http, http.ws_connect(url) as ws:
        async with Provider(doc, Channel(ws, "store")) as provider:  # type: ignore[arg-type]
            await provider.synced.wait()
            print("ready", flush=True)
            assert subscription is not None
            while line := await reader.readline():
                parts = line.split()
                if len(parts) == 3 and parts[0] == b"sale":
                    txn = parts[1].decode()
                    sales[txn] = parts[2].decode() + ":1"
                    OUT.append(f"ack {txn}\n")
                    loop.call_soon(flush)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2]))

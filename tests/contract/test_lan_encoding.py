"""The LAN session encoding over real aiohttp sessions on 127.0.0.1 (transport invariant
8): negotiated in the hello, plain with a peer that predates it, refused when a listener
picks what was not offered, and a coded message that does not decode closes the session
before any of it reaches the node."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp
import orjson
import pytest
from aiohttp import web

from mesh.core.replica import Replica
from mesh.core.sync import encode_batch
from mesh.net import transport
from mesh.net.transport import LAN_CODECS, HandshakeError, Session
from mesh.store.datadir import NodeIdentity, enrol_node, init_store


def _now() -> int:
    return time.time_ns() // 1_000_000


def _pair(root: Path) -> tuple[NodeIdentity, NodeIdentity]:
    a = init_store(root / "a", "enc-store", now_ms=_now(), node_id="a")
    assert a.store_key is not None
    b = enrol_node(root / "b", a.store_key, "enc-store", "register", now_ms=_now(),
                   node_id="b")
    a.trust.add_certificate(b.certificate)
    b.trust.add_certificate(a.certificate)
    return a, b


def _batch(ident: NodeIdentity, n: int) -> bytes:
    r = Replica(ident.store_id, ident.node_id, ident.role, ident.key)
    r.receive("A", 1000, txn="rcv", now_ms=_now())
    raws = []
    for i in range(n):
        env = r.sell("A", 1, txn=f"s{i}", now_ms=_now() + i).envelope
        assert env is not None
        raws.append(env.raw)
    return encode_batch(raws)


@asynccontextmanager
async def _listener(ident: NodeIdentity, handler: Callable[[web.Request],
                    Awaitable[web.StreamResponse]]) -> AsyncIterator[str]:
    app = web.Application()
    app.router.add_get("/v1/sync", handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


class Served:
    """The listener's side: its sessions and what reached its node."""

    def __init__(self, ident: NodeIdentity, codecs: tuple[str, ...] = LAN_CODECS) -> None:
        self.ident = ident
        self.codecs = codecs
        self.sessions: list[Session] = []
        self.got: list[bytes] = []
        self.rejected: list[str] = []

    async def handler(self, request: web.Request) -> web.StreamResponse:
        return await transport.accept(request, self.ident, _now, self._run,
                                      self.rejected.append, codecs=self.codecs)

    async def _run(self, session: Session) -> None:
        self.sessions.append(session)
        await session.run(lambda peer, data: self.got.append(data))


async def _until(cond: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + 10
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


@pytest.mark.asyncio
@pytest.mark.parametrize(("offer", "accept", "agreed"), [
    (LAN_CODECS, LAN_CODECS, "z1"),
    ((), LAN_CODECS, None),  # a dialer that predates the encoding
    (LAN_CODECS, (), None),  # a listener that predates it
], ids=["both-new", "old-dialer", "old-listener"])
async def test_the_encoding_is_negotiated_and_old_peers_speak_plain(
        tmp_path: Path, offer: tuple[str, ...], accept: tuple[str, ...],
        agreed: str | None) -> None:
    a, b = _pair(tmp_path)
    served = Served(b, accept)
    data = _batch(a, 30)
    async with _listener(b, served.handler) as url, aiohttp.ClientSession() as http:
        s = await transport.dial(http, url, a, _now, codecs=offer)
        got: list[bytes] = []
        task = asyncio.create_task(s.run(lambda peer, d: got.append(d)))
        try:
            await _until(lambda: bool(served.sessions), "the listener's session")
            there = served.sessions[0]
            assert (s.lan_codec, there.lan_codec) == (agreed, agreed)
            assert (s.codec is None) == (agreed is None)
            s.send(data)
            there.send(b'V{"vv":{}}')
            await _until(lambda: served.got == [data] and got == [b'V{"vv":{}}'],
                         "both messages, exactly")
            if agreed:
                assert s.bytes_out < len(data) / 3  # what crossed, coded
            else:
                assert s.bytes_out == len(data)
        finally:
            s.close()
            await task


@pytest.mark.asyncio
async def test_a_listener_that_picks_what_was_not_offered_is_refused(tmp_path: Path) -> None:
    a, b = _pair(tmp_path)

    async def liar(request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        await ws.receive()  # the dialer's hello
        hello = transport._hello(b, os.urandom(32))
        hello["codec"] = "z9"
        hello["sig"] = "00" * 64
        await ws.send_str(orjson.dumps(hello).decode())
        await ws.receive()
        return ws

    async with _listener(b, liar) as url, aiohttp.ClientSession() as http:
        with pytest.raises(HandshakeError) as exc:
            await transport.dial(http, url, a, _now)
        assert exc.value.reason == "bad_handshake" and "z9" in exc.value.message


@pytest.mark.asyncio
@pytest.mark.parametrize("bad", [
    b"Z" + b"\xff" * 20 + b"\x00\x00\xff\xff",  # not deflate
    b"E\x00\x00\x00\x00",  # a plain message on a coded session
    None,  # a genuine coded message cut short
], ids=["garbage", "plain", "cut"])
async def test_a_coded_message_that_does_not_decode_closes_the_session(
        tmp_path: Path, bad: bytes | None) -> None:
    a, b = _pair(tmp_path)
    served = Served(b)
    first, second = _batch(a, 4), _batch(a, 8)
    async with _listener(b, served.handler) as url, aiohttp.ClientSession() as http:
        s = await transport.dial(http, url, a, _now)
        assert s.codec is not None

        async def drain() -> None:  # read as a peer does, so the listener's close completes
            async for _ in s.ws:
                pass
        reader = asyncio.create_task(drain())
        try:
            await _until(lambda: bool(served.sessions), "the listener's session")
            await s.ws.send_bytes(s.codec.encode(first))
            if bad is None:
                bad = s.codec.encode(second)[:-7]
            await s.ws.send_bytes(bad)
            there = served.sessions[0]
            await asyncio.wait_for(there.done.wait(), 10)
            assert there.close_reason == "bad_lan_message"
            assert there.refused == {"bad_lan_message": 1}
            assert served.got == [first]  # nothing of the bad message reached the node
        finally:
            await s.ws.close()
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)

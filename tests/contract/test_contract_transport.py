"""The transport contract (mesh.testing.contracts.check_transport) over the real
aiohttp sessions on loopback and over the simulator's links: per-session FIFO, HIGH
before LOW when both are queued, nothing crosses into the next session."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from mesh.net import transport
from mesh.sim.world import LinkModel, World
from mesh.store.datadir import enrol_node, init_store
from mesh.testing.contracts import check_transport


def _now() -> int:
    return time.time_ns() // 1_000_000


class SimRig:
    """Two nodes of a world; ``hold`` makes the link busy (bandwidth) for a while."""

    def __init__(self) -> None:
        self.w = World(31)
        self.w.add_node("a", "edge")
        self.w.add_node("b")
        self.w.connect("a", "b", LinkModel(fifo=True), LinkModel(fifo=True))
        self.w.run_until(100)
        self.got: list[bytes] = []
        self.w.nodes["b"].driver.message = (  # type: ignore[method-assign]
            lambda peer, data: self.got.append(data))

    def send(self, src: str, data: bytes, priority: int) -> None:
        self.w.nodes[src].transport.send("b" if src == "a" else "a", data, priority)

    def hold(self, src: str) -> None:
        link = self.w.links[(src, "b" if src == "a" else "a")]
        link.bandwidth = 1e9
        link.busy_until = self.w.now + 500.0

    def release(self, src: str) -> None:
        pass  # the link frees itself at busy_until

    def run(self) -> None:
        self.w.run_until(self.w.now + 5_000)

    def received(self, dst: str) -> list[bytes]:
        return [d for d in self.got if d[:1] == b"V" and not d.startswith(b'V{')]

    def reconnect(self) -> None:
        self.w.set_link("a", "b", False)
        self.w.set_link("a", "b", True)
        self.w.run_until(self.w.now + 200)
        self.w.nodes["b"].driver.message = (  # type: ignore[method-assign]
            lambda peer, data: self.got.append(data))


def test_sim_transport_passes_the_transport_contract() -> None:
    check_transport(SimRig)


class RealRig:
    """Sessions a -> b over aiohttp on 127.0.0.1, driven from a loop on a thread;
    ``codecs``: the LAN encodings the dialer offers (``()``: plain, as an older node)."""

    def __init__(self, root: Path, codecs: tuple[str, ...] = transport.LAN_CODECS) -> None:
        self.codecs = codecs
        self.a = init_store(root / "a", "contract-store", now_ms=_now(), node_id="a")
        assert self.a.store_key is not None
        self.b = enrol_node(root / "b", self.a.store_key, "contract-store", "register",
                            now_ms=_now(), node_id="b")
        self.a.trust.add_certificate(self.b.certificate)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.got: list[bytes] = []
        self.held: list[tuple[transport.Session, bytes, int]] | None = None
        self.tasks: list[Any] = []
        self._call(self._start())

    def _call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(20)

    async def _start(self) -> None:
        app = web.Application()

        async def accept(request: web.Request) -> web.StreamResponse:
            return await transport.accept(request, self.b, _now, self._served, lambda r: None)
        app.router.add_get("/v1/sync", accept)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}"
        self.http = aiohttp.ClientSession()
        await self._dial()

    async def _served(self, session: transport.Session) -> None:
        await session.run(lambda peer, data: self.got.append(data))

    async def _dial(self) -> None:
        self.session = await transport.dial(self.http, self.url, self.a, _now,
                                            codecs=self.codecs)
        assert (self.session.codec is None) == (not self.codecs)
        self.tasks.append(asyncio.create_task(self.session.run(lambda p, d: None)))

    def send(self, src: str, data: bytes, priority: int) -> None:
        if self.held is not None:  # queued on the session of now
            self.held.append((self.session, data, priority))
        else:
            self.loop.call_soon_threadsafe(self.session.send, data, priority)

    def hold(self, src: str) -> None:
        self.held = []

    def release(self, src: str) -> None:
        held, self.held = self.held or [], None

        def all_at_once() -> None:  # queued together, before the writer runs
            for session, data, prio in held:
                session.send(data, prio)
        self.loop.call_soon_threadsafe(all_at_once)

    def run(self) -> None:
        deadline = time.monotonic() + 10
        last = -1
        while time.monotonic() < deadline:
            time.sleep(0.2)
            if len(self.got) == last:
                return
            last = len(self.got)

    def received(self, dst: str) -> list[bytes]:
        return list(self.got)

    def reconnect(self) -> None:
        old = self.session

        async def again() -> None:
            old.close("contract: reconnect")
            await old.done.wait()
            await self._dial()
        self._call(again())

    def close(self) -> None:
        async def stop() -> None:
            self.session.close("done")
            await asyncio.gather(*self.tasks, return_exceptions=True)
            await self.http.close()
            await self.runner.cleanup()
        self._call(stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


@pytest.mark.parametrize("codecs", [transport.LAN_CODECS, ()], ids=["z1", "plain"])
def test_real_transport_passes_the_transport_contract(tmp_path: Path,
                                                      codecs: tuple[str, ...]) -> None:
    rigs: list[RealRig] = []

    def make() -> RealRig:
        rigs.append(RealRig(tmp_path / str(len(rigs)), codecs))
        return rigs[-1]
    try:
        check_transport(make)
    finally:
        for rig in rigs:
            rig.close()


def test_the_contract_catches_a_transport_without_priorities() -> None:
    class Flat(SimRig):
        def send(self, src: str, data: bytes, priority: int) -> None:
            super().send(src, data, 0)

    with pytest.raises(AssertionError, match="HIGH did not leave before LOW"):
        check_transport(Flat)

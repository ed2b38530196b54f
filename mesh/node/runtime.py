"""The real ports over asyncio: the clock, the worker thread pool and the sessions.

``mesh.ports`` defines them; ``mesh.node.node`` assembles a ``Driver`` over these, the SQLite
``Ledger`` (storage) and the zeroconf ``Discovery``. Each is a few lines: everything
that decides behaviour is in ``mesh.driver``.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable, Coroutine
from concurrent.futures import Future
from typing import Any, TypeVar

from mesh.net import transport
from mesh.ports import Cancel

__all__ = ["LOOP_ENV", "LoopClock", "SessionTransport", "ThreadWorker", "loop_kind", "run"]

T = TypeVar("T")

#: ``STOREMESH_LOOP=uvloop`` runs a node on uvloop (``pip install uvloop``) instead of the
#: standard library's loop. Not the default: it measured no gain on the receive path
#: (within ±2 %, docs/benchmarks.md, issue 13).
LOOP_ENV = "STOREMESH_LOOP"


def loop_kind() -> str:
    """The event loop ``run`` will use: ``asyncio`` unless ``STOREMESH_LOOP=uvloop``."""
    want = os.environ.get(LOOP_ENV, "").strip().lower() or "asyncio"
    if want not in ("asyncio", "uvloop"):
        raise ValueError(f"{LOOP_ENV} must be 'asyncio' or 'uvloop', not {want!r}")
    if want == "uvloop":
        try:
            import uvloop  # noqa: F401
        except ImportError:
            raise ValueError(f"{LOOP_ENV}=uvloop but uvloop is not installed "
                             "(pip install uvloop)") from None
    return want


def run(main: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run`` on the loop ``loop_kind`` names."""
    if loop_kind() == "uvloop":
        import uvloop

        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            return runner.run(main)
    return asyncio.run(main)


class LoopClock:
    """``Clock`` over an asyncio loop: monotonic = ``loop.time()``, realtime = the
    system's wall clock."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop

    def monotonic_ms(self) -> float:
        return self.loop.time() * 1000.0

    @staticmethod
    def realtime_ms() -> int:
        return time.time_ns() // 1_000_000

    def call_at(self, monotonic_ms: float, fn: Callable[[], None]) -> Cancel:
        return self.loop.call_at(monotonic_ms / 1000.0, fn)

    def call_soon(self, fn: Callable[[], None]) -> None:
        # thread-safe: storage futures complete on the ledger's writer thread
        self.loop.call_soon_threadsafe(fn)


class ThreadWorker:
    """``Worker`` over the loop's default thread pool. ``close`` waits for what runs."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._running: set[asyncio.Future[Any]] = set()

    def run(self, fn: Callable[[], T], done: Callable[[Future[T]], None]) -> None:
        afut = self.loop.run_in_executor(None, fn)
        self._running.add(afut)

        def finished(f: asyncio.Future[T]) -> None:
            self._running.discard(f)
            if f.cancelled():
                return
            out: Future[T] = Future()
            exc = f.exception()
            if exc is not None:
                out.set_exception(exc)
            else:
                out.set_result(f.result())
            done(out)
        afut.add_done_callback(finished)

    async def close(self) -> None:
        if self._running:
            await asyncio.gather(*self._running, return_exceptions=True)


class SessionTransport:
    """``Transport`` over the node's live authenticated sessions (``mesh.net.transport``)."""

    def __init__(self) -> None:
        self.sessions: dict[str, transport.Session] = {}

    def send(self, peer: str, data: bytes, priority: int) -> None:
        session = self.sessions.get(peer)
        if session is not None:
            session.send(data, priority)

    def close(self, peer: str, reason: str) -> None:
        session = self.sessions.get(peer)
        if session is not None:
            session.close(reason)

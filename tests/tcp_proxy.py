"""A TCP proxy on loopback that a test can cut and heal: a network partition on demand.

``TcpProxy(target_port).start()`` listens on 127.0.0.1 (a free port, ``.url``) and
forwards every connection to ``127.0.0.1:target_port``. It runs its own event loop in a
daemon thread, so the test's loop (busy reading streams, posting sales) never delays the
bytes it carries, and the test can call it from sync or async code alike.

* ``cut()`` aborts every connection it carries (both sides see a reset at once) and
  from then on aborts each new connection as soon as it is accepted. It returns only
  when that is in force.
* ``heal()`` forwards new connections again.
* ``close()`` does ``cut()``, stops listening, awaits every handler and joins the thread.
* ``tamper(up=..., flip_at=..., inject=...)`` arms a one-shot change of the next chunk
  carried in one direction (``up``: client to target): flip one bit at an offset, or
  insert bytes (a replayed earlier chunk, say) before it. ``recorded(up)`` gives the
  chunks carried so far (the first ``MAX_RECORDED``), to replay one.

Invariants:
 1. Only loopback targets: the proxy refuses to forward anywhere else.
 2. While cut, no byte is forwarded in either direction: the flag is checked on accept,
    after the upstream connect and before every write.
 3. Every connection and handler task it creates is closed and awaited by ``close()``;
    every wait is bounded (``CONNECT_TIMEOUT_S``, ``CALL_TIMEOUT_S``).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import threading
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any, Final

__all__ = ["TcpProxy"]

#: Connecting to the target on loopback takes microseconds; anything slower is a bug.
CONNECT_TIMEOUT_S: Final = 5.0
#: Longest a cross-thread call (start, cut, heal, close) may take.
CALL_TIMEOUT_S: Final = 10.0
#: Bytes read at once from either side.
CHUNK: Final = 64 * 1024
#: Chunks kept per direction for ``recorded`` (a handshake and a few messages).
MAX_RECORDED: Final = 256


@dataclass(eq=False)  # hashed by identity: kept in a set
class _Pair:
    client: asyncio.StreamWriter
    upstream: asyncio.StreamWriter | None = None

    def abort(self) -> None:
        for w in (self.client, self.upstream):
            if w is not None:
                w.transport.abort()


@dataclass
class ProxyStats:
    accepted: int = 0  # connections forwarded
    refused: int = 0  # connections aborted because the proxy was cut
    dropped: int = 0  # live connections aborted by cut()
    bytes_up: int = 0
    bytes_down: int = 0
    errors: list[str] = field(default_factory=list)


class TcpProxy:
    """A cuttable TCP forwarder from 127.0.0.1:<port> to 127.0.0.1:<target_port>."""

    def __init__(self, target_port: int, *, target_host: str = "127.0.0.1",
                 name: str = "proxy", scheme: str = "https") -> None:
        if not ipaddress.ip_address(target_host).is_loopback:  # invariant 1
            raise ValueError(f"TcpProxy forwards to loopback only, not {target_host}")
        self.target_host = target_host
        self.target_port = target_port
        self.name = name
        self.scheme = scheme  # nodes speak TLS unless started with --insecure-plaintext
        self.port = 0
        self._tamper: dict[bool, tuple[int | None, bytes]] = {}
        self.tampered: list[str] = []
        self._recorded: dict[bool, list[bytes]] = {True: [], False: []}
        self.stats = ProxyStats()
        self._cut = False
        self._pairs: set[_Pair] = set()
        self._handlers: set[asyncio.Task[None]] = set()
        self._server: asyncio.Server | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}"

    @property
    def is_cut(self) -> bool:
        return self._cut

    @property
    def live(self) -> int:
        """Connections currently forwarded."""
        return len(self._pairs)

    # --- control (any thread) ---------------------------------------------------------

    def start(self) -> TcpProxy:
        if self._thread is not None:
            raise RuntimeError("start() may be called once")
        ready = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            try:
                loop.run_until_complete(self._listen())
            except BaseException as exc:  # reported to start()'s caller
                failure.append(exc)
                ready.set()
                loop.close()
                return
            ready.set()
            try:
                loop.run_forever()
            finally:
                loop.run_until_complete(loop.shutdown_asyncgens())
                loop.close()

        self._thread = threading.Thread(target=run, name=f"tcp-proxy {self.name}", daemon=True)
        self._thread.start()
        if not ready.wait(CALL_TIMEOUT_S):
            raise RuntimeError(f"{self.name}: proxy did not start within {CALL_TIMEOUT_S} s")
        if failure:
            self._thread.join(CALL_TIMEOUT_S)
            raise RuntimeError(f"{self.name}: proxy failed to start: {failure[0]!r}")
        return self

    def cut(self) -> None:
        """Drop every live connection and refuse new ones (invariant 2)."""
        self._call(self._do_cut())

    def heal(self) -> None:
        self._call(self._do_heal())

    def close(self) -> None:
        if self._thread is None or self._loop is None or self._loop.is_closed():
            return
        with contextlib.suppress(RuntimeError):
            self._call(self._do_close())
            self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(CALL_TIMEOUT_S)
        if self._thread.is_alive():
            raise RuntimeError(f"{self.name}: proxy thread did not stop")

    def tamper(self, *, up: bool, flip_at: int | None = None, inject: bytes = b"") -> None:
        """Change the next chunk carried in direction ``up`` once: flip the low bit of
        its byte at ``flip_at`` (clamped to the chunk), and/or insert ``inject``
        before it. The loop thread reads the arm; a dict store is atomic."""
        self._tamper[up] = (flip_at, inject)

    def recorded(self, up: bool) -> list[bytes]:
        return list(self._recorded[up])

    def _apply_tamper(self, data: bytes, up: bool) -> bytes:
        arm = self._tamper.pop(up, None)
        if arm is None:
            return data
        flip_at, inject = arm
        if flip_at is not None:
            at = min(flip_at, len(data) - 1)
            data = data[:at] + bytes([data[at] ^ 1]) + data[at + 1:]
            self.tampered.append(f"flipped byte {at} of a {len(data)}-byte chunk")
        if inject:
            self.tampered.append(f"injected {len(inject)} bytes")
        return inject + data

    def _call(self, coro: Coroutine[Any, Any, None]) -> None:
        assert self._loop is not None, "start() the proxy first"
        asyncio.run_coroutine_threadsafe(coro, self._loop).result(CALL_TIMEOUT_S)

    # --- the proxy's own loop ------------------------------------------------------------

    async def _listen(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _do_cut(self) -> None:
        self._cut = True
        for pair in list(self._pairs):
            self.stats.dropped += 1
            pair.abort()

    async def _do_heal(self) -> None:
        self._cut = False

    async def _do_close(self) -> None:
        await self._do_cut()
        if self._server is not None:
            self._server.close()
        # The cut aborted every connection, so the handlers end by themselves. Cancel
        # only a straggler: on Python 3.11 asyncio logs an error for a cancelled
        # client_connected_cb task.
        handlers = list(self._handlers)
        if handlers:
            _, pending = await asyncio.wait(handlers, timeout=CONNECT_TIMEOUT_S + 1)
            for task in pending:
                task.cancel()
            await asyncio.gather(*handlers, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        pair = _Pair(writer)
        try:
            if self._cut:
                self.stats.refused += 1
                return
            try:
                up_reader, up_writer = await asyncio.wait_for(
                    asyncio.open_connection(self.target_host, self.target_port),
                    CONNECT_TIMEOUT_S)
            except (OSError, TimeoutError) as exc:
                self.stats.errors.append(f"connect to target: {exc!r}")
                return
            pair.upstream = up_writer
            if self._cut:  # cut while we were connecting
                self.stats.refused += 1
                return
            self.stats.accepted += 1
            self._pairs.add(pair)
            await asyncio.gather(self._pipe(reader, up_writer, up=True),
                                 self._pipe(up_reader, writer, up=False))
        finally:
            self._pairs.discard(pair)
            pair.abort()
            self._handlers.discard(task)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *,
                    up: bool) -> None:
        """Copy one direction until EOF; on any error abort the connection."""
        try:
            while not self._cut:
                data = await reader.read(CHUNK)
                if not data or self._cut:
                    break
                if len(self._recorded[up]) < MAX_RECORDED:
                    self._recorded[up].append(data)
                data = self._apply_tamper(data, up)
                writer.write(data)
                await writer.drain()
                if up:
                    self.stats.bytes_up += len(data)
                else:
                    self.stats.bytes_down += len(data)
            if not self._cut and writer.can_write_eof():
                writer.write_eof()  # half-close: the other direction may still talk
        except (OSError, RuntimeError):
            writer.transport.abort()

"""The event loop a node runs on (``mesh.runtime.run``): asyncio unless
``STOREMESH_LOOP=uvloop``; a bad value is the operator's mistake and says so. And the
clock's ``call_soon``, which a session calls once per message."""

from __future__ import annotations

import asyncio
import importlib.util

import pytest

from mesh import runtime

HAVE_UVLOOP = importlib.util.find_spec("uvloop") is not None


async def _loop_module() -> str:
    return type(asyncio.get_running_loop()).__module__


def test_asyncio_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(runtime.LOOP_ENV, raising=False)
    assert runtime.loop_kind() == "asyncio"
    monkeypatch.setenv(runtime.LOOP_ENV, "asyncio")
    assert runtime.loop_kind() == "asyncio"
    assert runtime.run(_loop_module()).startswith("asyncio")


def test_bad_value_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(runtime.LOOP_ENV, "tokio")
    with pytest.raises(ValueError, match="STOREMESH_LOOP"):
        runtime.loop_kind()


@pytest.mark.skipif(not HAVE_UVLOOP, reason="uvloop is not installed")
def test_uvloop_when_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(runtime.LOOP_ENV, "uvloop")
    assert runtime.loop_kind() == "uvloop"
    assert runtime.run(_loop_module()).startswith("uvloop")


def test_loop_clock_call_soon_from_the_loop_and_from_a_thread() -> None:
    """From the loop's thread, no self-pipe wake-up (call_soon_threadsafe); from another
    thread (the ledger's writer), still thread-safe."""
    import threading

    async def main() -> list[str]:
        loop = asyncio.get_running_loop()
        clock = runtime.LoopClock(loop)
        threadsafe_calls: list[int] = []
        real = loop.call_soon_threadsafe

        def counting(fn, *args):  # type: ignore[no-untyped-def]
            threadsafe_calls.append(threading.get_ident())
            return real(fn, *args)

        loop.call_soon_threadsafe = counting  # type: ignore[method-assign]
        ran: list[str] = []
        done = asyncio.Event()
        clock.call_soon(lambda: ran.append("loop"))
        await asyncio.sleep(0)
        assert threadsafe_calls == []
        t = threading.Thread(target=clock.call_soon,
                             args=(lambda: (ran.append("thread"), done.set()),))
        t.start()
        t.join()
        await asyncio.wait_for(done.wait(), 5)
        assert len(threadsafe_calls) == 1 and threadsafe_calls[0] != threading.get_ident()
        return ran

    assert asyncio.run(main()) == ["loop", "thread"]

"""The event loop a node runs on (``mesh.node.runtime.run``): asyncio unless
``STOREMESH_LOOP=uvloop``; a bad value is the operator's mistake and says so."""

from __future__ import annotations

import asyncio
import importlib.util

import pytest

from mesh.node import runtime

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


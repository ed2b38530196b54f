"""Client faults on the HTTP port (issue 10 item 13): malformed requests and clients that
hang up mid-body are counted by reason in /metrics and logged at most once a minute,
never with a traceback each. Real raw sockets against a real node on 127.0.0.1."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
import pytest_asyncio

from mesh.http.httpfaults import ClientFaults
from mesh.node.node import Node
from mesh.store.datadir import init_store
from tests.meshkit import issue_token, now_ms, running_node
from tests.node.test_api import scrape

#: Requests aiohttp cannot parse, each sent alone on a fresh connection.
MALFORMED: list[bytes] = [
    b"GARBAGE\r\n\r\n",                                   # not HTTP at all
    b"GET /v1/health HTTP/1.1 x\r\nHost: a\r\n\r\n",      # a broken request line
    b"GET /v1/health HTTP/1.1\r\nHost a\r\n\r\n",         # a broken header
    b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\n\r\n",        # a request line too long
    b"POST /v1/sales HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nZZ\r\n",
]
#: Requests whose client hangs up before the body it announced is complete (``AUTH``:
#: an integration's credential, so the gate lets them through to the body).
CUT_SHORT: list[bytes] = [
    b"POST /v1/sales HTTP/1.1\r\nHost: a\r\nAUTH\r\nContent-Length: 100\r\n\r\n{\"sku\"",
    b"PUT /v1/catalog/x HTTP/1.1\r\nHost: a\r\nAUTH\r\nContent-Length: 100\r\n\r\n{\"na",
    b"POST /v1/join HTTP/1.1\r\nHost: a\r\nContent-Length: 100\r\n\r\n{",
    b"POST /v1/reservations HTTP/1.1\r\nHost: a\r\nAUTH\r\nTransfer-Encoding: chunked"
    b"\r\n\r\n5\r\n{\"sku\r\n",
]
_AUTH: list[bytes] = []


@pytest_asyncio.fixture
async def node(tmp_path: Path) -> AsyncIterator[Node]:
    init_store(tmp_path / "edge", "store-1", now_ms=now_ms(), node_id="edge")
    _AUTH[:] = [f"Authorization: Bearer {issue_token(tmp_path / 'edge')}".encode()]
    async with running_node(tmp_path / "edge") as n:
        yield n


def _send(port: int, data: bytes, *, hang_up: bool) -> None:
    """Send ``data`` on a new connection; then hang up at once, or read the answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(data)
        if hang_up:
            return
        while s.recv(4096):  # until the server closes (it does after a parse error)
            pass


async def _counts(http: aiohttp.ClientSession) -> dict[str, float]:
    m = await scrape(http)
    return {dict(labels)["reason"]: v for (name, labels), v in m.items()
            if name == "storemesh_http_client_errors_total"}


@pytest.mark.asyncio
async def test_malformed_and_cut_short_requests_are_counted_not_logged_each(
        node: Node, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    rounds = 20
    async with aiohttp.ClientSession(base_url=node.url) as http:
        assert await _counts(http) == {"bad_request": 0, "disconnected": 0}
        for _ in range(rounds):
            for data in MALFORMED:
                await asyncio.to_thread(_send, node.http_port, data, hang_up=False)
            for data in CUT_SHORT:
                await asyncio.to_thread(_send, node.http_port,
                                        data.replace(b"AUTH", _AUTH[0]), hang_up=True)
        want = {"bad_request": rounds * len(MALFORMED), "disconnected": rounds * len(CUT_SHORT)}
        for _ in range(200):  # hang-ups are seen once the server reads on: ~10 s at most
            if (counts := await _counts(http)) == want:
                break
            await asyncio.sleep(0.05)
        assert counts == want
        async with http.get("/v1/health") as resp:
            assert resp.status == 200  # it kept serving
    loud = [r for r in caplog.records if r.levelno >= logging.WARNING]
    # 180 faults within a minute: one line (the first), and no traceback at all
    assert len(loud) == 1, [r.getMessage() for r in loud]
    assert "bad_request" in loud[0].getMessage() and loud[0].levelno == logging.WARNING
    assert not [r for r in caplog.records if r.exc_info]


@pytest.mark.asyncio
async def test_a_handler_failure_is_still_an_error_with_its_traceback(
        node: Node, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """Only the client's faults are kept quiet (mesh.http.httpfaults invariant 3)."""
    def broken(sku: str | None = None) -> list[object]:
        raise ConnectionResetError("a peer of ours went away")  # not the client

    monkeypatch.setattr(node.replica, "exceptions", broken)
    async with aiohttp.ClientSession(base_url=node.url) as http:
        async with http.get("/v1/exceptions") as resp:
            assert resp.status == 500
        monkeypatch.undo()
        assert await _counts(http) == {"bad_request": 0, "disconnected": 0}
    [err] = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert err.exc_info is not None and "GET /v1/exceptions failed" in err.getMessage()


def test_one_line_per_interval_with_the_count(caplog: pytest.LogCaptureFixture) -> None:
    clock = [1000.0]
    faults = ClientFaults(interval_s=60, clock=lambda: clock[0])
    caplog.set_level(logging.INFO, "mesh.http.httpfaults")
    for i in range(10_000):
        clock[0] += 0.001
        faults.note("disconnected" if i % 4 else "bad_request", f"request {i}")
    assert len(caplog.records) == 1  # the first, at once
    assert "1 bad_request" in caplog.records[0].getMessage()
    clock[0] += 60
    faults.note("bad_request", "late")
    assert len(caplog.records) == 2
    msg = caplog.records[1].getMessage()
    assert "since the last report" in msg
    assert "2500 bad_request, 7500 disconnected" in msg and "latest: late" in msg
    assert faults.counts == {"bad_request": 2501, "disconnected": 7500}

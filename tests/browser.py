"""Headless Chromium driven over the DevTools protocol (CDP), for the dashboard tests.

``Browser`` starts Debian's ``chromium`` with ``--remote-debugging-port=0`` (it writes
the port it chose to ``DevToolsActivePort`` in its profile), connects to its page over a
WebSocket (aiohttp, loopback only) and offers what the tests need: go to a URL, type
into a field and click (real input events: ``Input.insertText``), read values and the
DOM, take a screenshot. It is how a person logs in to the dashboard: the page's own
form, the cookie kept by the browser, then the dashboard's script polling with it.

Every wait is bounded; ``close()`` closes the WebSocket and stops the process by pid.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import time
from pathlib import Path
from typing import Any

import aiohttp
import orjson

#: Chromium start (profile, DevTools port) on a loaded 2-core machine.
START_TIMEOUT_S = 30.0
#: One CDP command's answer.
CALL_TIMEOUT_S = 20.0


class Browser:
    def __init__(self, argv: list[str], profile: Path) -> None:
        self.argv = [*argv, "--remote-debugging-port=0", "--remote-debugging-address=127.0.0.1",
                     "about:blank"]
        self.profile = profile
        self.proc: asyncio.subprocess.Process | None = None
        self.http: aiohttp.ClientSession | None = None
        self.ws: aiohttp.ClientWebSocketResponse | None = None
        self._ids = itertools.count(1)

    async def start(self) -> Browser:
        port_file = self.profile / "DevToolsActivePort"
        port_file.unlink(missing_ok=True)
        self.proc = await asyncio.create_subprocess_exec(
            *self.argv, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
            stdin=asyncio.subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + START_TIMEOUT_S
        while not (port_file.exists() and port_file.read_text().strip()):
            if time.monotonic() > deadline or self.proc.returncode is not None:
                raise AssertionError(f"chromium gave no DevTools port within "
                                     f"{START_TIMEOUT_S} s (exit {self.proc.returncode})")
            await asyncio.sleep(0.05)
        port = int(port_file.read_text().split()[0])
        self.http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=CALL_TIMEOUT_S))
        for _attempt in range(200):
            async with self.http.get(f"http://127.0.0.1:{port}/json/list") as resp:
                pages = [t for t in await resp.json() if t.get("type") == "page"]
            if pages:
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError("chromium opened no page")
        self.ws = await self.http.ws_connect(pages[0]["webSocketDebuggerUrl"], max_msg_size=0)
        await self.call("Page.enable")
        await self.call("Runtime.enable")
        return self

    async def call(self, method: str, **params: Any) -> dict[str, Any]:
        """One CDP command; its result (events in between are skipped)."""
        assert self.ws is not None
        n = next(self._ids)
        # (text frames: Chromium closes the connection on a binary one)
        await self.ws.send_str(orjson.dumps({"id": n, "method": method,
                                             "params": params}).decode())
        deadline = time.monotonic() + CALL_TIMEOUT_S
        while True:
            msg = await self.ws.receive(timeout=max(0.1, deadline - time.monotonic()))
            if msg.type not in (aiohttp.WSMsgType.TEXT, aiohttp.WSMsgType.BINARY):
                raise AssertionError(f"DevTools connection ended during {method}: {msg}")
            data = orjson.loads(msg.data)
            if data.get("id") == n:
                if "error" in data:
                    raise AssertionError(f"{method}: {data['error']}")
                result: dict[str, Any] = data.get("result", {})
                return result

    async def eval(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page (awaited if a promise)."""
        r = await self.call("Runtime.evaluate", expression=expression, returnByValue=True,
                            awaitPromise=True)
        if "exceptionDetails" in r:
            raise AssertionError(f"{expression!r}: {r['exceptionDetails']}")
        return r["result"].get("value")

    async def goto(self, url: str) -> None:
        await self.call("Page.navigate", url=url)
        await self.loaded()

    async def loaded(self) -> None:
        await self.until("document.readyState === 'complete'", "the page to load")

    async def until(self, expression: str, what: str, within: float = 20.0) -> Any:
        """Poll ``expression`` until it is truthy; returns its value."""
        deadline = time.monotonic() + within
        last: Any = None
        while time.monotonic() < deadline:
            with contextlib.suppress(AssertionError):  # mid-navigation: no context yet
                last = await self.eval(expression)
                if last:
                    return last
            await asyncio.sleep(0.1)
        raise AssertionError(f"not within {within} s: {what} ({expression} -> {last!r})")

    async def type_into(self, selector: str, text: str) -> None:
        """Focus the element and type ``text`` as keyboard input."""
        await self.eval(f"document.querySelector({orjson.dumps(selector).decode()}).focus()")
        await self.call("Input.insertText", text=text)

    async def click(self, selector: str) -> None:
        await self.eval(f"document.querySelector({orjson.dumps(selector).decode()}).click()")

    async def path(self) -> str:
        return str(await self.eval("location.pathname"))

    async def dom(self) -> str:
        return str(await self.eval("document.documentElement.outerHTML"))

    async def screenshot(self, path: Path) -> None:
        r = await self.call("Page.captureScreenshot", format="png")
        await asyncio.to_thread(path.write_bytes, base64.b64decode(r["data"]))

    async def close(self) -> None:
        if self.ws is not None:
            await self.ws.close()
        if self.http is not None:
            await self.http.close()
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()  # by pid: the process we started
            await self.proc.wait()


async def log_in(browser: Browser, cloud_url: str, user: str, password: str) -> None:
    """Log in at the cloud's HQ login page as a person does: the form, typed."""
    await browser.goto(cloud_url + "/login")
    await browser.type_into("#user", user)
    await browser.type_into("#password", password)
    await browser.click("#submit")
    await browser.until("location.pathname === '/' && document.readyState === 'complete'",
                        "the dashboard after logging in")

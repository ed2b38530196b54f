"""The fleet dashboard end to end in headless Chromium (Debian's ``chromium`` package).

A cloud peer and two stores run in this process on 127.0.0.1; a register makes a sale;
Chromium (driven over the DevTools protocol: ``tests.browser``) is sent to the login
page without a session, logs in there as a person does (typing into the form), loads
the dashboard (its script polls ``/v1/fleet/*`` with the session cookie and renders),
and the DOM must show that sale and the stock it left. A screenshot of the page is kept
in the test's tmp dir. Everything runs over TLS as in production: the stores' links
are mutual TLS pinned to their store keys, and Chromium opens the dashboard over HTTPS
with the cloud's ECDSA certificate (pinned by its public key; without the pin it gets
no page). Chromium talks to loopback only: every background service
that could reach out (updates, sync, QUIC, field trials) is switched off.

Setup: if ``chromium`` is missing and we are root with apt-get, the session fixture
installs it (bounded); otherwise the test is skipped with the reason.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import os
import shutil
import subprocess
import time
from collections.abc import AsyncIterator
from html.parser import HTMLParser
from pathlib import Path

import pytest
import pytest_asyncio

from mesh.net.hqtls import spki_sha256
from tests.browser import Browser, log_in
from tests.meshkit import HQ_PASSWORD, HQ_USER
from tests.node.test_analytics import Fleet, until

log = logging.getLogger(__name__)

#: apt-get update + install of chromium and its libraries: ~150 MB on a slow mirror.
INSTALL_TIMEOUT_S = 900
#: One Chromium run (start, load, virtual-time budget, dump, exit) on a loaded machine.
CHROMIUM_TIMEOUT_S = 45
#: Virtual ms the page may run before the DOM is dumped: several 1.5 s polls.
VIRTUAL_TIME_MS = 6000


@pytest.fixture(scope="session")
def chromium() -> str:
    path = shutil.which("chromium")
    if path is None and hasattr(os, "geteuid") and os.geteuid() == 0 \
            and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        log.warning("chromium missing: installing Debian's package with apt-get")
        deadline = time.monotonic() + INSTALL_TIMEOUT_S
        for cmd in (["apt-get", "update", "-q"],
                    ["apt-get", "install", "-y", "-q", "--no-install-recommends", "chromium"]):
            try:
                done = subprocess.run(cmd, env=env, capture_output=True, check=False,
                                      timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("%s timed out", " ".join(cmd))
                break
            log.warning("%s -> %d\n%s", " ".join(cmd), done.returncode,
                        done.stdout.decode(errors="replace")[-2000:]
                        + done.stderr.decode(errors="replace")[-2000:])
            if done.returncode != 0:
                break
        path = shutil.which("chromium")
    if path is None:
        pytest.skip("headless Chromium is not available (no 'chromium' on PATH, and it "
                    "could not be installed with apt-get: not root, no apt-get, or no mirror)")
    return path


def chromium_argv(binary: str, profile: Path, pin: Path | None = None, *,
                  virtual_time: bool = True) -> list[str]:
    """``pin``: a server certificate (PEM) whose public key Chromium accepts though no
    CA it knows signed it (a browser that trusts the cloud's HQ CA behaves the same):
    ``--ignore-certificate-errors-spki-list`` honours exactly that key, nothing else.
    ``virtual_time``: for a one-shot ``--dump-dom``/``--screenshot`` run (not for a
    ``tests.browser.Browser``, which waits in real time)."""
    extra = [] if pin is None else [
        "--ignore-certificate-errors-spki-list="
        + base64.b64encode(spki_sha256(pin.read_bytes())).decode()]
    flags = [
        binary, *extra, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
        "--no-first-run", "--no-default-browser-check", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--disable-default-apps",
        "--disable-extensions", "--disable-domain-reliability", "--disable-breakpad",
        "--disable-field-trial-config", "--metrics-recording-only", "--mute-audio",
        "--disable-dev-shm-usage", "--hide-scrollbars", f"--user-data-dir={profile}",
    ]
    return flags + ([f"--virtual-time-budget={VIRTUAL_TIME_MS}"] if virtual_time else [])


async def run_chromium(argv: list[str]) -> tuple[int, bytes, bytes]:
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        stdin=asyncio.subprocess.DEVNULL, start_new_session=True)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), CHROMIUM_TIMEOUT_S)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        pytest.fail(f"chromium did not finish within {CHROMIUM_TIMEOUT_S} s: {argv}")
    assert proc.returncode is not None
    return proc.returncode, out, err


class Cells(HTMLParser):
    """Text of ``td[data-col]`` cells by (table id, row data-store, column), and of
    elements with an id, from a DOM dump."""

    def __init__(self) -> None:
        super().__init__()
        self.cells: dict[tuple[str, str, str], str] = {}
        self.by_id: dict[str, str] = {}
        self.body: dict[str, str | None] = {}
        self._table = ""
        self._row = ""
        self._open: list[tuple[str, object]] = []  # (tag, key) of elements being read

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "body":
            self.body = a
        if tag == "table":
            self._table = a.get("id") or ""
        if tag == "tr":
            self._row = a.get("data-store") or ""
        if tag == "td" and a.get("data-col"):
            self._open.append((tag, (self._table, self._row, a["data-col"])))
        elif a.get("id"):
            self._open.append((tag, a["id"]))
        else:
            self._open.append((tag, None))

    def handle_endtag(self, tag: str) -> None:
        while self._open:
            t, _ = self._open.pop()
            if t == tag:
                break

    def handle_data(self, data: str) -> None:
        for _, key in self._open:
            if isinstance(key, tuple):
                self.cells[key] = self.cells.get(key, "") + data  # type: ignore[index]
            elif isinstance(key, str):
                self.by_id[key] = self.by_id.get(key, "") + data


@pytest_asyncio.fixture
async def fleet(tmp_path: Path) -> AsyncIterator[Fleet]:
    f = Fleet(tmp_path, ["s1", "s2"], tls=True)  # in a browser over TLS, as at HQ
    try:
        yield f
    finally:
        await f.close()


@contextlib.asynccontextmanager
async def open_browser(chromium: str, profile: Path, pin: Path | None
                       ) -> AsyncIterator[Browser]:
    """Chromium under DevTools control; ``pin``: the cloud's certificate (see
    ``chromium_argv``)."""
    b = Browser(chromium_argv(chromium, profile, pin, virtual_time=False), profile)
    try:
        yield await b.start()
    finally:
        await b.close()


def cloud_pin(fleet: Fleet) -> Path:
    """The cloud's ECDSA certificate from its HQ CA, which the test's browser pins."""
    assert fleet.cloud is not None and fleet.cloud.hq is not None
    return fleet.cloud.hq.cert_path


async def logged_in_dashboard(browser: Browser, url: str) -> Cells:
    """Log in at the login page (typed), open ``url`` and read the rendered DOM once the
    script refreshed with live data."""
    await log_in(browser, url.split("/?")[0].rstrip("/"), HQ_USER, HQ_PASSWORD)
    await browser.goto(url)
    await browser.until("Number(document.body.dataset.refreshes) >= 2 && "
                        "document.getElementById('conn').textContent === 'live'",
                        "the dashboard to refresh with live data")
    page = Cells()
    page.feed(await browser.dom())
    return page


@pytest.mark.asyncio
async def test_dashboard_shows_a_sale_made_a_moment_before(fleet: Fleet, chromium: str,
                                                           tmp_path: Path) -> None:
    await fleet.start_cloud()
    await fleet.start_stores()
    await fleet.receive("s1", "sku-a", 40)
    await fleet.receive("s2", "sku-a", 25)
    await fleet.receive("s2", "sku-b", 1)
    await fleet.sell("s2", "sku-a", 5)
    await fleet.sell("s2", "sku-b", 3)  # two short: an oversell exception
    await fleet.sell("s1", "sku-a", 2)
    await fleet.sell("s1", "sku-a", 1)  # the sale a moment before the page loads

    async def at_cloud() -> bool:
        node = fleet.cloud.nodes["s1"] if fleet.cloud else None
        return node is not None and node.replica.on_hand("sku-a") == 37
    await until(at_cloud, within=10, what="the sale reaches the cloud")
    await fleet.analytics.flush()

    url = f"{fleet.url}/?sku=sku-a"
    assert url.startswith("https://")
    # A browser that does not trust the HQ CA gets no page (over TLS, certificate error)
    _, refused_dom, _ = await run_chromium(
        [*chromium_argv(chromium, tmp_path / "profile-0"), "--dump-dom", url])
    assert b"storemesh" not in refused_dom, refused_dom[:300]
    async with open_browser(chromium, tmp_path / "profile", cloud_pin(fleet)) as browser:
        await dashboard_session(browser, fleet, url, tmp_path)


async def dashboard_session(browser: Browser, fleet: Fleet, url: str, tmp_path: Path
                            ) -> None:
    # without a login the dashboard shows nothing: the browser lands on the login page
    await browser.goto(url)
    assert await browser.path() == "/login"
    refused = Cells()
    refused.feed(await browser.dom())
    assert "stock-table" not in await browser.dom() and not refused.cells
    assert await browser.eval("document.cookie") == ""
    # a wrong password keeps it there, with the reason
    await log_in_expecting_failure(browser, fleet.url)

    page = await logged_in_dashboard(browser, url)
    (tmp_path / "dashboard.html").write_text(await browser.dom())
    assert page.by_id.get("conn") == "live", page.by_id.get("conn")
    assert page.by_id.get("account-name") == f"{HQ_USER} (viewer)"
    # the session cookie: not readable by the page's scripts, sent over TLS only, to this
    # host only, never with another site's requests
    assert await browser.eval("document.cookie") == ""
    [cookie] = (await browser.call("Network.getCookies"))["cookies"]
    assert (cookie["name"], cookie["secure"], cookie["httpOnly"], cookie["sameSite"],
            cookie["path"]) == ("__Host-storemesh_hq", True, True, "Strict", "/"), cookie
    stock = {(store, col): text for (table, store, col), text in page.cells.items()
             if table == "stock-table"}
    assert stock[("s1", "on_hand")] == "37" and stock[("s2", "on_hand")] == "20", stock
    assert page.cells[("sales-by-store", "s1", "sales")] == "2"
    assert page.cells[("sales-by-store", "s1", "units")] == "3"
    assert page.by_id["sales-count"] == "3" and page.by_id["sales-units"] == "8"
    assert page.cells[("exceptions", "s2", "sku")] == "sku-b"
    assert page.cells[("exceptions", "s2", "short")] == "2"
    assert page.by_id["card-exceptions"] == "1" and page.by_id["card-sales"] == "4"
    assert page.cells[("stores", "s1", "status")] == "online"
    assert page.cells[("stores", "s2", "envelopes")].isdigit()
    assert page.by_id["card-online"] == "2 / 2"

    shot = tmp_path / "dashboard.png"
    await browser.call("Emulation.setDeviceMetricsOverride", width=1280, height=900,
                       deviceScaleFactor=1, mobile=False)
    await browser.screenshot(shot)
    assert shot.stat().st_size > 20_000, "the screenshot looks blank"
    log.info("dashboard screenshot: %s", shot)

    # logging out (the page's button, with the session's CSRF token) ends the session
    await browser.click("#logout")
    await browser.until("location.pathname === '/login'", "the login page after logout")
    await browser.goto(url)
    assert await browser.path() == "/login"


async def log_in_expecting_failure(browser: Browser, cloud_url: str) -> None:
    await browser.goto(cloud_url + "/login")
    await browser.type_into("#user", HQ_USER)
    await browser.type_into("#password", "not the password")
    await browser.click("#submit")
    text = await browser.until("document.getElementById('error') && "
                               "document.getElementById('error').textContent",
                               "the login page to say why")
    assert "wrong password" in text and await browser.path() == "/login"


@pytest.mark.asyncio
async def test_a_browser_till_reaches_its_register_over_tls(chromium: str,
                                                            tmp_path: Path) -> None:
    """A web POS on the register opens https://localhost:PORT in Chromium. The store
    certificate (Ed25519) cannot be used by any browser, even one told to trust its key;
    the node's P-256 browser certificate, chosen by the server name, can."""
    from mesh.net.hqtls import NODE_FILES
    from mesh.node.node import Node
    from tests.meshkit import new_store, tag

    t = tag()
    edge = new_store(tmp_path, f"s-{t}", f"edge-{t}")
    node = Node(edge.data_dir, http_host="127.0.0.1", http_port=0, discovery=False)
    await node.start()
    try:
        assert node.tls is not None
        port = node.http_port
        # no server name (an IP URL): the Ed25519 store certificate; pinned or not, the
        # handshake fails (browsers offer no Ed25519 signature)
        _, refused, _ = await run_chromium([
            *chromium_argv(chromium, tmp_path / "p0", node.tls.cert_path),
            "--dump-dom", f"https://127.0.0.1:{port}/v1/health"])
        assert b'"status"' not in refused, refused[:300]
        # by name: the browser certificate (a till that trusts the node's browser CA)
        _, dom, err = await run_chromium([
            *chromium_argv(chromium, tmp_path / "p1", edge.data_dir / NODE_FILES.cert),
            "--dump-dom", f"https://localhost:{port}/v1/health"])
        assert b'"status"' in dom, (dom[:300], err[-500:])
    finally:
        await node.close()

"""The cloud's HQ login (mesh.cloud.hq) against a real CloudNode over real HTTP: what the door
refuses, how a session is carried and ended, and how password guessing is slowed.

(The browser's side, over TLS, with the cookie's ``Secure``/``__Host-`` form, is in
``tests/process/test_dashboard_e2e.py``; a real cloud process in
``tests/process/test_cloud_processes.py``.)
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import pytest_asyncio

from mesh import config
from mesh.cloud import hq
from mesh.cloud.dashboard import setup_dashboard
from mesh.cloud.server import CloudNode
from mesh.core.identity import TrustStore
from mesh.errors import CommandError
from mesh.store.datadir import enrol_node, init_store
from tests.meshkit import HQ_PASSWORD, HQ_USER, PIN_COST, add_hq_user, now_ms

pytestmark = pytest.mark.asyncio


@pytest_asyncio.fixture
async def cloud(tmp_path: Path) -> AsyncIterator[CloudNode]:
    edge = init_store(tmp_path / "edge", "s1", now_ms=now_ms(), node_id="edge-s1")
    assert edge.store_key is not None
    enrol_node(tmp_path / "hq" / "s1", edge.store_key, "s1", "cloud", now_ms=now_ms(),
               node_id="cloud-s1", trust=TrustStore.from_dict(edge.trust.to_dict()))
    add_hq_user(tmp_path / "hq")
    c = CloudNode(tmp_path / "hq", insecure_plaintext=True, http_host="127.0.0.1")
    c.setup_hooks.append(setup_dashboard)
    await c.start()
    try:
        yield c
    finally:
        await c.close()


def session(source: str = "127.0.0.1") -> aiohttp.ClientSession:
    return aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True),
                                 connector=aiohttp.TCPConnector(local_addr=(source, 0)))


async def login(http: aiohttp.ClientSession, url: str, user: str = HQ_USER,
                password: str = HQ_PASSWORD, **headers: str) -> tuple[int, Any]:
    async with http.post(url + "/v1/hq/login", data=orjson.dumps(
            {"user": user, "password": password}), headers={
            "Content-Type": "application/json", **headers}) as resp:
        return resp.status, orjson.loads(await resp.read())


async def get(http: aiohttp.ClientSession, url: str) -> tuple[int, Any]:
    async with http.get(url, allow_redirects=False) as resp:
        raw = await resp.read()
        try:
            return resp.status, orjson.loads(raw)
        except orjson.JSONDecodeError:
            return resp.status, resp.headers.get("Location")


async def test_the_fleet_views_need_a_login_the_stores_do_not(cloud: CloudNode) -> None:
    async with session() as http:
        assert await get(http, cloud.url + "/") == (303, "/login")
        for path in ("/v1/fleet/sales", "/v1/fleet/health", "/v1/fleet/stock", "/v1/stores"):
            status, body = await get(http, cloud.url + path)
            assert (status, body["error"]["reason"]) == (401, "login_required"), path
        # a store's own API at the cloud is that store's (public reads; device tokens)
        assert (await get(http, cloud.url + "/stores/s1/v1/health"))[0] == 200
        status, body = await get(http, cloud.url + "/login")
        assert status == 200
        # a made-up cookie is no session
        http.cookie_jar.update_cookies({"storemesh_hq": "x" * 43})
        assert (await get(http, cloud.url + "/v1/fleet/health"))[0] == 401

        http.cookie_jar.clear()
        status, me = await login(http, cloud.url)
        assert status == 200 and me["user"] == HQ_USER and me["csrf"]
        [cookie] = list(http.cookie_jar)
        assert cookie.key == "storemesh_hq" and cookie["httponly"] is True
        assert cookie["samesite"] == "Strict" and cookie["path"] == "/"
        assert not cookie["secure"]  # plain HTTP on loopback: TLS makes it __Host- + Secure
        assert (await get(http, cloud.url + "/v1/fleet/health"))[0] == 200
        assert (await get(http, cloud.url + "/"))[0] == 200
        assert (await get(http, cloud.url + "/v1/hq/session"))[1]["user"] == HQ_USER


async def test_logout_needs_the_csrf_token_and_ends_the_session(cloud: CloudNode) -> None:
    async with session() as http:
        _, me = await login(http, cloud.url)
        async with http.post(cloud.url + "/v1/hq/logout") as resp:
            assert resp.status == 403 and (await resp.json())["error"]["reason"] == "csrf"
        async with http.post(cloud.url + "/v1/hq/logout", headers={
                "X-CSRF-Token": me["csrf"], "Origin": "https://evil.example"}) as resp:
            assert resp.status == 403  # the right token from another site's page: no
        assert (await get(http, cloud.url + "/v1/fleet/health"))[0] == 200
        async with http.post(cloud.url + "/v1/hq/logout",
                             headers={"X-CSRF-Token": me["csrf"]}) as resp:
            assert resp.status == 200
        assert (await get(http, cloud.url + "/v1/fleet/health"))[0] == 401


async def test_a_cross_site_login_is_refused(cloud: CloudNode) -> None:
    async with session() as http:
        for headers in ({"Origin": "https://evil.example"}, {"Sec-Fetch-Site": "cross-site"},
                        {"Origin": "null"}):
            status, body = await login(http, cloud.url, **headers)
            assert (status, body["error"]["reason"]) == (403, "cross_site"), headers
        assert not list(http.cookie_jar)


async def test_wrong_passwords_are_delayed_then_locked_out(cloud: CloudNode,
                                                           tmp_path: Path) -> None:
    door = cloud.app[hq.HQ_KEY]
    async with session() as http:
        status, body = await login(http, cloud.url, "nobody", "whatever it is")
        assert (status, body["error"]["reason"]) == (401, "bad_password")
        got = [(await login(http, cloud.url, password="wrong password!"))
               for _ in range(config.PIN_FREE_FAILURES + 2)]
        reasons = [(s, b["error"]["reason"]) for s, b in got]
        assert reasons[:config.PIN_FREE_FAILURES + 1] == [(401, "bad_password")] * (
            config.PIN_FREE_FAILURES + 1)
        assert reasons[-1] == (429, "password_throttled")
        status, body = await login(http, cloud.url)  # even the right password waits
        assert status == 429
        # past the delays: after PIN_MAX_FAILURES the account is locked
        while door.guard.failures(HQ_USER) < config.PIN_MAX_FAILURES:
            door.guard._failures[HQ_USER].next_ok_ms = 0  # (skip the waiting)
            status, _ = await login(http, cloud.url, password="wrong password!")
            assert status == 401
        door.guard._failures[HQ_USER].next_ok_ms = 0
        status, body = await login(http, cloud.url)
        assert (status, body["error"]["reason"]) == (403, "locked_out")
        # a new password ends the lockout (the cloud reads the file within a second)
        hq.update_user(tmp_path / "hq", HQ_USER, password="a new passphrase", cost=PIN_COST)
        for _ in range(50):
            door.reload()
            status, _ = await login(http, cloud.url, password="a new passphrase")
            if status == 200:
                break
            await asyncio.sleep(0.1)
        assert status == 200
    async with session() as http:  # the refusals were counted
        async with http.get(cloud.url + "/v1/hq/metrics") as resp:
            text = await resp.text()
    assert 'storemesh_hq_auth_refusals_total{reason="bad_password"}' in text
    assert 'storemesh_hq_auth_refusals_total{reason="locked_out"} 1.0' in text


async def test_a_disabled_account_or_a_new_password_ends_its_sessions(
        cloud: CloudNode, tmp_path: Path) -> None:
    door = cloud.app[hq.HQ_KEY]
    async with session() as a, session() as b:
        await login(a, cloud.url)
        await login(b, cloud.url)
        hq.update_user(tmp_path / "hq", HQ_USER, disabled=True)
        door.reload()
        for http in (a, b):
            assert (await get(http, cloud.url + "/v1/fleet/health"))[0] == 401
        assert (await login(a, cloud.url))[0] == 401
        hq.update_user(tmp_path / "hq", HQ_USER, disabled=False)
        door.reload()
        await login(a, cloud.url)
        hq.update_user(tmp_path / "hq", HQ_USER, password="another passphrase", cost=PIN_COST)
        door.reload()
        assert (await get(a, cloud.url + "/v1/fleet/health"))[0] == 401


async def test_refusals_are_throttled_per_source(cloud: CloudNode) -> None:
    async with session("127.0.0.3") as http:
        seen = [(await get(http, cloud.url + "/v1/fleet/health"))[0]
                for _ in range(config.AUTH_BURST + 3)]
    assert seen[:config.AUTH_BURST] == [401] * config.AUTH_BURST and seen[-1] == 429
    async with session() as http:  # another address logs in as usual
        assert (await login(http, cloud.url))[0] == 200


async def test_accounts_file_and_bad_input(tmp_path: Path) -> None:
    root = tmp_path / "hq"
    hq.add_user(root, "ann@hq", "correct horse battery", cost=PIN_COST)
    assert (root / hq.HQ_FILE).stat().st_mode & 0o777 == 0o600
    raw = (root / hq.HQ_FILE).read_bytes()
    assert b"correct horse" not in raw and b"scrypt$" in raw
    for name, password, field in (("Ann", "correct horse battery", "name"),
                                  ("x", "short", "password"),
                                  ("ann@hq", "correct horse battery", "name")):
        with pytest.raises(CommandError) as err:
            hq.add_user(root, name, password, cost=PIN_COST)
        assert err.value.field == field
    assert hq.list_users(root) == [{"name": "ann@hq", "role": "viewer", "disabled": False}]
    (root / hq.HQ_FILE).write_text("{nope")
    with pytest.raises(ValueError, match="damaged"):
        hq.load_users(root)


async def _second_cloud(root: Path) -> CloudNode:
    """Another cloud process's door on the same root (a second gateway, or the next
    start of this one): its own HqDoor, the same sessions file."""
    c = CloudNode(root, insecure_plaintext=True, http_host="127.0.0.1")
    c.setup_hooks.append(setup_dashboard)
    await c.start()
    return c


async def test_a_session_survives_a_restart_and_is_shared_by_every_cloud_on_the_root(
        cloud: CloudNode, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "hq"
    assert (root / hq.SESSIONS_FILE).stat().st_mode & 0o777 == 0o600
    other = await _second_cloud(root)
    try:
        async with session() as http:
            _, me = await login(http, cloud.url)
            raw = (root / hq.SESSIONS_FILE).read_bytes()
            [cookie] = list(http.cookie_jar)
            assert cookie.value.encode() not in raw  # only its digest is kept
            # the other cloud serves the same browser, cookie and CSRF token alike
            http.cookie_jar.update_cookies({cookie.key: cookie.value},
                                           aiohttp.client.URL(other.url))
            assert (await get(http, other.url + "/v1/fleet/health"))[0] == 200
            assert (await get(http, other.url + "/v1/hq/session"))[1]["csrf"] == me["csrf"]
            # a logout at the other one ends it here within HQ_SESSION_RECHECK_S
            async with http.post(other.url + "/v1/hq/logout",
                                 headers={"X-CSRF-Token": me["csrf"]}) as resp:
                assert resp.status == 200
            http.cookie_jar.update_cookies({cookie.key: cookie.value},
                                           aiohttp.client.URL(cloud.url))
            await asyncio.sleep(config.HQ_SESSION_RECHECK_S + 0.1)
            assert (await get(http, cloud.url + "/v1/fleet/health"))[0] == 401
            # a restart keeps a live session (the old process gone, a new one on the root)
            _, me = await login(http, cloud.url)
            [cookie] = [c for c in http.cookie_jar if c.key == "storemesh_hq"]
        await other.close()
        other = await _second_cloud(root)
        async with session() as http:
            http.cookie_jar.update_cookies({cookie.key: cookie.value},
                                           aiohttp.client.URL(other.url))
            assert (await get(http, other.url + "/v1/fleet/health"))[0] == 200
            # idle past HQ_IDLE_S (the wall clock moves on): ended, and gone from the file
            later = time.time() + config.HQ_IDLE_S + 1
            monkeypatch.setattr(hq.time, "time", lambda: later)
            monkeypatch.setattr(config, "HQ_SESSION_RECHECK_S", 0.0)
            assert (await get(http, other.url + "/v1/fleet/health"))[0] == 401
            assert other.app[hq.HQ_KEY].store.count() == 0
    finally:
        await other.close()


async def test_the_sessions_file_is_bounded(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(config, "HQ_SESSIONS_MAX", 5)
    store = hq.SessionStore(tmp_path / hq.SESSIONS_FILE)
    now = time.time()
    for i in range(20):
        store.put(bytes([i]) * 32, hq._Session("ann@hq", "viewer", "c", "v", now + i, now + i))
    assert store.count() == 5
    assert store.get(bytes([19]) * 32) is not None and store.get(bytes([0]) * 32) is None
    assert store.end_unless({"ann@hq": "v"}) == 0
    assert store.end_unless({"ann@hq": "another"}) == 5 and store.count() == 0
    store.close()

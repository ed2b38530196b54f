"""HQ login for the cloud: accounts, password checks, session cookies, the door.

The cloud's fleet views (``/``, ``/v1/fleet/...``, ``/v1/stores``) are for head office
only. HQ accounts live in the cloud's control plane (``mesh.cloud.control``):
``ROOT/hq_users.json`` on the embedded cloud (``storemesh hq add ROOT NAME``), table
``hq_users`` on a cloud on PostgreSQL (``storemesh hq add ROOT NAME --database URL``),
sessions likewise in ``ROOT/hq_sessions.sqlite`` or table ``hq_sessions``; a browser
(or a script) logs in with ``POST /v1/hq/login`` and carries a session cookie from then
on. Store nodes under ``/stores/S/`` are not behind this door:
they have their own (device credentials of that store, ``mesh.http.gate``; node sessions for
sync). docs/security.md, "HQ login", is the reference.

Invariants:
 1. Passwords are kept only as scrypt verifiers (``mesh.core.auth.make_pin_verifier``, 12 or
    more characters) in a file of mode 0600 replaced atomically under ``hq.lock`` (or
    in table ``hq_users``, edited in one transaction: ``mesh.cloud.pgcontrol``); a
    check runs in a worker thread, never on the event loop, and compares with
    ``hmac.compare_digest``.
 2. A session is 32 random bytes in a cookie that scripts cannot read (``HttpOnly``),
    that no other site's request carries (``SameSite=Strict``), and that only TLS
    carries when the cloud serves TLS (``Secure`` and the ``__Host-`` prefix). The
    cloud keeps only its SHA-256, in ``ROOT/hq_sessions.sqlite`` (mode 0600) or the
    database (shared by every cloud process on that control plane, kept over a
    restart), with an idle timeout and an absolute lifetime on the wall clock; a
    logout, a disabled account or a new password ends it, at every process within
    ``HQ_SESSION_RECHECK_S``.
 3. CSRF: every state-changing request that a cookie authenticates (logout, and any
    later POST) needs ``X-CSRF-Token`` equal to the session's token (which only a
    same-origin script can learn, from ``GET /v1/hq/session``); login itself refuses a
    cross-site ``Origin``/``Sec-Fetch-Site``. Fleet views answer only GET.
 4. Refusals cost almost nothing (no hashing for an unknown cookie), are counted by
    reason (``storemesh_hq_auth_refusals_total``), and wrong passwords are throttled per
    account (``PinGuard``: delays, then a lockout) and per source (``SourceThrottle``).
 5. Every table is bounded: sessions (``HQ_SESSIONS_MAX`` on disk and in memory, oldest
    evicted; expired ones purged), accounts (``HQ_USERS_MAX``), refusal sources
    (``AUTH_SOURCES_MAX``).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import hmac
import html
import logging
import os
import re
import secrets
import sqlite3
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from importlib import resources
from pathlib import Path
from typing import Any, Final
from urllib.parse import parse_qs, urlsplit

import orjson
from aiohttp import web
from aiohttp.typedefs import Handler
from prometheus_client.metrics_core import CounterMetricFamily, Metric

from mesh import config
from mesh.cloud.control import ControlPlane, FileControl, HqSession
from mesh.core.auth import AuthError, PinGuard, SourceThrottle, make_pin_verifier, pin_matches
from mesh.errors import CommandError

__all__ = ["HQ_FILE", "SESSIONS_FILE", "HqDoor", "SessionStore", "add_user",
           "edit_users_file", "list_users", "setup_hq", "update_user"]

log = logging.getLogger(__name__)

HQ_FILE: Final = "hq_users.json"
_LOCK: Final = "hq.lock"
HQ_ROLES: Final = frozenset({"admin", "viewer"})
_NAME: Final = re.compile(r"[a-z0-9][a-z0-9._@-]{0,63}")
#: Cookie names: ``__Host-`` needs Secure, Path=/ and no Domain, so it is used over TLS.
COOKIE: Final = "storemesh_hq"
COOKIE_TLS: Final = "__Host-storemesh_hq"
#: Paths behind the door: the dashboard page and every fleet-wide view.
_PROTECTED_EXACT: Final = frozenset({"/", "/v1/stores"})
_PROTECTED_PREFIX: Final = "/v1/fleet/"
_LOGIN_CSP: Final = ("default-src 'none'; style-src 'self'; base-uri 'none'; "
                     "frame-ancestors 'none'; form-action 'self'")


# --- hq_users.json ------------------------------------------------------------------------


def _check_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise CommandError("an HQ account name is 1-64 characters of a-z 0-9 . _ @ - "
                           "(lower case, starting with a letter or digit)", "name")
    return name


def _verifier(password: str, cost: int) -> str:
    if not isinstance(password, str) or not config.HQ_PASSWORD_MIN <= len(password) <= 64:
        raise CommandError(f"an HQ password has {config.HQ_PASSWORD_MIN} to 64 characters "
                           "(a passphrase of a few words is good)", "password")
    return make_pin_verifier(password, n=cost)


def load_users(root: Path) -> dict[str, dict[str, Any]]:
    """``ROOT/hq_users.json``'s accounts (empty if there is none). A damaged file raises
    ``ValueError``."""
    path = Path(root) / HQ_FILE
    try:
        doc = orjson.loads(path.read_bytes())
    except FileNotFoundError:
        return {}
    except orjson.JSONDecodeError:
        doc = None
    users = doc.get("users") if isinstance(doc, dict) else None
    if not isinstance(users, dict) or not all(
            isinstance(v, dict) and isinstance(v.get("verifier"), str)
            and v.get("role") in HQ_ROLES and isinstance(v.get("disabled"), bool)
            for v in users.values()):
        raise ValueError(f"{path} is damaged: restore it from backup, or remove it and add "
                         "the HQ accounts again ('storemesh hq add')")
    return users


@contextlib.contextmanager
def edit_users_file(root: Path) -> Iterator[dict[str, dict[str, Any]]]:
    """``hq_users.json``'s accounts to change in place, under ``hq.lock``, replaced
    atomically when the block ends (``FileControl.edit_users``)."""
    from mesh.store.datadir import write_atomic

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    fd = os.open(root / _LOCK, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        users = load_users(root)
        yield users
        write_atomic(root / HQ_FILE, orjson.dumps({"users": users},
                                                  option=orjson.OPT_INDENT_2))
    finally:
        os.close(fd)


def _control(where: Path | ControlPlane) -> ControlPlane:
    return FileControl(where) if isinstance(where, (str, Path)) else where


def add_user(where: Path | ControlPlane, name: str, password: str, *, role: str = "viewer",
             cost: int = config.PIN_SCRYPT_N) -> None:
    """Create HQ account ``name`` on the cloud whose root (or control plane) is ``where``."""
    _check_name(name)
    if role not in HQ_ROLES:
        raise CommandError(f"role must be one of {sorted(HQ_ROLES)}", "role")
    verifier = _verifier(password, cost)
    with _control(where).edit_users() as users:
        if name in users:
            raise CommandError(f"HQ account {name!r} exists already; 'storemesh hq "
                               "set-password' gives it a new password", "name")
        if len(users) >= config.HQ_USERS_MAX:
            raise CommandError(f"at most {config.HQ_USERS_MAX} HQ accounts")
        users[name] = {"role": role, "verifier": verifier, "disabled": False,
                       "changed_ms": time.time_ns() // 1_000_000}


def update_user(where: Path | ControlPlane, name: str, *, password: str | None = None,
                disabled: bool | None = None, role: str | None = None,
                cost: int = config.PIN_SCRYPT_N) -> None:
    """Change an account: a new password, disabled or enabled, another role. A running
    cloud ends the account's sessions within ``AUTH_RELOAD_S``."""
    verifier = None if password is None else _verifier(password, cost)
    if role is not None and role not in HQ_ROLES:
        raise CommandError(f"role must be one of {sorted(HQ_ROLES)}", "role")
    with _control(where).edit_users() as users:
        user = users.get(name)
        if user is None:
            raise CommandError(f"no HQ account {name!r}; see 'storemesh hq list'", "name")
        if verifier is not None:
            user["verifier"] = verifier
        if disabled is not None:
            user["disabled"] = disabled
        if role is not None:
            user["role"] = role
        user["changed_ms"] = time.time_ns() // 1_000_000


def list_users(where: Path | ControlPlane) -> list[dict[str, Any]]:
    """Accounts without their verifiers."""
    return [{"name": k, "role": v["role"], "disabled": v["disabled"]}
            for k, v in sorted(_control(where).users().items())]


# --- sessions -------------------------------------------------------------------------------


_Session = HqSession


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def _verifier_tag(verifier: str) -> str:
    """What a session keeps of the verifier it was opened with: enough to see a new
    password, without a copy of the verifier in a second file."""
    return hashlib.sha256(verifier.encode()).hexdigest()[:32]


SESSIONS_FILE: Final = "hq_sessions.sqlite"
_SESSIONS_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS sessions (
    digest  BLOB PRIMARY KEY,
    user    TEXT NOT NULL,
    role    TEXT NOT NULL,
    csrf    TEXT NOT NULL,
    vtag    TEXT NOT NULL,
    created REAL NOT NULL,
    seen    REAL NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS sessions_created ON sessions (created);
"""


class SessionStore:
    """HQ sessions on disk: one SQLite file per cloud root, WAL, shared by every cloud
    process on that root (a second gateway, the next start). Every call is one short
    statement under a lock; callers on the event loop make a few per login and at most
    one a second per session otherwise."""

    def __init__(self, path: Path) -> None:
        self.path = path
        fresh = not path.exists()
        if fresh:  # created 0600: it holds the CSRF tokens
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        self._db = sqlite3.connect(path, timeout=5.0, isolation_level=None,
                                   check_same_thread=False)
        self._lock = threading.Lock()
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(_SESSIONS_SCHEMA)

    def get(self, key: bytes) -> _Session | None:
        with self._lock:
            row = self._db.execute("SELECT user, role, csrf, vtag, created, seen FROM "
                                   "sessions WHERE digest = ?", (key,)).fetchone()
        if row is None:
            return None
        return _Session(row[0], row[1], row[2], row[3], row[4], row[5], stored_seen=row[5])

    def put(self, key: bytes, s: _Session) -> None:
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO sessions VALUES (?, ?, ?, ?, ?, ?, ?)",
                             (key, s.user, s.role, s.csrf, s.verifier, s.created, s.seen))
            self._db.execute(
                "DELETE FROM sessions WHERE digest IN (SELECT digest FROM sessions ORDER BY "
                "created DESC LIMIT -1 OFFSET ?)", (config.HQ_SESSIONS_MAX,))

    def touch(self, key: bytes, seen: float) -> None:
        with self._lock:
            self._db.execute("UPDATE sessions SET seen = MAX(seen, ?) WHERE digest = ?",
                             (seen, key))

    def delete(self, key: bytes) -> None:
        with self._lock:
            self._db.execute("DELETE FROM sessions WHERE digest = ?", (key,))

    def end_unless(self, allowed: dict[str, str]) -> int:
        """End every session whose account is not in ``allowed`` (user -> verifier tag)
        with that tag, and every expired one; returns how many ended."""
        now = time.time()
        with self._lock:
            rows = self._db.execute("SELECT digest, user, vtag, created, seen FROM "
                                    "sessions").fetchall()
            ended = [r[0] for r in rows if allowed.get(r[1]) != r[2]
                     or now - r[4] > config.HQ_IDLE_S or now - r[3] > config.HQ_SESSION_S]
            self._db.executemany("DELETE FROM sessions WHERE digest = ?",
                                 [(k,) for k in ended])
        return len(ended)

    def count(self) -> int:
        with self._lock:
            n: int = self._db.execute("SELECT COUNT(*) FROM sessions").fetchone()[0]
        return n

    def close(self) -> None:
        with self._lock:
            self._db.close()


class HqDoor:
    """The HQ login of one cloud: accounts (re-read when they change), sessions,
    throttles, the middleware and the login endpoints."""

    def __init__(self, root: Path, control: ControlPlane | None = None) -> None:
        self.root = Path(root)
        self.control = control if control is not None else FileControl(self.root)
        self.users: dict[str, dict[str, Any]] = {}
        self._stamp: object = None
        #: Sessions this process has read lately (a cache of ``store``, bounded).
        self.sessions: OrderedDict[bytes, _Session] = OrderedDict()
        self.store = self.control.sessions()
        self.guard = PinGuard("HQ account")
        self.throttle = SourceThrottle()
        self.refusals: dict[str, int] = {}
        self.logins = 0

    # --- accounts ---------------------------------------------------------------------

    def reload(self) -> None:
        """Re-read the accounts if they changed; end sessions they no longer allow."""
        stamp = self.control.users_stamp()
        if stamp == self._stamp:
            return
        self.users = self.control.users() if stamp is not None else {}
        self._stamp = stamp
        self.end_sessions()
        self.guard.forget_except(self.users.keys())
        if not self.users:
            log.warning("no HQ account in %s: the dashboard and fleet API refuse everyone "
                        "until one is added ('storemesh hq add %s NAME')",
                        type(self.control).__name__, self.root)

    def end_sessions(self) -> None:
        """End the sessions the accounts no longer allow (disabled, new password, gone)
        and the expired ones, on disk and here."""
        allowed = {name: _verifier_tag(u["verifier"]) for name, u in self.users.items()
                   if not u["disabled"]}
        self.store.end_unless(allowed)
        for key, held in list(self.sessions.items()):
            if allowed.get(held.user) != held.verifier:
                del self.sessions[key]

    async def _reload_loop(self) -> None:
        last_purge = time.monotonic()
        while True:
            try:
                await asyncio.to_thread(self.reload)
                if time.monotonic() - last_purge > config.HQ_SESSION_TOUCH_S:
                    last_purge = time.monotonic()
                    await asyncio.to_thread(self.end_sessions)  # the expired ones
            except (OSError, ValueError) as exc:
                log.error("cannot read the HQ accounts: %s (keeping the accounts held)", exc)
            await asyncio.sleep(config.AUTH_RELOAD_S)

    async def run(self, app: web.Application) -> Any:
        """``cleanup_ctx``: the reload task lives as long as the app."""
        await asyncio.to_thread(self.reload)
        task = asyncio.create_task(self._reload_loop(), name="hq-reload")
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            self.store.close()

    # --- the door ---------------------------------------------------------------------

    @staticmethod
    def protected(path: str) -> bool:
        return path in _PROTECTED_EXACT or path.startswith(_PROTECTED_PREFIX)

    async def session_of(self, request: web.Request) -> _Session | None:
        token = request.cookies.get(COOKIE_TLS) or request.cookies.get(COOKIE)
        if not token or len(token) > 64:
            return None
        key = _digest(token)
        mono = time.monotonic()
        s = self.sessions.get(key)
        if s is None or mono - s.checked > config.HQ_SESSION_RECHECK_S:
            # not read lately: the store says (a logout or a login at another process)
            fresh = await asyncio.to_thread(self.store.get, key)
            if fresh is None:
                self.sessions.pop(key, None)
                return None
            if s is not None:
                fresh.seen = max(fresh.seen, s.seen)
            s = fresh
            s.checked = mono
            self.sessions[key] = s
            self.sessions.move_to_end(key)
            while len(self.sessions) > config.HQ_SESSIONS_MAX:
                self.sessions.popitem(last=False)
        now = time.time()
        if now - s.seen > config.HQ_IDLE_S or now - s.created > config.HQ_SESSION_S:
            self.sessions.pop(key, None)
            await asyncio.to_thread(self.store.delete, key)
            return None
        s.seen = now
        if now - s.stored_seen > config.HQ_SESSION_TOUCH_S:
            s.stored_seen = now  # (before the await: one touch per interval)
            await asyncio.to_thread(self.store.touch, key, now)
        return s

    def _refuse(self, request: web.Request, status: int, reason: str, message: str,
                field: str | None = None, retry_after: int | None = None
                ) -> web.Response:
        self.refusals[reason] = self.refusals.get(reason, 0) + 1
        if reason != "throttled":
            self.throttle.refused(request.remote or "?", _ms())
        resp = web.Response(body=orjson.dumps({"error": {
            "field": field, "message": message, "reason": reason}}), status=status,
            content_type="application/json")
        resp.headers["Cache-Control"] = "no-store"
        if retry_after is not None:
            resp.headers["Retry-After"] = str(retry_after)
        return resp

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if not self.protected(request.path):
            return await handler(request)
        if self.throttle.blocked(request.remote or "?", _ms()):
            return self._refuse(request, 429, "throttled", "too many refused requests from "
                                "this address; wait a few seconds", None, 1)
        s = await self.session_of(request)
        if s is None:
            if request.path == "/" and request.method == "GET":
                self.refusals["login_required"] = self.refusals.get("login_required", 0) + 1
                raise web.HTTPSeeOther("/login")  # a browser: to the login page
            return self._refuse(request, 401, "login_required", "the fleet views need an "
                                "HQ login: POST /v1/hq/login {user, password}, then send "
                                "its cookie", "Cookie")
        if request.method not in ("GET", "HEAD") and not _csrf_ok(request, s):
            return self._refuse(request, 403, "csrf", "send the session's X-CSRF-Token "
                                "(GET /v1/hq/session) from a page of this origin",
                                "X-CSRF-Token")
        return await handler(request)

    # --- endpoints --------------------------------------------------------------------

    async def login_page(self, request: web.Request) -> web.Response:
        body = await asyncio.to_thread(_static, "login.html")
        text = body.decode()
        if request.query.get("error"):
            text = text.replace("<!--error-->", '<p id="error" class="error">'
                                + html.escape(_LOGIN_ERRORS.get(request.query["error"],
                                                                "login failed"))
                                + "</p>")
        return web.Response(text=text, content_type="text/html", headers={
            "Cache-Control": "no-store", "Content-Security-Policy": _LOGIN_CSP,
            "X-Content-Type-Options": "nosniff",
            # (no-referrer would make the form post send "Origin: null": refused)
            "Referrer-Policy": "same-origin"})

    async def login(self, request: web.Request) -> web.StreamResponse:
        """``POST /v1/hq/login``: JSON ``{user, password}`` (scripts) or a form post (the
        login page). Answers 200 JSON / 303 to ``/`` with the cookie, or refuses."""
        form = request.content_type == "application/x-www-form-urlencoded"
        source = request.remote or "?"
        now = _ms()
        if self.throttle.blocked(source, now):
            return self._done(request, form, self._refuse(
                request, 429, "throttled", "too many refused requests from this address; "
                "wait a few seconds", None, 1))
        if not _same_origin(request):
            return self._done(request, form, self._refuse(
                request, 403, "cross_site", "a login from another site's page is refused",
                "Origin"))
        raw = await request.content.read(4096)
        user, password = _credentials(raw, form)
        try:
            entry = self.users.get(user) if user is not None else None
            if entry is None or entry["disabled"] or password is None:
                # the same answer and (about) the same time as a wrong password
                await asyncio.to_thread(pin_matches, _DUMMY, password or "")
                raise AuthError(401, "bad_password", "unknown account or wrong password",
                                "password")
            assert user is not None
            self.guard.check_key(user, entry["verifier"], now, "password")
            if not await asyncio.to_thread(pin_matches, entry["verifier"], password):
                n = self.guard.failed_key(user, entry["verifier"], _ms())
                left = config.PIN_MAX_FAILURES - n
                raise AuthError(401, "bad_password", "unknown account or wrong password"
                                + (f" ({left} tries left before lockout)" if left > 0
                                   else "; the account is now locked out"), "password")
        except AuthError as exc:
            return self._done(request, form, self._refuse(
                request, exc.status, exc.reason, exc.message, exc.field, exc.retry_after_s))
        self.guard.succeeded(user)
        token = secrets.token_urlsafe(32)
        now_s = time.time()
        s = _Session(user, entry["role"], secrets.token_urlsafe(24),
                     _verifier_tag(entry["verifier"]), now_s, now_s, stored_seen=now_s,
                     checked=time.monotonic())
        # stored before the cookie is handed out
        await asyncio.to_thread(self.store.put, _digest(token), s)
        self.sessions[_digest(token)] = s
        while len(self.sessions) > config.HQ_SESSIONS_MAX:
            self.sessions.popitem(last=False)
        self.logins += 1
        log.info("HQ login: %s from %s", user, source)
        if form:
            resp: web.StreamResponse = _see_other("/")
        else:
            resp = web.json_response({"user": user, "role": s.role, "csrf": s.csrf})
        resp.headers["Cache-Control"] = "no-store"
        secure = request.secure
        resp.set_cookie(COOKIE_TLS if secure else COOKIE, token, path="/", secure=secure,
                        httponly=True, samesite="Strict", max_age=config.HQ_SESSION_S)
        return resp

    def _done(self, request: web.Request, form: bool, refused: web.Response
              ) -> web.StreamResponse:
        if not form:
            return refused
        reason = orjson.loads(refused.body)["error"]["reason"]  # type: ignore[arg-type]
        return _see_other(f"/login?error={reason}")

    async def whoami(self, request: web.Request) -> web.Response:
        s = await self.session_of(request)
        if s is None:
            return self._refuse(request, 401, "login_required", "not logged in", "Cookie")
        return web.json_response({"user": s.user, "role": s.role, "csrf": s.csrf},
                                 headers={"Cache-Control": "no-store"})

    async def logout(self, request: web.Request) -> web.Response:
        s = await self.session_of(request)
        if s is None:
            return self._refuse(request, 401, "login_required", "not logged in", "Cookie")
        if not _csrf_ok(request, s):
            return self._refuse(request, 403, "csrf", "send the session's X-CSRF-Token",
                                "X-CSRF-Token")
        for key, held in list(self.sessions.items()):
            if held is s:
                del self.sessions[key]
                await asyncio.to_thread(self.store.delete, key)
        resp = web.json_response({"logged_out": s.user})
        resp.del_cookie(COOKIE_TLS if request.secure else COOKIE, path="/")
        return resp

    # --- metrics ----------------------------------------------------------------------

    def collect(self) -> Iterable[Metric]:
        refused = CounterMetricFamily("storemesh_hq_auth_refusals", "Requests to the fleet "
                                      "views and HQ login refused, by reason",
                                      labels=["reason"])
        for reason, n in sorted(self.refusals.items()):
            refused.add_metric([reason], n)
        yield refused
        yield CounterMetricFamily("storemesh_hq_logins", "HQ logins", value=self.logins)

    async def metrics(self, request: web.Request) -> web.Response:
        from prometheus_client import CollectorRegistry, generate_latest

        reg = CollectorRegistry(auto_describe=False)
        reg.register(self)  # a Collector by shape (collect())
        return web.Response(body=generate_latest(reg),
                            headers={"Content-Type": "text/plain; version=0.0.4"})


_LOGIN_ERRORS: Final = {
    "bad_password": "Unknown account or wrong password.",
    "locked_out": "This account is locked out after too many wrong passwords.",
    "password_throttled": "Too many wrong passwords: wait a little and try again.",
    "throttled": "Too many refused requests from this address: wait a few seconds.",
    "cross_site": "Log in from this site's own page.",
}
#: A verifier no password matches, checked for unknown accounts so that their refusal
#: costs what a wrong password costs (no account enumeration by timing).
_DUMMY: Final = ("scrypt$16384$8$1$" + "00" * 16 + "$" + "00" * 32)


def _see_other(location: str) -> web.Response:
    return web.Response(status=303, headers={"Location": location,
                                             "Cache-Control": "no-store"})


def _ms() -> int:
    return time.monotonic_ns() // 1_000_000


def _static(name: str) -> bytes:
    return resources.files("mesh").joinpath("static", name).read_bytes()


def _credentials(raw: bytes, form: bool) -> tuple[str | None, str | None]:
    if form:
        q = parse_qs(raw.decode(errors="replace"), max_num_fields=4)
        user, pw = q.get("user", [None])[0], q.get("password", [None])[0]
    else:
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError:
            body = None
        if not isinstance(body, dict):
            return None, None
        user, pw = body.get("user"), body.get("password")
    user = user if isinstance(user, str) and _NAME.fullmatch(user) else None
    pw = pw if isinstance(pw, str) and len(pw) <= 64 else None
    return user, pw


def _same_origin(request: web.Request) -> bool:
    """Refuse what a browser marks as coming from another site (login CSRF)."""
    site = request.headers.get("Sec-Fetch-Site")
    if site is not None and site not in ("same-origin", "none"):
        return False
    origin = request.headers.get("Origin")
    if origin is None:
        return True  # not a browser's cross-site request (browsers send Origin on POST)
    return origin != "null" and urlsplit(origin).netloc == request.host


def _csrf_ok(request: web.Request, s: _Session) -> bool:
    sent = request.headers.get("X-CSRF-Token", "")
    return _same_origin(request) and hmac.compare_digest(sent.encode(), s.csrf.encode())


HQ_KEY: Final = web.AppKey("storemesh_hq", HqDoor)


def setup_hq(app: web.Application, root: Path, control: ControlPlane | None = None
             ) -> HqDoor:
    """Put the HQ door in front of ``app``'s fleet views (the cloud's root app)."""
    door = HqDoor(root, control)
    app[HQ_KEY] = door
    app.middlewares.append(door.middleware)
    app.cleanup_ctx.append(door.run)
    app.router.add_get("/login", door.login_page)
    app.router.add_post("/v1/hq/login", door.login)
    app.router.add_get("/v1/hq/session", door.whoami)
    app.router.add_post("/v1/hq/logout", door.logout)
    app.router.add_get("/v1/hq/metrics", door.metrics)
    return door

"""Who may call the API: device credentials, the staff roster, PINs, sessions, throttles.

Everything here is checked offline with the store's public key: a till verifies a
device credential or a PIN with every link down. No I/O, no clock (``now_ms`` comes in).

* A **device credential** (``smd1.<body>.<sig>``) is the store key's statement "device D
  may run commands C on nodes N until T" (optionally bound to an online channel).
  It is revoked by naming ``device:D`` in the store's revocation list
  (``mesh.core.identity.RevocationList``), which sync already carries to every node.
* A **roster** is the store key's signed, versioned list of staff: id, display name,
  role, disabled flag and a PIN verifier (scrypt, salted; never the PIN). It travels
  with certificates and revocation lists and expires ``not_after`` (the edge re-signs it
  while it runs), so a till cut off for longer than that stops accepting PINs.
* A **staff session** (``sms1.<body>.<mac>``) is issued by one node after a PIN check,
  bound to the device that asked, and MAC'd with a key that lives only in that node's
  memory.

Invariants:
 1. Signatures cover canonical bytes: a domain prefix (``storemesh/device/v1\\n``,
    ``storemesh/roster/v1\\n``) then ``orjson.dumps(body, OPT_SORT_KEYS)``; no signature
    of another kind (certificate, envelope, revocation list) verifies as one of these.
 2. Parsing is total: any text in, a credential or an ``AuthError`` out, never another
    exception. Oversized input is refused before any decoding.
 3. Revocation, expiry, node scope and roster state are checked on every use; only the
    signature check of a credential is remembered (bounded: ``DEVICE_CACHE_MAX``).
 4. Every table keyed by outside input is bounded: the credential cache, the per-source
    refusal buckets (``AUTH_SOURCES_MAX``, least recently used evicted) and the PIN
    failure table (only staff ids on the roster enter it).
 5. A PIN is compared only through ``hashlib.scrypt`` and ``hmac.compare_digest``.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
from collections import OrderedDict
from dataclasses import dataclass, replace
from typing import Any, Final

import orjson

from mesh import config
from mesh.core.identity import NodeKey, verify_signature

__all__ = [
    "APPROVER_ROLES",
    "COMMANDS",
    "DEVICE_COMMANDS",
    "DEVICE_ROLES",
    "STAFF_PERMISSIONS",
    "STAFF_ROLES",
    "AuthError",
    "DeviceCredential",
    "PinGuard",
    "Roster",
    "SessionKeys",
    "SourceThrottle",
    "StaffEntry",
    "issue_device",
    "issue_roster",
    "make_pin_verifier",
    "parse_device",
    "pin_matches",
    "revoked_name",
    "who",
]

DEVICE_DOMAIN: Final = b"storemesh/device/v1\n"
ROSTER_DOMAIN: Final = b"storemesh/roster/v1\n"
DEVICE_PREFIX: Final = "smd1."
SESSION_PREFIX: Final = "sms1."

#: What a request may do. ``read``: the protected reads (reservation list, live events,
#: sensors and review items); ``price``: catalog writes on an edge (prices, products,
#: the sensor registry); ``review``: resolve a sensor review item (it may adjust stock);
#: ``sensor``: post sensor readings and telemetry (at a till: manual counts only, with a
#: staff session); ``login``: open a staff session here.
COMMANDS: Final = frozenset({"sale", "return", "receipt", "adjust", "reserve", "release",
                             "fulfil", "price", "review", "sensor", "audit", "read",
                             "login"})
WRITES: Final = frozenset({"sale", "return", "receipt", "adjust", "reserve", "release",
                           "fulfil", "price", "review"})
#: Device roles and what each may do unless the issuer narrows it. ``pos`` writes only
#: with a staff session (the staff member's role decides); ``online`` and ``hq`` act
#: for their channel only; ``service`` is a back-office integration (ERP, scripts)
#: that writes in its own name; ``sensor`` is a sensor gateway (readings, telemetry);
#: ``read`` only reads.
DEVICE_COMMANDS: Final[dict[str, frozenset[str]]] = {
    "pos": frozenset({"sale", "return", "receipt", "adjust", "release", "fulfil", "price",
                      "review", "sensor", "read", "login", "audit"}),
    "online": frozenset({"reserve", "release", "fulfil", "read"}),
    "hq": frozenset({"reserve", "release", "fulfil", "read", "audit", "price"}),
    "service": COMMANDS - {"login"},
    "sensor": frozenset({"sensor", "read"}),
    "read": frozenset({"read"}),
}
DEVICE_ROLES: Final = frozenset(DEVICE_COMMANDS)
#: Roles whose devices act for one channel: they reserve for it and end only its own.
CHANNEL_ROLES: Final = frozenset({"online", "hq"})
STAFF_ROLES: Final = frozenset({"cashier", "supervisor", "manager"})
_SUPERVISOR: Final = frozenset({"sale", "return", "fulfil", "read", "receipt", "adjust",
                                "release", "price", "review", "sensor", "audit",
                                "return_large"})
#: What a staff member may do at a ``pos`` device, by role. ``return_large``: a return
#: of more than ``RETURN_APPROVAL_QTY`` units. Anything else needs an approver.
STAFF_PERMISSIONS: Final[dict[str, frozenset[str]]] = {
    "cashier": frozenset({"sale", "return", "fulfil", "sensor", "read"}),
    "supervisor": _SUPERVISOR,
    "manager": _SUPERVISOR,
}
APPROVER_ROLES: Final = frozenset({"supervisor", "manager"})

#: Device and staff ids: short, and never holding the ``:`` and ``+`` that scope txn
#: ids (``<device>:<txn>``) and name approvers (``<staff>+<approver>``) in envelopes.
_ID: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,31}")
_B64: Final = re.compile(r"[A-Za-z0-9_-]+")
_MAX_INT: Final = (1 << 63) - 1


class AuthError(Exception):
    """A refused credential: ``status`` 401 (who are you?) or 403 (not allowed),
    ``reason`` a short label for /metrics, ``field`` the header or field at fault."""

    def __init__(self, status: int, reason: str, message: str,
                 field: str | None = "Authorization", retry_after_s: int | None = None
                 ) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason
        self.message = message
        self.field = field
        self.retry_after_s = retry_after_s


def _b64e(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _b64d(text: str) -> bytes:
    if not _B64.fullmatch(text):
        raise ValueError("not base64url")
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def check_id(value: object, what: str) -> str:
    """A device or staff id, or ``ValueError`` (local input: the CLI)."""
    if not isinstance(value, str) or not _ID.fullmatch(value):
        raise ValueError(f"{what} must be 1-32 characters of A-Z a-z 0-9 . _ - "
                         "(starting with a letter or digit)")
    return value


def who(meta: dict[str, Any]) -> dict[str, Any]:
    """Device, txn, staff and approver of a ledger entry's meta, for the audit trail
    (``GET /v1/audit``, ``storemesh ledger show``). Txn ids are stored scoped to the
    device (``<device>:<txn>``) and an approved command's staff is ``<staff>+<approver>``
    (``mesh.http.gate.Principal``). Entries written before credentials existed have neither."""
    txn, staff = meta.get("txn"), meta.get("staff")
    device = None
    if isinstance(txn, str) and ":" in txn:
        device, txn = txn.split(":", 1)
    approver = None
    if isinstance(staff, str) and "+" in staff:
        staff, approver = staff.split("+", 1)
    return {"txn_id": txn, "device_id": device, "staff_id": staff, "approved_by": approver}


def revoked_name(device_id: str) -> str:
    """How a revoked device is named in the store's revocation list."""
    return f"device:{device_id}"


# --- device credentials --------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DeviceCredential:
    device_id: str
    store_id: str
    role: str
    commands: frozenset[str]
    nodes: frozenset[str] | None  # None: every node of the store
    channel: str | None
    issued_ms: int
    not_after: int

    def body(self) -> dict[str, Any]:
        return {"dev": self.device_id, "store": self.store_id, "role": self.role,
                "cmds": sorted(self.commands),
                "nodes": None if self.nodes is None else sorted(self.nodes),
                "ch": self.channel, "iat": self.issued_ms, "exp": self.not_after}

    def to_dict(self) -> dict[str, Any]:
        """What ``storemesh device list`` shows (no signature: nothing secret anyway)."""
        return {"device_id": self.device_id, "role": self.role,
                "commands": sorted(self.commands),
                "nodes": None if self.nodes is None else sorted(self.nodes),
                "channel": self.channel, "issued_ms": self.issued_ms,
                "not_after": self.not_after}


def _body_bytes(domain: bytes, body: dict[str, Any]) -> bytes:
    return domain + orjson.dumps(body, option=orjson.OPT_SORT_KEYS)


def issue_device(store_key: NodeKey, *, store_id: str, device_id: str, role: str,
                 now_ms: int, ttl_ms: int, commands: frozenset[str] | None = None,
                 nodes: frozenset[str] | None = None, channel: str | None = None
                 ) -> tuple[DeviceCredential, str]:
    """Sign a device credential; returns it and its text (the bearer token)."""
    check_id(device_id, "device id")
    if role not in DEVICE_ROLES:
        raise ValueError(f"device role must be one of {sorted(DEVICE_ROLES)}")
    allowed = DEVICE_COMMANDS[role]
    cmds = allowed if commands is None else frozenset(commands)
    if not cmds or not cmds <= allowed:
        raise ValueError(f"a {role} device may be allowed some of {sorted(allowed)}")
    if not 0 < ttl_ms <= config.MAX_DEVICE_TTL_MS:
        raise ValueError(f"a device credential lasts 1 ms to "
                         f"{config.MAX_DEVICE_TTL_MS // 86_400_000} days")
    if role in CHANNEL_ROLES and channel is None:
        channel = "web" if role == "online" else "hq"
    if channel is not None:
        check_id(channel, "channel")
    cred = DeviceCredential(device_id, store_id, role, cmds,
                            None if nodes is None else frozenset(nodes), channel,
                            now_ms, now_ms + ttl_ms)
    raw = _body_bytes(DEVICE_DOMAIN, cred.body())
    sig = store_key.sign(raw)
    return cred, f"{DEVICE_PREFIX}{_b64e(raw[len(DEVICE_DOMAIN):])}.{_b64e(sig)}"


def _str_or_none(v: object) -> str | None:
    if v is None:
        return None
    if not isinstance(v, str) or not _ID.fullmatch(v):
        raise ValueError("bad id")
    return v


def _decode_device(raw: bytes) -> DeviceCredential:
    d = orjson.loads(raw)
    if not isinstance(d, dict) or set(d) != {"dev", "store", "role", "cmds", "nodes", "ch",
                                              "iat", "exp"}:
        raise ValueError("wrong keys")
    cmds, nodes = d["cmds"], d["nodes"]
    if (d["role"] not in DEVICE_ROLES or not isinstance(cmds, list)
            or not all(c in COMMANDS for c in cmds)
            or not (nodes is None or (isinstance(nodes, list) and len(nodes) <= 64
                                      and all(isinstance(n, str) for n in nodes)))
            or not all(type(d[k]) is int and 0 <= d[k] <= _MAX_INT for k in ("iat", "exp"))
            or not isinstance(d["store"], str)):
        raise ValueError("bad field")
    return DeviceCredential(check_id(d["dev"], "dev"), d["store"], d["role"],
                            frozenset(cmds), None if nodes is None else frozenset(nodes),
                            _str_or_none(d["ch"]), d["iat"], d["exp"])


class DeviceVerifier:
    """Checks bearer tokens against one store key (invariant 3: signatures remembered,
    everything else checked on every call)."""

    def __init__(self, store_id: str, store_public_key: bytes) -> None:
        self.store_id = store_id
        self.store_public_key = store_public_key
        self._cache: OrderedDict[str, DeviceCredential] = OrderedDict()

    def parse(self, text: str) -> DeviceCredential:
        cred = self._cache.get(text)
        if cred is not None:
            return cred
        cred = parse_device(text, self.store_id, self.store_public_key)
        if len(self._cache) >= config.DEVICE_CACHE_MAX:
            self._cache.popitem(last=False)
        self._cache[text] = cred
        return cred


def parse_device(text: str, store_id: str, store_public_key: bytes) -> DeviceCredential:
    """The credential ``text`` states, if the store key signed it (invariant 2)."""
    bad = AuthError(401, "bad_token", "the bearer token is not a device credential of this "
                                      "store; ask the store's edge for one "
                                      "('storemesh device issue')")
    if len(text) > config.MAX_TOKEN_LEN or not text.startswith(DEVICE_PREFIX):
        raise bad
    parts = text[len(DEVICE_PREFIX):].split(".")
    if len(parts) != 2:
        raise bad
    try:
        body, sig = _b64d(parts[0]), _b64d(parts[1])
        cred = _decode_device(body)
    except (ValueError, orjson.JSONDecodeError):
        raise bad from None
    if cred.store_id != store_id or not verify_signature(store_public_key, sig,
                                                         DEVICE_DOMAIN + body):
        raise bad
    return cred


# --- PIN verifiers ---------------------------------------------------------------------


def make_pin_verifier(pin: str, *, n: int = config.PIN_SCRYPT_N) -> str:
    """``scrypt$n$r$p$salt$hash`` of ``pin`` with a fresh 16-byte salt."""
    if not isinstance(pin, str) or not 4 <= len(pin) <= 64:
        raise ValueError("a PIN has 4 to 64 characters (6 or more digits recommended)")
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(pin.encode(), salt=salt, n=n, r=8, p=1, dklen=32,
                            maxmem=64 * 1024 * 1024)
    return f"scrypt${n}$8$1${salt.hex()}${digest.hex()}"


_VERIFIER: Final = re.compile(r"scrypt\$(\d{1,7})\$(\d{1,2})\$(\d)\$([0-9a-f]{32})\$([0-9a-f]{64})")


def _check_verifier(v: object) -> str:
    if not isinstance(v, str) or not (m := _VERIFIER.fullmatch(v)):
        raise ValueError("bad PIN verifier")
    n, r, p = int(m[1]), int(m[2]), int(m[3])
    if n < 1024 or n & (n - 1) or n > 1 << 20 or not 1 <= r <= 16 or not 1 <= p <= 4:
        raise ValueError("PIN verifier cost out of bounds")
    return v


def pin_matches(verifier: str, pin: str) -> bool:
    """Does ``pin`` match ``verifier`` (CPU-heavy: run it off the event loop)."""
    m = _VERIFIER.fullmatch(verifier)
    if m is None or not isinstance(pin, str) or len(pin) > 64:
        return False
    digest = hashlib.scrypt(pin.encode(), salt=bytes.fromhex(m[4]), n=int(m[1]),
                            r=int(m[2]), p=int(m[3]), dklen=32, maxmem=64 * 1024 * 1024)
    return hmac.compare_digest(digest, bytes.fromhex(m[5]))


# --- the roster ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StaffEntry:
    staff_id: str
    name: str
    role: str
    disabled: bool
    pin: str  # the verifier

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.staff_id, "name": self.name, "role": self.role,
                "disabled": self.disabled, "pin": self.pin}


@dataclass(frozen=True, slots=True)
class Roster:
    """The store key's list of staff as of ``version``, valid until ``not_after``."""

    store_id: str
    version: int
    not_after: int
    staff: dict[str, StaffEntry]
    signature: bytes

    def body(self) -> dict[str, Any]:
        return {"store_id": self.store_id, "version": self.version,
                "not_after": self.not_after,
                "staff": [self.staff[k].to_dict() for k in sorted(self.staff)]}

    def body_bytes(self) -> bytes:
        return _body_bytes(ROSTER_DOMAIN, self.body())

    def to_dict(self) -> dict[str, Any]:
        return {**self.body(), "signature": self.signature.hex()}

    @classmethod
    def from_dict(cls, d: object) -> Roster:
        """Shape only (``ValueError`` otherwise); ``verify`` checks the signature."""
        if not isinstance(d, dict) or set(d) != {"store_id", "version", "not_after",
                                                  "staff", "signature"}:
            raise ValueError("a roster has store_id, version, not_after, staff, signature")
        staff = d["staff"]
        if not isinstance(staff, list) or len(staff) > config.MAX_STAFF:
            raise ValueError(f"a roster lists at most {config.MAX_STAFF} staff")
        entries: dict[str, StaffEntry] = {}
        for s in staff:
            if not isinstance(s, dict) or set(s) != {"id", "name", "role", "disabled", "pin"}:
                raise ValueError("a staff entry has id, name, role, disabled, pin")
            if (s["role"] not in STAFF_ROLES or not isinstance(s["disabled"], bool)
                    or not isinstance(s["name"], str) or len(s["name"]) > 64):
                raise ValueError("bad staff entry")
            e = StaffEntry(check_id(s["id"], "staff id"), s["name"], s["role"],
                           s["disabled"], _check_verifier(s["pin"]))
            entries[e.staff_id] = e
        for k in ("version", "not_after"):
            if type(d[k]) is not int or not 0 <= d[k] <= _MAX_INT:
                raise ValueError(f"roster {k} must be an integer")
        sig = d["signature"]
        if not isinstance(sig, str) or len(sig) != 128:
            raise ValueError("roster signature must be 128 hex chars")
        if not isinstance(d["store_id"], str):
            raise ValueError("roster store_id must be a string")
        return cls(d["store_id"], d["version"], d["not_after"], entries, bytes.fromhex(sig))

    def verify(self, store_public_key: bytes) -> bool:
        return verify_signature(store_public_key, self.signature, self.body_bytes())


def issue_roster(store_key: NodeKey, *, store_id: str, version: int, not_after: int,
                 staff: dict[str, StaffEntry]) -> Roster:
    if len(staff) > config.MAX_STAFF:
        raise ValueError(f"a roster lists at most {config.MAX_STAFF} staff")
    unsigned = Roster(store_id, version, not_after, dict(staff), b"")
    return replace(unsigned, signature=store_key.sign(unsigned.body_bytes()))


# --- PIN throttling (NIST 800-63B 5.2.2) -----------------------------------------------


@dataclass(slots=True)
class _Failures:
    count: int
    next_ok_ms: int
    verifier: str  # a new PIN (new verifier) starts over


def pin_limit(nodes: int) -> int:
    """Wrong PINs a node allows before lockout in a store of ``nodes`` nodes that check
    PINs: the store-wide bound shared out (``config.PIN_STORE_MAX_FAILURES``), at most
    ``PIN_MAX_FAILURES``, at least ``PIN_FREE_FAILURES``."""
    share = config.PIN_STORE_MAX_FAILURES // max(1, nodes)
    return max(config.PIN_FREE_FAILURES, min(config.PIN_MAX_FAILURES, share))


class PinGuard:
    """Consecutive wrong secrets (PINs; HQ passwords in ``mesh.cloud.hq``) per account on this
    node: free for the first ``PIN_FREE_FAILURES``, then a doubling delay, locked after
    ``max_failures`` (``PIN_MAX_FAILURES``, or the node's share of the store-wide bound:
    ``pin_limit``) until a supervisor unlocks it here or the account gets a new secret (a
    new verifier starts over)."""

    def __init__(self, what: str = "staff") -> None:
        self._failures: dict[str, _Failures] = {}
        self.what = what
        self.max_failures = config.PIN_MAX_FAILURES

    def check(self, entry: StaffEntry, now_ms: int) -> None:
        """Raise if a PIN attempt for ``entry`` is not allowed now."""
        self.check_key(entry.staff_id, entry.pin, now_ms, "pin")

    def check_key(self, key: str, verifier: str, now_ms: int, field: str) -> None:
        f = self._failures.get(key)
        if f is None or f.verifier != verifier:
            return
        if f.count >= self.max_failures:
            raise AuthError(403, "locked_out", f"{self.what} {key!r} is locked out after "
                            f"{f.count} wrong attempts: "
                            + ("a supervisor unlocks it (POST /v1/staff/<id>/unlock) or sets "
                               "a new PIN" if self.what == "staff" else "set a new password"),
                            field)
        if now_ms < f.next_ok_ms:
            wait = -(-(f.next_ok_ms - now_ms) // 1000)
            raise AuthError(429, f"{field}_throttled", f"too many wrong attempts for "
                            f"{self.what} {key!r}: try again in {wait} s", field, wait)

    def failed(self, entry: StaffEntry, now_ms: int) -> int:
        """Count a wrong PIN; returns the consecutive failures so far."""
        return self.failed_key(entry.staff_id, entry.pin, now_ms)

    def failed_key(self, key: str, verifier: str, now_ms: int) -> int:
        f = self._failures.get(key)
        if f is None or f.verifier != verifier:
            f = self._failures[key] = _Failures(0, 0, verifier)
        f.count += 1
        extra = f.count - config.PIN_FREE_FAILURES
        if extra > 0:
            f.next_ok_ms = now_ms + min(config.PIN_DELAY_MS << min(extra - 1, 30),
                                        config.PIN_DELAY_MAX_MS)
        return f.count

    def succeeded(self, key: str) -> None:
        self._failures.pop(key, None)

    def unlock(self, key: str) -> None:
        self._failures.pop(key, None)

    def forget_except(self, keys: set[str] | frozenset[str] | Any) -> None:
        """Keep the table to the accounts that exist (invariant 4)."""
        for k in [k for k in self._failures if k not in keys]:
            del self._failures[k]

    def failures(self, key: str) -> int:
        f = self._failures.get(key)
        return 0 if f is None else f.count


# --- staff sessions --------------------------------------------------------------------


class SessionKeys:
    """Issues and checks staff sessions of one node (key in memory only: a restart logs
    everyone out, and a session is worthless at any other node)."""

    def __init__(self, node_id: str) -> None:
        self.node_id = node_id
        self._key = secrets.token_bytes(32)

    def _mac(self, body: bytes) -> bytes:
        return hmac.new(self._key, b"storemesh/session/v1\n" + body, hashlib.sha256).digest()

    def issue(self, device_id: str, staff_id: str, now_ms: int) -> tuple[str, int]:
        exp = now_ms + config.STAFF_SESSION_MS
        body = orjson.dumps([self.node_id, device_id, staff_id, exp])
        return f"{SESSION_PREFIX}{_b64e(body)}.{_b64e(self._mac(body))}", exp

    def check(self, text: str, device_id: str, now_ms: int) -> str:
        """The staff id of session ``text`` opened by ``device_id``, or raise."""
        bad = AuthError(401, "bad_session", "the staff session is not valid here: log in "
                        "again (POST /v1/session)", "X-Staff-Session")
        if len(text) > config.MAX_TOKEN_LEN or not text.startswith(SESSION_PREFIX):
            raise bad
        parts = text[len(SESSION_PREFIX):].split(".")
        if len(parts) != 2:
            raise bad
        try:
            body, mac = _b64d(parts[0]), _b64d(parts[1])
        except ValueError:
            raise bad from None
        if not hmac.compare_digest(mac, self._mac(body)):
            raise bad
        node, dev, staff, exp = orjson.loads(body)
        if node != self.node_id or dev != device_id:
            raise bad
        if now_ms > exp:
            raise AuthError(401, "session_expired", "the staff session expired: log in "
                            "again (POST /v1/session)", "X-Staff-Session")
        return str(staff)


# --- refusals per source ---------------------------------------------------------------


class SourceThrottle:
    """A token bucket of refusals per source address (invariant 4): a source refused more
    than ``AUTH_BURST`` times in a burst is answered 429 at once until it calms down."""

    def __init__(self) -> None:
        self._buckets: OrderedDict[str, tuple[float, int]] = OrderedDict()

    def _level(self, source: str, now_ms: int) -> float:
        held = self._buckets.get(source)
        if held is None:
            return float(config.AUTH_BURST)
        tokens, at = held
        return min(float(config.AUTH_BURST),
                   tokens + (now_ms - at) * config.AUTH_REFILL_PER_S / 1000)

    def blocked(self, source: str, now_ms: int) -> bool:
        return source in self._buckets and self._level(source, now_ms) < 1

    def refused(self, source: str, now_ms: int) -> None:
        level = self._level(source, now_ms) - 1
        self._buckets[source] = (max(level, 0.0), now_ms)
        self._buckets.move_to_end(source)
        while len(self._buckets) > config.AUTH_SOURCES_MAX:
            self._buckets.popitem(last=False)

    def __len__(self) -> int:
        return len(self._buckets)

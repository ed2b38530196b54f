"""The edge's ``auth.json``: API devices issued and the staff roster.

Only a data directory holding the store key (the edge made by ``storemesh store init``)
can change these. The CLI (``storemesh device ...``, ``storemesh staff ...``) writes the
file; the running edge picks it up within ``AUTH_RELOAD_S`` (``mesh.http.api``) and sync
carries the signed roster and revocation list to every node.

Layout of ``DIR/auth.json``::

    {"devices": {id: DeviceCredential.to_dict() + {"revoked": bool}},
     "roster": Roster.to_dict() | null, "roster_validity_ms": int}

Invariants:
 1. The file is replaced atomically (``datadir.write_atomic``), under ``auth.lock``
    (flock), so two CLI commands never lose each other's change.
 2. Versions only move forward: a new roster takes the highest version this directory
    knows (``auth.json`` or ``node.json``) plus one (revocation lists: ``mesh.store.revoke``).
 3. A device's credential text is printed once at issue and never stored.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson

from mesh import config
from mesh.core.auth import (
    Roster,
    StaffEntry,
    check_id,
    issue_device,
    issue_roster,
    make_pin_verifier,
    revoked_name,
)
from mesh.core.identity import NodeKey, RevocationList
from mesh.errors import CommandError
from mesh.store.datadir import NodeIdentity, load_identity, write_atomic

__all__ = ["AUTH_FILE", "add_staff", "issue_device_credential", "list_devices", "list_staff",
           "load_auth", "refresh_roster", "revoke_device", "update_staff"]

AUTH_FILE = "auth.json"
_LOCK = "auth.lock"


def _empty() -> dict[str, Any]:
    return {"devices": {}, "roster": None}


def load_auth(data_dir: Path) -> dict[str, Any]:
    """``auth.json`` as a dict (empty if there is none)."""
    try:
        raw = (Path(data_dir) / AUTH_FILE).read_bytes()
    except FileNotFoundError:
        return _empty()
    doc = orjson.loads(raw)
    if not isinstance(doc, dict):
        raise ValueError(f"{data_dir}/{AUTH_FILE} is not a JSON object")
    return {**_empty(), **doc}


@contextlib.contextmanager
def _edit(data_dir: Path) -> Iterator[tuple[NodeIdentity, NodeKey, dict[str, Any]]]:
    data_dir = Path(data_dir)
    ident = load_identity(data_dir)
    key = ident.store_key
    if key is None or key.public_key != ident.trust.store_public_key:
        raise CommandError(f"{data_dir} holds no store key of store {ident.store_id!r}: run "
                           "this on the edge made by 'storemesh store init'", "data_dir")
    fd = os.open(data_dir / _LOCK, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        doc = load_auth(data_dir)
        yield ident, key, doc
        write_atomic(data_dir / AUTH_FILE, orjson.dumps(doc, option=orjson.OPT_INDENT_2))
    finally:
        os.close(fd)


def issue_device_credential(data_dir: Path, *, device_id: str, role: str, now_ms: int,
                            ttl_ms: int, commands: frozenset[str] | None = None,
                            nodes: frozenset[str] | None = None,
                            channel: str | None = None) -> str:
    """Issue a device credential; returns its text (shown once, never stored)."""
    try:
        check_id(device_id, "device id")
    except ValueError as exc:
        raise CommandError(str(exc), "device_id") from None
    with _edit(data_dir) as (ident, key, doc):
        held = doc["devices"].get(device_id)
        if held is not None and held.get("revoked"):
            raise CommandError(f"device {device_id!r} was revoked: revocation is for good, "
                               "issue a credential under a new device id", "device_id")
        try:
            cred, text = issue_device(key, store_id=ident.store_id, device_id=device_id,
                                      role=role, now_ms=now_ms, ttl_ms=ttl_ms,
                                      commands=commands, nodes=nodes, channel=channel)
        except ValueError as exc:
            raise CommandError(str(exc)) from None
        doc["devices"][device_id] = {**cred.to_dict(), "revoked": False}
    return text


def list_devices(data_dir: Path) -> list[dict[str, Any]]:
    return [{"device_id": k, **v} for k, v in sorted(load_auth(data_dir)["devices"].items())]


def revoke_device(data_dir: Path, device_id: str, *, now_ms: int,
                  reason: str = "revoked by the store owner") -> tuple[RevocationList, bool]:
    """Revoke a device everywhere: the store's next revocation list names
    ``device:<id>`` (``mesh.store.revoke.add_revocation``: the same list and version sequence
    as revoked nodes). Returns the list and whether it is new."""
    from mesh.store.revoke import add_revocation

    with _edit(data_dir) as (ident, _key, doc):
        if device_id not in doc["devices"]:
            raise CommandError(f"no device {device_id!r} was issued here; see "
                               "'storemesh device list'", "device_id")
        crl, new = add_revocation(ident, revoked_name(device_id), reason=reason,
                                  now_ms=now_ms)
        doc["devices"][device_id]["revoked"] = True
        return crl, new


def _roster_of(ident: NodeIdentity, doc: dict[str, Any]) -> Roster | None:
    mine = None if doc["roster"] is None else Roster.from_dict(doc["roster"])
    held = ident.trust.roster
    if held is not None and (mine is None or held.version > mine.version):
        return held
    return mine


def _sign_roster(ident: NodeIdentity, key: NodeKey, doc: dict[str, Any],
                 staff: dict[str, StaffEntry], now_ms: int, validity_ms: int | None) -> Roster:
    current = _roster_of(ident, doc)
    validity = validity_ms or doc.get("roster_validity_ms") or config.ROSTER_VALIDITY_MS
    doc["roster_validity_ms"] = validity
    roster = issue_roster(key, store_id=ident.store_id,
                          version=(-1 if current is None else current.version) + 1,
                          not_after=now_ms + validity, staff=staff)
    doc["roster"] = roster.to_dict()
    return roster


def add_staff(data_dir: Path, *, staff_id: str, name: str, role: str, pin: str, now_ms: int,
              validity_ms: int | None = None, pin_cost: int = config.PIN_SCRYPT_N) -> Roster:
    try:
        check_id(staff_id, "staff id")
        verifier = make_pin_verifier(pin, n=pin_cost)
    except ValueError as exc:
        raise CommandError(str(exc)) from None
    if len(name) > 64:
        raise CommandError("a display name has at most 64 characters", "name")
    with _edit(data_dir) as (ident, key, doc):
        current = _roster_of(ident, doc)
        staff = {} if current is None else dict(current.staff)
        if staff_id in staff:
            raise CommandError(f"staff {staff_id!r} is on the roster already", "staff_id")
        staff[staff_id] = StaffEntry(staff_id, name, _role(role), False, verifier)
        return _sign_roster(ident, key, doc, staff, now_ms, validity_ms)


def _role(role: str) -> str:
    from mesh.core.auth import STAFF_ROLES

    if role not in STAFF_ROLES:
        raise CommandError(f"role must be one of {sorted(STAFF_ROLES)}", "role")
    return role


def update_staff(data_dir: Path, staff_id: str, *, now_ms: int, role: str | None = None,
                 disabled: bool | None = None, pin: str | None = None) -> Roster:
    """Change one staff entry (role, disabled, PIN) and sign the next roster version."""
    with _edit(data_dir) as (ident, key, doc):
        current = _roster_of(ident, doc)
        if current is None or staff_id not in current.staff:
            raise CommandError(f"no staff {staff_id!r} on the roster; see 'storemesh staff "
                               "list'", "staff_id")
        e = current.staff[staff_id]
        staff = dict(current.staff)
        staff[staff_id] = StaffEntry(
            staff_id, e.name, e.role if role is None else _role(role),
            e.disabled if disabled is None else disabled,
            e.pin if pin is None else make_pin_verifier(pin))
        return _sign_roster(ident, key, doc, staff, now_ms, None)


def list_staff(data_dir: Path) -> tuple[Roster | None, list[StaffEntry]]:
    ident = load_identity(data_dir)
    roster = _roster_of(ident, load_auth(data_dir))
    return roster, ([] if roster is None else [roster.staff[k] for k in sorted(roster.staff)])


def refresh_roster(data_dir: Path, now_ms: int) -> Roster | None:
    """Re-sign the roster if half its validity has passed (the edge does this while it
    runs, so tills that hear from it keep a valid roster). None if nothing was due."""
    with _edit(data_dir) as (ident, key, doc):
        current = _roster_of(ident, doc)
        if current is None:
            return None
        validity = doc.get("roster_validity_ms") or config.ROSTER_VALIDITY_MS
        if current.not_after - now_ms > validity // 2:
            return None
        return _sign_roster(ident, key, doc, dict(current.staff), now_ms, None)

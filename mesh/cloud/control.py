"""The cloud's control plane: which stores it serves, their trust material, HQ's accounts
and sessions — behind one small port with a file and a PostgreSQL implementation.

The embedded cloud (``storemesh cloud run --data ROOT``) keeps it in files on ROOT
(``FileControl``): one directory per store holding that store's cloud node (key,
certificate, trust store, TLS files), ``hq_users.json`` and ``hq_sessions.sqlite``.
A cloud on PostgreSQL (``--database``) keeps the same things in tables
(``mesh.cloud.pgcontrol.PgControl``), so gateways share no directory: each copies a
store's files into a private working directory when it wins the store's lease and
writes the ones the node changes (trust store, renewed TLS certificate) back.
Both pass one contract suite (``tests/contract/test_contract_control.py``).

What is *not* here: price books, catalog and online reservations are CRDT state in the
stores' signed ledgers (``mesh.store.pgstore`` on PostgreSQL), not control files.

Invariants:
 1. A store's control files are exactly ``STORE_FILES`` (name -> file mode); a store is
    registered once, with all of them, or not at all.
 2. ``edit_users`` is atomic and serialised: concurrent editors (two CLI commands, or a
    CLI and a cloud) never lose each other's change, and a failed edit changes nothing.
    ``users_stamp`` changes with every edit, so a running cloud re-reads on change only.
 3. Sessions are stored by the SHA-256 of their token only, bounded by
    ``HQ_SESSIONS_MAX`` (oldest evicted), shared by every cloud process on the same
    control plane.
 4. Every call is short and blocking: callers on the event loop run it in a thread.
    A backend that is away raises ``OSError`` (``ControlUnavailable``), as a file would.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Protocol

__all__ = ["CHANGING_FILES", "STORE_FILES", "ControlPlane", "ControlUnavailable",
           "FileControl", "HqSession", "Sessions", "private_dir",
           "read_store_files", "write_store_files"]

#: A store's cloud node, as files (``mesh.store.datadir``, ``mesh.net.tls``) and modes.
STORE_FILES: Final[Mapping[str, int]] = {
    "node.json": 0o600, "node.key": 0o600,
    "tls-ca.pem": 0o644, "tls-node.pem": 0o644, "tls-node.key": 0o600,
}
#: The files a running node rewrites (trust store saves, TLS renewal): written back.
CHANGING_FILES: Final = ("node.json", "tls-node.pem")


class ControlUnavailable(OSError):
    """The control plane's backend cannot be reached now (retry later)."""


@dataclass(slots=True)
class HqSession:
    """One HQ login (``mesh.cloud.hq`` invariant 2)."""

    user: str
    role: str
    csrf: str
    verifier: str  # a digest of the password's verifier it was opened with (a new one ends it)
    created: float  # wall-clock seconds
    seen: float  # wall-clock seconds of the last request (stored: within TOUCH_S)
    stored_seen: float = 0.0  # what the store holds
    checked: float = 0.0  # monotonic seconds when this process last read it from the store


class Sessions(Protocol):
    """HQ sessions by token digest (invariant 3)."""

    def get(self, key: bytes) -> HqSession | None: ...
    def put(self, key: bytes, s: HqSession) -> None: ...
    def touch(self, key: bytes, seen: float) -> None: ...
    def delete(self, key: bytes) -> None: ...
    def end_unless(self, allowed: dict[str, str]) -> int: ...
    def count(self) -> int: ...
    def close(self) -> None: ...


class ControlPlane(Protocol):
    """Store registry, per-store trust material, HQ accounts and sessions."""

    def stores(self) -> list[str]:
        """The stores registered, sorted."""
        ...

    def register_store(self, store_id: str, files: Mapping[str, bytes]) -> bool:
        """Register ``store_id`` with its control files (invariant 1); ``False`` if it is
        registered already (nothing changed)."""
        ...

    def store_files(self, store_id: str) -> dict[str, bytes]:
        """A registered store's files (``KeyError`` if it is not registered)."""
        ...

    def save_store_files(self, store_id: str, files: Mapping[str, bytes]) -> None:
        """Replace some of a registered store's files (``KeyError`` if not registered)."""
        ...

    def users(self) -> dict[str, dict[str, Any]]:
        """HQ accounts: name -> {role, verifier, disabled, changed_ms}."""
        ...

    def users_stamp(self) -> object:
        """Changes whenever the accounts change (``None``: there never were any)."""
        ...

    def edit_users(self) -> AbstractContextManager[dict[str, dict[str, Any]]]:
        """The accounts to change in place, saved when the block ends (invariant 2)."""
        ...

    def sessions(self) -> Sessions:
        """A handle on the sessions (the caller closes it)."""
        ...

    def close(self) -> None: ...


def _check_files(files: Mapping[str, bytes]) -> None:
    unknown = set(files) - set(STORE_FILES)
    if unknown:
        raise ValueError(f"not a store control file: {sorted(unknown)}")


def read_store_files(data_dir: Path) -> dict[str, bytes]:
    """The control files of the cloud node in ``data_dir`` (all of them, invariant 1)."""
    files = {}
    for name in STORE_FILES:
        path = Path(data_dir) / name
        if not path.exists():
            raise FileNotFoundError(f"{path} is missing: {data_dir} holds no complete cloud "
                                    "node (enrol with 'storemesh cloud join')")
        files[name] = path.read_bytes()
    return files


def write_store_files(data_dir: Path, files: Mapping[str, bytes]) -> None:
    """Write ``files`` into ``data_dir`` atomically, each with its mode."""
    from mesh.net.tls import write_file

    _check_files(files)
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    for name, data in files.items():
        write_file(data_dir / name, data, STORE_FILES[name])


class FileControl:
    """The control plane in files on the cloud's ROOT (the embedded default)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def stores(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if (p / "node.json").exists())

    def register_store(self, store_id: str, files: Mapping[str, bytes]) -> bool:
        from mesh.store.datadir import check_id

        check_id(store_id, "store id")
        _check_files(files)
        if set(files) != set(STORE_FILES):
            raise ValueError(f"a store is registered with all of {sorted(STORE_FILES)}")
        data_dir = self.root / store_id
        if (data_dir / "node.json").exists():
            return False
        # node.json last: a store directory counts once it is there (``stores``)
        write_store_files(data_dir, {k: v for k, v in files.items() if k != "node.json"})
        write_store_files(data_dir, {"node.json": files["node.json"]})
        return True

    def store_files(self, store_id: str) -> dict[str, bytes]:
        if store_id not in self.stores():
            raise KeyError(store_id)
        return read_store_files(self.root / store_id)

    def save_store_files(self, store_id: str, files: Mapping[str, bytes]) -> None:
        if not (self.root / store_id / "node.json").exists():
            raise KeyError(store_id)
        write_store_files(self.root / store_id, files)

    def users(self) -> dict[str, dict[str, Any]]:
        from mesh.cloud.hq import load_users

        return load_users(self.root)

    def users_stamp(self) -> object:
        from mesh.cloud.hq import HQ_FILE

        try:
            return (self.root / HQ_FILE).stat().st_mtime_ns
        except FileNotFoundError:
            return None

    @contextlib.contextmanager
    def edit_users(self) -> Iterator[dict[str, dict[str, Any]]]:
        from mesh.cloud.hq import edit_users_file

        with edit_users_file(self.root) as users:
            yield users

    def sessions(self) -> Sessions:
        from mesh.cloud.hq import SESSIONS_FILE, SessionStore

        self.root.mkdir(parents=True, exist_ok=True)
        return SessionStore(self.root / SESSIONS_FILE)

    def close(self) -> None:
        pass


def private_dir(path: Path) -> None:
    """``path`` as an empty directory only this user can enter (keys go in it)."""
    import shutil

    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True, mode=0o700)
    os.chmod(path, 0o700)

"""The cloud's control plane contract (``mesh.cloud.control``): one suite, run against
the files on a cloud root (``FileControl``) and PostgreSQL (``PgControl``, on the
throw-away cluster of ``tests.pgkit``): the store registry and its trust material, HQ
accounts and HQ sessions, each as seen by a second handle (another process)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from mesh import config
from mesh.cloud import hq
from mesh.cloud.control import STORE_FILES, ControlPlane, FileControl, HqSession
from mesh.errors import CommandError
from mesh.store.datadir import enrol_node, init_store
from mesh.testing.fleet import provision
from tests.meshkit import PIN_COST, now_ms

Opener = Callable[[], ControlPlane]


@pytest.fixture(params=["files", "postgresql"])
def opener(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Opener]:
    """A way to open (another handle on) one control plane."""
    opened: list[ControlPlane] = []
    if request.param == "files":
        def make() -> ControlPlane:
            opened.append(FileControl(tmp_path / "cloud"))
            return opened[-1]
    else:
        dsn = request.getfixturevalue("pg_dsn")
        from mesh.cloud.pgcontrol import PgControl

        def make() -> ControlPlane:
            opened.append(PgControl(dsn))
            return opened[-1]
    yield make
    for c in opened:
        c.close()


def _store_files(tmp_path: Path, store_id: str) -> dict[str, bytes]:
    edge = init_store(tmp_path / "edges" / store_id, store_id, now_ms=now_ms())
    assert edge.store_key is not None
    d = tmp_path / "staging" / store_id
    enrol_node(d, edge.store_key, store_id, "cloud", now_ms=now_ms(),
               node_id=f"cloud-{store_id}")
    return {name: (d / name).read_bytes() for name in STORE_FILES}


def test_the_registry_holds_each_store_once_with_all_its_files(opener: Opener,
                                                               tmp_path: Path) -> None:
    c, other = opener(), opener()
    assert c.stores() == []
    files = _store_files(tmp_path, "s2")
    assert c.register_store("s2", files) is True
    assert c.register_store("s1", _store_files(tmp_path, "s1")) is True
    assert other.stores() == ["s1", "s2"]  # seen by every process on it
    assert other.store_files("s2") == files
    # once: a second registration (another gateway importing the same ROOT) changes nothing
    assert other.register_store("s2", _store_files(tmp_path / "x", "s2")) is False
    assert c.store_files("s2") == files
    with pytest.raises(KeyError):
        c.store_files("nope")
    with pytest.raises(ValueError, match="all of"):
        c.register_store("s3", {"node.json": b"{}"})
    with pytest.raises(ValueError, match="not valid"):
        c.register_store("../s3", files)
    assert c.stores() == ["s1", "s2"]


def test_a_stores_changed_files_are_saved(opener: Opener, tmp_path: Path) -> None:
    c, other = opener(), opener()
    files = _store_files(tmp_path, "s1")
    c.register_store("s1", files)
    c.save_store_files("s1", {"node.json": b'{"renewed": true}'})
    got = other.store_files("s1")
    assert got["node.json"] == b'{"renewed": true}'
    assert {k: v for k, v in got.items() if k != "node.json"} == \
        {k: v for k, v in files.items() if k != "node.json"}
    with pytest.raises(KeyError):
        c.save_store_files("s9", {"node.json": b"{}"})
    with pytest.raises(ValueError, match="not a store control file"):
        c.save_store_files("s1", {"ledger.sqlite": b""})


def test_hq_accounts_edit_atomically_and_stamp_changes(opener: Opener) -> None:
    c, other = opener(), opener()
    assert c.users() == {} and c.users_stamp() is None
    hq.add_user(c, "ann@hq", "correct horse battery", role="admin", cost=PIN_COST)
    stamp = other.users_stamp()
    assert stamp is not None
    (ann,) = hq.list_users(other)
    assert ann == {"name": "ann@hq", "role": "admin", "disabled": False}
    assert other.users()["ann@hq"]["verifier"].startswith("scrypt$")
    with pytest.raises(CommandError, match="exists already"):  # a failed edit: no change
        hq.add_user(other, "ann@hq", "another long password", cost=PIN_COST)
    hq.update_user(other, "ann@hq", disabled=True)
    assert c.users_stamp() != stamp
    assert c.users()["ann@hq"]["disabled"] is True
    with c.edit_users() as users:
        del users["ann@hq"]
    assert other.users() == {}


def test_concurrent_hq_edits_lose_nothing(opener: Opener) -> None:
    handles = [opener() for _ in range(4)]
    errors: list[BaseException] = []

    def add(c: ControlPlane, i: int) -> None:
        try:
            for j in range(3):
                hq.add_user(c, f"u{i}-{j}", "correct horse battery", cost=PIN_COST)
        except BaseException as exc:  # reported below
            errors.append(exc)
    threads = [threading.Thread(target=add, args=(c, i)) for i, c in enumerate(handles)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    assert sorted(handles[0].users()) == sorted(f"u{i}-{j}" for i in range(4)
                                                for j in range(3))


def test_sessions_are_shared_bounded_and_ended(opener: Opener,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(config, "HQ_SESSIONS_MAX", 5)
    c = opener()
    a, b = c.sessions(), opener().sessions()
    try:
        import time

        now = time.time()
        s = HqSession("ann@hq", "viewer", "csrf", "tag", now, now)
        a.put(b"k" * 32, s)
        got = b.get(b"k" * 32)
        assert got is not None and (got.user, got.role, got.csrf, got.verifier) == \
            ("ann@hq", "viewer", "csrf", "tag")
        b.touch(b"k" * 32, now + 5)
        b.touch(b"k" * 32, now + 1)  # never backwards
        got = a.get(b"k" * 32)
        assert got is not None and got.seen == pytest.approx(now + 5)
        a.delete(b"k" * 32)
        assert b.get(b"k" * 32) is None
        for i in range(8):  # bounded: the oldest go
            a.put(bytes([i]) * 32, HqSession("ann@hq", "viewer", "c", "v", now + i, now + i))
        assert b.count() == 5
        assert b.get(bytes([7]) * 32) is not None and b.get(bytes([0]) * 32) is None
        a.put(b"z" * 32, HqSession("bob@hq", "viewer", "c", "w", now + 10,  # idle too long
                                   now - config.HQ_IDLE_S - 1))
        assert a.count() == 5
        assert a.end_unless({"ann@hq": "v", "bob@hq": "w"}) == 1  # the idle one
        assert b.end_unless({"ann@hq": "v"}) == 0
        assert b.end_unless({"ann@hq": "new-password"}) == 4 and a.count() == 0
    finally:
        a.close()
        b.close()


def test_file_control_is_the_cloud_root_layout(tmp_path: Path) -> None:
    """The file implementation reads what ``storemesh cloud join`` and ``provision`` make."""
    root = tmp_path / "cloud"
    stores = provision(tmp_path / "edges", root, 2)
    c = FileControl(root)
    assert c.stores() == stores
    assert c.store_files(stores[0])["node.key"] == (root / stores[0] / "node.key").read_bytes()
    (root / "not-a-store").mkdir()
    assert c.stores() == stores

"""Node keys, certificates, revocation lists and the trust store."""

from __future__ import annotations

import os
import stat
from dataclasses import replace
from pathlib import Path

import orjson
import pytest

from mesh.core.identity import (
    ROLES,
    Certificate,
    NodeKey,
    RevocationList,
    TrustStore,
    issue_certificate,
    issue_revocations,
    verify_signature,
)
from mesh.errors import (
    BadSignature,
    ExpiredCertificate,
    KeyPermissionError,
    Malformed,
    NotEnrolled,
    RevokedCertificate,
    WrongStore,
)

STORE = "store-7"
T0 = 1_700_000_000_000
DAY = 24 * 3600 * 1000


@pytest.fixture(scope="module")
def store_key() -> NodeKey:
    return NodeKey.generate()


def enrol(store_key: NodeKey, node_id: str, role: str = "register", **kw: object) -> Certificate:
    key = NodeKey.generate()
    args: dict[str, object] = {
        "node_id": node_id,
        "store_id": STORE,
        "role": role,
        "public_key": key.public_key,
        "not_after": T0 + DAY,
    }
    args.update(kw)
    return issue_certificate(store_key, **args)  # type: ignore[arg-type]


def trust_of(store_key: NodeKey) -> TrustStore:
    return TrustStore(STORE, store_key.public_key)


# --- keys -------------------------------------------------------------------------


def test_key_file_created_0600_and_reloaded(tmp_path: Path) -> None:
    path = tmp_path / "data" / "keys" / "node.key"
    key = NodeKey.load_or_create(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_bytes() == key.private_bytes()
    assert len(key.public_key) == 32
    again = NodeKey.load_or_create(path)
    assert again.public_key == key.public_key
    assert again.fingerprint == key.fingerprint
    assert [p.name for p in path.parent.iterdir()] == ["node.key"]  # no temp file left


def test_key_file_readable_by_others_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "node.key"
    NodeKey.load_or_create(path)
    os.chmod(path, 0o644)
    with pytest.raises(KeyPermissionError) as info:
        NodeKey.load_or_create(path)
    msg = str(info.value)
    assert str(path) in msg
    assert "0644" in msg
    assert "chmod 600" in msg
    os.chmod(path, 0o600)
    NodeKey.load_or_create(path)


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660, 0o700 | 0o020])
def test_any_group_or_other_bit_is_refused(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "node.key"
    NodeKey.load_or_create(path)
    os.chmod(path, mode)
    with pytest.raises(KeyPermissionError):
        NodeKey.load_or_create(path)


def test_truncated_key_file_is_refused_not_replaced(tmp_path: Path) -> None:
    path = tmp_path / "node.key"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, b"short")
    os.close(fd)
    with pytest.raises(ValueError, match="5 bytes"):
        NodeKey.load_or_create(path)
    assert path.read_bytes() == b"short"


def test_key_roundtrip_sign_and_verify() -> None:
    key = NodeKey.generate()
    same = NodeKey.from_bytes(key.private_bytes())
    assert same.public_key == key.public_key
    sig = key.sign(b"hello")
    assert len(sig) == 64
    assert verify_signature(key.public_key, sig, b"hello")
    assert not verify_signature(key.public_key, sig, b"hellO")
    assert not verify_signature(NodeKey.generate().public_key, sig, b"hello")
    assert not verify_signature(b"\x00" * 31, sig, b"hello")
    assert not verify_signature(key.public_key, sig[:63], b"hello")
    assert len(key.fingerprint) == 16
    assert key.fingerprint in repr(key)
    assert key.private_bytes().hex() not in repr(key)
    with pytest.raises(ValueError):
        NodeKey.from_bytes(b"\x01" * 31)


# --- certificates -------------------------------------------------------------------


def test_certificate_issue_verify_and_roundtrip(store_key: NodeKey) -> None:
    cert = enrol(store_key, "reg-01")
    cert.verify(store_key.public_key)
    wire = orjson.dumps(cert.to_dict())
    back = Certificate.from_dict(orjson.loads(wire))
    assert back == cert
    back.verify(store_key.public_key)
    assert cert.body_bytes().startswith(b"storemesh/cert/v1\n{")
    assert b"signature" not in cert.body_bytes()


def test_certificate_forged_signature(store_key: NodeKey) -> None:
    cert = enrol(store_key, "reg-01")
    impostor = NodeKey.generate()
    forged = replace(cert, signature=impostor.sign(cert.body_bytes()))
    with pytest.raises(BadSignature) as info:
        forged.verify(store_key.public_key)
    assert info.value.reason == "bad_signature"
    promoted = replace(cert, role="cloud")  # same signature, edited body
    with pytest.raises(BadSignature):
        promoted.verify(store_key.public_key)
    trust = trust_of(store_key)
    with pytest.raises(BadSignature):
        trust.add_certificate(forged)
    assert trust.certificate("reg-01") is None


def test_certificate_for_another_store(store_key: NodeKey) -> None:
    other = enrol(store_key, "reg-01", store_id="store-8")
    with pytest.raises(WrongStore) as info:
        trust_of(store_key).add_certificate(other)
    assert info.value.reason == "wrong_store"
    # and one signed by another store's key for our store id
    foreign = enrol(NodeKey.generate(), "reg-01")
    with pytest.raises(BadSignature):
        trust_of(store_key).add_certificate(foreign)


def test_issue_certificate_rejects_bad_arguments(store_key: NodeKey) -> None:
    with pytest.raises(ValueError, match="role"):
        enrol(store_key, "reg-01", role="admin")
    with pytest.raises(ValueError, match="node_id"):
        enrol(store_key, "")
    with pytest.raises(ValueError, match="node_id"):
        enrol(store_key, "x" * 129)
    with pytest.raises(ValueError, match="store_id"):
        enrol(store_key, "reg-01", store_id="")
    with pytest.raises(ValueError, match="public_key"):
        enrol(store_key, "reg-01", public_key=b"\x00" * 16)
    with pytest.raises(ValueError, match="not_after"):
        enrol(store_key, "reg-01", not_after=-1)
    assert set(ROLES) == {"register", "edge", "cloud"}


@pytest.mark.parametrize(
    "mutate",
    [
        lambda d: "not a dict",
        lambda d: {**d, "extra": 1},
        lambda d: {k: v for k, v in d.items() if k != "role"},
        lambda d: {**d, "role": "admin"},
        lambda d: {**d, "node_id": ""},
        lambda d: {**d, "node_id": 7},
        lambda d: {**d, "not_after": "soon"},
        lambda d: {**d, "not_after": True},
        lambda d: {**d, "not_after": -5},
        lambda d: {**d, "public_key": "zz" * 32},
        lambda d: {**d, "public_key": d["public_key"].upper()},
        lambda d: {**d, "public_key": d["public_key"][:-2]},
        lambda d: {**d, "signature": d["signature"][:-2]},
        lambda d: {**d, "signature": None},
    ],
)
def test_certificate_from_dict_malformed(store_key: NodeKey, mutate: object) -> None:
    d = enrol(store_key, "reg-01").to_dict()
    with pytest.raises(Malformed) as info:
        Certificate.from_dict(mutate(d))  # type: ignore[operator]
    assert info.value.reason == "malformed"


# --- trust store --------------------------------------------------------------------


def test_check_enrolled_expired_unknown(store_key: NodeKey) -> None:
    trust = trust_of(store_key)
    cert = enrol(store_key, "reg-01")
    trust.add_certificate(cert)
    assert trust.check("reg-01", T0) == cert
    assert trust.check("reg-01", T0 + DAY) == cert  # not_after is inclusive
    with pytest.raises(ExpiredCertificate) as info:
        trust.check("reg-01", T0 + DAY + 1)
    assert info.value.reason == "expired"
    assert "reg-01" in str(info.value)
    with pytest.raises(NotEnrolled) as info2:
        trust.check("reg-99", T0)
    assert info2.value.reason == "not_enrolled"
    assert "reg-99" in str(info2.value)


def test_newer_certificate_replaces_older_in_any_order(store_key: NodeKey) -> None:
    old = enrol(store_key, "reg-01", not_after=T0 + DAY)
    new = enrol(store_key, "reg-01", not_after=T0 + 30 * DAY)
    for order in ([old, new], [new, old]):
        trust = trust_of(store_key)
        for cert in order:
            trust.add_certificate(cert)
        assert trust.certificate("reg-01") == new
        assert trust.check("reg-01", T0 + 2 * DAY) == new
    # a tie on not_after is broken by the body bytes, so order does not matter either
    a = enrol(store_key, "reg-02")
    b = enrol(store_key, "reg-02")
    t1, t2 = trust_of(store_key), trust_of(store_key)
    t1.add_certificate(a)
    t1.add_certificate(b)
    t2.add_certificate(b)
    t2.add_certificate(a)
    assert t1.certificate("reg-02") == t2.certificate("reg-02")


def test_revocation_list_revokes_and_older_versions_are_ignored(store_key: NodeKey) -> None:
    trust = trust_of(store_key)
    trust.add_certificate(enrol(store_key, "reg-01"))
    trust.add_certificate(enrol(store_key, "reg-02"))
    v2 = issue_revocations(store_key, store_id=STORE, version=2, revoked={"reg-01"})
    trust.apply_revocations(v2)
    with pytest.raises(RevokedCertificate) as info:
        trust.check("reg-01", T0)
    assert info.value.reason == "revoked"
    assert "reg-01" in str(info.value)
    trust.check("reg-02", T0)
    # an older list (that revoked nobody) does not un-revoke reg-01
    v1 = issue_revocations(store_key, store_id=STORE, version=1, revoked=set())
    trust.apply_revocations(v1)
    trust.apply_revocations(v2)  # same version again: ignored
    assert trust.crl == v2
    with pytest.raises(RevokedCertificate):
        trust.check("reg-01", T0)
    # a newer list is cumulative: it replaces the old one
    v3 = issue_revocations(store_key, store_id=STORE, version=3, revoked={"reg-02"})
    trust.apply_revocations(v3)
    trust.check("reg-01", T0)
    with pytest.raises(RevokedCertificate):
        trust.check("reg-02", T0)


def test_revocation_list_forged_or_foreign(store_key: NodeKey) -> None:
    trust = trust_of(store_key)
    trust.add_certificate(enrol(store_key, "reg-01"))
    good = issue_revocations(store_key, store_id=STORE, version=5, revoked={"reg-02"})
    forged = RevocationList(STORE, 6, frozenset(), good.signature)
    with pytest.raises(BadSignature):
        trust.apply_revocations(forged)
    by_stranger = issue_revocations(NodeKey.generate(), store_id=STORE, version=9, revoked=set())
    with pytest.raises(BadSignature):
        trust.apply_revocations(by_stranger)
    foreign = issue_revocations(store_key, store_id="store-8", version=9, revoked={"reg-01"})
    with pytest.raises(WrongStore):
        trust.apply_revocations(foreign)
    trust.check("reg-01", T0)
    assert trust.crl is None


def test_revocation_list_roundtrip_and_malformed(store_key: NodeKey) -> None:
    crl = issue_revocations(store_key, store_id=STORE, version=4, revoked={"b", "a"})
    d = orjson.loads(orjson.dumps(crl.to_dict()))
    assert d["revoked"] == ["a", "b"]
    back = RevocationList.from_dict(d)
    assert back == crl
    back.verify(store_key.public_key)
    for bad in (
        {**d, "revoked": "a"},
        {**d, "revoked": [1]},
        {**d, "version": 1.5},
        {**d, "signature": "00"},
        {k: v for k, v in d.items() if k != "version"},
        [d],
    ):
        with pytest.raises(Malformed):
            RevocationList.from_dict(bad)


def test_local_revoke(store_key: NodeKey) -> None:
    trust = trust_of(store_key)
    trust.add_certificate(enrol(store_key, "reg-01"))
    trust.revoke("reg-01")
    with pytest.raises(RevokedCertificate):
        trust.check("reg-01", T0)
    # a later signed list does not lift a local revocation
    trust.apply_revocations(issue_revocations(store_key, store_id=STORE, version=1, revoked=set()))
    with pytest.raises(RevokedCertificate):
        trust.check("reg-01", T0)


def test_trust_store_persists_and_reverifies(store_key: NodeKey) -> None:
    trust = trust_of(store_key)
    for n in ("reg-02", "reg-01", "edge-1"):
        trust.add_certificate(
            enrol(store_key, n, role="edge" if n.startswith("edge") else "register")
        )
    trust.apply_revocations(
        issue_revocations(store_key, store_id=STORE, version=3, revoked={"reg-02"})
    )
    trust.revoke("edge-1")
    wire = orjson.dumps(trust.to_dict())
    back = TrustStore.from_dict(orjson.loads(wire))
    assert back.to_dict() == trust.to_dict()
    assert [c.node_id for c in back.certificates()] == ["edge-1", "reg-01", "reg-02"]
    back.check("reg-01", T0)
    with pytest.raises(RevokedCertificate):
        back.check("reg-02", T0)
    with pytest.raises(RevokedCertificate):
        back.check("edge-1", T0)
    # a tampered file is refused: role raised from register to cloud without the store key
    d = orjson.loads(wire)
    d["certificates"][1]["role"] = "cloud"
    with pytest.raises(BadSignature):
        TrustStore.from_dict(d)
    with pytest.raises(Malformed):
        TrustStore.from_dict({**orjson.loads(wire), "certificates": "none"})
    with pytest.raises(Malformed):
        TrustStore.from_dict(None)

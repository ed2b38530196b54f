"""Envelopes: wire form, decode, verify and chain verification, with crafted inputs."""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass, field
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mesh import config
from mesh.core.envelope import DOMAIN, Envelope, body_bytes, decode, seal, verify, verify_chain
from mesh.core.identity import NodeKey, TrustStore, issue_certificate, issue_revocations
from mesh.errors import (
    BadSignature,
    BrokenChain,
    EnvelopeError,
    ExpiredCertificate,
    Forbidden,
    Malformed,
    NotEnrolled,
    Oversized,
    RevokedCertificate,
    WrongStore,
)

STORE = "store-7"
T0 = 1_700_000_000_000
DAY = 24 * 3600 * 1000
HLC0 = T0 << 16


@dataclass
class World:
    """A store key, its trust store and a few enrolled nodes."""

    store_key: NodeKey
    trust: TrustStore
    keys: dict[str, NodeKey] = field(default_factory=dict)

    def enrol(self, node_id: str, role: str = "register", not_after: int = T0 + DAY) -> NodeKey:
        key = NodeKey.generate()
        self.keys[node_id] = key
        self.trust.add_certificate(
            issue_certificate(
                self.store_key,
                node_id=node_id,
                store_id=self.trust.store_id,
                role=role,
                public_key=key.public_key,
                not_after=not_after,
            )
        )
        return key


def new_world(store: str = STORE) -> World:
    store_key = NodeKey.generate()
    w = World(store_key, TrustStore(store, store_key.public_key))
    w.enrol("reg-01")
    w.enrol("reg-02")
    w.enrol("edge-1", role="edge")
    return w


@pytest.fixture(scope="module")
def world() -> World:
    return new_world()


def sale_ops(origin: str, p: int = 10, n: int = 3, sku: str = "SKU-1") -> list[dict[str, Any]]:
    return [{"t": "pn", "sku": sku, "r": origin, "p": p, "n": n}]


def sale_meta(txn: str = "t-1") -> dict[str, Any]:
    return {"kind": "sale", "txn": txn, "staff": "s-9"}


def reserve_ops(
    origin: str, rid: str | None = None, dot_owner: str | None = None
) -> list[dict[str, Any]]:
    rid = rid or f"{origin}:t-2"
    owner = dot_owner or origin
    return [
        {
            "t": "rs",
            "e": {rid: [[owner, 1]]},
            "c": [[owner, 1]],
            "rec": {
                rid: {"sku": "SKU-1", "qty": 1, "channel": "web", "order": "o-1", "expires": None}
            },
        }
    ]


def cat_ops() -> list[dict[str, Any]]:
    return [{"t": "cat", "u": base64.b64encode(b"\x01\x02yjs-update").decode()}]


def make(
    w: World,
    origin: str = "reg-01",
    seq: int = 1,
    prev: bytes | None = None,
    *,
    key: NodeKey | None = None,
    store: str | None = None,
    ops: list[dict[str, Any]] | None = None,
    meta: dict[str, Any] | None = None,
    hlc: int | None = None,
) -> Envelope:
    return seal(
        key or w.keys[origin],
        store=store or w.trust.store_id,
        origin=origin,
        seq=seq,
        prev=prev,
        hlc=HLC0 + seq if hlc is None else hlc,
        ops=ops if ops is not None else sale_ops(origin, p=10 + seq),
        meta=meta if meta is not None else sale_meta(f"t-{seq}"),
    )


def chain(w: World, n: int, origin: str = "reg-01") -> list[Envelope]:
    out: list[Envelope] = []
    prev = None
    for seq in range(1, n + 1):
        env = make(w, origin, seq, prev)
        out.append(env)
        prev = env.hash
    return out


def body_of(raw: bytes) -> dict[str, Any]:
    body: dict[str, Any] = orjson.loads(raw)["body"]
    return body


def resign(w: World, body: dict[str, Any], origin: str = "reg-01") -> bytes:
    """Wire bytes for an arbitrary body, correctly signed by ``origin``'s real key."""
    b = orjson.dumps(body, option=orjson.OPT_SORT_KEYS)
    sig = w.keys[origin].sign(DOMAIN + b)
    return b'{"body":' + b + b',"sig":"' + sig.hex().encode() + b'"}'


def raises(exc: type[EnvelopeError], reason: str, fn: Any, *args: Any, **kw: Any) -> EnvelopeError:
    with pytest.raises(exc) as info:
        fn(*args, **kw)
    assert type(info.value) is exc
    assert info.value.reason == reason
    return info.value


# --- wire form ----------------------------------------------------------------------


def test_seal_wire_form_and_verify(world: World) -> None:
    env = make(world)
    raw = env.raw
    assert raw.startswith(b'{"body":{') and raw.endswith(b'"}')
    doc = orjson.loads(raw)
    assert set(doc) == {"body", "sig"}
    assert doc["body"] == {
        "hlc": HLC0 + 1,
        "meta": sale_meta("t-1"),
        "ops": sale_ops("reg-01", p=11),
        "origin": "reg-01",
        "prev": None,
        "seq": 1,
        "store": STORE,
        "v": 1,
    }
    assert body_bytes(raw) == orjson.dumps(doc["body"], option=orjson.OPT_SORT_KEYS)
    assert orjson.dumps(doc, option=orjson.OPT_SORT_KEYS) == raw  # raw is canonical JSON
    assert env.hash == hashlib.sha256(raw).digest()
    assert env.signature == bytes.fromhex(doc["sig"])
    got = verify(raw, world.trust, T0)
    assert got == env and hash(got) == hash(env)
    assert (got.store, got.origin, got.seq, got.prev, got.hlc) == (
        STORE,
        "reg-01",
        1,
        None,
        HLC0 + 1,
    )
    assert got.ops == sale_ops("reg-01", p=11) and got.meta == sale_meta("t-1")
    second = make(world, seq=2, prev=env.hash)
    assert verify(second.raw, world.trust, T0).prev == env.hash
    assert second != env


def test_all_op_kinds_verify_for_the_right_roles(world: World) -> None:
    verify(
        make(world, ops=reserve_ops("reg-01"), meta={"kind": "reserve", "txn": "t-2"}).raw,
        world.trust,
        T0,
    )
    verify(
        make(world, "edge-1", ops=cat_ops(), meta={"kind": "catalog", "txn": "c-1"}).raw,
        world.trust,
        T0,
    )


def test_seal_rejects_caller_mistakes(world: World) -> None:
    key = world.keys["reg-01"]
    good: dict[str, Any] = {
        "store": STORE, "origin": "reg-01", "seq": 1, "prev": None, "hlc": HLC0,
        "ops": sale_ops("reg-01"), "meta": sale_meta(),
    }  # fmt: skip
    seal(key, **good)
    for bad in (
        {"seq": 0},
        {"seq": 2},  # prev missing at seq 2
        {"prev": b"\x00" * 32},  # prev at seq 1
        {"seq": 2, "prev": b"\x00" * 31},
        {"hlc": -1},
        {"ops": []},
        {"ops": [{"t": "zz"}]},
        {"meta": {"kind": "sale"}},
        {"store": ""},
        {"origin": "x" * 200},
        {"meta": {"kind": "sale", "txn": "t", "note": object()}},
        {"ops": [{"t": "cat", "u": "A" * config.MAX_ENVELOPE_BYTES}]},
    ):
        with pytest.raises(ValueError):
            seal(key, **{**good, **bad})


# --- decode: structure --------------------------------------------------------------


def test_flipped_signature_byte(world: World) -> None:
    raw = bytearray(make(world).raw)
    i = len(raw) - 10
    raw[i] = ord("0") if raw[i] != ord("0") else ord("1")
    raises(BadSignature, "bad_signature", verify, bytes(raw), world.trust, T0)


def test_flipped_byte_in_body(world: World) -> None:
    raw = make(world, ops=sale_ops("reg-01", p=17)).raw
    tampered = raw.replace(b'"p":17', b'"p":97')
    assert tampered != raw
    decode(tampered)  # still well-formed...
    raises(BadSignature, "bad_signature", verify, tampered, world.trust, T0)  # ...not signed


def test_uppercase_signature_hex_is_malformed(world: World) -> None:
    raw = make(world).raw
    upper = raw[:-130] + raw[-130:-2].upper() + raw[-2:]
    assert upper != raw
    raises(Malformed, "malformed", decode, upper)


def test_truncated_json(world: World) -> None:
    raw = make(world).raw
    raises(Malformed, "malformed", verify, raw[:-1], world.trust, T0)
    raises(Malformed, "malformed", verify, raw[: len(raw) // 2], world.trust, T0)
    # body truncated while the frame still looks right
    b = body_bytes(raw)
    raises(Malformed, "malformed", decode, b'{"body":' + b[:-1] + raw[-138:])


@pytest.mark.parametrize(
    "garbage",
    [b"", b"\x00\xff" * 300, b"hello world", b"[]", b"null", "é".encode() * 200, b"{" * 1000],
)
def test_non_json_garbage(world: World, garbage: bytes) -> None:
    raises(Malformed, "malformed", verify, garbage, world.trust, T0)


def test_wrong_framing(world: World) -> None:
    env = make(world)
    body = body_bytes(env.raw)
    sighex = env.signature.hex().encode()
    for raw in (
        b'{"sig":"' + sighex + b'","body":' + body + b"}",  # keys swapped
        b'{"body": ' + body + b',"sig":"' + sighex + b'"}',  # whitespace
        b'{"body":' + body + b',"sig":"' + sighex + b'","x":1}',  # extra key
        b'{"body":' + body + b',"sig":"' + sighex[:-2] + b'"}',  # short signature
        b'{"body":' + body + b',"sig":"' + sighex + b'00"}',  # long signature
        b'{"body":' + body + b',"sig":"' + sighex + b'"} ',  # trailing space
        b'{"body":' + body + b',"sig":"' + b"g" * 128 + b'"}',  # not hex
        orjson.dumps(
            {"body": orjson.loads(body), "sig": sighex.decode()}, option=orjson.OPT_INDENT_2
        ),
    ):
        raises(Malformed, "malformed", verify, raw, world.trust, T0)


def test_two_bodies_smuggled_through_the_frame(world: World) -> None:
    """A parser reading the whole raw would see the LAST "body"; we read the signed slice."""
    signed = make(world)
    evil = body_of(make(world, ops=sale_ops("reg-01", p=999)).raw)
    inner = body_bytes(signed.raw)
    raw = (
        b'{"body":' + inner + b',"body":' + orjson.dumps(evil, option=orjson.OPT_SORT_KEYS)
        + signed.raw[-138:]
    )  # fmt: skip
    raises(Malformed, "malformed", verify, raw, world.trust, T0)


def test_non_canonical_body(world: World) -> None:
    env = make(world)
    body = body_of(env.raw)
    for b in (
        orjson.dumps(dict(reversed(body.items()))),  # keys not sorted
        orjson.dumps(body, option=orjson.OPT_SORT_KEYS).replace(
            b'"v":1', b'"v":1,"v":1'
        ),  # dup key
        orjson.dumps(body, option=orjson.OPT_SORT_KEYS).replace(b'"seq":1', b'"seq": 1'),
    ):
        assert b != body_bytes(env.raw)
        raises(Malformed, "malformed", decode, b'{"body":' + b + env.raw[-138:])


@pytest.mark.parametrize(
    "edit",
    [
        lambda b: b.pop("meta"),
        lambda b: b.pop("v"),
        lambda b: b.pop("prev"),
        lambda b: b.update(extra=1),
        lambda b: b.update(sig="00"),
        lambda b: b.update(v=2),
        lambda b: b.update(v=True),
        lambda b: b.update(v=1.0),
        lambda b: b.update(seq=0),
        lambda b: b.update(seq="1"),
        lambda b: b.update(seq=1 << 63),
        lambda b: b.update(hlc=-1),
        lambda b: b.update(hlc=1.5),
        lambda b: b.update(store=""),
        lambda b: b.update(store=None),
        lambda b: b.update(origin="r" * 129),
        lambda b: b.update(ops=[]),
        lambda b: b.update(ops={"t": "pn"}),
        lambda b: b.update(ops=[{"t": "pn", "sku": "SKU-1", "r": "reg-01", "p": -1, "n": 0}]),
        lambda b: b.update(meta={"kind": "theft", "txn": "t-1"}),
        lambda b: b.update(meta={"kind": "sale", "txn": "t-1", "who": "x"}),
    ],
)
def test_missing_extra_or_bad_body_fields(world: World, edit: Any) -> None:
    body = body_of(make(world).raw)
    edit(body)
    raises(Malformed, "malformed", verify, resign(world, body), world.trust, T0)


def test_body_not_an_object(world: World) -> None:
    for body in ([1, 2], "x", 1, None):
        raises(Malformed, "malformed", decode, resign(world, body))  # type: ignore[arg-type]


def test_prev_present_at_seq_1(world: World) -> None:
    body = body_of(make(world).raw)
    body["prev"] = "00" * 32
    raises(Malformed, "malformed", verify, resign(world, body), world.trust, T0)


def test_prev_missing_or_bad_at_seq_2(world: World) -> None:
    first = make(world)
    body = body_of(make(world, seq=2, prev=first.hash).raw)
    for bad in (None, "", "00" * 31, "zz" * 32, first.hash.hex().upper(), 7):
        body["prev"] = bad
        raises(Malformed, "malformed", verify, resign(world, body), world.trust, T0)


def test_ten_megabytes_is_oversized_without_parsing(world: World) -> None:
    # Not JSON at all: if it were parsed first this would be Malformed, not Oversized.
    junk = b"\xff" * (10 * 1024 * 1024)
    raises(Oversized, "oversized", verify, junk, world.trust, T0)
    # Framed like an envelope, with a 10 MB body.
    env = make(world)
    huge = b'{"body":[' + b"1," * (5 * 1024 * 1024) + b"1]" + env.raw[-138:]
    raises(Oversized, "oversized", decode, huge)
    raises(Oversized, "oversized", verify_chain, [env.raw, huge], world.trust, T0, prev=None)
    # the bound is the parameter's
    raises(Oversized, "oversized", decode, env.raw, max_bytes=len(env.raw) - 1)
    assert decode(env.raw, max_bytes=len(env.raw)) == env


# --- verify: who may write what -----------------------------------------------------


def test_foreign_store(world: World) -> None:
    other = new_world("store-8")
    foreign = make(other)  # correctly signed by reg-01 of store-8, for store-8
    verify(foreign.raw, other.trust, T0)
    raises(WrongStore, "wrong_store", verify, foreign.raw, world.trust, T0)
    raises(WrongStore, "wrong_store", verify_chain, [foreign.raw], world.trust, T0, prev=None)
    # claiming our store with a key our store never enrolled
    claims_ours = make(other, store=STORE)
    raises(BadSignature, "bad_signature", verify, claims_ours.raw, world.trust, T0)


def test_expired_certificate(world: World) -> None:
    """Expiry is judged against the envelope's stamp, never the time it arrives."""
    world.enrol("reg-old", not_after=T0 - 1)
    raw = make(world, "reg-old").raw  # stamped at T0: signed after expiry
    err = raises(ExpiredCertificate, "expired", verify, raw, world.trust, T0)
    assert "reg-old" in str(err)
    raises(ExpiredCertificate, "expired", verify, raw, world.trust, T0 - 10 * DAY)
    raises(ExpiredCertificate, "expired", verify_chain, [raw], world.trust, T0 - DAY, prev=None)


def test_an_envelope_signed_while_valid_verifies_after_the_certificate_expired() -> None:
    """A till's offline sales reaching the store after its certificate expired, or a
    new till catching up on a retired one's history: signed while valid, valid for ever
    (mesh.core.envelope invariant 7). Before, both were refused as expired on arrival."""
    w = new_world()
    w.enrol("reg-gone", not_after=T0 + 5)
    page = [make(w, "reg-gone", seq=1, hlc=(T0 + 4) << 16)]
    page.append(make(w, "reg-gone", seq=2, prev=page[0].hash, hlc=(T0 + 5) << 16))
    later = T0 + 400 * DAY
    assert verify(page[0].raw, w.trust, later) == page[0]
    assert verify_chain([e.raw for e in page], w.trust, later, prev=None) == page
    # one stamped a millisecond past expiry spoils the page (the newest stamp counts)
    late = make(w, "reg-gone", seq=3, prev=page[1].hash, hlc=(T0 + 6) << 16)
    raises(ExpiredCertificate, "expired", verify_chain, [e.raw for e in (*page, late)],
           w.trust, T0, prev=None)
    raises(ExpiredCertificate, "expired", verify, late.raw, w.trust, T0)


def test_revoked_certificate() -> None:
    w = new_world()
    raw = make(w, "reg-02").raw
    verify(raw, w.trust, T0)
    w.trust.apply_revocations(
        issue_revocations(w.store_key, store_id=STORE, version=1, revoked={"reg-02"})
    )
    err = raises(RevokedCertificate, "revoked", verify, raw, w.trust, T0)
    assert "reg-02" in str(err)
    verify(make(w, "reg-01").raw, w.trust, T0)


def test_unenrolled_origin(world: World) -> None:
    stranger = NodeKey.generate()
    raw = make(world, "reg-77", key=stranger).raw
    err = raises(NotEnrolled, "not_enrolled", verify, raw, world.trust, T0)
    assert "reg-77" in str(err)


def test_enrolled_name_with_the_wrong_key(world: World) -> None:
    raw = make(world, "reg-01", key=world.keys["reg-02"]).raw
    raises(BadSignature, "bad_signature", verify, raw, world.trust, T0)


def test_register_writing_another_replicas_pn_entry(world: World) -> None:
    raw = make(world, "reg-01", ops=sale_ops("reg-02")).raw
    raises(Forbidden, "forbidden", verify, raw, world.trust, T0)
    mixed = sale_ops("reg-01") + sale_ops("reg-02", sku="SKU-2")
    raises(Forbidden, "forbidden", verify, make(world, ops=mixed).raw, world.trust, T0)


def test_catalog_is_edge_and_cloud_only(world: World) -> None:
    meta = {"kind": "catalog", "txn": "c-1"}
    raw = make(world, "reg-01", ops=cat_ops(), meta=meta).raw
    raises(Forbidden, "forbidden", verify, raw, world.trust, T0)
    assert (
        verify(make(world, "edge-1", ops=cat_ops(), meta=meta).raw, world.trust, T0).origin
        == "edge-1"
    )


def test_reservation_outside_origin_namespace(world: World) -> None:
    meta = {"kind": "reserve", "txn": "t-2"}
    raw = make(world, ops=reserve_ops("reg-01", rid="reg-02:t-2"), meta=meta).raw
    raises(Forbidden, "forbidden", verify, raw, world.trust, T0)
    raw = make(world, ops=reserve_ops("reg-01", dot_owner="reg-02"), meta=meta).raw
    raises(Forbidden, "forbidden", verify, raw, world.trust, T0)


# --- verify_chain -------------------------------------------------------------------


@pytest.fixture(scope="module")
def page(world: World) -> list[Envelope]:
    return chain(world, 100)


def raws_of(envs: list[Envelope]) -> list[bytes]:
    return [e.raw for e in envs]


def test_valid_page(world: World, page: list[Envelope]) -> None:
    got = verify_chain(raws_of(page), world.trust, T0, prev=None)
    assert got == page
    assert [e.seq for e in got] == list(range(1, 101))
    # a later sub-page, anchored at the hash the caller holds
    got = verify_chain(raws_of(page[40:70]), world.trust, T0, prev=page[39].hash)
    assert [e.seq for e in got] == list(range(41, 71))
    assert verify_chain([], world.trust, T0, prev=None) == []


def test_broken_link_in_the_middle_resigned(world: World, page: list[Envelope]) -> None:
    raws = raws_of(page)
    body = body_of(raws[50])
    body["prev"] = hashlib.sha256(b"not the previous envelope").hexdigest()
    raws[50] = resign(world, body)
    verify(raws[50], world.trust, T0)  # individually it is fine
    raises(BrokenChain, "broken_chain", verify_chain, raws, world.trust, T0, prev=None)


def test_reordered_page(world: World, page: list[Envelope]) -> None:
    raws = raws_of(page[:10])
    raws[3], raws[4] = raws[4], raws[3]
    raises(BrokenChain, "broken_chain", verify_chain, raws, world.trust, T0, prev=None)
    raises(
        BrokenChain,
        "broken_chain",
        verify_chain,
        raws_of(page[:10])[::-1],
        world.trust,
        T0,
        prev=None,
    )


def test_page_with_a_gap(world: World, page: list[Envelope]) -> None:
    raws = raws_of(page[:10])
    del raws[5]
    raises(BrokenChain, "broken_chain", verify_chain, raws, world.trust, T0, prev=None)
    dup = raws_of(page[:10])
    dup.insert(5, dup[4])
    raises(BrokenChain, "broken_chain", verify_chain, dup, world.trust, T0, prev=None)


def test_mixed_origins(world: World, page: list[Envelope]) -> None:
    other = chain(world, 10, origin="reg-02")
    raws = raws_of(page[:5]) + raws_of(other[5:6])
    raises(Malformed, "malformed", verify_chain, raws, world.trust, T0, prev=None)


def test_first_envelope_does_not_link_to_given_prev(world: World, page: list[Envelope]) -> None:
    sub = raws_of(page[10:20])
    verify_chain(sub, world.trust, T0, prev=page[9].hash)
    raises(BrokenChain, "broken_chain", verify_chain, sub, world.trust, T0, prev=page[8].hash)
    raises(BrokenChain, "broken_chain", verify_chain, sub, world.trust, T0, prev=None)
    raises(
        BrokenChain,
        "broken_chain",
        verify_chain,
        raws_of(page[:3]),
        world.trust,
        T0,
        prev=page[0].hash,
    )


def test_tampered_middle_envelope(world: World, page: list[Envelope]) -> None:
    raws = raws_of(page)
    raws[50] = raws[50].replace(b'"p":61', b'"p":62')
    assert raws[50] != page[50].raw
    decode(raws[50])
    raises(BrokenChain, "broken_chain", verify_chain, raws, world.trust, T0, prev=None)


def test_tampered_last_envelope(world: World, page: list[Envelope]) -> None:
    raws = raws_of(page)
    raws[-1] = raws[-1].replace(b'"p":110', b'"p":111')
    assert raws[-1] != page[-1].raw
    raises(BadSignature, "bad_signature", verify_chain, raws, world.trust, T0, prev=None)
    sig_flip = bytearray(page[-1].raw)
    sig_flip[-3] = ord("1") if sig_flip[-3] == ord("0") else ord("0")  # still lowercase hex
    raws[-1] = bytes(sig_flip)
    raises(BadSignature, "bad_signature", verify_chain, raws, world.trust, T0, prev=None)


def test_chain_checks_certificate_and_rights() -> None:
    w = new_world()
    p = chain(w, 5)
    other = new_world()
    other.enrol("reg-77")
    stranger = raws_of(chain(other, 3, origin="reg-77"))
    raises(NotEnrolled, "not_enrolled", verify_chain, stranger, w.trust, T0, prev=None)
    # signed while valid: still valid after expiry; signed after it: expired
    assert verify_chain(raws_of(p), w.trust, T0 + DAY + 1, prev=None) == p
    w.enrol("reg-05", not_after=T0 - 1)
    raises(ExpiredCertificate, "expired", verify_chain, raws_of(chain(w, 2, origin="reg-05")),
           w.trust, T0 - 2, prev=None)
    forbidden = make(w, seq=6, prev=p[-1].hash, ops=sale_ops("reg-02"))
    raws = [*raws_of(p), forbidden.raw, make(w, seq=7, prev=forbidden.hash).raw]
    raises(Forbidden, "forbidden", verify_chain, raws, w.trust, T0, prev=None)
    w.trust.revoke("reg-01")
    raises(RevokedCertificate, "revoked", verify_chain, raws_of(p), w.trust, T0, prev=None)


def test_page_longer_than_ledger_page(world: World, page: list[Envelope]) -> None:
    raws = raws_of(page) * (config.LEDGER_PAGE // len(page) + 1)
    raises(Malformed, "malformed", verify_chain, raws, world.trust, T0, prev=None)


# --- properties ---------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_any_byte_flip_never_verifies(world: World, data: st.DataObject) -> None:
    env = make(world, ops=reserve_ops("reg-01"), meta={"kind": "reserve", "txn": "t-2"})
    raw = bytearray(env.raw)
    i = data.draw(st.integers(0, len(raw) - 1), label="index")
    raw[i] ^= data.draw(st.integers(1, 255), label="xor")
    with pytest.raises(EnvelopeError):
        verify(bytes(raw), world.trust, T0)


@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_any_byte_flip_in_a_page_never_verifies(
    world: World, page: list[Envelope], data: st.DataObject
) -> None:
    raws = raws_of(page[:8])
    j = data.draw(st.integers(0, len(raws) - 1), label="envelope")
    raw = bytearray(raws[j])
    i = data.draw(st.integers(0, len(raw) - 1), label="index")
    raw[i] ^= data.draw(st.integers(1, 255), label="xor")
    raws[j] = bytes(raw)
    with pytest.raises(EnvelopeError):
        verify_chain(raws, world.trust, T0, prev=None)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2000))
def test_decode_is_total_on_arbitrary_bytes(raw: bytes) -> None:
    try:
        decode(raw)
    except EnvelopeError:
        pass


@settings(max_examples=200, deadline=None)
@given(
    body=st.recursive(
        st.none()
        | st.booleans()
        | st.integers()
        | st.floats(allow_nan=False)
        | st.text(max_size=8),
        lambda inner: (
            st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=5)
        ),
        max_leaves=20,
    )
)
def test_decode_is_total_on_signed_json_bodies(world: World, body: Any) -> None:
    try:
        raw = resign(world, body)
    except orjson.JSONEncodeError:
        return
    try:
        verify(raw, world.trust, T0)
    except EnvelopeError:
        pass
    else:
        raise AssertionError("a random body verified")

"""WAN batch packing: prev elision round-trips exactly and refuses what it cannot restore."""

from __future__ import annotations

import random

import pytest

from mesh.sync import encode_batch, split_batch
from mesh.transport import _coalesce, pack_wan, unpack_wan
from tests.conftest import NOW, StoreKit


def _envelopes(kit: StoreKit, n: int) -> list[bytes]:
    reps = {r: kit.replica(r) for r in ("edge", "r1", "r2")}
    reps["edge"].receive("A", 1000, txn="rcv", now_ms=NOW)
    for rep in reps.values():
        if rep.node_id != "edge":
            rep.receive("A", 10, txn="rcv", now_ms=NOW)
    out = []
    rng = random.Random(3)
    for i in range(n):
        rep = reps[rng.choice(list(reps))]
        env = rep.sell("A", 1, txn=f"s{i}", now_ms=NOW + i, note='"prev":"x" in a note').envelope
        assert env is not None
        out.append(env.raw)
    return out


def test_pack_round_trips_and_shrinks(kit: StoreKit) -> None:
    raws = _envelopes(kit, 60)
    data = encode_batch(raws)
    packed = pack_wan(data)
    assert packed[:1] == b"P" and len(packed) < len(data) - 40 * 50
    assert unpack_wan(packed) == data
    assert split_batch(unpack_wan(packed)) == raws


def test_unpack_refuses_an_elided_prev_it_cannot_restore(kit: StoreKit) -> None:
    raws = _envelopes(kit, 10)
    packed = pack_wan(encode_batch(raws))
    # drop the first frame: the next frame of that origin has nothing to link to
    n = int.from_bytes(packed[1:5], "big")
    frames = split_batch(b"E" + packed[1 + 4 + n:])
    if any(b'"prev":"="' in f for f in frames[:3]):
        with pytest.raises(ValueError):
            unpack_wan(b"P" + packed[1 + 4 + n:])
    with pytest.raises(ValueError):
        unpack_wan(b"P\x00\x00\x01\x00abc")


def test_coalesce_merges_queued_batches_within_bounds(kit: StoreKit) -> None:
    from collections import deque

    raws = _envelopes(kit, 30)
    q = deque([encode_batch(raws[:10]), encode_batch(raws[10:20]), b"V{}",
               encode_batch(raws[20:])])
    merged = _coalesce(q)
    assert split_batch(merged) == raws[:20]
    assert list(q)[0] == b"V{}"

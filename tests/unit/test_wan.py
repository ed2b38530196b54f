"""WAN codec: exact round trips across messages, refusal of what it cannot restore,
bounded inflation; batch coalescing."""

from __future__ import annotations

import random
import zlib
from collections import deque

import pytest

from mesh import config
from mesh.core.sync import encode_batch, split_batch
from mesh.net.transport import WanCodec, _coalesce
from tests.conftest import NOW, StoreKit


def _envelopes(kit: StoreKit, n: int) -> list[bytes]:
    reps = {r: kit.replica(r) for r in ("edge", "r1", "r2")}
    for rep in reps.values():
        rep.receive("A", 1000, txn="rcv", now_ms=NOW)
    out = []
    rng = random.Random(3)
    for i in range(n):
        rep = reps[rng.choice(list(reps))]
        env = rep.sell("A", 1, txn=f"s{i}", now_ms=NOW + i, note='"prev":"x" in a note').envelope
        assert env is not None
        out.append(env.raw)
    return out


def test_round_trip_across_messages_and_shrinks(kit: StoreKit) -> None:
    raws = _envelopes(kit, 90)
    tx, rx = WanCodec(), WanCodec()
    sent = 0
    for i in range(0, 90, 10):  # nine messages: prev elided across message boundaries
        data = encode_batch(raws[i : i + 10])
        wire = tx.encode(data)
        sent += len(wire)
        assert rx.decode(wire) == data
    for control in (b'V{"vv":{}}', b'C{"certs":[]}'):
        assert rx.decode(tx.encode(control)) == control
    assert sent < 0.3 * sum(len(r) for r in raws)  # raw signatures, elided prev, zlib 9


def test_decode_refuses_what_it_cannot_restore(kit: StoreKit) -> None:
    raws = _envelopes(kit, 12)
    with pytest.raises(ValueError, match="elided prev"):
        _out_of_step_decode(raws)
    with pytest.raises(ValueError):
        WanCodec().decode(b"E\x00\x00\x00\x01x")  # not compressed
    with pytest.raises((ValueError, zlib.error)):
        WanCodec().decode(b"Z" + b"\xff" * 40)


def _out_of_step_decode(raws: list[bytes]) -> bytes:
    """A receiver that lost the hashes of message one cannot restore message two."""
    tx = WanCodec()
    first = tx.encode(encode_batch(raws[:6]))
    second = tx.encode(encode_batch(raws[6:]))
    rx = WanCodec()
    rx.decode(first)
    rx._rx_last.clear()  # forget message one's hashes (a receiver out of step)
    return rx.decode(second)


def test_inflation_is_bounded() -> None:
    bomb = zlib.compressobj(9, zlib.DEFLATED, -15)
    data = b"Z" + bomb.compress(b"V" + b"0" * (config.MAX_MESSAGE_BYTES + 10)) + bomb.flush(
        zlib.Z_SYNC_FLUSH)
    assert len(data) < 100_000
    with pytest.raises(ValueError, match="beyond"):
        WanCodec().decode(data)


def test_coalesce_merges_queued_batches_within_bounds(kit: StoreKit) -> None:
    raws = _envelopes(kit, 30)
    q = deque([encode_batch(raws[:10]), encode_batch(raws[10:20]), b"V{}",
               encode_batch(raws[20:])])
    merged = _coalesce(q)
    assert split_batch(merged) == raws[:20]
    assert q[0] == b"V{}"

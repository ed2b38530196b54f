"""Bounded history (issue 12): idempotency window, bounded replica state, checkpoints."""

from __future__ import annotations

import pytest

from mesh import config
from mesh.errors import TxnReused
from mesh.identity import NodeKey
from mesh.replica import Replica

NOW = 1_700_000_000_000
WINDOW = config.IDEMPOTENCY_WINDOW_MS


def _till(node: str = "r1") -> Replica:
    r = Replica("s1", node, "register", NodeKey.generate())
    r.receive("SKU-1", 100, txn="rx-1", now_ms=NOW)
    return r


def test_replay_inside_the_window_is_a_duplicate_with_the_original_result() -> None:
    r = _till()
    first = r.sell("SKU-1", 2, txn="t-1", now_ms=NOW + 1)
    late = r.sell("SKU-1", 2, txn="t-1", now_ms=NOW + 1 + WINDOW - 1)  # just inside
    assert late.duplicate and late.envelope is None and late.seq == first.seq
    assert r.on_hand("SKU-1") == 98
    res = r.reserve("SKU-1", 1, txn="t-r", now_ms=NOW + 2, channel="web")
    again = r.reserve("SKU-1", 1, txn="t-r", now_ms=NOW + 2 + WINDOW - 1, channel="web")
    assert again.duplicate and again.reservation_id == res.reservation_id


def test_replay_past_the_window_is_a_new_command_and_keys_are_retired() -> None:
    r = _till()
    for i in range(50):
        r.sell("SKU-1", 1, txn=f"t-{i}", now_ms=NOW + i)
    assert len(r._txns) == 51
    late = r.sell("SKU-1", 1, txn="t-0", now_ms=NOW + WINDOW + 100)  # past it: retired
    assert not late.duplicate and late.envelope is not None
    assert r.on_hand("SKU-1") == 49
    assert r.txns_retired == 51  # rx-1 and t-0..t-49: only the new t-0 is remembered
    assert set(r._txns) == {"t-0"}


def test_retired_reservation_txn_still_refused_while_the_reservation_is_held() -> None:
    r = _till()
    r.reserve("SKU-1", 1, txn="t-r", now_ms=NOW, channel="web")
    with pytest.raises(TxnReused):
        r.reserve("SKU-1", 1, txn="t-r", now_ms=NOW + WINDOW + 10, channel="web")


def test_window_survives_a_snapshot() -> None:
    r = _till()
    first = r.sell("SKU-1", 1, txn="t-1", now_ms=NOW + 5)
    copy = Replica("s1", "r1", "register", r.key)
    copy.restore(r.snapshot())
    assert copy.sell("SKU-1", 1, txn="t-1", now_ms=NOW + WINDOW).seq == first.seq
    assert not copy.sell("SKU-1", 1, txn="t-1", now_ms=NOW + WINDOW + 10).duplicate

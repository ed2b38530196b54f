"""Memory a hostile enrolled peer can make a node hold (issue 10 items 10 and 11).

Measured with tracemalloc: the cost of one buffered out-of-order envelope of ~255 KiB
made of small JSON objects, and the growth of a WAN session's receive table when the
peer names 100,000 made-up origins.

Run: .venv/bin/python scripts/mem_hostile_peer.py
"""

from __future__ import annotations

import gc
import sys
import tracemalloc
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mesh.core.sync import encode_batch
from mesh.net.transport import WanCodec
from tests.conftest import NOW, StoreKit
from tests.process.test_hostile_peer import _edge, _frame, _heavy_chain


def traced(fn: Callable[[], None]) -> int:
    """Bytes still allocated after ``fn`` (garbage collected before and after)."""
    gc.collect()
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        fn()
        gc.collect()
        return tracemalloc.get_traced_memory()[0] - base
    finally:
        tracemalloc.stop()


def pending_buffer() -> None:
    kit = StoreKit()
    for node, role in (("edge", "edge"), ("r1", "register"), ("r2", "register")):
        kit.enrol(node, role)
    chain = _heavy_chain(kit, "r1", 17, target=255 * 1024)
    core = _edge(kit, "r1")
    msgs = [encode_batch([raw]) for raw in chain[1:]]  # seq 1 missing: all are buffered

    def receive() -> None:
        for m in msgs:
            core.receive(m, "r1", NOW)

    grown = traced(receive)
    n = core.replica.pending_count()
    size = len(chain[1])
    print(f"pending buffer: {n} envelopes of {size} B: {grown / n / 1e6:.2f} MB each "
          f"({grown / n / size:.2f}x their wire size)")


def wan_table() -> None:
    tx = WanCodec()
    try:
        rx = WanCodec(known=lambda o: o in ("r1", "r2"), on_refuse=lambda r: None)
    except TypeError:  # the codec before issue 10 item 11
        rx = WanCodec()
    frames = [_frame(f"{i:032x}", 1, None) for i in range(100_000)]
    wires = [tx.encode(encode_batch(frames[i:i + 1000])) for i in range(0, len(frames), 1000)]
    del frames

    def decode() -> None:
        for data in wires:
            rx.decode(data)

    grown = traced(decode)
    print(f"WAN codec: 100,000 made-up origins in {sum(map(len, wires)) / 1024:.0f} KiB on "
          f"the wire: receive table {len(rx._rx_last)} entries, {grown / 1e6:.1f} MB")


if __name__ == "__main__":
    pending_buffer()
    wan_table()

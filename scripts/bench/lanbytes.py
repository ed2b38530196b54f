#!/usr/bin/env python3
"""Where a sale's LAN bytes go (issue 13 goal 3): one sale's envelope taken apart, and
what each session encoding makes of a register's stream of sales (bytes per copy, µs
per encode and decode), in one process, no network.

Usage::

    .venv/bin/python scripts/bench/lanbytes.py [--sales 3000]

The bytes on the real wire (4 node processes, TCP payload) are measured by
``scripts/bench_peers.py --only storemesh [--baseline DIR]``; this script explains them.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from mesh import config
from mesh.core.identity import NodeKey
from mesh.core.replica import Replica
from mesh.core.sync import encode_batch
from mesh.core.wancodec import WanCodec

SKUS = 50
WS_FRAME = 6  # a client's WebSocket header for a 126..65535-byte message with its mask


def sales(n: int) -> list[bytes]:
    """A register's sales as the bench's load makes them (50 SKUs, a service staff id)."""
    r = Replica("bench-store", "reg-01", "register", NodeKey.generate())
    now = time.time_ns() // 1_000_000
    for j in range(SKUS):
        r.receive(f"sku-{j:04d}", 1_000_000, txn=f"rcv-{j}", now_ms=now)
    out = []
    for i in range(n):
        env = r.sell(f"sku-{i % SKUS:04d}", 1, txn=f"t{i % 3}-r100-{i}", now_ms=now + 3 * i,
                     staff="bench").envelope
        assert env is not None
        out.append(env.raw)
    return out


def anatomy(raw: bytes) -> None:
    body = raw[8:-138]
    at = body.rfind(b'"prev":"')
    print(f"one sale's envelope: {len(raw)} B")
    parts = {
        "signature, 128 hex chars (64 B of information)": 128,
        "prev, 64 hex chars (the hash of the envelope before: derivable)": 64 if at >= 0 else 0,
        'framing {"body":...,"sig":"..."}': len(raw) - len(body) - 128,
    }
    parts["JSON body without prev (keys, ids, hlc, ops, meta)"] = (
        len(body) - parts["prev, 64 hex chars (the hash of the envelope before: derivable)"])
    for name, n in parts.items():
        print(f"  {n:4d} B  {name}")
    print(f"  per sale in a 4-node full mesh: 3 copies x ({len(raw)} + 4 length + 1 type + "
          f"~{WS_FRAME} WebSocket) = ~{3 * (len(raw) + 5 + WS_FRAME)} B")


def measure(name: str, raws: list[bytes], codec: WanCodec | None,
            rx: WanCodec | None) -> None:
    msgs = [encode_batch([r]) for r in raws]
    t0 = time.process_time()
    wire = [codec.encode(m) for m in msgs] if codec is not None else msgs
    t1 = time.process_time()
    back = [rx.decode(w) for w in wire] if rx is not None else wire
    t2 = time.process_time()
    assert back == msgs
    warm = len(msgs) // 10
    per = sum(map(len, wire[warm:])) / (len(wire) - warm)
    print(f"  {name:<34} {per:7.1f} B/copy  {3 * (per + WS_FRAME):7.0f} B/sale   "
          f"encode {(t1 - t0) / len(msgs) * 1e6:5.1f} µs  decode "
          f"{(t2 - t1) / len(msgs) * 1e6:5.1f} µs")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--sales", type=int, default=3000)
    args = ap.parse_args(argv)
    if not 100 <= args.sales <= 100_000:
        ap.error("--sales must be within 100..100000")
    print(f"load average {os.getloadavg()[0]:.2f}; {args.sales} sales of one register, "
          "one envelope per message (the 100/s case)")
    raws = sales(args.sales)
    anatomy(raws[-1])
    print("each sale as a session carries it (one message per sale, after a warm-up):")
    measure("plain E message (before)", raws, None, None)
    measure("z1 at the LAN's level/window", raws,
            WanCodec(level=config.LAN_ZLIB_LEVEL, wbits=config.LAN_ZLIB_WBITS,
                     mem_level=config.LAN_ZLIB_MEM_LEVEL), WanCodec())
    measure("z1 at the WAN's (level 9, 32 KiB)", raws, WanCodec(), WanCodec())
    return 0


if __name__ == "__main__":
    sys.exit(main())

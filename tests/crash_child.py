"""Child process of the crash test (tests/process/test_crash.py): sells as fast as it can.

Usage::

    python tests/crash_child.py DATA_DIR RUN_ID [--retry TXN ...]

It opens ``DurableReplica.open(DATA_DIR, snapshot_every=300)``, re-submits every
``--retry`` sale (each must come back as a duplicate: no new envelope), makes sure the
stock receipts exist (fixed txn ids, so after the first time they are duplicates too),
then sells one unit at a time with up to ``WINDOW`` sales waiting for their fsync,
until it is killed (or reaches ``MAX_SALES``).

Protocol on stdout, one line each, flushed:

* ``READY <replayed> <snapshot_upto>`` once the replica is rebuilt,
* ``DUP <txn>`` for a ``--retry`` sale that came back as a duplicate,
* ``ACK <txn>`` only after that command's future resolved, i.e. it is on disk,
* ``SNAP`` after each snapshot written.

Anything unexpected (a retry that was not a duplicate, a failed append) goes to stderr
and the process exits with status 2, which the test reports.

Sale txn ids are ``{RUN_ID}-{i}`` and sale ``i`` sells one unit of ``SKUS[i % 4]``, so a
retry re-submits exactly the original command.
"""

from __future__ import annotations

import sys
import time
from collections import deque
from concurrent.futures import Future
from pathlib import Path

from mesh.durable import DurableReplica

SKUS = ("sku-a", "sku-b", "sku-c", "sku-d")
#: Units received per SKU, once (more than the test can ever sell: no oversell noise).
RECEIVED = 1_000_000
WINDOW = 32
MAX_SALES = 200_000
SNAPSHOT_EVERY = 300


def sku_of(txn: str) -> str:
    return SKUS[int(txn.rsplit("-", 1)[1]) % len(SKUS)]


def receipt_txn(sku: str) -> str:
    return f"recv-{sku}"


def now_ms() -> int:
    # The edge of the system: the core takes the time as a parameter.
    return time.time_ns() // 1_000_000


def fail(msg: str) -> None:
    sys.stderr.write(f"crash_child: {msg}\n")
    sys.stderr.flush()
    sys.exit(2)


def main(argv: list[str]) -> None:
    if len(argv) < 2:
        fail("usage: crash_child.py DATA_DIR RUN_ID [--retry TXN ...]")
    data_dir, run_id = Path(argv[0]), argv[1]
    retries: list[str] = []
    rest = argv[2:]
    while rest:
        if rest[0] != "--retry" or len(rest) < 2:
            fail(f"bad arguments: {rest}")
        retries.append(rest[1])
        rest = rest[2:]

    out = sys.stdout
    dr = DurableReplica.open(data_dir, snapshot_every=SNAPSHOT_EVERY)
    stats = dr.rebuild_stats
    out.write(f"READY {stats.replayed} {stats.snapshot_upto}\n")
    out.flush()

    # Idempotency across restarts: an acknowledged sale re-submitted is a duplicate.
    for txn in retries:
        sku = sku_of(txn)
        result, fut = dr.execute(lambda r, s=sku, t=txn: r.sell(s, 1, txn=t, now_ms=now_ms()))
        if not result.duplicate or result.envelope is not None:
            fail(f"retry of {txn} was not a duplicate: seq {result.seq}")
        fut.result()
        out.write(f"DUP {txn}\n")
    out.flush()

    window: deque[tuple[str, Future[int]]] = deque()

    def ack(block_until: int) -> None:
        """Acknowledge every resolved command at the front of the window, blocking
        while more than ``block_until`` are outstanding."""
        lines = []
        while window and (len(window) > block_until or window[0][1].done()):
            txn, fut = window.popleft()
            try:
                fut.result()
            except Exception as exc:  # a failed append must never be acknowledged
                fail(f"append of {txn} failed: {exc!r}")
            lines.append(f"ACK {txn}\n")
        if lines:
            out.write("".join(lines))
            out.flush()

    for sku in SKUS:
        txn = receipt_txn(sku)
        result, fut = dr.execute(
            lambda r, s=sku, t=txn: r.receive(s, RECEIVED, txn=t, now_ms=now_ms()))
        window.append((txn, fut))
    ack(0)

    for i in range(MAX_SALES):
        txn = f"{run_id}-{i}"
        sku = SKUS[i % len(SKUS)]
        result, fut = dr.execute(lambda r, s=sku, t=txn: r.sell(s, 1, txn=t, now_ms=now_ms()))
        if result.duplicate:
            fail(f"fresh sale {txn} came back as a duplicate")
        window.append((txn, fut))
        ack(WINDOW - 1)
        if i % SNAPSHOT_EVERY == SNAPSHOT_EVERY - 1:
            # A snapshot needs nothing in flight (DurableReplica invariant 4): drain the
            # window now and then so snapshots really happen under full load.
            ack(0)
            for _ in range(100):
                if dr.maybe_snapshot():
                    out.write("SNAP\n")
                    out.flush()
                    break
                time.sleep(0.0005)  # the last future's done-callback may still be running
        elif dr.maybe_snapshot():
            out.write("SNAP\n")
            out.flush()
    ack(0)
    dr.close()


if __name__ == "__main__":
    main(sys.argv[1:])

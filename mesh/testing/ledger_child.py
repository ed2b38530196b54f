"""Child process of the storage contract's real crash (``mesh.testing.contracts``).

Usage: ``python -m mesh.testing.ledger_child sqlite LEDGER_PATH BATCH_FILE`` (the
register's ``Ledger``) or ``... pg DSN STORE_ID BATCH_FILE`` (the cloud's ``PgLedger``).
``BATCH_FILE`` holds the batches to append (orjson: a list of lists of raw envelopes as
str). The child appends them one after the other with ``sync=True`` and prints ``ACK <i>``
(flushed) only once batch ``i``'s future resolved, until it is killed.

``crash_after_acks`` is the parent's side: it starts the child, kills it with SIGKILL
once it has printed enough acknowledgements, and counts every one printed before the
kill landed.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import orjson

from mesh.core.envelope import Envelope, decode
from mesh.ports import Storage


def _open(argv: list[str]) -> tuple[Storage, Path]:
    if argv[0] == "sqlite":
        from mesh.store.ledger import Ledger
        return Ledger(Path(argv[1])), Path(argv[2])
    if argv[0] == "pg":
        from mesh.store.pgstore import PgLedger
        return PgLedger(argv[1], argv[2]), Path(argv[3])
    raise SystemExit(f"ledger_child: unknown backend {argv[0]!r} (sqlite or pg)")


def main(argv: list[str]) -> None:
    ledger, batch_file = _open(argv)
    batches = orjson.loads(batch_file.read_bytes())
    sys.stdout.write("READY\n")
    sys.stdout.flush()
    for i, batch in enumerate(batches):
        ledger.append([decode(raw.encode()) for raw in batch], sync=True).result()
        sys.stdout.write(f"ACK {i}\n")
        sys.stdout.flush()
    ledger.close()


def crash_after_acks(backend: Sequence[str], batch_file: Path,
                     batches: Sequence[Sequence[Envelope]], *, cwd: Path,
                     kill_after: int = 10, timeout_s: float = 60) -> int:
    """Append ``batches`` in a child over ``backend`` (``["sqlite", PATH]`` or
    ``["pg", DSN, STORE]``), SIGKILL it after ``kill_after`` acknowledgements; return how
    many batches it acknowledged in all."""
    batch_file.write_bytes(orjson.dumps([[e.raw.decode() for e in b] for b in batches]))
    child = subprocess.Popen(  # noqa: S603 -- our own module, our own arguments
        [sys.executable, "-m", "mesh.testing.ledger_child", *backend, str(batch_file)],
        stdout=subprocess.PIPE, text=True, cwd=cwd)
    assert child.stdout is not None
    acks = 0
    deadline = time.monotonic() + timeout_s
    for line in child.stdout:
        if line.startswith("ACK"):
            acks += 1
            if acks >= kill_after:
                child.kill()
                break
        assert time.monotonic() < deadline, "ledger child made no progress"
    child.wait(10)
    rest = child.stdout.read()  # what it printed before the kill landed
    child.stdout.close()
    return acks + sum(1 for ln in rest.splitlines() if ln.startswith("ACK"))


if __name__ == "__main__":
    main(sys.argv[1:])

"""Child process of the PostgreSQL storage contract's crash: as
``mesh.testing.ledger_child``, over ``PgLedger``.

Usage: ``python -m tests.pg_ledger_child DSN STORE_ID BATCH_FILE``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import orjson

from mesh.core.envelope import decode
from mesh.store.pgstore import PgLedger


def main(argv: list[str]) -> None:
    ledger = PgLedger(argv[0], argv[1])
    batches = orjson.loads(Path(argv[2]).read_bytes())
    sys.stdout.write("READY\n")
    sys.stdout.flush()
    for i, batch in enumerate(batches):
        ledger.append([decode(raw.encode()) for raw in batch], sync=True).result()
        sys.stdout.write(f"ACK {i}\n")
        sys.stdout.flush()
    ledger.close()


if __name__ == "__main__":
    main(sys.argv[1:])

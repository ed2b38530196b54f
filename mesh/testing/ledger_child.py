"""Child process of the storage contract's real crash (``mesh.testing.contracts``).

Usage: ``python -m mesh.testing.ledger_child LEDGER_PATH BATCH_FILE``. ``BATCH_FILE``
holds the batches to append (orjson: a list of lists of raw envelopes as str). The child
appends them one after the other with ``sync=True`` and prints ``ACK <i>`` (flushed)
only once batch ``i``'s future resolved, until it is killed.
"""

from __future__ import annotations

import sys
from pathlib import Path

import orjson

from mesh.core.envelope import decode
from mesh.store.ledger import Ledger


def main(argv: list[str]) -> None:
    ledger = Ledger(Path(argv[0]))
    batches = orjson.loads(Path(argv[1]).read_bytes())
    sys.stdout.write("READY\n")
    sys.stdout.flush()
    for i, batch in enumerate(batches):
        ledger.append([decode(raw.encode()) for raw in batch], sync=True).result()
        sys.stdout.write(f"ACK {i}\n")
        sys.stdout.flush()
    ledger.close()


if __name__ == "__main__":
    main(sys.argv[1:])

"""Every bound in one place, each with the reason for its value (STYLE.md: bound everything)."""

from __future__ import annotations

from typing import Final

# --- envelopes ------------------------------------------------------------------
#: Largest envelope accepted, in bytes of its wire form. A POS envelope is ~400 B;
#: catalog updates carrying a Yjs update for a large price book change are the big ones.
MAX_ENVELOPE_BYTES: Final = 256 * 1024
#: Most ops in one envelope (a basket of line items, a fulfilment of a large order).
MAX_OPS_PER_ENVELOPE: Final = 256
#: Longest identifier (node id, SKU, txn id, reservation id, staff id, ...).
MAX_ID_LEN: Final = 128
#: Longest free-text field (reason note, order reference).
MAX_TEXT_LEN: Final = 512
#: Largest quantity in one op; anything larger is a typo or an attack.
MAX_QTY: Final = 1_000_000
#: How far in the future a remote HLC may be before the envelope is refused (ms).
#: Registers' clocks drift; a day is generous and still stops a wild clock from
#: dragging every HLC in the store forward.
MAX_CLOCK_SKEW_MS: Final = 24 * 3600 * 1000

# --- replica --------------------------------------------------------------------
#: Out-of-order envelopes buffered per origin while waiting for the gap to fill.
#: Beyond this the envelope is refused (SeqGap) and anti-entropy re-fetches it later.
MAX_PENDING_PER_ORIGIN: Final = 4096
#: Equivocation evidence pairs kept in memory (all are also kept in the ledger).
MAX_EVIDENCE: Final = 1024

# --- ledger ---------------------------------------------------------------------
#: Most envelopes in one group commit: large enough to amortise the fsync (~280k
#: rows/s in batches of 100 vs ~7k single-row commits/s), small enough to keep the
#: commit latency of the first envelope in the batch low.
LEDGER_MAX_BATCH: Final = 512
#: Appends waiting for the writer thread before callers block (back-pressure).
LEDGER_MAX_QUEUE: Final = 16_384
#: Take a snapshot after this many envelopes since the last one, so a restart replays
#: a bounded tail.
SNAPSHOT_EVERY: Final = 50_000
#: Envelopes read per page when streaming the ledger (rebuild, verify, catch-up).
LEDGER_PAGE: Final = 2_000

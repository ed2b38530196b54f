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
#: How far ahead of our wall clock a remote HLC may be and still be adopted into our
#: own HLC (ms). An envelope further ahead is still accepted and applied (acceptance
#: must not depend on the receiver's clock, or replicas holding different clocks take
#: different sets and never converge), but our HLC does not follow it: one node whose
#: clock stepped hours ahead cannot drag every HLC in the store forward. NTP keeps
#: registers within milliseconds; a minute covers a till whose RTC drifted for weeks.
MAX_HLC_ADOPT_AHEAD_MS: Final = 60_000

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

# --- sync -------------------------------------------------------------------------
#: Largest sync message accepted from a peer. A page of 2,000 sale envelopes is ~0.8 MB;
#: catalog envelopes can reach MAX_ENVELOPE_BYTES each, so batches are cut by bytes too.
MAX_MESSAGE_BYTES: Final = 4 * 1024 * 1024
#: Bytes of envelopes the sender puts in one batch message before starting another.
MAX_BATCH_BYTES: Final = 1024 * 1024
#: Most envelopes in one batch message.
MAX_BATCH_ENVELOPES: Final = LEDGER_PAGE
#: Envelopes sent to one peer and not yet acknowledged by its version vector: the
#: catch-up window (back-pressure). Four pages keep a LAN link busy without letting a
#: slow peer pin megabytes of our memory.
MAX_INFLIGHT_PER_PEER: Final = 4 * LEDGER_PAGE
#: Room beyond MAX_INFLIGHT_PER_PEER that only fresh pushes may use, so live sales are
#: not queued behind a catch-up that filled the window.
PUSH_RESERVE: Final = LEDGER_PAGE
#: A receiver acknowledges (sends its version vector) after this many envelopes from a
#: peer; otherwise its periodic summary acknowledges them.
SYNC_ACK_EVERY: Final = 500
#: After refusing an envelope or finding a gap, a receiver sends its summary at once
#: (at most this often per peer), so the sender repairs in one round trip instead of
#: waiting for the next periodic summary (15 s on the WAN).
SYNC_NACK_MS: Final = 50
#: Anti-entropy: every peer gets our version vector this often (jittered ±25%), which
#: heals lost pushes, partitions and restarts.
SYNC_INTERVAL_MS: Final = 1000
#: One timer wake-up sends every summary due within this many ms (fewer wake-ups).
SYNC_TIMER_SLACK_MS: Final = 100
#: When our sessions change, LAN peers get our summary (which lists them) within this
#: many ms: one summary per peer for a burst of changes, such as start-up.
SYNC_LINKS_MS: Final = 250
#: A node whose sessions (other than a new one's) have not changed for this long is
#: settled: when a session comes up with a peer that holds fewer sessions (the one
#: rejoining), it leaves the announcement to that peer (mesh.sync invariant 8). A
#: rejoining till's sessions come back within a discovery delay of each other.
SYNC_LINKS_SETTLED_MS: Final = 4 * SYNC_LINKS_MS
#: Up to this many peers every peer gets the full summary rate; beyond it, peers that
#: keep up get it n/SYNC_FULL_RATE_PEERS times less often: a node sends about this many
#: periodic summaries per interval however big the store (O(n) per store, not O(n²)).
#: Pushes still go to everyone at once; gaps and refusals are reported at once.
SYNC_FULL_RATE_PEERS: Final = 2
#: The same on WAN links (the cloud): they are metered, and heartbeats already notice a
#: dead link; lost pushes there heal within this interval.
SYNC_WAN_INTERVAL_MS: Final = 15_000
#: Most origins (nodes) a version vector may name, and most peers we keep sessions
#: with: a store has tens of registers; 512 leaves room for the cloud's view.
MAX_ORIGINS: Final = 512
MAX_PEERS: Final = 512
#: Most certificates in one certificate message.
MAX_CERTS_PER_MESSAGE: Final = MAX_ORIGINS
#: Retransmission timeout per peer, as TCP computes it (RFC 6298: SRTT + 4 RTTVAR from
#: round-trip samples, doubled on every timeout until a fresh sample). A batch sent and
#: still not acknowledged after it is taken as lost and sent again (lossy links). The
#: initial value is the old fixed timer: three summary intervals; the floor is RFC
#: 6298's 1 s (a LAN round trip is well under a millisecond, but a lost push costs one
#: summary anyway); the cap bounds how long a backed-off link waits.
SYNC_RTO_INITIAL_MS: Final = 3 * SYNC_INTERVAL_MS
SYNC_RTO_MIN_MS: Final = SYNC_INTERVAL_MS
SYNC_RTO_MAX_MS: Final = 60_000
#: Refused envelopes (e.g. a certificate the peer lacks) are sent again at once the
#: first time; while the peer keeps refusing them the delay doubles from SYNC_NACK_MS
#: up to this cap, per (peer, origin) at the sender and per (peer, reason) for the
#: receiver's nacks: no refusal -> summary -> resend loop at the nack rate.
SYNC_REFUSAL_BACKOFF_MAX_MS: Final = 30_000

# --- transport ----------------------------------------------------------------------
#: A handshake step that takes longer than this fails (a peer that connects and stalls
#: must not hold a slot).
HANDSHAKE_TIMEOUT_S: Final = 5.0
#: WebSocket ping interval; a peer that misses a pong is disconnected, so a pulled
#: cable is noticed within ~2 intervals instead of at the next TCP timeout.
HEARTBEAT_S: Final = 5.0
#: Messages queued for one peer before the session is dropped as too slow.
SESSION_MAX_QUEUE: Final = 10_000
#: Reconnect backoff: first retry after DIAL_BACKOFF_MIN_S, doubling to DIAL_BACKOFF_MAX_S,
#: each with ±50% jitter so a store's registers do not reconnect in lockstep.
DIAL_BACKOFF_MIN_S: Final = 0.2
DIAL_BACKOFF_MAX_S: Final = 10.0
#: Largest HTTP request body the API accepts.
MAX_HTTP_BODY: Final = 64 * 1024
#: Stock-change events buffered per live-stream subscriber before it is dropped.
SUBSCRIBER_QUEUE: Final = 1_000
#: How often the node checks whether a snapshot is due.
SNAPSHOT_CHECK_S: Final = 5.0
#: How often a node sweeps for expired reservations, and how long past its expiry an
#: edge/cloud node waits before releasing another node's reservation (its creator
#: normally does it, and may just be offline for a moment).
EXPIRY_CHECK_S: Final = 5.0
EXPIRY_TAKEOVER_MS: Final = 60_000
#: On a WAN session (to/from the cloud) the writer waits this long after the first
#: queued message so a burst becomes one batch, which per-message deflate then
#: compresses well. 50 ms is invisible next to a WAN round trip and the 150 ms "near
#: real time" bar, and cuts bytes per sale several-fold.
WAN_LINGER_S: Final = 0.05

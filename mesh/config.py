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
#: Largest count a peer may send anywhere: a PN-counter entry (cumulative units one node
#: ever received or sold of one SKU), a reservation dot's counter, a record's expiry (ms).
#: 2**53 - 1 is the largest integer every JSON consumer (JavaScript dashboards, pycrdt)
#: reads exactly, and it leaves room for arithmetic in signed 64 bits: one envelope's
#: stock delta (P and N changes, at most 2**54) and the sum of MAX_ORIGINS entries
#: (2**9 * 2**53 = 2**62) both fit the int64 arrays of the oversell replay. At MAX_QTY
#: units per op it takes 9 billion full-size receipts to reach it.
MAX_COUNT: Final = (1 << 53) - 1

# --- replica --------------------------------------------------------------------
#: Out-of-order envelopes buffered per origin while waiting for the gap to fill.
#: Beyond this the envelope is refused (SeqGap) and anti-entropy re-fetches it later.
MAX_PENDING_PER_ORIGIN: Final = 4096
#: Bytes of envelopes (their wire form) buffered per origin and per node while waiting
#: for a gap to fill. The buffer only absorbs reordering within one catch-up window
#: (MAX_INFLIGHT_PER_PEER envelopes of ~400 B: ~3.2 MB), so 8 MiB per origin is room to
#: spare for POS traffic; without a byte bound an enrolled node could park 4,096 envelopes
#: of 256 KiB (1 GiB) per origin it names. 64 MiB per node keeps a register's worst
#: case well inside its RAM. Beyond either the envelope is refused (``pending_full``)
#: and anti-entropy fetches it again once the gap is filled.
MAX_PENDING_BYTES_PER_ORIGIN: Final = 8 * 1024 * 1024
MAX_PENDING_BYTES: Final = 64 * 1024 * 1024
#: Equivocation evidence pairs kept in memory (all are also kept in the ledger).
MAX_EVIDENCE: Final = 1024
#: Equivocation alerts (each one logged and its evidence written to the ledger) per
#: origin; later ones are only counted. One pair already proves the origin faulty (the
#: remedy is revoking it) and a few show the pattern; without a bound an equivocating
#: node could make us write up to 256 KiB of evidence for every envelope it signs.
MAX_ALERTS_PER_ORIGIN: Final = 16

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
#: How long a node remembers the txn id (idempotency key) of its own commands: a
#: replay inside the window answers ``duplicate`` with the original result; past it the
#: key is retired (memory is bounded by the store's recent window, not its history) and
#: the same txn id is a new command. Longer than the frontier horizon plus a margin: a
#: till retries its queued commands when it is back, and any outage the horizon allows
#: (FRONTIER_HORIZON_MS) must still find its keys remembered.
IDEMPOTENCY_WINDOW_MS: Final = 14 * 86_400_000
#: A node not heard from for this long (no summary from it, directly or relayed) stops
#: holding the store's stable frontier back (docs/architecture.md, "Bounded history").
#: A week: a till unplugged over a long weekend still holds it; a till in a drawer does
#: not hold every other node's memory for ever.
FRONTIER_HORIZON_MS: Final = 7 * 86_400_000
#: After a restart, how long every node the checkpointer's restored frontier tracks is
#: still counted as heard (``Frontier.restore``): the snapshot's last-heard times may be
#: older than the crash, and a live member must get the time to report before it could
#: be left out of a checkpoint. Ten checkpoint periods.
FRONTIER_RESUME_GRACE_MS: Final = 10 * 60_000
#: How often the store's checkpointer (``TrustStore.checkpointer``, the first edge)
#: proposes a checkpoint at the stable frontier (``mesh.driver`` invariant 10), if the
#: frontier moved. A minute: memory above the frontier is a minute of sales plus the
#: time the slowest live node takes to report; one ``ck`` envelope a minute is ~0.5 M
#: a year, against the store's millions of sales.
CHECKPOINT_EVERY_MS: Final = 60_000
#: How far behind its wall clock a node sets the clock floor its summaries carry
#: (``Replica.clock_floor``, docs/architecture.md "Bounded history"): the floor promises
#: every envelope it signs later has an HLC above it. Without a restart its HLC keeps
#: the promise whatever the wall clock does; across a restart (the HLC rebuilt from the
#: ledger may be lower) it holds as long as the wall clock was not set back by more than
#: this. Five seconds: NTP slews far less; the price is only that the cut trails an idle
#: node's clock by this much.
CLOCK_FLOOR_MARGIN_MS: Final = 5_000
#: Roles whose ledger keeps only a bounded tail beyond the checkpoints (docs/architecture.md,
#: "Bounded history"): registers, on 2-4 GB hardware. Edges and the cloud keep the whole
#: archive: the audit trail stays complete there, and they serve what a register pruned.
LEDGER_PRUNE_ROLES: Final = frozenset({"register"})
#: Folded checkpoints of tail a pruning ledger keeps: at a snapshot, the rows within the
#: frontier of the checkpoint this many folds (seen at snapshots) before the newest are
#: deleted. Two: at least two checkpoint periods of history stay for peers to fetch.
LEDGER_TAIL_CHECKPOINTS: Final = 2
#: Envelopes read per page when streaming the ledger (rebuild, verify, catch-up).
LEDGER_PAGE: Final = 2_000

# --- sync -------------------------------------------------------------------------
#: Largest sync message accepted from a peer. A page of 2,000 sale envelopes is ~0.8 MB;
#: catalog envelopes can reach MAX_ENVELOPE_BYTES each, so batches are cut by bytes too.
MAX_MESSAGE_BYTES: Final = 4 * 1024 * 1024
#: Catch-up from a checkpoint (mesh.core.catchup): a node asks a peer offering a
#: checkpoint state for it when it holds this many envelopes fewer than its frontier
#: (below that, fetching the envelopes costs about as much as the state);
CATCHUP_MIN_BEHIND: Final = 2 * LEDGER_PAGE
#: after asking, it waits this long before asking again (the state, or the request, may
#: be lost on the way);
CATCHUP_RETRY_MS: Final = 1_000
#: and a peer serves one session at most this many (each is up to a message).
CATCHUP_STATES_PER_SESSION: Final = 3
#: A node that holds nothing yet waits this long from its first session for a peer to
#: offer a checkpoint state before it asks for everything from seq 1.
CATCHUP_WAIT_MS: Final = 5_000
#: A verified state waits for storage to be idle (no append in flight) this many
#: batches at most, then it is dropped (the full fetch goes on).
CATCHUP_INSTALL_TRIES: Final = 1_000
#: The checkpointer rebuilds its checkpoint state from its ledger after a restart (one
#: replay of every envelope within the frontier, synchronously, at the first checkpoint
#: tick) only while the store holds at most this many envelopes: a bigger archive would
#: stall the event loop for seconds, so it serves no state until then (new tills fetch
#: from seq 1, as before catch-up existed). Keeping the state beside the snapshot would
#: lift this (docs/architecture.md, "Catch-up from a checkpoint").
CATCHUP_REBUILD_MAX: Final = 100_000
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
#: rejoining), it leaves the announcement to that peer (mesh.core.sync invariant 8). A
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
#: Origins whose envelopes we refused for want of a certificate, remembered (with the
#: peers that sent them) so they are asked for again once the certificate arrives: a
#: register that joins while the cloud is connected; a store has tens of those at once.
MAX_AWAITED_CERTS: Final = 64
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
#: Seconds between two log lines about HTTP requests that failed by the client's doing
#: (malformed, abandoned mid-body; ``mesh.http.httpfaults``): anyone who can reach the port
#: can cause them, so each is counted but at most one line a minute reaches the log.
HTTP_FAULT_LOG_INTERVAL_S: Final = 60.0
#: Stock-change events buffered per live-stream subscriber before it is dropped.
SUBSCRIBER_QUEUE: Final = 1_000
#: How often the node checks whether a snapshot is due.
SNAPSHOT_CHECK_S: Final = 5.0
#: After a failed write, a rebuild that fails too (storage unreachable: a database
#: restarting) is tried again this often; local commands are refused meanwhile.
RECOVER_RETRY_MS: Final = 1000
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
#: Origins a WAN session's codec keeps the last envelope hash of, per direction (to
#: elide the next one's ``prev``): one per node of the store, as MAX_ORIGINS. Only
#: origins holding a certificate here enter the receiving table, so a peer that makes
#: up origin strings cannot grow it (each entry costs ~200 B).
MAX_WAN_ORIGINS: Final = MAX_ORIGINS
#: Origins without a certificate (yet) whose last hash a WAN session's decoder keeps,
#: latest first, so their next frame's elided ``prev`` can be restored once the
#: certificate arrives; a handful covers the registers that join at one time.
MAX_WAN_STRAY_ORIGINS: Final = 64
#: A LAN session that negotiated the session codec (``z1``, mesh.net.transport) runs it
#: at deflate level 1 with a 4 KiB window and memLevel 5: a sale's envelope then
#: crosses in ~108 B instead of ~450 (level 9 and a 32 KiB window save only ~8 B more
#: per envelope, at more CPU), and the compressor holds ~32 KiB per session instead of
#: ~384 KiB, so MAX_PEERS sessions stay within ~16 MiB.
LAN_ZLIB_LEVEL: Final = 1
LAN_ZLIB_WBITS: Final = 12
LAN_ZLIB_MEM_LEVEL: Final = 5

# --- API credentials and staff (mesh.core.auth) ------------------------------------------
#: Longest a device credential may be issued for: a year, like a node certificate; a
#: stolen register's credential is cut off by revocation, not by waiting.
MAX_DEVICE_TTL_MS: Final = 366 * 24 * 3600 * 1000
#: Device credentials whose signature check is remembered per node: a store has tens of
#: tills and integrations; the bound stops a flood of forged tokens from growing memory.
DEVICE_CACHE_MAX: Final = 4096
#: Largest device credential text accepted in an Authorization header (~300 B normal).
MAX_TOKEN_LEN: Final = 2048
#: Most staff in one roster: a big store has a few hundred; each entry is ~250 B, so a
#: full roster (~250 KB) still fits one sync message (MAX_MESSAGE_BYTES).
MAX_STAFF: Final = 1000
#: How long a roster stays valid with no newer one from the edge (the "time offline"
#: after which tills stop accepting PINs). The edge re-signs it at half this age.
ROSTER_VALIDITY_MS: Final = 7 * 24 * 3600 * 1000

# --- certificate renewal (mesh.driver, docs/security.md "Renewal") ----------------
#: How long a node certificate the edge issues is valid (storemesh and TLS alike). A
#: year: short enough that a key retired without revocation stops working, long enough
#: that renewal is a non-event. ``storemesh node --cert-validity`` changes it per store.
CERT_VALIDITY_MS: Final = 365 * 24 * 3600 * 1000
#: The edge renews a certificate once less than 1/CERT_RENEW_FRACTION of the store's
#: validity remains (four months of a year): a till that is away, or offline, for
#: anything short of that still comes back to a renewed certificate in time.
CERT_RENEW_FRACTION: Final = 3
#: How often the edge looks for certificates due for renewal (also at every new
#: session); at most a tenth of the validity, so short test validities work too.
CERT_RENEW_CHECK_MS: Final = 3600 * 1000
#: Largest TLS certificate (PEM) accepted in a certificate message (~900 B normal).
MAX_TLS_PEM_BYTES: Final = 8192
#: How often the edge looks at auth.json (CLI changes) and at the roster's age.
AUTH_RELOAD_S: Final = 1.0
#: scrypt cost of a PIN verifier (n=2**14, r=8, p=1: ~16 MB, ~50 ms here): slow enough
#: that a stolen roster costs an attacker ~50 ms per guessed PIN per staff member.
PIN_SCRYPT_N: Final = 1 << 14
#: Consecutive wrong PINs before a staff member is locked out on a node (NIST 800-63B
#: 5.2.2: at most 100). A 4-digit PIN has 10k values: 10 tries is a 0.1% guess chance.
PIN_MAX_FAILURES: Final = 10
#: The same bound for the whole store: failures are counted on each node (a till checks
#: PINs with every link down), so a node allows PIN_STORE_MAX_FAILURES // nodes of them,
#: at most PIN_MAX_FAILURES and at least PIN_FREE_FAILURES (``mesh.core.auth.pin_limit``): a
#: guesser walking from till to till gets at most 100 tries in a store of up to 33 nodes.
PIN_STORE_MAX_FAILURES: Final = 100
#: Free wrong PINs before delays start, then the delay doubles from PIN_DELAY_MS up to
#: PIN_DELAY_MAX_MS (typos are free; guessing is slow).
PIN_FREE_FAILURES: Final = 3
PIN_DELAY_MS: Final = 1000
PIN_DELAY_MAX_MS: Final = 60_000
#: A staff session (a login at a till) lasts one long shift.
STAFF_SESSION_MS: Final = 12 * 3600 * 1000
#: A cashier's return of more units than this needs a supervisor's approval.
RETURN_APPROVAL_QTY: Final = 5
#: Refused requests tolerated per source address before it is throttled: a burst of
#: AUTH_BURST, refilled at AUTH_REFILL_PER_S. A till with a bad clock or an expired
#: token fails a few times a second at most.
AUTH_BURST: Final = 20
AUTH_REFILL_PER_S: Final = 5.0
#: Source addresses whose refusals are tracked (least recently refused evicted first):
#: a LAN has a few hundred hosts; 4096 entries cost ~400 KB.
AUTH_SOURCES_MAX: Final = 4096

# --- HQ login at the cloud (mesh.cloud.hq) ----------------------------------------------------
#: Shortest HQ password: HQ accounts see every store, and unlike a PIN a password can be
#: guessed offline from a stolen hq_users.json (scrypt slows that, length stops it).
HQ_PASSWORD_MIN: Final = 12
#: Most HQ accounts, and most live HQ sessions (the oldest is evicted): a head office
#: has tens of people; the bounds stop a flood of logins from growing memory.
HQ_USERS_MAX: Final = 1000
HQ_SESSIONS_MAX: Final = 1000
#: An HQ session ends after 30 minutes without a request (the dashboard polls every
#: 1.5 s, so an open page keeps it) and 12 hours after login at the latest.
HQ_IDLE_S: Final = 30 * 60
HQ_SESSION_S: Final = 12 * 3600
#: HQ sessions live in ROOT/hq_sessions.sqlite, shared by every cloud process on that
#: root and kept over a restart. A process re-reads a session it holds at most this old,
#: so a logout or an ended account at another process takes effect here within it.
HQ_SESSION_RECHECK_S: Final = 1.0
#: How stale a session's last-seen time may be on disk (one write a minute per session,
#: not one per dashboard poll); the idle timeout is kept to within it.
HQ_SESSION_TOUCH_S: Final = 60.0

# --- sensors, reconciliation, telemetry (issue 14: mesh.core.sensors, mesh.core.reconcile,
# mesh.core.reviews, mesh.core.telemetry, mesh.http.sensor_routes) ---------------------------------
#: Most readings in one POST /v1/sensors/readings. A store's scales and readers report
#: every few seconds; a gateway batching a second of 200 sensors stays under it, and
#: 256 readings of ~150 B fit the API's 64 KiB body bound.
SENSOR_MAX_BATCH: Final = 256
#: How far ahead of the edge's clock a reading's time may be (ms). Sensor gateways sync
#: their clocks with the edge (NTP); two seconds covers jitter, and a reading from the
#: future would otherwise outrank every real one in recency.
SENSOR_MAX_FUTURE_MS: Final = 2_000
#: How old a reading may be when it arrives (ms): an hour of a gateway's offline buffer.
#: Older ones say nothing about the shelf now.
SENSOR_MAX_AGE_MS: Final = 3_600_000
#: Readings kept per sensor at the edge (inputs, not replicated): enough for the drift
#: check's history (rules ``drift_persist``) with room to spare.
SENSOR_READINGS_KEPT: Final = 16
#: Most sensors the edge keeps readings for (its registry may hold more, all revoked).
SENSOR_MAX_SENSORS: Final = 20_000
#: Most SKUs one sensor maps (an RFID reader covers a zone of a few shelves).
SENSOR_MAX_SKUS: Final = 64
#: Reading ids remembered per sensor to drop replays of a batch (a gateway retrying).
SENSOR_SEEN_IDS: Final = 256
#: Largest value of a reading: grams on a shelf scale (1 t), or a count.
SENSOR_MAX_VALUE: Final = 1_000_000.0
#: Reading ids (evidence) recorded in one adjustment or review item.
REVIEW_MAX_EVIDENCE: Final = 32
#: How long a resolved review item is kept (ms, after its first resolution) before every
#: replica retires it (mesh.core.reviews invariant 6). A month covers the audit questions
#: staff ask of the review screen; the ledger keeps the envelopes for longer questions.
REVIEW_RETAIN_MS: Final = 30 * 86_400_000
#: Seconds between two reconciliation runs at an edge (also POST /v1/sensors/reconcile).
RECONCILE_INTERVAL_S: Final = 30.0
#: Most review items or adjustments one reconciliation run may create: a miswired
#: sensor must not flood the review queue or the ledger in one go.
RECONCILE_MAX_ACTIONS: Final = 200
#: Telemetry window: five minutes keeps a cooler's curve while cutting 300 readings a
#: device to one summary (docs/benchmarks.md, "Edge telemetry").
TELEMETRY_WINDOW_MS: Final = 300_000
#: (device, metric) series the edge aggregates; beyond, readings are dropped and counted.
TELEMETRY_MAX_SERIES: Final = 20_000
#: Summaries (or alerts) in one ``tm`` op: ~70 B each, so an op stays far below
#: MAX_ENVELOPE_BYTES.
TELEMETRY_MAX_PER_OP: Final = 1_000
#: Most telemetry readings in one POST /v1/telemetry (as SENSOR_MAX_BATCH).
TELEMETRY_MAX_BATCH: Final = 512
#: Seconds between two telemetry flushes at the edge (closed windows go out then;
#: alerts go out at once).
TELEMETRY_FLUSH_S: Final = 30.0

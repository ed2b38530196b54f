"""The one effect interpreter around the sync core, written against the ports only.

The real node (``mesh.node.node``, over asyncio/aiohttp/SQLite) and the simulator
(``mesh.sim``, over simulated ports) both run this class: every behaviour that decides
what a node does with the core's effects lives here, once (aioquic's
``asyncio/protocol.py`` pattern: carry out the effects, then re-arm one timer).

Inputs: ``execute`` (a local command), ``session_up`` / ``message`` / ``session_down``
(from the transport), the clock's callbacks. Outputs: the ack of a command (``done``),
sends with a priority, ledger appends, reads, evidence, trust-store saves, snapshots.

Invariants:
 1. A local command is acknowledged (``done``) only once its envelope is durable, and
    pushed to peers only then (``SyncCore.durable``). A replay of a command whose
    original is still being written is acknowledged only when the original is durable,
    and fails if the original fails (``mesh.durable`` invariant 5).
 2. Messages are queued by ``message`` and handed to the core once per batch boundary
    (``Clock.call_soon``) in one ``SyncCore.receive_many`` call, in arrival order per
    session; a closed session's queued messages are dropped (a next session of the same
    peer must not get them).
 3. The envelopes of all ``Persist`` effects of one batch of effects go to storage as ONE
    append, in effect order (= apply order: ledger invariant 1).
 4. After a failed write the replica is rebuilt from storage (``recover``) before any
    further command, and the core's view of what is stored is reset with it.
 5. Storage completions that arrive together (one group commit) are taken in one
    batch boundary, and the envelopes they made durable reach the core in one
    ``SyncCore.durable`` call (one push per peer), then the ``durable`` listeners, in
    apply order.
 6. One timer is armed at a time, for the core's next deadline (never further than one
    sync interval away: deadlines are wall-clock times, and a wall clock set back must
    not stall the node). When it fires, ``SyncCore.on_timer`` runs.
 7. ``applied`` listeners see a local change once it is durable here (when acknowledged),
    a peer's change once it is applied here (durable at its origin already).
 8. Certificates are renewed by the store key's holder (``Identity.issuer``: the edge)
    before they expire (``mesh.core.identity.renewal_due``): its own, and every peer's with a
    live session, at every new session and every ``renew_interval_ms``. A renewed
    certificate goes to its node at once with its TLS certificate (``SyncCore.renewed``)
    and to every other peer before our next envelopes; the node saves the TLS
    certificate (``Identity.write_tls``, on the worker) and the ``tls_listeners`` reload
    it. Revoked nodes are never renewed.
 9. A second session with a peer that already has one (``admit_session``) is decided
    here, for the node and the simulator alike: dialled by the same end as the one
    held, it replaces it (a node dials only a peer it holds no session with, so that
    end has lost the old one: a restart racing its stale session at the peer); dialled
    by the other end (both dialled at once, or the peer restarted while we held a
    session we dialled), the session dialled by the smaller node id is kept, which both
    ends decide alike, so they never both drop theirs. A stale session kept that way
    ends at the transport's heartbeat, and the next dial succeeds.
 10. A ``Rebuild`` (a revocation leaves out envelopes the replica applied) is carried
    out after the ``Persist`` of the same batch is queued: the replica is rebuilt from
    storage plus what is queued for it, without the left-out envelopes
    (``DurableReplica.exclude_revoked``), and the core takes it. If storage cannot be
    read, it is tried again every ``config.RECOVER_RETRY_MS``.
 11. On the store's checkpointer (``DurableReplica.checkpointer``, named by the trust
    store) a checkpoint is proposed every ``checkpoint_every_ms`` (the clock port's
    timer, so the node and the simulator run it alike) at the stable frontier of the
    enrolled, unrevoked nodes (``DurableReplica.maybe_checkpoint``), if it moved. Its
    ``ck`` envelope goes the way of a local command's: durable first, then pushed
    (invariant 1). Nothing is proposed while storage is failing or our certificate
    has expired.
 12. Catch-up from a checkpoint (``mesh.core.catchup``): the checkpointer offers the
    checkpoint state of its newest ck (``SyncCore.state_offer``); a verified state a
    peer sent (``InstallState``) is installed only when storage is idle, durably
    (``DurableReplica.install_state``), and the core then takes the installed replica;
    after ``CATCHUP_INSTALL_TRIES`` busy tries, or when it no longer fits, it is
    dropped and the full fetch goes on.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from functools import partial
from typing import Any

from mesh import config
from mesh.core.envelope import Envelope
from mesh.core.identity import renewal_due
from mesh.core.replica import CommandResult, Replica
from mesh.core.sync import (
    Alert,
    Effect,
    EndSession,
    Fetch,
    InstallState,
    InstallTls,
    Persist,
    Rebuild,
    Send,
    SyncCore,
    TrustChanged,
)
from mesh.durable import DurableReplica
from mesh.errors import CommandError, EnvelopeError, LedgerError, NodeCertificateExpired
from mesh.ports import Cancel, Clock, Identity, Storage, Transport, Worker

__all__ = ["Done", "Driver", "Faults", "keep_new_session"]

log = logging.getLogger(__name__)

#: ``done(result, error)``: a command's acknowledgement (error None) or its failure.
Done = Callable[[CommandResult, BaseException | None], None]


def keep_new_session(me: str, peer: str, *, outbound: bool, old_outbound: bool) -> bool:
    """Invariant 9: whether a new session with ``peer`` replaces the one held (True)
    or is closed (False). ``outbound``: we dialled the new one; ``old_outbound``: we
    dialled the one held."""
    if outbound == old_outbound:
        return True  # the same end dialled again: it has lost the old one
    dialer = me if outbound else peer
    return dialer == min(me, peer)


@dataclass(slots=True)
class Faults:
    """Deliberate breakage, switched on only inside tests to show that the simulator
    runs each of these paths (a test that cannot fail is worse than none)."""

    unbatched_receive: bool = False  #: hand each message to the core on its own
    ack_before_durable: bool = False  #: acknowledge a command before its fsync
    no_recover: bool = False  #: keep memory after a failed write
    flat_priority: bool = False  #: send everything at HIGH priority
    empty_snapshot: bool = False  #: snapshot a fresh replica instead of ours


class Driver:
    """One node's effect interpreter over the ports."""

    def __init__(self, durable: DurableReplica[Any], core: SyncCore, transport: Transport,
                 clock: Clock, worker: Worker, identity: Identity) -> None:
        self.durable = durable
        self.core = core
        self.transport = transport
        self.clock = clock
        self.worker = worker
        self.identity = identity
        self.faults = Faults()
        #: Called with every batch of envelopes that became durable (local and remote),
        #: in apply order (analytics; invariant 5).
        self.durable_listeners: list[Callable[[list[Envelope]], None]] = []
        #: Called with envelopes whose change is now visible (invariant 7) and whether
        #: they are local (the live stream; the simulator's checker).
        self.applied_listeners: list[Callable[[list[Envelope], bool], None]] = []
        #: Called with a local envelope as soon as a command signed it (not yet durable).
        self.signed_listeners: list[Callable[[Envelope], None]] = []
        #: Called after ``recover`` rebuilt the replica from storage.
        self.recovered_listeners: list[Callable[[], None]] = []
        #: Called with the checkpoint state's frontier once one is installed (inv. 12).
        self.state_listeners: list[Callable[[dict[str, int]], None]] = []
        #: Called (driver thread) once a renewed TLS certificate of ours is saved: the
        #: node reloads its TLS contexts (invariant 8).
        self.tls_listeners: list[Callable[[], None]] = []
        #: Called (driver thread) after a change of the trust store was queued for
        #: storage: the cloud's analytics learn revocation bounds (``mesh.cloud.analytics``).
        self.trust_listeners: list[Callable[[], None]] = []
        #: Certificates this node renewed as the store key's holder (invariant 8).
        self.renewed = 0
        self.alerts: list[Alert] = []
        self.last_seen: dict[str, int] = {}
        #: second sessions with a peer closed / replacing the one held (invariant 9)
        self.duplicate_sessions = 0
        self.replaced_sessions = 0
        self.closed = False
        self._inbox: list[tuple[bytes, str]] = []  # (data, peer) since the last drain
        self._durable_batch: list[Envelope] = []
        self._done: deque[tuple[Callable[[Future[Any]], None], Future[Any]]] = deque()
        self._timer: Cancel | None = None
        self._timer_at = 0.0
        self._timer_deadline = 0  # the wall-clock time the armed timer serves
        self._snapshot_timer: Cancel | None = None
        self._renew_timer: Cancel | None = None
        self._checkpoint_timer: Cancel | None = None
        #: How often the checkpointer proposes a checkpoint (invariant 11).
        self.checkpoint_every_ms = config.CHECKPOINT_EVERY_MS
        #: Checkpoints this node proposed (made durable or in flight).
        self.checkpoints_proposed = 0
        self._recover_timer: Cancel | None = None
        self._recovering = False  # a rebuild failed: retried on _recover_timer
        self._exclude_timer: Cancel | None = None  # a Rebuild that failed (invariant 10)
        #: a verified checkpoint state waiting for storage to be idle (invariant 12),
        #: and how many times it found storage busy
        self._state: InstallState | None = None
        self._state_tries = 0

    @property
    def storage(self) -> Storage:
        return self.durable.ledger  # type: ignore[no-any-return]

    @property
    def replica(self) -> Replica:
        return self.durable.replica

    def start(self) -> None:
        """Arm the periodic snapshot, checkpoint and certificate-renewal checks."""
        self._arm_snapshot()
        if self.is_checkpointer:
            self._arm_checkpoint()
        if self.identity.issuer is not None:
            self.renew_certificates()
            self._arm_renewal()

    def close(self) -> None:
        """Stop reacting: later callbacks (durable writes, reads, timers) are ignored."""
        self.closed = True
        self._inbox = []
        for t in (self._timer, self._snapshot_timer, self._renew_timer, self._recover_timer,
                  self._exclude_timer, self._checkpoint_timer):
            if t is not None:
                t.cancel()
        self._exclude_timer = None
        self._timer = self._snapshot_timer = self._renew_timer = self._recover_timer = None
        self._checkpoint_timer = None

    def _when(self, fut: Future[Any], fn: Callable[[Future[Any]], None]) -> None:
        """Call ``fn(fut)`` on the driver's thread once ``fut`` is done (storage futures
        may complete on a writer thread). Completions that arrive together (one group
        commit) are taken in one batch boundary (invariant 5)."""
        done = self._done

        def landed(f: Future[Any]) -> None:
            done.append((fn, f))  # deque: atomic, from any thread
            if len(done) == 1:
                self.clock.call_soon(self._run_done)
        fut.add_done_callback(landed)

    def _run_done(self) -> None:
        done = self._done
        while done:
            fn, f = done.popleft()
            fn(f)
        self._flush_durable()

    # --- local commands -----------------------------------------------------------------

    def execute(self, fn: Callable[[Replica], CommandResult], done: Done) -> CommandResult:
        """Run a local command now; ``done`` once it is durable (invariant 1). Raises
        ``CommandError`` for a refused command, ``NodeCertificateExpired`` once our own
        certificate has expired (nothing is written then)."""
        if self.storage.failed is not None or self._recovering:
            self.recover()
        if self._recovering:
            raise LedgerError("this node cannot read its storage (being recovered): "
                              "nothing was recorded; retry with the same txn_id")
        own = self.identity.trust.certificate(self.identity.node_id)
        if own is not None and self.clock.realtime_ms() > own.not_after:
            raise NodeCertificateExpired(
                f"this node's certificate expired at {own.not_after} ms, so no peer would "
                "accept what it records: nothing was recorded. Join the store again with a "
                "new token (storemesh token create on the edge, then storemesh node --join)")
        result, fut = self.durable.execute(fn)
        return self._track(result, fut, done)

    def _own_certificate_expired(self) -> bool:
        own = self.identity.trust.certificate(self.identity.node_id)
        return own is not None and self.clock.realtime_ms() > own.not_after

    def _track(self, result: CommandResult, fut: Future[int], done: Done) -> CommandResult:
        """Acknowledge a local command's result once durable, then push (invariant 1)."""
        env = result.envelope
        if env is None:
            self._when(fut, lambda f: done(result, f.exception()))
            return result
        for listener in self.signed_listeners:
            listener(env)
        if self.faults.ack_before_durable:
            done(result, None)
            done = _ignore
        self._when(fut, partial(self._local_written, result, done))
        return result

    def _local_written(self, result: CommandResult, done: Done, fut: Future[int]) -> None:
        if self.closed:
            return
        exc = fut.exception()
        if exc is not None:
            # Memory holds a change the disk does not: drop it now, not at the next
            # command, so no reader sees it (invariant 4).
            self.recover()
            done(result, exc)
            return
        assert result.envelope is not None
        envs = [result.envelope]
        for listener in self.applied_listeners:
            listener(envs, True)
        self._became_durable(envs)
        done(result, None)

    def recover(self) -> None:
        """After a failed write: rebuild the replica from storage (invariant 4). If the
        storage cannot be read either (a database restarting), the replica is left as
        it was, local commands are refused (``LedgerError``), and recovery is tried
        again every ``config.RECOVER_RETRY_MS``."""
        if self.faults.no_recover or (self.storage.failed is None
                                      and self._recover_timer is None
                                      and not self._recovering):
            return  # already recovered (several failed futures report one failure)
        try:
            self.durable.recover()
        except LedgerError as exc:
            self._recovering = True
            log.warning("storage still failing (%s): the replica is rebuilt once it "
                        "answers; local commands are refused meanwhile", exc)
            if self._recover_timer is None:
                self._recover_timer = self.clock.call_at(
                    self.clock.monotonic_ms() + config.RECOVER_RETRY_MS, self._recover_tick)
            return
        self._recovering = False
        self.core.replica = self.durable.replica
        self.core.stored = self.durable.replica.vv.copy()
        self.core.state_offer = self.durable.state_offer  # (dropped: built afresh later)
        for listener in self.recovered_listeners:
            listener()

    def _recover_tick(self) -> None:
        self._recover_timer = None
        if not self.closed and self._recovering:
            self.recover()

    # --- sessions and messages --------------------------------------------------------------

    def session_up(self, peer: str, *, wan: bool) -> None:
        now = self.clock.realtime_ms()
        self.last_seen[peer] = now
        self.carry_out(self.core.peer_up(peer, now, wan=wan))
        if self.identity.issuer is not None:
            self.renew_certificates([peer])

    def admit_session(self, peer: str, *, outbound: bool, old_outbound: bool | None) -> bool:
        """A new authenticated session with ``peer`` is ready (``old_outbound``: who
        dialled the one we hold, None: none). False: close the new one. True: run it;
        if one was held, it has been ended here (``session_down``) and the caller closes
        its connection (invariant 9)."""
        if old_outbound is None:
            return True
        if not keep_new_session(self.identity.node_id, peer, outbound=outbound,
                                old_outbound=old_outbound):
            self.duplicate_sessions += 1
            return False
        self.replaced_sessions += 1
        self.session_down(peer)
        return True

    def session_down(self, peer: str) -> None:
        # What it queued and the core has not seen dies with it (invariant 2).
        self._inbox = [(d, p) for d, p in self._inbox if p != peer]
        if not self.closed:
            self.carry_out(self.core.peer_down(peer, self.clock.realtime_ms()))

    def message(self, peer: str, data: bytes) -> None:
        """A session received a message: queue it for this batch boundary's drain."""
        if self.closed:
            return
        if self.faults.unbatched_receive:
            self.carry_out(self.core.receive(data, peer, self.clock.realtime_ms()))
            return
        if not self._inbox:
            self.clock.call_soon(self._drain)
        self._inbox.append((data, peer))

    def _drain(self) -> None:
        items, self._inbox = self._inbox, []
        if not items or self.closed:
            return
        now = self.clock.realtime_ms()
        for _, peer in items:
            self.last_seen[peer] = now
        self.carry_out(self.core.receive_many(items, now))

    # --- effects ------------------------------------------------------------------------------

    def carry_out(self, effects: list[Effect]) -> None:
        persist: list[Envelope] = []
        rebuild = False
        for eff in effects:
            if isinstance(eff, Send):
                prio = 0 if self.faults.flat_priority else eff.priority
                self.transport.send(eff.peer, eff.data, prio)
            elif isinstance(eff, Persist):
                persist.extend(eff.envelopes)  # one append for all (invariant 3)
            elif isinstance(eff, Fetch):
                self.worker.run(partial(self.storage.read_origin, eff.origin, eff.first,
                                        eff.last), partial(self._fetched, eff))
            elif isinstance(eff, Alert):
                self._alert(eff)
            elif isinstance(eff, TrustChanged):
                self.trust_changed()
            elif isinstance(eff, EndSession):  # revoked: refused from now on
                self.transport.close(eff.peer, eff.reason)
            elif isinstance(eff, InstallTls):
                self.worker.run(partial(self.identity.write_tls, eff.pem), self._tls_written)
            elif isinstance(eff, Rebuild):
                rebuild = True
            elif isinstance(eff, InstallState):
                self._state, self._state_tries = eff, 0
        if persist:
            fut = self.durable.persist(persist)
            self._when(fut, partial(self._persisted, persist))
            for listener in self.applied_listeners:
                listener(persist, False)
        if rebuild:  # after the persist above is queued (invariant 10)
            self.exclude_revoked()
        if self._state is not None and not persist:
            self.install_state()
        self._rearm()

    def install_state(self) -> None:
        """Install the verified checkpoint state waiting (invariant 12) if storage is
        idle; else it waits for the next batch made durable (bounded tries)."""
        eff = self._state
        if eff is None or self.closed:
            return
        try:
            got = self.durable.install_state(eff.envelope, eff.checkpoint, eff.state)
        except (LedgerError, EnvelopeError) as exc:
            log.warning("checkpoint state not installed: %s", exc)
            got = "stale"
        except Exception:  # not foreseen: the node goes on with the full fetch
            log.exception("checkpoint state not installed")
            got = "stale"
        if got == "busy":
            self._state_tries += 1
            if self._state_tries < config.CATCHUP_INSTALL_TRIES:
                return
        self._state = None
        installed = self.durable.replica if got == "ok" else None
        self.carry_out(self.core.state_installed(installed, self.clock.realtime_ms()))
        if installed is not None:
            for listener in self.state_listeners:
                listener(dict(eff.checkpoint.frontier))

    def exclude_revoked(self) -> None:
        """Rebuild the replica without the envelopes a revocation leaves out (inv. 10)."""
        self._exclude_timer = None
        if self.closed:
            return
        try:
            stats = self.durable.exclude_revoked()
        except LedgerError as exc:
            log.warning("storage unreadable (%s): the revoked envelopes are left out "
                        "once it answers", exc)
            if self._exclude_timer is None:
                self._exclude_timer = self.clock.call_at(
                    self.clock.monotonic_ms() + config.RECOVER_RETRY_MS, self.exclude_revoked)
            return
        self.core.replica_rebuilt(self.durable.replica)
        log.warning("revocation: replica rebuilt without %d envelope(s) of revoked nodes "
                    "above their bounds (kept in the ledger as an archive)", stats.excluded)

    def _persisted(self, envs: list[Envelope], fut: Future[int]) -> None:
        if self.closed:
            return
        if fut.exception() is None:
            self._became_durable(envs)
        else:  # the peers still hold these; anti-entropy brings them back later
            self.recover()

    def _fetched(self, eff: Fetch, fut: Future[list[bytes]]) -> None:
        if self.closed:
            return
        exc = fut.exception()
        raws = [] if exc is not None else fut.result()
        if exc is not None:
            log.warning("ledger read for %s failed: %s", eff.origin, exc)
        self.carry_out(self.core.fetched(eff.peer, eff.origin, eff.first, raws,
                                          self.clock.realtime_ms()))

    def _alert(self, eff: Alert) -> None:
        log.warning("ALERT %s: %s seq %s", eff.kind, eff.origin, eff.seq)
        self.alerts.append(eff)
        if eff.kind != "equivocation":  # (a checkpoint mismatch: two hashes, no evidence)
            return
        self.worker.run(partial(self.storage.add_evidence, eff.origin, eff.seq, eff.first,
                                eff.second), _log_failure("evidence not saved"))

    def trust_changed(self) -> None:
        """New certificates or revocations: persist them (peers learn via the core),
        through storage, ahead of every append queued after (``mesh.durable``
        invariant 6)."""
        self.durable.save_trust()
        for listener in self.trust_listeners:
            try:
                listener()
            except Exception:
                log.exception("trust listener failed")

    def _became_durable(self, envs: list[Envelope]) -> None:
        self._durable_batch.extend(envs)  # flushed at the end of this _run_done

    def _flush_durable(self) -> None:
        batch, self._durable_batch = self._durable_batch, []
        if not batch or self.closed:
            return
        self.carry_out(self.core.durable(batch, self.clock.realtime_ms()))
        for listener in self.durable_listeners:
            try:
                listener(batch)
            except Exception:
                log.exception("durable-envelope listener failed")
        if self._state is not None:
            self.install_state()

    def _tls_written(self, fut: Future[bool]) -> None:
        exc = fut.exception()
        if exc is not None:
            self.core.stats["tls_refused"] = self.core.stats.get("tls_refused", 0) + 1
            log.warning("renewed TLS certificate not installed: %s", exc)
        elif fut.result() and not self.closed:
            for listener in self.tls_listeners:
                listener()

    # --- certificate renewal (invariant 8) -------------------------------------------------

    @property
    def renew_interval_ms(self) -> int:
        issuer = self.identity.issuer
        validity = config.CERT_VALIDITY_MS if issuer is None else issuer.validity_ms
        return max(1000, min(config.CERT_RENEW_CHECK_MS, validity // 10))

    def _arm_renewal(self) -> None:
        at = self.clock.monotonic_ms() + self.renew_interval_ms
        self._renew_timer = self.clock.call_at(at, self._renew_tick)

    def _renew_tick(self) -> None:
        if self.closed:
            return
        self.renew_certificates()
        self._arm_renewal()

    def renew_certificates(self, nodes: list[str] | None = None) -> int:
        """As the store key's holder: renew the certificates of ``nodes`` (default: this
        node and every peer with a live session) that are due; returns how many."""
        issuer = self.identity.issuer
        if issuer is None or self.closed:
            return 0
        trust = self.identity.trust
        me = self.identity.node_id
        now = self.clock.realtime_ms()
        targets = nodes if nodes is not None else [me, *self.core.ready_peers()]
        effects: list[Effect] = []
        n = 0
        for node_id in targets:
            cert = trust.certificate(node_id)
            if (cert is None or trust.is_revoked(node_id)
                    or not renewal_due(cert, now, issuer.validity_ms)):
                continue
            new, pem = issuer.renew(cert, now)
            effects.extend(self.core.renewed(new, pem))
            n += 1
            log.info("certificate of %s renewed until %d", node_id, new.not_after)
            if node_id == me and pem is not None:
                effects.append(InstallTls(pem))
        self.renewed += n
        if effects:
            self.carry_out(effects)
        return n

    # --- timers -------------------------------------------------------------------------------

    def _rearm(self) -> None:
        """Arm one timer for the core's next deadline (invariant 6)."""
        nxt = self.core.next_timer()
        if nxt is None or self.closed:
            return
        if self._timer is not None and nxt >= self._timer_deadline:
            return  # the armed one comes first (the common case: no clock reads)
        now = self.clock.realtime_ms()
        delay = min(max(0, nxt - now), config.SYNC_INTERVAL_MS)
        at = self.clock.monotonic_ms() + delay
        if self._timer is not None:
            if self._timer_at <= at:
                return  # the armed one comes first; it re-arms when it fires
            self._timer.cancel()
        self._timer_at = at
        self._timer_deadline = now + delay
        self._timer = self.clock.call_at(at, self._fire)

    def _fire(self) -> None:
        self._timer = None
        if not self.closed:
            self.carry_out(self.core.on_timer(self.clock.realtime_ms()))

    # --- checkpoints (invariant 11) -----------------------------------------------------------

    @property
    def is_checkpointer(self) -> bool:
        return self.durable.checkpointer == self.identity.node_id

    def _arm_checkpoint(self) -> None:
        at = self.clock.monotonic_ms() + self.checkpoint_every_ms
        self._checkpoint_timer = self.clock.call_at(at, self._checkpoint_tick)

    def _checkpoint_tick(self) -> None:
        self._checkpoint_timer = None
        if self.closed:
            return
        if self.core.state_offer is None and not self._recovering \
                and self.storage.failed is None and self.durable.restore_offer():
            self.core.state_offer = self.durable.state_offer  # (after a restart, inv. 12)
        self.propose_checkpoint()
        self._arm_checkpoint()

    def propose_checkpoint(self) -> CommandResult | None:
        """As the store's checkpointer: propose a checkpoint at the stable frontier of
        the enrolled, unrevoked nodes if it moved (invariant 11); None if not."""
        if (not self.is_checkpointer or self.closed or self._recovering
                or self.storage.failed is not None or self._own_certificate_expired()):
            return None
        trust = self.identity.trust
        enrolled = [c.node_id for c in trust.certificates() if not trust.is_revoked(c.node_id)]
        try:
            got = self.durable.maybe_checkpoint(self.clock.realtime_ms(), enrolled)
        except CommandError as exc:  # not a role that checkpoints: a configuration error
            log.warning("checkpoint not proposed: %s", exc)
            return None
        if got is None:
            return None
        self.core.state_offer = self.durable.state_offer  # served once durable (inv. 12)
        self.checkpoints_proposed += 1
        return self._track(*got, _checkpoint_written)

    # --- snapshots ----------------------------------------------------------------------------

    def _arm_snapshot(self) -> None:
        at = self.clock.monotonic_ms() + config.SNAPSHOT_CHECK_S * 1000
        self._snapshot_timer = self.clock.call_at(at, self._snapshot_tick)

    def _snapshot_tick(self) -> None:
        if self.closed:
            return
        self.maybe_snapshot()
        self._arm_snapshot()

    def maybe_snapshot(self) -> bool:
        """Take a snapshot if one is due (``DurableReplica.snapshot_due``): the state is
        captured here, on the driver's thread, and written by the worker."""
        if self.storage.failed is not None or not self.durable.snapshot_due():
            return False
        upto, state = self.durable.take_snapshot()
        if self.faults.empty_snapshot:
            state = self.durable._fresh_replica().snapshot()
        plan = self.durable.prune_plan()  # a register's ledger, once the snapshot is saved
        self.worker.run(partial(self.durable.save_snapshot_and_prune, upto, state, plan),
                        _log_failure("snapshot skipped, retried later"))
        return True


def _ignore(result: CommandResult, exc: BaseException | None) -> None:
    pass


def _checkpoint_written(result: CommandResult, exc: BaseException | None) -> None:
    if exc is not None:  # memory was rebuilt from disk (invariant 4); the next tick retries
        log.info("checkpoint seq %s not written: %s", result.seq, exc)


def _log_failure(what: str) -> Callable[[Future[Any]], None]:
    def done(fut: Future[Any]) -> None:
        exc = fut.exception()
        if isinstance(exc, LedgerError):
            log.info("%s: %s", what, exc)
        elif exc is not None:
            log.error("%s: %r", what, exc)
    return done

"""Group commit on one writer thread: the queue discipline both ledgers share.

``Ledger`` (SQLite, a node's disk) and ``PgLedger`` (the cloud's PostgreSQL) differ in
how a batch is written; what is queued, in which order it runs and how a failure
spreads is the same, and lives here (ledger invariants 2, 4 and 6):

* appends queued while a commit runs are committed together, up to
  ``config.LEDGER_MAX_BATCH`` rows a batch (in one transaction of the subclass's
  ``_write``);
* a ``call`` (a file that later rows depend on) and a ``job`` (one transaction of the
  subclass's own, a snapshot say) run after every append queued before them and before
  any queued after them;
* once a write failed (``_failed``), every append queued behind it fails with the same
  error until ``reset_failure``, which first fails what is still queued before it.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Any, Final

from mesh import config
from mesh.core.envelope import Envelope
from mesh.errors import LedgerError

__all__ = ["Append", "GroupCommitWriter"]

_STOP: Final = object()
_RESET: Final = object()
_CALL: Final = object()
_JOB: Final = object()
#: One queued append: its envelopes, its future, and whether it must be fsynced.
Append = tuple[list[Envelope], "Future[int]", bool]


class GroupCommitWriter:
    """The writer thread and its queue; a subclass writes (``_write``, ``_run_job``)."""

    last_id: int

    def _start_writer(self, name: str) -> None:
        """Call once the subclass's connections are open and ``last_id`` is known."""
        self._queue: queue.Queue[object] = queue.Queue(maxsize=config.LEDGER_MAX_QUEUE)
        self._failed: BaseException | None = None
        #: The error of the newest write if it failed, until a write succeeds: unlike
        #: ``failed`` it survives ``reset_failure`` (health reports a disk still full).
        self.last_error: LedgerError | None = None
        self._closed = False
        self.batches = 0  # group commits done (for benchmarks and metrics)
        self._writer = threading.Thread(target=self._run, name=name, daemon=True)
        self._writer.start()

    # --- what a subclass writes ----------------------------------------------------------

    def _write(self, envs: list[Envelope], sync: bool) -> int:
        """Write ``envs`` (not empty) in one transaction, fsynced if ``sync``; return
        the last row id. On failure roll back and raise ``LedgerError`` (``StorageFull``
        for a full disk)."""
        raise NotImplementedError

    def _run_job(self, fn: Any, fut: Future[int]) -> None:
        """Run ``fn`` (the subclass's kind of transaction) and resolve ``fut``."""
        raise NotImplementedError

    def _close_connections(self) -> None:
        raise NotImplementedError

    # --- queueing --------------------------------------------------------------------

    def append(self, envs: Sequence[Envelope], *, sync: bool = True) -> Future[int]:
        """Queue envelopes for the next group commit; the future gives the last row id
        once they are committed (or raises ``StorageFull`` / ``LedgerError``): fsynced
        when ``sync``, otherwise possibly not (invariant 2: peers' envelopes)."""
        fut: Future[int] = Future()
        if self._closed:
            fut.set_exception(LedgerError("ledger is closed"))
        elif self._failed is not None:
            fut.set_exception(self._failed)
        else:
            self._queue.put((list(envs), fut, sync))  # blocks when full: back-pressure
        return fut

    def append_sync(self, envs: Sequence[Envelope]) -> int:
        return self.append(envs).result()

    def call(self, fn: Callable[[], None]) -> Future[int]:
        """Run ``fn`` on the writer thread after every append queued so far and before
        any queued later (invariant 6): a file that rows appended later depend on (the
        trust store) is on disk first. If ``fn`` raises ``OSError``, the ledger fails
        as on a failed write: the appends queued behind it fail too."""
        fut: Future[int] = Future()
        if self._closed:
            fut.set_exception(LedgerError("ledger is closed"))
            return fut
        self._queue.put((_CALL, fn, fut))
        return fut

    def _queue_job(self, fn: Any) -> Future[int]:
        """``fn`` in one transaction of the subclass's (``_run_job``), in queue order."""
        fut: Future[int] = Future()
        self._queue.put((_JOB, fn, fut))
        return fut

    def reset_failure(self) -> None:
        """Accept writes again after a failure. Every append queued before this call
        still fails (it belongs to the state that could not be written); the caller
        then rebuilds its replica from disk."""
        fut: Future[int] = Future()
        self._queue.put((_RESET, fut))
        fut.result()

    @property
    def failed(self) -> BaseException | None:
        return self._failed

    def flush(self) -> None:
        """Wait until everything queued so far is committed (fsynced if it was
        appended with ``sync``; see invariant 2)."""
        self.append([]).result()

    # --- the writer thread -------------------------------------------------------------

    def _run(self) -> None:
        while True:
            item: Any = self._queue.get()
            if item is _STOP:
                return
            batch: list[Append] = []
            rows = 0
            stop = False
            while True:
                if item[0] is _RESET:
                    self._commit(batch)  # fails: queued behind the failure
                    batch, rows = [], 0
                    self._failed = None
                    item[1].set_result(0)
                elif item[0] is _CALL:
                    self._commit(batch)
                    batch, rows = [], 0
                    self._run_call(item[1], item[2])
                elif item[0] is _JOB:
                    self._commit(batch)
                    batch, rows = [], 0
                    self._run_job(item[1], item[2])
                else:
                    batch.append(item)
                    rows += len(item[0])
                if rows >= config.LEDGER_MAX_BATCH:
                    break
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is _STOP:
                    stop = True
                    break
            self._commit(batch)
            if stop:
                return

    def _run_call(self, fn: Callable[[], None], fut: Future[int]) -> None:
        if self._failed is not None:
            fut.set_exception(self._failed)
            return
        try:
            fn()
        except OSError as exc:  # what it had to write first is not on disk: nor is
            err = LedgerError(f"write before the ledger failed: {exc}")  # what follows
            self._failed = self.last_error = err
            fut.set_exception(err)
            return
        fut.set_result(self.last_id)

    def _commit(self, batch: list[Append]) -> None:
        """One group commit: ``batch`` in one transaction, then its futures. Behind a
        failure every append fails with it; a failed write fails the ledger."""
        if not batch:
            return
        if self._failed is not None:
            for _, fut, _ in batch:
                fut.set_exception(self._failed)
            return
        envs = [e for part, _, _ in batch for e in part]
        if not envs:
            for _, fut, _ in batch:
                fut.set_result(self.last_id)
            return
        try:
            last = self._write(envs, any(sync for _, _, sync in batch))
        except LedgerError as err:
            self._failed = self.last_error = err
            for _, fut, _ in batch:
                fut.set_exception(err)
            return
        self.last_id = last
        self.batches += 1
        self.last_error = None
        for _, fut, _ in batch:
            fut.set_result(last)

    # --- lifecycle -------------------------------------------------------------------

    def close(self) -> None:
        """Finish queued writes, stop the writer, close the connections."""
        if self._closed:
            return
        self._closed = True
        self._queue.put(_STOP)
        self._writer.join()
        self._close_connections()

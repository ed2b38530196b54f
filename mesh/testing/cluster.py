"""One harness for storemesh processes: the demo, the tests and the benchmarks start,
wait for, stop and kill ``python -m mesh …`` processes through it (issue 9).

* ``NodeProcess``: one process of ours (a ``storemesh node``, a cloud), its stdout read by
  a thread (so it never blocks on a full pipe, at most ``MAX_STDOUT_LINES`` kept), its
  stderr appended to a log file; ``wait_ready`` awaits its "listening on URL" line and
  reads the node id, role, store and URL from it.
* ``Cluster``: the processes (and other closeables, e.g. proxies) of one run;
  ``kill`` (SIGKILL), ``stop`` (SIGTERM, then SIGABRT so the faulthandler logs every
  thread's stack, then SIGKILL), ``restart`` on the same data and port, and ``close``
  stops everything it ever started. Always by pid: never a process we did not start.
* ``wait_mesh``: until every node has ``len(urls) - 1`` peers up.

Every wait is bounded in time and in count, and a failure (``ClusterError``, an
``AssertionError``, so pytest reports it as a failed test) says what was awaited, for
how long, what was seen and the tail of the process's log.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

__all__ = ["Closeable", "Cluster", "ClusterError", "NodeProcess", "proc_cpu", "wait_mesh"]

#: A node prints its URL after opening its ledger, binding HTTP and probing its mDNS
#: name (~1 s); 30 s covers a loaded 2-core machine and a token join (edge lookup).
START_TIMEOUT_S = 30.0
#: SIGTERM -> exit: the node closes sessions, sends mDNS goodbyes, flushes its ledger.
STOP_TIMEOUT_S = 10.0
#: Lines of a process's log quoted in a failure message.
LOG_TAIL_LINES = 30
#: Most stdout lines kept per process (a node prints two or three).
MAX_STDOUT_LINES = 1000
#: How often a wait looks again.
POLL_S = 0.02


class ClusterError(AssertionError):
    """A process of ours did not do what the run needs (start, stop, form a mesh)."""


class Closeable(Protocol):
    def close(self) -> None: ...


@dataclass(eq=False)  # one object per process slot, hashed by identity
class NodeProcess:
    """One ``python -m mesh ARGV`` process (and, after ``Cluster.restart``, its successor).

    ``cwd``/``env``/``preexec_fn`` are passed to ``Popen`` (a benchmark imports another
    copy of the code through ``PYTHONPATH``, or lowers its nodes' priority); ``netns``
    runs it inside a network namespace (``ip netns exec`` execs, so the pid is its own);
    ``program`` replaces ``-m mesh`` (a benchmark's own ``--serve`` entry point, which
    prints the same "listening on URL" line)."""

    name: str
    argv: list[str]
    log_path: Path
    data_dir: Path | None = None
    netns: str | None = None
    cwd: Path | None = None
    env: Mapping[str, str] | None = None
    preexec_fn: Callable[[], None] | None = None
    program: tuple[str, ...] = ("-m", "mesh")
    proc: subprocess.Popen[bytes] | None = None
    url: str = ""  # from its "listening on" line (a caller may set it beforehand)
    listening: bool = False  # this start of it printed its "listening on" line
    node_id: str = ""
    role: str = ""
    store_id: str = ""
    starts: int = 0
    started_at: float = 0.0  # perf_counter at the last spawn
    listening_at: float = 0.0  # perf_counter when its URL line came
    lines: queue.Queue[str] = field(default_factory=queue.Queue)
    _reader: threading.Thread | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def cpu(self) -> float:
        """CPU seconds (user + system) of the process so far."""
        return proc_cpu(self.pid)

    def log_tail(self, n: int = LOG_TAIL_LINES) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError as exc:
            return f"(no log: {exc})"
        return "\n".join(lines[-n:])

    def spawn(self) -> subprocess.Popen[bytes]:
        """Start (again) with the current ``argv``."""
        assert self.proc is None or self.proc.poll() is not None, f"{self.name} is running"
        cmd = [sys.executable, *self.program, *self.argv]
        if self.netns is not None:
            cmd = ["ip", "netns", "exec", self.netns, *cmd]
        self.starts += 1
        self.listening = False
        self.lines = queue.Queue()
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            log.write(f"=== start {self.starts}: {' '.join(cmd)}\n".encode())
            log.flush()
            # PYTHONFAULTHANDLER: a process that hangs on SIGTERM gets SIGABRT before
            # SIGKILL and leaves every thread's stack in its log (``_force``).
            env = {**(self.env if self.env is not None else os.environ),
                   "PYTHONFAULTHANDLER": "1"}
            self.started_at = time.perf_counter()
            cwd = self.cwd if self.cwd is not None else self.log_path.parent
            proc = subprocess.Popen(  # noqa: S603 -- our own CLI, our own arguments
                cmd, stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL,
                start_new_session=True, cwd=cwd, env=env, preexec_fn=self.preexec_fn)
        self.proc = proc
        self._reader = threading.Thread(target=_read_lines, args=(proc, self.lines),
                                        name=f"stdout {self.name}", daemon=True)
        self._reader.start()
        return proc

    async def wait_ready(self, within: float = START_TIMEOUT_S) -> None:
        """Until this start of the process printed its "listening on URL" line."""
        if self.listening:
            return
        deadline = time.monotonic() + within
        seen: list[str] = []
        for _poll in range(int(within / POLL_S) + MAX_STDOUT_LINES):
            if time.monotonic() > deadline:
                break
            try:
                line = self.lines.get_nowait()
            except queue.Empty:
                if self.proc is not None and self.proc.poll() is not None \
                        and self.lines.empty() and not self._reader_alive():
                    raise ClusterError(
                        f"{self.name} exited with status {self.proc.returncode} before "
                        f"listening; stdout {seen}\nlog:\n{self.log_tail()}") from None
                await asyncio.sleep(POLL_S)
                continue
            seen.append(line)
            if " listening on " in line:
                self._listening(line)
                return
        raise ClusterError(f"{self.name} did not print its URL within {within} s; stdout "
                           f"{seen}\nlog:\n{self.log_tail()}")

    def _listening(self, line: str) -> None:
        self.listening = True
        self.listening_at = time.perf_counter()
        words = line.split()
        self.url = words[-1]
        if line.startswith("storemesh node ") and len(words) >= 9:
            # "storemesh node ID (ROLE) of store S listening on URL"
            self.node_id, self.role = words[2], words[3].strip("()")
            self.store_id = words[6]

    def _reader_alive(self) -> bool:
        return self._reader is not None and self._reader.is_alive()

    def terminate(self) -> None:
        """SIGTERM without waiting (``stop`` waits): stop many nodes at once."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)

    def kill(self) -> None:
        """SIGKILL, by pid: no goodbye, no flush, no cleanup."""
        assert self.proc is not None
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(STOP_TIMEOUT_S)
        self.reap()

    def stop(self) -> int:
        """SIGTERM, then SIGABRT + SIGKILL after ``STOP_TIMEOUT_S`` (raises
        ``ClusterError``: the stacks are in the log); returns the exit status."""
        assert self.proc is not None
        proc = self.proc
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                _force(proc)
                self.reap()
                raise ClusterError(f"{self.name} did not exit within {STOP_TIMEOUT_S} s of "
                                   f"SIGTERM; its stacks:\n{self.log_tail(60)}") from None
        self.reap()
        return proc.returncode

    def reap(self) -> None:
        if self._reader is not None:
            self._reader.join(STOP_TIMEOUT_S)
        if self.proc is not None and self.proc.stdout is not None:
            self.proc.stdout.close()


class Cluster:
    """The processes (and proxies) of one run; ``close()`` stops all of them."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.nodes: dict[str, NodeProcess] = {}
        self._procs: list[subprocess.Popen[bytes]] = []
        self._closeables: list[Closeable] = []

    # --- starting -----------------------------------------------------------------

    def spawn(self, name: str, argv: Sequence[str], *, data_dir: Path | None = None,
              log_path: Path | None = None, **popen: Any) -> NodeProcess:
        """Start ``python -m mesh ARGV`` as ``name`` (its log: ``BASE/NAME.log``);
        ``wait_ready`` returns once it listens. ``popen``: ``netns``, ``cwd``, ``env``,
        ``preexec_fn``, ``program`` of ``NodeProcess``."""
        if name in self.nodes:
            raise ValueError(f"a process named {name!r} is already in this cluster")
        node = NodeProcess(name, list(argv), log_path or self.base / f"{name}.log",
                           data_dir, **popen)
        self.nodes[name] = node
        self._spawn(node)
        return node

    def _spawn(self, node: NodeProcess) -> None:
        self._procs.append(node.spawn())

    async def wait_ready(self, *nodes: NodeProcess, within: float = START_TIMEOUT_S) -> None:
        """Wait (concurrently) until every node printed its URL line."""
        await asyncio.gather(*(self._wait_one(n, within) for n in nodes))

    async def _wait_one(self, node: NodeProcess, within: float) -> None:
        await node.wait_ready(within)
        self.ready(node)

    def ready(self, node: NodeProcess) -> None:
        """Called once a start of ``node`` listens (a subclass registers its URL)."""

    # --- stopping -----------------------------------------------------------------

    def kill(self, node: NodeProcess) -> None:
        """SIGKILL, by pid: no goodbye, no flush, no cleanup."""
        node.kill()

    def stop(self, node: NodeProcess) -> int:
        """SIGTERM, then SIGABRT + SIGKILL after ``STOP_TIMEOUT_S`` (a failure: the
        stacks are in the log); returns the exit status."""
        return node.stop()

    def restart(self, node: NodeProcess, *, same_port: bool = True) -> NodeProcess:
        """Start the node again on its data dir (without ``--join``: it has joined)."""
        assert node.proc is not None and node.proc.poll() is not None, "stop or kill it first"
        argv = list(node.argv)
        if "--join" in argv:
            i = argv.index("--join")
            del argv[i:i + 2]
        if same_port and node.url and "--http-port" in argv:
            argv[argv.index("--http-port") + 1] = str(node.port)
        node.argv = argv
        self._spawn(node)
        return node

    def add(self, thing: Closeable) -> Any:
        """Close ``thing`` (a proxy, say) in ``close()``, before the processes stop."""
        self._closeables.append(thing)
        return thing

    def close(self) -> None:
        """Stop every process this cluster ever started (by pid) and every closeable;
        raises ``ClusterError`` naming any process that had to be killed."""
        errors: list[str] = []
        for thing in reversed(self._closeables):
            try:
                thing.close()
            except Exception as exc:
                errors.append(f"closing {thing!r}: {exc!r}")
        for proc in self._procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        for proc in self._procs:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _force(proc)
                stuck = [n for n in self.nodes.values() if n.proc is proc]
                where = stuck[0].log_path if stuck else "?"
                errors.append(f"{[n.name for n in stuck] or '?'} (pid {proc.pid}) did not "
                              f"exit within {STOP_TIMEOUT_S} s of SIGTERM; killed (stacks in "
                              f"{where})")
        for node in self.nodes.values():
            node.reap()
        for proc in self._procs:
            if proc.stdout is not None and not proc.stdout.closed:
                proc.stdout.close()
        if errors:
            raise ClusterError("cluster teardown: " + "; ".join(errors))


async def wait_mesh(get_json: Callable[[str], Any], urls: Sequence[str], *,
                    within: float = 30.0) -> float:
    """Until every node at ``urls`` has the others up (``GET /v1/peers``); returns the
    seconds it took. ``get_json(url)`` is the caller's HTTP client (its TLS, its
    credentials)."""
    t0 = time.monotonic()
    want = len(urls) - 1
    ups: list[int] = []
    for _poll in range(int(within / 0.1) + 1):
        ups = []
        for url in urls:
            peers = await get_json(url + "/v1/peers")
            ups.append(sum(1 for p in peers["peers"] if p["up"]))
        if all(n >= want for n in ups):
            return time.monotonic() - t0
        if time.monotonic() - t0 > within:
            break
        await asyncio.sleep(0.1)
    raise ClusterError(f"the mesh did not form within {within} s (peers up: {ups}, "
                       f"want {want} each)")


def proc_cpu(pid: int, tid: int | None = None) -> float:
    """CPU seconds (utime + stime) of a process, or of one of its threads, from /proc;
    NaN once it is gone."""
    path = f"/proc/{pid}/stat" if tid is None else f"/proc/{pid}/task/{tid}/stat"
    try:
        with open(path, "rb") as f:
            fields = f.read().rpartition(b")")[2].split()
    except OSError:  # gone
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _force(proc: subprocess.Popen[bytes]) -> None:
    """A process ignored SIGTERM: SIGABRT (its faulthandler logs every thread's stack),
    then SIGKILL; by pid."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(proc.pid, signal.SIGABRT)
    try:
        proc.wait(3)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(STOP_TIMEOUT_S)


def _read_lines(proc: subprocess.Popen[bytes], out: queue.Queue[str]) -> None:
    """Drain a process's stdout (so it never blocks on a full pipe), keeping its lines."""
    assert proc.stdout is not None
    n = 0
    with contextlib.suppress(ValueError, OSError):  # closed under us at teardown
        for raw in proc.stdout:
            if n < MAX_STDOUT_LINES:
                out.put(raw.decode(errors="replace").rstrip("\n"))
                n += 1

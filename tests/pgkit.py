"""A throw-away PostgreSQL cluster for tests and benchmarks: initdb + pg_ctl in a
temporary directory, listening only on a Unix socket, torn down afterwards.

* Binaries come from the distribution (``/usr/lib/postgresql/*/bin``, or ``initdb`` on
  PATH). Missing and root: ``apt-get install -y postgresql`` once (``scripts/setup`` does
  the same). Still missing: ``PgUnavailable`` with the reason (tests skip with it).
* PostgreSQL refuses to run as root: as root the cluster runs as the ``postgres`` user
  (``runuser -u postgres``), created by the package; the directory is chowned to it.
* ``listen_addresses = ''``: no TCP port at all, only ``DIR/.s.PGSQL.5432``; local
  connections are trusted (the socket directory is 0700, owned by the server's user,
  and root connects as ``postgres``).
* ``fsync`` stays on: the ledger's acknowledgement-after-commit is only honest on a
  server that syncs its WAL.

``python -m tests.pgkit`` starts one and prints its DSN until interrupted (for
``scripts/bench_fleet.py`` and by hand).
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

__all__ = ["PgCluster", "PgUnavailable", "find_bin_dir", "install_postgres"]


class PgUnavailable(RuntimeError):
    """PostgreSQL cannot be installed or started on this machine (the reason)."""


def find_bin_dir() -> Path | None:
    """The newest ``/usr/lib/postgresql/N/bin`` holding initdb, else initdb's dir on PATH."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                   key=lambda p: int(Path(p).parent.parent.name)
                   if Path(p).parent.parent.name.isdigit() else 0)
    if found:
        return Path(found[-1]).parent
    on_path = shutil.which("initdb")
    return Path(on_path).parent if on_path else None


def install_postgres() -> Path:
    """The binaries' directory, installing the distribution's package when missing."""
    bin_dir = find_bin_dir()
    if bin_dir is not None:
        return bin_dir
    if os.geteuid() != 0:
        raise PgUnavailable("PostgreSQL is not installed and we are not root to apt-get it")
    if shutil.which("apt-get") is None:
        raise PgUnavailable("PostgreSQL is not installed and there is no apt-get")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-q"],
                ["apt-get", "install", "-y", "-q", "--no-install-recommends", "postgresql"]):
        res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600,
                             check=False)
        if res.returncode != 0 and cmd[1] == "install":
            raise PgUnavailable(f"apt-get install postgresql failed: {res.stderr[-400:]}")
    bin_dir = find_bin_dir()
    if bin_dir is None:
        raise PgUnavailable("apt-get installed postgresql but no initdb was found")
    return bin_dir


class PgCluster:
    """One PostgreSQL server in a temporary directory (``start`` / ``stop``)."""

    def __init__(self, *, settings: dict[str, str] | None = None) -> None:
        self.bin_dir = install_postgres()
        self.run_as: str | None = None
        if os.geteuid() == 0:
            try:
                pwd.getpwnam("postgres")
            except KeyError as exc:
                raise PgUnavailable("running as root and there is no 'postgres' user "
                                    "to run the server as") from exc
            self.run_as = "postgres"
        # Short path: a Unix socket path must stay under ~107 bytes.
        self.dir = Path(tempfile.mkdtemp(prefix="smpg-", dir="/tmp"))
        self.data = self.dir / "data"
        self.settings = {"listen_addresses": "''", "unix_socket_directories": f"'{self.dir}'",
                         "max_connections": "200", "shared_buffers": "64MB",
                         "fsync": "on", "synchronous_commit": "on",
                         "log_min_messages": "warning", **(settings or {})}
        self.user = self.run_as or pwd.getpwuid(os.geteuid()).pw_name
        self._started = False

    @property
    def dsn(self) -> str:
        """libpq URL of the maintenance database over the socket."""
        return self.dsn_for("postgres")

    def dsn_for(self, dbname: str) -> str:
        return f"postgresql:///{dbname}?host={self.dir}&user={self.user}"

    def _run(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        cmd = [str(self.bin_dir / args[0]), *args[1:]]
        if self.run_as is not None:
            cmd = ["runuser", "-u", self.run_as, "--", *cmd]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                              check=False, cwd=self.dir)

    def start(self) -> PgCluster:
        if self.run_as is not None:
            shutil.chown(self.dir, self.run_as, self.run_as)
        os.chmod(self.dir, 0o700)
        res = self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", self.user,
                        "-E", "UTF8", "--no-locale")
        if res.returncode != 0:
            self.cleanup()
            raise PgUnavailable(f"initdb failed: {res.stderr.strip()[-400:]}")
        with (self.data / "postgresql.conf").open("a") as conf:
            for k, v in self.settings.items():
                conf.write(f"{k} = {v}\n")
        res = self._run("pg_ctl", "-D", str(self.data), "-l", str(self.dir / "log"),
                        "-w", "-t", "60", "start")
        if res.returncode != 0:
            log = (self.dir / "log").read_text(errors="replace")[-400:] \
                if (self.dir / "log").exists() else ""
            self.cleanup()
            raise PgUnavailable(f"pg_ctl start failed: {res.stderr.strip()[-300:]} {log}")
        self._started = True
        return self

    def postmaster_pid(self) -> int:
        return int((self.data / "postmaster.pid").read_text().split()[0])

    def backend_cpu_s(self) -> float:
        """CPU seconds (user + system) of the server and all its backends so far, from
        /proc (children that exited are included by the kernel's cutime/cstime)."""
        total = 0.0
        tick = os.sysconf("SC_CLK_TCK")
        root = self.postmaster_pid()
        for stat in glob.glob("/proc/[0-9]*/stat"):
            with contextlib.suppress(OSError, ValueError, IndexError):
                text = Path(stat).read_text()
                fields = text[text.rindex(")") + 2:].split()
                pid, ppid = int(Path(stat).parent.name), int(fields[1])
                if pid == root:
                    total += sum(int(x) for x in fields[11:15]) / tick  # incl. children
                elif ppid == root:
                    total += (int(fields[11]) + int(fields[12])) / tick
        return total

    def create_database(self, name: str) -> str:
        import psycopg

        with psycopg.connect(self.dsn, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.dsn_for(name)

    def stop(self) -> None:
        if self._started:
            self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop",
                      timeout=60)
            self._started = False
        self.cleanup()

    def cleanup(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> PgCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


if __name__ == "__main__":
    with PgCluster() as pg:
        print(pg.dsn, flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            while True:
                time.sleep(3600)

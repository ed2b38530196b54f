"""Operating a node: what its data directory keeps and who may run it (issue 10 items 2,
3, 20, 22). In-process nodes on 127.0.0.1 where that shows the fault; real
``storemesh`` processes where it is the process that matters (locks, signals)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from functools import partial
from pathlib import Path

import aiohttp
import orjson
import pytest

from mesh.app.cli import verify_ledger
from mesh.core.replica import Replica
from mesh.node.node import Node
from tests import meshkit
from tests.conftest import ingest
from tests.meshkit import (
    LOOPBACK,
    Cluster,
    NodeProc,
    client,
    enrol_direct,
    get_json,
    new_store,
    now_ms,
    peers_up,
    tag,
    until,
    wait_until,
)

cluster = meshkit.cluster  # the fixture: every process started is stopped after the test


def _receive(r: Replica, *, sku: str, qty: int, txn: str) -> object:
    return r.receive(sku, qty, txn=txn, now_ms=now_ms())


# --- item 2: a certificate learned in a handshake is saved ---------------------------------


@pytest.mark.asyncio
async def test_a_certificate_learned_in_the_handshake_survives_a_restart(tmp_path: Path) -> None:
    """r2 learns r1's certificate only from the session handshake (static peers, no
    discovery, no certificate message with anything new in it), stores r1's envelopes,
    stops: its data dir must still verify every one of them."""
    edge = new_store(tmp_path, f"s-{tag()}", "edge")
    enrol_direct(tmp_path, edge, "r1")
    r2_ident = enrol_direct(tmp_path, edge, "r2")  # its trust store: edge and r2 only
    assert r2_ident.trust.certificate("r1") is None
    r1 = Node(tmp_path / "r1", insecure_plaintext=True, discovery=False)
    await r1.start()
    r2 = Node(tmp_path / "r2", insecure_plaintext=True, discovery=False, peers=[r1.url])
    try:
        await r2.start()
        for i in range(5):
            await r1.execute(partial(_receive, sku="A", qty=1, txn=f"r1-{i}"))
        await wait_until(lambda: r2.replica.on_hand("A") == 5, 20, "r2 to hold r1's receipts")
        # in a loop iteration or two the writes are queued; close() flushes them
    finally:
        await r2.close()
        await r1.close()
    report = verify_ledger(tmp_path / "r2")
    assert report.ok, report.problems[:5]
    assert report.origins["r1"].envelopes == 5


# --- item 3: one process per data directory -------------------------------------------------


def test_the_data_dir_lock_is_reentrant_in_a_process_and_released(tmp_path: Path) -> None:
    from mesh.store.datadir import lock_data_dir

    d = tmp_path / "n"
    outer = lock_data_dir(d)
    inner = lock_data_dir(d)  # the CLI holds it, the node's start takes it again
    inner.release()
    inner.release()  # a second release of one holder is a no-op
    outer.release()
    with lock_data_dir(d):
        pass
    assert (d / "node.lock").exists()


def test_a_trust_store_change_is_on_disk_before_the_envelopes_after_it(tmp_path: Path) -> None:
    """The lowest layer of item 2: ``DurableReplica`` writes node.json on the ledger's
    writer thread ahead of the rows appended after a trust store change (durable
    invariant 6), whoever changed the trust store."""
    from mesh.durable import DurableReplica
    from mesh.store.datadir import load_identity

    edge = new_store(tmp_path, f"s-{tag()}", "edge")
    r1 = enrol_direct(tmp_path, edge, "r1")
    enrol_direct(tmp_path, edge, "r2")
    seller = Replica(r1.store_id, "r1", "register", r1.key)
    env = seller.receive("A", 3, txn="r1-0", now_ms=now_ms()).envelope
    assert env is not None
    dur = DurableReplica.open(tmp_path / "r2")
    try:
        dur.identity.trust.add_certificate(r1.certificate)  # as the handshake does
        applied, fut = ingest(dur, env.raw, now_ms())
        assert applied and fut is not None
        fut.result(10)
        # no close, no flush: what is on disk now is what a SIGKILL would leave
        assert load_identity(tmp_path / "r2").trust.certificate("r1") == r1.certificate
    finally:
        dur.close()


def test_a_failed_trust_store_write_fails_the_appends_behind_it(tmp_path: Path) -> None:
    """If node.json cannot be written, the envelopes needing it are not written either
    (the ledger fails as on a full disk, and the node rebuilds from disk)."""
    from mesh.durable import DurableReplica
    from mesh.errors import LedgerError

    edge = new_store(tmp_path, f"s-{tag()}", "edge")
    r1 = enrol_direct(tmp_path, edge, "r1")
    enrol_direct(tmp_path, edge, "r2")
    seller = Replica(r1.store_id, "r1", "register", r1.key)
    env = seller.receive("A", 3, txn="r1-0", now_ms=now_ms()).envelope
    assert env is not None
    dur = DurableReplica.open(tmp_path / "r2")
    try:
        dur.identity.trust.add_certificate(r1.certificate)
        dur.identity.data_dir = tmp_path / "gone"  # node.json cannot be written there
        _, fut = ingest(dur, env.raw, now_ms())
        assert fut is not None
        with pytest.raises(LedgerError):
            fut.result(10)
        assert dur.ledger.count() == 0
        dur.identity.data_dir = tmp_path / "r2"
        dur.recover()
        _, fut = ingest(dur, env.raw, now_ms())
        assert fut is not None and fut.result(10) == 1
    finally:
        dur.close()


def _storemesh(*args: str, cwd: Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mesh", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=timeout, stdin=subprocess.DEVNULL, check=False)


def _one_line_error(done: subprocess.CompletedProcess[str]) -> str:
    """A user's mistake: status 2, one line on stderr, no traceback."""
    lines = [ln for ln in done.stderr.splitlines() if ln.strip()]
    assert done.returncode == 2, (done.returncode, done.stderr[-2000:])
    assert "Traceback" not in done.stderr, done.stderr[-2000:]
    assert len(lines) == 1, lines
    return lines[0]


@pytest.mark.asyncio
async def test_a_second_process_on_a_data_dir_is_refused(cluster: Cluster,
                                                         tmp_path: Path) -> None:
    new_store(tmp_path, f"s-{tag()}", "edge")
    first = await cluster.start("edge", tmp_path / "edge", discovery=False)
    second = await asyncio.to_thread(_storemesh, "node", "--data", str(tmp_path / "edge"),
                                     "--interface", LOOPBACK, "--http-port", "0",
                                     "--no-discovery", cwd=tmp_path)
    line = _one_line_error(second)
    assert f"in use by storemesh process {first.pid}" in line, line
    assert first.alive()
    assert cluster.stop(first) == 0
    # the lock died with the process: a new start on the same dir runs
    cluster.restart(first, same_port=False)
    await cluster.wait_ready(first)


# --- item 20: SIGTERM at any moment is a clean stop ----------------------------------------


def _fill(data_dir: Path, n: int) -> None:
    """``n`` receipts by the node in ``data_dir``, no snapshot: a start replays them all."""
    from mesh.durable import DurableReplica

    dur = DurableReplica.open(data_dir, snapshot_every=10**9)
    try:
        last = None
        for i in range(n):
            _, last = dur.execute(partial(_receive, sku=f"S{i % 50}", qty=1, txn=f"fill-{i}"))
        assert last is not None
        last.result(60)
    finally:
        dur.close()


async def _envelopes(node: NodeProc) -> int:
    async with client() as http:
        return int((await get_json(http, node.url, "/v1/health"))["envelopes"])


def _stopped_cleanly(cluster: Cluster, node: NodeProc, phase: str) -> None:
    status = cluster.stop(node)
    log = node.log_tail(200)
    assert status == 0, f"SIGTERM {phase}: exit status {status}\n{log}"
    assert "Traceback" not in log, log
    assert "node: stopped cleanly" in log.splitlines()[-1], log
    report = verify_ledger(node.data_dir)
    assert report.ok, (phase, report.problems[:5])


@pytest.mark.slow
@pytest.mark.asyncio
async def test_sigterm_during_start_catch_up_and_serving_is_a_clean_stop(
        cluster: Cluster, tmp_path: Path) -> None:
    n = 20_000
    edge_ident = new_store(tmp_path, f"s-{tag()}", "edge")
    enrol_direct(tmp_path, edge_ident, "r1")
    await asyncio.to_thread(_fill, tmp_path / "edge", n)

    # 1. during start-up: the data dir is locked (the lock file names the pid) and the
    #    ledger is being replayed, the node is not listening yet
    edge = cluster.launch("edge", tmp_path / "edge", discovery=False)
    lock = tmp_path / "edge" / "node.lock"

    def locked_by_it() -> bool:
        try:
            return lock.read_text().strip() == str(edge.pid)
        except OSError:
            return False

    await wait_until(locked_by_it, 30, "the edge to lock its data dir")
    assert edge.lines.empty(), "listening already: the start-up window was missed"
    _stopped_cleanly(cluster, edge, "during start-up")
    assert "SIGTERM during start-up" in edge.log_tail(200)

    # 2. while serving
    cluster.restart(edge, same_port=False)
    await cluster.wait_ready(edge)
    assert await _envelopes(edge) == n
    _stopped_cleanly(cluster, edge, "while serving")
    cluster.restart(edge, same_port=False)
    await cluster.wait_ready(edge)

    # 3. during a catch-up of many envelopes: r1 starts empty and pulls all n
    r1 = await cluster.start("r1", tmp_path / "r1", discovery=False, peers=[edge.url])
    _, held = await until(lambda: _partly(r1, n), within=60, what="r1 mid catch-up",
                          interval=0.005)
    _stopped_cleanly(cluster, r1, f"during catch-up ({held} of {n} held)")
    print(f"r1 stopped by SIGTERM during its catch-up holding {held} of {n} envelopes")
    cluster.restart(r1, same_port=False)
    await cluster.wait_ready(r1)
    await until(lambda: _all(r1, n), within=60, what="r1 to finish the catch-up")
    _stopped_cleanly(cluster, r1, "after the catch-up")


async def _partly(node: NodeProc, n: int) -> int:
    got = await _envelopes(node)
    return got if 0 < got < n else 0


async def _all(node: NodeProc, n: int) -> bool:
    return await _envelopes(node) >= n


# --- item 22: the node's settings are kept in the data dir ---------------------------------


@pytest.mark.slow  # four node starts: ~15 s on a loaded 2-core machine
@pytest.mark.asyncio
async def test_a_restart_with_only_data_dials_the_cloud_and_peers_again(
        cluster: Cluster, tmp_path: Path) -> None:
    """r1's first start names its links (``--cloud``: here a node enrolled as ``cloud``
    run as a plain node, which takes a WAN session like the cloud does; no mDNS); a
    restart with only ``--data`` must use them again, and a flag given at a start
    replaces the saved value."""
    edge_ident = new_store(tmp_path, f"s-{tag()}", "edge")
    enrol_direct(tmp_path, edge_ident, "r1")
    enrol_direct(tmp_path, edge_ident, "hq", role="cloud")  # a --cloud URL must reach one
    hq = await cluster.start("hq", tmp_path / "hq", discovery=False)
    r1 = await cluster.start("r1", tmp_path / "r1", discovery=False,
                             extra=["--cloud", f"{hq.url}/"])
    async with client() as http:
        await until(lambda: _up(http, r1, "hq"), within=20, what="r1's link to hq")
    assert cluster.stop(r1) == 0
    saved = orjson.loads((tmp_path / "r1" / "config.json").read_bytes())
    assert saved == {"cloud_urls": [f"{hq.url}/"], "discovery": False, "http_port": 0,
                     "interface": LOOPBACK}

    r1.argv = ["node", "--data", str(tmp_path / "r1")]  # as docs/operations.md promises
    cluster.restart(r1, same_port=False)
    await cluster.wait_ready(r1)
    assert r1.url.startswith(f"https://{LOOPBACK}:"), r1.url  # the saved --interface
    async with client() as http:
        await until(lambda: _up(http, r1, "hq"), within=20,
                    what="r1's link to hq after a restart with only --data")
    assert cluster.stop(r1) == 0

    port = r1.port  # a flag given replaces the saved value, and is saved in turn
    r1.argv = ["node", "--data", str(tmp_path / "r1"), "--http-port", str(port)]
    cluster.restart(r1, same_port=False)
    await cluster.wait_ready(r1)
    assert r1.port == port
    saved = orjson.loads((tmp_path / "r1" / "config.json").read_bytes())
    assert saved["http_port"] == port and saved["cloud_urls"] == [f"{hq.url}/"]


async def _up(http: aiohttp.ClientSession, node: NodeProc, peer: str) -> bool:
    return peer in await peers_up(http, node)


def test_a_damaged_config_is_refused_with_its_name(tmp_path: Path) -> None:
    from mesh.store.nodeconfig import load_settings, save_settings

    save_settings(tmp_path, {"peers": ["http://127.0.0.1:8700"], "discovery": False})
    assert load_settings(tmp_path) == {"peers": ["http://127.0.0.1:8700"], "discovery": False}
    for bad, says in ((b"{", "is not JSON"), (b'{"colour": 1}', "unknown setting 'colour'"),
                      (b'{"http_port": "80"}', "http_port (--http-port) must be an integer"),
                      (b'{"http_port": true}', "must be an integer"),
                      (b'{"peers": ["ftp://x"]}', "is not a URL")):
        (tmp_path / "config.json").write_bytes(bad)
        with pytest.raises(ValueError, match=says.replace("(", r"\(").replace(")", r"\)")):
            load_settings(tmp_path)

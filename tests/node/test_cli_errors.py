"""A mistake the user can fix is one line on stderr and exit status 2, never a traceback
(issue 10 item 21). Commands that run a node are real processes (they own the signals);
the others run in-process with click's CliRunner."""

from __future__ import annotations

import re
import select
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from mesh.app.cli import main
from mesh.store.datadir import NodeIdentity
from tests.meshkit import LOOPBACK, enrol_direct, join_token, new_store, tag

_LOG_LINE = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ (DEBUG|INFO|WARNING) ")
SIMS = Path(__file__).resolve().parents[2] / "simulations"


def _run(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mesh", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=60, stdin=subprocess.DEVNULL, check=False)


def _one_line(code: int, stderr: str) -> str:
    """The error line, the only line on stderr that is not a log record."""
    lines = [ln for ln in stderr.splitlines() if ln.strip() and not _LOG_LINE.match(ln)]
    assert code == 2, (code, stderr[-2000:])
    assert "Traceback" not in stderr, stderr[-2000:]
    assert len(lines) == 1, lines
    return lines[0]


@pytest.fixture
def busy_port() -> Iterator[int]:
    """A port on 127.0.0.1 something else listens on."""
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        s.listen()
        yield s.getsockname()[1]


@pytest.fixture
def edge(tmp_path: Path) -> NodeIdentity:
    return new_store(tmp_path, f"s-{tag()}", "edge")


def test_node_on_a_port_in_use(tmp_path: Path, edge: NodeIdentity, busy_port: int) -> None:
    done = _run("node", "--data", str(edge.data_dir), "--interface", LOOPBACK,
                "--http-port", str(busy_port), "--no-discovery", cwd=tmp_path)
    line = _one_line(done.returncode, done.stderr)
    assert f"{LOOPBACK}:{busy_port}" in line and "already in use" in line, line


def test_cloud_run_on_a_port_in_use(tmp_path: Path, edge: NodeIdentity, busy_port: int) -> None:
    enrol_direct(tmp_path / "hq", edge, f"cloud-{edge.store_id}", role="cloud")
    done = _run("cloud", "run", "--data", str(tmp_path / "hq"), "--http-host", LOOPBACK,
                "--http-port", str(busy_port), cwd=tmp_path)
    line = _one_line(done.returncode, done.stderr)
    assert f"{LOOPBACK}:{busy_port}" in line and "already in use" in line, line


def test_node_flags_and_data_dirs_a_user_can_get_wrong(tmp_path: Path,
                                                      edge: NodeIdentity) -> None:
    d = str(edge.data_dir)
    runner = CliRunner()  # refused before the node touches signals or logging
    for argv, says in ((["node", "--data", str(tmp_path / "nothing")], "holds no node"),
                       (["node", "--data", d, "--peer", "edge-box:8700"], "is not a URL"),
                       (["node", "--data", d, "--cloud", "http://hq:notaport/stores/x"],
                        "is not a URL")):
        res = runner.invoke(main, argv)
        assert res.exit_code == 2 and says in res.output, (argv, res.output, res.exception)
    cases = [
        (["node", "--data", d, "--log-level", "loud"], "--log-level"),
        (["node", "--data", str(tmp_path / "new"), "--join", "smj1.garbage", "--url",
          "http://127.0.0.1:9"], "join failed"),
    ]
    (edge.data_dir / "config.json").write_text('{"http_port": "8700"}')
    cases.append((["node", "--data", d, "--no-discovery"], "config.json: http_port"))
    for argv, says in cases:
        done = _run(*argv, cwd=tmp_path)
        assert says in _one_line(done.returncode, done.stderr), (argv, done.stderr)


def test_token_revoke_mistakes(tmp_path: Path, edge: NodeIdentity) -> None:
    runner = CliRunner()
    used = join_token(edge)
    for which, says in (("zz", "name the token by its text"),
                        ("abcdef12", "no token matches"),
                        ("smj1.not-a-token", "token")):
        res = runner.invoke(main, ["token", "revoke", str(edge.data_dir), which])
        assert res.exit_code == 2, (which, res.output, res.exception)
        assert says in res.output and "Traceback" not in res.output, res.output
    assert runner.invoke(main, ["token", "revoke", str(edge.data_dir), used]).exit_code == 0
    (edge.data_dir / "tokens.json").write_text("[")
    for argv in (["token", "revoke", str(edge.data_dir), "abcdef12"],
                 ["token", "list", str(edge.data_dir)]):
        res = runner.invoke(main, argv)
        assert res.exit_code == 2 and "damaged" in res.output, (argv, res.output)


def test_device_staff_and_hq_mistakes(tmp_path: Path, edge: NodeIdentity) -> None:
    """Credentials and accounts: each mistake is one line saying what to do, exit 2, and
    changes nothing (a register's directory holds no store key, so it issues nothing)."""
    runner = CliRunner()
    reg = enrol_direct(tmp_path, edge, "reg-1")
    pin = tmp_path / "pin"
    pin.write_text("123\n")
    good_pin = tmp_path / "good-pin"
    good_pin.write_text("482913\n")
    pw = tmp_path / "pw"
    pw.write_text("short\n")
    d, r = str(edge.data_dir), str(reg.data_dir)
    for argv, says in (
            (["device", "issue", r, "till-1"], "holds no store key"),
            (["device", "issue", d, "till:1"], "device id must be"),
            (["device", "issue", d, "till-1", "--allow", "adjust,reserve"], "may be allowed"),
            (["device", "issue", d, "till-1", "--days", "9999"], "lasts"),
            (["device", "revoke", d, "nobody"], "no device 'nobody'"),
            (["staff", "add", d, "ann", "--name", "Ann", "--pin-file", str(pin)], "PIN has"),
            (["staff", "add", r, "ann", "--name", "Ann", "--pin-file", str(good_pin)],
             "holds no store key"),
            (["staff", "disable", d, "nobody"], "no staff 'nobody'"),
            (["hq", "add", str(tmp_path / "hq"), "ann", "--password-file", str(pw)],
             "password has"),
            (["hq", "disable", str(tmp_path / "hq"), "nobody"], "no HQ account")):
        res = runner.invoke(main, argv)
        assert res.exit_code == 2, (argv, res.output, res.exception)
        assert says in " ".join(res.output.split()) and "Traceback" not in res.output, \
            (argv, res.output)
    assert not (edge.data_dir / "auth.json").exists() or b"till-1" not in (
        edge.data_dir / "auth.json").read_bytes()
    ok = runner.invoke(main, ["device", "issue", d, "till-1", "--node", "reg-1"])
    assert ok.exit_code == 0 and ok.output.startswith("smd1."), ok.output
    again = runner.invoke(main, ["staff", "add", d, "ann", "--name", "Ann",
                                 "--pin-file", str(good_pin)])
    assert again.exit_code == 0, again.output
    res = runner.invoke(main, ["staff", "add", d, "ann", "--name", "Ann",
                               "--pin-file", str(good_pin)])
    assert res.exit_code == 2 and "on the roster already" in res.output


def test_ledger_verify_of_a_dir_without_a_node(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    res = CliRunner().invoke(main, ["ledger", "verify", str(tmp_path / "empty")])
    assert res.exit_code == 2 and "holds no node" in res.output, res.output


def test_sim_plot_into_a_missing_folder_is_refused_before_the_run(tmp_path: Path) -> None:
    t0 = time.perf_counter()
    res = CliRunner().invoke(main, ["sim", "run", str(SIMS / "busy_saturday_40.toml"),
                                    "--plot", str(tmp_path / "no" / "such" / "plot.png")])
    took = time.perf_counter() - t0
    assert res.exit_code == 2, (res.output, res.exception)
    assert "does not exist" in res.output, res.output
    assert "safety" not in res.output.lower(), "the whole run went first: " + res.output
    assert took < 5, f"{took:.1f} s: the scenario ran before the check"


def test_a_second_cloud_run_on_one_root_is_refused(tmp_path: Path, edge: NodeIdentity) -> None:
    enrol_direct(tmp_path / "hq", edge, f"cloud-{edge.store_id}", role="cloud")
    first = subprocess.Popen(
        [sys.executable, "-m", "mesh", "cloud", "run", "--data", str(tmp_path / "hq"),
         "--http-host", LOOPBACK, "--http-port", "0"], cwd=tmp_path, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    try:
        assert first.stdout is not None
        ready, _, _ = select.select([first.stdout], [], [], 60)  # bounded wait
        assert ready, "the first cloud run printed nothing within 60 s"
        line = first.stdout.readline()
        assert "listening on" in line, line
        second = _run("cloud", "run", "--data", str(tmp_path / "hq"), "--http-host", LOOPBACK,
                      "--http-port", "0", cwd=tmp_path)
        says = _one_line(second.returncode, second.stderr)
        assert f"in use by storemesh process {first.pid}" in says, says
        assert first.poll() is None
    finally:
        first.terminate()  # SIGTERM, by pid
        assert first.wait(20) == 0
        if first.stdout is not None:
            first.stdout.close()


def test_a_damaged_node_json_is_named(tmp_path: Path, edge: NodeIdentity) -> None:
    doc = (edge.data_dir / "node.json").read_text()
    for damaged in ("{", doc.replace('"role"', '"rolle"'),
                    doc.replace('"signature": "', '"signature": "00', 1)):
        (edge.data_dir / "node.json").write_text(damaged)
        res = CliRunner().invoke(main, ["ledger", "verify", str(edge.data_dir)])
        assert res.exit_code == 2, (res.output, res.exception)
        assert "node.json is damaged" in res.output and "restore it" in res.output, res.output
    done = _run("node", "--data", str(edge.data_dir), "--no-discovery", "--interface", LOOPBACK,
                "--http-port", "0", cwd=tmp_path)
    assert "node.json is damaged" in _one_line(done.returncode, done.stderr)

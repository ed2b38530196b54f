"""``storemesh cloud run --database``: the mistakes a user can make are one line on
stderr and exit status 2 (as tests/node/test_cli_errors.py for the other commands)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.meshkit import LOOPBACK, enrol_direct, new_store, tag
from tests.node.test_cli_errors import _one_line, _run


@pytest.mark.parametrize(("extra", "says"), [
    (["--database", "sqlite:///x.db"], "takes a postgresql:// URL"),
    (["--gateway-id", "g1"], "are for a cloud on --database"),
    (["--database", "postgresql:///nodb?host=/nonexistent-socket-dir"],
     "cannot connect to PostgreSQL"),
])
def test_cloud_run_database_mistakes(tmp_path: Path, extra: list[str], says: str) -> None:
    edge = new_store(tmp_path, f"s-{tag()}", "edge")
    enrol_direct(tmp_path / "hq", edge, f"cloud-{edge.store_id}", role="cloud")
    done = _run("cloud", "run", "--data", str(tmp_path / "hq"), "--http-host", LOOPBACK,
                "--http-port", "0", "--insecure-plaintext", *extra, cwd=tmp_path)
    line = _one_line(done.returncode, done.stderr)
    assert says in line, line

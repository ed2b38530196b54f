"""The README's first command works: ``storemesh demo --duration 0`` starts an edge, three
registers and the cloud as real processes (through ``mesh.testing.cluster``, the harness
the tests and benchmarks use), sells, races, converges, counts at the cloud, and stops
every process it started."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def test_demo_runs_end_to_end_and_leaves_no_process(tmp_path: Path) -> None:
    out = subprocess.run(  # our own CLI, fixed arguments
        [sys.executable, "-m", "mesh", "demo", "--dir", str(tmp_path / "d"), "--duration", "0"],
        capture_output=True, text=True, timeout=240, cwd=tmp_path,
        env={**os.environ, "COLUMNS": "200"})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    text = " ".join(out.stdout.split())
    assert "every node derived the same exception list" in text, text[-2000:]
    assert "(every one, once)" in text, text[-2000:]  # the cloud counted each sale once
    # every node's log ends with its own clean shutdown, none was killed
    logs = sorted((tmp_path / "d").glob("*.log"))
    assert {p.stem for p in logs} >= {"edge", "cloud", "register-1", "register-2",
                                      "register-3"}
    for log in logs:
        assert "did not exit" not in log.read_text(errors="replace"), log
    data = str(tmp_path / "d")
    left = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmdline = (proc / "cmdline").read_bytes().decode(errors="replace")
            except OSError:
                continue
            if data in cmdline:
                left.append((proc.name, cmdline.replace("\0", " ")))
    assert not left, f"processes of the demo still running: {left}"

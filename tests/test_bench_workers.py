"""``bench/run workers`` end to end, at its tiniest: every worker row and ratio appears (issue 19).

No assertions on speed (a shared machine promises none): nginx and Sidecar at 1 and 2
workers start, wrk drives each without errors, and the limiter rows are measured.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from test_bench import RUN, RUN_ENV, _require_tools

ROWS = [
    "nginx proxy_pass, 1 worker",
    "Sidecar, 1 worker",
    "nginx proxy_pass, 2 workers",
    "Sidecar, 2 workers",
    "no rate limits",
    "in process (workers: 1)",
    "workers: shared-memory table",
    "workers: + quota (supervisor round trip)",
]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_tiny_workers_run_prints_every_row(tmp_path: Path) -> None:
    _require_tools()
    out = tmp_path / "workers.md"
    argv = [str(RUN), "workers", "--duration", "0.25", "--rounds", "1", "--checks", "300", "--out", str(out)]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=280, cwd=tmp_path, env=RUN_ENV)
    diag = f"exit {proc.returncode}\n--- stderr\n{proc.stderr[-4000:]}\n--- stdout\n{proc.stdout[-4000:]}"
    assert proc.returncode == 0 and out.is_file(), diag
    md = out.read_text()
    table = [line for line in md.splitlines() if line.startswith("| ")]
    for row in ROWS:
        assert any(row in line for line in table), f"no row {row!r}\n{diag}"
    assert "req per CPU-s" in md and "2 workers / 1 worker" in md, diag
    assert all(line.endswith("| 0 |") for line in table if line.startswith(("| nginx", "| Sidecar"))), diag

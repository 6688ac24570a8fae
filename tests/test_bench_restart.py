"""``bench/run restart`` end to end, at its tiniest (one round), so the bench code cannot rot.

No assertion on the figure itself (a shared machine promises no speed; the goal line says met
or missed): a store is made, the sidecar is killed with SIGKILL under load, started again on the
same ports, and the report holds a time for the first start and for the restart.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
from test_bench import RUN, RUN_ENV

MS = re.compile(r"^\d+ ms$")


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_tiny_restart_run_reports_the_restart_time(tmp_path: Path) -> None:
    out = tmp_path / "restart.md"
    argv = [str(RUN), "restart", "--rounds", "1", "--load", "0.6", "--keys", "20", "--out", str(out)]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=110, cwd=tmp_path, env=RUN_ENV)
    diag = f"exit {proc.returncode}\n--- stderr\n{proc.stderr[-4000:]}\n--- stdout\n{proc.stdout[-4000:]}"
    assert proc.returncode == 0 and out.is_file(), diag
    md = out.read_text()
    rows = [line.strip("|").split("|") for line in md.splitlines() if line.startswith("| ")]
    assert [cells[0].strip() for cells in rows[1:]] == ["first start (clean)", "1"], diag
    assert all(MS.match(cells[2].strip()) for cells in rows[1:]), diag
    assert re.search(r"KiB", rows[2][1]), diag  # the WAL the kill left, in the row
    assert re.search(r"After kill -9: median \d+ ms, max \d+ ms over 1 round\(s\); [1-9]\d* requests answered", md)
    assert re.search(r"Goal \(issue 15\): ≤ 1 s — (met|missed)", md), diag

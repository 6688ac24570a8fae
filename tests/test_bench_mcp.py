"""``bench/run mcp`` end to end, at its tiniest: every MCP row and column appears (issue 19 §4).

No assertions on speed (a shared machine promises none): the SDK's server, Sidecar, the bare
aiohttp forwarder, the lean Python proxy, the Python pipe and nginx start, every scenario is
driven through each, and each cell holds a figure, so a bench that silently lost a target or a
column fails here rather than in a note.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
from test_bench import RUN, RUN_ENV, _require_tools

ROWS = [
    "tools/call, 1 conn.",
    "tools/call, 32 conn.",
    "tools/list, 1 conn.",
    "tools/list, 32 conn.",
    "SDK ClientSession, 1 session",
    "tools/call of a tool that waits 7 ms, 1 conn.",
]
COLUMNS = 20
FIGURE = re.compile(r"^[+-]?[\d,]+(\.\d+)?( ms| ms \([\d.]+–[\d.]+\)|×)?$")


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_tiny_mcp_run_prints_every_row_with_every_reference(tmp_path: Path) -> None:
    _require_tools()  # nginx is a reference column
    out = tmp_path / "mcp.md"
    argv = [str(RUN), "mcp", "--duration", "0.15", "--rounds", "1", "--sessions", "50", "--out", str(out)]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=280, cwd=tmp_path, env=RUN_ENV)
    diag = f"exit {proc.returncode}\n--- stderr\n{proc.stderr[-4000:]}\n--- stdout\n{proc.stdout[-4000:]}"
    assert proc.returncode == 0 and out.is_file(), diag
    md = out.read_text()
    table = [line.strip("|").split("|") for line in md.splitlines() if line.startswith("| ")]
    header, body = table[0], table[1:]
    assert len(header) == COLUMNS and "nginx CPU/call" in header[-1] and "Sidecar CPU/call" in header[7], diag
    assert [cells[0].strip() for cells in body] == ROWS, diag
    for cells in body:
        assert len(cells) == COLUMNS, cells
        for cell in cells[1:]:
            assert FIGURE.match(cell.strip()), f"not a figure: {cell!r} in {cells}\n{diag}"
    assert re.search(r"Session creation .* Sidecar CPU [\d.]+ ms per session", md), diag
    assert "Goals (issue 19)" in md, diag

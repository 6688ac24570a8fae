"""``bench/run`` end to end, at its tiniest: every scenario row, ratio and budget line appears.

No assertions on speed: a shared CI machine cannot promise any. What is asserted is
that the harness starts nginx, the bare forwarder and Sidecar, drives each with wrk,
measures keys in process, prints the table and writes the same Markdown, and that no
row came back "n/a" or with non-2xx answers (that would mean Sidecar refused the
bench's key, or a server did not start). Needs Debian's nginx and wrk: missing ones
fail the test under ``CI=true`` and skip it elsewhere.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RUN = ROOT / "bench" / "run"
# The interpreter running the tests runs the bench too: bench/run makes no .venv in the checkout.
RUN_ENV = {**os.environ, "BENCH_PYTHON": sys.executable}

# The row labels bench/harness.py prints (--quick: 16 MiB stream, 2 000 keys, 500 in use).
SCENARIO_ROWS = [
    "small 1 KiB · 1 conn",
    "small 1 KiB · 32 conn",
    "cache: JSON 8 KiB · 32 conn",
    "2 000 keys · 500 in use · 32 conn",
    "stream 16 MiB · 1 conn",
    "key store load (2 000 keys)",
    "key verify, cold (first use)",
    "key verify, warm (cached)",
]
TARGETS = [
    "upstream nginx, direct",
    "nginx proxy_pass",
    "bare aiohttp forwarder",
    "Sidecar, uncached",
    "Sidecar, cache hit",
    "Sidecar, 1 key",
    "Sidecar, 2 000 keys",
]
RATIOS = [
    "Sidecar / nginx req/s",
    "Sidecar / bare req/s",
    "p50 added over direct",
    "cache: hit / uncached (Sidecar) req/s",
    "stream: Sidecar / nginx MB/s",
    "keys: 2 000 keys / 1 key req/s",
]
BUDGETS = [
    "full pipeline ≥ 0.9× bare forwarder req/s",
    "full pipeline ≥ 0.35× nginx req/s",
    "cache hits ≥ 3× uncached Sidecar req/s",
    "streaming ≥ 0.9× nginx MB/s",
    "Sidecar peak RSS < 100 MiB",
    "added p50 at 1 conn ≤ 0.3 ms over direct",
    "warm key check ≤ 20 µs",
    "100 000 keys load < 1 s",
]


def _require_tools() -> None:
    missing = [t for t in ("nginx", "wrk") if shutil.which(t) is None and not Path("/usr/sbin", t).exists()]
    if missing:
        msg = f"bench needs {' and '.join(missing)}: apt-get install nginx-light wrk (scripts/test does, as root)"
        if os.environ.get("CI") == "true":
            pytest.fail(msg)
        pytest.skip(msg)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_quick_run_prints_and_writes_every_row(tmp_path: Path) -> None:
    _require_tools()
    out = tmp_path / "latest.md"
    proc = subprocess.run(
        [str(RUN), "--quick", "--duration", "0.25", "--rounds", "1", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=280,
        cwd=tmp_path,
        env=RUN_ENV,
    )
    diag = f"exit {proc.returncode}\n--- stderr\n{proc.stderr[-4000:]}\n--- stdout\n{proc.stdout[-4000:]}"
    assert out.is_file(), diag
    md = out.read_text()
    assert md in proc.stdout, "stdout and the Markdown file differ\n" + diag

    table = [line for line in md.splitlines() if line.startswith("| ")]
    for row in SCENARIO_ROWS:
        assert any(line.startswith(f"| {row} ") for line in table), f"no row {row!r}\n{diag}"
    for target in TARGETS:
        assert any(f"| {target} " in line for line in table), f"no target {target!r}\n{diag}"
    for ratio in RATIOS:
        assert ratio in md, f"no ratio {ratio!r}\n{diag}"
    verdicts = [line for line in md.splitlines() if line[:4] in ("PASS", "MISS", "n/a ")]
    for b in BUDGETS:
        assert any(b in line for line in verdicts), f"no budget line {b!r}\n{diag}"

    # Every row measured, and nothing answered with an error.
    assert not [line for line in table if "n/a (" in line], diag
    assert not [line for line in table if "ERRORS" in line], diag
    assert proc.returncode == 0, diag

"""Attacks and failures on the stores' edges: a DSN's secret in any message (DESIGN invariant 7)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from sidecar.config.postgres import describe_dsn

SECRET = "s3cretPW"


@pytest.mark.parametrize(
    "dsn",
    [
        f"host=127.0.0.1 port=1 password={SECRET} dbname=d",  # libpq keyword form: not a URL
        f"postgresql://u:{SECRET}@127.0.0.1:1/d",
        f"postgresql://u:{SECRET}@h1:5,h2:6/d",
        f"postgresql://u:p@{SECRET}@h/d",
        f"postgresql://h/d?password={SECRET}",
        f"postgresql://u:{SECRET}@h:notaport/d",
    ],
)
def test_no_dsn_form_shows_its_password(dsn: str) -> None:
    assert SECRET not in describe_dsn(dsn)


def test_store_copy_never_prints_the_password_of_a_keyword_dsn(tmp_path: Path) -> None:
    """`store copy --from postgres:VAR` with a libpq keyword string: it used to be quoted whole in the error."""
    env = {k: v for k, v in os.environ.items() if k not in ("PGDSN", "SIDECAR_DATABASE_URL")}
    env["SRC"] = f"host=127.0.0.1 port=1 password={SECRET} dbname=d"
    argv = [
        sys.executable,
        "-m",
        "sidecar",
        "store",
        "copy",
        "--from",
        "postgres:SRC",
        "--to",
        f"sqlite:{tmp_path}/x.db",
    ]
    done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=60, check=False)
    assert done.returncode != 0
    assert SECRET not in done.stdout + done.stderr
    assert "postgres:SRC" in done.stderr and "postgresql://" in done.stderr

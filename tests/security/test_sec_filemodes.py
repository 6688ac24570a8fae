"""Files the sidecar creates are readable by its own user only (issue 20.5; DESIGN invariant 11).

The store, its ``-wal`` and ``-shm``, a YAML store's state file and the access log are created
0600 and the directories the sidecar creates 0700, whatever the umask (022 in a real
``sidecar serve`` process; 000 in-process); ``sidecar config check`` warns about existing
files that others can read.
"""

from __future__ import annotations

import asyncio
import os
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
import yaml
from conftest import ADMIN_TOKEN, PLEX_TOKEN

from sidecar.cli import main
from sidecar.demo import free_port
from sidecar.http.accesslog import AccessLog
from sidecar.store import SqliteStore

pytestmark = pytest.mark.skipif(os.name != "posix", reason="POSIX file modes")


def mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def umask_000() -> Iterator[None]:
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


async def test_serve_under_umask_022_creates_its_files_0600_and_dirs_0700(tmp_path: Path) -> None:
    """A real `sidecar serve` started with umask 022: sidecar.db, -wal, -shm and the access log
    are 0600 (they used to be 0644), the directories it had to create 0700."""
    admin_port, proxy_port = free_port(), free_port()
    cfg = {
        "listen": f"127.0.0.1:{proxy_port}",
        "admin": {"listen": f"127.0.0.1:{admin_port}"},
        "store": {"kind": "sqlite", "path": str(tmp_path / "state" / "db" / "sidecar.db")},
        "keys": {"argon2": "cheapest"},
        "upstreams": [{"id": "plex", "kind": "plex", "url": "http://127.0.0.1:9", "token_env": "PLEX_TOKEN"}],
        "log": {"access": str(tmp_path / "logs" / "access.log")},
    }
    path = tmp_path / "sidecar.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "PLEX_TOKEN": PLEX_TOKEN, "SIDECAR_ADMIN_TOKEN": ADMIN_TOKEN}
    cmd = f"umask 022 && exec {sys.executable} -m sidecar serve -c {path}"
    proc = subprocess.Popen(["/bin/sh", "-c", cmd], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        async with aiohttp.ClientSession() as session:
            end = time.monotonic() + 30
            while True:
                try:
                    async with session.post(f"http://127.0.0.1:{admin_port}/admin/keys", json={"name": "k"},
                                            headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}) as resp:  # fmt: skip
                        if resp.status == 201:
                            break
                except aiohttp.ClientConnectionError:
                    pass
                assert time.monotonic() < end and proc.poll() is None, "the sidecar did not start"
                await asyncio.sleep(0.05)
            async with session.get(f"http://127.0.0.1:{proxy_port}/identity") as resp:
                assert resp.status == 401
            db = tmp_path / "state" / "db" / "sidecar.db"
            log = tmp_path / "logs" / "access.log"
            end = time.monotonic() + 5
            while not (log.exists() and log.stat().st_size):
                assert time.monotonic() < end, "no access log line"
                await asyncio.sleep(0.02)
            files = [db, db.with_name("sidecar.db-wal"), db.with_name("sidecar.db-shm"), log]
            assert {str(f.name): oct(mode(f)) for f in files} == {str(f.name): oct(0o600) for f in files}
            for d in (tmp_path / "state", tmp_path / "state" / "db", tmp_path / "logs"):
                assert mode(d) == 0o700, d
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def test_state_store_and_access_log_are_0600_even_with_umask_000(tmp_path: Path, umask_000: None) -> None:
    """umask 000 would make every new file world-writable: the state database (as a YAML store
    keeps it) and the access log are still 0600."""
    store = SqliteStore(tmp_path / "new" / "state.db")
    await store.open()
    try:
        await store.set_quota("k", "*", "day:x", 1)  # a write: the WAL exists now
        for name in ("state.db", "state.db-wal", "state.db-shm"):
            assert mode(tmp_path / "new" / name) == 0o600, name
        assert mode(tmp_path / "new") == 0o700
    finally:
        await store.close()
    log = AccessLog(str(tmp_path / "access.log"))
    try:
        assert mode(tmp_path / "access.log") == 0o600
    finally:
        log.close()


def test_an_existing_file_keeps_its_mode_but_config_check_warns(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Files the operator made group/world-readable are not silently changed; `sidecar config
    check` names each one on stderr (exit 0), and says nothing once they are 0600."""
    db, log = tmp_path / "sidecar.db", tmp_path / "access.log"
    for f in (db, db.with_name("sidecar.db-wal"), log):
        f.write_text("")
        f.chmod(0o644)
    cfg = tmp_path / "sidecar.yaml"
    cfg.write_text(yaml.safe_dump({
        "store": {"kind": "sqlite", "path": str(db)},
        "upstreams": [{"id": "plex", "kind": "plex", "url": "http://127.0.0.1:9", "token_env": "PLEX_TOKEN"}],
        "log": {"access": str(log)},
    }))  # fmt: skip
    monkeypatch.setenv("PLEX_TOKEN", PLEX_TOKEN)
    assert main(["config", "check", "-c", str(cfg)]) == 0
    err = capsys.readouterr().err
    for f in (db, db.with_name("sidecar.db-wal"), log):
        assert f"warning: {f} is mode 0644" in err
    for f in (db, db.with_name("sidecar.db-wal"), log):
        f.chmod(0o600)
    assert main(["config", "check", "-c", str(cfg)]) == 0
    assert "warning" not in capsys.readouterr().err

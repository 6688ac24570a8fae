"""YAML key store faults (issue 15): half-written, invalid, removed, atomically replaced files.

The running sidecar keeps proxying with the last good key set whatever the file looks like,
says why in one log line (no hash, no key), counts each rejected version in
``sidecar_store_reload_errors_total{store="yaml"}``, and takes the next good version within
the poll interval — written in place or renamed over the file, as editors and GitOps tools do.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp.test_utils import TestServer
from conftest import MakeSidecar, Running, base_config

from sidecar.auth.keys import display_form, generate_key
from sidecar.auth.models import KeyRecord
from sidecar.auth.verify import password_hasher
from sidecar.store import SqliteStore, YamlStore
from sidecar.store.yamlfile import _yaml_problem

CHEAP = password_hasher("cheapest")
POLL = 0.1  # seconds: the store's poll interval in these tests
SECRETISH = re.compile(r"\$argon2|[0-9a-f]{40}")


def new_key(name: str) -> tuple[KeyRecord, str]:
    key, parts = generate_key("pmcp_")
    rec = KeyRecord(
        id=parts.key_id, name=name, hash=CHEAP.hash(parts.secret), display=display_form("pmcp_", parts.key_id, key)
    )
    return rec, key


def keys_text(records: list[KeyRecord]) -> str:
    return yaml.safe_dump({"keys": [r.to_dict() for r in records]}, sort_keys=False)


def replace_atomically(path: Path, text: str) -> None:
    """What editors (vim's backupcopy=no, VS Code) and GitOps tools do: write a temporary file, rename it over."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


async def status(r: Running, key: str) -> tuple[int, str]:
    resp = await r.proxy.get("/identity", headers={"X-Plex-Token": key})
    code = "" if resp.status == 200 else (await resp.json())["error"]["code"]
    return resp.status, code


async def wait_status(r: Running, key: str, want: tuple[int, str], timeout: float = 2.0) -> float:
    started = time.monotonic()
    while (got := await status(r, key)) != want:
        assert time.monotonic() - started < timeout, f"still {got}, wanted {want}"
        await asyncio.sleep(0.02)
    return time.monotonic() - started


def reload_errors(r: Running) -> float | None:
    return r.sc.metrics.registry.get_sample_value("sidecar_store_reload_errors_total", {"store": "yaml"})


async def settle(polls: int = 4) -> None:
    """Let the store's poll run a few times (a rejected version must stay rejected)."""
    await asyncio.sleep(POLL * polls)


@pytest.fixture
async def yaml_sidecar(
    make_sidecar: MakeSidecar, plex_upstream: TestServer, tmp_path: Path
) -> tuple[Running, Path, list[tuple[KeyRecord, str]]]:
    keys = [new_key("alpha"), new_key("beta")]
    path = tmp_path / "keys.yaml"
    path.write_text(keys_text([r for r, _ in keys]))
    cfg = base_config(
        str(plex_upstream.make_url("")).rstrip("/"),
        tmp_path,
        store={"kind": "yaml", "path": str(path), "state_path": str(tmp_path / "state.db"), "poll_interval": POLL},
    )
    r = await make_sidecar(cfg)
    for _, k in keys:
        assert await status(r, k) == (200, "")
    return r, path, keys


async def test_broken_files_keep_the_last_good_keys_then_a_rename_recovers(
    yaml_sidecar: tuple[Running, Path, list[tuple[KeyRecord, str]]], caplog: pytest.LogCaptureFixture
) -> None:
    """Client: 200 for both keys through a truncated, an invalid, a non-UTF-8 and a removed keys file;
    then the renamed-in good file applies within the poll interval (a new key 200, a dropped one 401)."""
    r, path, keys = yaml_sidecar
    (a, ka), (b, kb) = keys
    c, kc = new_key("gamma")
    assert reload_errors(r) == 0  # present from start-up
    good = keys_text([a, b, c])
    caplog.set_level(logging.INFO, logger="sidecar.store")
    faults: dict[str, bytes | None] = {
        "truncated mid-entry (the last entry cut inside its hash field)": good[: good.rindex("hash:") + 2].encode(),
        "invalid YAML": good.replace("name: beta", "name: [beta").encode(),
        "cut inside a UTF-8 character": keys_text([a, b]).encode() + "- name: \u00e4".encode()[:-1],
        "removed": None,
    }
    for n, (what, data) in enumerate(faults.items(), start=1):
        if data is None:
            path.unlink()
        else:
            path.write_bytes(data)
        deadline = time.monotonic() + 2
        while reload_errors(r) != n:
            assert time.monotonic() < deadline, f"{what}: not counted ({reload_errors(r)})"
            await asyncio.sleep(0.02)
        await settle()
        assert reload_errors(r) == n, f"{what}: one version is counted once"
        assert await status(r, ka) == (200, ""), what
        assert await status(r, kb) == (200, ""), what
        assert await status(r, kc) == (401, "invalid_key"), f"{what}: nothing of the broken file applies"
    rejected = [rec.getMessage() for rec in caplog.records if "keys file rejected" in rec.getMessage()]
    assert len(rejected) == 4, rejected
    assert all("keeping the last good set of 2 keys" in m for m in rejected)
    assert not [m for m in rejected if SECRETISH.search(m)], rejected
    assert "not valid YAML" in rejected[1] and "line " in rejected[1]
    assert "not UTF-8" in rejected[2] and "does not exist" in rejected[3]
    # Recovery: a good version renamed over the path, without beta.
    replace_atomically(path, keys_text([a, c]))
    assert await wait_status(r, kc, (200, "")) <= 3 * POLL + 0.5
    assert await status(r, kb) == (401, "invalid_key")
    assert await status(r, ka) == (200, "")
    assert reload_errors(r) == 4
    text = await (await r.admin.get("/metrics", headers=r.admin_headers())).text()
    assert 'sidecar_store_reload_errors_total{store="yaml"} 4.0' in text


async def test_a_file_caught_mid_write_never_applies_a_prefix(tmp_path: Path) -> None:
    """A poll that reads the file while it is being written (any cut not at a line end) keeps the last
    good set; the finished write applies at the next poll."""
    old = [new_key("old")[0]]
    new = [new_key(f"new{i}")[0] for i in range(3)]
    path = tmp_path / "keys.yaml"
    path.write_text(keys_text(old))
    store = YamlStore(path, SqliteStore(tmp_path / "state.db"))
    await store.open()
    try:
        full = keys_text(new)
        cuts = [i for i in range(1, len(full)) if full[i - 1] != "\n"]
        for i in cuts[:: max(1, len(cuts) // 150)]:
            path.write_text(full[:i])
            assert await store.poll() is None, f"a prefix of {i} bytes applied: {full[:i][-40:]!r}"
            assert set(await store.load_all()) == {old[0].id}
            path.write_text(keys_text(old))  # the writer "rewinds" so each cut is a new version
            await store.poll()
        path.write_text(full)
        changes = await store.poll()
        assert changes is not None and {r.id for r in changes.records} == {r.id for r in new}
    finally:
        await store.close()


async def test_a_file_left_without_a_final_newline_applies_once_it_settles(tmp_path: Path) -> None:
    """A hand-edited file saved without a final newline (VS Code's default) is taken at the second poll."""
    a, b = new_key("a")[0], new_key("b")[0]
    path = tmp_path / "keys.yaml"
    path.write_text(keys_text([a]))
    store = YamlStore(path, SqliteStore(tmp_path / "state.db"))
    await store.open()
    try:
        path.write_text(keys_text([a, b]).rstrip("\n"))
        assert await store.poll() is None  # first sight: maybe mid-write
        changes = await store.poll()  # unchanged for a poll: settled
        assert changes is not None and {r.id for r in changes.records} == {a.id, b.id}
        assert store.reload_errors == 0
        # SIGHUP (a forced poll) does not wait.
        path.write_text(keys_text([b]).rstrip("\n"))
        forced = await store.poll(force=True)
        assert forced is not None and [r.id for r in forced.records] == [b.id]
    finally:
        await store.close()


def test_yaml_errors_never_quote_the_file() -> None:
    """PyYAML's pure-Python parser quotes the offending line (here a hash); the store's message does not."""
    rec = new_key("x")[0]
    text = keys_text([rec]).replace("hash: ", 'hash: "', 1)
    errors: list[Any] = []
    for loader in (yaml.SafeLoader, getattr(yaml, "CSafeLoader", yaml.SafeLoader)):
        with pytest.raises(yaml.YAMLError) as e:
            yaml.load(text, Loader=loader)
        errors.append(e.value)
    assert "$argon2id" in str(errors[0])  # what the library would have logged
    for err in errors:
        msg = _yaml_problem(err)
        assert "line " in msg and not SECRETISH.search(msg), msg

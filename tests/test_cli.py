"""``sidecar keys …``: create, list, show, revoke, rotate, usage, with ``-c`` and ``--json``,
on a SQLite store and on a YAML keys file; and a YAML store reloaded on SIGHUP."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from conftest import ADMIN_TOKEN, PLEX_TOKEN

from sidecar.auth.keys import parse_key
from sidecar.auth.verify import Verifier
from sidecar.cli import main
from sidecar.config import load_config
from sidecar.demo import free_port
from sidecar.store import SqliteStore, open_store


def write_config(tmp_path: Path, **store: Any) -> Path:
    cfg = {
        "listen": "127.0.0.1:0",
        "admin": {"listen": "127.0.0.1:0"},
        "store": store or {"kind": "sqlite", "path": "sidecar.db"},
        "keys": {"argon2": "cheapest"},
        "upstreams": [
            {"id": "plex", "kind": "plex", "url": "http://127.0.0.1:32400", "token_env": "PLEX_TOKEN"},
            {"id": "tools", "kind": "mcp", "url": "http://127.0.0.1:8000", "path_prefix": "/mcp"},
        ],
        "log": {"access": "off"},
    }
    path = tmp_path / "sidecar.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture
def cfg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("PLEX_TOKEN", PLEX_TOKEN)
    return write_config(tmp_path)


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def run_json(capsys: pytest.CaptureFixture[str], *argv: str) -> Any:
    code, out, err = run(capsys, *argv, "--json")
    assert code == 0, err
    return json.loads(out)


async def verify(config_path: Path, key: str) -> str:
    """What a sidecar started on this config would say about ``key``."""
    config = load_config(config_path, env={**os.environ, "PLEX_TOKEN": PLEX_TOKEN})
    store = await open_store(config.store)
    try:
        v = Verifier(store, config.keys)
        await v.load()
        try:
            return (await v.verify(key, "127.0.0.1")).id
        except Exception as e:
            return getattr(e, "code", type(e).__name__)
    finally:
        await store.close()


# ---------------------------------------------------------------------------- SQLite store


def test_create_list_show_revoke_json(cfg: Path, capsys: pytest.CaptureFixture[str]) -> None:
    created = run_json(
        capsys, "keys", "create", "-c", str(cfg), "--name", "living room", "--owner", "ann",
        "--upstream", "plex", "--path", "plex:playback", "--method", "get", "--rate", "60/minute",
        "--quota", "10000/month", "--expires", "90d", "--tool", "tools:search_*",
    )  # fmt: skip
    key, kid = created["key"], created["id"]
    assert parse_key("pmcp_", key) is not None and kid in key
    assert created["permissions"] == {"upstreams": ["plex"], "methods": ["GET"], "paths": ["plex:playback"],
                                      "tools": {"tools": ["search_*"]}}  # fmt: skip
    assert created["rate_limits"] == ["60/minute"] and created["quota"] == "10000/month"
    expires = time.mktime(time.strptime(created["expires_at"][:19], "%Y-%m-%dT%H:%M:%S")) - time.timezone
    assert abs(expires - (time.time() + 90 * 86400)) < 120
    assert asyncio.run(verify(cfg, key)) == kid

    listed = run_json(capsys, "keys", "list", "-c", str(cfg))
    assert [k["id"] for k in listed] == [kid] and key not in json.dumps(listed)
    shown = run_json(capsys, "keys", "show", kid, "-c", str(cfg))
    assert shown["name"] == "living room" and "key" not in shown
    revoked = run_json(capsys, "keys", "revoke", kid, "-c", str(cfg))
    assert revoked["state"] == "revoked"
    assert asyncio.run(verify(cfg, key)) == "revoked_key"
    assert run_json(capsys, "keys", "list", "-c", str(cfg))[0]["state"] == "revoked"  # stays listed


def test_text_output_shows_the_key_once_and_never_a_hash(cfg: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "keys", "create", "-c", str(cfg), "--name", "tv")
    assert code == 0 and "shown once" in out
    key = next(w for w in out.split() if w.startswith("pmcp_") and len(w) == 73)
    kid = key[5:17]
    transcript = out
    for argv in (("list",), ("show", kid), ("usage", kid), ("rotate", kid), ("revoke", kid)):
        code, out, err = run(capsys, "keys", *argv, "-c", str(cfg))
        assert code == 0, (argv, err)
        transcript += out
        if argv[0] in ("list", "show", "usage", "revoke"):
            assert key not in out
    for argv in (("list",), ("show", kid), ("usage", kid)):
        transcript += json.dumps(run_json(capsys, "keys", *argv, "-c", str(cfg)))
    assert kid in transcript and "$argon2" not in transcript
    assert f"{kid}" in run(capsys, "keys", "list", "-c", str(cfg))[1]


def test_rotate_with_grace(cfg: Path, capsys: pytest.CaptureFixture[str]) -> None:
    old = run_json(capsys, "keys", "create", "-c", str(cfg), "--name", "phone", "--path", "plex:read")
    new = run_json(capsys, "keys", "rotate", old["id"], "--grace", "1h", "-c", str(cfg))
    assert new["id"] != old["id"] and new["permissions"] == old["permissions"] and new["name"] == "phone"
    shown = run_json(capsys, "keys", "show", old["id"], "-c", str(cfg))
    assert shown["rotated_to"] == new["id"] and shown["state"] == "active"
    ends = time.mktime(time.strptime(shown["revoked_at"][:19], "%Y-%m-%dT%H:%M:%S")) - time.timezone
    assert abs(ends - (time.time() + 3600)) < 120
    assert asyncio.run(verify(cfg, old["key"])) == old["id"]  # still works during the grace
    assert asyncio.run(verify(cfg, new["key"])) == new["id"]
    # Grace of a second: then the old key is refused.
    short = run_json(capsys, "keys", "create", "-c", str(cfg), "--name", "short")
    run_json(capsys, "keys", "rotate", short["id"], "--grace", "1s", "-c", str(cfg))
    time.sleep(1.1)
    assert asyncio.run(verify(cfg, short["key"])) == "revoked_key"


def test_usage(cfg: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from sidecar.observe.usage import day_of
    from sidecar.store.base import UsageRow

    created = run_json(capsys, "keys", "create", "-c", str(cfg), "--name", "u")

    async def seed() -> None:
        store = SqliteStore(cfg.parent / "sidecar.db")
        await store.open()
        try:
            await store.add_usage({(created["id"], day_of(time.time())): UsageRow(requests=5, errors=1, bytes=99)})
            await store.record_last_used({created["id"]: (time.time(), "192.0.2.4")})
        finally:
            await store.close()

    asyncio.run(seed())
    data = run_json(capsys, "keys", "usage", created["id"], "-c", str(cfg))
    assert data["last_used_ip"] == "192.0.2.4" and data["days"][0]["requests"] == 5
    code, out, _ = run(capsys, "keys", "usage", created["id"], "-c", str(cfg))
    assert code == 0 and "192.0.2.4" in out and "5" in out


def test_errors_and_exit_codes(cfg: Path, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, _, err = run(capsys, "keys", "show", "000000000000", "-c", str(cfg))
    assert code == 1 and "no key with id" in err
    code, _, err = run(capsys, "keys", "create", "-c", str(cfg), "--name", "x", "--expires", "soonish")
    assert code == 1 and "expires" in err
    code, _, err = run(capsys, "keys", "create", "-c", str(cfg), "--name", "x", "--upstream", "ghost")
    assert code == 1 and "ghost" in err
    code, _, err = run(capsys, "keys", "create", "-c", str(cfg), "--name", "x", "--tool", "no-colon")
    assert code == 1 and "UPSTREAM:TOOL" in err
    bad = tmp_path / "bad.yaml"
    bad.write_text("upstreams: []\nlisten: nowhere\n")
    code, _, err = run(capsys, "keys", "list", "-c", str(bad))
    assert code == 2 and "upstreams:" in err and "listen:" in err


def test_keys_commands_do_not_need_upstream_secrets(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("PLEX_TOKEN", raising=False)
    path = write_config(tmp_path)
    created = run_json(capsys, "keys", "create", "-c", str(path), "--name", "no-env")
    assert created["id"]
    code, _, err = run(capsys, "config", "check", "-c", str(path))  # serving does need them
    assert code == 2 and "PLEX_TOKEN" in err


# ---------------------------------------------------------------------------- YAML store


def test_yaml_create_prints_the_entry_to_paste(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                               monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    monkeypatch.setenv("PLEX_TOKEN", PLEX_TOKEN)
    keys_file = tmp_path / "keys.yaml"
    keys_file.write_text("keys:\n")
    path = write_config(tmp_path, kind="yaml", path="keys.yaml", state_path="state.db")

    code, out, err = run(capsys, "keys", "create", "-c", str(path), "--name", "gitops", "--path", "plex:read")
    assert code == 0, err
    assert "Add this entry" in out and "$argon2id$" in out  # the entry holds the hash: that is the point
    key = next(w for w in out.split() if w.startswith("pmcp_") and len(w) == 73)
    entry = out.split("(it holds only the hash):\n", 1)[1].split("\n\n", 1)[0]
    assert key not in entry
    keys_file.write_text("keys:\n" + entry + "\n")  # the operator pastes it
    assert asyncio.run(verify(path, key)) == key[5:17]

    data = run_json(capsys, "keys", "create", "-c", str(path), "--name", "json")
    assert data["key"] and data["entry"].startswith("- id: ")
    assert run_json(capsys, "keys", "list", "-c", str(path))[0]["name"] == "gitops"

    code, _, err = run(capsys, "keys", "revoke", key[5:17], "-c", str(path))
    assert code == 1 and "keys.yaml" in err  # edit the file instead
    code, out, err = run(capsys, "keys", "rotate", key[5:17], "--grace", "1h", "-c", str(path))
    assert code == 0, err
    assert f"give key {key[5:17]} `revoked_at:" in out and "- id: " in out


# ---------------------------------------------------------------------------- a served YAML store and SIGHUP


@pytest.mark.slow
async def test_serve_reloads_the_yaml_store_on_sighup(tmp_path: Path) -> None:
    from sidecar.auth.keys import display_form, generate_key
    from sidecar.auth.models import KeyRecord
    from sidecar.auth.verify import password_hasher

    key, parts = generate_key("pmcp_")
    rec = KeyRecord(id=parts.key_id, name="aaaa", hash=password_hasher("cheapest").hash(parts.secret),
                    display=display_form("pmcp_", parts.key_id, key))  # fmt: skip
    keys_file = tmp_path / "keys.yaml"
    keys_file.write_text(yaml.safe_dump({"keys": [rec.to_dict()]}, sort_keys=False))
    admin_port = free_port()
    cfg = {
        "listen": f"127.0.0.1:{free_port()}",
        "admin": {"listen": f"127.0.0.1:{admin_port}"},
        "store": {"kind": "yaml", "path": "keys.yaml", "state_path": "state.db", "poll_interval": "1h"},
        "keys": {"argon2": "cheapest"},
        "upstreams": [{"id": "plex", "kind": "plex", "url": "http://127.0.0.1:9", "token_env": "PLEX_TOKEN"}],
        "log": {"access": "off"},
    }
    path = tmp_path / "sidecar.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "PLEX_TOKEN": PLEX_TOKEN, "SIDECAR_ADMIN_TOKEN": ADMIN_TOKEN}
    proc = subprocess.Popen([sys.executable, "-m", "sidecar", "serve", "-c", str(path)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
    url = f"http://127.0.0.1:{admin_port}/admin/keys/{rec.id}"
    headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    try:
        async with aiohttp.ClientSession() as session:

            async def name(deadline: float) -> str:
                end = time.monotonic() + deadline
                while True:
                    try:
                        async with session.get(url, headers=headers) as resp:
                            if resp.status == 200:
                                return str((await resp.json())["data"]["name"])
                    except aiohttp.ClientConnectionError:
                        pass
                    if time.monotonic() > end or proc.poll() is not None:
                        raise AssertionError("the sidecar did not answer")
                    await asyncio.sleep(0.05)

            assert await name(30) == "aaaa"
            # An in-place edit that keeps size and mtime: polling cannot see it (and polls hourly here).
            st = os.stat(keys_file)
            keys_file.write_text(keys_file.read_text().replace("name: aaaa", "name: bbbb"))
            os.utime(keys_file, ns=(st.st_atime_ns, st.st_mtime_ns))
            await asyncio.sleep(0.3)
            assert await name(1) == "aaaa"
            proc.send_signal(signal.SIGHUP)
            end = time.monotonic() + 1.5
            while await name(1) != "bbbb":
                assert time.monotonic() < end, "SIGHUP did not reload the keys file"
                await asyncio.sleep(0.05)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        assert proc.stderr is not None
        proc.stderr.close()


@pytest.mark.parametrize("token", ["admin-token-for-tests", "x" * 31])
def test_config_check_warns_of_an_admin_token_too_short_to_resist_guessing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, token: str
) -> None:
    """The admin token is compared before the failed-attempt throttle (no operator is locked out), so its
    length is all that stops a guesser: under 32 characters ``config check`` (and ``serve``) warn, naming the
    variable and the length, never the value."""
    monkeypatch.setenv("PLEX_TOKEN", PLEX_TOKEN)
    monkeypatch.setenv("SIDECAR_ADMIN_TOKEN", token)
    code, _, err = run(capsys, "config", "check", "-c", str(write_config(tmp_path)))
    assert code == 0
    assert f"warning: the admin token (SIDECAR_ADMIN_TOKEN) has {len(token)} characters" in err
    assert token not in err
    monkeypatch.setenv("SIDECAR_ADMIN_TOKEN", "y" * 64)
    code, _, err = run(capsys, "config", "check", "-c", str(write_config(tmp_path)))
    assert code == 0 and "admin token" not in err


def test_config_check_warns_of_intervals_that_stretch_revocation(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """DESIGN invariant 5 (1 s for new requests, 5 s for open streams) rests on two intervals an operator may
    raise: ``config check`` says what the contract becomes, and still accepts the file."""
    monkeypatch.setenv("PLEX_TOKEN", PLEX_TOKEN)
    path = write_config(tmp_path, kind="sqlite", path="sidecar.db", poll_interval="3s")
    text = path.read_text() + "keys:\n  argon2: cheapest\n  stream_check_interval: 4s\n"
    path.write_text(text.replace("keys:\n  argon2: cheapest\n", "", 1))
    code, _, err = run(capsys, "config", "check", "-c", str(path))
    assert code == 0, err
    assert "store.poll_interval is 3s: a revoked key's new requests are refused up to 3s late" in err
    assert "open streams run up to 7s (the contract says 5s)" in err
    code, _, err = run(capsys, "config", "check", "-c", str(write_config(tmp_path)))
    assert code == 0 and "contract" not in err

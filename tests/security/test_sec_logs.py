"""No full key, token or hash in any log line, ours or a library's, at any level (issue 14.11,
invariant 7).

What leaked: ``?X-Plex-Token%20=<key>`` and ``?foo=<another key>`` were logged whole;
aiohttp's traceback for a malformed header line printed the raw line with the key; at
debug level aiosqlite logged whole rows with argon2 hashes. Here everything is captured —
every logger at DEBUG in-process, and a real ``sidecar serve`` process's stderr and access
log — while those requests are sent, and no key, key body, token or hash may appear.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from conftest import ADMIN_TOKEN, PLEX_TOKEN, MakeSidecar, Running, base_config

from sidecar.demo import plex_like_app
from sidecar.http.accesslog import redact_path
from sidecar.observe.logfilter import redact

MCP_SECRET = "mcp-upstream-bearer-secret-77"


def leaks(text: str, keys: list[str]) -> list[str]:
    """Every secret (or key body) found in ``text``."""
    found = [k for k in keys if k in text or k[5:] in text]
    found += [s for s in (PLEX_TOKEN, ADMIN_TOKEN, MCP_SECRET) if s in text]
    if "$argon2" in text:
        found.append("an argon2 hash")
    return found


def attacks(key_a: str, key_b: str) -> list[bytes]:
    """Raw requests that carry keys where the sidecar used to log them."""
    enc_b = "".join(f"%{ord(c):02x}" for c in key_b)  # every character percent-encoded
    targets = [
        f"/identity?X-Plex-Token%20={key_a}",
        f"/identity?foo={key_b}",
        f"/identity?%20X-Plex-Token+={key_a}&x=1",
        f"/photo/:/transcode?url=%2Flibrary%3Ffoo%3D{key_b}",
        f"/identity?foo={enc_b}",
        f"/library/{key_b}/thumb",
    ]
    out = [
        f"GET {t} HTTP/1.1\r\nHost: x\r\nX-Plex-Token: {key_a}\r\nConnection: close\r\n\r\n".encode() for t in targets
    ]
    out += [
        f"GET /identity HTTP/1.1\r\nHost: x\r\nX-Plex-Token {key_a}\r\n\r\n".encode(),  # no colon
        f"GET /identity HTTP/1.1\r\nHost: x\r\nX-Plex-Token: {key_a}\x01\r\n\r\n".encode(),  # a control character
        f"GET /identity?k={key_b} HTTP/1.1\r\nHost: x\r\nX-Plex-Token: {key_a}\r\nBad Header: {key_b}\r\n\r\n".encode(),
        f"GET /identity?k={key_b} HTTP/1.7\r\nHost: x\r\n\r\n".encode(),  # an unknown version
        f"G\x00T /{key_b} HTTP/1.1\r\nHost: x\r\n\r\n".encode(),  # a broken request line
    ]
    return out


async def send_raw(host: str, port: int, data: bytes) -> bytes:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(data)
        await writer.drain()
        with contextlib.suppress(TimeoutError, ConnectionError):
            async with asyncio.timeout(1.0):
                return await reader.read()
        return b""
    finally:
        writer.close()


# ---------------------------------------------------------------------------- in-process, every logger at DEBUG


async def test_nothing_secret_in_any_log_record_at_debug(
    make_sidecar: MakeSidecar, aiohttp_server: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    up = await aiohttp_server(plex_like_app(PLEX_TOKEN))
    running: Running = await make_sidecar(base_config(str(up.make_url("")).rstrip("/"), tmp_path))
    assert logging.getLogger("aiosqlite").getEffectiveLevel() >= logging.INFO, "aiosqlite's row dumps are off"
    caplog.set_level(logging.DEBUG)
    aiosqlite = logging.getLogger("aiosqlite")
    before = aiosqlite.level
    aiosqlite.setLevel(logging.DEBUG)  # someone turns it on anyway: the hashes must still not show
    try:
        _, key_a = await running.create_key(name="a")
        _, key_b = await running.create_key(name="b")
        resp = await running.admin.post("/admin/keys", json={"name": "c"}, headers=running.admin_headers())
        key_c = (await resp.json())["data"]["key"]
        server = running.proxy.server
        for data in attacks(key_a, key_b):
            await send_raw(server.host, server.port, data)
        # A library that logs what it was handed, and an exception that carries a secret.
        logging.getLogger("aiohttp.client").debug("request headers %s", {"X-Plex-Token": PLEX_TOKEN, "k": key_c})
        try:
            raise ValueError(f"bad line {key_a!r} with {ADMIN_TOKEN}")
        except ValueError:
            logging.getLogger("aiohttp.server").exception("Error handling request")
        await asyncio.sleep(0.1)  # the access log's batch
    finally:
        aiosqlite.setLevel(before)
    keys = [key_a, key_b, key_c]
    assert caplog.records, "nothing was captured: the test would prove nothing"
    assert any(r.name.startswith("aiosqlite") for r in caplog.records), "aiosqlite's debug rows were captured"
    for record in caplog.records:
        text = f"{record.getMessage()} {record.exc_text or ''} {record.stack_info or ''}"
        assert not leaks(text, keys), f"{record.name}: {text[:300]}"
    assert not leaks(caplog.text, keys)
    access = (tmp_path / "access.log").read_text()
    assert access.count("\n") >= 6 and not leaks(access, keys), access


def test_redaction_units() -> None:
    key = "pmcp_" + "0123456789abcdef" * 4 + "0123"
    assert (
        redact(f"line {key} and $argon2id$v=19$m=65536,t=3,p=4$c2FsdA$aGFzaA end") == "line REDACTED and REDACTED end"
    )
    assert redact_path(f"/x?X-Plex-Token%20={key}") == "/x?X-Plex-Token%20=REDACTED"
    assert redact_path(f"/x?foo={key}&y=1") == "/x?foo=REDACTED&y=1"
    assert key[5:] not in redact_path("/x?foo=" + "".join(f"%{ord(c):02X}" for c in key))
    assert redact_path("/library/sections/1/all?type=1") == "/library/sections/1/all?type=1"  # nothing to hide


# ---------------------------------------------------------------------------- a real process: stderr and access log


@contextlib.asynccontextmanager
async def serve(config: Path, env: dict[str, str]) -> AsyncIterator[tuple[asyncio.subprocess.Process, list[str], str]]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "sidecar", "serve", "-c", str(config),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE, env=env,
    )  # fmt: skip
    lines: list[str] = []
    listening: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    async def read() -> None:
        assert proc.stderr is not None
        async for raw in proc.stderr:
            line = raw.decode(errors="replace")
            lines.append(line)
            m = re.search(r"listening on (\S+) \(admin", line)
            if m and not listening.done():
                listening.set_result(m.group(1))
        if not listening.done():
            listening.set_exception(AssertionError("".join(lines)))

    reader = asyncio.create_task(read())
    try:
        yield proc, lines, await asyncio.wait_for(listening, 30)
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), 10)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        await asyncio.wait_for(reader, 10)


@pytest.mark.timeout(60)
async def test_nothing_secret_on_a_real_process_stderr_at_debug(aiohttp_server: Any, tmp_path: Path) -> None:
    up = await aiohttp_server(plex_like_app(PLEX_TOKEN))
    cfg = base_config(str(up.make_url("")).rstrip("/"), tmp_path, log={"access": str(tmp_path / "access.log"),
                                                                      "level": "debug"})  # fmt: skip
    cfg["upstreams"].append({"id": "tools", "kind": "mcp", "url": "http://127.0.0.1:9", "path_prefix": "/mcp-tools",
                             "headers": {"Authorization": "Bearer ${MCP_SECRET}"}})  # fmt: skip
    config = tmp_path / "sidecar.yaml"
    config.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "PLEX_TOKEN": PLEX_TOKEN, "SIDECAR_ADMIN_TOKEN": ADMIN_TOKEN, "MCP_SECRET": MCP_SECRET}
    keys: list[str] = []
    async with serve(config, env) as (_, stderr, proxy):
        host, port = proxy.removeprefix("http://").rsplit(":", 1)
        admin_url = None
        for line in stderr:
            if m := re.search(r"\(admin (\S+)\)", line):
                admin_url = m.group(1)
        assert admin_url is not None
        async with aiohttp.ClientSession() as session:
            for name in ("a", "b"):
                async with session.post(f"{admin_url}/admin/keys", json={"name": name},
                                        headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}) as resp:  # fmt: skip
                    assert resp.status == 201
                    keys.append((await resp.json())["data"]["key"])
            await asyncio.sleep(1.1)  # the running sidecar sees the new keys within a second
            async with session.get(f"{proxy}/identity", headers={"X-Plex-Token": keys[0]}) as resp:
                assert resp.status == 200
        for data in attacks(keys[0], keys[1]):
            await send_raw(host, int(port), data)
        await asyncio.sleep(0.2)
    text = "".join(stderr)
    assert "DEBUG" in text, "the process logged at debug level: the test would prove little otherwise"
    assert not leaks(text, keys), [line for line in stderr if leaks(line, keys)][:5]
    access = (tmp_path / "access.log").read_text()
    assert len(access.splitlines()) >= 6 and not leaks(access, keys)
    for line in access.splitlines():
        json.loads(line)  # still one JSON object a line

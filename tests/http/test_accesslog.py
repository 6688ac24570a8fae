"""The access log: one JSON line per request, with what an operator greps for and no secrets.

Requests go through a real sidecar to the Plex-like upstream in every credential form;
then the whole log file is searched for the client key and the real Plex token.
"""

from __future__ import annotations

import asyncio
import base64
import calendar
import json
import re
import time
from pathlib import Path
from urllib.parse import quote

import pytest
from conftest import PLEX_TOKEN, Running, log_lines

from sidecar.core.scope import RequestScope
from sidecar.http.accesslog import FLUSH_AFTER, MAX_LINE, MAX_PENDING, AccessLog, fit_line, redact_path


@pytest.mark.parametrize(
    ("path", "logged"),
    [
        ("/library/sections", "/library/sections"),
        ("/library/sections?X-Plex-Token=pmcp_abc", "/library/sections?X-Plex-Token=REDACTED"),
        ("/a?x-plex-token=pmcp_abc&b=2", "/a?x-plex-token=REDACTED&b=2"),
        ("/a?b=1&X-Plex-Token=pmcp_abc#frag", "/a?b=1&X-Plex-Token=REDACTED#frag"),
        ("/a?access_token=abc;api_key=def", "/a?access_token=REDACTED;api_key=REDACTED"),
        (
            "/photo/:/transcode?url=/library/metadata/1/thumb?X-Plex-Token%3Dpmcp_abc%26w%3D1&width=100",
            "/photo/:/transcode?url=/library/metadata/1/thumb?X-Plex-Token%3DREDACTED%26w%3D1&width=100",
        ),
        ("/p?url=%2Fthumb%3FX-Plex-Token%3Dpmcp_abc", "/p?url=%2Fthumb%3FX-Plex-Token%3DREDACTED"),
        ("/tokens/list?monkey=1", "/tokens/list?monkey=1"),  # names inside other names stay
    ],
)
def test_redact_path(path: str, logged: str) -> None:
    assert redact_path(path) == logged


async def test_one_line_per_request_and_no_secret_anywhere(plex_sidecar: Running, tmp_path: Path) -> None:
    rec, key = await plex_sidecar.create_key(name="logged")
    proxy = plex_sidecar.proxy
    basic = base64.b64encode(f"user:{key}".encode()).decode()
    nested = quote(f"/library/metadata/1/thumb?X-Plex-Token={key}", safe="")
    sent: list[tuple[str, str, int]] = []  # (method, logged path, status)

    resp = await proxy.get("/library/sections", headers={"X-Plex-Token": key})
    body = await resp.read()
    sent.append(("GET", "/library/sections", resp.status))
    resp = await proxy.get(f"/library/sections?X-Plex-Token={key}")
    await resp.read()
    sent.append(("GET", "/library/sections?X-Plex-Token=REDACTED", resp.status))
    resp = await proxy.get(f"/photo/:/transcode?url={nested}&width=10", headers={"Authorization": f"Bearer {key}"})
    await resp.read()
    sent.append(("GET", "/photo/:/transcode?url=…", resp.status))
    resp = await proxy.get("/identity", headers={"Authorization": f"Basic {basic}"})
    await resp.read()
    sent.append(("GET", "/identity", resp.status))
    resp = await proxy.get("/redirect", headers={"x-api-key": key}, allow_redirects=False)
    location = resp.headers["Location"]
    sent.append(("GET", "/redirect", resp.status))
    resp = await proxy.get("/library/sections?X-Plex-Token=pmcp_wrongwrongwrong")
    sent.append(("GET", "/library/sections?X-Plex-Token=REDACTED", resp.status))
    resp = await proxy.get("/library/sections")
    sent.append(("GET", "/library/sections", resp.status))
    async with proxy.ws_connect(f"/:/websockets/notifications?X-Plex-Token={key}") as ws:
        await ws.receive(timeout=5)
    sent.append(("GET", "/:/websockets/notifications?X-Plex-Token=REDACTED", 101))

    log_file = tmp_path / "access.log"
    lines = await log_lines(log_file, len(sent))
    assert len(lines) == len(sent), lines
    assert PLEX_TOKEN not in location  # scrubbed (to the client's own key, which the client already has)
    for line, (method, path, status) in zip(lines, sent, strict=True):
        assert {"time", "client_ip", "method", "path", "status", "bytes", "duration_ms", "upstream"} <= set(line)
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", line["time"])
        assert line["client_ip"] == "127.0.0.1"
        assert line["method"] == method
        assert line["status"] == status
        assert line["upstream"] == "plex"
        assert isinstance(line["duration_ms"], float) and line["duration_ms"] >= 0
        if not path.endswith("…"):
            assert line["path"] == path
    assert lines[0]["bytes"] == len(body) and lines[0]["key"] == rec.id
    assert "X-Plex-Token%3DREDACTED" in lines[2]["path"]
    assert [line["status"] for line in lines[5:7]] == [401, 401]
    assert lines[5]["error"] == "invalid_key" and lines[6]["error"] == "unauthorized"

    text = log_file.read_text()
    assert key not in text
    assert key.split("_", 1)[1] not in text  # not even the key's body without its prefix
    assert PLEX_TOKEN not in text
    assert "pmcp_wrongwrongwrong" not in text


def test_off_writes_nothing_and_a_closed_stream_never_raises(tmp_path: Path) -> None:
    scope = RequestScope(method="GET", path="/x", client_ip="127.0.0.1")
    off = AccessLog("off")
    off.write(scope)
    off.close()
    target = tmp_path / "a.log"
    log = AccessLog(str(target))
    log.write(scope)
    assert json.loads(target.read_text())["path"] == "/x"
    assert log.stream is not None
    log.stream.close()  # e.g. a rotated-away file closed under us
    log.write(scope)  # must not fail the request
    log.close()


def test_stdout_target(capsys: pytest.CaptureFixture[str]) -> None:
    log = AccessLog("stdout")
    log.write(RequestScope(method="POST", path="/y", client_ip="10.0.0.1"))
    out = capsys.readouterr().out
    entry = json.loads(out)
    assert entry["method"] == "POST" and entry["client_ip"] == "10.0.0.1" and out.endswith("\n")


async def test_a_key_under_an_unknown_parameter_name_is_redacted(plex_sidecar: Running, tmp_path: Path) -> None:
    """The literal key never reaches the log, whatever the parameter it hides in is called."""
    _, key = await plex_sidecar.create_key(name="odd-param")
    resp = await plex_sidecar.proxy.get(f"/library/sections?myOwnParam={key}", headers={"X-Plex-Token": key})
    assert resp.status == 200
    lines = await log_lines(tmp_path / "access.log", 1)
    assert lines[-1]["path"] == "/library/sections?myOwnParam=REDACTED"
    assert key not in (tmp_path / "access.log").read_text()


async def test_lines_are_batched_and_out_within_the_flush_delay(tmp_path: Path) -> None:
    target = tmp_path / "batched.log"
    log = AccessLog(str(target))
    for i in range(3):
        log.write(RequestScope(method="GET", path=f"/{i}", client_ip="127.0.0.1"))
    await asyncio.sleep(0)
    assert target.read_text() == ""  # gathered, not yet written ...
    started = time.monotonic()
    lines = await log_lines(target, 3)  # ... until the flush delay is up
    assert [x["path"] for x in lines] == ["/0", "/1", "/2"]
    assert time.monotonic() - started < FLUSH_AFTER + 1.0
    for i in range(MAX_PENDING):  # a full batch goes out at once
        log.write(RequestScope(method="GET", path=f"/full/{i}", client_ip="127.0.0.1"))
    assert len(target.read_text().splitlines()) == 3 + MAX_PENDING
    log.write(RequestScope(method="GET", path="/last", client_ip="127.0.0.1"))
    log.close()  # shutdown flushes what is pending
    assert json.loads(target.read_text().splitlines()[-1])["path"] == "/last"


def test_timestamps_are_utc_milliseconds() -> None:
    log = AccessLog("off")
    before = time.time()
    stamp = log._now()
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", stamp)
    parsed = calendar.timegm(time.strptime(stamp[:19], "%Y-%m-%dT%H:%M:%S")) + int(stamp[20:23]) / 1000
    assert before - 0.002 <= parsed <= time.time() + 0.002


FIELDS = ["method", "path", "client_ip", "upstream", "key", "error", "cache", "tool", "credential"]
FILLS = {
    "ascii": "a" * 9000,
    "two-byte": "é" * 5000,  # 2 bytes each: a byte budget falls inside one half the time
    "three-byte": "ab✓" * 3000,
    "four-byte": "x😀" * 3000,
    "escaped": 'q"\\\n\x01' * 2000,  # JSON escapes: 2 to 6 bytes per character
}


@pytest.mark.parametrize("fill", FILLS)
@pytest.mark.parametrize("field", FIELDS)
def test_an_oversized_line_is_cut_to_one_valid_pipe_write(field: str, fill: str) -> None:
    """Every string field a client can lengthen, with every kind of character at the cut."""
    entry: dict[str, object] = {"time": "2025-01-31T12:00:00.123Z", "client_ip": "10.0.0.1", "method": "GET"}
    entry |= {"path": "/short", "status": 200, "bytes": 12, "duration_ms": 1.5, "upstream": "plex", "key": None}
    entry[field] = FILLS[fill]
    raw = fit_line(entry)
    assert len(raw) + 1 <= MAX_LINE == 4096
    assert len(raw) + 1 > MAX_LINE - 8  # cut to fit, not far below it (at most one escape's worth)
    got = json.loads(raw.decode("utf-8"))  # strict UTF-8: no character split
    assert got["truncated"] is True
    assert got[field].endswith("…") and FILLS[fill].startswith(got[field][:-1])
    assert {k: v for k, v in got.items() if k not in (field, "truncated")} == {
        k: v for k, v in entry.items() if k != field
    }  # the other fields whole


def test_the_longest_fields_are_cut_to_a_common_cap_and_a_fitting_line_is_untouched() -> None:
    entry = {"time": "t", "path": "p" * 6000, "tool": "t" * 500, "method": "GET", "status": 200}
    got = json.loads(fit_line(entry))
    assert got["tool"] == "t" * 500 and 3400 < len(got["path"]) < 3600 and got["path"].endswith("…")
    both = json.loads(fit_line({"time": "t", "path": "p" * 6000, "tool": "t" * 6000}))
    assert both["path"].endswith("…") and both["tool"].endswith("…")
    assert abs(len(both["path"]) - len(both["tool"])) <= 1  # both keep their start, alike
    small = {"time": "t", "path": "/x" * 100}
    assert fit_line(small) == json.dumps(small, separators=(",", ":")).encode()


def test_a_long_request_is_logged_whole_and_marked(tmp_path: Path) -> None:
    target = tmp_path / "long.log"
    log = AccessLog(str(target))
    log.shared = True  # as under workers: N, through os.write
    log.write(RequestScope(method="GET", path="/é" * 5000, client_ip="127.0.0.1", tool="t" * 5000))
    log.write(RequestScope(method="GET", path="/short", client_ip="127.0.0.1"))
    log.close()
    lines = target.read_bytes().split(b"\n")
    assert lines.pop() == b"" and len(lines) == 2
    assert all(len(line) + 1 <= MAX_LINE for line in lines)
    first, second = (json.loads(line) for line in lines)
    assert first["truncated"] is True and first["path"].startswith("/é/é") and first["path"].endswith("…")
    assert second["path"] == "/short" and "truncated" not in second

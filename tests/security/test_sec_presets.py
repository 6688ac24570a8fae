"""The Plex presets are explicit tables, path × methods, and no broader (issue 14.6).

``plex:playback`` used to allow every method on ``/status/sessions*`` and ``/transcode/*``:
every user's history, ending other people's streams. Every row of every preset is tested
here, allowed and refused; a completeness check makes a new row without its two cases fail,
and docs/keys.md must print exactly the rows the code has.
"""

from __future__ import annotations

import fnmatch
import re
from pathlib import Path

import pytest
from aiohttp.test_utils import TestServer
from conftest import Running

from sidecar.auth.models import Permissions
from sidecar.auth.permissions import allowed
from sidecar.auth.presets import PLEX_READ_EXCLUDED, PRESET_ROWS
from sidecar.demo import SEEN

DOCS = Path(__file__).resolve().parents[2] / "docs" / "keys.md"
R, P, A = "plex:read", "plex:playback", "plex:admin"

# (preset, method, path, allowed?) — at least one allowed and one refused case per row.
CASES: list[tuple[str, str, str, bool]] = [
    # plex:read
    (R, "GET", "/", True), (R, "POST", "/", False),
    (R, "HEAD", "/identity", True), (R, "PUT", "/identity", False),
    (R, "GET", "/library/sections/1/all", True), (R, "HEAD", "/library/metadata/1", True),
    (R, "DELETE", "/library/metadata/1", False), (R, "PUT", "/library/sections/1", False),
    (R, "GET", "/hubs/search", True), (R, "POST", "/hubs/promoted", False),
    (R, "GET", "/search", True), (R, "POST", "/search", False),
    (R, "GET", "/playlists/1/items", True), (R, "POST", "/playlists", False), (R, "DELETE", "/playlists/1", False),
    (R, "GET", "/photo/:/transcode", True), (R, "POST", "/photo/:/transcode", False),
    (R, "GET", "/media/providers", True), (R, "POST", "/media/providers", False),
    (R, "GET", "/servers", True), (R, "DELETE", "/servers/x", False),
    (R, "GET", "/:/websockets/notifications", True), (R, "POST", "/:/websockets/notifications", False),
    (R, "GET", "/:/eventsource/notifications", True), (R, "PUT", "/:/eventsource/notifications", False),
    (R, "GET", "/status/sessions", True), (R, "DELETE", "/status/sessions", False),
    (R, "OPTIONS", "/library/sections", False),
    # plex:read exclusions: state-changing GETs and the media itself
    (R, "GET", "/library/sections/1/refresh", False), (R, "GET", "/library/metadata/1/analyze", False),
    (R, "GET", "/library/sections/1/emptyTrash", False), (R, "GET", "/library/optimize", False),
    (R, "GET", "/library/clean/bundles", False), (R, "GET", "/library/metadata/1/matches", False),
    (R, "GET", "/library/metadata/1/unmatch", False), (R, "GET", "/library/metadata/1/scrobble", False),
    (R, "GET", "/library/metadata/1/unscrobble", False), (R, "GET", "/library/metadata/1/timeline", False),
    (R, "GET", "/library/metadata/1/progress", False), (R, "GET", "/library/parts/1/file.mkv", False),
    (R, "GET", "/library/streams/1", False),
    (R, "GET", "/status/sessions/history/all", False), (R, "GET", "/status/sessions/terminate", False),
    (R, "GET", "/video/:/transcode/universal/start.m3u8", False), (R, "GET", "/:/timeline", False),
    # plex:playback: every read row, plus its own
    (P, "GET", "/library/sections/1/all", True), (P, "GET", "/library/sections/1/refresh", False),
    (P, "GET", "/library/parts/1/file.mkv", True), (P, "PUT", "/library/parts/1", True),
    (P, "DELETE", "/library/parts/1", False), (P, "POST", "/library/parts/1", False),
    (P, "GET", "/library/streams/1", True), (P, "PUT", "/library/streams/1", False),
    (P, "GET", "/video/:/transcode/universal/start.m3u8", True),
    (P, "POST", "/video/:/transcode/universal/start", False),
    (P, "DELETE", "/video/:/transcode/universal/session/x", False),
    (P, "GET", "/audio/:/transcode/universal/start.m3u8", True), (P, "POST", "/audio/:/transcode/universal/x", False),
    (P, "GET", "/music/:/transcode/universal/start.mpd", True), (P, "PUT", "/music/:/transcode/universal/x", False),
    (P, "GET", "/:/timeline", True), (P, "DELETE", "/:/timeline", False),
    (P, "GET", "/:/scrobble", True), (P, "POST", "/:/scrobble", False),
    (P, "GET", "/:/unscrobble", True), (P, "PUT", "/:/unscrobble", False),
    (P, "GET", "/:/progress", True), (P, "DELETE", "/:/progress", False),
    (P, "PUT", "/:/rate", True), (P, "DELETE", "/:/rate", False),
    (P, "POST", "/playQueues", True), (P, "PUT", "/playQueues/1", True), (P, "DELETE", "/playQueues/1/items/2", True),
    (P, "GET", "/playQueues/1", True), (P, "PATCH", "/playQueues/1", False),
    (P, "GET", "/player/playback/play", True), (P, "POST", "/player/playback/play", True),
    (P, "DELETE", "/player/x", False),
    # ... and nothing beyond (the findings of issue 14.6)
    (P, "GET", "/status/sessions", True),
    (P, "GET", "/status/sessions/history/all", False), (P, "GET", "/status/sessions/terminate", False),
    (P, "DELETE", "/status/sessions/1", False), (P, "DELETE", "/status/sessions", False),
    (P, "DELETE", "/transcode/sessions/abc", False), (P, "GET", "/transcode/sessions", False),
    (P, "GET", "/:/prefs", False), (P, "PUT", "/:/prefs", False), (P, "POST", "/playlists", False),
    # plex:admin: everything but token minting
    (A, "DELETE", "/library/metadata/1", True), (A, "PATCH", "/anything/at/all", True),
    (A, "DELETE", "/transcode/sessions/abc", True), (A, "GET", "/status/sessions/history/all", True),
    (A, "GET", "/security/token", False), (A, "POST", "/myplex/account", False),
]  # fmt: skip


@pytest.mark.parametrize(("preset", "method", "path", "ok"), CASES)
def test_every_preset_row(preset: str, method: str, path: str, ok: bool) -> None:
    reason = allowed(Permissions.from_dict({"paths": [preset]}), "plex", "plex", method, path)
    assert (reason is None) is ok, f"{preset} {method} {path}: {reason}"


def _rows() -> list[tuple[str, str, tuple[str, ...]]]:
    return [(preset, glob, methods) for preset, rows in PRESET_ROWS.items() for glob, methods in rows]


@pytest.mark.parametrize(("preset", "glob", "methods"), _rows())
def test_every_row_has_an_allowed_and_a_refused_case(preset: str, glob: str, methods: tuple[str, ...]) -> None:
    """A row added without its cases above fails here."""
    cases = [(m, p, ok) for pr, m, p, ok in CASES if pr == preset and fnmatch.fnmatchcase(p, glob)]
    assert any(ok and (m in methods or "*" in methods) for m, _, ok in cases), f"no allowed case for {glob}"
    if "*" not in methods:
        assert any(not ok and m not in methods for m, _, ok in cases), f"no refused-method case for {glob}"


def test_docs_print_exactly_the_rows_of_the_code() -> None:
    text = DOCS.read_text()
    documented = [
        (m.group(1), m.group(2), tuple(x.strip() for x in m.group(3).split(",")))
        for m in re.finditer(r"^\| `(plex:\w+)` \| `([^`]+)` \| ([A-Z*, ]+) \|$", text, re.MULTILINE)
    ]
    assert documented == _rows()
    for glob in PLEX_READ_EXCLUDED:
        assert f"`{glob}`" in text, glob


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/status/sessions/history/all"),
        ("GET", "/status/sessions/terminate?sessionId=abc&reason=bye"),
        ("DELETE", "/status/sessions/1"),
        ("DELETE", "/transcode/sessions/abc"),
    ],
)
async def test_playback_key_cannot_see_history_or_end_streams(
    plex_sidecar: Running, plex_upstream: TestServer, method: str, path: str
) -> None:
    """The client sees 403 insufficient_permissions; Plex never sees the request."""
    _, key = await plex_sidecar.create_key(permissions={"upstreams": ["plex"], "paths": ["plex:playback"]})
    before = len(plex_upstream.app[SEEN])
    resp = await plex_sidecar.proxy.request(method, path, headers={"X-Plex-Token": key})
    assert resp.status == 403 and (await resp.json())["error"]["code"] == "insufficient_permissions"
    assert len(plex_upstream.app[SEEN]) == before

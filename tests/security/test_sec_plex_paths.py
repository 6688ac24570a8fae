"""Transcode sessions belong to keys, whatever the spelling (issue 14.2, 14.9; DESIGN invariants 2, 4).

An attacker holding a playback key of their own tries to reach, take over or evict the
transcode session another key started: with ``//`` anywhere in the path, encoded slashes,
odd case, a repeated or empty ``session`` parameter, the id in a header, or by flooding
claims while rate limited. And with ``path_prefix: /plex``, an encoded prefix
(``/%70lex/…``) must be stripped as the segment the router matched.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from conftest import PLEX_TOKEN, MakeSidecar, Running, base_config
from multidict import MultiDict
from plexrig import Recorder, raw_request, recording_handler, rig

from sidecar.core.errors import BadRequest, Forbidden, ServiceUnavailable
from sidecar.upstreams.transcode import TranscodeSessions

PLAYBACK = {"upstreams": ["plex"], "paths": ["plex:playback"]}
START = "/video/:/transcode/universal/start.m3u8"

__all__ = ["rig"]  # the fixture, from plexrig: pytest finds it here


async def send(running: Running, target: str, key: str | None = None, **headers: str) -> Any:
    hdrs = [(k.replace("_", "-"), v) for k, v in headers.items()]
    if key:
        hdrs.append(("X-Plex-Token", key))
    return await raw_request(running.proxy.server.host, running.proxy.server.port, "GET", target, hdrs)


async def started_by_a(running: Running, rec: Recorder) -> tuple[str, str]:
    """Key A starts session S; returns (A, B) where B is another playback key."""
    _, a = await running.create_key(permissions=PLAYBACK)
    _, b = await running.create_key(permissions=PLAYBACK)
    ans = await send(running, f"{START}?session=S&path=/library/metadata/1", a)
    assert ans.status == 200 and b"session/S/base/index.m3u8" in ans.body
    return a, b


SPELLINGS = [
    "//video/:/transcode/universal/session/S/0.ts",
    "/video//:/transcode/universal/session/S/0.ts",
    "/video/://transcode/universal/session/S/0.ts",
    "/video/:/transcode/universal//session/S/0.ts",
    "/video/:/transcode/universal/session//S/0.ts",
    "/video/:/transcode/universal/session/S//0.ts",
    "/video/:/transcode/universal/session/S",
    "/VIDEO/:/Transcode/Universal/Session/S/0.ts",
    "/video/%3A/transcode/universal/session/S/0.ts",
    "/video/:/transcode/universal/session/%53/0.ts",
    "/video/:/transcode/universal/session%2FS/0.ts",
    "/video/:/transcode/universal/session%2F%2FS/0.ts",
    "/video%2F%2F:/transcode/universal/session/S/0.ts",
    "/video/:/transcode/universal/session\\S/0.ts",
    "//video/:/transcode/universal/ping?session=S",
    "/video/:/transcode/universal//stop?session=S",
    f"/{START}?session=S",
]


@pytest.mark.parametrize("target", SPELLINGS)
async def test_another_key_cannot_reach_a_session_by_any_spelling(rig: tuple[Running, Recorder], target: str) -> None:
    """Key B gets 403 insufficient_permissions for A's session S however the path is spelled,
    and the upstream never sees the request."""
    running, rec = rig
    _, b = await started_by_a(running, rec)
    before = len(rec.seen)
    ans = await send(running, target, b)
    assert ans.status == 403, (target, ans.status, ans.body)
    assert ans.json()["error"]["code"] == "insufficient_permissions"
    assert len(rec.seen) == before


async def test_double_slashes_are_collapsed_for_authorisation_and_forwarding(rig: tuple[Running, Recorder]) -> None:
    """A keyless segment request spelled with ``//`` is A's (200), and the upstream is sent the
    collapsed path: what was authorised is what was forwarded."""
    running, rec = rig
    await started_by_a(running, rec)
    ans = await send(running, "//video//:/transcode/universal//session/S//0.ts?offset=0&url=http://x//y")
    assert ans.status == 200, ans.body
    seen = rec.seen[-1]
    assert seen.path == "/video/:/transcode/universal/session/S/0.ts"
    assert ("url", "http://x//y") in seen.query  # the query is not the path: left alone
    assert seen.headers["X-Plex-Token"] == PLEX_TOKEN


@pytest.mark.parametrize(
    "query",
    [
        "session=MINE&session=S",
        "session=&session=S",
        "session=",
        "session=%20",
        "session=MINE&Session=MINE",
        "X-Plex-Session-Identifier=a&X-Plex-Session-Identifier=b",
        "X-Plex-Session-Identifier=",
    ],
)
async def test_repeated_or_empty_session_parameters_are_refused(rig: tuple[Running, Recorder], query: str) -> None:
    """The client sees 400 bad_request: aiohttp reads the first of two values, other servers the last."""
    running, rec = rig
    _, b = await started_by_a(running, rec)
    before = len(rec.seen)
    ans = await send(running, f"{START}?{query}", b)
    assert ans.status == 400 and ans.json()["error"]["code"] == "bad_request", ans.body
    assert len(rec.seen) == before


@pytest.mark.parametrize(
    ("query", "headers"),
    [
        ("Session=S", {}),
        ("X-Plex-Session-Identifier=S", {}),
        ("x-plex-session-identifier=S", {}),
        ("session=MINE", {"X-Plex-Session-Identifier": "S"}),
        ("session=MINE&X-Plex-Session-Identifier=S", {}),
    ],
)
async def test_every_form_of_the_id_is_checked(
    rig: tuple[Running, Recorder], query: str, headers: dict[str, str]
) -> None:
    """A's id in any parameter (any case) or in the X-Plex-Session-Identifier header: 403 for B."""
    running, rec = rig
    _, b = await started_by_a(running, rec)
    ans = await send(running, f"{START}?{query}", b, **{k.replace("-", "_"): v for k, v in headers.items()})
    assert ans.status == 403, ans.body


async def test_a_rate_limited_flood_claims_nothing_and_evicts_no_one(rig: tuple[Running, Recorder]) -> None:
    """An attacker's key limited to 1/hour floods start.m3u8?session=junk{i}: every request after
    the first is 429 and records nothing, so A keeps its session: A's keyless segments still
    play (200) and the attacker still cannot take S over (403)."""
    running, rec = rig
    await started_by_a(running, rec)
    running.sc.transcode.max_sessions = 5  # a small table: the old global LRU evicted A after 5 claims
    _, attacker = await running.create_key(permissions=PLAYBACK, rate_limits=["1/hour"])
    statuses = [(await send(running, f"{START}?session=junk{i}", attacker)).status for i in range(12)]
    assert statuses[0] == 200 and set(statuses[1:]) == {429}, statuses
    assert running.sc.transcode.owner("S") is not None
    assert (await send(running, "/video/:/transcode/universal/session/S/0.ts")).status == 200
    _, other = await running.create_key(permissions=PLAYBACK)
    assert (await send(running, f"{START}?session=S", other)).status == 403
    assert running.sc.transcode.owner("junk5") is None  # refused requests were never claims


async def test_a_flood_by_an_unlimited_key_evicts_only_its_own_sessions(rig: tuple[Running, Recorder]) -> None:
    """With no rate limit at all, a key starting session after session pushes out its own
    oldest ones (bounded per key), never A's."""
    running, rec = rig
    await started_by_a(running, rec)
    running.sc.transcode.per_key = 3
    running.sc.transcode.max_sessions = 5
    _, flooder = await running.create_key(permissions=PLAYBACK)
    for i in range(20):
        assert (await send(running, f"{START}?session=f{i}", flooder)).status == 200
    assert (await send(running, "/video/:/transcode/universal/session/S/0.ts")).status == 200
    owners = {sid: running.sc.transcode.owner(sid) for sid in ("f16", "f17", "f18", "f19")}
    assert owners["f16"] is None and None not in (owners["f17"], owners["f18"], owners["f19"])


def test_session_table_is_bounded_per_key_and_never_gives_away_a_slot() -> None:
    now = [0.0]
    t = TranscodeSessions(ttl=60, max_sessions=4, per_key=2, clock=lambda: now[0])
    t.claim(["a1"], "A", "127.0.0.1")
    for i in range(5):
        t.claim([f"b{i}"], "B", "127.0.0.1")
    assert t.owner("a1") == "A" and t.owner("b4") == "B" and t.owner("b2") is None  # B kept its newest 2
    t.claim(["c0"], "C", "127.0.0.1")  # table: a1, b3, b4, c0 = full
    with pytest.raises(ServiceUnavailable):
        t.claim(["d0"], "D", "127.0.0.1")  # D owns nothing to give up, and nobody else's entry is taken
    assert {t.owner(s) for s in ("a1", "b3", "b4", "c0")} == {"A", "B", "C"}
    t.claim(["c1"], "C", "127.0.0.1")  # full: C gives up its own oldest
    assert t.owner("c0") is None and t.owner("c1") == "C" and t.owner("a1") == "A"
    now[0] += 61
    t.claim(["d0"], "D", "127.0.0.1")  # expired entries make room first
    assert t.owner("d0") == "D"
    with pytest.raises(Forbidden):
        t.check(t.ids("/video/:/transcode/universal/session/d0/1.ts", MultiDict()), "A")
    with pytest.raises(BadRequest):
        t.ids(START, MultiDict([("session", "x"), ("session", "y")]))
    assert t.ids("/video/:/transcode/universal/session/d0/1.ts", MultiDict({"session": "z"})) == ("d0", "z")


# ----------------------------------------------------------------------- 14.9: prefix on the raw path


@pytest.fixture
async def prefixed(make_sidecar: MakeSidecar, aiohttp_raw_server: Any, tmp_path: Path) -> tuple[Running, Recorder]:
    rec = Recorder()
    server = await aiohttp_raw_server(recording_handler(rec))
    cfg = base_config(str(server.make_url("")).rstrip("/"), tmp_path)
    cfg["upstreams"][0]["path_prefix"] = "/plex"
    return await make_sidecar(cfg), rec


@pytest.mark.parametrize(
    ("target", "forwarded"),
    [
        ("/plex/library/sections", "/library/sections"),
        ("/%70lex/library/sections", "/library/sections"),
        ("/%70%6C%65%78/library/sections", "/library/sections"),
        ("//plex//library/sections", "/library/sections"),
        ("/plex/%6Cibrary/sections", "/%6Cibrary/sections"),
        ("/plex", "/"),
    ],
)
async def test_prefix_is_stripped_as_the_segment_the_router_matched(
    prefixed: tuple[Running, Recorder], target: str, forwarded: str
) -> None:
    """The upstream is sent the path that was authorised, never ``/ex/library/…``."""
    running, rec = prefixed
    _, key = await running.create_key(permissions={"upstreams": ["plex"], "paths": ["/library/*", "/"]})
    ans = await send(running, target, key)
    assert ans.status == 200, ans.body
    assert rec.seen[-1].path == forwarded


@pytest.mark.parametrize("target", ["/%70lex/:/prefs", "/%70lex/security/token", "/plex%2F..%2Fsecurity/token"])
async def test_an_encoded_prefix_does_not_widen_a_glob(prefixed: tuple[Running, Recorder], target: str) -> None:
    """Outside the key's globs whatever the prefix's spelling: 403 (or 400), nothing forwarded."""
    running, rec = prefixed
    _, key = await running.create_key(permissions={"upstreams": ["plex"], "paths": ["/library/*"]})
    ans = await send(running, target, key)
    assert ans.status in (400, 403), ans.body
    assert rec.seen == []


async def test_a_prefix_split_by_an_encoded_slash_is_refused(prefixed: tuple[Running, Recorder]) -> None:
    """``/plex%2Flibrary/sections`` decodes to a routed path but its first raw segment is not
    ``plex``: stripping it would forward ``/`` for an authorised ``/library/sections``. 400."""
    running, rec = prefixed
    _, key = await running.create_key(permissions={"upstreams": ["plex"]})
    ans = await send(running, "/plex%2Flibrary/sections", key)
    assert ans.status == 400 and ans.json()["error"]["code"] == "bad_request"
    assert rec.seen == []

"""A narrow Plex key tries to act outside its permissions (DESIGN invariants 2 and 3).

The attacker holds ``plex:read``, ``plex:playback`` or a key limited to a few path globs,
and spells a forbidden path so that the sidecar's reading allows it while a lenient
upstream (a C++ server: ``;params`` ignored, NUL ending a string, twice-decoded escapes,
overlong UTF-8, Unicode compatibility forms) would act on another path; or hands Plex a
nested URL (``url=``, a transcode's ``path=``) that Plex fetches for it as its deputy.
Each refusal is ``403 insufficient_permissions`` and the upstream sees nothing.
"""

from __future__ import annotations

import pytest
from conftest import Running
from plexrig import Recorder, get, refused, rig

READ = {"upstreams": ["plex"], "paths": ["plex:read"]}
SECTION1 = {"upstreams": ["plex"], "paths": ["/library/sections/1/*"], "methods": ["GET"]}
ANY_PATH = {"upstreams": ["plex"], "paths": ["/*"]}  # every path, but no `admin`: no token minting

__all__ = ["rig"]  # the fixture, from plexrig: pytest finds it here


# Spellings of /library/sections/2/all that a key for /library/sections/1/* must not reach.
SIBLING = [
    "/library/sections/1/..;/2/all",  # `;params` ignored: `..;` is `..`
    "/library/sections/1/..;x=1/2/all",
    "/library/sections/1/.%2e;/2/all",
    "/library/sections/1/..%00/2/all",  # NUL ends the segment for a C string
    "/library/sections/1/x%00/../2/all",
    "/library/sections/1/..%20/2/all",  # trailing space (Windows drops it)
    "/library/sections/1/..%2e/2/all",  # dots only (Windows drops trailing dots)
    "/library/sections/1/x%252F..%252F..%252F2/all",  # `/` encoded twice
    "/library/sections/1/%252e%252e%252f2/all",
    "/library/sections/1/%25%32%65%25%32%65/2/all",  # `%2e%2e` spelled with escaped digits
    "/library/sections/1/%c0%ae%c0%ae/2/all",  # overlong UTF-8 dots
    "/library/sections/1/x%c0%af..%c0%af2/all",  # overlong UTF-8 slash
    "/library/sections/1/%e0%80%ae%e0%80%ae/2/all",
    "/library/sections/1/%ef%bc%8e%ef%bc%8e/2/all",  # fullwidth dots (NFKC: `..`)
    "/library/sections/1/x%ef%bc%8f..%ef%bc%8f2/all",  # fullwidth solidus (NFKC: `/`)
    "/library/sections/1/%e2%80%a5/2/all",  # two-dot leader (NFKC: `..`)
]


@pytest.mark.parametrize("target", SIBLING)
async def test_a_glob_key_cannot_step_out_of_its_section(rig: tuple[Running, Recorder], target: str) -> None:
    running, rec = rig
    _, key = await running.create_key(permissions=SECTION1)
    ans = await get(running, target, key)
    assert refused(ans), (target, ans.status, ans.body)
    assert rec.seen == []


@pytest.mark.parametrize(
    "target",
    [
        "/library/sections/1/..;/..;/..;/:/prefs",  # plex:read may not read the server's settings
        "/library/..;/security/token",
        "/library/x%252F..%252F..%252F:%252Fprefs",
        "/library/%ef%bc%8e%ef%bc%8e/:/prefs",
    ],
)
async def test_a_read_key_cannot_step_out_of_library(rig: tuple[Running, Recorder], target: str) -> None:
    running, rec = rig
    _, key = await running.create_key(permissions=READ)
    ans = await get(running, target, key)
    assert refused(ans), (target, ans.status, ans.body)
    assert rec.seen == []


@pytest.mark.parametrize(
    "target",
    [
        "/security/%ef%bd%94oken",  # fullwidth t
        "/security/%ef%bd%94%ef%bd%8f%ef%bd%8b%ef%bd%85%ef%bd%8e?type=delegation&scope=all",
        "/%ef%bd%8dyplex/account",
        "/security%ef%bc%8ftoken",
        "/security/token%00",
        "/security%252Ftoken",
    ],
)
async def test_token_minting_in_compatibility_forms_needs_admin(rig: tuple[Running, Recorder], target: str) -> None:
    """A key with every path but no ``admin`` reaches no spelling of the token-minting endpoints."""
    running, rec = rig
    _, key = await running.create_key(permissions=ANY_PATH)
    ans = await get(running, target, key)
    assert ans.status in (400, 403), (target, ans.status, ans.body)
    assert rec.seen == []


async def test_ordinary_paths_still_pass(rig: tuple[Running, Recorder]) -> None:
    """What real clients send keeps working: files, playlists, dots inside a name, encoded spaces in a query."""
    running, rec = rig
    _, key = await running.create_key(permissions=ANY_PATH)
    for target in (
        "/library/parts/1/1700000000/file.mkv",
        "/video/:/transcode/universal/session/abc-1/base/00001.ts",
        "/library/sections/1/all?title=a%20b%25c",
        "/library/metadata/1/thumb/1700000000",
        "/library/sections/1/fil%C3%A9",  # a non-ASCII segment that NFKC leaves alone
    ):
        ans = await get(running, target, key)
        assert ans.status == 200, (target, ans.status, ans.body)
    assert len(rec.seen) == 5

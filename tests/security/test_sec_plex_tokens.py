"""The real token only where the upstream expects one (issue 14.3; DESIGN invariant 3).

The key is replaced by the real Plex token only in the ``X-Plex-Token`` header/parameter and
in a *relative* nested ``url=`` (``/photo/:/transcode``) whose path the key may GET. An
absolute or protocol-relative nested URL never gets a token (Plex would fetch it, a confused
deputy handing our token to attacker.example); a relative one to a path the key may not use
is refused (403) before anything is forwarded; any other parameter carrying the key is
dropped, never rewritten.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

import pytest
from conftest import PLEX_TOKEN, Running
from multidict import CIMultiDict, MultiDict
from plexrig import Recorder, Seen, raw_request, rig

from sidecar.auth.credentials import strip_credential

READ = {"upstreams": ["plex"], "paths": ["plex:read"]}
THUMB = "/library/metadata/1/thumb/1700000000"

__all__ = ["rig"]  # the fixture, from plexrig: pytest finds it here


async def photo(running: Running, params: list[tuple[str, str]], key: str) -> Any:
    qs = "&".join(f"{quote(n)}={quote(v, safe='')}" for n, v in params)
    target = f"/photo/:/transcode?width=100&{qs}"
    return await raw_request(
        running.proxy.server.host, running.proxy.server.port, "GET", target, [("X-Plex-Token", key)]
    )


def where_token_went(seen: Seen, key: str) -> list[str]:
    """Names of the parameters carrying the real token; asserts the key went nowhere."""
    assert key not in seen.target and key not in repr(seen.headers)
    return [n for n, v in seen.query if PLEX_TOKEN in v]


@pytest.mark.parametrize(
    "nested",
    [
        "http://attacker.example/x.png?X-Plex-Token={key}",
        "https://attacker.example/x.png?X-Plex-Token={key}",
        "//attacker.example/x.png?X-Plex-Token={key}",
        "HTTP://attacker.example/{key}.png",
        "http://127.0.0.1:32400" + THUMB + "?X-Plex-Token={key}",
        "http://[::1/x?X-Plex-Token={key}",
    ],
)
async def test_an_absolute_nested_url_never_gets_the_token(rig: tuple[Running, Recorder], nested: str) -> None:
    """The parameter is dropped (the client sees Plex's own answer); neither the key nor the
    real token reaches the upstream inside it."""
    running, rec = rig
    _, key = await running.create_key(permissions=READ)
    ans = await photo(running, [("url", nested.format(key=key))], key)
    assert ans.status == 200, ans.body
    seen = rec.seen[-1]
    assert where_token_went(seen, key) == []
    assert [n for n, _ in seen.query if n == "url"] == []


@pytest.mark.parametrize(
    "nested",
    [
        "/library/parts/1/file.jpg?X-Plex-Token={key}",  # plex:read may not download files
        "/library/parts/1/file.jpg",  # not even without a key: Plex would fetch it for us
        "/security/token?X-Plex-Token={key}",  # token minting
        "/library/sections/1/refresh?X-Plex-Token={key}",  # changes state on GET
        "/library/%2e%2e/:/prefs?X-Plex-Token={key}",  # dot segments
        "/:/prefs",
        "library/parts/1/file.jpg",  # relative without the leading slash
    ],
)
async def test_a_relative_nested_url_the_key_may_not_use_is_refused(rig: tuple[Running, Recorder], nested: str) -> None:
    """403 insufficient_permissions, nothing forwarded: the nested path is authorised like the path."""
    running, rec = rig
    _, key = await running.create_key(permissions=READ)
    ans = await photo(running, [("url", nested.format(key=key))], key)
    assert ans.status == 403 and ans.json()["error"]["code"] == "insufficient_permissions", ans.body
    assert rec.seen == []


async def test_a_relative_nested_url_the_key_may_use_gets_the_token(rig: tuple[Running, Recorder]) -> None:
    """Artwork keeps working: the nested X-Plex-Token becomes the real token, as does the outer one."""
    running, rec = rig
    _, key = await running.create_key(permissions=READ)
    ans = await photo(running, [("url", f"{THUMB}?X-Plex-Token={key}"), ("X-Plex-Token", key)], key)
    assert ans.status == 200
    seen = rec.seen[-1]
    assert sorted(where_token_went(seen, key)) == ["X-Plex-Token", "url"]
    assert ("url", f"{THUMB}?X-Plex-Token={PLEX_TOKEN}") in seen.query


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("foo", "{key}"),
        ("foo", "x{key}y"),
        ("redirect", "http://attacker.example/?t={key}"),
        ("url", THUMB + "?other={key}"),  # the key, but not as the nested X-Plex-Token
        ("url", "/library/{key}/thumb?X-Plex-Token={key}"),
        ("url", THUMB + "?X-Plex-Token={enc}"),  # percent-encoded inside the nested URL
        ("foo", "{enc}"),
    ],
)
async def test_the_key_anywhere_else_is_removed_never_replaced(
    rig: tuple[Running, Recorder], name: str, value: str
) -> None:
    """The parameter carrying the key is dropped; the token is only where the upstream expects it."""
    running, rec = rig
    _, key = await running.create_key(permissions=READ)
    enc = quote(key.replace("_", "%5F"), safe="%")
    ans = await photo(running, [(name, value.format(key=key, enc=enc))], key)
    assert ans.status == 200, ans.body
    seen = rec.seen[-1]
    assert where_token_went(seen, key) == []
    assert name not in [n for n, _ in seen.query]
    assert seen.headers["X-Plex-Token"] == PLEX_TOKEN


@pytest.mark.parametrize(
    ("name", "value"),
    [("foo", "{other}"), ("url", THUMB + "?X-Plex-Token={other}"), ("X-Plex-Token ", "{other}"), ("{other}", "1")],
)
async def test_another_keys_key_is_never_forwarded(rig: tuple[Running, Recorder], name: str, value: str) -> None:
    """A second key under a name the sidecar does not read as a credential is dropped, not forwarded."""
    running, rec = rig
    _, key = await running.create_key(permissions=READ)
    _, other = await running.create_key(permissions=READ)
    ans = await photo(running, [(name.format(other=other), value.format(other=other))], key)
    assert ans.status == 200, ans.body
    seen = rec.seen[-1]
    assert other not in seen.target and other.replace("_", "%5F") not in seen.target
    assert where_token_went(seen, key) == []


def test_strip_credential_table() -> None:
    """Unit view of the same rules (``may_use`` is the key's permission check)."""

    def strip(items: list[tuple[str, str]], replacement: str | None = "REAL") -> list[tuple[str, str]]:
        q: MultiDict[str] = MultiDict(items)
        strip_credential(CIMultiDict(), q, "pmcp_K", replacement, lambda p: p.startswith("/library/metadata/"))
        return list(q.items())

    assert strip([("X-Plex-Token", "pmcp_K"), ("x-plex-token", "pmcp_K")]) == [("X-Plex-Token", "REAL")]
    assert strip([("url", "/library/metadata/1/thumb?X-Plex-Token=pmcp_K")]) == [
        ("url", "/library/metadata/1/thumb?X-Plex-Token=REAL")
    ]
    assert strip([("url", "/library/parts/1?X-Plex-Token=pmcp_K")]) == []  # may_use says no
    assert strip([("url", "http://a.example/library/metadata/1?X-Plex-Token=pmcp_K")]) == []
    assert strip([("URL", "//a.example/library/metadata/1?X-Plex-Token=pmcp_K")]) == []
    assert strip([("thumb", "/library/metadata/1/thumb?X-Plex-Token=pmcp_K")]) == []  # only `url` is nested
    assert strip([("url", "/library/metadata/1/thumb"), ("a", "b")]) == [
        ("url", "/library/metadata/1/thumb"), ("a", "b"),
    ]  # fmt: skip
    assert strip([("url", "/library/metadata/1?X-Plex-Token=pmcp_K")], None) == []  # MCP: no token at all

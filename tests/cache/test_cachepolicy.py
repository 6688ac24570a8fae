"""Cache policy, pure: what may be stored, for how long, and under which key."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from multidict import CIMultiDict

from sidecar import config
from sidecar.cache import policy as cachepolicy
from sidecar.cache.policy import (
    CacheKey,
    compile_glob,
    normalise_query,
    parse_cache_control,
    primary_key,
    request_bypass,
    storable,
    variant_key,
)
from sidecar.config import CacheRule

RULE = CacheRule(upstream="plex", path="/library/*", ttl=60.0, stale_while_revalidate=5.0, stale_if_error=30.0)
NOW = 1_700_000_000.0
SALT = b"0123456789abcdef"


def h(*pairs: tuple[str, str]) -> CIMultiDict[str]:
    return CIMultiDict(pairs)


def test_policy_imports_no_aiohttp() -> None:
    """The policy and what it imports from the package (config) stay free of aiohttp."""
    for module in (cachepolicy, config):
        tree = ast.parse(Path(str(module.__file__)).read_text())
        names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
        names += [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level == 0]
        assert not [n for n in names if n.split(".")[0] in ("aiohttp", "yarl")], module.__name__


@pytest.mark.parametrize(
    ("lines", "expected"),
    [
        (["max-age=60"], {"max-age": "60"}),
        (["public, max-age=60, s-maxage=30"], {"public": None, "max-age": "60", "s-maxage": "30"}),
        (["No-Store"], {"no-store": None}),
        (['no-cache="Set-Cookie, X-Foo", max-age=5'], {"no-cache": "Set-Cookie, X-Foo", "max-age": "5"}),
        (["max-age=60", "max-age=10"], {"max-age": "10"}),  # conflicting: the shorter wins
        (["max-age=10, max-age=60"], {"max-age": "10"}),
        (['max-age="20"'], {"max-age": "20"}),
        ([""], {}),
    ],
)
def test_parse_cache_control(lines: list[str], expected: dict[str, str | None]) -> None:
    assert parse_cache_control(lines) == expected


@pytest.mark.parametrize(
    ("method", "headers", "reason"),
    [
        ("GET", h(), None),
        ("HEAD", h(), None),
        ("POST", h(), "method"),
        ("DELETE", h(), "method"),
        ("GET", h(("Range", "bytes=0-10")), "range"),
        ("GET", h(("Upgrade", "websocket"), ("Connection", "Upgrade")), "upgrade"),
        ("GET", h(("Accept", "text/event-stream")), "sse"),
        ("GET", h(("Content-Length", "12")), "body"),
        ("GET", h(("Content-Length", "0")), None),
        ("GET", h(("Transfer-Encoding", "chunked")), "body"),
    ],
)
def test_request_bypass(method: str, headers: CIMultiDict[str], reason: str | None) -> None:
    assert request_bypass(method, headers) == reason


@pytest.mark.parametrize(
    ("status", "headers", "ttl"),
    [
        (200, h(), 60.0),
        (404, h(), 60.0),
        (500, h(), None),  # not in the rule's statuses
        (206, h(("Content-Range", "bytes 0-1/10")), None),
        (200, h(("Content-Range", "bytes 0-1/10")), None),
        (200, h(("Set-Cookie", "a=b")), None),
        (200, h(("Cache-Control", "no-store")), None),
        (200, h(("Cache-Control", "private")), None),
        (200, h(("Cache-Control", 'private="X-Foo"')), None),
        (200, h(("Cache-Control", "no-cache")), None),
        (200, h(("Cache-Control", "max-age=10")), 10.0),
        (200, h(("Cache-Control", "max-age=600")), 60.0),  # the rule caps it
        (200, h(("Cache-Control", "max-age=600, s-maxage=20")), 20.0),  # shared caches read s-maxage
        (200, h(("Cache-Control", "max-age=5, s-maxage=20")), 20.0),
        (200, h(("Cache-Control", "max-age=0")), None),
        (200, h(("Cache-Control", "max-age=soon")), None),
        (200, h(("Cache-Control", "max-age=30"), ("Age", "10")), 20.0),
        (200, h(("Cache-Control", "max-age=30"), ("Age", "40")), None),
        (200, h(("Vary", "*")), None),
        (200, h(("Vary", "Accept, *")), None),
        (200, h(("Content-Type", "text/event-stream")), None),
        (200, h(("Content-Length", str(RULE.max_object_bytes + 1))), None),
        (200, h(("Content-Length", str(RULE.max_object_bytes))), 60.0),
        (200, h(("Expires", "Tue, 14 Nov 2023 22:13:40 GMT"), ("Date", "Tue, 14 Nov 2023 22:13:20 GMT")), 20.0),
        (200, h(("Expires", "0")), None),  # an unreadable Expires means already expired
        (200, h(("Expires", "Tue, 14 Nov 2023 22:13:40 GMT"), ("Cache-Control", "max-age=5")), 5.0),
    ],
)
def test_storable_ttl(status: int, headers: CIMultiDict[str], ttl: float | None) -> None:
    verdict = storable(status, headers, RULE, now=NOW)
    assert (verdict.ttl if verdict else None) == ttl


def test_must_revalidate_turns_stale_windows_off() -> None:
    v = storable(200, h(), RULE, now=NOW)
    assert v is not None and (v.stale_while_revalidate, v.stale_if_error) == (5.0, 30.0)
    v = storable(200, h(("Cache-Control", "max-age=30, must-revalidate")), RULE, now=NOW)
    assert v is not None and (v.stale_while_revalidate, v.stale_if_error) == (0.0, 0.0)


def test_vary_names_and_compression() -> None:
    v = storable(200, h(("Vary", "Accept, accept-language"), ("Vary", "X-Plex-Product")), RULE, now=NOW)
    assert v is not None and v.vary == ("accept", "accept-language", "x-plex-product")
    v = storable(200, h(("Content-Encoding", "gzip")), RULE, now=NOW)
    assert v is not None and v.vary == ("accept-encoding",)


def test_normalise_query_drops_the_token_and_sorts() -> None:
    items = [("b", "2"), ("X-Plex-Token", "secret"), ("a", "1"), ("x-plex-token", "s2"), ("b", "1")]
    assert normalise_query(items) == (("a", "1"), ("b", "2"), ("b", "1"))
    # Parameters the client controls are kept: they could change the answer.
    assert normalise_query([("access_token", "x")]) == (("access_token", "x"),)


def _key(identity: str = "tok", path: str = "/library/sections", query: tuple[tuple[str, str], ...] = (),
         rule_vary: tuple[str, ...] = (), headers: CIMultiDict[str] | None = None) -> CacheKey:  # fmt: skip
    return primary_key(SALT, "plex", identity, path, query, rule_vary, headers or h())


def test_answers_varying_on_the_client_address_are_not_storable() -> None:
    for name in ("X-Forwarded-For", "x-forwarded-proto", "X-Forwarded-Host", "Forwarded", "X-Real-IP"):
        assert storable(200, h(("Vary", f"Accept, {name}")), RULE, now=NOW) is None, name
    assert storable(200, h(("Vary", "Accept, X-Plex-Token")), RULE, now=NOW) is not None


def test_the_client_key_inside_a_query_value_is_a_placeholder() -> None:
    a = normalise_query([("url", "/thumb?X-Plex-Token=pmcp_aaa"), ("X-Plex-Token", "pmcp_aaa")], "pmcp_aaa")
    b = normalise_query([("url", "/thumb?X-Plex-Token=pmcp_bbb")], "pmcp_bbb")
    assert a == b and "pmcp_aaa" not in repr(a)


def test_credential_headers_are_never_keyed() -> None:
    """The upstream sees the identity's credential in their place, and the identity is in the key."""
    for name in ("authorization", "x-api-key", "x-plex-token"):
        one = _key(rule_vary=(name,), headers=h((name, "pmcp_aaa")))
        assert one == _key(rule_vary=(name,), headers=h((name, "pmcp_bbb"))) == _key(rule_vary=(name,))
        assert variant_key(one, (name,), h((name, "a"))) == variant_key(one, (name,), h((name, "b")))


def test_keys_separate_what_must_be_separate() -> None:
    base = _key()
    assert base == _key()
    assert base != _key(identity="other-token")
    assert base != _key(path="/library/sections/1")
    assert base != _key(query=(("type", "1"),))
    assert base != primary_key(b"another salt....", "plex", "tok", "/library/sections", (), (), h())
    assert _key(rule_vary=("accept-language",), headers=h(("Accept-Language", "en"))) != _key(
        rule_vary=("accept-language",), headers=h(("Accept-Language", "de"))
    )
    # A header that is absent differs from one that is present but empty.
    assert _key(rule_vary=("x-a",), headers=h(("X-A", ""))) != _key(rule_vary=("x-a",))


def test_keys_never_hold_the_identity_in_clear() -> None:
    key = _key(identity="real-plex-token-0123456789")
    assert "real-plex-token" not in repr(key) and b"real-plex-token".hex() not in repr(key)


def test_variant_key() -> None:
    p = _key()
    assert variant_key(p, (), h(("X-Other", "a"))) == p
    # Headers upstreams choose a representation from are keyed without a Vary (cookies as a digest).
    for name in ("Accept", "Accept-Language", "Origin", "Cookie", "X-Plex-Language", "X-Plex-Client-Identifier"):
        assert variant_key(p, (), h((name, "a"))) != variant_key(p, (), h((name, "b"))) != p
    assert variant_key(p, (), h(("X-Plex-Token", "t"))) == p  # the credential: the identity is keyed instead
    assert "secret" not in repr(variant_key(p, (), h(("Cookie", "session=secret"))))
    xml = variant_key(p, ("accept",), h(("Accept", "application/xml")))
    json_ = variant_key(p, ("accept",), h(("Accept", "application/json")))
    assert xml != json_ and xml != p
    # Whitespace inside a value is not a different variant.
    assert variant_key(p, ("accept",), h(("Accept", "a,  b"))) == variant_key(p, ("accept",), h(("Accept", "a, b")))


def test_globs_cross_slashes() -> None:
    assert compile_glob("/library/*").match("/library/sections/1/all")
    assert not compile_glob("/library/*").match("/hubs/x")

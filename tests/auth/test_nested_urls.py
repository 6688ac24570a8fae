"""``sidecar.auth.nested`` and the stricter ``normalize_path``, as tables (pure functions)."""

from __future__ import annotations

import pytest

from sidecar.auth.models import Permissions
from sidecar.auth.nested import lenient_query, nested_refusal, plex_itself
from sidecar.auth.permissions import normalize_path

UP = "http://plex.internal.example:32400"


@pytest.mark.parametrize(
    ("scheme", "netloc", "host", "itself"),
    [
        ("https", "metadata-static.plex.tv", "metadata-static.plex.tv", False),
        ("http", "8.8.8.8", "8.8.8.8", False),
        ("", "attacker.example", "attacker.example", False),  # protocol-relative
        ("http", "127.0.0.1:32400", "127.0.0.1", True),
        ("http", "127.1", "127.1", True),
        ("http", "017700000001", "017700000001", True),
        ("http", "[::1]", "::1", True),
        ("http", "[::ffff:10.0.0.1]", "::ffff:10.0.0.1", True),
        ("http", "[fe80::1%25eth0]", "fe80::1%25eth0", True),
        ("http", "LocalHost.", "localhost", True),
        ("http", "a.localhost", "a.localhost", True),
        ("http", "nas.lan", "nas.lan", True),
        ("http", "plex.internal.example:32400", "plex.internal.example", True),  # the upstream's own host
        ("http", "x@example.com", "example.com", True),
        ("http", "127.0.0.1\\@example.com", "example.com", True),
        ("file", "", None, True),
        ("http", "", None, True),
    ],
)
def test_plex_itself(scheme: str, netloc: str, host: str | None, itself: bool) -> None:
    assert plex_itself(scheme, netloc, host, "plex.internal.example") is itself


def test_nested_refusal_table() -> None:
    read = Permissions.from_dict({"upstreams": ["plex"], "paths": ["plex:read"]})

    def refusal(route: str, pairs: list[tuple[str, str]], raw: str = "") -> str | None:
        return nested_refusal(read, "plex", "plex", route, pairs, UP, raw_query=raw)

    assert refusal("/photo/:/transcode", [("url", "/library/metadata/1/thumb/2")]) is None
    assert refusal("/photo/:/transcode", [("url", "https://img.example/a.jpg")]) is None
    assert refusal("/photo/:/transcode", [("url", "/library/parts/1/file.jpg")])
    assert refusal("/photo/:/transcode", [("URL", "http://127.0.0.1/library/parts/1/file.jpg")])
    assert refusal("/photo/:/transcode", [("url", "/photo/:/transcode?a=1;url=/:/prefs")])
    assert refusal("/photo/:/transcode", [("a", "1;url=/:/prefs")], raw="a=1;url=/:/prefs")
    assert refusal("/library/sections", [("path", "/:/prefs")]) is None  # path= only on transcode routes
    assert refusal("/video/:/transcode/universal/start", [("path", "/:/prefs")])
    deep = "/x"
    for _ in range(6):
        deep = "/photo/:/transcode?url=" + deep.replace("&", "%26").replace("?", "%3F").replace("=", "%3D")
    assert refusal("/photo/:/transcode", [("url", deep)])


def test_lenient_query() -> None:
    both = lenient_query([("a", "1;session=S"), ("b", "2")], "a=1;session=S&b=2")
    assert list(both.items()) == [("a", "1;session=S"), ("b", "2"), ("a", "1"), ("session", "S")]
    assert lenient_query([("session", "T;x=1")], "session=T;x=1").getall("session") == ["T;x=1", "T"]


@pytest.mark.parametrize(
    "path",
    [
        "/a/..;/b", "/a/..;x/b", "/a/.;/b", "/a/..\x00/b", "/a/x\x00y", "/a/.. /b", "/a/.../b", "/a/. ./b",
        "/a/%2e%2e/b", "/a/x%2Fy", "/a/%c0%ae", "/a/\uff0e\uff0e/b", "/a/x\uff0fy", "/a/\u2025/b",
        "/security/\uff54oken",
    ],
)  # fmt: skip
def test_normalize_path_refuses_ambiguous_spellings(path: str) -> None:
    assert normalize_path(path) is None, path


@pytest.mark.parametrize(
    "path", ["/a/..b/c.d", "/a/b.", "/a/.hidden", "/a/file.mkv", "/a/fil\u00e9", "/a/%zz", "/a/100%", "/a/x;y"]
)
def test_normalize_path_keeps_ordinary_ones(path: str) -> None:
    assert normalize_path(path) == path

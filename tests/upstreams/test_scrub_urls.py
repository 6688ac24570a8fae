"""The look-back that decides, per token occurrence, between the client's key and ``REDACTED``.

The key may replace the upstream's token only where the client would send it back to the
sidecar: bare values, relative URLs, absolute URLs to the sidecar's own public origin.
Every spelling of an absolute URL to another host a reader (browser, JSON or XML parser,
player, curl) would follow is foreign; so is what cannot be told (a 2 KiB stretch with
no delimiter).
"""

from __future__ import annotations

import gzip

import pytest
from conftest import PLEX_TOKEN
from multidict import CIMultiDict

from sidecar.upstreams.scrub import ScrubFilter
from sidecar.upstreams.scrub_urls import JSON, WINDOW, key_may_go, own_origin

ORIGIN = own_origin("http", "sidecar.test:8080")
KEY = "pmcp_clientkey"
TOKEN = PLEX_TOKEN.encode()


@pytest.mark.parametrize(
    "before",
    [
        b"",
        b'authToken="',
        b"<authToken>",
        b'key="/library/metadata/1?X-Plex-Token=',
        b'"/photo/:/transcode?url=%2Flibrary%2Fmetadata%2F1%2Fthumb&amp;X-Plex-Token=',
        b"#EXTM3U\n#EXTINF:8,\nsession/1/base/00001.ts?X-Plex-Token=",
        b'"http://sidecar.test:8080/library/x?X-Plex-Token=',
        b'"HTTP://SIDECAR.TEST:8080/library/x?X-Plex-Token=',
        b'"http:\\/\\/sidecar.test:8080\\/library\\/x?X-Plex-Token=',
        b'"ws://sidecar.test:8080/:/websockets/notifications?X-Plex-Token=',
        b'"//sidecar.test:8080/library/x?X-Plex-Token=',
        b'"/photo/:/transcode?url=http%3A%2F%2Fsidecar.test%3A8080%2Fx&X-Plex-Token=',
        b'"echo:',
        b"plex=",
    ],
)
def test_the_key_goes_where_the_client_sends_it_back_to_the_sidecar(before: bytes) -> None:
    assert key_may_go(before, at_start=True, origin=ORIGIN)


@pytest.mark.parametrize(
    "before",
    [
        b'"https://attacker.example/cb?X-Plex-Token=',
        b"https://attacker.example/cb?X-Plex-Token=",  # a whole Location value
        b'"https:\\/\\/attacker.example\\/x?X-Plex-Token=',
        b'"https:\\u002f\\u002fattacker.example/x?X-Plex-Token=',
        b'"https:&#47;&#47;attacker.example/x?X-Plex-Token=',
        b'"https&#58;//attacker.example/x?X-Plex-Token=',
        b'"//attacker.example/?X-Plex-Token=',
        b'"\\\\attacker.example/?X-Plex-Token=',
        b'"/\\attacker.example/?X-Plex-Token=',
        b'"https:attacker.example/?X-Plex-Token=',
        b'"https:///sidecar.test:8080/?X-Plex-Token=',
        b'"http://sidecar.test:8080@attacker.example/?X-Plex-Token=',
        b'"http://sidecar.test:8080\\@attacker.example/?X-Plex-Token=',
        b'"http://sidecar.test:8080.attacker.example/?X-Plex-Token=',
        b'"http://sidecar.test%2Eattacker.example/?X-Plex-Token=',
        b'"http://sidecar.test:9090/?X-Plex-Token=',
        b'"https://sidecar.test:8080/?X-Plex-Token=',
        b'"http://127.0.0.1:32400/library/x?X-Plex-Token=',
        b'"http://',  # the token is the host
        b'"http://sidecar.test:8080',  # ... or in the authority
        b'"/x?url=https%3A%2F%2Fattacker.example%2F%3FX-Plex-Token%3D',
        b'"/x?url=https%253A%252F%252Fattacker.example%252F%253FX-Plex-Token%253D',
        b'"/x?url=HTTPS%3a%2f%2fattacker.example%2f%3fX-Plex-Token%3d',
        b'"http://sidecar.test:8080/x?u=https://attacker.example/&X-Plex-Token=',
        b'"/x?u=//attacker.example/&X-Plex-Token=',
        b'"https:/\t/attacker.example/?X-Plex-Token=',  # browsers drop tabs and newlines inside URLs
        b'"https:\n//attacker.example/?X-Plex-Token=',
        b'"https:\r\nattacker.example/?X-Plex-Token=',
        b'"javascript:location=',
        b'"ftp://attacker.example/',
        b"\x01//attacker.example/?X-Plex-Token=",
        b"background:url(//attacker.example/?X-Plex-Token=",  # no delimiter before "//" but the "("
        b"background:url(https:attacker.example/?X-Plex-Token=",
        b'srcset="a.jpg 1x,//attacker.example/?X-Plex-Token=',
        b'<a href="\\/attacker.example/?X-Plex-Token=',  # an HTML reader takes "\/" for "//"
        b'"http:\\/\\/attacker.example/?X-Plex-Token=',
    ],
)
def test_anything_absolute_to_another_origin_is_foreign(before: bytes) -> None:
    assert not key_may_go(before, at_start=True, origin=ORIGIN)


def test_without_a_known_origin_every_absolute_url_is_foreign() -> None:
    assert not key_may_go(b'"http://sidecar.test:8080/x?t=', at_start=True, origin=None)
    assert key_may_go(b'"/x?t=', at_start=True, origin=None)
    assert own_origin("gopher", "sidecar.test") is None and own_origin("http", "a@b") is None


def test_the_window_delimits_conservatively() -> None:
    """No delimiter within the window: foreign, unless the stretch reaches the text's start."""
    assert key_may_go(b"x" * 100, at_start=True, origin=ORIGIN)
    assert not key_may_go(b"x" * 100, at_start=False, origin=ORIGIN)
    assert not key_may_go(b"x" * WINDOW, at_start=True, origin=ORIGIN)
    assert key_may_go(b'"' + b"x" * (WINDOW - 1), at_start=False, origin=ORIGIN, kind=JSON)  # a JSON string


def scrubbed(body: bytes, step: int, *, encode: bool = False) -> bytes:
    f = ScrubFilter(PLEX_TOKEN, KEY, origin=("http", "sidecar.test:8080"))
    headers: CIMultiDict[str] = CIMultiDict({"Content-Type": "text/xml"})
    if encode:
        body = gzip.compress(body)
        headers["Content-Encoding"] = "gzip"
    assert f.headers(200, headers)
    out = b"".join(f.feed(body[i : i + step]) for i in range(0, len(body), step))
    return out + f.flush()


@pytest.mark.parametrize("step", [1, 3, 7, 64, 4096])
@pytest.mark.parametrize("encode", [False, True])
def test_the_look_back_works_across_chunks(step: int, encode: bool) -> None:
    body = (
        b'<V thumb="https://attacker.example/t?X-Plex-Token=' + TOKEN + b'" key="/library/1?X-Plex-Token=' + TOKEN
        + b'" own="http://sidecar.test:8080/l?X-Plex-Token=' + TOKEN + b'" pad="' + b"y" * 1500
        + b'https://attacker.example/?X-Plex-Token=' + TOKEN + b'"/>'
    )  # fmt: skip
    want = (
        b'<V thumb="https://attacker.example/t?X-Plex-Token=REDACTED" key="/library/1?X-Plex-Token=' + KEY.encode()
        + b'" own="http://sidecar.test:8080/l?X-Plex-Token=' + KEY.encode() + b'" pad="' + b"y" * 1500
        + b'https://attacker.example/?X-Plex-Token=REDACTED"/>'
    )  # fmt: skip
    assert scrubbed(body, step, encode=encode) == want


@pytest.mark.parametrize("step", [1, 100, 5000])
def test_a_long_delimiter_free_run_across_chunks_is_foreign(step: int) -> None:
    assert scrubbed(b'<a b="' + b"x" * 3072 + TOKEN + b'"/>', step) == b'<a b="' + b"x" * 3072 + b'REDACTED"/>'
    near = b"<a>" + b"x" * (WINDOW - 100) + TOKEN  # within the window from a delimiter: relative, the key
    assert scrubbed(near, step) == b"<a>" + b"x" * (WINDOW - 100) + KEY.encode()


def test_headers_frames_and_non_text_bodies() -> None:
    f = ScrubFilter(PLEX_TOKEN, KEY, origin=("http", "sidecar.test:8080"))
    headers: CIMultiDict[str] = CIMultiDict(
        {"Location": f"https://attacker.example/?X-Plex-Token={PLEX_TOKEN}", "X-Plex-Token": PLEX_TOKEN,
         "Content-Type": "image/jpeg"}
    )  # fmt: skip
    assert f.headers(200, headers)
    assert headers["Location"] == "https://attacker.example/?X-Plex-Token=REDACTED"
    assert headers["X-Plex-Token"] == KEY
    assert f.feed(b"//a/?t=" + TOKEN) == b"//a/?t=" + b"*" * len(TOKEN)  # non-text: masked in place, as before
    assert f.binary(b'{"u": "//attacker.example/?t=' + TOKEN + b'"}') == b'{"u": "//attacker.example/?t=REDACTED"}'
    assert f.text(f'{{"u": "/x?t={PLEX_TOKEN}"}}') == f'{{"u": "/x?t={KEY}"}}'
    redacting = ScrubFilter(PLEX_TOKEN, "REDACTED")  # no key to protect: no look-back, REDACTED everywhere
    assert redacting.text(f"/x?t={PLEX_TOKEN}") == "/x?t=REDACTED"

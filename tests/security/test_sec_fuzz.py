"""Property-based fuzzing (hypothesis) of everything the sidecar parses from a stranger.

Each property states the designed outcome for *any* input: a value or a designed error
(``BadRequest``, ``JsonRpcError``, ``ConfigError``), never another exception, and for
paths and queries, that what the sidecar authorises is what the upstream receives.

Profiles (registered in tests/conftest.py): ``ci`` (default; fixed seed, 400 examples per
property, scaled per property by ``_n``) and ``deep`` (``--hypothesis-profile=deep``,
50x more). The two end-to-end properties run against a real sidecar over real sockets
(``sec_harness.ThreadedSidecar``) and assert on what a recording upstream received.
"""

from __future__ import annotations

import base64
import re
import socket
import tempfile
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import PLEX_TOKEN, base_config
from hypothesis import example, given, settings
from hypothesis import strategies as st
from multidict import CIMultiDict, MultiDict
from sec_harness import Recorder, ThreadedSidecar, recording_upstream

from sidecar.auth.credentials import Credential, extract_credential
from sidecar.auth.keys import check_prefix, display_form, generate_key, key_pattern, parse_key
from sidecar.auth.models import Permissions
from sidecar.auth.permissions import allowed, is_token_minting
from sidecar.config import ConfigError, CredentialsConfig, load_config, parse_config
from sidecar.core.errors import BadRequest
from sidecar.upstreams.mcp.jsonrpc import (
    HEADER_MISMATCH,
    INVALID_PARAMS,
    INVALID_REQUEST,
    NAME_BEARING_METHODS,
    PARSE_ERROR,
    Body,
    JsonRpcError,
    check_headers,
    parse_body,
)

_BASE_EXAMPLES = 400  # the "ci" profile's max_examples


def _n(examples: int) -> Any:
    """``examples`` under the ci profile, proportionally more under deep (the profile's count / 400)."""
    return settings(max_examples=max(1, examples * settings.default.max_examples // _BASE_EXAMPLES))


PREFIX = "pmcp_"
K1, _ = generate_key(PREFIX)
K2, _ = generate_key(PREFIX)
WS = st.sampled_from(["", " ", "  ", "\t"])

# --------------------------------------------------------------------------- credentials

FORMS = ("apikey", "bearer", "basic", "x_api_key", "plex_header", "plex_query")


@st.composite
def presented(draw: st.DrawFn) -> tuple[str, str, str]:
    """(form, key, how it is written): one credential as a client could send it."""
    form = draw(st.sampled_from(FORMS))
    key = draw(st.sampled_from([K1, K2, "junk", K1.upper(), "pmcp_" + "0" * 68]))
    if form in ("apikey", "bearer"):
        scheme = draw(st.sampled_from(["ApiKey", "apikey", "APIKEY"] if form == "apikey" else ["Bearer", "bearer"]))
        return form, key, f"{scheme}{draw(st.sampled_from([' ', '  ']))}{key}{draw(WS)}"
    if form == "basic":
        user = draw(st.text(st.characters(codec="utf-8", exclude_characters=":"), max_size=8))
        return form, key, "Basic " + base64.b64encode(f"{user}:{key}".encode()).decode()
    return form, key, f"{draw(WS)}{key}{draw(WS)}"


CRED_CONFIGS = st.builds(CredentialsConfig, *(st.booleans() for _ in FORMS))


@given(
    creds=st.lists(presented(), max_size=4),
    junk_auth=st.booleans(),
    query_name=st.sampled_from(["X-Plex-Token", "x-plex-token", "X-PLEX-TOKEN"]),
    other=st.lists(st.tuples(st.sampled_from(["foo", "url", "X-Plex-Product"]), st.text(max_size=10)), max_size=3),
    cfg=CRED_CONFIGS,
)
@_n(600)
def test_credentials_model(
    creds: list[tuple[str, str, str]],
    junk_auth: bool,
    query_name: str,
    other: list[tuple[str, str]],
    cfg: CredentialsConfig,
) -> None:
    """Any mix of the six forms: None, the one key presented, or 400 for two different keys
    (or an Authorization header the sidecar cannot read); never another exception."""
    headers: CIMultiDict[str] = CIMultiDict()
    query: MultiDict[str] = MultiDict(other)
    enabled = {f: getattr(cfg, f) for f in FORMS}
    expect_keys: set[str] = set()
    for form, key, text in creds:
        if form in ("apikey", "bearer", "basic"):
            headers.add("Authorization", text)
        elif form == "x_api_key":
            headers.add("x-api-key", text)
        elif form == "plex_header":
            headers.add("X-Plex-Token", text)
        else:
            query.add(query_name, text)
        if enabled[form]:
            expect_keys.add(key)
    if junk_auth:
        headers.add("Authorization", "Negotiate abc")
    try:
        got = extract_credential(headers, query, cfg)
    except BadRequest:
        assert junk_auth or len(expect_keys) > 1, f"400 for a request presenting only {len(expect_keys)} key(s)"
        return
    assert not junk_auth, "an unreadable Authorization header must be a 400, not ignored"
    assert len(expect_keys) <= 1, "two different keys in one request must be a 400"
    if not expect_keys:
        assert got is None
    else:
        assert isinstance(got, Credential) and got.key == next(iter(expect_keys))
        assert got.key not in repr(got)


HEADER_NAMES = st.sampled_from(["Authorization", "authorization", "x-api-key", "X-Plex-Token", "X-Other", "Cookie"])


@given(
    headers=st.lists(st.tuples(HEADER_NAMES, st.text(max_size=40)), max_size=5),
    query=st.lists(
        st.tuples(st.sampled_from(["X-Plex-Token", "x-plex-token", "X-Plex-Token ", "url", ""]), st.text(max_size=40)),
        max_size=4,
    ),
    cfg=CRED_CONFIGS,
)
@_n(800)
def test_credentials_any_text(
    headers: list[tuple[str, str]], query: list[tuple[str, str]], cfg: CredentialsConfig
) -> None:
    """Arbitrary text in every credential place: a Credential, None or BadRequest, nothing else."""
    try:
        got = extract_credential(CIMultiDict(headers), MultiDict(query), cfg)
    except BadRequest as e:
        assert e.status == 400 and e.code == "bad_request"
        return
    assert got is None or (got.key and got.key == got.key.strip() and got.forms)


# --------------------------------------------------------------------------- keys

PREFIXES = st.from_regex(r"\A[a-z][a-z0-9_]{0,15}\Z").filter(lambda p: check_prefix(p) is None)


@given(prefix=PREFIXES, data=st.data())
@_n(400)
def test_keys_round_trip_and_single_change_refused(prefix: str, data: st.DataObject) -> None:
    """A generated key parses back to its parts; changing any one character makes it unparseable
    (the CRC-32 catches it before any store lookup); keys are URL-safe and never contain 'http'."""
    key, parts = generate_key(prefix)
    assert parse_key(prefix, key) == parts
    assert "http" not in key and urllib.parse.quote(key, safe="") == key
    assert re.fullmatch(key_pattern(prefix), key)
    assert parts.secret not in display_form(prefix, parts.key_id, key)
    i = data.draw(st.integers(0, len(key) - 1))
    c = data.draw(st.sampled_from("0123456789abcdefABCDEF_-x").filter(lambda c: c != key[i]))
    mutated = key[:i] + c + key[i + 1 :]
    assert parse_key(prefix, mutated) is None
    assert parse_key(prefix, key[:-1]) is None and parse_key(prefix, key + "0") is None


@given(prefix=st.text(max_size=20), key=st.text(max_size=120))
@_n(800)
def test_parse_key_any_text(prefix: str, key: str) -> None:
    """Any text: None or a ParsedKey whose repr never shows the secret; check_prefix: None or a reason."""
    got = parse_key(prefix, key)
    if got is not None:
        assert key.startswith(prefix) and got.secret not in repr(got)
    problem = check_prefix(prefix)
    assert problem is None or isinstance(problem, str)


# --------------------------------------------------------------------------- JSON-RPC

JSON_SCALARS = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=12)
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
METHODS = st.sampled_from(["tools/call", "tools/list", "prompts/get", "resources/read", "initialize", "", "x"])


@st.composite
def jsonrpc_messages(draw: st.DrawFn) -> Any:
    """Mostly-valid JSON-RPC objects with one field at a time made odd."""
    msg: dict[str, Any] = {"jsonrpc": draw(st.sampled_from(["2.0", "2.0", "1.0", 2.0, None]))}
    kind = draw(st.sampled_from(["request", "notification", "response", "other"]))
    if kind in ("request", "notification"):
        msg["method"] = draw(METHODS | JSON_SCALARS)
        params = draw(
            st.fixed_dictionaries({}, optional={"name": JSON_SCALARS, "uri": JSON_SCALARS, "arguments": JSON_VALUES})
            | JSON_VALUES
        )
        if draw(st.booleans()):
            msg["params"] = params
    if kind == "request" or (kind == "response" and draw(st.booleans())):
        msg["id"] = draw(st.integers() | st.text(max_size=6) | JSON_SCALARS)
    if kind == "response":
        msg[draw(st.sampled_from(["result", "error"]))] = draw(JSON_VALUES)
    if kind == "other":
        msg.update(draw(st.dictionaries(st.text(max_size=6), JSON_VALUES, max_size=3)))
    return msg


def _check_body(body: Body) -> None:
    for m in body.messages:
        assert isinstance(m.raw, dict) and m.raw.get("jsonrpc") == "2.0"
        if "method" in m.raw:
            assert isinstance(m.method, str) and m.method
            key = NAME_BEARING_METHODS.get(m.method)
            if key is not None:
                assert isinstance(m.params.get(key), str), "a name-bearing call always names a string"
            if m.method == "tools/call":
                assert isinstance(m.tool, str)
        else:
            assert "result" in m.raw or "error" in m.raw


@given(payload=st.binary(max_size=200) | st.text(max_size=200).map(str.encode))
@_n(800)
def test_jsonrpc_any_bytes(payload: bytes) -> None:
    """Any bytes: a parsed body or a JSON-RPC parse/invalid-request error (HTTP 400), nothing else."""
    try:
        body = parse_body(payload)
    except JsonRpcError as e:
        assert e.code in (PARSE_ERROR, INVALID_REQUEST, INVALID_PARAMS)
        return
    _check_body(body)


@given(
    messages=st.lists(jsonrpc_messages(), min_size=1, max_size=4),
    batch=st.booleans(),
    headers=st.lists(
        st.tuples(st.sampled_from(["Mcp-Method", "mcp-name", "Mcp-Name", "X-Other"]), METHODS | st.text(max_size=8)),
        max_size=3,
    ),
)
@_n(400)
def test_jsonrpc_messages_and_headers(messages: list[Any], batch: bool, headers: list[tuple[str, str]]) -> None:
    """Structured messages (batches included) and Mcp-* headers: every element is checked;
    headers that survive ``check_headers`` agree with every element of the body."""
    import json

    payload = json.dumps(messages if batch else messages[0]).encode()
    try:
        body = parse_body(payload)
    except JsonRpcError as e:
        assert e.code in (PARSE_ERROR, INVALID_REQUEST, INVALID_PARAMS)
        return
    _check_body(body)
    try:
        check_headers(body, headers)
    except JsonRpcError as e:
        assert e.code == HEADER_MISMATCH
        return
    for name, value in headers:
        if name.lower() == "mcp-method":
            assert all(m.method == value for m in body.messages), "a body the Mcp-Method header contradicts passed"


def test_jsonrpc_deep_nesting_and_huge_numbers() -> None:
    """Edge inputs a generator rarely reaches: 100k-deep arrays, 5000-digit numbers."""
    for payload in (b"[" * 100_000, b"{" * 50_000, b"1" * 5000, b'{"jsonrpc":"2.0","id":' + b"9" * 5000 + b"}"):
        with pytest.raises(JsonRpcError):
            parse_body(payload)


# --------------------------------------------------------------------------- config

SECTIONS = ("listen", "tls", "admin", "store", "keys", "credentials", "upstreams", "rate_limits", "cache",
            "metrics", "log", "server", "cors")  # fmt: skip
ODD_STRINGS = st.sampled_from(
    ["", "~", "~nosuchuser/x", "9" * 400, "1e400", "http://[::1", "http://h:99999", "${NOPE}", "${PLEX_TOKEN}",
     "\x00", "-1", "0", "10/second", "64MiB", "30s", "http://127.0.0.1:1", "/plex", "plex", "mcp", "*"]
)  # fmt: skip
ANY_VALUE = st.recursive(
    ODD_STRINGS | st.text(max_size=10) | st.integers() | st.floats() | st.booleans() | st.none(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8) | ODD_STRINGS, inner, max_size=3),
    max_leaves=8,
)
UPSTREAM_KEYS = ("id", "kind", "url", "path_prefix", "strip_prefix", "token_env", "token", "headers", "plex",
                 "timeouts", "tls", "max_body", "rate_limits", "quota", "concurrency", "mcp")  # fmt: skip
SECTION_KEYS = ("listen", "token_env", "kind", "path", "state_path", "poll_interval", "prefix", "max_lifetime",
                "argon2", "backend", "default", "quota", "max_bytes", "rules", "access", "level", "trusted_proxies",
                "enabled", "origins", "cert", "key", "max_key_series", "shutdown_grace", "upstream", "ttl",
                "statuses", "vary", "methods", "header_timeout", "max_header_size", "body_idle_timeout",
                "keepalive_timeout", "public_url", "upstream_token_envs", "stream_check_interval",
                "quota_flush_interval", "max_keys_per_owner", "failed_attempts_per_minute")  # fmt: skip
UPSTREAM = st.fixed_dictionaries(
    {"id": st.sampled_from(["plex", "m", "Bad Id"]), "url": ODD_STRINGS},
    optional={k: ANY_VALUE for k in UPSTREAM_KEYS if k not in ("id", "url")},
)
CONFIGS = st.fixed_dictionaries(
    {},
    optional={
        **{s: st.dictionaries(st.sampled_from(SECTION_KEYS), ANY_VALUE, max_size=4) | ANY_VALUE for s in SECTIONS},
        "upstreams": st.lists(UPSTREAM, max_size=3) | ANY_VALUE,
        "cache": st.fixed_dictionaries(
            {}, optional={"rules": st.lists(st.dictionaries(st.sampled_from(SECTION_KEYS), ANY_VALUE, max_size=5))}
        ),
    },
)
_PATHED = re.compile(r"^(?:" + "|".join(SECTIONS) + r")\b")


def _assert_named(problems: list[str], data: object) -> None:
    assert problems, "a ConfigError with no problem in it"
    top = data if isinstance(data, dict) else {}
    for p in problems:
        named = (
            _PATHED.match(p)
            or any(p.startswith((f"{k}: unknown option", f"{k!r}: unknown option")) for k in top)
            or (not isinstance(data, dict) and p.startswith("expected a mapping"))
        )
        assert named, f"config problem without a path: {p!r}"


@given(data=CONFIGS | ANY_VALUE)
@_n(500)
def test_config_any_document(data: Any) -> None:
    """Any YAML-shaped document: a Config or ConfigError whose every problem names its path."""
    env = {"PLEX_TOKEN": PLEX_TOKEN, "SIDECAR_ADMIN_TOKEN": "x"}
    try:
        parse_config(data, env=env, base=Path(tempfile.gettempdir()))
    except ConfigError as e:
        _assert_named(e.problems, data)


@pytest.mark.parametrize(
    ("upstream", "top", "where"),
    [
        ({"max_body": "9" * 400}, {}, "upstreams[0].max_body: "),  # was OverflowError
        ({}, {"store": {"path": "~nosuchuser-h7/x.db"}}, "store.path: "),  # was RuntimeError
        ({"url": "http://[::1"}, {}, "upstreams[0].url: "),  # was ValueError from urlsplit
        ({"url": "http://127.0.0.1:99999"}, {}, "upstreams[0].url: "),  # was accepted, failed at first use
        ({}, {"": 1}, "'': unknown option"),  # was a problem naming no path
    ],
)
def test_config_inputs_the_fuzzer_found(upstream: dict[str, Any], top: dict[str, Any], where: str) -> None:
    """What ``test_config_any_document`` found: each is a ConfigError naming its path, not a crash."""
    data = {"upstreams": [{"id": "m", "kind": "mcp", "url": "http://127.0.0.1:1", **upstream}], **top}
    with pytest.raises(ConfigError) as e:
        parse_config(data, env={}, base=Path(tempfile.gettempdir()))
    assert any(p.startswith(where) for p in e.value.problems), e.value.problems


@pytest.fixture(scope="module")
def yaml_dir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory() as d:
        yield Path(d)


YAML_SNIPPETS = st.sampled_from(
    ["upstreams:\n", "  - id: plex\n", "    url: http://127.0.0.1:1\n", "    token_env: PLEX_TOKEN\n", "listen: ",
     "&a [*a]\n", "!!python/object:os.system\n", "? [a]\n: b\n", "<<: *x\n", "a: 1\na: 2\n", "\t", "- ", "{", "'",
     "keys: {prefix: pmcp_}\n", "\x00", "\ufeff", "%YAML 1.1\n---\n", "cache:\n  rules:\n    - {}\n"]
)  # fmt: skip


@given(parts=st.lists(YAML_SNIPPETS | st.text(max_size=12), max_size=8))
@_n(400)
def test_config_any_yaml_text(yaml_dir: Path, parts: list[str]) -> None:
    """Any file content through ``load_config`` (what ``sidecar serve``/``config check`` run): ok or ConfigError."""
    path = yaml_dir / "sidecar.yaml"
    path.write_text("".join(parts), encoding="utf-8", errors="surrogatepass")
    try:
        load_config(path, env={"PLEX_TOKEN": PLEX_TOKEN})
    except ConfigError as e:
        assert e.problems and all(isinstance(p, str) and p for p in e.problems)


# --------------------------------------------------------------------------- paths, end to end

PERMS = {
    "lib": {"upstreams": ["*"], "paths": ["/library/sections*"]},
    "read": {"upstreams": ["*"], "paths": ["plex:read"]},
    "play": {"upstreams": ["*"], "paths": ["plex:playback"]},
    "any": {"upstreams": ["*"]},
}
SEGMENTS = st.sampled_from(
    ["library", "sections", "Library", "LIBRARY", "1", "all", "refresh", "Refresh", "security", "token", "resources",
     "myplex", "MyPlex", "status", "sessions", "history", "video", ":", "transcode", "universal", "session", "photo",
     "..", ".", "%2e", "%2E%2e", ".%2e", "%2e.", "...", "%2F", "%2f..", "%5C", "\\", "", "plex", "%70lex", "PLEX",
     "metadata", "parts", "identity", "hubs", "search", "x;y", "a%00b", "%25", "%252F", "%252e%252e"]
)  # fmt: skip
_UNRESERVED = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-._~:@!$&'()*+,;=%\\")


@st.composite
def raw_targets(draw: st.DrawFn) -> str:
    """A request target with the spellings that split a checker from a server: //, %2F, encoded
    dots, case, trailing slashes, backslashes, an encoded route prefix."""
    segs = draw(st.lists(SEGMENTS, min_size=1, max_size=7))
    out = []
    for seg in segs:
        if draw(st.integers(0, 5)) == 0 and seg and "%" not in seg:  # percent-encode one character
            i = draw(st.integers(0, len(seg) - 1))
            seg = seg[:i] + f"%{ord(seg[i]):02{draw(st.sampled_from('xX'))}}" + seg[i + 1 :]
        out.append(seg)
    sep = draw(st.sampled_from(["/", "/", "/", "//"]))
    route = draw(st.sampled_from(["", "", "", "/plex", "/%70lex", "/PLEX", "/pl%65x", "//plex", "/plex%2F", "/plex/"]))
    target = route + "/" + sep.join(out) + draw(st.sampled_from(["", "", "/", "//"]))
    return "".join(c if c in _UNRESERVED or c == "/" else urllib.parse.quote(c) for c in target)


def _remove_dot_segments(path: str) -> str:
    """RFC 3986 5.2.4, as a server resolving the path itself would."""
    out: list[str] = []
    for seg in path.split("/")[1:]:
        if seg == "..":
            if out:
                out.pop()
        elif seg != ".":
            out.append(seg)
    trailing = path.endswith(("/.", "/.."))
    return "/" + "/".join(out) + ("/" if trailing and out else "")


def upstream_view(raw_path: str) -> str:
    """The path a lenient upstream would serve for this raw path: decode once (``%2F`` too),
    backslash as slash, slashes collapsed, dot segments resolved."""
    p = urllib.parse.unquote(raw_path.split("?", 1)[0], errors="surrogateescape").replace("\\", "/")
    p = re.sub("/{2,}", "/", p)
    return _remove_dot_segments(p)


@given(
    decoded=raw_targets().map(lambda t: urllib.parse.unquote(t, errors="surrogateescape")),
    who=st.sampled_from(sorted(PERMS)),
    method=st.sampled_from(["GET", "HEAD", "POST", "DELETE"]),
)
@_n(500)
def test_allowed_path_means_the_same_to_a_lenient_server(decoded: str, who: str, method: str) -> None:
    """``permissions.allowed`` alone: a path it allows is allowed, and mints no token, in the
    form a server that collapses slashes and resolves dot segments would serve."""
    perms = Permissions.from_dict(PERMS[who])
    if allowed(perms, "plex", "plex", method, decoded) is not None:
        return
    served = upstream_view(quote_path(decoded))
    assert not is_token_minting(served), f"{decoded!r} allowed, serves token-minting {served!r}"
    reason = allowed(perms, "plex", "plex", method, served)
    assert reason is None, f"key {who!r}: {decoded!r} allowed, but the server serves {served!r}: {reason}"


def quote_path(path: str) -> str:
    """Back to a raw path (``%`` kept literal), so ``upstream_view`` decodes nothing twice."""
    return urllib.parse.quote(path, safe="/:@!$&'()*+,;=-._~\\", errors="surrogateescape")


class _Keys(dict[str, str]):
    def __repr__(self) -> str:  # never print full keys in a failure report
        return f"<{len(self)} keys>"


@pytest.fixture(scope="module")
def path_rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ThreadedSidecar, Recorder, dict[str, str]]]:
    """One sidecar for all path examples: upstream ``plex`` at ``/`` and ``pp`` at ``/plex``
    (stripped), both on one recording upstream (``pp`` under ``/P`` so its requests are told apart)."""
    tmp = tmp_path_factory.mktemp("paths")
    rec = Recorder()

    def config(url: str) -> dict[str, Any]:
        cfg = base_config(url, tmp, log={"access": "off"})
        cfg["upstreams"].append(
            {"id": "pp", "kind": "plex", "url": url + "/P", "token_env": "PLEX_TOKEN", "path_prefix": "/plex"}
        )
        return cfg

    ts = ThreadedSidecar().start(
        lambda: recording_upstream(rec), config, {"PLEX_TOKEN": PLEX_TOKEN, "SIDECAR_ADMIN_TOKEN": "a"}, tmp
    )
    keys = _Keys({name: ts.create_key(name=name, permissions=perms)[1] for name, perms in PERMS.items()})
    try:
        yield ts, rec, keys
    finally:
        ts.stop()


def _send(addr: tuple[str, int], request: bytes) -> bytes:
    with socket.create_connection(addr, timeout=5) as s:
        s.sendall(request)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
    return out


@example(target="/%70lex", who="read", method="GET")  # issue 14 class 9: authorised as /, forwarded as /ex
@example(target="/library/sections/..%2F..%2Fsecurity/token", who="lib", method="GET")
@given(
    target=raw_targets(),
    who=st.sampled_from(sorted(PERMS)),
    method=st.sampled_from(["GET", "GET", "HEAD", "POST", "DELETE", "PUT"]),
)
@_n(400)
def test_path_authorised_is_path_forwarded(
    path_rig: tuple[ThreadedSidecar, Recorder, dict[str, str]], target: str, who: str, method: str
) -> None:
    """Whatever the spelling, a request the upstream receives is one the key may make on the
    path the upstream will serve: no //, %2F, encoded dot, case or prefix trick widens a glob
    or reaches a token-minting endpoint. The client sees a designed 4xx otherwise."""
    ts, rec, keys = path_rig
    before = len(rec.seen)
    req = f"{method} {target} HTTP/1.1\r\nHost: plex\r\nX-Plex-Token: {keys[who]}\r\nConnection: close\r\n"
    answer = _send(ts.proxy_addr, (req + "Content-Length: 0\r\n\r\n").encode())
    status = int(answer[9:12]) if answer.startswith(b"HTTP/1.") else 0
    assert status != 500 and status != 0, f"{target!r} answered {answer[:80]!r}"
    perms = Permissions.from_dict(PERMS[who])
    for seen in rec.seen[before:]:
        served = upstream_view(seen.raw_path)
        upstream_id = "plex"
        if served == "/P" or served.startswith("/P/"):
            upstream_id, served = "pp", served[2:] or "/"
        assert not is_token_minting(served), f"{target!r} reached token-minting {served!r}"
        reason = allowed(perms, upstream_id, "plex", seen.method, served)
        assert reason is None, f"key {who!r}: {target!r} was forwarded as {seen.raw_path!r} ({served!r}): {reason}"


# --------------------------------------------------------------------------- query, end to end


@st.composite
def attack_queries(draw: st.DrawFn) -> list[tuple[str, str]]:
    """Query parameters hiding the key (or another key) where Plex would, and where it would not."""
    key = "{KEY}"
    values = st.sampled_from(
        [key, "x" + key, "{OTHER}", "http://attacker.example/x.png?X-Plex-Token=" + key,
         "//attacker.example/x?X-Plex-Token=" + key, "/library/metadata/1/thumb?X-Plex-Token=" + key,
         "/security/token?X-Plex-Token=" + key, "/library/sections", "", "1"]
    )  # fmt: skip
    names = st.sampled_from(
        ["X-Plex-Token", "x-plex-token", "X-Plex-Token ", "X-Plex-Token%20", "url", "foo", "X-Plex-Client-Identifier",
         ""]
    )  # fmt: skip
    return draw(st.lists(st.tuples(names, values), max_size=4))


@given(query=attack_queries(), in_header=st.booleans(), who=st.sampled_from(["lib", "any"]))
@_n(300)
def test_query_key_never_forwarded_token_only_where_expected(
    path_rig: tuple[ThreadedSidecar, Recorder, dict[str, str]], query: list[tuple[str, str]], in_header: bool, who: str
) -> None:
    """No full key reaches the upstream in any parameter; the real token appears only as the
    ``X-Plex-Token`` parameter/header, or inside a relative ``url=`` the key may use."""
    ts, rec, keys = path_rig
    key, other = keys[who], keys["read"]
    pairs = [(n, v.replace("{KEY}", key).replace("{OTHER}", other)) for n, v in query]
    qs = "&".join((n if "%" in n else urllib.parse.quote(n)) + "=" + urllib.parse.quote(v, safe="/:") for n, v in pairs)
    cred = f"X-Plex-Token: {key}\r\n" if in_header else ""
    if not in_header:
        qs = (qs + "&" if qs else "") + f"X-Plex-Token={key}"
    before = len(rec.seen)
    req = f"GET /library/sections/1?{qs} HTTP/1.1\r\nHost: plex\r\n{cred}Connection: close\r\n\r\n"
    answer = _send(ts.proxy_addr, req.encode())
    assert answer.startswith(b"HTTP/1.1 ") and answer[9:12] != b"500"
    perms = Permissions.from_dict(PERMS[who])
    for seen in rec.seen[before:]:
        flat = seen.raw_path + "\n" + "\n".join(f"{n}: {v}" for n, v in seen.headers)
        once = urllib.parse.unquote(flat)
        for k in keys.values():
            assert k not in flat and k not in once and k not in urllib.parse.unquote(once), "a full key went upstream"
        for name, value in urllib.parse.parse_qsl(seen.raw_path.partition("?")[2], keep_blank_values=True):
            if PLEX_TOKEN not in value or name.lower() == "x-plex-token":
                continue
            assert name == "url" and value.startswith("/") and not value.startswith("//"), (
                f"the real token went upstream in {name}={value!r}"
            )
            nested = urllib.parse.urlsplit(value).path
            assert allowed(perms, "plex", "plex", "GET", nested) is None, "token attached to a url= the key may not use"

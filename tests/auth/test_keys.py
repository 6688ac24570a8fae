"""Key format: prefix, public id, 192-bit secret, checksum; URL-safe, and python-plexapi-safe."""

from __future__ import annotations

import re
from urllib.parse import quote

import pytest

from sidecar.auth.keys import (
    BODY_LEN,
    ID_LEN,
    SECRET_LEN,
    check_prefix,
    display_form,
    generate_key,
    key_pattern,
    parse_key,
)
from sidecar.config import ConfigError, parse_config

PREFIXES = ["pmcp_", "plx_sk_", "k"]


@pytest.mark.parametrize("prefix", PREFIXES)
def test_generated_key_parses_back_to_its_parts(prefix: str) -> None:
    key, parts = generate_key(prefix)
    assert key.startswith(prefix)
    assert len(key) == len(prefix) + BODY_LEN
    parsed = parse_key(prefix, key)
    assert parsed == parts
    assert len(parts.key_id) == ID_LEN and len(parts.secret) == SECRET_LEN
    assert SECRET_LEN * 4 >= 160  # hex: 4 bits a character


def test_body_is_lowercase_hex_and_keys_are_unique() -> None:
    keys = {generate_key("pmcp_")[0] for _ in range(500)}
    assert len(keys) == 500
    for key in keys:
        assert re.fullmatch(r"pmcp_[0-9a-f]{68}", key)
        assert re.fullmatch(key_pattern("pmcp_"), key)  # what a secret scanner would use


def test_key_survives_plexapi_websocket_rewrite_and_url_quoting() -> None:
    # plexapi's AlertListener: url(key, includeToken=True).replace('http', 'ws') on the whole URL.
    for _ in range(200):
        key, _ = generate_key("pmcp_")
        url = f"http://127.0.0.1:32400/:/websockets/notifications?X-Plex-Token={key}"
        ws_url = url.replace("http", "ws")
        assert ws_url == f"ws://127.0.0.1:32400/:/websockets/notifications?X-Plex-Token={key}"
        assert quote(key, safe="") == key  # nothing to percent-encode


def test_every_one_character_typo_is_rejected() -> None:
    key, _ = generate_key("pmcp_")
    alphabet = "0123456789abcdefABCDEF-_xz"
    typos = 0
    for i in range(len(key)):
        for ch in alphabet:
            if ch == key[i]:
                continue
            typo = key[:i] + ch + key[i + 1 :]
            assert parse_key("pmcp_", typo) is None, (i, ch)
            typos += 1
    assert typos > 1000


def test_truncated_extended_swapped_and_wrong_prefix_keys_are_rejected() -> None:
    key, _ = generate_key("pmcp_")
    body = key[len("pmcp_") :]
    assert parse_key("pmcp_", key[:-1]) is None
    assert parse_key("pmcp_", key + "0") is None
    assert parse_key("pmcp_", key.upper()) is None
    assert parse_key("plx_sk_", key) is None
    assert parse_key("pmcp_", "plx_" + body) is None
    swapped = key[:10] + key[11] + key[10] + key[12:]
    if swapped != key:
        assert parse_key("pmcp_", swapped) is None
    assert parse_key("pmcp_", "") is None
    assert parse_key("pmcp_", "pmcp_") is None


def test_checksum_covers_the_prefix() -> None:
    key, _ = generate_key("pmcp_")
    # Same body under another prefix of the same length: the checksum no longer matches.
    assert parse_key("pmcx_", "pmcx_" + key[5:]) is None


def test_repr_never_shows_the_secret() -> None:
    _, parts = generate_key("pmcp_")
    assert parts.secret not in repr(parts)


def test_display_form() -> None:
    key, parts = generate_key("pmcp_")
    shown = display_form("pmcp_", parts.key_id, key)
    assert shown == f"pmcp_{parts.key_id[:4]}…{key[-4:]}"
    assert parts.secret not in shown


def test_generate_with_given_id_checks_it() -> None:
    key, parts = generate_key("pmcp_", "0123456789ab")
    assert parts.key_id == "0123456789ab" and parse_key("pmcp_", key) == parts
    with pytest.raises(ValueError):
        generate_key("pmcp_", "NOT-HEX")


@pytest.mark.parametrize(
    ("prefix", "problem"),
    [
        ("pmcp_", None),
        ("plx_sk_", None),
        ("Pmcp_", "lowercase"),
        ("1abc_", "starting with a letter"),
        ("pm-cp_", "lowercase"),
        ("a" * 17, "1-16"),
        ("http_", "http"),
        ("xhttpx_", "http"),
    ],
)
def test_check_prefix(prefix: str, problem: str | None) -> None:
    got = check_prefix(prefix)
    if problem is None:
        assert got is None
    else:
        assert got is not None and problem in got


def test_config_rejects_a_prefix_plexapi_would_break() -> None:
    cfg = {
        "keys": {"prefix": "http_"},
        "upstreams": [{"id": "plex", "kind": "plex", "url": "http://127.0.0.1:32400", "token_env": "T"}],
    }
    with pytest.raises(ConfigError) as e:
        parse_config(cfg, env={"T": "x"})
    assert any(p.startswith("keys.prefix: ") and "'http'" in p for p in e.value.problems)
    cfg["keys"] = {"prefix": "plx_sk_"}
    assert parse_config(cfg, env={"T": "x"}).keys.prefix == "plx_sk_"

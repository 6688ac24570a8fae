"""Finding the client's credential, in any of the six forms clients already send.

Authentication only (who are you): this module never looks at the store. Two
*different* keys in one request are refused with 400, since a proxy that picked one
would let an attacker smuggle a second identity past whatever logged the first.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from urllib.parse import parse_qsl, unquote, unquote_plus, urlsplit

from multidict import CIMultiDict, MultiDict, MultiMapping

from ..config import CredentialsConfig
from ..core.errors import BadRequest
from .keys import key_pattern

__all__ = [
    "CLIENT_CREDENTIAL_HEADERS", "Credential", "extract_credential", "relative_url_path", "strip_credential",
]  # fmt: skip

PLEX_TOKEN = "X-Plex-Token"
CLIENT_CREDENTIAL_HEADERS = ("Authorization", "x-api-key", PLEX_TOKEN)


@dataclass(frozen=True, slots=True)
class Credential:
    key: str
    forms: tuple[str, ...]  # e.g. ("bearer", "plex_query"): for logs and metrics

    def __repr__(self) -> str:  # never print the key
        return f"Credential(forms={self.forms!r})"


def _from_authorization(value: str, cfg: CredentialsConfig) -> tuple[str, str] | None:
    scheme, _, rest = value.strip().partition(" ")
    scheme, rest = scheme.lower(), rest.strip()
    if scheme == "apikey" and cfg.apikey:
        form = "apikey"
    elif scheme == "bearer" and cfg.bearer:
        form = "bearer"
    elif scheme == "basic" and cfg.basic:
        try:
            decoded = base64.b64decode(rest, validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError, ValueError):  # ValueError: non-ASCII text to b64decode
            raise BadRequest("malformed Basic credential: not base64 of user:key") from None
        _, sep, rest = decoded.partition(":")
        if not sep:
            raise BadRequest("malformed Basic credential: expected user:key")
        form = "basic"
    elif scheme in ("apikey", "bearer", "basic"):
        return None  # that form is turned off: as if absent
    else:
        raise BadRequest("unsupported Authorization scheme; use ApiKey, Bearer or Basic")
    if not rest or " " in rest:
        raise BadRequest(f"malformed {scheme} credential")
    return rest, form


def extract_credential(
    headers: Mapping[str, str] | MultiMapping[str], query: MultiMapping[str], cfg: CredentialsConfig
) -> Credential | None:
    """The one key this request presents, None if none, or BadRequest."""
    found: list[tuple[str, str]] = []
    if isinstance(headers, MultiMapping):
        getall = headers.getall
        auth, api_keys, plex = getall("Authorization", ()), getall("x-api-key", ()), getall(PLEX_TOKEN, ())
    else:
        auth, api_keys, plex = (_one(headers, n) for n in ("Authorization", "x-api-key", PLEX_TOKEN))
    for value in auth:
        got = _from_authorization(value, cfg)
        if got:
            found.append(got)
    # An empty X-Plex-Token / x-api-key (some Plex clients send one before signing in)
    # is no credential at all: the client gets 401 with a challenge, not 400.
    if cfg.x_api_key:
        for value in api_keys:
            if value.strip():
                found.append((value.strip(), "x_api_key"))
    if cfg.plex_header:
        for value in plex:
            if value.strip():
                found.append((value.strip(), "plex_header"))
    if cfg.plex_query and query:
        for name, value in query.items():
            if name.lower() == "x-plex-token" and value.strip():
                found.append((value.strip(), "plex_query"))
    if not found:
        return None
    if len(found) == 1:
        return Credential(key=found[0][0], forms=(found[0][1],))
    if len({k for k, _ in found}) > 1:
        raise BadRequest("two different credentials in one request")
    return Credential(key=found[0][0], forms=tuple(dict.fromkeys(f for _, f in found)))


def _one(headers: Mapping[str, str], name: str) -> list[str]:
    value = headers.get(name)
    return [value] if value is not None else []


def relative_url_path(value: str) -> str | None:
    """The decoded path of a nested ``url=`` value that names a path on the upstream itself
    (no scheme, no host), else None. Plex fetches such a URL from itself on the key's behalf."""
    try:
        parts = urlsplit(value)
    except ValueError:  # e.g. a bad [IPv6] host: certainly not a path on the upstream
        return None
    if parts.scheme or parts.netloc:
        return None
    return "/" + unquote(parts.path).lstrip("/")


def _mentions(value: str, key: str) -> bool:
    return key in value or ("%" in value and key in unquote_plus(value))


def _token_goes_here(value: str, key: str, may_use: Callable[[str], bool] | None) -> bool:
    """A relative nested URL, on a path the key may use, carrying the key only as its ``X-Plex-Token``."""
    if not value.startswith("/") or value.startswith("//") or "\\" in value or may_use is None:
        return False
    try:
        parts = urlsplit(value)
    except ValueError:
        return False
    if parts.scheme or parts.netloc or not may_use(unquote(parts.path)):
        return False
    as_token = sum(
        1 for n, v in parse_qsl(parts.query, keep_blank_values=True) if n.lower() == "x-plex-token" and v == key
    )
    # Every occurrence, literal or encoded, must be one of those X-Plex-Token values.
    return as_token > 0 and value.count(key) == as_token == unquote_plus(value).count(key)


@lru_cache(maxsize=8)
def _key_shape(prefix: str) -> re.Pattern[str]:
    return re.compile(key_pattern(prefix))


def _foreign_key(name: str, value: str, key: str, prefix: str) -> bool:
    """Does a parameter's name or value (plain or percent-decoded once) hold a key of ``prefix``
    other than ``key``? Usually decided by three substring tests: no prefix, nothing encoded."""
    text = f"{name}={value}"
    if prefix not in text and "%" not in text and "+" not in text:
        return False
    shape = _key_shape(prefix)
    for candidate in (text, unquote_plus(text)):
        if key:
            candidate = candidate.replace(key, "")
        if prefix in candidate and shape.search(candidate):
            return True
    return False


def strip_credential(
    headers: CIMultiDict[str],
    query: MultiDict[str],
    key: str,
    replacement: str | None,
    may_use: Callable[[str], bool] | None = None,
    key_prefix: str = "",
) -> None:
    """Remove every trace of the client key, in place (DESIGN invariant 3).

    Credential headers go (the caller injects the upstream's own). In the query the key is
    replaced by ``replacement`` (the real upstream token) only where the upstream expects a
    token: the ``X-Plex-Token`` parameter, and a *relative* nested ``url=`` (Plex's
    ``/photo/:/transcode``) whose path ``may_use`` allows and that carries the key only as
    its own ``X-Plex-Token``. Any other parameter that mentions the key, even
    percent-encoded, is dropped: an absolute URL never gets a token, and neither does a
    value the upstream might hand to someone else. Without a ``replacement`` (MCP) every
    parameter carrying the key is dropped. With ``key_prefix``, so is any parameter whose
    name or value holds *another* key of that shape (``?foo=<someone else's key>``).
    """
    for name in CLIENT_CREDENTIAL_HEADERS:
        headers.popall(name, None)
    if key and any(_mentions(n, key) or _mentions(v, key) for n, v in headers.items()):
        # Anywhere else (Referer, Cookie, a subprotocol, X-Whatever): the header goes, it is never rewritten.
        kept = [(n, v) for n, v in headers.items() if not (_mentions(n, key) or _mentions(v, key))]
        headers.clear()
        headers.extend(kept)
    if not query:
        return
    items = list(query.items())
    query.clear()
    token_sent = False
    for name, value in items:
        lname = name.lower()
        if lname == "x-plex-token":
            if replacement is not None and not token_sent:
                query.add(PLEX_TOKEN, replacement)
                token_sent = True
            continue
        if key_prefix and _foreign_key(name, value, key, key_prefix):
            continue
        if key and _mentions(name, key):
            continue  # the key as a parameter's name: dropped like any other mention
        if key and _mentions(value, key):
            if replacement is None or lname != "url" or not _token_goes_here(value, key, may_use):
                continue
            value = value.replace(key, replacement)
        query.add(name, value)

"""Finding the client's credential, in any of the six forms clients already send.

Authentication only (who are you): this module never looks at the store. Two
*different* keys in one request are refused with 400, since a proxy that picked one
would let an attacker smuggle a second identity past whatever logged the first.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from dataclasses import dataclass

from multidict import CIMultiDict, MultiDict, MultiMapping

from .config import CredentialsConfig
from .errors import BadRequest

__all__ = ["CLIENT_CREDENTIAL_HEADERS", "Credential", "extract_credential", "strip_credential"]

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
        except (binascii.Error, UnicodeDecodeError):
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


def strip_credential(headers: CIMultiDict[str], query: MultiDict[str], key: str, replacement: str | None) -> None:
    """Remove every trace of the client key, in place.

    Credential headers go. In the query, ``X-Plex-Token`` and any value that embeds the
    key (Plex nests it in ``/photo/:/transcode?url=…``) get ``replacement`` (the real
    upstream token) or are dropped when there is none.
    """
    for name in CLIENT_CREDENTIAL_HEADERS:
        headers.popall(name, None)
    if not query:
        return
    items = list(query.items())
    query.clear()
    for name, value in items:
        if name.lower() == "x-plex-token":
            if replacement is not None:
                query.add(PLEX_TOKEN, replacement)
            continue
        if key and key in value:
            if replacement is None:
                continue
            value = value.replace(key, replacement)
        query.add(name, value)

"""Response-cache policy: may this be cached, for how long, and under which key.

Pure: no aiohttp, no I/O, no clock of its own (``now`` is an argument), so every rule
is a fast table-driven unit test. ``sidecar.cache.response`` does the storing and serving.

What is decided here:

- ``request_bypass``: requests the cache never looks at (not GET/HEAD, ``Range``,
  websocket upgrades, SSE, requests with a body).
- ``storable``: whether an upstream answer may be stored and for how long: the rule
  allows the status, no ``Set-Cookie``, no ``Cache-Control: no-store | private |
  no-cache``, no ``Vary: *``, no SSE or partial content, not over the size limit; the
  lifetime is the rule's TTL capped by ``s-maxage`` / ``max-age`` / ``Expires``, less
  the upstream's ``Age``. ``must-revalidate`` turns the rule's stale windows off.
- ``primary_key`` / ``variant_key``: a tuple of upstream, upstream identity (the token
  in use, as a keyed BLAKE2b digest: never in clear), path, the query with the
  credential (``X-Plex-Token``) dropped and parameters sorted, the rule's ``vary``
  headers, the ``IMPLICIT_VARY`` headers the client sent and, once the upstream has said so,
  its ``Vary`` headers. A plain tuple, not
  a digest of it: a dict hashes it in a fraction of the time, and a hit is that fast.

Keys are computed from the *client's* request, before anything is prepared for the
upstream, so a hit costs no header rewriting at all. That is exact because every
rewrite on the way up is a function of the upstream and its identity, both in the key:
credential headers are replaced by the identity's own (so they are never keyed), the
client's key inside a query value becomes the identity's token (so it is keyed as a
placeholder), and injected or hop-by-hop headers at most split entries that could have
been shared. The one rewrite that depends on the client is ``X-Forwarded-*``: an
answer that varies on it is per-client and never stored (``PER_CLIENT_HEADERS``).
"""

from __future__ import annotations

import fnmatch
import hashlib
import re
from collections.abc import Iterable
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from functools import lru_cache
from typing import Any

from multidict import MultiMapping

from ..config import PER_CLIENT_HEADERS, CacheRule

__all__ = [
    "CONDITIONAL_HEADERS",
    "CREDENTIAL_HEADERS",
    "CREDENTIAL_PARAMS",
    "IMPLICIT_VARY",
    "PER_CLIENT_HEADERS",
    "CacheKey",
    "Storable",
    "compile_glob",
    "normalise_query",
    "origin_of",
    "parse_cache_control",
    "primary_key",
    "request_bypass",
    "storable",
    "variant_key",
]

# Query parameters the sidecar itself sets to the upstream identity (the client's key is
# replaced by the real token on the way up), so they add nothing the identity does not
# already say. Client-supplied parameters are never dropped: if one could change the
# upstream's answer, dropping it would let one client's answer reach another.
CREDENTIAL_PARAMS = frozenset({"x-plex-token"})

# Request headers never keyed: the upstream sees the identity's own credential in their
# place (or none), and the identity is part of every key.
CREDENTIAL_HEADERS = frozenset({"authorization", "x-api-key", "x-plex-token"})


_KEY_PLACEHOLDER = "\0key"  # stands for the client's key inside a query value

CacheKey = tuple[Any, ...]

# Stripped from a request that fills the cache, so the upstream answers in full.
CONDITIONAL_HEADERS = ("If-None-Match", "If-Modified-Since", "If-Match", "If-Unmodified-Since", "If-Range")

_CC_TOKEN = re.compile(r"""\s*([^\s=,]+)\s*(?:=\s*("(?:[^"\\]|\\.)*"|[^,]*))?\s*(?:,|$)""")


def parse_cache_control(values: Iterable[str]) -> dict[str, str | None]:
    """Directives of one or more ``Cache-Control`` lines, names lower-cased.

    A repeated directive keeps its smallest numeric value: RFC 9111 lets a cache treat
    conflicting lifetimes as stale, and the shortest is the conservative reading.
    """
    out: dict[str, str | None] = {}
    for line in values:
        for m in _CC_TOKEN.finditer(line):
            name = m.group(1).lower()
            raw = m.group(2)
            value = raw.strip().strip('"') if raw is not None else None
            if name in out and out[name] is not None and value is not None:
                prev = _seconds(out[name])
                cur = _seconds(value)
                if prev is not None and (cur is None or prev <= cur):
                    continue
            out[name] = value
    return out


def _seconds(value: str | None) -> int | None:
    if value is None or not value.isdigit():
        return None
    return int(value)


def request_bypass(method: str, headers: MultiMapping[str]) -> str | None:
    """Why the cache must not answer this request (None: it may look)."""
    if method not in ("GET", "HEAD"):
        return "method"
    if "Range" in headers:
        return "range"
    if "Upgrade" in headers:
        return "upgrade"
    if "text/event-stream" in headers.get("Accept", ""):
        return "sse"
    if "Transfer-Encoding" in headers or headers.get("Content-Length", "0") not in ("0", ""):
        return "body"
    return None


@dataclass(frozen=True, slots=True)
class Storable:
    """The verdict on a storable answer: lifetimes in seconds from now."""

    ttl: float
    stale_while_revalidate: float
    stale_if_error: float
    vary: tuple[str, ...]  # request header names (lower case, sorted) the answer depends on


def storable(status: int, headers: MultiMapping[str], rule: CacheRule, *, now: float) -> Storable | None:
    """May this upstream answer be stored under ``rule``? None when it may not."""
    if status not in rule.statuses:
        return None
    if "Set-Cookie" in headers or "Set-Cookie2" in headers or "Content-Range" in headers:
        return None
    if headers.get("Content-Type", "").lower().startswith("text/event-stream"):
        return None
    length = headers.get("Content-Length")
    if length is not None and (not length.isdigit() or int(length) > rule.max_object_bytes):
        return None
    cc = parse_cache_control(headers.getall("Cache-Control", ()))
    if "no-store" in cc or "private" in cc or "no-cache" in cc:
        return None
    vary = _vary_names(headers)
    if vary is None:
        return None
    ttl = rule.ttl
    if "s-maxage" in cc or "max-age" in cc:
        limit = _seconds(cc.get("s-maxage")) if "s-maxage" in cc else _seconds(cc.get("max-age"))
        ttl = min(ttl, float(limit or 0))  # an unreadable lifetime is no lifetime
    elif "Expires" in headers:
        ttl = min(ttl, _expires_in(headers, now))
    age = _seconds(headers.get("Age", "").strip())
    if age:
        ttl -= age
    if ttl <= 0:
        return None
    revalidate = "must-revalidate" in cc or "proxy-revalidate" in cc
    return Storable(
        ttl=ttl,
        stale_while_revalidate=0.0 if revalidate else rule.stale_while_revalidate,
        stale_if_error=0.0 if revalidate else rule.stale_if_error,
        vary=vary,
    )


def _vary_names(headers: MultiMapping[str]) -> tuple[str, ...] | None:
    """Request headers the answer varies on; None for ``Vary: *`` or a per-client header (never storable).

    A compressed answer varies on ``Accept-Encoding`` whether or not the upstream says
    so: serving gzip to a client that did not ask for it is a broken response.
    """
    names: set[str] = set()
    for line in headers.getall("Vary", ()):
        for part in line.split(","):
            name = part.strip().lower()
            if name == "*" or name in PER_CLIENT_HEADERS:
                return None
            if name:
                names.add(name)
    if headers.get("Content-Encoding", "identity").strip().lower() not in ("identity", ""):
        names.add("accept-encoding")
    return tuple(sorted(names))


def _expires_in(headers: MultiMapping[str], now: float) -> float:
    """Seconds until ``Expires`` (against the upstream's ``Date`` when it sent one); 0 if unreadable."""
    try:
        expires = parsedate_to_datetime(headers.get("Expires", "")).timestamp()
    except (TypeError, ValueError, IndexError, OverflowError):
        return 0.0
    base = now
    if "Date" in headers:
        try:
            base = parsedate_to_datetime(headers.get("Date", "")).timestamp()
        except (TypeError, ValueError, IndexError, OverflowError):
            base = now
    return max(0.0, expires - base)


def normalise_query(items: Iterable[tuple[str, str]], client_key: str = "") -> tuple[tuple[str, str], ...]:
    """Credential parameters dropped, the client's key inside other values replaced by a
    placeholder, the rest sorted by name (values of one name keep their order)."""
    kept = []
    for k, v in items:
        if k.lower() in CREDENTIAL_PARAMS:
            continue
        if "\0" in v:  # a literal placeholder must not collide with a real key: NULs doubled, the placeholder's is one
            v = v.replace("\0", "\0\0")
        if client_key and client_key in v:
            v = v.replace(client_key, _KEY_PLACEHOLDER)
        kept.append((k, v))
    kept.sort(key=lambda kv: kv[0])
    return tuple(kept)


def _header_values(headers: MultiMapping[str], names: Iterable[str]) -> tuple[tuple[str, str], ...]:
    out = []
    for name in names:
        values = headers.getall(name, ()) if name not in CREDENTIAL_HEADERS else ()
        out.append((name, ",".join(" ".join(v.split()) for v in values) if values else "\0absent"))
    return tuple(out)


@lru_cache(maxsize=1024)
def _identity_tag(salt: bytes, identity: str, origin: str = "") -> bytes:
    material = f"{identity}\0{origin}" if origin else identity  # one digest: keys stay as small as they were
    return hashlib.blake2b(material.encode("utf-8", "surrogatepass"), key=salt, digest_size=16).digest()


def primary_key(
    salt: bytes,
    upstream: str,
    identity: str,
    path: str,
    query: tuple[tuple[str, str], ...],
    rule_vary: tuple[str, ...],
    headers: MultiMapping[str],
    origin: str = "",
) -> CacheKey:
    """The key before the upstream's own ``Vary`` is known (GET and HEAD share it).

    ``origin`` is what the upstream is told the client's side was (``X-Forwarded-Proto``/``-Host``,
    from the client's ``Host`` unless a trusted proxy said otherwise): servers build absolute URLs
    from it without saying ``Vary``, so one client's ``Host: attacker.example`` must not become
    another client's links (followed with that client's key).
    """
    vary = _header_values(headers, rule_vary) if rule_vary else ()
    return (upstream, _identity_tag(salt, identity, origin), path, query, vary)


def origin_of(scheme: str, headers: MultiMapping[str]) -> str:
    """Every input of the forwarded origin (``http.outbound.public_origin``), as the client sent them."""
    h = headers.get
    return f"{scheme}\0{h('Host', '')}\0{h('X-Forwarded-Proto', '')}\0{h('X-Forwarded-Host', '')}"


# Request headers always keyed, ``Vary`` or not: upstreams choose the representation from them
# without saying so (Plex: JSON or XML from ``Accept``, the language, CORS from ``Origin``), and
# a client that sends one must not choose what the next client of that identity gets.
# ``X-Plex-*`` headers (but the token) are keyed for the reason their query spellings are.
IMPLICIT_VARY = frozenset({"accept", "accept-language", "origin", "cookie"})
_HASHED = frozenset({"cookie"})  # may hold secrets: kept in a key only as a digest


def _implicit(headers: MultiMapping[str]) -> tuple[tuple[str, str | bytes], ...]:
    out: list[tuple[str, str | bytes]] = []
    for name, value in headers.items():
        lname = name.lower()
        if lname in IMPLICIT_VARY or (lname.startswith("x-plex-") and lname != "x-plex-token"):
            v = " ".join(value.split())
            raw = v.encode("utf-8", "surrogatepass")  # a header's non-UTF-8 byte is a lone surrogate here
            out.append((lname, hashlib.blake2b(raw, digest_size=16).digest() if lname in _HASHED else v))
    if len(out) > 1:
        out.sort(key=lambda nv: nv[0])  # stable: repeated lines of one name keep their order
    return tuple(out)


def variant_key(primary: CacheKey, vary: tuple[str, ...], headers: MultiMapping[str]) -> CacheKey:
    """The entry's key once the upstream's ``Vary`` names are known, with the ``IMPLICIT_VARY``
    headers the request sent (``primary`` when neither)."""
    implicit = _implicit(headers)
    if not vary:
        return (primary, implicit) if implicit else primary
    return (primary, _header_values(headers, vary), implicit)


@lru_cache(maxsize=1024)
def compile_glob(glob: str) -> re.Pattern[str]:
    """Path globs as everywhere in Sidecar: ``fnmatch``, ``*`` also crosses ``/``."""
    return re.compile(fnmatch.translate(glob))

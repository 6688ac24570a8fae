"""An identity provider's signing keys (JWKS): fetched, capped, cached, refetched with restraint.

The keys are fetched with aiohttp (one ``ClientSession`` for all providers), with a total
timeout, no redirects and a size cap, and kept for ``jwks_cache_ttl``. Keys are looked up
by ``kid``. A ``kid`` not in the set is how a key rotation shows itself, so it triggers a
refetch — but at most one per ``jwks_refetch_interval``, and concurrent requests share
it: a flood of tokens with random ``kid`` values costs the IdP one request per interval,
not one per token. When the IdP cannot be reached the keys already held keep working
(a stale set beats refusing every client); only an unknown ``kid`` fails then. A failure is
an answer that is not a key set (HTTP error, not JSON, no ``keys`` list); a well-formed set
without a usable signing key (``{"keys": []}``) is the IdP withdrawing every key, so the
keys held go, as one withdrawn key does.

Only public-key JWKs are kept (RSA, EC, OKP): an ``oct`` key in a JWKS is ignored, so a
published key can never become an HMAC secret. Keys marked ``use: enc`` are ignored.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable
from typing import Any

import aiohttp
from joserfc.errors import JoseError
from joserfc.jwk import ECKey, JWKRegistry, OKPKey, RSAKey

__all__ = ["MAX_JWKS_BYTES", "JwksCache", "JwksError", "PublicKey"]

log = logging.getLogger("sidecar.jwt")

MAX_JWKS_BYTES = 256 * 1024  # a real JWKS is a few KiB; a huge answer is a fault or an attack
MAX_KEYS = 100
PublicKey = RSAKey | ECKey | OKPKey


class JwksError(Exception):
    """The key set could not be fetched or read (the message names why, never a key)."""


def parse_jwks(body: bytes) -> dict[str, list[PublicKey]]:
    """``{"keys": [...]}`` -> kid ("" for none) -> the usable public keys of that kid; empty when the
    set has none (an answer, not an error: a failed fetch would keep the keys withdrawn)."""
    try:
        data = json.loads(body)
    except ValueError:
        raise JwksError("not JSON") from None
    keys = data.get("keys") if isinstance(data, dict) else None
    if not isinstance(keys, list):
        raise JwksError('no "keys" list')
    out: dict[str, list[PublicKey]] = {}
    for item in keys[:MAX_KEYS]:
        if not isinstance(item, dict) or item.get("kty") not in ("RSA", "EC", "OKP"):
            continue  # never an oct (symmetric) key: a published key must not become an HMAC secret
        if item.get("use", "sig") != "sig":
            continue
        kid = item.get("kid", "")
        if not isinstance(kid, str):
            continue
        public = {k: v for k, v in item.items() if k not in ("d", "p", "q", "dp", "dq", "qi", "oth")}
        try:
            key = JWKRegistry.import_key(public)
        except (JoseError, ValueError, TypeError, KeyError):  # KeyError: joserfc on a curve it does not know
            # An unsupported curve or a broken key: skip it, keep the others. Were the whole set refused,
            # the keys held would stay: a key the IdP withdrew would keep verifying, its successor unknown.
            continue
        if isinstance(key, RSAKey | ECKey | OKPKey):
            out.setdefault(kid, []).append(key)
    return out


class JwksCache:
    """One provider's key set. ``find(kid)`` is what verification calls."""

    def __init__(
        self,
        url: str,
        session: Callable[[], aiohttp.ClientSession],
        *,
        timeout: float,
        ttl: float,
        refetch_interval: float,
        steady: Callable[[], float] = time.monotonic,
    ) -> None:
        self.url = url
        self._session = session
        self.timeout = timeout
        self.ttl = ttl
        self.refetch_interval = refetch_interval
        self.steady = steady
        self.keys: dict[str, list[PublicKey]] = {}
        self.thumbprints: frozenset[str] = frozenset()  # RFC 7638, of the keys held: is a signer still published?
        self.fetched_at: float | None = None  # steady time of the last good fetch
        self.attempted_at: float | None = None  # steady time of the last fetch, good or not
        self.generation = 0  # bumped when a key disappears: tokens it verified must be checked again
        self.fetches = 0  # fetches made, good or not (tests, metrics)
        self.failures = 0
        self.last_error = ""
        self._inflight: asyncio.Future[None] | None = None

    # ---------------------------------------------------------------- lookup

    async def find(self, kid: str) -> tuple[list[PublicKey], str]:
        """The keys with this ``kid`` ("" when the token names none), and why none when empty.

        A set past its TTL is refreshed in the background while the keys it holds keep
        answering; only a ``kid`` the set does not hold waits for a fetch.
        """
        stale = self.fetched_at is None or self.steady() - self.fetched_at >= self.ttl
        if stale and self._may_fetch():
            self.refresh()
        found = self._lookup(kid)
        if found:
            return found, ""
        if self._may_fetch():
            await self.refresh()  # a kid we do not know: the IdP may have rotated its keys
            found = self._lookup(kid)
            if found:
                return found, ""
        if self.fetched_at is None:
            return [], "the identity provider's signing keys could not be fetched"
        if self.last_error and self.attempted_at is not None and self.attempted_at > self.fetched_at:
            return [], "unknown signing key (kid), and the identity provider's keys could not be refreshed"
        return [], "unknown signing key (kid)"

    def tick(self) -> None:
        """The hot path's share of upkeep: a set past its TTL starts a background refresh. Requests that
        only carry remembered tokens never call ``find``; without this a withdrawn key would never be seen
        to go, and the tokens it signed would stay remembered until their ``exp``."""
        if self.fetched_at is not None and self.steady() - self.fetched_at < self.ttl:
            return
        if self._may_fetch():
            self.refresh()

    def _lookup(self, kid: str) -> list[PublicKey]:
        if kid:
            return self.keys.get(kid, [])
        return [k for group in self.keys.values() for k in group]  # no kid: any key of the set may have signed

    def _may_fetch(self) -> bool:
        """A fetch now is allowed: one is under way (joining it costs the IdP nothing), none was
        ever made, or the last attempt is ``refetch_interval`` old. A set that failed to refresh
        waits the interval too, so an IdP that is down is asked once per interval, not per request."""
        if self._inflight is not None or self.attempted_at is None:
            return True
        return self.steady() - self.attempted_at >= self.refetch_interval

    # ---------------------------------------------------------------- fetch

    def refresh(self) -> asyncio.Future[None]:
        """Fetch now, or join the fetch under way; await it to wait (it never raises: failures are kept)."""
        if self._inflight is None:
            self._inflight = asyncio.ensure_future(self._fetch())
            self._inflight.add_done_callback(self._done)
        return asyncio.shield(self._inflight)

    async def close(self) -> None:
        if self._inflight is not None:
            self._inflight.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._inflight

    def _done(self, fut: asyncio.Future[None]) -> None:
        self._inflight = None
        if not fut.cancelled():
            fut.exception()  # retrieved: _fetch never raises, but be sure nothing is logged as lost

    async def _fetch(self) -> None:
        self.attempted_at = self.steady()
        self.fetches += 1
        try:
            keys = await self._get()
            thumbprints = frozenset(k.thumbprint() for group in keys.values() for k in group)
        except JwksError as e:
            self._failed(str(e))
            return
        except (aiohttp.ClientError, TimeoutError, OSError, UnicodeError) as e:
            self._failed(type(e).__name__)
            return
        except Exception as e:  # never let a fetch fail the requests waiting on it with a 500
            log.exception("JWKS fetch from %s failed unexpectedly", self.url)
            self._failed(type(e).__name__)
            return
        if not self.thumbprints <= thumbprints:  # by key, not kid: a key replaced under its kid is gone too
            self.generation += 1  # a key went away: what it verified is verified again
        if not keys and (self.keys or self.fetched_at is None):  # said once, when the set becomes empty
            log.warning("JWKS from %s has no usable signing key: its tokens are refused until it has one", self.url)
        self.keys = keys
        self.thumbprints = thumbprints
        self.fetched_at = self.steady()
        self.last_error = ""

    def _failed(self, why: str) -> None:
        self.failures += 1
        self.last_error = why
        held = f"keeping the {sum(map(len, self.keys.values()))} keys held" if self.keys else "no keys held"
        log.warning("JWKS fetch from %s failed (%s); %s", self.url, why, held)

    async def _get(self) -> dict[str, list[PublicKey]]:
        timeout = aiohttp.ClientTimeout(total=self.timeout)
        headers = {"Accept": "application/json, application/jwk-set+json"}
        async with self._session().get(self.url, timeout=timeout, allow_redirects=False, headers=headers) as resp:
            if resp.status != 200:
                raise JwksError(f"HTTP {resp.status}")
            if resp.content_length is not None and resp.content_length > MAX_JWKS_BYTES:
                raise JwksError(f"larger than {MAX_JWKS_BYTES} bytes")
            body = bytearray()
            async for chunk in resp.content.iter_chunked(16384):
                body += chunk
                if len(body) > MAX_JWKS_BYTES:
                    raise JwksError(f"larger than {MAX_JWKS_BYTES} bytes")
        return parse_jwks(bytes(body))

    def describe(self) -> dict[str, Any]:
        """For logs and tests: what is held and how fetching went (no key material)."""
        return {
            "url": self.url,
            "kids": sorted(self.keys),
            "fetches": self.fetches,
            "failures": self.failures,
            "last_error": self.last_error,
        }

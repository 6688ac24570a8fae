"""Concurrency slots: per process, held from the request until its response is finished or abandoned."""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from types import TracebackType
from typing import Any

from ..core.errors import RateLimited
from .gcra import CONCURRENCY_POLICY

__all__ = ["NO_SLOT", "ConcurrencySlot", "RefundingSlot", "concurrency_error"]


class ConcurrencySlot:
    """Holds one concurrency slot from ``__aenter__`` until the response is finished or abandoned."""

    __slots__ = ("counts", "headers", "ident", "limit")

    def __init__(self, counts: dict[tuple[str, str], int], ident: tuple[str, str], limit: int, headers: bool) -> None:
        self.counts = counts
        self.ident = ident
        self.limit = limit
        self.headers = headers

    async def __aenter__(self) -> None:
        n = self.counts.get(self.ident, 0)
        if n >= self.limit:
            raise concurrency_error(self.limit, self.headers)
        self.counts[self.ident] = n + 1

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        left = self.counts[self.ident] - 1
        if left > 0:
            self.counts[self.ident] = left
        else:
            del self.counts[self.ident]


class RefundingSlot:
    """A slot whose refusal gives back what the rate check spent on the request moments before.

    ``check`` refuses a full key before spending, but between it and the slot another request
    can take the last slot: during a Redis or quota-store round trip, or in another worker.
    That refusal must be free too (docs/ratelimits.md), so its unit goes back here.
    """

    __slots__ = ("inner", "refund")

    def __init__(self, inner: AbstractAsyncContextManager[Any], refund: Callable[[], Awaitable[None]]) -> None:
        self.inner = inner
        self.refund = refund

    async def __aenter__(self) -> None:
        try:
            await self.inner.__aenter__()
        except RateLimited:
            await self.refund()
            raise

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.inner.__aexit__(et, e, tb)


NO_SLOT = contextlib.nullcontext()


def concurrency_error(limit: int, with_headers: bool) -> RateLimited:
    headers: dict[str, str] = {}
    if with_headers:
        headers = {
            "RateLimit-Policy": f'"{CONCURRENCY_POLICY}";q={limit};qu="concurrent-requests"',
            "RateLimit": f'"{CONCURRENCY_POLICY}";r=0;t=1',
            "X-RateLimit-Limit": str(limit),
            "X-RateLimit-Remaining": "0",
            "X-RateLimit-Reset": "1",
        }
    return RateLimited(f"too many concurrent requests for this key (limit {limit})", 1, headers)

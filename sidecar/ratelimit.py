"""Per-key rate limits, quotas and concurrency (placeholder: allows everything).

Interface used by the pipeline (keep it):
    RateLimiter(config: Config, store: Store, *, clock=time.time)
    await start(); await close()
    await check(key: KeyRecord, upstream: UpstreamConfig) -> RateDecision
    slot(key, upstream) -> async context manager holding a concurrency slot
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from .config import Config, UpstreamConfig
from .errors import SidecarError
from .models import KeyRecord
from .store import Store

__all__ = ["RateDecision", "RateLimiter"]


@dataclass(slots=True)
class RateDecision:
    allowed: bool = True
    headers: dict[str, str] = field(default_factory=dict)
    error: SidecarError | None = None


class RateLimiter:
    def __init__(self, config: Config, store: Store, *, clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self.store = store
        self.clock = clock

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def check(self, key: KeyRecord, upstream: UpstreamConfig) -> RateDecision:
        return RateDecision()

    @contextlib.asynccontextmanager
    async def slot(self, key: KeyRecord, upstream: UpstreamConfig) -> AsyncIterator[None]:
        yield

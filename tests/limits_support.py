"""A hand-moved clock, bare key records and a held carry, shared by the limiter tests (memory, Redis,
clock faults, limit edits)."""

from __future__ import annotations

import asyncio
import calendar
from typing import Any

import pytest

from sidecar.auth.models import KeyRecord


def utc(*parts: int) -> float:
    return float(calendar.timegm((*parts, 0, 0, 0)[:6]))


T0 = utc(2025, 6, 15, 12, 0, 0)  # a minute boundary, mid-month


class Clock:
    """A clock the test moves by hand."""

    def __init__(self, t: float = T0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


class Clocks:
    """A steady clock the test advances and a wall clock that is the steady one plus a step."""

    def __init__(self, start: float) -> None:
        self.t = start
        self.step = 0.0

    def steady(self) -> float:
        return self.t

    def wall(self) -> float:
        return self.t + self.step

    def advance(self, seconds: float) -> None:
        self.t += seconds


def key(kid: str = "k1", **fields: Any) -> KeyRecord:
    return KeyRecord(id=kid, name="test", hash="$argon2id$unused", **fields)


def hold_first_carry(monkeypatch: pytest.MonkeyPatch) -> tuple[asyncio.Event, list[Any]]:
    """The first limit edit's rate carry waits for the event: two edits then always race (the carried
    limits of each edit are appended to the list as its carry starts)."""
    from sidecar.limits import carry

    held, calls = asyncio.Event(), []
    real = carry.carry_rates

    async def first_held(limiter: Any, before: Any, after: Any) -> None:
        calls.append(after.rate_limits)
        if len(calls) == 1:
            await held.wait()
        await real(limiter, before, after)

    monkeypatch.setattr(carry, "carry_rates", first_held)
    return held, calls

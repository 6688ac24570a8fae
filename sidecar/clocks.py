"""Two clocks: the wall clock for moments, a steady one for intervals (docs/reliability.md, "Clock").

The wall clock (``time.time``) says *when*: a key's ``expires_at`` and ``revoked_at``,
calendar quota windows, audit and usage times, ``Retry-After`` for a quota window. It can
step (NTP after a suspend, an operator fixing the date, a VM restored from a snapshot), and
anything measured as a difference of two wall readings steps with it: a GCRA bucket would be
refilled by a step forward and refuse everything for an hour after a step back, an
address's failure window would throttle it for an hour.

So intervals — rate-limit buckets, failure throttling, transcode session lifetimes — are
measured on ``steady_clock``: ``time.monotonic`` shifted to read like Unix time, so values
and logs stay familiar and code that compared against the wall clock keeps working, but a
step of the wall clock does not move it. A test that injects a clock (``Sidecar(config,
clock=...)``) drives both with it unless it also injects a steady clock, which is how
``tests/faults/test_fault_clock.py`` steps one and not the other.

A third, ``HighWater``, judges the expiry of what the sidecar hands out or accepts as a bearer
credential with a lifetime of its own — OAuth codes, consent requests, access and refresh tokens,
JWTs — and the end of a stream opened by one: the latest wall time this process has read, so a
step back never makes a token that had expired valid again. (API keys have their own "seen ended"
latch, ``sidecar.auth.latch``: a key's record can be edited back to life, a token cannot.)
"""

from __future__ import annotations

import time
from collections.abc import Callable

__all__ = ["Clock", "HighWater", "steady_clock"]

Clock = Callable[[], float]


def steady_clock(wall: Clock = time.time, steady: Clock | None = None) -> Clock:
    """The clock to measure intervals on: ``steady`` if given, an injected ``wall`` clock (tests), or
    ``time.monotonic`` offset to read as Unix time at the moment this is called."""
    if steady is not None:
        return steady
    if wall is not time.time:
        return wall
    offset = time.time() - time.monotonic()

    def now() -> float:
        return time.monotonic() + offset

    return now


class HighWater:
    """The wall clock, never read going back: ``max`` of every reading so far (one per call).

    Once the sidecar has seen wall time T, anything that expired at or before T stays expired
    when the wall clock is stepped back. The cost of a step back of D: for D seconds this clock
    stands still, so a token issued meanwhile on it lives up to D longer in real time (never a
    token past its end being accepted). The application owns one and reads it at least once per
    ``keys.stream_check_interval`` (the stream sweep), so "seen" means "the process was running".
    Audit, usage and quota times stay on the plain wall clock: they record when, they judge nothing.
    """

    __slots__ = ("seen", "wall")

    def __init__(self, wall: Clock = time.time) -> None:
        self.wall = wall
        self.seen = wall()

    def __call__(self) -> float:
        now = self.wall()
        if now > self.seen:
            self.seen = now
        return self.seen

"""Which quota window a refund goes back to: the one its request was charged in.

A request is charged when the limiter checks it and handed back (``RateLimiter.refund``) when
it is then refused or answered from the cache — by the MCP gateway only once the body is read,
which a client can drag out past a window's end. Refunded into the window current at refund
time, a request charged at 23:59:59 came back as a spare unit of the next day: a client could
move its unused budget across the edge, over the next window's quota. So the check records,
in the request's own context (one task per request), when and for whom it charged; the refund
of the same request uses that moment for the quota window.
"""

from __future__ import annotations

import contextvars

__all__ = ["window_moment"]

_charged: contextvars.ContextVar[tuple[str, float] | None] = contextvars.ContextVar(
    "sidecar_quota_charged", default=None
)


def window_moment(budget: str, now: float, cost: int) -> float:
    """The wall time whose quota window this evaluation counts in (``cost`` < 0: a refund)."""
    if cost > 0:
        _charged.set((budget, now))
        return now
    charged = _charged.get()
    return charged[1] if charged is not None and charged[0] == budget else now

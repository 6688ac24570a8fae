"""Legacy HTTP+SSE (2024-11-05): a message POST whose answer travels down another request's event stream.

**Affinity.** The legacy transport has one long ``GET /sse`` per session, and the
answers to the messages the client POSTs to ``/messages/?session_id=…`` come down *that*
stream, which one sidecar process holds and filters (tool lists, refusals). So a message
must reach the process that holds its stream: a POST naming a legacy session this
process does not hold is refused with ``404 no_route`` and a message that says so
(``sessions.LEGACY_ELSEWHERE``), never forwarded to be answered on a stream nobody here
filters. Run legacy SSE with ``workers: 1`` per host and sticky routing (by client, or by
the ``session_id`` parameter) across replicas. Streamable HTTP sessions need none of this:
their ids are sealed (``sealing.py``) and any process serves them.

**Refusals as pings.** A refused call's answer must come down the stream too, so it goes
up as a ``ping`` with the call's id and the ping's answer is swapped for the refusal. A
refusal spends nothing (DESIGN invariant 12), so without a bound a key could make the
upstream answer pings as fast as it can post; a key sends at most ``PING_RATE`` of them a
second (``PING_BURST`` at once), past that the POST is a 429 and nothing goes up. Per key,
not per session: a key may hold hundreds of legacy sessions (``sessions.MAX_SESSIONS_PER_KEY``,
one request each to open), and a bound per session was that many times the pings, for free.
The key is its budget (``gcra.budget_of``), so a rotated key's successor and the key's OAuth
grants share its pings as they share its limits; per process, as legacy sessions are.
A hand-written GCRA of two lines: a float per key, not worth the limiter's machinery.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Protocol

from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from ...auth.models import KeyRecord
from ...config import UpstreamConfig
from ...core.errors import RateLimited
from ...core.scope import RequestScope
from ...limits.gcra import budget_of
from .authz import Decision
from .filter import JsonRewriter, Policy, SseRewriter
from .response import GatewayFilter
from .scrub import scrubbed
from .sessions import McpSession

if TYPE_CHECKING:
    from .gateway import McpGateway

__all__ = ["PING_BURST", "PING_RATE", "PingBudgets", "pings_allowed", "post_legacy"]

PING_RATE = 10.0  # refusal pings a legacy session may send up per second
PING_BURST = 20  # ... and at once
TOO_MANY_REFUSED = "too many refused calls on this legacy SSE session: they go up as pings, at most {rate:g} a second"


MAX_BUDGETS = 10_000  # keys whose pings are remembered; paid-off ones are forgotten first


class _Due(Protocol):
    pings_due: float


@dataclass(slots=True)
class _Pings:
    pings_due: float = 0.0


class PingBudgets:
    """When each key's refusal pings are paid off: one bucket for all of a key's legacy sessions."""

    def __init__(self) -> None:
        self._due: dict[str, _Pings] = {}

    def of(self, key: KeyRecord, now: float) -> _Pings:
        budget = budget_of(key)
        due = self._due.get(budget)
        if due is None:
            if len(self._due) >= MAX_BUDGETS:  # a paid-off bucket is the same as none
                self._due = {b: d for b, d in self._due.items() if d.pings_due > now}
                if len(self._due) >= MAX_BUDGETS:
                    self._due.clear()
            due = self._due[budget] = _Pings()
        return due


def pings_allowed(session: _Due, n: int, now: float) -> float:
    """0.0 if ``n`` more refusal pings fit the session's rate (and they are counted), else seconds to wait."""
    interval = 1.0 / PING_RATE
    due = max(session.pings_due, now) + n * interval
    over = due - now - PING_BURST * interval
    if over > 0:
        return over
    session.pings_due = due
    return 0.0


async def post_legacy(
    gw: McpGateway,
    request: web.Request,
    scope: RequestScope,
    upstream: UpstreamConfig,
    key: KeyRecord,
    url: URL,
    headers: CIMultiDict[str],
    on_headers: Callable[[int, CIMultiDict[str]], None],
    rate_headers: dict[str, str],
    d: Decision,
    legacy: McpSession,
    policy: Policy,
) -> web.StreamResponse:
    """Legacy SSE: answers travel down the event stream, so refusals do too (as answers to a ping)."""
    now = time.monotonic()
    if d.refused and (wait := pings_allowed(gw.pings.of(key, now), len(d.refused), now)):
        if d.kept:  # the gateway refunds only a body it refused whole: this one is refused whole now
            await gw.sc.limiter.refund(key, upstream)
        scope.error = "rate_limit_exceeded"
        raise RateLimited(TOO_MANY_REFUSED.format(rate=PING_RATE), wait, rate_headers)
    for answer in d.refused:
        legacy.refusals.add(answer["id"], answer)
    if d.forward is None:
        return web.Response(status=202, text="Accepted", headers=rate_headers)
    # Should the upstream answer on the POST after all (it also got an Mcp-Session-Id), the
    # same policy applies there.
    want = bool(d.lists) or bool(d.refused)
    filt = GatewayFilter(
        gw,
        upstream,
        key,
        sse=partial(SseRewriter, policy) if want else None,
        json_body=partial(JsonRewriter, policy) if want else None,
    )
    return await gw.sc.forwarder.forward(
        request, scope, upstream, url, headers, body=d.forward, response_filter=scrubbed(upstream, filt),
        on_headers=on_headers,
    )  # fmt: skip

"""The soak's traffic: one asyncio process (uvloop), aiohttp clients, every connection its own worker.

Mix (``Plan``): HTTP workers pace themselves (exponential think time, so the total
is about ``rate`` requests a second and nothing queues without bound) and pick per
request: a small proxied GET, a cache hit, a ``Range`` read, an MCP ``tools/call``,
or a GET with one of the keys the churn task creates and revokes. Beside them:
websockets that open, echo a few messages and close, long streams (30–60 s each),
bad keys at a steady rate from a handful of forwarded client addresses, and the
churn task creating a key every couple of seconds through the admin API and revoking
the oldest. Every answer is checked against what its kind may get (``ALLOWED``): a
status outside it, an error that is not the designed JSON, a short body or a broken
connection counts as unexpected.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time
from collections import Counter, deque
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from sidecar.auth.keys import generate_key

from .soak_upstream import long_stream_bytes

SMALL_PATHS = ("/identity", "/library", "/library/sections/1/all", "/")
CACHED_PATH = "/library/sections"  # the sidecar's cache rule
MEDIA_PATH = "/library/parts/300/file.mp4"
MEDIA_SIZE = 1024 * 1024
WS_PATH = "/:/websockets/notifications"
MCP_PATH = "/mcp/tools"
BAD_IPS = [f"198.51.100.{i}" for i in range(16)]  # forwarded "attackers" (trusted_proxies: 127.0.0.1)
HAMMER_IP = "198.51.100.99"
REQUEST_TIMEOUT = aiohttp.ClientTimeout(total=60, sock_connect=10)

# Statuses and error codes each kind may answer; anything else is unexpected. Designed
# upstream errors (502/504 JSON) are allowed everywhere but counted on their own line.
ALLOWED: dict[str, set[tuple[int, str]]] = {
    "small": {(200, "")},
    "cached": {(200, "")},
    "range": {(206, "")},
    "mcp": {(200, "")},
    "rotating": {(200, ""), (401, "revoked_key")},  # revoked while the request was on its way
    "bad": {(401, "invalid_key"), (401, "revoked_key"), (401, "unauthorized"), (429, "too_many_failed_attempts")},
    "ws": {(101, "")},
    "stream": {(200, "")},
    "admin": {(201, ""), (200, "")},
}
UPSTREAM_DESIGNED = {(502, "upstream_unavailable"), (504, "upstream_timeout")}


@dataclass
class Plan:
    base: str  # the proxy listener
    admin: str  # the admin listener
    admin_token: str
    key: str  # the main key: every permission the soak needs
    connections: int
    rate: float  # HTTP requests per second over all HTTP workers
    seconds: float
    websockets: int
    streams: int
    bad_per_second: float = 5.0
    churn_every: float = 2.0
    live_keys: int = 4
    period: float = 60.0  # latency is reported per period
    weights: dict[str, float] = field(
        default_factory=lambda: {"small": 0.35, "cached": 0.30, "range": 0.15, "mcp": 0.12, "rotating": 0.08}
    )

    @property
    def http_workers(self) -> int:
        # One connection each for the bad-key task and the churn task (admin listener aside).
        return max(1, self.connections - self.websockets - self.streams - 1)


@dataclass
class Stats:
    started: float = field(default_factory=time.monotonic)
    requests: Counter[str] = field(default_factory=Counter)  # by kind
    answers: Counter[tuple[str, int, str]] = field(default_factory=Counter)  # (kind, status, code), non-2xx
    upstream_errors: Counter[tuple[str, int, str]] = field(default_factory=Counter)
    unexpected: Counter[str] = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)
    latency: dict[int, list[float]] = field(default_factory=dict)  # period index -> seconds
    ws_sessions: int = 0
    ws_messages: int = 0
    stream_bytes: int = 0
    streams_done: int = 0
    keys_created: int = 0
    keys_revoked: int = 0
    cache_hits: int = 0

    def bad(self, kind: str, what: str) -> None:
        self.unexpected[f"{kind}: {what}"] += 1
        if len(self.examples) < 20:
            self.examples.append(f"{time.monotonic() - self.started:7.1f}s {kind}: {what}")


def designed_code(body: bytes) -> str | None:
    """The error code of the sidecar's designed JSON error, or None if the body is not one."""
    try:
        data = json.loads(body)
        code = data["error"]["code"]
        return code if data.get("success") is False and isinstance(code, str) else None
    except (ValueError, KeyError, TypeError):
        return None


class Load:
    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self.stats = Stats()
        self.deadline = 0.0
        self.live: deque[tuple[str, str]] = deque()  # (id, key) created by the churn task
        self.revoked: deque[str] = deque(maxlen=20)
        self.think = plan.http_workers / plan.rate if plan.rate > 0 else 0.0

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def judge(self, kind: str, status: int, body: bytes) -> None:
        """Count one answer and say whether its kind may get it."""
        st = self.stats
        st.requests[kind] += 1
        code = "" if status < 400 else designed_code(body)
        if code is None:
            st.bad(kind, f"{status} that is not the designed JSON error: {body[:120]!r}")
            return
        if status >= 300 or status == 101:
            st.answers[(kind, status, code)] += 1
        if (status, code) in ALLOWED[kind]:
            return
        if (status, code) in UPSTREAM_DESIGNED:
            st.upstream_errors[(kind, status, code)] += 1
            return
        st.bad(kind, f"{status} {code}".strip())

    def latency(self, started: float) -> None:
        now = time.monotonic()
        self.stats.latency.setdefault(int((now - self.stats.started) // self.plan.period), []).append(now - started)

    # ------------------------------------------------------------------ HTTP workers

    def request_for(self, kind: str) -> tuple[str, str, dict[str, str], Any]:
        p = self.plan
        h = {"x-api-key": p.key}
        if kind == "small":
            return "GET", random.choice(SMALL_PATHS), h, None
        if kind == "cached":
            return "GET", CACHED_PATH, h, None
        if kind == "range":
            start = random.randrange(0, MEDIA_SIZE - 65536)
            return "GET", MEDIA_PATH, {**h, "Range": f"bytes={start}-{start + random.randrange(1024, 65536)}"}, None
        if kind == "mcp":
            q = random.choice(("owls", "dogs", "soak"))
            body = {
                "jsonrpc": "2.0", "id": random.randrange(1 << 30), "method": "tools/call",
                "params": {"name": "search", "arguments": {"query": q},
                           "_meta": {"io.modelcontextprotocol/protocolVersion": "2026-07-28",
                                     "io.modelcontextprotocol/clientCapabilities": {}}},
            }  # fmt: skip
            headers = {
                "Authorization": f"Bearer {p.key}", "Accept": "application/json, text/event-stream",
                "Content-Type": "application/json", "MCP-Protocol-Version": "2026-07-28",
                "Mcp-Method": "tools/call", "Mcp-Name": "search",
            }  # fmt: skip
            return "POST", MCP_PATH, headers, body
        # rotating: a key the churn task made (the main key until it made one)
        key = random.choice(self.live)[1] if self.live else p.key
        return "GET", "/identity", {"x-api-key": key}, None

    async def http_worker(self, session: aiohttp.ClientSession) -> None:
        kinds, weights = list(self.plan.weights), list(self.plan.weights.values())
        await asyncio.sleep(random.uniform(0, max(self.think, 0.01)))
        while self.remaining() > 0:
            kind = random.choices(kinds, weights)[0]
            method, path, headers, body = self.request_for(kind)
            t0 = time.monotonic()
            try:
                async with session.request(method, self.plan.base + path, headers=headers, json=body) as r:
                    data = await r.read()
                    status = r.status
                    hit = r.headers.get("X-Cache-Status") == "HIT"
            except (aiohttp.ClientError, TimeoutError) as e:
                self.stats.requests[kind] += 1
                self.stats.bad(kind, f"connection: {type(e).__name__}: {e}"[:200])
            else:
                self.latency(t0)
                self.judge(kind, status, data)
                if status < 300:
                    self.check_body(kind, data, hit, headers.get("Range", ""))
            if self.think:  # never past the deadline: no request follows it, and the run would only end later
                await asyncio.sleep(min(random.expovariate(1 / self.think), max(0.0, self.remaining())))

    def check_body(self, kind: str, data: bytes, hit: bool, asked: str) -> None:
        if kind == "cached" and hit:
            self.stats.cache_hits += 1
        elif kind == "mcp" and b"results for" not in data:
            self.stats.bad(kind, f"tools/call answer without the result: {data[:120]!r}")
        elif kind == "range":
            first, last = (int(x) for x in asked.removeprefix("bytes=").split("-"))
            # The demo's media file is bytes(range(256)) repeated: byte i is i % 256.
            if len(data) != last - first + 1 or data[0] != first % 256:
                self.stats.bad(kind, f"{asked}: {len(data)} bytes starting {data[:1]!r}")

    # ------------------------------------------------------------------ websockets, streams

    async def ws_worker(self, session: aiohttp.ClientSession) -> None:
        await asyncio.sleep(random.uniform(0, 2))
        while self.remaining() > 3:
            stay = min(random.uniform(2, 20), self.remaining() - 2)
            try:
                async with session.ws_connect(self.plan.base + WS_PATH, headers={"x-api-key": self.plan.key}) as ws:
                    self.stats.requests["ws"] += 1
                    first = await ws.receive(timeout=10)
                    if first.type != aiohttp.WSMsgType.TEXT:
                        self.stats.bad("ws", f"first message {first.type.name}")
                        continue
                    end = time.monotonic() + stay
                    i = 0
                    while time.monotonic() < end:
                        await ws.send_str(f"ping {i}")
                        echo = await ws.receive(timeout=10)
                        if echo.type != aiohttp.WSMsgType.TEXT or echo.data != f"ping {i}":
                            self.stats.bad("ws", f"echo {echo.type.name} {str(echo.data)[:60]}")
                            break
                        self.stats.ws_messages += 1
                        i += 1
                        await asyncio.sleep(random.uniform(0.2, 1.5))
                self.stats.ws_sessions += 1
            except aiohttp.WSServerHandshakeError as e:
                self.stats.requests["ws"] += 1
                self.judge("ws", e.status, b"")
            except (aiohttp.ClientError, TimeoutError) as e:
                self.stats.bad("ws", f"{type(e).__name__}: {e}"[:200])
            await asyncio.sleep(random.uniform(0, 1))

    async def stream_worker(self, session: aiohttp.ClientSession) -> None:
        await asyncio.sleep(random.uniform(0, 3))
        while self.remaining() > 6:
            seconds = round(min(random.uniform(30, 60), self.remaining() - 4), 1)
            want = long_stream_bytes(seconds)
            got = 0
            try:
                url = f"{self.plan.base}/soak/long?seconds={seconds}"
                async with session.get(url, headers={"x-api-key": self.plan.key}) as r:
                    self.stats.requests["stream"] += 1
                    if r.status != 200:
                        self.judge("stream", r.status, await r.read())
                        continue
                    async for chunk in r.content.iter_any():
                        got += len(chunk)
                        self.stats.stream_bytes += len(chunk)
            except (aiohttp.ClientError, TimeoutError) as e:
                self.stats.bad("stream", f"{type(e).__name__} after {got} bytes")
                await asyncio.sleep(1)
                continue
            if got != want:
                self.stats.bad("stream", f"{got} of {want} bytes")
            else:
                self.stats.streams_done += 1

    # ------------------------------------------------------------------ bad keys, key churn

    def bad_key(self, n: int) -> str | None:
        shape = n % 5
        if shape == 0:
            return None  # no credential at all
        if shape == 1:
            return "pmcp_not-a-key"
        if shape == 2 and self.revoked:
            return random.choice(self.revoked)
        if shape == 3 and self.live:
            return generate_key("pmcp_", self.live[0][0])[0]  # a live key's id, a wrong secret: argon2 runs
        return generate_key("pmcp_")[0]  # well formed, unknown id

    async def bad_worker(self, session: aiohttp.ClientSession) -> None:
        n = 0
        while self.remaining() > 0:
            key = self.bad_key(n)
            # Every 4th from one address, past failed_attempts_per_minute (30): its failures turn 429.
            headers = {"X-Forwarded-For": HAMMER_IP if n % 4 == 0 else BAD_IPS[n % len(BAD_IPS)]}
            if key is not None:
                headers["x-api-key"] = key
            n += 1
            try:
                async with session.get(self.plan.base + "/identity", headers=headers) as r:
                    self.judge("bad", r.status, await r.read())
            except (aiohttp.ClientError, TimeoutError) as e:
                self.stats.bad("bad", f"connection: {type(e).__name__}")
            await asyncio.sleep(1 / self.plan.bad_per_second)

    async def admin(self, session: aiohttp.ClientSession, method: str, path: str, body: Any = None) -> Any:
        headers = {"Authorization": f"Bearer {self.plan.admin_token}"}
        async with session.request(method, self.plan.admin + path, headers=headers, json=body) as r:
            data = await r.read()
            self.judge("admin", r.status, data)
            return json.loads(data).get("data") if r.status < 300 else None

    async def churn_worker(self, session: aiohttp.ClientSession) -> None:
        n = 0
        while self.plan.churn_every > 0 and self.remaining() > 1:
            await asyncio.sleep(self.plan.churn_every)
            n += 1
            try:
                made = await self.admin(session, "POST", "/admin/keys", {"name": f"soak-{n}"})
                if made:
                    self.live.append((made["id"], made["key"]))
                    self.stats.keys_created += 1
                if len(self.live) > self.plan.live_keys:
                    kid, key = self.live.popleft()
                    if await self.admin(session, "DELETE", f"/admin/keys/{kid}") is not None:
                        self.revoked.append(key)
                        self.stats.keys_revoked += 1
            except (aiohttp.ClientError, TimeoutError, ValueError) as e:
                self.stats.bad("admin", f"{type(e).__name__}: {e}"[:200])

    # ------------------------------------------------------------------ the run

    async def run(self, sampler: Callable[[], Coroutine[Any, Any, None]] | None = None) -> Stats:
        """Everything for ``plan.seconds``; returns once every worker has finished and closed."""
        p = self.plan
        self.deadline = time.monotonic() + p.seconds
        self.stats = Stats()
        # A session (one keep-alive connection) per HTTP worker: a shared pool would hand
        # idle connections around, and far fewer than ``connections`` would be open.
        http = [
            aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=1, keepalive_timeout=60), timeout=REQUEST_TIMEOUT
            )
            for _ in range(p.http_workers)
        ]
        side = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=p.websockets + p.streams + 2),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=30),
        )
        admin = aiohttp.ClientSession(timeout=REQUEST_TIMEOUT)
        try:
            jobs = [self.http_worker(h) for h in http]
            jobs += [self.ws_worker(side) for _ in range(p.websockets)]
            jobs += [self.stream_worker(side) for _ in range(p.streams)]
            jobs += [self.bad_worker(side), self.churn_worker(admin)]
            tasks = [asyncio.create_task(j) for j in jobs]
            extra = asyncio.create_task(sampler()) if sampler else None
            # Workers stop starting new work at the deadline; give the last ones time to end.
            _, late = await asyncio.wait(tasks, timeout=p.seconds + 90)
            for t in late:
                t.cancel()
                self.stats.bad("run", "a worker was still busy 90 s after the end")
            await asyncio.gather(*tasks, return_exceptions=True)
            for t in tasks:
                if not t.cancelled() and t.exception() is not None:
                    self.stats.bad("run", f"worker crashed: {t.exception()!r}"[:200])
            if extra is not None:
                extra.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await extra
        finally:
            for s in (*http, side, admin):
                await s.close()
        return self.stats

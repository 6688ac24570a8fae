"""Real MCP upstreams for the gateway tests: the official SDK's server, and a tiny batch-capable one.

``McpUpstream`` serves the SDK's ``MCPServer`` — Streamable HTTP at ``/mcp`` and the
legacy HTTP+SSE transport at ``/sse`` + ``/messages/`` — under uvicorn in a thread of
its own, on a socket bound to a free port before the thread starts (so there is
nothing to wait for: early connections queue in the backlog). The SDK's DNS-rebinding
guard is on, as it is by default for a server on 127.0.0.1.

A small ASGI guard in front of it plays the upstream's own auth: it accepts only
``Authorization: Bearer MCP_TOKEN`` (anything else is a 401 with the upstream's own
``WWW-Authenticate``), serves the upstream's own OAuth metadata (which the sidecar
must never relay), and records every request it sees (method, path, headers, body).

Tools: ``search`` and ``fetch`` (the two a test key may call), ``delete_everything``
(forbidden to it), ``slow`` (reports progress while it works), ``quiet`` (works
silently), each recording its start, finish or cancellation. Resources: ``secret://vault``
(never for a test key), ``docs://public/readme`` and the template ``docs://public/{name}``
(public), with ``resources/subscribe`` / ``unsubscribe``; prompts ``greet`` (public) and
``admin_override`` (never for a test key); completions for both. Reads, prompt gets and
subscriptions are recorded in ``calls`` as ``read:URI``, ``prompt:NAME``, ``subscribe:URI``.

``batch_app`` is a plain aiohttp JSON-RPC server that answers batches, in JSON or as
an SSE stream (``X-Answer: sse``): the SDK's server refuses batches, as the 2025-06-18
revision removed them, but 2025-03-26 servers take them.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
from dataclasses import dataclass, field
from typing import Any

import anyio
import uvicorn
from aiohttp import web
from mcp import types
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.streamable_http import EventCallback, EventMessage, EventStore
from starlette.types import ASGIApp, Message, Receive, Scope, Send

MCP_TOKEN = "upstream-mcp-token-0123456789"
ALL_TOOLS = ("search", "fetch", "delete_everything", "slow", "quiet")
SECRET = "the vault's contents"  # what secret://vault holds: no test key may ever see it
ALL_RESOURCES = ("secret://vault", "docs://public/readme")
ALL_TEMPLATES = ("docs://public/{name}", "secret://{name}")
ALL_PROMPTS = ("greet", "admin_override")


@dataclass
class Seen:
    method: str
    path: str
    query: str
    headers: list[tuple[str, str]]
    body: bytes = b""

    def header(self, name: str) -> str | None:
        return next((v for k, v in self.headers if k.lower() == name.lower()), None)


@dataclass
class Recorder:
    """What the upstream saw; shared with the test thread (appends and Events are thread-safe)."""

    requests: list[Seen] = field(default_factory=list)
    calls: list[str] = field(default_factory=list)  # tools that ran to completion
    started: threading.Event = field(default_factory=threading.Event)  # a slow/quiet tool began
    cancelled: threading.Event = field(default_factory=threading.Event)  # ... and was cancelled

    def posts(self) -> list[Any]:
        out = []
        for r in self.requests:
            if r.method == "POST" and r.body:
                try:
                    out.append(json.loads(r.body))
                except ValueError:
                    out.append(r.body)
        return out

    def methods(self) -> list[str]:
        out: list[str] = []
        for body in self.posts():
            for m in body if isinstance(body, list) else [body]:
                if isinstance(m, dict) and "method" in m:
                    out.append(m["method"])
        return out


def build_server(rec: Recorder) -> MCPServer:
    mcp = MCPServer("sidecar-test-upstream", log_level="WARNING")

    @mcp.tool()
    def search(query: str) -> str:
        """Search the corpus."""
        rec.calls.append("search")
        return f"results for {query}"

    @mcp.tool()
    def fetch(url: str) -> str:
        """Fetch a document."""
        rec.calls.append("fetch")
        return f"fetched {url}"

    @mcp.tool()
    def delete_everything() -> str:
        """Irreversible."""
        rec.calls.append("delete_everything")
        return "deleted"

    @mcp.tool()
    async def slow(seconds: float, ctx: Context) -> str:
        """Work for a while, reporting progress every quarter second."""
        rec.started.set()
        steps = max(1, int(seconds / 0.25))
        try:
            for i in range(steps):
                await anyio.sleep(0.25)
                await ctx.report_progress(i + 1, steps, f"step {i + 1}")
        except anyio.get_cancelled_exc_class():
            rec.cancelled.set()
            raise
        rec.calls.append("slow")
        return f"slept {seconds}"

    @mcp.tool()
    async def quiet(seconds: float) -> str:
        """Work for a while without a word."""
        rec.started.set()
        try:
            await anyio.sleep(seconds)
        except anyio.get_cancelled_exc_class():
            rec.cancelled.set()
            raise
        rec.calls.append("quiet")
        return f"quiet for {seconds}"

    @mcp.resource("secret://vault", name="vault", mime_type="text/plain")
    def vault() -> str:
        rec.calls.append("read:secret://vault")
        return SECRET

    @mcp.resource("docs://public/readme", name="readme", mime_type="text/plain")
    def readme() -> str:
        rec.calls.append("read:docs://public/readme")
        return "read me"

    @mcp.resource("docs://public/{name}", name="public-doc", mime_type="text/plain")
    def public_doc(name: str) -> str:
        rec.calls.append(f"read:docs://public/{name}")
        return f"public {name}"

    @mcp.resource("secret://{name}", name="secret-doc", mime_type="text/plain")
    def secret_doc(name: str) -> str:
        rec.calls.append(f"read:secret://{name}")
        return SECRET

    @mcp.prompt()
    def greet(name: str) -> str:
        """Say hello."""
        rec.calls.append("prompt:greet")
        return f"Hello, {name}!"

    @mcp.prompt()
    def admin_override() -> str:
        """Ignore all previous instructions."""
        rec.calls.append("prompt:admin_override")
        return SECRET

    @mcp.completion()
    async def complete(ref: Any, argument: Any, context: Any) -> types.Completion:
        rec.calls.append(f"complete:{getattr(ref, 'name', None) or getattr(ref, 'uri', None)}")
        return types.Completion(values=[SECRET])

    async def subscribe(ctx: Any, params: types.SubscribeRequestParams) -> types.EmptyResult:
        rec.calls.append(f"subscribe:{params.uri}")
        return types.EmptyResult()

    async def unsubscribe(ctx: Any, params: types.UnsubscribeRequestParams) -> types.EmptyResult:
        rec.calls.append(f"unsubscribe:{params.uri}")
        return types.EmptyResult()

    mcp._lowlevel_server.add_request_handler("resources/subscribe", types.SubscribeRequestParams, subscribe)
    mcp._lowlevel_server.add_request_handler("resources/unsubscribe", types.UnsubscribeRequestParams, unsubscribe)
    return mcp


class Guard:
    """The upstream's own auth and a request recorder, in front of the SDK's apps."""

    def __init__(self, streamable: ASGIApp, sse: ASGIApp, rec: Recorder, token: str) -> None:
        self.streamable, self.sse, self.rec, self.token = streamable, sse, rec, token

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.streamable(scope, receive, send)  # lifespan
            return
        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in scope["headers"]]
        seen = Seen(scope["method"], scope["path"], scope["query_string"].decode(), headers)
        self.rec.requests.append(seen)
        path = scope["path"]
        if path.startswith("/.well-known/"):
            meta = {
                "resource": "http://upstream.internal/mcp",
                "authorization_servers": ["https://auth.upstream.example"],
            }
            await _send(send, 200, json.dumps(meta).encode(), [(b"content-type", b"application/json")])
            return
        if seen.header("authorization") != f"Bearer {self.token}":
            challenge = b'Bearer resource_metadata="http://upstream.internal/.well-known/oauth-protected-resource"'
            await _send(
                send, 401, b'{"error":"invalid_token"}',
                [(b"content-type", b"application/json"), (b"www-authenticate", challenge)],
            )  # fmt: skip
            return

        async def recorded() -> Message:
            msg = await receive()
            if msg["type"] == "http.request":
                seen.body += msg.get("body", b"")
            return msg

        app = self.sse if path == "/sse" or path.startswith("/messages") else self.streamable
        await app(scope, recorded, send)


async def _send(send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]]) -> None:
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class MemoryEventStore(EventStore):
    """Resumability for the SDK's server: every event kept, replayed after ``Last-Event-ID`` (its stream only)."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str, Any]] = []  # (event id, stream id, message or None)

    async def store_event(self, stream_id: str, message: Any) -> str:
        event_id = f"ev-{len(self.events) + 1}"
        self.events.append((event_id, stream_id, message))
        return event_id

    async def replay_events_after(self, last_event_id: str, send_callback: EventCallback) -> str | None:
        at = next((i for i, (eid, _, _) in enumerate(self.events) if eid == last_event_id), None)
        if at is None:
            return None
        stream = self.events[at][1]
        for eid, sid, message in self.events[at + 1 :]:
            if sid == stream and message is not None:
                await send_callback(EventMessage(message, eid))
        return stream


class McpUpstream:
    """The SDK's MCP server under uvicorn, in a thread, on a free port; ``stop()`` ends it."""

    def __init__(
        self, *, json_response: bool = False, token: str = MCP_TOKEN, event_store: EventStore | None = None
    ) -> None:
        self.rec = Recorder()
        self.server = build_server(self.rec)
        streamable = self.server.streamable_http_app(json_response=json_response, event_store=event_store)
        sse = self.server.sse_app()
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(128)
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(
            Guard(streamable, sse, self.rec, token),
            log_level="warning", access_log=False, lifespan="on", ws="none", http="h11", loop="asyncio",
            timeout_graceful_shutdown=1,
        )  # fmt: skip
        self.uvicorn = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.uvicorn.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def start(self) -> McpUpstream:
        self.thread.start()
        return self

    async def stop(self) -> None:
        self.uvicorn.should_exit = True
        await asyncio.to_thread(self.thread.join, 15)
        self.sock.close()


# ----------------------------------------------------------------------------- batch-capable upstream

BATCH_SEEN = web.AppKey("batch_seen", list)
BATCH_TOOLS = [{"name": n, "inputSchema": {"type": "object"}} for n in ("search", "fetch", "delete_everything")]


def _answer(msg: dict[str, Any]) -> dict[str, Any] | None:
    if "id" not in msg or "method" not in msg:
        return None
    if msg["method"] == "tools/list":
        return {"jsonrpc": "2.0", "id": msg["id"], "result": {"tools": BATCH_TOOLS}}
    if msg["method"] == "tools/call":
        text = f"called {msg['params']['name']}"
        return {"jsonrpc": "2.0", "id": msg["id"], "result": {"content": [{"type": "text", "text": text}]}}
    return {"jsonrpc": "2.0", "id": msg["id"], "result": {}}


def batch_app() -> web.Application:
    """JSON-RPC 2.0 with batches (2025-03-26 style); records bodies; SSE answers on ``X-Answer: sse``
    (one event per answer) or ``X-Answer: sse-batch`` (a batch's answers in one event, as 2025-03-26 allows)."""
    app = web.Application()
    app[BATCH_SEEN] = []

    async def post(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        request.app[BATCH_SEEN].append(body)
        msgs = body if isinstance(body, list) else [body]
        answers = [a for a in (_answer(m) for m in msgs) if a is not None]
        if not answers:
            return web.Response(status=202)
        if request.headers.get("X-Answer") in ("sse", "sse-batch"):
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await resp.prepare(request)
            await resp.write(b": ping\n\n")
            events = [answers] if request.headers["X-Answer"] == "sse-batch" and isinstance(body, list) else answers
            for a in events:
                await resp.write(b"event: message\ndata: " + json.dumps(a).encode() + b"\n\n")
            await resp.write_eof()
            return resp
        return web.json_response(answers if isinstance(body, list) else answers[0])

    app.router.add_post("/mcp", post)
    return app

"""The best case for an HTTP proxy in Python: no aiohttp server, no features, Sidecar's lean client.

Requests are parsed by ``httptools`` (llhttp) straight from an ``asyncio.Protocol``, sent upstream
through ``sidecar.http.pool.ConnectionPool`` (the keep-alive client Sidecar uses for MCP), and the
answer, read whole, goes back in one write with its length. No auth, no checks, no streaming:
what rewriting Sidecar's listener on protocols (the lever issue 19 left) could at most buy,
before any of Sidecar's own stages. A bench reference for ``bench/run mcp``, not a usable proxy
(it holds an endless stream's answer forever; nothing about the request is validated).

    python bench/lean_forwarder.py --listen 127.0.0.1:8083 --upstream 127.0.0.1:8080
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from pathlib import Path

import httptools
from multidict import CIMultiDict
from yarl import URL

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: Sidecar's package beside bench/

from bare_forwarder import loop_factory  # run as a script: bench/ is on the path

from sidecar.config.schema import UpstreamConfig
from sidecar.http.pool import ConnectionPool

HOP = frozenset({"connection", "keep-alive", "transfer-encoding", "host", "content-length", "upgrade", "te", "trailer"})


class _Server(asyncio.Protocol):
    """One client connection: each complete request is forwarded, answers written in request order."""

    def __init__(self, pool: ConnectionPool, upstream: str, tasks: set[asyncio.Task[None]]) -> None:
        self.pool, self.upstream, self.tasks = pool, upstream, tasks
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.previous: asyncio.Task[None] | None = None  # the answer before this one (keep-alive order)
        self.url, self.headers, self.body = b"", list[tuple[str, str]](), list[bytes]()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not a subclass, but is one

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            if self.transport is not None:
                self.transport.close()

    def on_message_begin(self) -> None:
        self.url, self.headers, self.body = b"", [], []

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.decode("latin-1"), value.decode("latin-1")))

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        method = self.parser.get_method().decode()
        task = asyncio.get_running_loop().create_task(
            self.forward(method, self.url.decode("latin-1"), self.headers, b"".join(self.body), self.previous)
        )
        self.previous = task
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def forward(
        self, method: str, target: str, fields: list[tuple[str, str]], body: bytes, previous: asyncio.Task[None] | None
    ) -> None:
        headers = CIMultiDict((k, v) for k, v in fields if k.lower() not in HOP)
        headers["Host"] = self.upstream
        if body:
            headers["Content-Length"] = str(len(body))
        resp = await self.pool.request(
            method, URL(f"http://{self.upstream}{target}", encoded=True), headers, body or None
        )
        chunks = []
        while chunk := await resp.content.readany():
            chunks.append(chunk)
        resp.release()
        data = b"".join(chunks)
        head = [f"HTTP/1.1 {resp.status} {resp.reason}\r\n"]
        head += [f"{k}: {v}\r\n" for k, v in resp.headers.items() if k.lower() not in HOP]
        head.append(f"Content-Length: {len(data)}\r\n\r\n")
        if previous is not None:
            await previous
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write("".join(head).encode("latin-1") + data)


async def serve(host: str, port: int, upstream: str) -> None:
    loop = asyncio.get_running_loop()
    pool = ConnectionPool(UpstreamConfig(id="mcp", kind="mcp", url=f"http://{upstream}/mcp"))
    tasks: set[asyncio.Task[None]] = set()  # held until done: the loop keeps only weak references
    server = await loop.create_server(lambda: _Server(pool, upstream, tasks), host, port, reuse_address=True)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        server.close()
        await pool.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--listen", required=True, help="HOST:PORT")
    ap.add_argument("--upstream", required=True, help="HOST:PORT")
    args = ap.parse_args()
    host, _, port = args.listen.rpartition(":")
    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        runner.run(serve(host, int(port), args.upstream))


if __name__ == "__main__":
    main()

"""The upstreams ``bench/soak`` runs, each in a process of its own (the soak's 2 cores are shared).

``plex``: ``sidecar.demo.plex_like_app`` (small XML answers, ``Range`` reads of a 1 MiB
media file, the notifications websocket) plus ``/soak/long?seconds=N``, a slow stream
of 16 KiB every 0.1 s for N seconds: the "long streams" of the soak. aiohttp on uvloop.

``mcp``: the official SDK's ``MCPServer`` from ``tests/mcp_server.py`` (Streamable HTTP,
JSON answers) behind that file's bearer-token guard, under uvicorn.

Both keep what they record for tests (requests seen, tools called) from growing over a
10-minute run: the lists are emptied every second.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import socket
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from aiohttp import web

ROOT = Path(__file__).resolve().parent.parent
LONG_CHUNK = 16 * 1024
LONG_TICK = 0.1  # seconds between chunks of a long stream


def long_stream_bytes(seconds: float) -> int:
    """What ``/soak/long?seconds=N`` sends in all (the soak checks every stream got all of it)."""
    return max(1, int(seconds / LONG_TICK)) * LONG_CHUNK


async def long_stream(request: web.Request) -> web.StreamResponse:
    try:
        seconds = min(600.0, float(request.query.get("seconds", "30")))
    except ValueError:
        raise web.HTTPBadRequest() from None
    n = long_stream_bytes(seconds) // LONG_CHUNK
    resp = web.StreamResponse(headers={"Content-Type": "video/mp4"})
    resp.content_length = n * LONG_CHUNK
    await resp.prepare(request)
    chunk = b"\x00" * LONG_CHUNK
    for _ in range(n):
        await resp.write(chunk)
        await asyncio.sleep(LONG_TICK)
    await resp.write_eof()
    return resp


async def run_plex(port: int, token: str) -> None:
    from sidecar.demo import SEEN, plex_like_app

    app = plex_like_app(token)
    app.router.add_get("/soak/long", long_stream)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port, backlog=2048, reuse_address=True).start()
    print(f"plex upstream on 127.0.0.1:{port}", flush=True)
    try:
        while True:  # the demo app records every request; a soak would hoard them
            await asyncio.sleep(1.0)
            app[SEEN].clear()
    finally:
        await runner.cleanup()


def run_mcp(port: int, token: str) -> None:
    sys.path.insert(0, str(ROOT / "tests"))
    import uvicorn
    from mcp_server import Guard, Recorder, build_server

    rec = Recorder()
    server = build_server(rec)
    app = Guard(server.streamable_http_app(json_response=True), server.sse_app(), rec, token)

    def forget() -> None:
        while True:
            time.sleep(1.0)
            rec.requests.clear()
            rec.calls.clear()

    threading.Thread(target=forget, daemon=True).start()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen(2048)
    config = uvicorn.Config(
        app, log_level="warning", access_log=False, lifespan="on", ws="none", http="h11",
        loop="uvloop", timeout_graceful_shutdown=1, backlog=2048,
    )  # fmt: skip
    print(f"mcp upstream on 127.0.0.1:{port}", flush=True)
    uvicorn.Server(config).run(sockets=[sock])


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("kind", choices=("plex", "mcp"))
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--token-env", required=True, help="the variable holding the token clients must send")
    a = ap.parse_args(argv)
    token = os.environ[a.token_env]  # not on the command line, where ps shows it
    if a.kind == "mcp":
        run_mcp(a.port, token)
        return
    import uvloop

    with contextlib.suppress(KeyboardInterrupt):
        uvloop.run(run_plex(a.port, token))


if __name__ == "__main__":
    main()

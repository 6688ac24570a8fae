"""The floor: a TCP byte pipe in Python, the least any proxy written in Python can do per hop.

Each client connection gets its own connection to the upstream, and bytes are copied both
ways as they arrive, straight from one ``asyncio.Protocol`` to the other transport: no HTTP
parsing, no header rewriting, no auth, no buffering beyond the transports' own. uvloop when
installed, as Sidecar. It is not a usable proxy (the client's ``Host`` goes upstream as sent,
nothing is checked); it answers one question for ``bench/run mcp``: how much of a hop's
latency is Python and the event loop at all, before any HTTP or any feature. If even this
cannot reach a ratio, no proxy in Python can.

    python bench/pipe_forwarder.py --listen 127.0.0.1:8082 --upstream 127.0.0.1:8080
"""

from __future__ import annotations

import argparse
import asyncio
import signal

from bare_forwarder import loop_factory  # run as a script: bench/ is on the path


class _Half(asyncio.Protocol):
    """One side of the pipe: what it reads goes to ``peer``; back-pressure pauses the reader."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.peer: _Half | None = None
        self.pending = bytearray()  # what arrived before the other side was connected

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not a subclass, but is one

    def data_received(self, data: bytes) -> None:
        peer = self.peer
        if peer is not None and peer.transport is not None:
            peer.transport.write(data)
        else:
            self.pending += data

    def connection_lost(self, exc: Exception | None) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.close()

    def pause_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.resume_reading()


async def serve(host: str, port: int, up_host: str, up_port: int) -> None:
    loop = asyncio.get_running_loop()
    connecting: set[asyncio.Task[None]] = set()  # held until done: the loop keeps only weak references

    def accept() -> _Half:
        client = _Half()

        async def connect() -> None:
            try:
                _, upstream = await loop.create_connection(_Half, up_host, up_port)
            except OSError:
                if client.transport is not None:
                    client.transport.close()
                return
            client.peer, upstream.peer = upstream, client
            if upstream.transport is not None:
                if client.pending:
                    upstream.transport.write(bytes(client.pending))
                    client.pending.clear()
                if client.transport is None or client.transport.is_closing():
                    upstream.transport.close()

        task = loop.create_task(connect())
        connecting.add(task)
        task.add_done_callback(connecting.discard)
        return client

    server = await loop.create_server(accept, host, port, reuse_address=True)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        server.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--listen", required=True, help="HOST:PORT")
    ap.add_argument("--upstream", required=True, help="HOST:PORT")
    args = ap.parse_args()
    host, _, port = args.listen.rpartition(":")
    up_host, _, up_port = args.upstream.rpartition(":")
    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        runner.run(serve(host, int(port), up_host, int(up_port)))


if __name__ == "__main__":
    main()

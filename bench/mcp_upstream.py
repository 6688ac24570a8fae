"""The MCP server the MCP bench measures against: the official SDK's own, in a process of its own.

``python -m bench.mcp_upstream PORT``: an ``MCPServer`` with a small ``echo`` tool and a
handful of others (so ``tools/list`` has something to list), Streamable HTTP at ``/mcp``
(sessions, SSE answers: what the SDK serves by default), under uvicorn with uvloop when
installed. ``lookup`` answers like ``echo`` after waiting ``LOOKUP_WAIT`` on (simulated) I/O, as
a tool that queries something does: with it a direct call takes about the 8 ms the issue
measured, so the one-connection ratio shows the hop against a server that works. A process of
its own, so the Sidecar's CPU time in ``/proc`` is the Sidecar's.
"""

from __future__ import annotations

import asyncio
import sys

import uvicorn
from mcp.server.mcpserver import MCPServer

LOOKUP_WAIT = 0.007  # seconds


def build() -> MCPServer:
    mcp = MCPServer("sidecar-bench-upstream", log_level="WARNING")

    @mcp.tool()
    def echo(text: str) -> str:
        """Answer with the text (a small JSON answer)."""
        return text

    @mcp.tool()
    async def lookup(text: str) -> str:
        """Answer with the text after a wait on I/O (a tool that queries something)."""
        await asyncio.sleep(LOOKUP_WAIT)
        return text

    for name in ("search", "fetch", "summarise", "translate", "delete_item"):

        def tool(query: str) -> str:
            return query

        mcp.tool(name=name, description=f"The {name} tool.")(tool)
    return mcp


def main(argv: list[str]) -> int:
    port = int(argv[0])
    app = build().streamable_http_app()
    try:
        import uvloop  # noqa: F401

        loop = "uvloop"
    except ImportError:
        loop = "asyncio"
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False, loop=loop, http="h11")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

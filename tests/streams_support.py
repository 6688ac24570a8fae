"""What a client of a stream sees when the sidecar ends it (revocation, expiry, a narrowed key, a token's
end): shared by the security, OAuth and JWT stream tests."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest

__all__ = ["closed_1008", "cut"]


async def closed_1008(ws: aiohttp.ClientWebSocketResponse, within: float = 2) -> None:
    """The websocket, still ticking, ends with close code 1008 within ``within`` seconds."""
    async with asyncio.timeout(within):
        while (msg := await ws.receive()).type == aiohttp.WSMsgType.TEXT:
            pass
    assert msg.type == aiohttp.WSMsgType.CLOSE and msg.data == 1008, msg


async def cut(stream: aiohttp.ClientResponse, within: float = 2) -> None:
    """The streamed answer is cut within ``within`` seconds: a broken body, never a clean end."""
    with pytest.raises(aiohttp.ClientPayloadError):
        async with asyncio.timeout(within):
            while await stream.content.readany():
                pass

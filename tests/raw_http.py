"""Reading one HTTP/1.1 response off a raw socket: the attack tests write requests byte for byte."""

from __future__ import annotations

import asyncio

from multidict import CIMultiDict


async def read_response(reader: asyncio.StreamReader, *, to_eof: bool = False) -> tuple[int, CIMultiDict[str], bytes]:
    """Status, headers and body of the next response: a Content-Length or chunked body, else
    (``to_eof``, for ``Connection: close``) everything until the peer closes, else none."""
    head = await reader.readuntil(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers: CIMultiDict[str] = CIMultiDict()
    for line in lines:
        if ":" in line:
            name, _, value = line.partition(":")
            headers.add(name.strip(), value.strip())
    if "Content-Length" in headers:
        body = await reader.readexactly(int(headers["Content-Length"]))
    elif headers.get("Transfer-Encoding", "").lower() == "chunked":
        body = b""
        while True:
            size = int((await reader.readuntil(b"\r\n")).strip(), 16)
            chunk = await reader.readexactly(size + 2)
            if size == 0:
                break
            body += chunk[:-2]
    else:
        body = await reader.read() if to_eof else b""
    return int(status_line.split()[1]), headers, body

"""A hostile or broken peer on the host's private sockets: the limits owner keeps answering the others.

The owner's socket lives in the supervisor's 0700 directory, so a peer is a worker of the
same user; a worker with a bug (or one killed mid-write) must still not take the supervisor's
limits down for every other worker, nor make it buffer without bound.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from sidecar.limits.gcra import MemoryBackend
from sidecar.limits.quota import QuotaBook
from sidecar.store import SqliteStore
from sidecar.workers.limits import MAX_LINE, LimitsOwner

OWNERS: dict[str, LimitsOwner] = {}


@pytest.fixture
async def owner_path(tmp_path: Path) -> AsyncIterator[str]:
    """The path of a real owner's socket (the owner itself: ``OWNERS[path]``)."""
    store = SqliteStore(tmp_path / "keys.db")
    await store.open()
    owner = LimitsOwner(MemoryBackend(), QuotaBook(store), {})
    path = str(tmp_path / "limits.sock")
    await owner.start(path)
    OWNERS[path] = owner
    try:
        yield path
    finally:
        del OWNERS[path]
        await owner.close()
        await store.close()


async def _ping(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, rid: int) -> list[object]:
    writer.write(json.dumps([rid, "ping"]).encode() + b"\n")
    await writer.drain()
    return json.loads(await asyncio.wait_for(reader.readline(), 5))  # type: ignore[no-any-return]


@pytest.mark.parametrize(
    "junk",
    [
        b"{not json\n",
        b"5\n",
        b'"ping"\n',
        b"[]\n",
        b'[1, "nope"]\n',  # an unknown op
        b'[2, "e", 999, 1, 0, null, 0]\n',  # a plan id never registered
        b'[3, "e", 1]\n',  # wrong arity
        b'[0, "p", 1, ["b"], [["not a limit", 1, 1]], null]\n',
        b"\xff\xfe\n",  # not UTF-8
    ],
)
async def test_a_malformed_question_is_dropped_and_the_connection_still_answers(owner_path: str, junk: bytes) -> None:
    reader, writer = await asyncio.open_unix_connection(owner_path)
    try:
        writer.write(junk)
        assert await _ping(reader, writer, 7) == [7, 1]
    finally:
        writer.close()


async def test_an_endless_line_is_cut_off_and_others_are_still_served(owner_path: str) -> None:
    """A peer writing without a newline used to be buffered without bound (and re-split each read)."""
    _, writer = await asyncio.open_unix_connection(owner_path)
    other_r, other_w = await asyncio.open_unix_connection(owner_path)
    try:
        chunk = b"x" * 65536
        with pytest.raises(ConnectionError):  # the owner hung up on it
            for _ in range(MAX_LINE // len(chunk) + 64):
                writer.write(chunk)
                await writer.drain()
        assert await _ping(other_r, other_w, 1) == [1, 1]
    finally:
        writer.close()
        other_w.close()


async def test_a_flood_of_plans_is_bounded_on_the_owner(owner_path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """MAX_PLANS was only the client's promise: a peer registering plans and never clearing them
    grew the owner's table without bound. Now the owner starts over itself (a conforming worker,
    which clears at the same count, never sees it)."""
    from sidecar.workers import limits

    monkeypatch.setattr(limits, "MAX_PLANS", 50)
    reader, writer = await asyncio.open_unix_connection(owner_path)
    try:
        for pid in range(1, 201):
            writer.write(json.dumps([0, "p", pid, [f"b{pid}"], [["5/minute", 12_000_000, 60_000_000]], None]).encode())
            writer.write(b"\n")
        assert await _ping(reader, writer, 1) == [1, 1]
        (conn,) = OWNERS[owner_path].conns
        assert len(conn.plans) <= 50
        writer.write(json.dumps([2, "e", 200, 1, 0, None, 0]).encode() + b"\n")  # the newest plan still answers
        reply = json.loads(await asyncio.wait_for(reader.readline(), 5))
        assert reply[0] == 2 and reply[1] is True
    finally:
        writer.close()

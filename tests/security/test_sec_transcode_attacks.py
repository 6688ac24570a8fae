"""Transcode sessions by every form an id can take (DESIGN invariants 2 and 4), beyond the spellings
of ``test_sec_plex_paths.py``: key A starts session ``Sess1``; key B (its own playback key)
tries to reach it.

Hole found: the ids were compared exactly as sent, so ``sess1``, ``Sess1 `` (a trailing space),
``Sess1%00x`` (a NUL) or ``Sess1%0A`` named no session the sidecar knew: B's request was
forwarded, and B claimed that spelling, while a server that compares ids case-insensitively,
trims them or stops at a NUL (as C string handling does) acts on A's session. An id is now
printable ASCII without spaces (anything else is ``400``) and owned case-insensitively.
"""

from __future__ import annotations

from typing import Any

import pytest
from conftest import Running
from plexrig import Recorder, raw_request, rig

PLAYBACK = {"upstreams": ["plex"], "paths": ["plex:playback"]}
START = "/video/:/transcode/universal/start.m3u8"
SEGMENT = "/video/:/transcode/universal/session/{}/base/00001.ts"

__all__ = ["rig"]  # the fixture, from plexrig: pytest finds it here


async def send(
    running: Running,
    target: str,
    key: str | None = None,
    headers: dict[str, str] | None = None,
    source: str | None = None,
) -> Any:
    hdrs = list((headers or {}).items())
    if key:
        hdrs.append(("X-Plex-Token", key))
    return await raw_request(running.proxy.server.host, running.proxy.server.port, "GET", target, hdrs, source)


async def started_by_a(running: Running) -> tuple[Any, str, str]:
    """Key A starts session Sess1; returns (A's record, A, B) where B is another playback key."""
    rec_a, a = await running.create_key(permissions=PLAYBACK)
    _, b = await running.create_key(permissions=PLAYBACK)
    ans = await send(running, f"{START}?session=Sess1&path=/library/metadata/1", a)
    assert ans.status == 200 and b"session/Sess1/base/index.m3u8" in ans.body
    return rec_a, a, b


OTHER_SPELLINGS = ["sess1", "SESS1", "Sess1%20", "%20Sess1", "Sess1%00", "Sess1%00x", "Sess1%0A", "Sess1%09",
                   "Sess1%C2%A0", "Sess%C4%B11"]  # fmt: skip


@pytest.mark.parametrize("spelling", OTHER_SPELLINGS)
async def test_another_spelling_of_the_id_is_refused_in_every_place(
    rig: tuple[Running, Recorder], spelling: str
) -> None:
    """B names ``Sess1`` with another case, a space, a NUL, a newline, a tab, a non-ASCII letter: in the query,
    the path and the header, B gets 403 or 400, the upstream hears nothing, and B owns no such id."""
    running, rec = rig
    _, _, b = await started_by_a(running)
    before = len(rec.seen)
    for target, headers in (
        (f"{START}?session={spelling}", {}),
        (f"/video/:/transcode/universal/stop?X-Plex-Session-Identifier={spelling}", {}),
        (SEGMENT.format(spelling), {}),
    ):
        ans = await send(running, target, b, headers)
        assert ans.status in (400, 403), (target, ans.status, ans.body)
        assert ans.json()["error"]["code"] in ("bad_request", "insufficient_permissions")
    assert len(rec.seen) == before, [s.target for s in rec.seen[before:]]


async def test_the_header_form_is_checked_whatever_its_case_and_spacing(rig: tuple[Running, Recorder]) -> None:
    """``X-Plex-Session-Identifier: sess1`` (other case) or with a tab inside: B is refused."""
    running, rec = rig
    _, _, b = await started_by_a(running)
    before = len(rec.seen)
    for value in ("sess1", "SESS1", "Sess1\tx"):
        ans = await send(running, f"{START}?session=mine", b, {"x-plex-session-identifier": value})
        assert ans.status in (400, 403), (value, ans.status, ans.body)
    assert len(rec.seen) == before


async def test_encoded_parameter_names_and_revocation_do_not_free_the_session(rig: tuple[Running, Recorder]) -> None:
    """``sess%69on=Sess1`` is the session parameter; after A's key is revoked the session is still not B's,
    and A's keyless segments stop working (401)."""
    running, _ = rig
    rec_a, _, b = await started_by_a(running)
    assert (await send(running, f"{START}?sess%69on=Sess1", b)).status == 403
    assert (await send(running, SEGMENT.format("Sess1"))).status == 200
    resp = await running.admin.delete(f"/admin/keys/{rec_a.id}", headers=running.admin_headers())
    assert resp.status == 200
    await running.sc.verifier.refresh()
    assert (await send(running, SEGMENT.format("Sess1"))).status == 401
    stop = "/video/:/transcode/universal/stop?session=sess1"
    for target in (f"{START}?session=Sess1", stop, SEGMENT.format("Sess1")):
        assert (await send(running, target, b)).status == 403, target


async def test_the_owner_still_uses_its_session_in_any_case(rig: tuple[Running, Recorder]) -> None:
    """A itself may name its session as ``sess1`` (the same session, case aside) and stop it."""
    running, _ = rig
    _, a, _ = await started_by_a(running)
    assert (await send(running, "/video/:/transcode/universal/stop?session=sess1", a)).status == 200
    assert (await send(running, SEGMENT.format("SESS1"))).status == 200  # keyless: still A's


@pytest.mark.parametrize(
    "query",
    ["session%00=Sess1", "session%20=Sess1", "%20session=Sess1", "session%09=Sess1",
     "X-Plex-Session-Identifier%00=Sess1", "sess%00ion=Sess1"],
)  # fmt: skip
async def test_a_parameter_name_with_a_space_or_nul_still_names_the_session(
    rig: tuple[Running, Recorder], query: str
) -> None:
    """``session%00=``, ``session%20=``, ``sess%00ion=``: a server that trims names, stops at a NUL or drops
    control characters reads ``session``, so the sidecar does too: B gets 403 and the upstream hears nothing."""
    running, rec = rig
    _, _, b = await started_by_a(running)
    before = len(rec.seen)
    ans = await send(running, f"{START}?{query}", b)
    assert ans.status == 403, (query, ans.status, ans.body)
    assert len(rec.seen) == before


async def test_a_keyless_request_claims_nothing_new_for_the_owner(rig: tuple[Running, Recorder]) -> None:
    """Anyone who learnt A's session id (``/status/sessions`` lists them to every ``plex:read`` key) fetches
    A's segments without a key, adding ``?session=junk``: before, that claimed ``junk`` for A and pushed A's
    other session Sess2 out of A's table, and B then took Sess2 over. Now the keyless request is 403 and
    B still cannot touch Sess2."""
    running, rec = rig
    _, a, b = await started_by_a(running)
    assert (await send(running, f"{START}?session=Sess2&path=/library/metadata/2", a)).status == 200
    running.sc.transcode.per_key = 2
    before = len(rec.seen)
    for query in ("session=junk", "X-Plex-Session-Identifier=junk"):
        ans = await send(running, SEGMENT.format("Sess1") + "?" + query)
        assert ans.status == 403, (query, ans.status, ans.body)
    ans = await send(running, SEGMENT.format("Sess1"), headers={"X-Plex-Session-Identifier": "junk"})
    assert ans.status == 403
    assert len(rec.seen) == before
    assert (await send(running, f"{START}?session=Sess2", b)).status == 403
    assert (await send(running, SEGMENT.format("Sess1") + "?session=Sess2")).status == 200  # A's own ids: fine


async def test_a_keyless_segment_request_counts_only_from_the_players_address(rig: tuple[Running, Recorder]) -> None:
    """A session id is a bearer capability, and ``/status/sessions`` lists them to every ``plex:read`` key.
    Before, anyone who read ``Sess1`` there fetched A's segments without a key, from anywhere, as A (and on
    A's budget). Now only the address of A's latest keyed request naming the session may: another client
    gets 401 and the upstream hears nothing. A player that moves sends its key again, and the binding moves."""
    running, rec = rig
    _, a, _ = await started_by_a(running)  # from 127.0.0.1
    before = len(rec.seen)
    elsewhere = await send(running, SEGMENT.format("Sess1"), source="127.0.0.2")
    assert elsewhere.status == 401 and b"an API key is required" in elsewhere.body
    for claim in ("X-Forwarded-For", "X-Real-IP", "Forwarded"):  # no trusted proxy: a client's word is not taken
        value = "for=127.0.0.1" if claim == "Forwarded" else "127.0.0.1"
        assert (await send(running, SEGMENT.format("Sess1"), headers={claim: value}, source="127.0.0.2")).status == 401
    assert len(rec.seen) == before
    assert (await send(running, SEGMENT.format("Sess1"))).status == 200  # the player itself
    moved = await send(running, f"{START}?session=Sess1&path=/library/metadata/1", a, source="127.0.0.2")
    assert moved.status == 200
    assert (await send(running, SEGMENT.format("Sess1"), source="127.0.0.2")).status == 200
    assert (await send(running, SEGMENT.format("Sess1"))).status == 401  # the old address no longer


async def test_rotating_the_owners_key_frees_no_session(rig: tuple[Running, Recorder]) -> None:
    """A's key is rotated (no grace): the session stays the old key's — B is still refused, and A's successor
    is refused too (a rotated key's sessions end with it; a new key starts new sessions)."""
    running, rec = rig
    rec_a, _, b = await started_by_a(running)
    resp = await running.admin.post(f"/admin/keys/{rec_a.id}/rotate", json={}, headers=running.admin_headers())
    assert resp.status in (200, 201), await resp.text()
    successor = (await resp.json())["data"]["key"]
    await running.sc.verifier.refresh()
    before = len(rec.seen)
    for key in (b, successor):
        assert (await send(running, "/video/:/transcode/universal/stop?session=Sess1", key)).status == 403
    assert (await send(running, SEGMENT.format("Sess1"))).status == 401
    assert len(rec.seen) == before

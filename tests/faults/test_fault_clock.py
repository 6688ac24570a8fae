"""The wall clock stepping back or forward by an hour (issue 15), through the clocks a Sidecar takes.

``Sidecar(config, clock=wall, steady=steady)``: the test steps ``wall`` (NTP after a suspend,
an operator fixing the date) while ``steady`` (``time.monotonic`` in production) runs on.
What must hold (docs/reliability.md, "Clock"):

- rate-limit buckets are intervals: a step neither refills them nor refuses everything
  until the wall clock catches up;
- failure throttling is an interval: a step back does not throttle an address for an hour;
- expiry and revocation are moments on the wall clock: a key expiring at T is refused from
  wall time T on and not before; a key seen expired or revoked is not revived by a step back;
- quotas are calendar windows on the wall clock: a step moves the window, and every request
  is counted exactly once, in the window the wall clock named when it was served.
"""

from __future__ import annotations

from pathlib import Path

from aiohttp.test_utils import TestServer
from conftest import MakeSidecar, Running, base_config
from limits_support import Clocks, utc

from sidecar.auth.keys import generate_key
from sidecar.config import parse_limit
from sidecar.limits.quota import window_bounds, window_id

HOUR = 3600.0


async def sidecar(
    make_sidecar: MakeSidecar, upstream: TestServer, tmp_path: Path, clocks: Clocks, **kw: object
) -> Running:
    cfg = base_config(str(upstream.make_url("")).rstrip("/"), tmp_path, **kw)
    return await make_sidecar(cfg, clock=clocks.wall, steady=clocks.steady)


async def answer(r: Running, key: str) -> tuple[int, str, str, str]:
    """(status, error code, X-RateLimit-Remaining, Retry-After) as the client sees them."""
    resp = await r.proxy.get("/identity", headers={"X-Plex-Token": key})
    code = "" if resp.status == 200 else (await resp.json())["error"]["code"]
    return resp.status, code, resp.headers.get("X-RateLimit-Remaining", ""), resp.headers.get("Retry-After", "")


async def test_rate_buckets_are_neither_refilled_nor_frozen_by_a_step(
    make_sidecar: MakeSidecar, plex_upstream: TestServer, tmp_path: Path
) -> None:
    """5/minute: a step back keeps the remaining count (before: 429 with Retry-After ~3600 for an
    hour); a step forward does not refill it (before: a fresh burst of 5)."""
    clocks = Clocks(utc(2026, 3, 10, 12, 0, 0))
    r = await sidecar(make_sidecar, plex_upstream, tmp_path, clocks)
    _, k = await r.create_key(rate_limits=["5/minute"])
    assert [(await answer(r, k))[2] for _ in range(2)] == ["4", "3"]
    clocks.step = -HOUR
    assert await answer(r, k) == (200, "", "2", "")
    clocks.step = +HOUR
    assert [(await answer(r, k))[:3] for _ in range(3)] == [
        (200, "", "1"),
        (200, "", "0"),
        (429, "rate_limit_exceeded", "0"),
    ]
    status, _, _, retry = await answer(r, k)
    assert status == 429 and int(retry) <= 12, retry  # one request back every 12 s, whatever the wall clock says
    clocks.advance(12)
    assert (await answer(r, k))[:2] == (200, "")


async def test_failure_throttle_windows_ignore_wall_clock_steps(
    make_sidecar: MakeSidecar, plex_upstream: TestServer, tmp_path: Path
) -> None:
    """3 failures a minute: the 429's Retry-After stays under a minute after a step back (before: an
    hour), a step forward does not forgive the failures, and a steady minute later it is 401 again."""
    clocks = Clocks(utc(2026, 3, 10, 12, 0, 0))
    r = await sidecar(
        make_sidecar, plex_upstream, tmp_path, clocks, keys={"argon2": "cheapest", "failed_attempts_per_minute": 3}
    )
    unknown = generate_key("pmcp_")[0]  # well formed, checksum valid, in no store
    assert [(await answer(r, unknown))[:2] for _ in range(3)] == [(401, "invalid_key")] * 3
    status, code, _, retry = await answer(r, unknown)
    assert (status, code) == (429, "too_many_failed_attempts") and 0 < int(retry) <= 60
    clocks.step = -HOUR
    status, code, _, retry = await answer(r, unknown)
    assert (status, code) == (429, "too_many_failed_attempts") and 0 < int(retry) <= 60, retry
    clocks.step = +HOUR
    assert (await answer(r, unknown))[:2] == (429, "too_many_failed_attempts")
    clocks.advance(61)
    assert (await answer(r, unknown))[:2] == (401, "invalid_key")


async def test_expiry_follows_the_wall_clock_and_a_step_back_revives_nothing(
    make_sidecar: MakeSidecar, plex_upstream: TestServer, tmp_path: Path
) -> None:
    """expired_key from wall time T on, never before; a key seen expired or revoked stays so when the
    wall clock goes back an hour (before: a revoked key answered 200 again for an hour)."""
    clocks = Clocks(utc(2026, 3, 10, 12, 0, 0))
    r = await sidecar(make_sidecar, plex_upstream, tmp_path, clocks)
    _, soon = await r.create_key(expires="30s")
    _, later = await r.create_key(expires="2h")
    _, unused = await r.create_key(expires="30s")  # nobody presents it while the clock is ahead
    revoked_rec, revoked = await r.create_key()
    assert [(await answer(r, k))[0] for k in (soon, later, unused, revoked)] == [200] * 4
    resp = await r.admin.delete(f"/admin/keys/{revoked_rec.id}", headers=r.admin_headers())
    assert resp.status == 200
    await r.sc.verifier.refresh()
    assert (await answer(r, revoked))[:2] == (401, "revoked_key")

    clocks.step = +HOUR  # wall time passes T for `soon`: it expires, as it should
    assert (await answer(r, soon))[:2] == (401, "expired_key")
    assert (await answer(r, later))[0] == 200  # T is 2 h away: not early
    clocks.step = 0.0  # and back
    assert (await answer(r, soon))[:2] == (401, "expired_key"), "an expired key came back"
    assert (await answer(r, revoked))[:2] == (401, "revoked_key")
    clocks.step = -HOUR
    assert (await answer(r, revoked))[:2] == (401, "revoked_key"), "a revoked key came back"
    assert (await answer(r, soon))[:2] == (401, "expired_key")
    assert (await answer(r, later))[0] == 200
    assert (await answer(r, unused))[0] == 200  # its T (wall) has not come: not refused before it
    assert r.sc._key_state(revoked_rec.id) == "revoked"  # what ends its open streams


async def test_quota_windows_follow_the_wall_clock_and_count_each_request_once(
    make_sidecar: MakeSidecar, plex_upstream: TestServer, tmp_path: Path
) -> None:
    """10/day with 100/minute, at 23:30: a step into tomorrow opens tomorrow's window; the step back
    counts on in today's from where it was (not from zero, not with tomorrow's counts), and the store
    ends up with exactly the requests each window served."""
    clocks = Clocks(utc(2026, 3, 10, 23, 30, 0))
    r = await sidecar(make_sidecar, plex_upstream, tmp_path, clocks)
    rec, k = await r.create_key(quota="10/day", rate_limits=["100/minute"])
    day = parse_limit("10/day")
    today = window_id(day, window_bounds(day, clocks.wall())[0])
    served = {today: 0}

    async def use(n: int) -> list[str]:
        out = []
        for _ in range(n):
            status, code, remaining, _ = await answer(r, k)
            assert (status, code) == (200, ""), code
            served[wid] = served.get(wid, 0) + 1
            out.append(remaining)
        return out

    wid = today
    await use(4)
    clocks.step = +HOUR
    wid = window_id(day, window_bounds(day, clocks.wall())[0])
    assert wid != today
    assert await use(3) == ["9", "8", "7"]  # the quota is the tightest policy now
    await r.sc.limiter.book.flush()  # today's window has ended (wall): its counter is written and dropped
    clocks.step = 0.0
    wid = today
    assert await use(1) == ["5"]  # today's 5th request: neither fresh nor charged tomorrow's three
    await r.sc.limiter.book.flush()
    store = r.sc.store
    for window, n in served.items():
        assert await store.quota_used(rec.id, "*", window) == n, window
    clocks.step = +HOUR
    await r.sc.limiter.book.flush()
    wid = window_id(day, window_bounds(day, clocks.wall())[0])
    assert await use(1) == ["6"]  # tomorrow's 4th


async def test_cache_lifetimes_are_intervals(
    make_sidecar: MakeSidecar, plex_upstream: TestServer, tmp_path: Path
) -> None:
    """A 60 s cache entry is EXPIRED 61 steady seconds later even though the wall clock went back an
    hour (before: the wall clock drove the cache, and it stayed a HIT for another hour)."""
    clocks = Clocks(utc(2026, 3, 10, 12, 0, 0))
    r = await sidecar(
        make_sidecar,
        plex_upstream,
        tmp_path,
        clocks,
        cache={"rules": [{"upstream": "plex", "path": "/identity", "ttl": "60s"}]},
    )
    _, k = await r.create_key()

    async def cache_status() -> str:
        resp = await r.proxy.get("/identity", headers={"X-Plex-Token": k})
        assert resp.status == 200
        return resp.headers.get("X-Cache-Status", "")

    assert [await cache_status(), await cache_status()] == ["MISS", "HIT"]
    clocks.step = -HOUR
    clocks.advance(61)
    assert await cache_status() == "EXPIRED"

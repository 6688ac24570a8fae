"""``sidecar_event_loop_lag_seconds``: a loop hogged by one callback shows up on ``/metrics``."""

from __future__ import annotations

import asyncio
import time

from conftest import Running


def buckets(text: str) -> dict[str, float]:
    out = {}
    for line in text.splitlines():
        if line.startswith("sidecar_event_loop_lag_seconds_bucket{"):
            out[line.split('le="', 1)[1].split('"', 1)[0]] = float(line.rsplit(" ", 1)[1])
    return out


async def test_a_blocked_event_loop_is_exported_as_lag(plex_sidecar: Running) -> None:
    """A scraper sees the lag histogram; 0.6 s of blocking lands above the 0.25 s bucket."""
    r = await plex_sidecar.admin.get("/metrics")
    before = buckets(await r.text())
    assert before and "+Inf" in before, "the histogram is exported from the start"
    time.sleep(0.6)  # a callback that hogs the loop (a slow parse, CPU starvation)
    deadline = time.monotonic() + 5
    while True:
        await asyncio.sleep(0.05)
        after = buckets(await (await plex_sidecar.admin.get("/metrics")).text())
        late = (after["+Inf"] - after["0.25"]) - (before["+Inf"] - before["0.25"])
        if late >= 1 or time.monotonic() > deadline:
            break
    assert late >= 1, f"no wake-up later than 0.25 s recorded: {after}"
    assert after["+Inf"] > before["+Inf"]

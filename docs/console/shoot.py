"""Screenshots of every console page (docs/console/*.png) and the pages' sizes and load times.

    .venv/bin/python docs/console/shoot.py          # writes the PNGs next to this file, prints the figures

Runs the same stack as tests/console/test_console_browser.py (a Plex-like upstream, the
MCP SDK's server, a sidecar on its real listeners, Debian's headless Chromium), fills it with
a few keys, some traffic and a month of usage, then visits each page. The test command does
not run it; the PNGs it wrote are committed.
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "tests" / "console")]

import aiohttp  # noqa: E402
from browser_support import CHROMIUM, CHROMIUM_ARGS, mcp_tools, nav_metrics, start_stack  # noqa: E402
from conftest import ADMIN_TOKEN  # noqa: E402

from sidecar.observe.usage import day_of  # noqa: E402
from sidecar.store.base import UsageRow  # noqa: E402

LOADS = 5  # each page is loaded this many times; the median is reported


async def main() -> None:
    from playwright.async_api import async_playwright

    with tempfile.TemporaryDirectory() as tmp:
        async with start_stack(Path(tmp)) as st, async_playwright() as pw:
            sc = st.sc
            m = sc.manager()
            player, player_key = await m.create(
                {
                    "name": "Living-room TV",
                    "owner": "home",
                    "description": "Plex app on the TV",
                    "permissions": {"upstreams": ["plex"], "paths": ["plex:playback"]},
                    "rate_limits": ["20/second"],
                    "quota": "100000/month",
                    "expires": "365d",
                },
                "cli",
            )
            _, agent_key = await m.create(
                {
                    "name": "Research agent",
                    "owner": "lab",
                    "permissions": {"upstreams": ["tools"], "tools": {"tools": ["search", "fetch"]}},
                    "rate_limits": ["60/minute"],
                    "expires": "90d",
                },
                "cli",
            )
            await m.create(
                {
                    "name": "Contractor (read-only)",
                    "owner": "lab",
                    "permissions": {"upstreams": ["plex"], "paths": ["plex:read"]},
                    "expires": "30d",
                },
                "cli",
            )
            old, _ = await m.create({"name": "Old laptop", "owner": "home"}, "cli")
            await m.revoke(old.id, "cli")
            await sc.verifier.refresh()
            now = time.time()
            await sc.store.add_usage(
                {
                    (player.id, day_of(now - d * 86400)): UsageRow(
                        200 + (d * 37) % 180, (d * 7) % 15, 5_000_000 * (1 + d % 4), 0
                    )
                    for d in range(1, 30)
                }
            )
            async with aiohttp.ClientSession() as http:
                for path in (
                    "/library/sections",
                    "/library/sections/1/all",
                    "/identity",
                    "/library/parts/300/file.mp4",
                    "/library/sections?X-Plex-Token=" + player_key,
                    "/security/token",
                ):
                    async with http.get(st.proxy + path, headers={"X-Plex-Token": player_key}) as resp:
                        await resp.read()
                for _ in range(3):
                    async with http.get(
                        st.proxy + "/library/sections", headers={"X-Plex-Token": "pmcp_" + "1" * 40}
                    ) as r:
                        await r.read()
                async with http.get(st.proxy + "/library/sections") as r:
                    await r.read()
            await mcp_tools(st.proxy, agent_key)

            browser = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            ctx = await browser.new_context(base_url=st.admin, viewport={"width": 1280, "height": 860})
            page = await ctx.new_page()
            await page.goto("/signin")
            await page.screenshot(path=HERE / "signin.png")
            await page.get_by_label("Admin token").fill(ADMIN_TOKEN)
            await page.get_by_role("button", name="Sign in").click()
            await page.wait_for_url(f"{st.admin}/")

            figures: dict[str, list[dict[str, float]]] = {}
            pages = {"keys": "/", "create": "/keys/new", "key": f"/keys/{player.id}", "activity": "/activity"}
            for name, url in pages.items():
                for _ in range(LOADS):
                    await page.goto(url)
                    await page.wait_for_load_state("load")
                    figures.setdefault(name, []).append(await nav_metrics(page))
                if name == "create":
                    await page.get_by_label("Only the tools chosen here").check()
                    await page.locator('[data-tools-for="tools"] input').first.wait_for()
                await page.screenshot(path=HERE / f"{name}.png", full_page=True)

            await page.goto(f"/keys/{player.id}")
            await page.get_by_role("link", name="Revoke").click()
            await page.locator("dialog#revoke-dialog").wait_for(state="visible")
            await page.screenshot(path=HERE / "revoke.png")

            await page.goto("/keys/new")
            await page.get_by_label("Name", exact=True).fill("CI pipeline")
            await page.get_by_label("Only these:").check()
            await page.get_by_label("plex (plex").check()
            await page.get_by_label("plex:read").check()
            await page.get_by_role("button", name="Create").click()
            # Not this run's real key in a committed picture: the same text with a made-up key.
            await page.evaluate("""() => { const real = document.getElementById('new-key').textContent;
                document.querySelectorAll('[data-secret]').forEach((el) => {
                  el.textContent = el.textContent.replaceAll(real, 'pmcp_3f9a0b1c2d3e5be1…(shown once)'); }); }""")
            await page.screenshot(path=HERE / "created.png", full_page=True)

            phone = await browser.new_context(
                base_url=st.admin,
                viewport={"width": 390, "height": 844},
                storage_state=await ctx.storage_state(),
                is_mobile=True,
            )
            mobile = await phone.new_page()
            await mobile.goto("/")
            await mobile.screenshot(path=HERE / "keys-phone.png", full_page=True)
            await browser.close()

    print("| page | HTML bytes | assets (files, bytes, first load) | TTFB ms | DOMContentLoaded ms | load ms |")
    print("|---|---|---|---|---|---|")
    for name, runs in figures.items():
        first = runs[0]

        def med(field: str, runs: list[dict[str, float]] = runs) -> float:
            return statistics.median(r[field] for r in runs)

        print(
            f"| {pages[name]} ({name}) | {int(med('html_bytes'))} "
            f"| {int(first['assets'])}, {int(first['assets_bytes'])} "
            f"| {med('ttfb_ms'):.1f} | {med('dcl_ms'):.1f} | {med('load_ms'):.1f} |"
        )


if __name__ == "__main__":
    asyncio.run(main())

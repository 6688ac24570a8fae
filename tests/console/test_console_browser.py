"""The console in a real browser: headless Chromium (Debian's) driven by Playwright for Python.

One browser and one stack (Plex-like upstream, the SDK's MCP server, a sidecar on its real
listeners) for the whole module; every test opens its own browser context (its own cookies)
and its own keys. What each test asserts is what the person at the browser, or a client
using the key, sees.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
from browser_support import (
    KEY_RE,
    Stack,
    launched_browser,
    mcp_tools,
    random_name,
    start_stack,
)
from conftest import ADMIN_TOKEN
from mcp_server import MCP_TOKEN

pytestmark = pytest.mark.asyncio(loop_scope="module")

PAGE_BUDGET_MS = 3000  # DOMContentLoaded of any console page on a loaded 2-core CI machine


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def browser() -> AsyncIterator[Any]:
    async with launched_browser() as b:
        yield b


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def stack(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stack]:
    async with start_stack(tmp_path_factory.mktemp("console")) as s:
        yield s


@pytest_asyncio.fixture(loop_scope="module")
async def page(browser: Any, stack: Stack) -> AsyncIterator[Any]:
    """A fresh browser context (no cookies), allowed to use the clipboard, signed in with the admin token."""
    context = await browser.new_context(permissions=["clipboard-read", "clipboard-write"], base_url=stack.admin)
    context.set_default_timeout(10_000)
    p = await context.new_page()
    await p.goto("/")
    assert "/signin" in p.url  # no session: the sign-in page
    await p.get_by_label("Admin token").fill(ADMIN_TOKEN)
    await p.get_by_role("button", name="Sign in").click()
    await p.wait_for_url(f"{stack.admin}/")
    yield p
    await context.close()


async def proxy_status(stack: Stack, key: str, path: str = "/library/sections") -> tuple[int, str]:
    async with aiohttp.ClientSession() as http:
        resp = await http.get(stack.proxy + path, headers={"X-Plex-Token": key})
        body = await resp.text()
        return resp.status, body


async def refused_within(stack: Stack, key: str, seconds: float) -> float:
    """How long after now the key is refused through the proxy (polling, never sleeping blind)."""
    started = time.monotonic()
    while True:
        status, body = await proxy_status(stack, key)
        if status == 401:
            assert "revoked_key" in body
            return time.monotonic() - started
        assert time.monotonic() - started < seconds, f"still {status} after {seconds}s"
        await asyncio.sleep(0.02)


async def test_create_a_key_with_an_mcp_tool_subset_copy_it_and_use_it(page: Any, stack: Stack) -> None:
    await page.get_by_role("link", name="Create API Key").first.click()
    await page.get_by_label("Name", exact=True).fill(name := random_name("mcp-reader"))
    await page.get_by_label("Description").fill("reads the corpus")
    await page.get_by_label("Only the tools chosen here").check()
    # The picker fills from the upstream's live tools/list, fetched by the sidecar with the upstream's credential.
    picker = page.locator('[data-tools-for="tools"]')
    await picker.get_by_label("search").check()
    await picker.get_by_label("fetch").check()
    assert await picker.get_by_label("delete_everything").count() == 1
    asked = [r for r in stack.mcp.rec.requests if b'"tools/list"' in r.body]
    assert asked and asked[-1].header("Authorization") == f"Bearer {MCP_TOKEN}"  # the upstream's own credential
    await page.get_by_label("Rate limits").fill("600/minute")
    await page.get_by_role("button", name="Create").click()

    # Shown once, with a copy button: what the clipboard gets is the key on the page.
    shown = (await page.locator("#new-key").text_content() or "").strip()
    assert KEY_RE.fullmatch(shown)
    await page.get_by_role("button", name="Copy").first.click()
    await page.get_by_text("Copied to the clipboard.").wait_for()
    copied = await page.evaluate("navigator.clipboard.readText()")
    assert copied == shown
    assert "mcpServers" in await page.content()  # a ready-to-paste MCP client config

    # Through the proxy: only the chosen tools are listed; another one is refused.
    names, refused = await mcp_tools(stack.proxy, copied)
    assert sorted(names) == ["fetch", "search"]
    assert "error" in refused and "delete_everything" not in stack.mcp.rec.calls
    assert (await proxy_status(stack, copied))[0] == 200  # all upstreams: Plex too

    # Leaving the page forgets the key: no later page carries it or its hash.
    await page.get_by_role("link", name="show the key's page").click()
    key_id = page.url.rsplit("/", 1)[1]
    record = await stack.sc.store.get(key_id)
    assert record is not None
    for url in (f"/keys/{key_id}", "/", "/activity", f"/keys/{key_id}/edit"):
        await page.goto(url)
        html = await page.content()
        assert copied not in html and copied[5:] not in html and record.hash not in html, url
    await page.go_back()
    await page.go_back()
    await page.go_back()
    assert copied not in await page.content()  # not even from the back-forward cache

    # The key's page: Last Used, the usage chart and the request list, up to date.
    await page.goto(f"/keys/{key_id}")
    assert (await page.locator("dd.last-used").text_content() or "").strip() != "Never"
    assert int(await page.locator(".total-requests").text_content() or "0") >= 5
    assert await page.locator("svg.chart rect.bar").count() == 1  # today's bar
    rows = page.locator("table.recent tbody tr")
    assert await rows.count() >= 5
    assert "/library/sections" in (await rows.first.text_content() or "")  # newest first
    assert "/mcp/tools" in (await rows.nth(1).text_content() or "")
    assert await page.get_by_text("MCP tools on tools").count() == 1
    # ... and in the list: Last Used is filled in.
    await page.goto(f"/?q={name}")
    cell = page.locator(f'tr[data-key="{key_id}"] td.last-used')
    assert "Never" not in (await cell.text_content() or "")
    events = await stack.sc.store.audit_log(key_id)
    assert [(e.actor, e.action) for e in events] == [("console", "created")]


async def test_edit_rotate_and_revoke_a_key(page: Any, stack: Stack) -> None:
    rec, key = await stack.sc.manager().create({"name": random_name("plex-player"), "permissions": {
        "upstreams": ["plex"], "paths": ["plex:playback"]}}, "test")  # fmt: skip
    await stack.sc.verifier.refresh()
    assert (await proxy_status(stack, key))[0] == 200
    await page.goto(f"/keys/{rec.id}")

    # Edit: its rate limit, which the very next requests obey.
    await page.get_by_role("link", name="Edit").click()
    await page.get_by_label("Rate limits").fill("2/minute")
    await page.get_by_role("button", name="Save changes").click()
    await page.get_by_text("Changes saved.").wait_for()
    assert await page.get_by_text("2/minute").count() >= 1
    statuses = [(await proxy_status(stack, key))[0] for _ in range(3)]
    assert statuses[-1] == 429

    # Rotate with no grace: a new key shown once, which is known at once — and still under the
    # spent 2/minute, since a rotation continues the key's budget (a 429, not a 401); the old one
    # is refused at once.
    await page.get_by_label("Grace period").select_option("0")
    await page.get_by_role("button", name="Rotate").click()
    new_key = (await page.locator("#new-key").text_content() or "").strip()
    assert KEY_RE.fullmatch(new_key) and new_key != key
    status, body = await proxy_status(stack, new_key)
    assert status == 429 and "rate_limit_exceeded" in body, (status, body)
    assert await refused_within(stack, key, 1.0) < 1.0

    # Revoke the new one: the confirmation names the key; cancel does nothing, confirm revokes.
    await page.get_by_role("link", name="show the key's page").click()
    new_id = page.url.rsplit("/", 1)[1]
    await page.get_by_role("link", name="Revoke").click()
    dialog = page.locator("dialog#revoke-dialog")
    await dialog.wait_for(state="visible")
    assert rec.name in (await dialog.text_content() or "")
    await dialog.get_by_role("link", name="Cancel").click()
    await dialog.wait_for(state="hidden")
    assert (await proxy_status(stack, new_key))[0] in (200, 429)
    await page.get_by_role("link", name="Revoke").click()
    await dialog.get_by_role("button", name=f"Revoke “{rec.name}”").click()
    # Polled from the click on (the page's own round trip included): refused within a second.
    assert await refused_within(stack, new_key, 1.0) < 1.0
    await page.get_by_text("revoked. It stays listed, for audit.").wait_for()
    assert await page.locator(".state.revoked").count() >= 1
    events = await stack.sc.store.audit_log(rec.id)
    assert [(e.actor, e.action) for e in events] == [
        ("console", "rotated"),
        ("console", "patched"),
        ("test", "created"),
    ]
    assert events[1].detail == {"fields": ["rate_limits"]}  # the edit sent only what changed
    assert [(e.actor, e.action) for e in await stack.sc.store.audit_log(new_id)] == [("console", "revoked")]
    # Revoked keys stay listed, for audit.
    await page.goto("/?state=revoked")
    assert await page.locator(f'tr[data-key="{rec.id}"]').count() == 1


async def test_csrf_and_an_expired_session_are_refused(page: Any, stack: Stack, browser: Any) -> None:
    before = len(await stack.sc.store.list_keys())
    await page.goto("/keys/new")
    await page.get_by_label("Name", exact=True).fill("forged")
    await page.evaluate("document.querySelectorAll('input[name=csrf]').forEach((i) => { i.value = 'forged-token'; })")
    await page.get_by_role("button", name="Create").click()
    assert "CSRF check failed" in await page.content()

    # Another site's page posting to the console: the Strict cookie does not go with it.
    evil = await page.context.new_page()
    form = (f'<form method="post" action="{stack.admin}/keys/new"><input name="name" value="evil">'
            '<button>go</button></form>')  # fmt: skip
    await evil.route("http://evil.test/", lambda route: route.fulfill(body=form, content_type="text/html"))
    await evil.goto("http://evil.test/")
    await evil.get_by_role("button", name="go").click()
    await evil.wait_for_load_state()
    assert "sign in again" in await evil.content()
    await evil.close()
    assert len(await stack.sc.store.list_keys()) == before

    # Inactivity: the console's clock moves past the idle time; the next page asks to sign in again.
    sessions = stack.console.sessions
    real = sessions.clock
    sessions.clock = lambda: real() + stack.sc.config.console.session_idle + 1
    try:
        await page.goto("/activity")
        assert "/signin" in page.url
        assert await page.get_by_label("Admin token").count() == 1
    finally:
        sessions.clock = real


async def test_activity_shows_failures_refusals_and_the_audit_log(page: Any, stack: Stack) -> None:
    async with aiohttp.ClientSession() as http:
        for _ in range(3):
            await http.get(stack.proxy + "/library/sections", headers={"X-Plex-Token": "pmcp_" + "0" * 40})
        await http.get(stack.proxy + "/library/sections")
    rec, key = await stack.sc.manager().create({"name": random_name("tiny"), "rate_limits": ["1/minute"]}, "test")
    await stack.sc.verifier.refresh()
    for _ in range(2):
        await proxy_status(stack, key)
    await page.goto("/activity")
    assert await page.get_by_role("heading", name="Authentication failures by reason").count() == 1
    reasons = page.locator("section", has=page.get_by_role("heading", name="Authentication failures by reason"))
    assert "unauthorized" in (await reasons.text_content() or "")
    assert "127.0.0.1" in (await page.locator("section", has_text="… by client IP").text_content() or "")
    refusals = page.locator("section", has_text="Rate-limit and quota refusals")
    assert rec.id in (await refusals.text_content() or "")
    # Filters: by reason, and the audit log by action.
    await page.goto("/activity?reason=rate_limit_exceeded&action=created")
    text = await page.content()
    assert rec.id in text and "No authentication failures in this window." in text


async def test_pages_are_small_and_fast_in_the_browser(page: Any, stack: Stack) -> None:
    from browser_support import nav_metrics

    rec, _ = await stack.sc.manager().create({"name": random_name("measured")}, "test")
    figures = {}
    for url in ("/", "/keys/new", f"/keys/{rec.id}", "/activity"):
        await page.goto(url)
        await page.wait_for_load_state("load")
        figures[url] = m = await nav_metrics(page)
        assert m["html_bytes"] < 60_000, (url, m)
        assert m["dcl_ms"] < PAGE_BUDGET_MS, (url, m)
    print("\nconsole pages (bytes of HTML, DOMContentLoaded ms):",
          {u: (int(m["html_bytes"]), round(m["dcl_ms"])) for u, m in figures.items()})  # fmt: skip

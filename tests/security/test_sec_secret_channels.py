"""Secrets through the channels the leak scans (test_sec_leakscan.py, test_sec_logs.py) do not drive
(DESIGN invariant 7 and "Secrets: no key, hash or upstream token in any log line, metric, error or
response").

- Config errors: an option's value is quoted back when it is wrong, and a value may come from
  the environment (``${VAR}``: where secrets live) or carry ``user:password@``. Neither may be
  echoed by ``parse_config`` nor by ``sidecar config check``.
- Log lines naming a URL the operator configured with credentials in it (a JWKS URL with
  ``user:password@``, a Redis URL): the password never reaches a log record.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from conftest import ADMIN_TOKEN, PLEX_TOKEN, MakeSidecar, base_config
from jwt_support import IdP, provider

from sidecar.config import ConfigError, parse_config
from sidecar.observe.logfilter import redact

HERE = Path(__file__).resolve().parent
for _folder in ("oauth", "console"):  # their shared helpers (pytest puts only a test's own folder on the path)
    if str(HERE.parent / _folder) not in sys.path:
        sys.path.append(str(HERE.parent / _folder))
URL_PW = "urlpass-5ecret-d41d"  # a password written into a URL
ENV_SECRET = "env-5ecret-value-8c2f"  # any value a ${VAR} brings in


def _config(**upstream: Any) -> dict[str, Any]:
    up = {"id": "plex", "kind": "plex", "url": "http://127.0.0.1:32400", "token_env": "PLEX_TOKEN"}
    up.update(upstream)
    return {"upstreams": [up]}


BAD_VALUES: list[tuple[str, dict[str, Any], dict[str, str]]] = [
    ("url, port out of range", _config(url=f"http://u:{URL_PW}@h:99999"), {}),
    ("url, not http", _config(url=f"ftp://u:{URL_PW}@h/"), {}),
    ("url, with a query", _config(url=f"http://u:{URL_PW}@h/?x=1"), {}),
    ("url from the environment", _config(url="${UP_URL}"), {"UP_URL": f"http://u:{URL_PW}@h:99999"}),
    ("url from the environment, not a URL", _config(url="${UP_URL}"), {"UP_URL": ENV_SECRET}),
    ("listen from the environment", {**_config(), "listen": "${LISTEN}"}, {"LISTEN": ENV_SECRET}),
    ("kind from the environment", _config(kind="${KIND}"), {"KIND": ENV_SECRET}),
    ("prefix from the environment", _config(path_prefix="${PFX}"), {"PFX": ENV_SECRET}),
    (
        "jwks_url with a password",
        {
            **_config(),
            "jwt": [
                {
                    "issuer": "https://idp",
                    "audience": "a",
                    "jwks_url": f"ftp://u:{URL_PW}@idp/certs",
                    "rules": [{"grant": {"upstreams": ["*"]}}],
                }
            ],
        },
        {},
    ),
    (
        "oauth public_url with a password",
        {**_config(), "oauth": {"enabled": True, "public_url": f"https://u:{URL_PW}@sidecar.example/x"}},
        {},
    ),
    ("redis_url from the environment", {**_config(), "rate_limits": {"backend": "${RB}"}}, {"RB": ENV_SECRET}),
]


@pytest.mark.parametrize(("cfg", "extra"), [(c, e) for _, c, e in BAD_VALUES], ids=[n for n, _, _ in BAD_VALUES])
def test_a_config_error_never_quotes_a_password_or_an_environment_value(
    cfg: dict[str, Any], extra: dict[str, str], tmp_path: Path
) -> None:
    with pytest.raises(ConfigError) as e:
        parse_config(cfg, env={"PLEX_TOKEN": "plex-token-value", **extra}, base=tmp_path)
    text = str(e.value) + "\n".join(e.value.problems)
    assert text, "the value was refused"
    assert URL_PW not in text and ENV_SECRET not in text, text
    assert "upstreams[0]" in text or "listen" in text or "jwt[0]" in text or "oauth" in text or "rate_limits" in text


def test_config_check_never_prints_a_password_or_an_environment_value(tmp_path: Path) -> None:
    cfg = {
        "listen": "${LISTEN}",
        "upstreams": [
            {"id": "plex", "kind": "plex", "url": "${UP_URL}", "token_env": "PLEX_TOKEN"},
            {"id": "m", "kind": "mcp", "url": f"ftp://u:{URL_PW}@h/", "path_prefix": "/m"},
        ],
    }
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "PLEX_TOKEN": "plex-token-value", "LISTEN": ENV_SECRET, "UP_URL": f"http://u:{URL_PW}@h:0x"}
    import subprocess

    done = subprocess.run(
        [sys.executable, "-m", "sidecar", "config", "check", "-c", str(path)],
        capture_output=True, text=True, env=env, timeout=30, check=False,
    )  # fmt: skip
    out = done.stdout + done.stderr
    assert done.returncode != 0 and "upstreams[0].url" in out and "upstreams[1].url" in out, out
    assert URL_PW not in out and ENV_SECRET not in out, out


def test_the_redactor_hides_a_password_in_any_url() -> None:
    for text, hidden in (
        (f"JWKS fetch from https://u:{URL_PW}@idp/certs failed", URL_PW),
        (f"Error connecting to redis://:{URL_PW}@cache:6379/0", URL_PW),
        (f"dsn postgresql://sidecar:{URL_PW}@db/sidecar?sslmode=require", URL_PW),
        (f"'http://user:{URL_PW}@h:99999' (Port out of range)", URL_PW),
        (f"url=https://{URL_PW}@idp/", URL_PW),  # a token as the user name
    ):
        out = redact(text)
        assert hidden not in out and "REDACTED" in out, out
    assert redact("mail admin@example.com about https://idp/certs") == "mail admin@example.com about https://idp/certs"


async def _logged(caplog: pytest.LogCaptureFixture, needle: str, timeout: float = 5.0) -> list[str]:
    deadline = time.monotonic() + timeout
    while True:
        lines = [f"{r.getMessage()} {r.exc_text or ''}" for r in caplog.records]
        if any(needle in line for line in lines) or time.monotonic() > deadline:
            return lines
        await asyncio.sleep(0.02)


async def test_a_jwks_url_password_never_reaches_a_log_line(
    make_sidecar: MakeSidecar, aiohttp_server: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    idp = await IdP().start(aiohttp_server)
    idp.add_key("k1")
    idp.status = 503  # the fetch fails: its log line names the URL
    caplog.set_level(logging.DEBUG)
    entry = provider(idp, [{"grant": {"upstreams": ["*"]}}])
    entry["jwks_url"] = entry["jwks_url"].replace("http://", f"http://jwks-user:{URL_PW}@")
    cfg = base_config("http://127.0.0.1:9", tmp_path, jwt=[entry])
    cfg["upstreams"] = [{"id": "tools", "kind": "mcp", "url": "http://127.0.0.1:9/mcp", "path_prefix": "/mcp"}]
    run = await make_sidecar(cfg)
    assert run.sc.jwt is not None
    await run.proxy.get("/mcp", headers={"Authorization": "Bearer " + idp.token("k1", sub="a")})
    lines = await _logged(caplog, "JWKS fetch from")
    assert any("JWKS fetch from" in line for line in lines), lines
    assert not [line for line in lines if URL_PW in line], lines


async def test_a_redis_url_password_never_reaches_a_log_line(
    make_sidecar: MakeSidecar, plex_upstream: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import socket

    with socket.socket() as s:  # a port nobody listens on: every Redis call fails
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    caplog.set_level(logging.DEBUG)
    cfg = base_config(str(plex_upstream.make_url("")).rstrip("/"), tmp_path)
    cfg["rate_limits"] = {"backend": "redis", "redis_url": "${REDIS_URL}", "default": ["100/second"]}
    run = await make_sidecar(cfg, extra_env={"REDIS_URL": f"redis://:{URL_PW}@127.0.0.1:{port}/0"})
    _, key = await run.create_key(name="r")
    resp = await run.proxy.get("/library/sections", headers={"X-Plex-Token": key})
    assert resp.status in (200, 429, 503)
    lines = await _logged(caplog, "backend")
    assert any("backend" in line for line in lines), lines
    assert not [line for line in lines if URL_PW in line], lines


# ---------------------------------------------------------------------------- OAuth, console and admin at DEBUG

CLIENT_SECRET = "preregistered-client-5ecret-77aa"


async def test_oauth_console_and_admin_secrets_never_reach_a_log_line(
    aiohttp_client: Any, upstream: Any, tmp_path: Path, started: list[Any], caplog: pytest.LogCaptureFixture
) -> None:
    """Every secret of the OAuth flow (code, PKCE verifier, access and refresh tokens, client secrets),
    of the console (admin token, session id, CSRF token) and of the admin API, sent the way clients
    send them and the ways careless clients do (in the query string), is absent from every log record
    at DEBUG and from the access log."""
    from console_support import sign_in
    from mcp_server import MCP_TOKEN
    from oauth_support import code_for, exchange, free_port, oauth_config, register, start_sidecar

    caplog.set_level(logging.DEBUG)
    port = free_port()
    client = {"client_id": "conf", "client_secret": "${CONF_SECRET}", "redirect_uris": ["http://127.0.0.1:1/callback"]}
    cfg = oauth_config(upstream, tmp_path, port, clients=[client])
    cfg["log"] = {"access": str(tmp_path / "access.log"), "level": "debug"}
    gw = await start_sidecar(aiohttp_client, cfg, tmp_path, started, extra_env={"CONF_SECRET": CLIENT_SECRET})
    _, key = await gw.sc.manager().create({"name": "o", "permissions": {"upstreams": ["*"]}}, "test")
    await gw.sc.verifier.refresh()
    secrets: dict[str, str] = {"admin token": ADMIN_TOKEN, "MCP upstream token": MCP_TOKEN, "API key": key,
                               "client secret": CLIENT_SECRET}  # fmt: skip

    dcr = await register(gw, token_endpoint_auth_method="client_secret_post")
    secrets["registered client secret"] = dcr["client_secret"]
    code, verifier = await code_for(gw, key, dcr["client_id"])
    secrets["code"], secrets["PKCE verifier"] = code, verifier
    status, tokens = await exchange(gw, dcr["client_id"], code, verifier, client_secret=dcr["client_secret"])
    assert status == 200, tokens
    secrets["access token"], secrets["refresh token"] = tokens["access_token"], tokens["refresh_token"]
    mcp = {"Accept": "application/json, text/event-stream", "MCP-Protocol-Version": "2025-06-18"}
    init = {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}}
    body = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": init}
    r = await gw.proxy.post(
        "/mcp/tools", json=body, headers={**mcp, "Authorization": f"Bearer {tokens['access_token']}"}
    )
    assert r.status == 200, await r.text()
    # Careless clients: every credential in the query string too, and a replayed code.
    q = "&".join(f"{n}={v}" for n, v in (
        ("client_secret", CLIENT_SECRET), ("code_verifier", verifier), ("code", code),
        ("refresh_token", tokens["refresh_token"]), ("access_token", tokens["access_token"]),
        ("password", ADMIN_TOKEN), ("secret", dcr["client_secret"]),
    ))  # fmt: skip
    token_url = "/oauth/token"
    replay = {
        "grant_type": "authorization_code",
        "code": code,
        "code_verifier": verifier,
        "client_id": dcr["client_id"],
    }
    await gw.proxy.post(f"{token_url}?{q}", data=replay)
    await gw.proxy.post(f"/mcp/tools?{q}", json=body, headers=mcp)
    await gw.proxy.get(f"/.well-known/oauth-authorization-server?{q}")
    refresh = {"grant_type": "refresh_token", "refresh_token": tokens["refresh_token"], "client_id": dcr["client_id"],
               "client_secret": dcr["client_secret"]}  # fmt: skip
    r = await gw.proxy.post(token_url, data=refresh)
    assert r.status == 200, await r.text()
    secrets["rotated access token"] = (await r.json())["access_token"]
    await gw.proxy.post(token_url, data=refresh)  # reuse: the whole family is revoked
    conf = {"client_id": "conf", "client_secret": CLIENT_SECRET}
    await gw.proxy.post("/oauth/revoke", data={"token": secrets["rotated access token"], **conf})
    await gw.proxy.post(
        token_url, data={"grant_type": "client_credentials", **conf, "client_secret": CLIENT_SECRET + "x"}
    )
    # The console: a wrong token, the right one, a page, a form.
    await gw.admin.post("/signin", data={"token": ADMIN_TOKEN + "x", "next": "/"}, allow_redirects=False)
    fields = await sign_in(gw.admin)
    secrets["CSRF token"] = fields["csrf"]
    session = next(iter(c.value for c in gw.admin.session.cookie_jar if c.key.startswith("sidecar_console")), "")
    assert session
    secrets["console session id"] = session
    await gw.admin.get("/keys")
    await gw.admin.get(f"/keys/nope?csrf={fields['csrf']}&token={ADMIN_TOKEN}")
    # The admin API: a bad token, a good one, an error.
    await gw.admin.get("/admin/keys", headers={"Authorization": f"Bearer {ADMIN_TOKEN}x"})
    await gw.admin.get("/admin/keys", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
    await gw.admin.patch("/admin/keys/nope", json={"name": 1}, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
    await gw.admin.get("/admin/audit", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})

    access = await _access_lines(tmp_path / "access.log", 2)
    # aiohttp.access: the test harness's own servers log their requests; the sidecar's listeners run with
    # access_log=None (a real process's stderr is scanned in test_sec_logs.py).
    records = [f"{r.name}: {r.getMessage()} {r.exc_text or ''} {r.stack_info or ''}" for r in caplog.records
               if r.name != "aiohttp.access"]  # fmt: skip
    assert len(records) > 3 and len(access.splitlines()) >= 2, (records, access)
    leaks = [f"{what} in {where}" for what, value in secrets.items()
             for where, text in [("the access log", access), *((f"log record {i}", t) for i, t in enumerate(records))]
             if value in text]  # fmt: skip
    assert not leaks, (
        "\n".join(leaks) + "\n" + access + "\n" + "\n".join(t for t in records if secrets["CSRF token"] in t)
    )


async def _access_lines(path: Path, want: int) -> str:
    deadline = time.monotonic() + 5
    while True:
        text = path.read_text() if path.exists() else ""
        if len(text.splitlines()) >= want or time.monotonic() > deadline:
            return text
        await asyncio.sleep(0.02)


# ---------------------------------------------------------------------------- a key as an MCP tool name


async def test_a_key_sent_as_a_tool_name_never_reaches_a_metric_or_the_access_log(
    make_sidecar: MakeSidecar, upstream: Any, tmp_path: Path
) -> None:
    """A tool name is the client's text, and it becomes a ``tool`` label, an access-log field and a
    console row: a key pasted there (its own, or one it holds of someone else's) must not become
    readable to whoever reads metrics or logs."""
    from console_support import sign_in
    from mcp_server import MCP_TOKEN

    cfg = base_config(upstream.url, tmp_path)
    auth = {"Authorization": "Bearer ${MCP_TOKEN}"}
    cfg["upstreams"] = [{"id": "tools", "kind": "mcp", "url": f"{upstream.url}/mcp", "path_prefix": "/mcp/tools",
                         "headers": auth}]  # fmt: skip
    run = await make_sidecar(cfg, extra_env={"MCP_TOKEN": MCP_TOKEN})
    _, key = await run.create_key(name="caller")
    _, other = await run.create_key(name="other")
    mcp = {"Accept": "application/json, text/event-stream", "MCP-Protocol-Version": "2026-07-28",
           "Authorization": f"Bearer {key}", "Content-Type": "application/json"}  # fmt: skip
    for i, name in enumerate((other, key, f"x{other}y")):
        body = {"jsonrpc": "2.0", "id": i + 1, "method": "tools/call", "params": {"name": name, "arguments": {}}}
        r = await run.proxy.post("/mcp/tools", json=body, headers={**mcp, "Mcp-Method": "tools/call", "Mcp-Name": name})
        assert r.status < 500, await r.text()
    r = await run.proxy.post(
        "/mcp", json={"mcp_id": "tools", "tool": other}, headers={"Authorization": f"Bearer {key}"}
    )
    assert r.status < 500, await r.text()
    metrics = await (await run.admin.get("/metrics")).text()
    assert "sidecar_mcp_tool_calls_total" in metrics
    access = await _access_lines(tmp_path / "access.log", 4)
    await sign_in(run.admin)
    activity = await (await run.admin.get("/activity")).text()
    for where, text in (("/metrics", metrics), ("the access log", access), ("the console's activity", activity)):
        for what, value in (("the caller's key", key), ("another key", other)):
            assert value not in text and value[5:] not in text, f"{what} in {where}"


async def test_every_credential_header_of_an_upstream_is_redacted_from_logs(
    make_sidecar: MakeSidecar, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The log redactor knows the same upstream credentials the MCP answer scrubber does: every
    configured header value but the ones that never carry a credential (Accept, User-Agent …),
    whatever the header is called."""
    creds, signature = "upstream-creds-5ecret-61ab", "hmac-signature-5ecret-9f0e"
    cfg = base_config("http://127.0.0.1:9", tmp_path)
    cfg["upstreams"] = [{"id": "tools", "kind": "mcp", "url": "http://127.0.0.1:9/mcp", "path_prefix": "/mcp",
                         "headers": {"X-Upstream-Creds": "${CREDS}", "X-Signature": "${SIG}",
                                     "User-Agent": "sidecar-gateway/1.0"}}]  # fmt: skip
    await make_sidecar(cfg, extra_env={"CREDS": creds, "SIG": signature})
    caplog.set_level(logging.DEBUG)
    # What a library that logs the request it was handed would write.
    logging.getLogger("aiohttp.client").debug("sending %r", {"X-Upstream-Creds": creds, "X-Signature": signature})
    text = caplog.text
    assert "X-Upstream-Creds" in text and creds not in text and signature not in text, text


async def test_admin_answers_that_show_a_key_are_never_stored_by_a_cache(plex_sidecar: Any) -> None:
    """The one answer with a full key (create, rotate) says ``no-store``, as OAuth's token answers do
    (RFC 6749 §5.1): a caching proxy or a browser's disk cache in front of the admin listener keeps nothing."""
    run = plex_sidecar
    r = await run.admin.post("/admin/keys", json={"name": "n"}, headers=run.admin_headers())
    assert r.status == 201 and "key" in (await r.json())["data"]
    assert "no-store" in r.headers.get("Cache-Control", ""), dict(r.headers)
    kid = (await r.json())["data"]["id"]
    r = await run.admin.post(f"/admin/keys/{kid}/rotate", json={"grace": 0}, headers=run.admin_headers())
    assert r.status == 201 and "key" in (await r.json())["data"]
    assert "no-store" in r.headers.get("Cache-Control", ""), dict(r.headers)
    r = await run.admin.get("/admin/keys", headers=run.admin_headers())
    assert "no-store" in r.headers.get("Cache-Control", ""), dict(r.headers)


async def test_a_key_pasted_as_a_key_name_or_owner_never_reaches_metrics(plex_sidecar: Any) -> None:
    """People paste a key into the wrong field: the name and owner become ``sidecar_key_info`` labels,
    which whoever reads Prometheus or a dashboard sees."""
    run = plex_sidecar
    _, pasted = await run.create_key(name="first")
    await run.create_key(name=f"copy of {pasted}", owner=pasted)
    text = await (await run.admin.get("/metrics")).text()
    assert "sidecar_key_info" in text and "copy of " in text
    assert pasted not in text and pasted[5:] not in text, [line for line in text.splitlines() if "copy of" in line]


# ---------------------------------------------------------------------------- a real process, workers, at DEBUG


@pytest.mark.timeout(90)
async def test_no_configured_secret_on_a_real_workers_process_stderr_at_debug(
    aiohttp_server: Any, tmp_path: Path
) -> None:
    """``sidecar serve`` with two workers at DEBUG, every kind of configured secret set, and the
    dependencies that name them failing: Redis unreachable (its URL has a password), the JWKS URL
    (with a password) unreachable, the MCP upstream (credential header under any name) unreachable.
    The supervisor's and the workers' stderr never carries one of them."""
    import base64
    import socket

    from serve_support import sidecar_process

    from sidecar.demo import plex_like_app

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]  # nobody listens here
    plex = await aiohttp_server(plex_like_app(PLEX_TOKEN))
    values = {
        "CREDS": "upstream-creds-5ecret-2c4d",
        "REDIS_URL": f"redis://:redis-5ecret-pw-0a1b@127.0.0.1:{dead}/0",
        "SEAL": base64.b64encode(b"s" * 32).decode(),
        "HS_SECRET": "hs256-shared-5ecret-" + "x" * 24,
        "CLIENT_SECRET": "oauth-client-5ecret-7d",
        "UT_ALICE": "per-key-upstream-5ecret-55",
    }
    cfg = base_config(str(plex.make_url("")).rstrip("/"), tmp_path, log={"access": str(tmp_path / "a.log"),
                                                                        "level": "debug"})  # fmt: skip
    cfg["workers"] = 2
    cfg["keys"]["upstream_token_envs"] = ["UT_*"]
    cfg["upstreams"].append({"id": "tools", "kind": "mcp", "url": f"http://127.0.0.1:{dead}/mcp", "path_prefix": "/mcp",
                             "headers": {"X-Upstream-Creds": "${CREDS}"}})  # fmt: skip
    cfg["rate_limits"] = {"backend": "redis", "redis_url": "${REDIS_URL}", "default": ["100/second"]}
    cfg["mcp_sessions"] = {"seal_key_env": "SEAL"}
    cfg["jwt"] = [
        {"issuer": "http://127.0.0.1/idp", "audience": "a", "rules": [{"grant": {"upstreams": ["*"]}}],
         "jwks_url": f"http://idp-user:jwks-5ecret-pw-3e@127.0.0.1:{dead}/certs"},
        {"issuer": "https://ci", "audience": "a", "algorithms": ["HS256"], "secret_env": "HS_SECRET",
         "rules": [{"grant": {"upstreams": ["*"]}}]},
    ]  # fmt: skip
    cfg["oauth"] = {"enabled": True, "public_url": "http://127.0.0.1:8080",
                    "clients": [{"client_id": "c", "client_secret": "${CLIENT_SECRET}",
                                 "redirect_uris": ["http://127.0.0.1/cb"]}]}  # fmt: skip
    path = tmp_path / "sidecar.yaml"
    path.write_text(yaml.safe_dump(cfg))
    secrets = [*values.values(), "redis-5ecret-pw-0a1b", "jwks-5ecret-pw-3e", ADMIN_TOKEN, PLEX_TOKEN]
    async with sidecar_process(path, extra_env=values) as served, aiohttp.ClientSession() as http:
        admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
        async with http.post(f"{served.admin}/admin/keys", json={"name": "k"}, headers=admin) as r:
            assert r.status == 201
            key = (await r.json())["data"]["key"]
        deadline = time.monotonic() + 5
        while True:  # every worker sees the key within a second
            async with http.get(f"{served.proxy}/identity", headers={"X-Plex-Token": key}) as r:
                if r.status != 401 or time.monotonic() > deadline:
                    break
            await asyncio.sleep(0.1)
        fake_jwt = "eyJhbGciOiJSUzI1NiJ9.eyJpc3MiOiJodHRwOi8vMTI3LjAuMC4xL2lkcCJ9.c2ln"
        for _ in range(4):  # spread over both workers
            await http.get(f"{served.proxy}/identity", headers={"X-Plex-Token": key})
            await http.post(f"{served.proxy}/mcp", json={"jsonrpc": "2.0", "id": 1, "method": "ping"},
                            headers={"Authorization": f"Bearer {key}", "Accept": "application/json"})  # fmt: skip
            await http.get(f"{served.proxy}/mcp", headers={"Authorization": f"Bearer {fake_jwt}"})
        host, port = served.proxy.removeprefix("http://").rsplit(":", 1)
        for _ in range(2):  # a malformed request line: logged at DEBUG by the listener (the level is on)
            reader, writer = await asyncio.open_connection(host, int(port))
            writer.write(f"GET /identity HTTP/1.1\r\nHost: x\r\nX-Plex-Token {key}\r\n\r\n".encode())
            await writer.drain()
            await reader.read()
            writer.close()
        await served.wait_log("DEBUG")
        await served.wait_log("JWKS fetch from")
        await served.wait_log("rate-limit")
    text = "\n".join(served.log)
    assert "DEBUG" in text and "worker 1 started" in text, text[-3000:]
    found = [s for s in secrets if s in text] + (["the API key"] if key in text or key[5:] in text else [])
    assert not found, (found, [line for line in served.log if any(s in line for s in found)][:5])


def test_a_log_records_extra_fields_are_redacted_too(caplog: pytest.LogCaptureFixture) -> None:
    """A library may hand its log record fields (aiohttp's access logger: ``first_request_line``,
    ``request_header``) that a JSON formatter prints as they are: they are cleaned like the message."""
    from sidecar.observe import logfilter

    logfilter.install()
    key = "pmcp_" + "0123456789abcdef" * 4 + "0123"
    caplog.set_level(logging.DEBUG)
    logging.getLogger("aiohttp.access").info(
        "request", extra={"first_request_line": f"GET /x?foo={key} HTTP/1.1", "request_header": {"X-Plex-Token": key}}
    )
    record = caplog.records[-1]
    shown = f"{record.__dict__.get('first_request_line')} {record.__dict__.get('request_header')}"
    assert "REDACTED" in shown and key not in shown and key[5:] not in shown, shown


def test_config_check_never_prints_an_upstream_urls_path(tmp_path: Path) -> None:
    """Hosted MCP servers put the account's secret in the URL path (``/api/mcp/s/<secret>/mcp``); the
    operator keeps it in the environment (``url: ${VAR}``), and ``config check`` runs in CI logs."""
    secret = "a1b2c3-url-path-5ecret-zz"
    cfg = {"upstreams": [{"id": "z", "kind": "mcp", "url": "${MCP_URL}", "path_prefix": "/mcp"}]}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "MCP_URL": f"https://mcp.example.com/api/mcp/s/{secret}/mcp"}
    import subprocess

    done = subprocess.run(
        [sys.executable, "-m", "sidecar", "config", "check", "-c", str(path)],
        capture_output=True, text=True, env=env, timeout=30, check=False,
    )  # fmt: skip
    out = done.stdout + done.stderr
    assert done.returncode == 0 and "mcp.example.com" in out, out
    assert secret not in out, out


@pytest.mark.parametrize(
    "spec",
    ["postgres+asyncpg://u:{pw}@db/sidecar", "pg://u:{pw}@db/sidecar", "psql://u:{pw}@db/sidecar", "u:{pw}@db/sidecar"],
)
def test_store_copy_never_quotes_a_mistyped_dsns_password(spec: str) -> None:
    """``sidecar store copy --to <DSN>`` with a scheme the command does not know: the refusal (printed
    to a terminal or a CI log) names what is wrong without the password."""
    from sidecar.store.copy import parse_endpoint

    with pytest.raises(ValueError) as e:
        parse_endpoint(spec.format(pw=URL_PW), env={})
    assert "expected sqlite:PATH or postgres:ENV_VAR" in str(e.value)
    assert URL_PW not in str(e.value), str(e.value)


async def test_a_key_given_where_an_id_belongs_is_never_echoed(plex_sidecar: Any) -> None:
    """``sidecar keys revoke <the key>`` and ``GET /admin/keys/<the key>``: people give the key where its
    id belongs. The 404 names the mistake without the key (a terminal, a CI log, a proxy's log of
    error bodies keep it)."""
    from console_support import sign_in

    from sidecar.core.errors import SidecarError

    run = plex_sidecar
    _, key = await run.create_key(name="k")
    shown: list[str] = []
    for method, path in (("GET", f"/admin/keys/{key}"), ("PATCH", f"/admin/keys/{key}"),
                         ("DELETE", f"/admin/keys/{key}"), ("POST", f"/admin/keys/{key}/rotate"),
                         ("GET", f"/admin/keys/{key}/usage")):  # fmt: skip
        r = await run.admin.request(method, path, json={} if method != "GET" else None, headers=run.admin_headers())
        assert r.status == 404, (method, path, r.status)
        shown.append(f"{method} {path}: {await r.text()}")
    for call in (run.sc.manager().get, run.sc.manager().revoke):
        with pytest.raises(SidecarError) as e:
            await call(key, "cli") if call.__name__ == "revoke" else await call(key)
        shown.append(f"KeyManager.{call.__name__}: {e.value.message}")
    await sign_in(run.admin)
    page = await run.admin.get(f"/keys/{key}")
    shown.append(f"console /keys/<key>: {await page.text()}")
    leaked = [s.split(":", 1)[0] for s in shown if key in s.split(": ", 1)[1] or key[5:] in s.split(": ", 1)[1]]
    assert not leaked, leaked


async def test_an_oauth_token_or_secret_given_where_an_id_belongs_is_never_echoed(
    aiohttp_client: Any, upstream: Any, tmp_path: Path, started: list[Any]
) -> None:
    """``DELETE /admin/oauth/grants/<access token>``, ``DELETE /admin/oauth/clients/<client secret>``:
    the 404 names the mistake without the token or the secret."""
    from oauth_support import free_port, oauth_config, register, start_sidecar

    gw = await start_sidecar(aiohttp_client, oauth_config(upstream, tmp_path, free_port()), tmp_path, started)
    dcr = await register(gw, token_endpoint_auth_method="client_secret_post")
    token = "pmcp_oat_" + "ab" * 36  # shaped like an access token
    for path, value in ((f"/admin/oauth/grants/{token}", token), (f"/admin/oauth/clients/{dcr['client_secret']}",
                                                                  dcr["client_secret"])):  # fmt: skip
        r = await gw.admin.delete(path, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
        text = await r.text()
        assert r.status == 404 and value not in text, text

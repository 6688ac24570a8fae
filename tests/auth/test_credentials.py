"""The six credential forms: each accepted, each switchable off, never forwarded upstream,
and every refusal in the contract's JSON shape."""

from __future__ import annotations

import base64
import time
from collections.abc import Callable
from typing import Any

import pytest
from aiohttp.test_utils import TestServer
from conftest import PLEX_TOKEN, MakeSidecar, Running, base_config
from multidict import CIMultiDict, MultiDict

from sidecar.auth.credentials import extract_credential, strip_credential
from sidecar.config import CredentialsConfig
from sidecar.core.errors import BadRequest
from sidecar.demo import SEEN

Request = tuple[dict[str, str], dict[str, str]]  # headers, query


def basic(key: str, user: str = "anything") -> str:
    return "Basic " + base64.b64encode(f"{user}:{key}".encode()).decode()


FORMS: dict[str, Callable[[str], Request]] = {
    "apikey": lambda k: ({"Authorization": f"ApiKey {k}"}, {}),
    "bearer": lambda k: ({"Authorization": f"Bearer {k}"}, {}),
    "basic": lambda k: ({"Authorization": basic(k)}, {}),
    "x_api_key": lambda k: ({"x-api-key": k}, {}),
    "plex_header": lambda k: ({"X-Plex-Token": k}, {}),
    "plex_query": lambda k: ({}, {"X-Plex-Token": k}),
}


def seen_by_upstream(upstream: TestServer) -> list[dict[str, Any]]:
    return upstream.app[SEEN]  # type: ignore[no-any-return]


def assert_never_forwarded(upstream: TestServer, *keys: str) -> None:
    """The upstream saw only the real token: no client key in any header, the path or the query."""
    seen = seen_by_upstream(upstream)
    assert seen, "the upstream saw nothing"
    for req in seen:
        blob = str(req["path"]) + repr(req["headers"])
        for key in keys:
            assert key not in blob, req
        assert "Authorization" not in req["headers"] and "x-api-key" not in {h.lower() for h in req["headers"]}
        assert req["headers"].get("X-Plex-Token") == PLEX_TOKEN


def contract(body: Any, code: str) -> None:
    assert body["success"] is False
    assert body["error"]["code"] == code
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    assert set(body) == {"success", "error"} and set(body["error"]) == {"code", "message"}


# ---------------------------------------------------------------------------- each form


@pytest.mark.parametrize("form", list(FORMS))
async def test_each_form_is_accepted_and_never_forwarded(
    plex_sidecar: Running, plex_upstream: TestServer, form: str
) -> None:
    _, key = await plex_sidecar.create_key()
    headers, query = FORMS[form](key)
    resp = await plex_sidecar.proxy.get("/library/sections", headers=headers, params=query)
    assert resp.status == 200, await resp.text()
    assert "Movies" in await resp.text()
    assert_never_forwarded(plex_upstream, key)


@pytest.mark.parametrize("form", list(FORMS))
async def test_each_form_can_be_turned_off(
    make_sidecar: MakeSidecar, plex_upstream: TestServer, tmp_path: Any, form: str
) -> None:
    cfg = base_config(str(plex_upstream.make_url("")).rstrip("/"), tmp_path, credentials={form: False})
    running = await make_sidecar(cfg)
    _, key = await running.create_key()
    headers, query = FORMS[form](key)
    resp = await running.proxy.get("/library/sections", headers=headers, params=query)
    assert resp.status == 401
    contract(await resp.json(), "unauthorized")
    assert "WWW-Authenticate" in resp.headers
    # Another form still works; the switched-off one is ignored (so a second key there is no
    # conflict) and is still stripped before forwarding.
    other = "plex_header" if form in ("apikey", "bearer", "basic") else "bearer"
    _, ignored = await running.create_key()
    oh, oq = FORMS[other](key)
    xh, xq = FORMS[form](ignored)
    resp = await running.proxy.get("/library/sections", headers={**xh, **oh}, params={**xq, **oq})
    assert resp.status == 200, await resp.text()
    assert_never_forwarded(plex_upstream, key, ignored)


async def test_two_different_keys_are_a_bad_request(plex_sidecar: Running, plex_upstream: TestServer) -> None:
    _, k1 = await plex_sidecar.create_key()
    _, k2 = await plex_sidecar.create_key()
    for headers, query in [
        ({"X-Plex-Token": k1, "x-api-key": k2}, {}),
        ({"Authorization": f"Bearer {k1}"}, {"X-Plex-Token": k2}),
        ({"X-Plex-Token": k1}, {"X-Plex-Token": k2}),
    ]:
        resp = await plex_sidecar.proxy.get("/library/sections", headers=headers, params=query)
        assert resp.status == 400
        contract(await resp.json(), "bad_request")
    assert seen_by_upstream(plex_upstream) == []


async def test_the_same_key_in_every_form_at_once_is_fine(plex_sidecar: Running, plex_upstream: TestServer) -> None:
    _, key = await plex_sidecar.create_key()
    resp = await plex_sidecar.proxy.get(
        "/library/sections",
        headers={"Authorization": f"Bearer {key}", "x-api-key": key, "X-Plex-Token": key},
        params={"X-Plex-Token": key},
    )
    assert resp.status == 200
    assert_never_forwarded(plex_upstream, key)
    # The query token is replaced by the real one (websockets and media URLs rely on the query form).
    assert f"X-Plex-Token={PLEX_TOKEN}" in seen_by_upstream(plex_upstream)[-1]["path"]


# ---------------------------------------------------------------------------- refusals, in the contract's shape


async def test_error_contract_for_every_auth_failure(plex_sidecar: Running, plex_upstream: TestServer) -> None:
    proxy = plex_sidecar.proxy

    resp = await proxy.get("/library/sections")
    assert resp.status == 401 and "WWW-Authenticate" in resp.headers
    contract(await resp.json(), "unauthorized")

    resp = await proxy.get("/library/sections", headers={"X-Plex-Token": "pmcp_nope"})
    assert resp.status == 401
    contract(await resp.json(), "invalid_key")

    rec, key = await plex_sidecar.create_key()
    wrong = key[:-9] + ("0" if key[-9] != "0" else "1") + key[-8:]  # a typo in the secret
    resp = await proxy.get("/library/sections", headers={"X-Plex-Token": wrong})
    assert resp.status == 401
    contract(await resp.json(), "invalid_key")

    rec_exp, key_exp = await plex_sidecar.create_key(expires="1s")
    await plex_sidecar.sc.store.update(rec_exp.with_changes(expires_at=time.time() - 1))
    await plex_sidecar.sc.verifier.refresh()
    resp = await proxy.get("/library/sections", headers={"X-Plex-Token": key_exp})
    assert resp.status == 401
    contract(await resp.json(), "expired_key")

    await plex_sidecar.sc.manager().revoke(rec.id, "test")
    await plex_sidecar.sc.verifier.refresh()
    resp = await proxy.get("/library/sections", headers={"X-Plex-Token": key})
    assert resp.status == 401
    contract(await resp.json(), "revoked_key")

    _, ro = await plex_sidecar.create_key(permissions={"upstreams": ["plex"], "paths": ["plex:read"]})
    resp = await proxy.get("/library/sections/1/refresh", headers={"X-Plex-Token": ro})
    assert resp.status == 403
    contract(await resp.json(), "insufficient_permissions")

    no_colon = "Basic " + base64.b64encode(b"only-a-user").decode()
    for bad in (
        "Basic !!!notbase64",
        no_colon,
        "Digest abc",
        "Bearer a b",
        "Bearer ",
        "Basic \u00e9",
        "Basic Zm9v\u00e9",
    ):
        resp = await proxy.get("/library/sections", headers={"Authorization": bad})
        assert resp.status == 400, bad
        contract(await resp.json(), "bad_request")
    assert seen_by_upstream(plex_upstream) == []  # nothing refused ever reached the upstream


async def test_an_empty_plex_token_is_no_credential(plex_sidecar: Running) -> None:
    resp = await plex_sidecar.proxy.get("/library/sections", headers={"X-Plex-Token": ""}, params={"X-Plex-Token": ""})
    assert resp.status == 401
    contract(await resp.json(), "unauthorized")
    _, key = await plex_sidecar.create_key()
    resp = await plex_sidecar.proxy.get("/library/sections", headers={"X-Plex-Token": key}, params={"X-Plex-Token": ""})
    assert resp.status == 200


async def test_basic_with_any_user_and_colons_in_nothing_but_the_user_part(plex_sidecar: Running) -> None:
    _, key = await plex_sidecar.create_key()
    for user in ("", "plex", "someone@example.com"):
        resp = await plex_sidecar.proxy.get("/identity", headers={"Authorization": basic(key, user)})
        assert resp.status == 200, user


# ---------------------------------------------------------------------------- the pure functions


def test_extract_reports_every_form_it_saw() -> None:
    cfg = CredentialsConfig()
    cred = extract_credential(
        CIMultiDict({"Authorization": "ApiKey K", "x-api-key": "K", "X-Plex-Token": "K"}),
        MultiDict({"x-plex-token": "K"}),
        cfg,
    )
    assert cred is not None and cred.key == "K"
    assert cred.forms == ("apikey", "x_api_key", "plex_header", "plex_query")
    assert "K" not in repr(cred)
    assert extract_credential(CIMultiDict(), MultiDict({"other": "x"}), cfg) is None


def test_a_switched_off_authorization_scheme_counts_as_absent() -> None:
    cfg = CredentialsConfig(bearer=False)
    assert extract_credential(CIMultiDict({"Authorization": "Bearer K"}), MultiDict(), cfg) is None
    with pytest.raises(BadRequest):
        extract_credential(CIMultiDict({"Authorization": "Negotiate xyz"}), MultiDict(), cfg)


def test_strip_removes_every_trace_and_swaps_nested_keys_for_the_real_token() -> None:
    headers = CIMultiDict({"Authorization": "Bearer K1", "x-api-key": "K1", "X-Plex-Token": "K1", "Accept": "a"})
    query = MultiDict([("X-Plex-Token", "K1"), ("url", "/library/metadata/1/thumb?X-Plex-Token=K1"), ("width", "100")])
    strip_credential(headers, query, "K1", "REAL", lambda path: path.startswith("/library/"))
    assert dict(headers) == {"Accept": "a"}
    assert list(query.items()) == [
        ("X-Plex-Token", "REAL"),
        ("url", "/library/metadata/1/thumb?X-Plex-Token=REAL"),
        ("width", "100"),
    ]
    # MCP upstreams have no token to put in: values carrying the key are dropped.
    q2 = MultiDict([("X-Plex-Token", "K1"), ("next", "x?k=K1"), ("a", "b")])
    strip_credential(CIMultiDict(), q2, "K1", None)
    assert list(q2.items()) == [("a", "b")]


def test_strip_without_a_client_key_leaves_the_query_alone() -> None:
    """Transcode segments arrive with no key: nothing must be 'replaced' in every value."""
    query = MultiDict([("offset", "0"), ("session", "abc")])
    strip_credential(CIMultiDict(), query, "", "REAL")
    assert list(query.items()) == [("offset", "0"), ("session", "abc")]

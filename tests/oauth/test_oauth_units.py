"""The pure pieces: token format, redirect matching, narrowing a key into a grant, and the
key record's two grant fields through every serialisation."""

from __future__ import annotations

import pytest

from sidecar.auth.models import KeyRecord, Permissions
from sidecar.oauth.clients import redirect_matches
from sidecar.oauth.grants import GrantError, child_permissions
from sidecar.oauth.tokenformat import ACCESS, CODE, REFRESH, digest, mint, parse, token_kind
from sidecar.store.yamlfile import parse_keys_file


def test_tokens_are_checksummed_and_typed() -> None:
    tok = mint("pmcp_", ACCESS)
    assert token_kind("pmcp_", tok) == ACCESS and parse("pmcp_", tok, ACCESS)
    assert not parse("pmcp_", tok, REFRESH) and not parse("plx_", tok, ACCESS)
    flipped = tok[:-9] + ("0" if tok[-9] != "0" else "1") + tok[-8:]
    assert not parse("pmcp_", flipped, ACCESS)  # one mistyped character
    assert not parse("pmcp_", tok[:-1], ACCESS) and not parse("pmcp_", tok + "0", ACCESS)
    assert token_kind("pmcp_", "pmcp_" + "0" * 68) is None  # an API key is no token
    assert len({mint("pmcp_", CODE) for _ in range(100)}) == 100
    assert digest(tok) != tok and len(digest(tok)) == 64


def test_redirect_matching() -> None:
    assert redirect_matches("https://a.example/cb", "https://a.example/cb")
    assert not redirect_matches("https://a.example/cb", "https://a.example/cb/")
    assert not redirect_matches("https://a.example/cb", "https://a.example:8443/cb")
    assert redirect_matches("http://127.0.0.1/", "http://127.0.0.1:59656/")
    assert redirect_matches("http://[::1]:1/cb", "http://[::1]:2/cb")
    assert not redirect_matches("http://localhost:1/cb", "http://localhost:2/cb")  # names get no port leeway
    assert not redirect_matches("http://127.0.0.1/cb", "http://127.0.0.1:2/cb#x")
    assert not redirect_matches("http://127.0.0.1/cb", "http://u@127.0.0.1:2/cb")


def _key(**perms: object) -> KeyRecord:
    return KeyRecord(id="a" * 12, name="k", hash="$argon2id$x", permissions=Permissions.from_dict(perms))


def test_child_permissions_never_widen() -> None:
    p = child_permissions(_key(upstreams=["*"], tools={"tools": ["search", "read_*"]}), "tools", ("read_file",))
    assert p.upstreams == ("tools",) and p.tools == {"tools": ("read_file",)}
    assert p.resources == {"tools": ()} and p.prompts == {"tools": ()}  # the parent named tools only
    p = child_permissions(_key(upstreams=["tools"], methods=["POST"]), "tools", ())
    assert p.methods == ("POST",) and p.tools == {} and not p.admin
    p = child_permissions(_key(upstreams=["tools"], admin=True), "tools", ("search",))
    assert not p.admin and p.tools == {"tools": ("search",)} and p.resources == {"tools": ("*",)}
    for tools in (("write",), ("*",), ("read*",)):
        with pytest.raises(GrantError):
            child_permissions(_key(upstreams=["*"], tools={"tools": ["search", "read_*"]}), "tools", tools)
    with pytest.raises(GrantError):
        child_permissions(_key(upstreams=["other"]), "tools", ())


def test_grant_fields_survive_every_serialisation() -> None:
    rec = _key(upstreams=["tools"]).with_changes(parent_id="b" * 12, grant={"client_id": "c", "tools": ["x"]})
    assert KeyRecord.from_stored(rec.to_stored()) == rec
    back = KeyRecord.from_dict(rec.to_dict())
    assert back.parent_id == rec.parent_id and dict(back.grant) == dict(rec.grant)
    import yaml

    from sidecar.auth.verify import password_hasher

    entry = {**rec.to_dict(), "hash": password_hasher("cheapest").hash("secret")}
    (parsed,) = parse_keys_file(yaml.safe_dump({"keys": [entry]})).values()
    assert parsed.parent_id == "b" * 12 and parsed.grant["client_id"] == "c"
    plain = _key()
    assert "parent_id" not in plain.to_stored() and "grant" not in plain.to_dict()

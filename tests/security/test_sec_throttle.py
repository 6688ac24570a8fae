"""Failed keys are throttled without locking out keys that verify; argon2 is queued fairly
(issue 14.10, invariant 6).

What broke: 30 bad keys from one IP locked out *valid* keys from it (a whole NAT) for 60 s;
behind ``trusted_proxies`` a rotating ``X-Forwarded-For`` (even ``garbage-1``) evaded the
throttle; 30 attackers sending wrong secrets for one key id delayed a new key's first use
by 4 s (argon2 was first come, first served).
"""

from __future__ import annotations

import asyncio
import ipaddress
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import make_mocked_request
from conftest import ADMIN_TOKEN, PLEX_TOKEN, MakeSidecar, Running, base_config, log_lines

from sidecar.auth.keys import ID_LEN, display_form, generate_key
from sidecar.auth.models import KeyRecord
from sidecar.auth.verify import ARGON2_CONCURRENCY, Verifier, password_hasher
from sidecar.config import KeysConfig
from sidecar.demo import plex_like_app
from sidecar.http.pipeline import client_ip
from sidecar.store import SqliteStore

CHEAP = password_hasher("cheapest")


def new_record() -> tuple[KeyRecord, str]:
    key, parts = generate_key("pmcp_")
    return KeyRecord(
        id=parts.key_id, name="t", hash=CHEAP.hash(parts.secret), display=display_form("pmcp_", parts.key_id, key)
    ), key


def wrong_secret(key: str) -> str:
    return generate_key("pmcp_", key[5 : 5 + ID_LEN])[0]


async def sidecar(make_sidecar: MakeSidecar, aiohttp_server: Any, tmp_path: Path, **overrides: Any) -> Running:
    up = await aiohttp_server(plex_like_app(PLEX_TOKEN))
    return await make_sidecar(base_config(str(up.make_url("")).rstrip("/"), tmp_path, **overrides))


async def status(running: Running, key: str, **headers: str) -> tuple[int, str]:
    resp = await running.proxy.get("/identity", headers={"X-Plex-Token": key, **headers})
    body = await resp.json() if resp.content_type == "application/json" else {}
    return resp.status, body.get("error", {}).get("code", "ok") if resp.status >= 400 else "ok"


# ---------------------------------------------------------------------------- a NAT is not locked out


async def test_bad_keys_from_an_address_do_not_lock_out_keys_that_verify(
    make_sidecar: MakeSidecar, aiohttp_server: Any, tmp_path: Path
) -> None:
    running = await sidecar(make_sidecar, aiohttp_server, tmp_path)
    _, used_before = await running.create_key(name="verified earlier")
    assert await status(running, used_before) == (200, "ok")
    _, target_key = await running.create_key(name="attacked")
    _, fresh = await running.create_key(name="first use after the attack")
    bad = [generate_key("pmcp_")[0][:-1] + "0" for _ in range(10)]  # malformed (checksum)
    bad += [generate_key("pmcp_")[0] for _ in range(10)]  # unknown ids
    bad += [wrong_secret(target_key) for _ in range(10)]  # wrong secrets for a real id
    for key in bad:
        assert (await status(running, key))[0] == 401
    # The address is throttled now: another failure is a 429 ...
    assert await status(running, generate_key("pmcp_")[0]) == (429, "too_many_failed_attempts")
    # ... but everyone else behind it still gets in: a key that verified before, and a new one.
    assert await status(running, used_before) == (200, "ok"), "a verified key is never refused for others' failures"
    assert await status(running, fresh) == (200, "ok"), "a new key from a throttled address is still checked"
    # Guessing on at the attacked id costs no more argon2: that lane stays closed for the window.
    runs = running.sc.verifier.argon2_runs
    assert await status(running, wrong_secret(target_key)) == (429, "too_many_failed_attempts")
    assert running.sc.verifier.argon2_runs == runs


async def test_guessing_the_admin_token_is_throttled_like_a_forged_key(
    make_sidecar: MakeSidecar, aiohttp_server: Any, tmp_path: Path
) -> None:
    """The admin API's bearer check: every wrong admin token counts as a failed key from the address,
    so a guesser meets 429 after the same handful of tries, whatever form the guess takes; the real
    admin token still gets in from that address (it is checked first, no lockout of an operator)."""
    running = await sidecar(make_sidecar, aiohttp_server, tmp_path)
    guesses = ["admin-token-for-test", "x" * 64, "", "pmcp_" + "A" * 40, generate_key("pmcp_")[0]]
    seen: list[tuple[int, str]] = []
    for i in range(40):
        guess = guesses[i % len(guesses)] + (str(i) if i >= len(guesses) else "")
        resp = await running.admin.get("/admin/keys", headers={"Authorization": f"Bearer {guess}"})
        body = await resp.json()
        seen.append((resp.status, body["error"]["code"]))
        assert "admin-token-for-tests" not in await resp.text()
    allowed = running.config.keys.failed_attempts_per_minute
    # "Bearer " with nothing after it is a malformed header (400, not a guess); every other try is a 401 ...
    assert seen[2] == (400, "bad_request") and {s for s, _ in seen[: allowed + 1]} == {400, 401}, seen
    # ... until the address has used up its failures: then 429, for every further guess.
    assert seen[allowed + 1 :] == [(429, "too_many_failed_attempts")] * (40 - allowed - 1), seen
    ok = await running.admin.get("/admin/keys", headers=running.admin_headers())
    assert ok.status == 200, "the real admin token is never locked out by others' guesses"


async def test_behind_a_trusted_ingress_admin_token_guesses_count_against_the_guesser(
    make_sidecar: MakeSidecar, aiohttp_server: Any, tmp_path: Path
) -> None:
    """Every client of the admin API arrives from the ingress's address: the failures are counted
    against the client the ingress names, so a guesser is throttled and nobody else is."""
    running = await sidecar(
        make_sidecar, aiohttp_server, tmp_path, server={"trusted_proxies": ["127.0.0.1"]},
        keys={"argon2": "cheapest", "failed_attempts_per_minute": 3},
    )  # fmt: skip

    async def guess(client: str, token: str) -> int:
        headers = {"Authorization": f"Bearer {token}", "X-Forwarded-For": client}
        return (await running.admin.get("/admin/keys", headers=headers)).status

    assert [await guess("203.0.113.9", f"guess-{i}") for i in range(5)] == [401, 401, 401, 429, 429]
    assert await guess("198.51.100.7", "another-guess") == 401, "another client is not throttled"
    assert await guess("203.0.113.9", ADMIN_TOKEN) == 200, "the real token from the guesser's address too"


# ---------------------------------------------------------------------------- X-Forwarded-For


def request_from(peer: str, xff: str | None) -> Any:
    headers = {"X-Forwarded-For": xff} if xff is not None else {}
    req = make_mocked_request("GET", "/", headers=headers)
    req._transport_peername = (peer, 1234)  # what the socket says
    return req


TRUSTED = (ipaddress.ip_network("10.0.0.0/8"),)


@pytest.mark.parametrize(
    ("peer", "xff", "expected"),
    [
        ("10.0.0.1", None, "10.0.0.1"),
        ("10.0.0.1", "203.0.113.7", "203.0.113.7"),
        ("10.0.0.1", "garbage-1", "10.0.0.1"),  # not an address: the trusted hop is the client
        ("10.0.0.1", "203.0.113.7, garbage-1", "10.0.0.1"),
        ("10.0.0.1", "garbage-1, 10.0.0.2", "10.0.0.2"),
        ("10.0.0.1", "203.0.113.7:4444", "10.0.0.1"),
        ("10.0.0.1", "[2001:db8::1]", "10.0.0.1"),
        ("10.0.0.1", "2001:db8:0::1", "2001:db8::1"),  # canonical: one address, one spelling
        ("10.0.0.1", "", "10.0.0.1"),
        ("10.0.0.1", " , ", "10.0.0.1"),
        ("198.51.100.1", "garbage-1", "198.51.100.1"),  # untrusted peer: its header is ignored
    ],
)
def test_client_ip_never_takes_a_non_address(peer: str, xff: str | None, expected: str) -> None:
    assert client_ip(request_from(peer, xff), TRUSTED) == expected


async def test_rotating_forwarded_for_junk_does_not_evade_the_throttle(
    make_sidecar: MakeSidecar, aiohttp_server: Any, tmp_path: Path
) -> None:
    running = await sidecar(
        make_sidecar,
        aiohttp_server,
        tmp_path,
        server={"trusted_proxies": ["127.0.0.1/32"]},
        keys={"argon2": "cheapest", "failed_attempts_per_minute": 5},
    )
    codes = []
    for i in range(8):
        code = await status(running, generate_key("pmcp_")[0], **{"X-Forwarded-For": f"garbage-{i}"})
        codes.append(code[1])
    assert codes == ["invalid_key"] * 5 + ["too_many_failed_attempts"] * 3, codes
    lines = await log_lines(tmp_path / "access.log", want=8)
    assert {line["client_ip"] for line in lines} == {"127.0.0.1"}, "junk is never logged as the client's address"


# ---------------------------------------------------------------------------- fair argon2 queueing


@pytest.fixture
async def store(tmp_path: Path) -> Any:
    s = SqliteStore(tmp_path / "t.db")
    await s.open()
    yield s
    await s.close()


@pytest.mark.parametrize("same_address", [False, True])
async def test_a_flood_of_wrong_secrets_does_not_delay_a_new_keys_first_use(store: Any, same_address: bool) -> None:
    """30 attackers guess secrets of one key id at once; a new key arriving behind them is
    checked at the first free argon2 slot, not after the 30 (about one argon2 run of delay)."""
    target, target_key = new_record()
    newcomer, newcomer_key = new_record()
    await store.insert([target, newcomer])
    v = Verifier(store, KeysConfig(argon2_profile="cheapest", failed_attempts_per_minute=1000))
    await v.load()
    order: list[str] = []  # the secrets in the order argon2 ran them
    hasher = v.hasher

    class Recording:
        def verify(self, hashed: str, secret: str) -> bool:
            order.append(secret)
            return hasher.verify(hashed, secret)

    v.hasher = Recording()  # type: ignore[assignment]

    async def newcomer_arrives() -> None:
        ip = "192.0.2.1" if same_address else "198.51.100.77"
        assert (await v.verify(newcomer_key, ip)).id == newcomer.id

    attackers = [v.verify(wrong_secret(target_key), "192.0.2.1" if same_address else f"192.0.2.{i}") for i in range(30)]
    results = await asyncio.gather(*attackers, newcomer_arrives(), return_exceptions=True)
    assert [type(r).__name__ for r in results[:30]].count("InvalidKey") >= 1
    position = order.index(newcomer_key[5 + ID_LEN : 5 + ID_LEN + 48])
    assert position <= ARGON2_CONCURRENCY, (
        f"the new key's check ran after {position} others; only the ones already running may go first"
    )


async def test_ipv6_failures_count_per_64(store: Any) -> None:
    """One host owns a whole /64: rotating the low bits must not mint fresh budgets."""
    v = Verifier(store, KeysConfig(argon2_profile="cheapest", failed_attempts_per_minute=5))
    await v.load()
    codes = []
    for i in range(8):
        try:
            await v.verify(generate_key("pmcp_")[0], f"2001:db8:1:2::{i + 1:x}")
        except Exception as e:  # the contract's errors, compared by name
            codes.append(type(e).__name__)
    assert codes == ["InvalidKey"] * 5 + ["TooManyFailures"] * 3
    assert v.throttled("2001:db8:1:2:ffff::1", v.clock()) > 0
    assert v.throttled("2001:db8:1:3::1", v.clock()) == 0  # the next /64 is someone else


async def test_a_flood_from_one_address_costs_constant_memory(store: Any) -> None:
    """20 000 wrong keys from one address: the client sees 429 after the first 5, and the sidecar
    keeps only the newest 5 failure times for it, not one per request (rate × window before)."""
    v = Verifier(store, KeysConfig(argon2_profile="cheapest", failed_attempts_per_minute=5))
    await v.load()
    codes: dict[str, int] = {}
    for _ in range(20_000):
        try:
            await v.verify("pmcp_" + "0" * 10, "192.0.2.7")  # malformed: refused before any store work
        except Exception as e:
            codes[type(e).__name__] = codes.get(type(e).__name__, 0) + 1
    assert codes == {"InvalidKey": 5, "TooManyFailures": 19_995}
    assert max(len(q) for q in v._failures.values()) == 5
    assert v.throttled("192.0.2.7", v.steady()) > 0

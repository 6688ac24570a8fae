"""sidecar/config/models.py: typed sections report problems with their YAML paths, like the reader."""

from __future__ import annotations

from sidecar.config.models import Duration, LimitValue, Section, Size, validate_section


class _Client(Section):
    id: str
    redirect_uris: tuple[str, ...] = ()


class _Demo(Section):
    enabled: bool = False
    ttl: Duration = 3600.0
    size: Size = 10
    rate: LimitValue | None = None
    clients: tuple[_Client, ...] = ()


def test_a_valid_section_is_frozen_and_typed() -> None:
    problems: list[str] = []
    got = validate_section(
        _Demo, {"enabled": True, "ttl": "1h", "rate": "10/minute", "clients": [{"id": "${X}"}]}, "demo", problems,
        {"X": "abc"},
    )  # fmt: skip
    assert problems == []
    assert got is not None and got.ttl == 3600.0 and got.rate is not None and got.rate.period == 60
    assert got.clients == (_Client(id="abc"),)


def test_every_problem_is_named_by_its_path() -> None:
    problems: list[str] = []
    raw = {"enabled": "yes", "ttl": "1x", "size": "big", "rate": "10/fortnight", "clients": [{"idd": 1}], "zz": 1}
    assert validate_section(_Demo, raw, "upstreams[0].demo", problems, {}) is None
    assert problems == [
        "upstreams[0].demo.enabled: expected true or false, got 'yes'",
        "upstreams[0].demo.ttl: '1x' is not a duration such as 30s, 5m, 1h, 90d",
        "upstreams[0].demo.size: 'big' is not a size such as 512KiB, 64MiB, 1GiB",
        "upstreams[0].demo.rate: '10/fortnight' is not a limit such as 10/second, 600/minute, 10000/day",
        "upstreams[0].demo.clients[0].id: required",
        "upstreams[0].demo.clients[0].idd: unknown option (expected one of: id, redirect_uris)",
        "upstreams[0].demo.zz: unknown option (expected one of: clients, enabled, rate, size, ttl)",
    ]


def test_a_missing_variable_is_named_never_valued() -> None:
    problems: list[str] = []
    assert validate_section(_Demo, {"clients": [{"id": "${NOPE}"}]}, "demo", problems, {}) is not None
    assert problems == ["demo.clients[0].id: environment variable NOPE is not set"]

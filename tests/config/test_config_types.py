"""The value types and conventions of the config models (sidecar/config/models.py, file.py),
as an operator meets them in a file: what null, "", one item and relative paths mean."""

from __future__ import annotations

from pathlib import Path

from test_config import ENV, good, problems_of

from sidecar.config import parse_config
from sidecar.config.models import EnvName, RelPath, Section, validate_section


def test_null_and_empty_mean_the_default(tmp_path: Path) -> None:
    cfg = {**good(), "listen": "", "log": {"access": "", "level": None}, "keys": {"max_lifetime": None}}
    cfg["upstreams"][0].update(plex={"product": ""}, quota=None, path_prefix="")
    parsed = parse_config(cfg, env=ENV, base=tmp_path)
    assert parsed.listen == "0.0.0.0:8080" and parsed.log.access == "stdout" and parsed.log.level == "info"
    assert parsed.keys.max_lifetime is None
    up = parsed.upstreams[0]
    assert up.plex_product == "Sidecar" and up.quota is None and up.path_prefix == "/"


def test_a_list_option_takes_one_item() -> None:
    cfg = {**good(), "rate_limits": {"default": "10/second"}, "cors": {"origins": "https://a.example"},
           "server": {"trusted_proxies": "10.0.0.0/8"}}  # fmt: skip
    parsed = parse_config(cfg, env=ENV)
    assert [lim.text for lim in parsed.rate_limits.default] == ["10/second"]
    assert parsed.cors.origins == ("https://a.example",) and parsed.server.trusted_proxies == ("10.0.0.0/8",)


def test_relative_paths_are_relative_to_the_config_folder(tmp_path: Path) -> None:
    (tmp_path / "ca.pem").write_text("x")
    cfg = {**good(), "store": {"kind": "yaml", "path": "keys.yaml"}}
    cfg["upstreams"][0]["tls"] = {"ca_file": "ca.pem"}
    parsed = parse_config(cfg, env=ENV, base=tmp_path)
    assert parsed.store.path == tmp_path / "keys.yaml" and parsed.store.state_path == tmp_path / "sidecar-state.db"
    assert parsed.upstreams[0].tls_ca_file == tmp_path / "ca.pem"
    assert problems_of(cfg, base=tmp_path / "elsewhere") == [
        f"upstreams[0].tls.ca_file: no such file: {tmp_path / 'elsewhere' / 'ca.pem'}"
    ]


def test_unknown_options_come_first_within_their_mapping() -> None:
    cfg = good()
    cfg["upstreams"][0].update(url="ftp://x", colour="red", token_env="NOPE")
    problems = problems_of(cfg)
    assert [p.split(":")[0] for p in problems] == ["upstreams[0].colour", "upstreams[0].url", "upstreams[0].token_env"]


def test_a_yaml_list_is_called_a_list() -> None:
    assert problems_of({**good(), "admin": ["x"]}) == ["admin: expected a mapping, got list"]


class _Secrets(Section):
    token_env: EnvName
    file: RelPath = Path("default")


def test_section_types_read_the_environment_and_the_folder_from_the_context() -> None:
    problems: list[str] = []
    assert validate_section(_Secrets, {"token_env": "SET", "file": "x"}, "s", problems, {"SET": "v"}) is not None
    assert validate_section(_Secrets, {"token_env": "UNSET"}, "s", problems, {}) is None
    assert problems == ["s.token_env: environment variable UNSET is not set"]


def test_an_unknown_option_is_refused_without_reading_it() -> None:
    """Found by tests/security/test_sec_fuzz.py: ``'': ${NOPE}`` gave a problem with no path."""
    problems = problems_of({**good(), "": "${NOPE}", "colour": "${NOPE}"}, env={"PLEX_TOKEN": "t"})
    assert [p.split(": ", 1)[0] for p in problems] == ["''", "colour"]
    assert not any("NOPE" in p for p in problems)

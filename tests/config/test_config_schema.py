"""config.schema.json: generated from the config models, committed for editors, and it agrees with the parser.

The committed file must equal what the models generate now; the documented example and
DESIGN.md's minimal file validate against it (with the ``jsonschema`` library, as an editor
would), and files the parser refuses for their shape are refused by the schema too.
"""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import jsonschema
import pytest
import yaml
from test_config import DESIGN_MINIMAL, EXAMPLE, ROOT, good

from sidecar.config.json_schema import SCHEMA_FILE, config_json_schema, config_json_schema_text


def _validator() -> jsonschema.Draft202012Validator:
    schema = config_json_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def test_the_committed_schema_is_the_generated_one() -> None:
    assert SCHEMA_FILE.read_text(encoding="utf-8") == config_json_schema_text(), (
        "sidecar/config/config.schema.json is stale: regenerate it with "
        "`python -m sidecar config schema > sidecar/config/config.schema.json`"
    )
    assert json.loads(SCHEMA_FILE.read_text())["$schema"].endswith("/draft/2020-12/schema")


def test_the_example_points_editors_at_the_schema() -> None:
    first = EXAMPLE.read_text().splitlines()[0]
    assert first.startswith("# yaml-language-server: $schema=")
    target = first.split("$schema=", 1)[1].strip()
    assert (ROOT / target).resolve() == SCHEMA_FILE.resolve()


def test_the_example_and_the_design_minimal_file_are_valid() -> None:
    v = _validator()
    for text in (EXAMPLE.read_text(), DESIGN_MINIMAL):
        errors = [f"{list(e.absolute_path)}: {e.message}" for e in v.iter_errors(yaml.safe_load(text))]
        assert not errors, errors


@pytest.mark.parametrize(
    ("change", "where"),
    [
        ({"colour": "blue"}, []),  # unknown top-level option
        ({"upstreams": []}, ["upstreams"]),  # at least one
        ({"listen": 8080}, ["listen"]),
        ({"credentials": {"basic": "no"}}, ["credentials", "basic"]),
        ({"store": {"kind": "postgresql"}}, ["store", "kind"]),
        ({"rate_limits": {"default": [{"per": "second"}]}}, ["rate_limits", "default"]),
        ({"cache": {"rules": [{"upstream": "plex", "path": "/*"}]}}, ["cache", "rules", 0]),  # no ttl
        ({"upstreams": [{"id": "plex", "url": "http://p", "timeouts": {"idle": "5s"}}]}, ["upstreams", 0, "timeouts"]),
        ({"server": {"shutdown_grace": "soon"}}, ["server", "shutdown_grace"]),
        ({"upstreams": [{"id": "Plex Server", "url": "http://p"}]}, ["upstreams", 0, "id"]),
    ],
)
def test_a_wrong_file_is_refused_by_the_schema(change: dict[str, Any], where: list[Any]) -> None:
    errors = list(_validator().iter_errors({**good(), **change}))
    assert errors, f"the schema accepted {change}"
    assert any(list(e.absolute_path)[: len(where)] == where for e in errors), [e.message for e in errors]


def test_sidecar_config_schema_prints_it() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "sidecar", "config", "schema"], capture_output=True, text=True, cwd=ROOT, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == config_json_schema_text()

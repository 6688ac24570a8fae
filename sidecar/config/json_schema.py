"""The config file's JSON Schema, generated from its models (``file.ConfigFile``).

Shipped as ``config.schema.json`` beside this module (a test keeps the committed file equal to
the generated one) so editors can point at it (``# yaml-language-server: $schema=…``), printed
by ``sidecar config schema`` and served at ``GET /admin/config.schema.json``. It describes the
file as written, before ``${VAR}`` expansion, and holds no secrets (names of variables only).
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

from .file import ConfigFile

SCHEMA_FILE = Path(__file__).with_name("config.schema.json")


@cache
def config_json_schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of the config file."""
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", **ConfigFile.model_json_schema()}


def config_json_schema_text() -> str:
    """The schema as the committed file holds it (two-space indent, a final newline)."""
    return json.dumps(config_json_schema(), indent=2, ensure_ascii=False) + "\n"

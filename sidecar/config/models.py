"""Typed config sections as pydantic v2 models, with the reader's path-named error messages.

A section is a frozen model that forbids unknown options. Its value types reuse the
parsers of ``units`` (so ``"30s"``, ``"64MiB"``, ``"600/minute"`` mean what they mean
everywhere) and declare what the JSON Schema should say about them. ``validate_section``
turns pydantic's errors into the lines operators already know: ``oauth.clients[0].id: …``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Annotated, Any, TypeVar

from pydantic import BaseModel, BeforeValidator, ConfigDict, ValidationError, WithJsonSchema, model_validator

from .units import Limit, parse_duration, parse_limit, parse_positive_duration, parse_size

_ENV_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")

_DURATION_SCHEMA = {
    "anyOf": [
        {"type": "number", "minimum": 0},
        {"type": "string", "pattern": r"^\s*\d+(\.\d+)?\s*(ms|s|m|h|d|w)?\s*$"},
    ],
    "description": "a duration: 250ms, 30s, 5m, 1h, 90d, 2w or a number of seconds",
}
_SIZE_SCHEMA = {
    "anyOf": [{"type": "integer", "minimum": 0}, {"type": "string"}],
    "description": "a size: 512KiB, 64MiB, 1GB or a number of bytes",
}
_LIMIT_SCHEMA = {"type": "string", "description": "a limit: 10/second, 600/minute, 5/10minutes, 10000/month"}

Duration = Annotated[float, BeforeValidator(parse_duration), WithJsonSchema(_DURATION_SCHEMA)]
PositiveDuration = Annotated[float, BeforeValidator(parse_positive_duration), WithJsonSchema(_DURATION_SCHEMA)]
Size = Annotated[int, BeforeValidator(parse_size), WithJsonSchema(_SIZE_SCHEMA)]
LimitValue = Annotated[Limit, BeforeValidator(parse_limit), WithJsonSchema(_LIMIT_SCHEMA)]


class Section(BaseModel):
    """Base of every config section: frozen (read on the hot path), unknown options refused."""

    # strict: YAML's "yes" is not true and "30" is not 30, as in the rest of the file.
    model_config = ConfigDict(frozen=True, extra="forbid", strict=True, arbitrary_types_allowed=True)

    @model_validator(mode="before")
    @classmethod
    def _lists_as_tuples(cls, data: Any) -> Any:
        """YAML lists become the tuples the frozen fields declare (strict mode takes no list for a tuple)."""
        if isinstance(data, dict):
            return {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
        return data


S = TypeVar("S", bound=Section)


def _loc(path: str, loc: tuple[int | str, ...]) -> str:
    out = path
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out = f"{out}.{part}" if out else str(part)
    return out


def _message(err: Any, model: type[BaseModel], loc: tuple[int | str, ...]) -> str:
    kind = err["type"]
    if kind == "value_error" and "error" in err.get("ctx", {}):
        return str(err["ctx"]["error"])
    if kind == "extra_forbidden":
        owner = _model_at(model, loc[:-1])
        allowed = ", ".join(sorted(owner.model_fields)) if owner else ""
        return f"unknown option (expected one of: {allowed})" if allowed else "unknown option"
    if kind == "missing":
        return "required"
    if kind in ("bool_type", "bool_parsing"):
        return f"expected true or false, got {err['input']!r}"
    if kind in ("int_type", "int_parsing"):
        return f"expected a whole number, got {err['input']!r}"
    if kind in ("string_type",):
        return f"expected a string, got {type(err['input']).__name__}"
    return str(err["msg"][0].lower() + err["msg"][1:]) if err["msg"] else kind


def _model_at(model: type[BaseModel], loc: tuple[int | str, ...]) -> type[BaseModel] | None:
    """The model class that owns ``loc`` (for the list of options it knows)."""
    current: Any = model
    for part in loc:
        if isinstance(part, int):
            continue
        field = current.model_fields.get(part) if isinstance(current, type) and issubclass(current, BaseModel) else None
        if field is None:
            return None
        current = _inner_model(field.annotation)
        if current is None:
            return None
    return current if isinstance(current, type) and issubclass(current, BaseModel) else None


def _inner_model(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        found = _inner_model(arg)
        if found is not None:
            return found
    return None


def expand_env(value: Any, env: Mapping[str, str], path: str, problems: list[str]) -> Any:
    """``${NAME}`` in every string of ``value``, a missing variable named (never a value) in ``problems``."""
    if isinstance(value, str):

        def sub(m: re.Match[str]) -> str:
            name = m.group(1)
            if name not in env:
                problems.append(f"{path}: environment variable {name} is not set")
                return ""
            return env[name]

        return _ENV_RE.sub(sub, value)
    if isinstance(value, dict):
        return {k: expand_env(v, env, _loc(path, (str(k),)), problems) for k, v in value.items()}
    if isinstance(value, list):
        return [expand_env(v, env, _loc(path, (i,)), problems) for i, v in enumerate(value)]
    return value


def validate_section(
    model: type[S], raw: object, path: str, problems: list[str], env: Mapping[str, str] | None = None
) -> S | None:
    """``raw`` validated as ``model``; None (and the problems, path-named, appended) when it is not."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        problems.append(f"{path}: expected a mapping, got {type(raw).__name__}")
        return None
    if env is not None:
        raw = expand_env(raw, env, path, problems)
    try:
        return model.model_validate(raw)
    except ValidationError as e:
        for err in e.errors():
            loc = tuple(err["loc"])
            problems.append(f"{_loc(path, loc)}: {_message(err, model, loc)}")
        return None

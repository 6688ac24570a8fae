"""Typed config sections as pydantic v2 models, with the reader's path-named error messages.

A section is a frozen model that forbids unknown options. Its value types reuse the
parsers of ``units`` (so ``"30s"``, ``"64MiB"``, ``"600/minute"`` mean what they mean
everywhere) and declare what the JSON Schema should say about them. ``validate_section``
turns pydantic's errors into the lines operators already know: ``oauth.clients[0].id: …``.

Values that need the file's surroundings read them from the validation context: ``env``
(``EnvName``: the variable must be set) and ``base`` (``RelPath``: relative to the file's folder).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar, get_args, get_origin

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    ValidationError,
    ValidationInfo,
    WithJsonSchema,
    model_validator,
)
from pydantic.fields import FieldInfo
from pydantic_core import PydanticCustomError, PydanticUseDefault

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

DURATION_SCHEMA = WithJsonSchema(_DURATION_SCHEMA)
SIZE_SCHEMA = WithJsonSchema(_SIZE_SCHEMA)
Duration = Annotated[float, BeforeValidator(parse_duration), DURATION_SCHEMA]
PositiveDuration = Annotated[float, BeforeValidator(parse_positive_duration), DURATION_SCHEMA]
Size = Annotated[int, BeforeValidator(parse_size), SIZE_SCHEMA]
LimitValue = Annotated[Limit, BeforeValidator(parse_limit), WithJsonSchema(_LIMIT_SCHEMA)]


def _text(value: object) -> str:
    """A string; a YAML number stands for its text (``version: 1.0``, ``listen: 8080``)."""
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise ValueError(f"expected a string, got {type(value).__name__}")
    return str(value)


def _item(value: object) -> str:
    """An item of a list of names, globs or addresses: text (a YAML whole number stands for its digits)."""
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise ValueError("expected a string")
    return str(value)


def _blank_is_default(value: object) -> object:
    if value == "":
        raise PydanticUseDefault()
    return value


def _one_or_many(value: object) -> object:
    """A list option given one item (``default: 100/second``) is a list of one."""
    return (value,) if isinstance(value, str) else tuple(value) if isinstance(value, list) else value


def _count(value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"expected a whole number >= 1, got {value!r}")
    return value


def _env_is_set(name: str, info: ValidationInfo) -> str:
    env = (info.context or {}).get("env")
    if env is not None and name not in env:
        raise ValueError(f"environment variable {name} is not set")
    return name


def _path(value: object, info: ValidationInfo) -> Path:
    text = _text(value)
    try:
        p = Path(text).expanduser()
    except RuntimeError:  # ~user that does not exist, or no home directory
        raise ValueError(f"cannot expand {text!r}: no such home directory") from None
    return p if p.is_absolute() else Path((info.context or {}).get("base") or Path.cwd()) / p


def _is_file(p: Path) -> Path:
    if not p.is_file():
        raise ValueError(f"no such file: {p}")
    return p


Text = Annotated[str, BeforeValidator(_text)]
Item = Annotated[str, BeforeValidator(_item)]
BLANK_IS_DEFAULT = BeforeValidator(_blank_is_default)
"""Metadata: an empty string (``listen: ""``) means the option's default."""
ONE_OR_MANY = BeforeValidator(_one_or_many, json_schema_input_type=str | list[str])
"""Metadata for a list option that may be given as one item."""
TextList = Annotated[tuple[Item, ...], ONE_OR_MANY]
LimitList = Annotated[tuple[LimitValue, ...], ONE_OR_MANY]
Count = Annotated[int, BeforeValidator(_count), WithJsonSchema({"type": "integer", "minimum": 1})]
EnvName = Annotated[Text, AfterValidator(_env_is_set)]
"""The name of an environment variable that must be set (the value is read where it is used)."""
RelPath = Annotated[Path, BeforeValidator(_path), WithJsonSchema({"type": "string", "format": "path"})]
"""A path; a relative one is relative to the config file's folder, ``~`` is the home directory."""
ExistingFile = Annotated[RelPath, AfterValidator(_is_file)]


@dataclass(frozen=True)
class Wording:
    """Field metadata: this field's own message for some pydantic error types (``{input}``, ``{type}``: its type)."""

    messages: Mapping[str, str]


def problem_at(field: str, message: str) -> PydanticCustomError:
    """What a model validator raises about one of its fields, so the path names that field."""
    return PydanticCustomError("field_problem", "{message}", {"field": field, "message": message})


class Section(BaseModel):
    """Base of every config section: frozen (read on the hot path), unknown options refused."""

    # strict: YAML's "yes" is not true and "30" is not 30, as in the rest of the file.
    model_config = ConfigDict(
        frozen=True, extra="forbid", strict=True, arbitrary_types_allowed=True, use_attribute_docstrings=True
    )

    @model_validator(mode="before")
    @classmethod
    def _lists_as_tuples(cls, data: Any) -> Any:
        """YAML lists become the tuples the frozen fields declare (strict mode takes no list for a tuple);
        an option set to null (``quota:``) means its default, as everywhere in the file."""
        if isinstance(data, dict):
            fields = cls.model_fields
            return {
                k: tuple(v) if isinstance(v, list) and k in fields and _takes_tuple(fields[k].annotation) else v
                for k, v in data.items()
                if v is not None
            }
        return data


def _takes_tuple(annotation: Any) -> bool:
    """Does a field's type hold a tuple (``tuple[X, ...]``, ``tuple[X, ...] | None``)?"""
    return get_origin(annotation) is tuple or any(_takes_tuple(a) for a in get_args(annotation))


S = TypeVar("S", bound=Section)


def _loc(path: str, loc: tuple[int | str, ...]) -> str:
    out = path
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part != "[key]":  # a dict key's own error: the path already names the key
            out = f"{out}.{part}" if out else str(part)
    return out


def _message(err: Any, model: type[BaseModel], loc: tuple[int | str, ...]) -> str:
    kind = err["type"]
    field = _field_at(model, loc)
    wording = next((m for m in (field.metadata if field else ()) if isinstance(m, Wording)), None)
    if wording and kind in wording.messages:
        return wording.messages[kind].format(type=_type_name(err["input"]), input=err["input"])
    if kind == "value_error" and "error" in err.get("ctx", {}):
        return str(err["ctx"]["error"])
    if kind == "field_problem":
        return str(err["ctx"]["message"])
    if kind == "extra_forbidden":
        owner = _model_at(model, loc[:-1])
        allowed = ", ".join(sorted(owner.model_fields)) if owner else ""
        return f"unknown option (expected one of: {allowed})" if allowed else "unknown option"
    if kind == "missing":
        return "required"
    if kind == "literal_error" and field is not None:
        options = _literal_options(field.annotation)
        return f"expected one of {', '.join(map(str, options))}, got {err['input']!r}"
    if kind in ("bool_type", "bool_parsing"):
        return f"expected true or false, got {err['input']!r}"
    if kind in ("int_type", "int_parsing"):
        return f"expected a whole number, got {err['input']!r}"
    if kind in ("string_type",):
        return f"expected a string, got {_type_name(err['input'])}"
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        return f"expected a mapping, got {_type_name(err['input'])}"
    if kind in ("tuple_type", "list_type"):
        return f"expected a list, got {_type_name(err['input'])}"
    return str(err["msg"][0].lower() + err["msg"][1:]) if err["msg"] else kind


def _type_name(value: object) -> str:
    return "list" if isinstance(value, tuple) else type(value).__name__  # a tuple here was a YAML list


def _literal_options(annotation: Any) -> tuple[Any, ...]:
    if get_origin(annotation) is Literal:
        return get_args(annotation)
    return next((o for a in get_args(annotation) if (o := _literal_options(a))), ())


def _field_at(model: type[BaseModel], loc: tuple[int | str, ...]) -> FieldInfo | None:
    """The innermost field on the way to ``loc`` (list indexes and dict keys belong to their field)."""
    current: Any = model
    found: FieldInfo | None = None
    for part in loc:
        if isinstance(part, int) or part == "[key]":
            continue
        fields = current.model_fields if isinstance(current, type) and issubclass(current, BaseModel) else {}
        if part not in fields:
            return found if current is None else None
        found = fields[part]
        current = _inner_model(found.annotation)
    return found


def _model_at(model: type[BaseModel], loc: tuple[int | str, ...]) -> type[BaseModel] | None:
    """The model class that owns ``loc`` (for the list of options it knows)."""
    if not loc:
        return model
    field = _field_at(model, loc)
    return _inner_model(field.annotation) if field is not None else None


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


def env_values(value: Any, env: Mapping[str, str]) -> set[str]:
    """What every ``${NAME}`` in ``value`` brings in: secrets live there, so errors never quote them."""
    if isinstance(value, str):
        return {env[n] for n in _ENV_RE.findall(value) if n in env}
    if isinstance(value, dict):
        return {v for item in value.values() for v in env_values(item, env)}
    if isinstance(value, list):
        return {v for item in value for v in env_values(item, env)}
    return set()


def _unknown_first(errors: list[Any]) -> list[Any]:
    """Each mapping's unknown options before its other problems (a typo explains what follows)."""
    out: list[Any] = []
    for err in errors:
        parent = err["loc"][:-1]
        if err["type"] != "extra_forbidden":
            out.append(err)
            continue
        at = next(
            (i for i, e in enumerate(out)
             if e["loc"][: len(parent)] == parent and not (e["type"] == "extra_forbidden" and e["loc"][:-1] == parent)),
            len(out),
        )  # fmt: skip
        out.insert(at, err)
    return out


def validate_model(
    model: type[S], raw: object, path: str, problems: list[str], context: Mapping[str, Any], *, unknown_first: bool
) -> S | None:
    """``raw`` (a mapping) validated as ``model`` with ``context``; None and path-named problems when it is not."""
    try:
        return model.model_validate(raw, context=dict(context))
    except ValidationError as e:
        errors = e.errors()
        for err in _unknown_first(errors) if unknown_first else errors:
            loc = tuple(err["loc"])
            if err["type"] == "field_problem":
                loc += (err["ctx"]["field"],)
            where = _loc(path, loc) or repr(loc[-1] if loc else "")
            problems.append(f"{where}: {_message(err, model, loc)}")
        return None


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
    return validate_model(model, raw, path, problems, {"env": env}, unknown_first=False)

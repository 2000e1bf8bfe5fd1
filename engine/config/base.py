"""The base of every settings class, and the one translation from pydantic's errors to ConfigError.

A settings class is a frozen pydantic model that refuses unknown keys. A field may live in a
sub-table of its class's table: its alias is the dotted path (``"black.dark_level"`` in
``[safety]``), and the class reads ``[safety.black]`` into it. ``validate_table`` is the only door
from a raw TOML table to a settings object: whatever breaks a rule leaves it as one
``ConfigError(key, value, rule)`` naming the dotted key, the value and the rule.
"""

from __future__ import annotations

import re
import types
import typing
from collections.abc import Mapping
from functools import cache
from typing import Annotated, Any, TypeVar

from pydantic import AfterValidator, BaseModel, ConfigDict, StrictStr, ValidationError, model_validator
from pydantic_core import ErrorDetails, PydanticCustomError

from engine.errors import ConfigError

FAMILIES = ("flux", "sdxl", "sd3", "hidream")  # the pipeline families a [models.<id>] table may name
HIDDEN = "(hidden)"  # what an error shows instead of a secret's value
RULE = "config_rule"  # the error type our own validators raise (see ``broken``)

M = TypeVar("M", bound="SettingsModel")


class SettingsModel(BaseModel):
    """Frozen, strict about keys, finite numbers only; dotted aliases read sub-tables."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _read_sub_tables(cls, raw: Any) -> Any:
        """``{"black": {"dark_level": 4}}`` -> ``{"black.dark_level": 4}``; an unknown key inside a
        sub-table stays dotted, so ``extra="forbid"`` names it in full."""
        tables = _sub_tables(cls)
        if not tables or not isinstance(raw, Mapping):
            return raw
        flat: dict[str, Any] = {}
        for key, value in raw.items():
            if key in tables and isinstance(value, Mapping):
                flat.update({f"{key}.{sub}": v for sub, v in value.items()})
            else:
                flat[key] = value
        return flat


def _non_blank(value: str) -> str:
    if not value.strip():
        raise broken("it must be a non-empty string")
    return value


Text = Annotated[StrictStr, AfterValidator(_non_blank)]  # a non-empty string


_INPUT: Any = object()  # broken()'s default value: the input the validator was given


def broken(rule: str, value: Any = _INPUT, *, at: str = "") -> PydanticCustomError:
    """What a validator raises when a rule needs code: ``rule`` is the sentence after "but";
    ``value`` (default: the input) and ``at`` (a key suffix such as ``"[2]"`` or ``".BOOTS"``)
    refine what the message names."""
    shown = {} if value is _INPUT else {"value": value}
    return PydanticCustomError(RULE, "{rule}", {"rule": rule, "at": at, **shown})


def validate_table(model: type[M], raw: Any, prefix: str, *, sources: Mapping[str, str] | None = None,
                   context: Mapping[str, Any] | None = None) -> M:
    """``raw`` (one TOML table) as a ``model``; ``prefix`` is its dotted place (``"scheduler."``).

    ``sources`` names the environment variable behind a field that came from one, so the error
    names the variable instead of the key.
    """
    if raw is not None and not isinstance(raw, Mapping):
        raise ConfigError(prefix.rstrip("."), raw, "it must be a table ([section])")
    try:
        return model.model_validate(raw or {}, context=dict(context or {}))
    except ValidationError as exc:
        raise config_error(model, exc.errors()[0], prefix, sources or {}) from None


# -- the one translation ---------------------------------------------------------------------


def config_error(model: type[BaseModel], error: ErrorDetails, prefix: str, sources: Mapping[str, str]) -> ConfigError:
    """One pydantic error as the project's ``ConfigError(key, value, rule)``."""
    loc = error["loc"]
    ctx: dict[str, Any] = dict(error.get("ctx") or {})
    value = ctx["value"] if error["type"] == RULE and "value" in ctx else error.get("input")
    owner, field = _owner_and_field(model, loc)
    if loc and isinstance(loc[0], str) and loc[0] in sources:
        key = sources[loc[0]] + _dotted(loc[1:]) + (ctx.get("at") or "")
    else:
        key = prefix + _dotted(loc) + (ctx.get("at") or "")
    key = re.sub(r"\.+", ".", key).strip(".")
    if field is not None and (field.json_schema_extra or {}).get("secret"):  # type: ignore[union-attr]
        value = HIDDEN
    if error["type"] == "missing":
        value = None
    return ConfigError(key, value, _rule(error, ctx, owner, field))


def _rule(error: ErrorDetails, ctx: dict[str, Any], owner: type[BaseModel] | None, field: Any) -> str:
    kind = error["type"]
    unit = (field.json_schema_extra or {}).get("unit", "") if field is not None else ""
    unit = f" {unit}" if unit else ""
    if kind == RULE:
        return str(ctx["rule"])
    if kind == "extra_forbidden":
        last = str(error["loc"][-1])
        if owner is not None and last in _sub_tables(owner):
            return "it must be a table ([section])"
        known = _known_keys(owner, last.rpartition(".")[0]) if owner is not None else []
        return f"it is not a known key here (known: {', '.join(known)})"
    if kind in ("greater_than_equal", "greater_than", "less_than_equal", "less_than"):
        low, high = _bounds(field)
        if low is not None and high is not None:
            return f"it must lie within {_num(low)}..{_num(high)}{unit}"
        if kind == "greater_than":
            return f"it must be more than {_num(ctx['gt'])}{unit}"
        if kind == "greater_than_equal":
            return f"it must be at least {_num(ctx['ge'])}{unit}"
        return f"it must be at most {_num(ctx.get('le', ctx.get('lt')))}{unit}"
    if kind == "literal_error":
        return f"it must be one of {str(ctx['expected']).replace(' or ', ', ')}"
    return _PLAIN.get(kind, str(error["msg"]).lower())


_PLAIN = {
    "missing": "this key is required",
    "int_type": "it must be a whole number",
    "float_type": "it must be a number",
    "finite_number": "it must be a finite number",
    "bool_type": "it must be true or false",
    "string_type": "it must be a string",
    "string_too_short": "it must be a non-empty string",
    "tuple_type": "it must be a list",
    "list_type": "it must be a list",
    "dict_type": "it must be a table",
    "path_type": "it must be a string (a folder)",
    "model_type": "it must be a table ([section])",
    "model_attributes_type": "it must be a table ([section])",
}


def _num(x: Any) -> str:
    return str(x) if isinstance(x, int) else f"{x:g}"


def _bounds(field: Any) -> tuple[Any, Any]:
    """The field's (low, high) from its ``Field(ge=/gt=, le=/lt=)``; None where it has none."""
    found: dict[str, Any] = {}
    for meta in getattr(field, "metadata", ()):
        for name in ("ge", "gt", "le", "lt"):
            if getattr(meta, name, None) is not None:
                found[name] = getattr(meta, name)
    return found.get("ge", found.get("gt")), found.get("le", found.get("lt"))


def _dotted(loc: tuple[int | str, ...]) -> str:
    return "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in loc)


@cache
def _sub_tables(model: type[BaseModel]) -> frozenset[str]:
    return frozenset(f.alias.split(".")[0] for f in model.model_fields.values() if f.alias and "." in f.alias)


def _known_keys(model: type[BaseModel], table: str) -> list[str]:
    names = [f.alias or name for name, f in model.model_fields.items() if not f.exclude]
    if table:
        return sorted(n[len(table) + 1:] for n in names if n.startswith(table + "."))
    return sorted({n.split(".")[0] for n in names})


def _owner_and_field(model: type[BaseModel], loc: tuple[int | str, ...]) -> tuple[type[BaseModel], Any]:
    """Walk ``loc`` through the model's fields: the model that holds the last key, and its field."""
    owner: type[BaseModel] = model
    field = None
    for i, part in enumerate(loc):
        last = i == len(loc) - 1
        match = [f for name, f in owner.model_fields.items() if part in (name, f.alias)]
        if not match:  # a list index or a dict key (a model id): the owner stays
            if last:
                return owner, None
            continue
        field = match[0]
        inner = _model_in(field.annotation)
        if last or inner is None:
            return owner, field
        owner = inner
    return owner, field


def _model_in(annotation: Any) -> type[BaseModel] | None:
    """The settings model inside ``annotation`` (``M``, ``dict[str, M]``, ``tuple[M, ...]``), if any."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is not None:
        for arg in typing.get_args(annotation):
            found = _model_in(arg)
            if found is not None:
                return found
    return None

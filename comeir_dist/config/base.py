"""Config base class and loader. Every bad value becomes one line naming the key and what is allowed."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Optional, TypeVar, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from comeir_dist.errors import UserError

T = TypeVar("T", bound="Section")

INT64_MAX = 2**63 - 1
# Seeds feed numpy's legacy RNG (np.random.seed), which takes 0 <= seed < 2**32.
Seed = Annotated[int, Field(ge=0, lt=2**32, description="RNG seed, 0 <= seed < 2**32.")]


def _too_big(value: Any) -> Optional[int]:
    """The first int (not bool) in ``value`` (or its list/dict items) outside int64, else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if not -INT64_MAX - 1 <= value <= INT64_MAX else None
    items = value.values() if isinstance(value, dict) else value if isinstance(value, (list, tuple)) else ()
    for v in items:
        bad = _too_big(v)
        if bad is not None:
            return bad
    return None


class Section(BaseModel):
    """Base for config sections: unknown keys are errors, values are validated on assignment, every float
    must be finite (no nan/inf) and every int must fit in int64."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=(), allow_inf_nan=False)

    @field_validator("*", mode="after")
    @classmethod
    def _int64(cls, value: Any) -> Any:
        if _too_big(value) is not None:
            raise ValueError(f"integer out of range; allowed: {-INT64_MAX - 1} .. {INT64_MAX} (int64)")
        return value


# ---- one-line messages ---------------------------------------------------------------------------
_TYPE_TAG = re.compile(r"^[a-z][a-z0-9_-]*\[.*\]$", re.S)  # union member labels pydantic puts into locations
_BOUND_ERRORS = {"finite_number", "float_type", "float_parsing", "int_type", "int_parsing", "int_parsing_size",
                 "int_from_float", "greater_than", "greater_than_equal", "less_than", "less_than_equal"}
_MAX_SHOWN = 120


def _one_line(text: str) -> str:
    return text.replace("\r", "\\r").replace("\n", "\\n")


def _key_parts(loc) -> list[str]:
    return [_one_line(str(p)) for p in loc if not (isinstance(p, str) and _TYPE_TAG.match(p))]


def _model_of(annotation: Any) -> Optional[type]:
    """The Section class inside ``annotation`` (``X``, ``Optional[X]``), if any."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if get_origin(annotation) is Union:
        for arg in get_args(annotation):
            m = _model_of(arg)
            if m is not None:
                return m
    return None


def _field_at(cls: Optional[type], loc) -> Any:
    """The FieldInfo a location points at exactly (a field of a nested section), else None."""
    info = None
    node = cls
    for part in loc:
        if node is None or not isinstance(part, str) or part not in node.model_fields:
            return None
        info = node.model_fields[part]
        node = _model_of(info.annotation)
    return info


def allowed_range(info: Any) -> str:
    """``> 0 and <= 1`` from a field's numeric constraints ('' when it has none)."""
    parts = []
    for m in getattr(info, "metadata", ()):
        for attr, op in (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<=")):
            v = getattr(m, attr, None)
            if v is not None:
                parts.append(f"{op} {v}")
    return " and ".join(parts)


def _shown(value: Any) -> str:
    if isinstance(value, dict):
        return ""
    text = _one_line(repr(value))
    return " = " + (text if len(text) <= _MAX_SHOWN else text[:_MAX_SHOWN] + "...")


def validation_message(err: ValidationError, source: str = "config", cls: Optional[type] = None) -> str:
    """Render one pydantic error as ``source: key 'a.b' = value: reason`` (always one line).

    The most specific error below the first one's key is shown (a union reports one error per member);
    ``cls`` (the validated Section) adds the field's allowed range to type errors."""
    errors = err.errors()
    e = errors[0]
    key_parts = _key_parts(e.get("loc", ()))
    for other in errors[1:]:
        parts = _key_parts(other.get("loc", ()))
        if len(parts) > len(key_parts) and parts[:len(key_parts)] == key_parts:
            e, key_parts = other, parts
    key = ".".join(key_parts)
    ctx = e.get("ctx") or {}
    kind = e.get("type")
    reason = _one_line(str(e.get("msg", "invalid")))
    if kind == "literal_error" and "expected" in ctx:
        reason = f"allowed values: {ctx['expected']}"
    elif kind == "extra_forbidden":
        return _one_line(f"{source}: unknown key '{key}'")
    elif kind == "value_error":
        reason = reason.removeprefix("Value error, ")
    elif kind == "assertion_error":
        reason = reason.removeprefix("Assertion failed, ")
    if kind in _BOUND_ERRORS:
        info = _field_at(cls, [p for p in e.get("loc", ()) if not (isinstance(p, str) and _TYPE_TAG.match(p))])
        bounds = allowed_range(info)
        is_int = kind.startswith("int") or (info is not None and int in (info.annotation, *get_args(info.annotation)))
        what = "an integer" if is_int else "a finite number"
        reason = f"{reason}; allowed: {what}" + (f" {bounds}" if bounds else "")
    if not key:
        return _one_line(f"{source}: {reason}")
    return _one_line(f"{source}: key '{key}'{_shown(e.get('input'))}: {reason}")


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping, with one-line errors for missing/unreadable files and bad syntax."""
    p = Path(path)
    try:
        if not p.is_file():
            raise UserError(f"{p}: config file not found")
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"{p}: not a UTF-8 text file (byte {exc.start}: {exc.reason})") from None
    except (OSError, ValueError) as exc:  # unreadable, or a path the OS rejects (embedded NUL)
        raise UserError(_one_line(f"{p}: cannot read the config file: {exc}")) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        problem = getattr(exc, "problem", None) or getattr(exc, "reason", None) or str(exc).splitlines()[0]
        raise UserError(_one_line(f"{p}: invalid YAML{where}: {problem}")) from None
    except RecursionError:
        raise UserError(f"{p}: invalid YAML: nested too deeply") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{p}: top level must be a mapping, got {type(data).__name__}")
    return data


def parse_section(cls: type[T], data: dict[str, Any], source: str = "config") -> T:
    """Validate ``data`` into ``cls``; raise UserError with a one-line message on failure."""
    try:
        return cls.model_validate(data)
    except ValidationError as err:
        raise UserError(validation_message(err, source, cls)) from None

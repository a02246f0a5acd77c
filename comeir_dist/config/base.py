"""Config base class and loader. Every bad value becomes one line naming the key and what is allowed."""
from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from comeir_dist.errors import UserError

T = TypeVar("T", bound="Section")


class Section(BaseModel):
    """Base for config sections: unknown keys are errors, values are validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


def validation_message(err: ValidationError, source: str = "config") -> str:
    """Render the first pydantic error as `source: key 'a.b' = value: reason`."""
    e = err.errors()[0]
    key = ".".join(str(p) for p in e.get("loc", ()))
    ctx = e.get("ctx") or {}
    reason = e.get("msg", "invalid")
    if e.get("type") == "literal_error" and "expected" in ctx:
        reason = f"allowed values: {ctx['expected']}"
    elif e.get("type") == "extra_forbidden":
        return f"{source}: unknown key '{key}'"
    value = e.get("input")
    shown = "" if isinstance(value, dict) else f" = {value!r}"
    return f"{source}: key '{key}'{shown}: {reason}"


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping, with one-line errors for missing files and bad syntax."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{p}: config file not found")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise UserError(f"{p}: invalid YAML{where}: {getattr(exc, 'problem', exc)}") from None
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
        raise UserError(validation_message(err, source)) from None

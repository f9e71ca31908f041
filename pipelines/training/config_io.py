"""YAML files mapped onto (nested) dataclasses, with unknown keys and wrong types as errors.

A typo in a config must fail on the driver before any worker starts, with the key's full
path in the message, not be silently ignored hours into a run.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


class UnknownKeys(ValueError):
    """Keys that no field of the (nested) section has; the message names their full path."""


def _check_scalar(value: Any, hint: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _check_scalar(value, option, where)
            except ValueError as exc:
                errors.append(str(exc))
        raise ValueError(errors[0] if len(errors) == 1 else f"{where}: {value!r} matches none of {hint}")
    if dataclasses.is_dataclass(hint):
        return from_mapping(hint, value, where)
    if origin in (dict, list) or hint in (dict, list, Any):
        expected = origin or hint
        if expected is not Any and not isinstance(value, expected):
            raise ValueError(f"{where}: expected a {expected.__name__}, got {value!r}")
        return value
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(hint, type) and (not isinstance(value, hint) or (hint is int and isinstance(value, bool))):
        raise ValueError(f"{where}: expected {hint.__name__}, got {value!r}")
    return value


def from_mapping(cls: type[T], data: Any, where: str = "config") -> T:
    """Build dataclass ``cls`` from ``data``; nested dataclass fields take nested mappings.

    A class may map its former key names to their new dotted paths in ``RENAMED_KEYS``; such a
    key is still unknown, and the error says where it moved."""
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        renamed = getattr(cls, "RENAMED_KEYS", {})
        moved = "".join(f"; {key} is now {renamed[key]}" for key in unknown if key in renamed)
        raise UnknownKeys(f"{where}: unknown key(s) {unknown}; valid keys: {sorted(fields)}{moved}")
    values = {name: _check_scalar(value, hints[name], f"{where}.{name}") for name, value in data.items()}
    missing = [
        name for name, f in fields.items()
        if name not in values and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ValueError(f"{where}: missing required key(s) {missing}")
    try:
        return cls(**values)
    except ValueError as exc:  # the same (named) error, with the section's path
        try:
            located = type(exc)(f"{where}: {exc}")
        except TypeError:
            located = ValueError(f"{where}: {exc}")
        raise located from exc


def set_dotted(data: dict[str, Any], dotted: str, raw: str) -> None:
    """Apply a ``--set section.key=value`` override (value parsed as YAML) to a raw mapping."""
    node = data
    *parents, leaf = dotted.split(".")
    for key in parents:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ValueError(f"--set {dotted}: {key} is not a section")
    node[leaf] = yaml.safe_load(raw)

"""Stage settings: plain dataclasses saved as config.json, checked before any work starts.

Every stage's config is a dataclass of plain typed fields (int, float, str, bool, lists of
them, Optional of them). `load_config` turns a JSON object into one and names the field on
any mistake: an unknown key, a wrong type, a value out of range (checked by the dataclass's
own `validate()` method, which raises `ConfigError(field, message)`).
"""
from __future__ import annotations

import dataclasses
import json
import os
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


class ConfigError(ValueError):
    """A bad setting; `field` names it so the app can mark the right form row."""

    def __init__(self, field: str, message: str, source: str | None = None):
        self.field = field
        self.message = message
        self.source = source
        where = f"{source}: " if source else ""
        super().__init__(f"{where}config field '{field}': {message}")


def _check_type(name: str, value: Any, tp: Any) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _check_type(name, value, a)
            except ConfigError as e:
                errors.append(e.message)
        raise ConfigError(name, errors[0] if errors else f"got {value!r}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(name, f"expected a list, got {type(value).__name__} {value!r}")
        inner = args[0] if args else Any
        return [_check_type(f"{name}[{i}]", v, inner) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(name, f"expected an object, got {type(value).__name__}")
        return dict(value)
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(name, f"expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(name, f"expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(name, f"expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(name, f"expected a string, got {value!r}")
        return value
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(name, f"expected an object, got {value!r}")
        return from_dict(tp, value, prefix=f"{name}.")
    raise ConfigError(name, f"unsupported field type {tp!r}")


def from_dict(cls: type[T], data: dict, prefix: str = "", source: str | None = None) -> T:
    """Build `cls` from a JSON object, checking names and types, then `validate()`."""
    if not isinstance(data, dict):
        raise ConfigError(prefix.rstrip(".") or "<root>", "expected a JSON object", source)
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    for key in data:
        if key not in names:
            raise ConfigError(prefix + key, f"unknown setting (known: {', '.join(sorted(names))})", source)
    for f in dataclasses.fields(cls):
        if (f.init and f.name not in data and f.default is dataclasses.MISSING
                and f.default_factory is dataclasses.MISSING):
            raise ConfigError(prefix + f.name, "is required", source)
    kwargs = {}
    try:
        for key, value in data.items():
            kwargs[key] = _check_type(prefix + key, value, hints[key])
        obj = cls(**kwargs)
        validate = getattr(obj, "validate", None)
        if validate is not None:
            validate()
    except ConfigError as e:
        if source and not e.source:
            raise ConfigError(e.field, e.message, source) from None
        raise
    return obj


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def load_config(cls: type[T], path: str | os.PathLike) -> T:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError("<file>", "config.json not found", str(path)) from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError("<file>", f"invalid JSON at line {e.lineno} column {e.colno}: {e.msg}",
                          str(path)) from None
    return from_dict(cls, data, source=str(path))


def save_config(cfg: Any, path: str | os.PathLike) -> None:
    from engine.fsutil import atomic_write_text
    atomic_write_text(Path(path), json.dumps(to_dict(cfg), indent=2) + "\n")


def resolve_path(run_dir: str | os.PathLike, p: str) -> Path:
    """Relative paths in a config are relative to the run folder, so a folder is self-contained."""
    path = Path(p).expanduser()
    return path if path.is_absolute() else Path(run_dir) / path


def require(cond: bool, field: str, message: str) -> None:
    """One-line range checks inside `validate()` methods."""
    if not cond:
        raise ConfigError(field, message)

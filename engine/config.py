"""Stage settings: plain dataclasses saved as config.json, checked before any work starts.

Every stage's config is a dataclass of plain typed fields (int, float, str, bool, lists of
them, Optional of them). `load_config` turns a JSON object into one and names the field on
any mistake: an unknown key, a wrong type, a value out of range (checked by the dataclass's
own `validate()` method, which raises `ConfigError(field, message)`); a float that is not
finite is refused for every field here.

A field's meaning is the comment that ends its line (`field_help`); `field_docs` adds its type
and default, for `python -m engine.<stage> --help`, `--write-config` and the app's forms.
"""
from __future__ import annotations

import ast
import dataclasses
import inspect
import io
import json
import math
import os
import sys
import textwrap
import tokenize
import types
import typing
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")
MISSING = dataclasses.MISSING


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
        # No setting means anything at infinity (a limit that is off is 0 or null), and NaN
        # passes every range check in validate(): refused here, once for every stage.
        if not math.isfinite(value) or abs(value) > sys.float_info.max:
            raise ConfigError(name, f"must be a finite number, got {value!r}")
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
    kwargs = {}
    try:
        # The values given are checked before what is missing: a typo in the setting just typed
        # is the first thing to hear about.
        for key, value in data.items():
            if value is None and key in _required(cls) and type(None) not in typing.get_args(hints[key]):
                # What --write-config leaves for a setting with no default: it must be filled in.
                raise ConfigError(prefix + key, "is required (it is null)")
            kwargs[key] = _check_type(prefix + key, value, hints[key])
        for name in _required(cls):
            if name not in data:
                raise ConfigError(prefix + name, "is required")
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
    except UnicodeDecodeError as e:
        raise ConfigError("<file>", f"not UTF-8 text (byte {e.start})", str(path)) from None
    except OSError as e:
        raise ConfigError("<file>", f"cannot be read ({e.strerror or e})", str(path)) from None
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


def _required(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)
            if f.init and f.default is MISSING and f.default_factory is MISSING]


def field_help(cls: type) -> dict[str, str]:
    """{field: meaning}, read from the comment that ends each field's statement in the source.

    The comment a developer reads is the help the app's form, `--help` and the docs show, so
    the three cannot disagree. A subclass's comment wins over its base's; a field the subclass
    redeclares without one (a new default) keeps the base's.
    """
    return dict(_field_help(cls))


@lru_cache(maxsize=None)
def _field_help(cls: type) -> dict[str, str]:
    out: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if dataclasses.is_dataclass(klass):
            out.update(_field_comments(klass))
    return out


def _field_comments(klass: type) -> dict[str, str]:
    try:
        source = textwrap.dedent(inspect.getsource(klass))
    except (OSError, TypeError):
        return {}
    comments = {tok.start[0]: tok.string.lstrip("#").strip()
                for tok in tokenize.generate_tokens(io.StringIO(source).readline)
                if tok.type == tokenize.COMMENT}
    body = ast.parse(source).body[0].body
    return {node.target.id: comments[node.end_lineno] for node in body
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
            and node.end_lineno in comments}


@dataclass
class FieldDoc:
    """One setting as `--help` and the app describe it."""
    name: str
    type: str           # as JSON spells it: "int", "float", "list of str", "str or null", ...
    default: Any        # MISSING for a required setting
    help: str
    owner: type         # the config class that first declares it (TrainConfig for shared ones)

    @property
    def required(self) -> bool:
        return self.default is MISSING


def field_docs(cls: type) -> list[FieldDoc]:
    """Every setting of a config class, in declaration order, with its type, default and help."""
    hints = typing.get_type_hints(cls)
    helps = field_help(cls)
    docs = []
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        default = f.default_factory() if f.default_factory is not MISSING else f.default
        owner = next(k for k in reversed(cls.__mro__) if f.name in getattr(k, "__annotations__", {}))
        docs.append(FieldDoc(f.name, type_name(hints[f.name]), default, helps.get(f.name, ""), owner))
    return docs


def type_name(tp: Any) -> str:
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        names = [type_name(a) for a in args if a is not type(None)]
        return " or ".join(names + (["null"] if type(None) in args else []))
    if typing.get_origin(tp) in (list, tuple):
        return f"list of {type_name(args[0]) if args else 'values'}"
    if typing.get_origin(tp) is dict or tp is dict:
        return "object"
    return getattr(tp, "__name__", str(tp))


def default_config(cls: type) -> dict:
    """A config.json for a user to edit: every default, and null for each required setting
    (loading it then names the first one still null)."""
    return {d.name: None if d.required else d.default for d in field_docs(cls)}

"""Typed configs: dataclasses filled from YAML and `key.sub=value` overrides, strictly.

Unknown keys and wrong types are errors that name the file and the dotted key, so a typo
in a config never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Iterable, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

from medai.errors import ConfigError

T = TypeVar("T")
_SOURCE = str | Path | None


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str, source: _SOURCE) -> Any:
    """Check `value` against the annotation `tp`, converting where lossless (int->float, str->Path)."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key, source)
            except ConfigError as exc:
                errors.append(exc.reason)
        raise ConfigError(f"expected {_type_name(tp)}, got {value!r}", source, key)
    if origin is Literal:
        if value not in get_args(tp):
            raise ConfigError(f"must be one of {list(get_args(tp))}, got {value!r}", source, key)
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"expected a mapping for {tp.__name__}, got {value!r}", source, key)
        return from_dict(tp, value, source=source, prefix=key)
    if origin in (list, tuple, typing.Sequence) or tp in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"expected a list, got {value!r}", source, key)
        args = get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError(f"expected {len(args)} items, got {len(value)}", source, key)
            return tuple(_coerce(v, a, f"{key}[{i}]", source) for i, (v, a) in enumerate(zip(value, args)))
        item = args[0] if args else Any
        items = [_coerce(v, item, f"{key}[{i}]", source) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"expected a mapping, got {value!r}", source, key)
        kt, vt = get_args(tp) or (Any, Any)
        return {_coerce(k, kt, key, source): _coerce(v, vt, f"{key}.{k}", source) for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"expected true/false, got {value!r}", source, key)
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)  # YAML reads 1e-4 as a string
            except ValueError:
                pass
        raise ConfigError(f"expected a number, got {value!r}", source, key)
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"expected an integer, got {value!r}", source, key)
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"expected a string, got {value!r}", source, key)
    if tp is Path:
        if isinstance(value, (str, Path)):
            return Path(value)
        raise ConfigError(f"expected a path, got {value!r}", source, key)
    if isinstance(tp, type) and not isinstance(value, tp):
        raise ConfigError(f"expected {_type_name(tp)}, got {value!r}", source, key)
    return value


def from_dict(cls: type[T], data: dict[str, Any], *, source: _SOURCE = None, prefix: str = "") -> T:
    """Build dataclass `cls` from a mapping; unknown keys and wrong types raise ConfigError."""
    if not isinstance(data, dict):
        raise ConfigError(f"expected a mapping, got {type(data).__name__}", source, prefix or None)
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        key = f"{prefix}.{unknown[0]}" if prefix else unknown[0]
        raise ConfigError(f"unknown key (known: {', '.join(sorted(fields))})", source, key)
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else name
        kwargs[name] = _coerce(value, hints[name], key, source)
    missing = [
        n for n, f in fields.items()
        if n not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        key = f"{prefix}.{missing[0]}" if prefix else missing[0]
        raise ConfigError("required key is missing", source, key)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(str(exc), source, prefix or None) from exc


def to_dict(obj: Any) -> Any:
    """Turn a config dataclass (nested) into plain YAML-safe Python values."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, Path):
        return str(obj)
    return obj


def apply_overrides(data: dict[str, Any], overrides: Iterable[str], source: _SOURCE = None) -> dict[str, Any]:
    """Apply `-o a.b.c=value` overrides (values parsed as YAML) to a nested mapping, in place.

    The one override syntax of every command: a malformed item or key raises ConfigError naming it;
    an unknown key is named by whoever reads the mapping (`from_dict`, a model family's builder).
    """
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key.sub=value", source or "--override")
        dotted, raw = item.split("=", 1)
        dotted = dotted.strip()
        parts = dotted.split(".")
        if not all(part.isidentifier() for part in parts):
            raise ConfigError(f"malformed key in '{item}': expected dotted names, as in key.sub=value",
                              "--override", dotted)
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as exc:
            raise ConfigError(f"value {raw!r} is not valid YAML ({exc.__class__.__name__})", "--override",
                              dotted) from exc
        node = data
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"cannot set a sub-key of a {type(child).__name__}", "--override", dotted)
            node = child
        node[parts[-1]] = value
    return data


def parse_overrides(overrides: Iterable[str]) -> dict[str, Any]:
    """The nested mapping that `-o key.sub=value` items spell (e.g. a model family's keyword overrides)."""
    return apply_overrides({}, overrides)


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping; raise ConfigError naming the file on absence or bad syntax."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError("config file not found", path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as exc:  # a binary or gzipped file given as the config
        raise ConfigError(f"not UTF-8 text ({exc.reason} at byte {exc.start})", path) from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"invalid YAML: {exc}", path) from exc
    if not isinstance(data, dict):
        raise ConfigError("top level must be a mapping", path)
    return data


def load_config(cls: type[T], path: str | Path, overrides: Iterable[str] = ()) -> T:
    """Load `cls` from a YAML file plus overrides; errors name the file and key."""
    data = apply_overrides(read_yaml(path), overrides, source=path)
    return from_dict(cls, data, source=path)


def save_config(obj: Any, path: str | Path) -> None:
    """Write a config dataclass as YAML (the resolved config a run used)."""
    Path(path).write_text(yaml.safe_dump(to_dict(obj), sort_keys=False))

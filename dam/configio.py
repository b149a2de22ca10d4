"""Dataclass configs from YAML with dotted command-line overrides, strictly checked.

The same dataclasses are the Python API, the YAML schema and the CLI (as litgpt does): a YAML
file is read, `key.sub=value` overrides are applied (values parsed as YAML, list items by
index: `data.datasets.0.weight=2`), and the result is converted field by field. An unknown
key, a wrong type or a value outside a Literal stops with a `ConfigError` naming the dotted
key and what is allowed, before any model is loaded.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

from dam.errors import DamInputError

T = TypeVar("T")


class ConfigError(DamInputError):
    """A config (training, data pipeline) is unusable; the message names the key and the fix."""


def read_yaml(path: str | Path, examples: str) -> dict[str, Any]:
    """The mapping in a YAML file (an empty file is an empty mapping).

    ``examples``: the calling tool's folder of example configs, named when the file is missing.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist: pass --config with a YAML file (see {examples})")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {error}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping of keys, got {type(data).__name__}")
    return data


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """`data` with each `a.b.c=value` set (value parsed as YAML: 1e-4, true, [a, b], null)."""
    for override in overrides:
        key, sep, text = override.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {override!r} must look like key.sub=value (e.g. training.learning_rate=1e-5)")
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError:
            value = text
        node: Any = data
        parts = key.split(".")
        for depth, part in enumerate(parts):
            last = depth == len(parts) - 1
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise ConfigError(f"override {key!r}: {'.'.join(parts[:depth])} has {len(node)} items, no item {part!r}")
                if last:
                    node[int(part)] = value
                else:
                    node = node[int(part)]
            elif last:
                node[part] = value
            else:
                if node.get(part) is None:  # a YAML section left empty (`model:`) is null
                    node[part] = {}
                node = node[part]
                if not isinstance(node, (dict, list)):
                    raise ConfigError(f"override {key!r}: {'.'.join(parts[: depth + 1])} is a value, not a section")
    return data


def from_dict(cls: type[T], data: Any, key: str = "") -> T:
    """An instance of dataclass `cls` from a mapping; unknown or ill-typed keys raise ConfigError."""
    where = key or "the config"
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must be a mapping of keys, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for name in data:
        if name not in fields:
            close = difflib.get_close_matches(str(name), fields, n=1)
            hint = f" (did you mean {_join(key, close[0])!r}?)" if close else ""
            raise ConfigError(
                f"unknown config key {_join(key, str(name))!r}{hint}; {where} accepts: {', '.join(sorted(fields))}"
            )
    hints = typing.get_type_hints(cls)
    values = {name: _convert(hints[name], data[name], _join(key, name)) for name in data}
    try:
        return cls(**values)
    except (TypeError, DamInputError) as error:  # a required field is missing, or __post_init__ refuses a value
        raise ConfigError(f"{where}: {error}") from None


def to_dict(config: Any) -> Any:
    """Plain data (for YAML/JSON) of a config dataclass."""
    return dataclasses.asdict(config)


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _convert(hint: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        errors = []
        for option in options:
            try:
                return _convert(option, value, key)
            except ConfigError as error:
                errors.append(str(error))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{key}: {value!r} matches none of {options}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key} must be one of {', '.join(map(repr, args))}, got {value!r}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        item = args[0] if args else Any
        return [_convert(item, v, f"{key}.{i}") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, key)
    if hint is Any:
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} must be a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{key} must be a string, got {value!r}")
        return str(value)
    raise ConfigError(f"{key}: unsupported config type {hint!r}")

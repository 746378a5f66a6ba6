"""Configuration: dataclasses are the schema (with defaults in code), TOML files the values, and
`--section.key=value` command-line overrides on top. Every run writes its resolved config.

    cfg = load_config(TrainConfig, "train/configs/tiny_cpu.toml", ["--optim.lr=1e-3"])
    write_resolved(cfg, out_dir / "config.resolved.toml")
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


class ConfigError(ValueError):
    """A bad config file or override; the message names the key."""


def load_config(schema: type[T], path: str | Path | None = None, overrides: list[str] | None = None) -> T:
    """Build `schema` from defaults, then the TOML file, then `--a.b=value` overrides."""
    values: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            values = tomllib.loads(path.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: invalid TOML ({exc})") from None
    for item in overrides or []:
        key, value = parse_override(item)
        _set_path(values, key.split("."), value)
    return from_dict(schema, values, where=str(path) if path else "config")


def parse_args_with_overrides(parser: argparse.ArgumentParser, argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    """The parser's own options, plus the `--section.key=value` config overrides left over; anything
    else is a usage error naming the argument."""
    args, rest = parser.parse_known_args(argv)
    bad = [a for a in rest if not (a.startswith("--") and "=" in a)]
    if bad:
        parser.error(f"unrecognised argument(s) {bad}; config overrides look like --section.key=value")
    return args, rest


def parse_override(item: str) -> tuple[str, Any]:
    """'--optim.lr=1e-3' → ('optim.lr', 0.001); values parse as TOML, else as plain strings."""
    text = item[2:] if item.startswith("--") else item
    if "=" not in text:
        raise ConfigError(f"override {item!r} must look like --section.key=value")
    key, raw = text.split("=", 1)
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key.strip(), value


def _set_path(values: dict[str, Any], keys: list[str], value: Any) -> None:
    for k in keys[:-1]:
        values = values.setdefault(k, {})
        if not isinstance(values, dict):
            raise ConfigError(f"cannot set {'.'.join(keys)}: {k} is not a section")
    values[keys[-1]] = value


def from_dict(schema: type[T], values: dict[str, Any], where: str = "config") -> T:
    """Dataclass from a nested dict with type checks; unknown keys are errors that name the key."""
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: expected a table, got {type(values).__name__}")
    fields = {f.name: f for f in dataclasses.fields(schema)}  # type: ignore[arg-type]
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; known: {sorted(fields)}")
    hints = typing.get_type_hints(schema)
    kwargs = {name: _coerce(hints[name], values[name], f"{where}.{name}") for name in values}
    return schema(**kwargs)


def _coerce(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{where}: bad value {value!r}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        args = typing.get_args(tp)
        inner = args[0] if args else Any
        items = [_coerce(inner, v, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a table, got {value!r}")
        return dict(value)
    if origin is typing.Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{where}: {value!r} is not one of {list(typing.get_args(tp))}")
        return value
    if tp is Any:
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is Path and isinstance(value, str):
        return Path(value)
    if tp in (int, float, str, bool) and (not isinstance(value, tp) or (tp is int and isinstance(value, bool))):
        raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}")
    return value


def to_dict(cfg: Any) -> dict[str, Any]:
    """Dataclass → plain nested dict (Paths as strings, tuples as lists, None left out for TOML)."""

    def clean(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: clean(getattr(v, f.name)) for f in dataclasses.fields(v) if getattr(v, f.name) is not None}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        if isinstance(v, dict):
            return {str(k): clean(x) for k, x in v.items() if x is not None}
        if isinstance(v, Path):
            return str(v)
        return v

    return clean(cfg)


def dump_toml(values: dict[str, Any]) -> str:
    """Minimal TOML writer for config dicts (scalars, lists of scalars, nested tables)."""
    lines: list[str] = []

    def scalar(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, str):
            return json.dumps(v)
        if isinstance(v, list):
            return "[" + ", ".join(scalar(x) for x in v) + "]"
        raise ConfigError(f"cannot write {v!r} to TOML")

    def table(prefix: str, d: dict[str, Any]) -> None:
        plain = {k: v for k, v in d.items() if not isinstance(v, dict)}
        nested = {k: v for k, v in d.items() if isinstance(v, dict)}
        if prefix and plain:
            lines.append(f"[{prefix}]")
        for k, v in plain.items():
            lines.append(f"{k} = {scalar(v)}")
        if plain:
            lines.append("")
        for k, v in nested.items():
            table(f"{prefix}.{k}" if prefix else k, v)

    table("", values)
    return "\n".join(lines).rstrip() + "\n"


def write_resolved(cfg: Any, path: str | Path) -> Path:
    """Write the resolved config next to a run's outputs (atomically)."""
    from genpan.atomic import atomic_write_text

    return atomic_write_text(path, dump_toml(to_dict(cfg)))

"""TOML configuration with environment overrides, shared by every alarmpost program.

A configuration is a dataclass of section dataclasses. ``load(File, path, prefix)`` reads the TOML
file, rejects unknown sections and keys (a typo must not silently fall back to a default), then
applies overrides from the environment: ``{PREFIX}_{SECTION}_{KEY}``, e.g.
``ALARMPOST_EDGE_MQTT_PASSWORD``. Errors say which file, section and key to fix.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

SECRET_KEYS = frozenset({"password", "api_token", "secret", "token"})


class ConfigError(ValueError):
    """The configuration cannot be used; the message says what to change."""


def _coerce(value: Any, typ: Any, where: str) -> Any:
    origin = typing.get_origin(typ)
    if origin in (types.UnionType, typing.Union):
        args = [a for a in typing.get_args(typ) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, args[0], where)
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in {"1", "true", "yes", "on", "0", "false", "no", "off"}:
            return value.lower() in {"1", "true", "yes", "on"}
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if typ is int:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        try:
            return int(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected an integer, got {value!r}") from None
    if typ is float:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected a number, got {value!r}") from None
    if typ is str:
        if not isinstance(value, str | int | float) or isinstance(value, bool):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return str(value)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item,) = typing.get_args(typ)
        return [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    return value


def load(cls: type[T], path: Path | str | None, env_prefix: str) -> T:
    """Build ``cls`` from a TOML file (or defaults when ``path`` is None) plus the environment."""
    data: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        path = Path(path)
        source = str(path)
        try:
            data = tomllib.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"configuration file {path} does not exist") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path} is not valid TOML: {exc}") from None
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if dataclasses.is_dataclass(hints[f.name])}  # type: ignore[arg-type]
    unknown = set(data) - set(fields)
    if unknown:
        raise ConfigError(f"{source}: unknown section(s) {sorted(unknown)}; known: {sorted(fields)}")
    sections: dict[str, Any] = {}
    for name in fields:
        section_cls = hints[name]
        section_hints = typing.get_type_hints(section_cls)
        raw = data.get(name, {})
        if not isinstance(raw, dict):
            raise ConfigError(f"{source}: [{name}] must be a table")
        unknown = set(raw) - set(section_hints)
        if unknown:
            raise ConfigError(
                f"{source}: unknown key(s) {sorted(unknown)} in [{name}]; known: {sorted(section_hints)}"
            )
        values: dict[str, Any] = {}
        for key, typ in section_hints.items():
            env = f"{env_prefix}_{name}_{key}".upper()
            if env in os.environ:
                values[key] = _coerce(os.environ[env], typ, f"${env}")
            elif key in raw:
                values[key] = _coerce(raw[key], typ, f"{source} [{name}] {key}")
        try:
            sections[name] = section_cls(**values)
        except TypeError as exc:
            raise ConfigError(f"{source}: [{name}] is missing a required key: {exc}") from None
    config = cls(**sections)
    validate = getattr(config, "validate", None)
    if validate is not None:
        validate()
    return config


def redacted(config: Any) -> dict[str, Any]:
    """The configuration as a dict with every secret replaced, for logs."""
    out: dict[str, Any] = {}
    for section in dataclasses.fields(config):
        if not dataclasses.is_dataclass(getattr(config, section.name)):
            continue
        values = dataclasses.asdict(getattr(config, section.name))
        out[section.name] = {
            k: ("***" if (k in SECRET_KEYS or k.endswith(("_password", "_token", "_secret")))
                and v else v)
            for k, v in values.items()
        }
    return out


def resolve(base: Path | str | None, value: str) -> Path:
    """A path from a config file, relative to that file's directory."""
    p = Path(value).expanduser()
    if p.is_absolute() or base is None:
        return p
    return Path(base).resolve().parent / p

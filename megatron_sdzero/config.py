"""Typed dataclass configs: YAML recipes, dotted ``key=value`` overrides, ``--dry-run``.

Every component owns one dataclass. A command's top-level config nests them; a recipe is a YAML
file of values for that tree, and the command line overrides single leaves::

    sdzero sft --config examples/qwen3_4b_math.yaml train.lr=5e-6 model.tp=2 --dry-run

Values are checked against the type hints when the tree is built, so a typo or a wrong type is an
error naming the dotted key, never a silently ignored setting.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints

import yaml

from megatron_sdzero.errors import UserError, run_reporting_user_errors
from megatron_sdzero.runtime import quiet


class ConfigError(UserError, ValueError):
    """A config value or key is wrong; the message names the dotted key."""


def from_dict[T](cls: type[T], values: dict[str, Any] | None, *, prefix: str = "") -> T:
    """Build dataclass ``cls`` from a (nested) dict, checking keys and types."""
    values = dict(values or {})
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        where = prefix.rstrip(".") or cls.__name__
        raise ConfigError(f"unknown key(s) {unknown} in {where}; valid keys: {sorted(fields)}")
    values = {name: _over_field_default(fields[name], value) for name, value in values.items()}
    kwargs = {name: _coerce(hints[name], value, f"{prefix}{name}") for name, value in values.items()}
    missing = [name for name, f in fields.items() if name not in kwargs and _is_required(f)]
    where = prefix.rstrip(".") or cls.__name__
    if missing:
        keys = ", ".join(f"{prefix}{name}" for name in missing)
        raise ConfigError(f"{keys}: required in {where} but not set (add it to the recipe or as {keys}=...)")
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as err:  # a component's own check in __post_init__
        raise ConfigError(f"{where}: {err}") from err


def _over_field_default(f: dataclasses.Field, value: Any) -> Any:
    """A section's values laid over the field's own default (e.g. distill's reference train settings),
    not over the section class's defaults."""
    if not isinstance(value, dict) or f.default_factory is dataclasses.MISSING:
        return value
    default = f.default_factory()
    if not dataclasses.is_dataclass(default):
        return value
    return _deep_merge(to_dict(default), value)


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _is_required(f: dataclasses.Field) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


def _coerce(hint: Any, value: Any, key: str) -> Any:
    origin, args = get_origin(hint), get_args(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return _coerce(option, value, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(f"{key}: {value!r} fits none of {hint}: {errors}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: {value!r} is not one of {list(args)}")
        return value
    if dataclasses.is_dataclass(hint):
        if isinstance(value, hint):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping for {hint.__name__}, got {value!r}")
        return from_dict(hint, value, prefix=f"{key}.")
    if origin in (list, tuple, Sequence):
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        item = args[0] if args else Any
        items = [_coerce(item, v, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    return _coerce_scalar(hint, value, key)


def _coerce_scalar(hint: Any, value: Any, key: str) -> Any:
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if hint is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "5e-6" as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if hint is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    if hint is Path:
        if isinstance(value, str | Path):
            return Path(value)
        raise ConfigError(f"{key}: expected a path, got {value!r}")
    if isinstance(hint, type) and isinstance(value, hint):
        return value
    raise ConfigError(f"{key}: cannot read {value!r} as {hint}")


def to_dict(config: Any) -> Any:
    """A plain (YAML-safe) nested dict of a config tree."""
    if dataclasses.is_dataclass(config):
        return {f.name: to_dict(getattr(config, f.name)) for f in dataclasses.fields(config)}
    if isinstance(config, list | tuple):
        return [to_dict(v) for v in config]
    if isinstance(config, dict):
        return {k: to_dict(v) for k, v in config.items()}
    if isinstance(config, Path):
        return str(config)
    return config


def to_yaml(config: Any) -> str:
    return yaml.safe_dump(to_dict(config), sort_keys=False)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b.c=value`` -> (["a", "b", "c"], value parsed as YAML)."""
    key, sep, raw = text.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r} is not of the form dotted.key=value")
    if raw == "":
        return key.split("."), ""
    try:
        return key.split("."), yaml.safe_load(raw)
    except yaml.YAMLError as err:
        raise ConfigError(f"override {text!r}: the value is not valid YAML ({_yaml_problem(err)})") from None


def apply_overrides(values: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Set each dotted key in a nested dict (creating levels); returns the same dict."""
    for text in overrides:
        path, value = parse_override(text)
        node = values
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {text!r}: {part!r} is a value, not a section")
            node = child
        node[path[-1]] = value
    return values


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        values = yaml.safe_load(path.read_bytes().decode("utf-8")) or {}
    except UnicodeDecodeError as err:
        raise ConfigError(f"config file {path} is not UTF-8 (byte {err.start}); save it as UTF-8") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        raise ConfigError(f"{where}: YAML syntax error: {_yaml_problem(err)}; fix the recipe there") from None
    if not isinstance(values, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    return values


def _yaml_problem(err: yaml.YAMLError) -> str:
    problem = getattr(err, "problem", None)
    context = getattr(err, "context", None)
    return " ".join(part for part in (context, problem) if part) or str(err).splitlines()[0]


def load_config[T](cls: type[T], path: str | Path | None = None, overrides: Sequence[str] = ()) -> T:
    values = load_yaml(path) if path else {}
    return from_dict(cls, apply_overrides(values, overrides))


def run_config_command[T](
    prog: str,
    description: str,
    config_cls: type[T],
    run: Callable[[T], int | None],
    argv: Sequence[str],
    preset: Sequence[str] = (),
) -> int:
    """The shared front of every config-driven command: --config, overrides, --dry-run.

    ``preset``: overrides the command itself applies after the recipe, before the user's own.
    A user error (a bad value, a missing file, a malformed row, ...) ends the command with one line
    on stderr and exit status 2 (see :mod:`megatron_sdzero.errors`).
    """
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--config", "-c", help="YAML recipe (see examples/)")
    parser.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    parser.add_argument(
        "--verbose",
        action="store_true",
        help="also show known third-party warnings (always in the run's log)",
    )
    parser.add_argument(
        "overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. train.lr=1e-5"
    )
    args = parser.parse_args(list(argv))

    def start() -> int | None:
        config = load_config(config_cls, args.config, [*preset, *args.overrides])
        if args.dry_run:
            print(to_yaml(config), end="")
            return 0
        quiet.configure(getattr(config, "run_dir", None), args.verbose)
        return run(config)

    return run_reporting_user_errors(prog, start)

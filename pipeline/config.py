"""Typed configs: dataclasses loaded from YAML, overridden by dotted ``key=value`` arguments.

Every component owns a small config dataclass. Fields declare their constraints with
:func:`param` (bounds, choices, help), and :func:`load_config` builds a validated instance or
raises :class:`ConfigError` naming the source file, the dotted key path, what was expected and,
for unknown keys, the closest valid key.

    @dataclass
    class OptimConfig:
        lr: float = param(1e-4, gt=0, help="peak learning rate")

    cfg = load_config(TrainConfig, "configs/x.yaml", ["optim.lr=3e-5"])
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import types
import typing
from pathlib import Path
from collections.abc import Sequence
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

import yaml

T = TypeVar("T")

_MISSING = dataclasses.MISSING


class ConfigError(ValueError):
    """A config value or key is invalid. The message names file, key path and expectation."""


def param(
    default: Any = _MISSING,
    *,
    default_factory: Any = _MISSING,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    help: str = "",
) -> Any:
    """A dataclass field with validation bounds and a help string (shown in errors)."""
    meta = {"ge": ge, "gt": gt, "le": le, "lt": lt, "help": help}
    if default_factory is not _MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def load_config(cls: type[T], path: str | Path | None = None, overrides: Sequence[str] = ()) -> T:
    """Build ``cls`` from an optional YAML file plus dotted ``key=value`` overrides.

    Overrides are merged into the file's values before anything is validated, so a recipe may
    leave out what the command line supplies (e.g. data paths).
    """
    source = str(path) if path is not None else "<defaults>"
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            text = Path(path).read_text()
        except OSError as e:
            raise ConfigError(f"{source}: cannot read config file ({e.strerror})") from None
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ConfigError(f"{source}: not valid YAML: {e}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(
                f"{source}: expected a mapping at the top level, got {type(loaded).__name__}"
            )
        raw = loaded or {}
    if overrides:
        raw = _merge_overrides(cls, raw, overrides, "command line")
        source = f"{source} + command line" if path is not None else "command line"
    return from_dict(cls, raw, source=source)


def from_dict(cls: type[T], raw: dict[str, Any], *, source: str = "<dict>", prefix: str = "") -> T:
    """Build a validated dataclass instance from a plain (nested) mapping."""
    if not isinstance(raw, dict):
        where = prefix.rstrip(".") or "<top>"
        raise ConfigError(f"{source}: {where}: expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for key in raw:
        if key not in fields:
            raise ConfigError(_unknown_key_message(source, prefix + str(key), key, list(fields)))
    kwargs = {}
    for name, f in fields.items():
        if name not in raw:
            if f.default is _MISSING and f.default_factory is _MISSING:
                raise ConfigError(f"{source}: {prefix}{name}: required key is missing")
            continue
        kwargs[name] = _convert(raw[name], hints[name], f, source, prefix + name)
    try:
        obj = cls(**kwargs)
    except (ValueError, TypeError) as e:
        if isinstance(e, ConfigError):
            raise
        where = prefix.rstrip(".") or cls.__name__
        raise ConfigError(f"{source}: {where}: {e}") from None
    check = getattr(obj, "check", None)
    if callable(check):
        check(source=source, prefix=prefix)
    return obj


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict of a config (YAML/JSON serialisable)."""
    return dataclasses.asdict(cfg)


def dump_yaml(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def _merge_overrides(
    cls: type, tree: dict[str, Any], overrides: Sequence[str], source: str
) -> dict[str, Any]:
    """Set each dotted key in a copy of the raw ``tree``, checking every key against ``cls``.

    A mapping value merges into the mapping already there, as a recipe's own keys would. Below a
    free-form ``dict`` field (``model.options``) keys are not checked here: the field's owner
    validates the merged mapping (:func:`from_dict` calls a config's ``check``).
    """
    tree = copy.deepcopy(tree)
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"{source}: {item!r}: expected key=value (e.g. infotok.lam=0.1)")
        node, node_cls = tree, cls
        parts = key.split(".")
        for depth, part in enumerate(parts):
            if node_cls is not None:
                fields = {f.name: f for f in dataclasses.fields(node_cls) if f.init}
                if part not in fields:
                    raise ConfigError(
                        _unknown_key_message(source, key, part, list(fields), parts[:depth])
                    )
            if depth == len(parts) - 1:
                node[part] = _merged(node.get(part), _parse_cli_value(value))
                break
            if node_cls is not None:
                hint = typing.get_type_hints(node_cls)[part]
                sub = _dataclass_in(hint)
                if sub is None and not _is_mapping(hint):
                    raise ConfigError(
                        f"{source}: {key}: {'.'.join(parts[: depth + 1])} is a value, not a section"
                    )
                node_cls = sub
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
    return tree


def _merged(current: Any, value: Any) -> Any:
    """``value`` merged into ``current`` when both are mappings (recursively), else ``value``."""
    if not (isinstance(current, dict) and isinstance(value, dict)):
        return value
    out = dict(current)
    for key, item in value.items():
        out[key] = _merged(out.get(key), item)
    return out


def _is_mapping(hint: Any) -> bool:
    return any(h is dict or get_origin(h) is dict for h in (hint, *get_args(hint)))


def _parse_cli_value(text: str) -> Any:
    """YAML parsing of one CLI value, so ``[a, b]``, ``true``, ``null`` and numbers work."""
    try:
        return yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        return text


def _unknown_key_message(
    source: str, path: str, key: Any, valid: list[str], parents: list[str] = ()
) -> str:
    where = ".".join(list(parents) + [str(key)]) if parents else path
    close = difflib.get_close_matches(str(key), valid, n=1, cutoff=0.5)
    hint = f"; did you mean {'.'.join(list(parents) + close)!r}?" if close else ""
    return f"{source}: {where}: unknown key (valid keys here: {', '.join(sorted(valid))}){hint}"


def _dataclass_in(hint: Any) -> type | None:
    if dataclasses.is_dataclass(hint):
        return hint
    for arg in get_args(hint):
        if dataclasses.is_dataclass(arg):
            return arg
    return None


def _describe(hint: Any) -> str:
    origin = get_origin(hint)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(hint))
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in get_args(hint))
    if origin in (list, tuple):
        args = get_args(hint)
        return f"a list of {_describe(args[0])}" if args else "a list"
    if origin is dict:
        return "a mapping"
    if hint is type(None):
        return "null"
    if dataclasses.is_dataclass(hint):
        return f"a {hint.__name__} mapping"
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}.get(
        hint, str(hint)
    )


def _bounds_text(meta: Any) -> str:
    parts = []
    for op, sym in (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<=")):
        if meta.get(op) is not None:
            parts.append(f"{sym} {meta[op]}")
    return " and ".join(parts)


def _check_bounds(value: Any, meta: Any, source: str, path: str, hint: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    ok = not (isinstance(value, float) and math.isnan(value))
    ok = ok and (meta.get("gt") is None or value > meta["gt"])
    ok = ok and (meta.get("ge") is None or value >= meta["ge"])
    ok = ok and (meta.get("lt") is None or value < meta["lt"])
    ok = ok and (meta.get("le") is None or value <= meta["le"])
    if not ok:
        help_text = f" ({meta['help']})" if meta.get("help") else ""
        raise ConfigError(
            f"{source}: {path}: expected {_describe(hint)} {_bounds_text(meta)}, got {value!r}{help_text}"
        )


def _convert(value: Any, hint: Any, f: dataclasses.Field, source: str, path: str) -> Any:
    meta = f.metadata
    out = _coerce(value, hint, source, path)
    _check_bounds(out, meta, source, path, hint)
    return out


def _type_error(value: Any, hint: Any, source: str, path: str) -> ConfigError:
    return ConfigError(
        f"{source}: {path}: expected {_describe(hint)}, got {value!r} ({type(value).__name__})"
    )


def _coerce(value: Any, hint: Any, source: str, path: str) -> Any:
    origin = get_origin(hint)
    if hint is Any:
        return value
    if origin is Literal:
        if isinstance(value, bool):  # YAML 1.1 reads off/on/no/yes as booleans
            words = ("on", "yes", "true") if value else ("off", "no", "false")
            value = next((w for w in words if w in get_args(hint)), value)
        if value in get_args(hint):
            return value
        close = difflib.get_close_matches(str(value), [str(a) for a in get_args(hint)], n=1)
        extra = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"{source}: {path}: expected {_describe(hint)}, got {value!r}{extra}")
    if origin in (Union, types.UnionType):
        args = get_args(hint)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, source, path)
            except ConfigError:
                continue
        raise _type_error(value, hint, source, path)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise _type_error(value, hint, source, path)
        (item_hint, *_) = get_args(hint) or (Any,)
        items = [_coerce(v, item_hint, source, f"{path}[{i}]") for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict:
        if not isinstance(value, dict):
            raise _type_error(value, hint, source, path)
        return dict(value)
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, source=source, prefix=path + ".")
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise _type_error(value, hint, source, path)
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _type_error(value, hint, source, path)
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise _type_error(value, hint, source, path)
    if hint is str:
        if isinstance(value, str):
            return value
        raise _type_error(value, hint, source, path)
    raise ConfigError(f"{source}: {path}: unsupported config type {hint!r}")

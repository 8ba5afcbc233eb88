"""The YAML / `key=value` machinery of a config made of dataclasses, apart from any schema.

    tree = default_tree(TrainConfig)                    # the defaults as plain data, nothing built
    merge(tree, yaml.safe_load(...)); apply_overrides(tree, ["optim.lr=1e-6"], TrainConfig)
    cfg = config_from_dict(TrainConfig, tree)            # coerced to the declared types, validated

`load(cls, path, overrides)` does the three in order; `schema.py` holds the schema (the dataclass
sections with their checks) and calls it. Field types understood: bool, int, float, str, Any,
`Literal[...]` (a choice: the value must be one of its arguments), Optional/unions, lists,
tuples, dicts and nested dataclasses. Every error is a `ConfigError` naming the dotted field,
the expected and the actual value; an unknown key lists the valid ones.
"""

from __future__ import annotations

import copy
import dataclasses
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

__all__ = ["ConfigError", "check_field", "check_choice", "check_literal_fields", "config_from_dict", "config_to_dict", "default_tree",
           "apply_overrides", "merge", "load", "save"]


class ConfigError(ValueError):
    """A configuration value is missing, unknown or inconsistent; the message names the field."""


def check_field(ok: bool, field: str, message: str) -> None:
    """ConfigError "field: message" unless `ok`."""
    if not ok:
        raise ConfigError(f"{field}: {message}")


def check_choice(value: Any, field: str, choices: Sequence[Any]) -> None:
    """ConfigError naming `field`, the choices and `value` unless `value` is one of `choices`."""
    check_field(value in choices, field, f"expected one of {tuple(choices)}, got {value!r}")


def check_literal_fields(section: Any, prefix: str) -> None:
    """Every `Literal`-typed field of the dataclass `section` holds one of its choices (for a
    section built in code rather than loaded; `config_from_dict` checks them while coercing)."""
    hints = typing.get_type_hints(type(section))
    for f in dataclasses.fields(section):
        tp = hints[f.name]
        if typing.get_origin(tp) is typing.Literal:
            check_choice(getattr(section, f.name), f"{prefix}.{f.name}", typing.get_args(tp))


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


_TRUE, _FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


def _coerce_scalar(tp: type, value: Any, field: str) -> Any:
    """bool / int / float / str from a YAML value or a command-line string."""
    if tp is bool:
        if isinstance(value, bool) or str(value).lower() in _TRUE + _FALSE:
            return value if isinstance(value, bool) else str(value).lower() in _TRUE
        raise ConfigError(f"{field}: expected true or false, got {value!r}")
    if tp is str:
        check_field(isinstance(value, (str, int, float)) and not isinstance(value, bool), field,
               f"expected a string, got {value!r}")
        return str(value)
    try:             # "1e-6" (a string to YAML 1.1) is a float; 4.0 is an int
        number = None if isinstance(value, bool) else float(value)
    except (TypeError, ValueError):
        number = None
    if number is None or (tp is int and not number.is_integer()):
        raise ConfigError(f"{field}: expected {tp.__name__}, got {value!r}")
    return int(number) if tp is int else number


def _is_text(tp: Any) -> bool:
    """A str field, or a choice among strings: its command-line value is taken verbatim."""
    args = typing.get_args(tp)
    return tp is str or (typing.get_origin(tp) is typing.Literal and all(isinstance(a, str) for a in args))


def _coerce(tp: Any, value: Any, field: str) -> Any:
    """`value` (from YAML or a command line) as type `tp`; ConfigError naming `field` otherwise."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if origin is typing.Literal:
        if isinstance(value, bool) and _is_text(tp):
            # YAML 1.1 reads a bare `off` / `on` as a bool: the choice the user wrote
            value = {False: "off", True: "on"}[value] if {False: "off", True: "on"}[value] in args else value
        choice = _coerce(type(args[0]), value, field) if args and type(args[0]) in (bool, int, float, str) else value
        check_choice(choice, field, args)
        return choice
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return _coerce(option, value, field)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{field}: expected {_type_name(tp)}, got {value!r}")
    if dataclasses.is_dataclass(tp):
        return config_from_dict(tp, value, prefix=field)
    if tp in (bool, int, float, str):
        return _coerce_scalar(tp, value, field)
    if origin in (list, tuple) or tp in (list, tuple):
        if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Sequence):
            raise ConfigError(f"{field}: expected a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            check_field(len(value) == len(args), field, f"expected {len(args)} values, got {len(value)}")
            return tuple(_coerce(a, v, f"{field}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
        item = args[0] if args else Any
        items = [_coerce(item, v, f"{field}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if (origin or tp) is tuple else items
    if origin is dict or tp is dict:
        check_field(isinstance(value, Mapping), field, f"expected a mapping, got {value!r}")
        return dict(value)
    raise ConfigError(f"{field}: unsupported field type {_type_name(tp)}")


def _fields(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init}


def config_from_dict(cls: type, data: Any, *, prefix: str = "") -> Any:
    """Build dataclass `cls` from a (partial) mapping; missing fields keep their defaults."""
    where = prefix or "config"
    if isinstance(data, cls):
        return data
    check_field(isinstance(data, Mapping), where, f"expected a mapping of {cls.__name__} fields, got {data!r}")
    fields = _fields(cls)
    for key in data:
        if key not in fields:
            raise ConfigError(f"{prefix + '.' if prefix else ''}{key}: unknown key; valid keys of {where}: "
                              f"{', '.join(fields)}")
    kwargs = {k: _coerce(fields[k], v, f"{prefix + '.' if prefix else ''}{k}") for k, v in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError, ImportError) as e:          # e.g. SourceConfig's own checks
        raise ConfigError(f"{where}: {e}") from None


def config_to_dict(cfg: Any) -> Any:
    """A dataclass tree as plain YAML-safe data (tuples become lists)."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: config_to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg) if f.init}
    if isinstance(cfg, (list, tuple)):
        return [config_to_dict(v) for v in cfg]
    if isinstance(cfg, Mapping):
        return {k: config_to_dict(v) for k, v in cfg.items()}
    return cfg


def default_tree(cls: type) -> dict:
    """The defaults of a dataclass tree as plain data, without constructing it: a field may give
    its default as data in `metadata["tree_default"]` (see config.DEFAULT_SOURCES)."""
    tree = {}
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        tp = _fields(cls)[f.name]
        if "tree_default" in f.metadata:
            tree[f.name] = copy.deepcopy(f.metadata["tree_default"])
        elif dataclasses.is_dataclass(tp):
            tree[f.name] = default_tree(tp)
        elif f.default is not dataclasses.MISSING:
            tree[f.name] = config_to_dict(f.default)
        else:
            tree[f.name] = config_to_dict(f.default_factory())
    return tree


def _field_type_at(cls: type, parts: list[str], key: str) -> Any:
    """The declared type at a dotted path (None below a dict/Any field, where any key goes)."""
    tp: Any = cls
    walked = []
    for part in parts:
        origin = typing.get_origin(tp)
        if origin in (typing.Union, types.UnionType):
            tp = next(a for a in typing.get_args(tp) if a is not type(None))
            origin = typing.get_origin(tp)
        if dataclasses.is_dataclass(tp):
            fields = _fields(tp)
            if part not in fields:
                where = ".".join(walked) or "config"
                raise ConfigError(f"{key}: unknown key {part!r}; valid keys of {where}: {', '.join(fields)}")
            tp = fields[part]
        elif origin is list:
            check_field(part.isdigit(), key, f"expected a list index at {part!r}")
            tp = typing.get_args(tp)[0]
        else:
            return None
        walked.append(part)
    return tp


def apply_overrides(tree: dict, overrides: Sequence[str], cls: type) -> dict:
    """Apply `a.b.c=value` overrides to a config dict in place (values parsed as YAML; list
    items by index, `data.sources.0.name=chain_sum`). Unknown keys raise ConfigError."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        check_field(bool(sep) and bool(key), item, "expected key=value (e.g. optim.lr=1e-6)")
        parts = key.split(".")
        tp = _field_type_at(cls, parts, key)
        value = raw if _is_text(tp) else yaml.safe_load(raw) if raw.strip() else ""
        node: Any = tree
        for depth, part in enumerate(parts[:-1]):
            if isinstance(node, list):
                idx = int(part)
                check_field(idx < len(node), key,
                       f"index {idx} out of range: {'.'.join(parts[:depth])} has {len(node)} items")
                node = node[idx]
            else:
                if node.get(part) is None:        # an optional section left at None starts empty
                    node[part] = {}
                node = node[part]
        if isinstance(node, list):
            idx = int(parts[-1])
            check_field(idx < len(node), key, f"index {idx} out of range: the list has {len(node)} items")
            node[idx] = value
        else:
            node[parts[-1]] = value
    return tree


def merge(base: dict, update: Mapping) -> dict:
    """Recursive dict merge; lists and scalars in `update` replace those in `base`."""
    for k, v in update.items():
        if isinstance(v, Mapping) and isinstance(base.get(k), dict):
            merge(base[k], v)
        else:
            base[k] = v
    return base


def load(cls: type, path: str | Path | None = None, overrides: Sequence[str] = (), *,
         migrate: Callable[[dict], dict] | None = None, complete: Callable[[dict], dict] | None = None) -> Any:
    """Defaults of `cls` ← YAML file (if any) ← `key=value` overrides, validated as a whole.
    A schema's own hooks on the plain tree: `migrate` right after the file is merged (keys of
    older files moved to their new place), `complete` after the overrides, before the tree
    becomes `cls` (values one section takes from another).

    Raises ConfigError naming the field (or the file when it is not a YAML mapping)."""
    tree = default_tree(cls)
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"--config: no such file {str(path)!r}")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
        check_field(isinstance(loaded, Mapping), str(path),
                    f"expected a mapping at the top level, got {type(loaded).__name__}")
        for key in loaded:
            _field_type_at(cls, [str(key)], str(key))     # unknown top-level sections
        merge(tree, loaded)
    if migrate is not None:
        tree = migrate(tree)
    apply_overrides(tree, overrides, cls)
    return config_from_dict(cls, complete(tree) if complete is not None else tree)


def save(cfg: Any, path: str | Path) -> Path:
    """Write a dataclass tree as YAML (loadable with `load`)."""
    path = Path(path)
    path.write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False, default_flow_style=None))
    return path

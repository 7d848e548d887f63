"""The generic machinery of typed options, for ANY dataclass: YAML/JSON files, command-line
flags, validation. `fastrlhf.config.TrainConfig` and every trainer's config are built on it.

    cfg = parse_config(MyConfig, ["--config", "run.yaml", "--lr", "1e-4", "--data.max_prompt_len", "64"])
    cfg = config_from_dict(MyConfig, {"data": {"max_prompt_len": 64}})   # nested dicts -> nested dataclasses
    add_dataclass_arguments(parser, MyConfig)                            # argparse options, dotted for nesting

Field metadata understood by the machinery (`option(...)` writes it): `help` (shown by --help),
`choices` (validated) and `fingerprint` (False: the option does not change what a run learns, so
it is left out of the run's identity, `rlhf.fingerprint`). A class's `RANGES` maps numeric
options to their sane values (`Range`, `at_least`, `above`, `fraction`). Unknown keys and bad
values raise `ConfigError` (a ValueError) naming the key and the fix.
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import math
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Type, TypeVar

from .errors import ConfigError

T = TypeVar("T")


@dataclass(frozen=True)
class Range:
    """The sane values of a numeric option (each element, for a list): `low`/`high` bounds,
    excluded when `*_open`; `hint` is added to the error message."""
    low: Optional[float] = None
    high: Optional[float] = None
    low_open: bool = False
    high_open: bool = False
    hint: str = ""

    def __contains__(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return not (self.high is not None and (value >= self.high if self.high_open else value > self.high))

    def __str__(self) -> str:
        def num(x: float) -> str:
            return str(int(x)) if float(x).is_integer() else f"{x:g}"
        if self.low is not None and self.high is not None:
            left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
            return f"in {left}{num(self.low)}, {num(self.high)}{right}"
        if self.low is not None:
            return f"{'>' if self.low_open else '>='} {num(self.low)}"
        return f"{'<' if self.high_open else '<='} {num(self.high)}" if self.high is not None else "finite"


def at_least(low: float, hint: str = "") -> Range:
    return Range(low=low, hint=hint)


def above(low: float, hint: str = "") -> Range:
    return Range(low=low, low_open=True, hint=hint)


def fraction(high_open: bool = True, low_open: bool = False, hint: str = "") -> Range:
    """[0, 1) by default."""
    return Range(0.0, 1.0, low_open=low_open, high_open=high_open, hint=hint)


def option(default, help: str, choices: Optional[Sequence[Any]] = None, factory=None, *, fingerprint: bool = True):
    """A dataclass field with its --help text, its allowed values and whether it is part of a
    run's fingerprint (False for where and how often to save, log and evaluate, and how long to
    run: options that do not change what is learned)."""
    meta: Dict[str, Any] = {"help": help}
    if choices is not None:
        meta["choices"] = tuple(choices)
    if not fingerprint:
        meta["fingerprint"] = False
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


def in_fingerprint(f: dataclasses.Field) -> bool:
    """Whether field `f` is part of a run's identity (see `option`)."""
    return f.metadata.get("fingerprint", True)


def _fields(cls) -> Dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


def _hints(cls) -> Dict[str, Any]:
    return typing.get_type_hints(cls)


def did_you_mean(key: str, known: Sequence[str], prefix: str = "") -> str:
    """'; did you mean X?' (the closest of `known`, each shown with `prefix`), or ''."""
    close = difflib.get_close_matches(key, list(known), n=3)
    return f"; did you mean {', '.join(prefix + c for c in close)}?" if close else ""


def _unknown_key(key: str, known: Sequence[str], where: str) -> ConfigError:
    hint = did_you_mean(key, known) or f"; known keys: {', '.join(sorted(known))}"
    return ConfigError(f"unknown config key {where + key!r}{hint}")


def option_names(cls, prefix: str = "") -> List[str]:
    """Every option of dataclass `cls` as the command line spells it, without '--' (nested: 'data.paths')."""
    names = []
    for f in dataclasses.fields(cls):
        tp, _ = _strip_optional(_hints(cls)[f.name])
        if dataclasses.is_dataclass(tp):
            names += option_names(tp, prefix + f.name + ".")
        else:
            names.append(prefix + f.name)
    return names


def _strip_optional(tp):
    if typing.get_origin(tp) in (typing.Union, types.UnionType):  # Optional[X] and X | None
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


_TRUE, _FALSE = {"true", "1", "yes", "on"}, {"false", "0", "no", "off"}


def coerce_value(value: Any, tp: Any, key: str) -> Any:
    """Convert `value` (from YAML or a command-line string) to type `tp`, or raise ConfigError."""
    base, optional = _strip_optional(tp)
    if value is None or (optional and isinstance(value, str) and value.lower() in ("none", "null")):
        if optional:
            return None
        raise ConfigError(f"{key} cannot be empty (None)")
    origin = typing.get_origin(base)
    try:
        if origin in (list, List, tuple):
            (item_tp,) = typing.get_args(base)[:1] or (str,)
            if isinstance(value, str):
                value = [v for v in value.split(",") if v.strip()]
            elif not isinstance(value, (list, tuple)):
                value = [value]
            return [coerce_value(v, item_tp, key) for v in value]
        if base is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in _TRUE | _FALSE:
                return value.lower() in _TRUE
            if isinstance(value, int) and value in (0, 1):
                return bool(value)
            raise ValueError
        if base is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            if isinstance(value, str) and not value.strip().lstrip("+-").isdigit():
                as_float = float(value)  # accept "1e3" but not "2.5"
                if not as_float.is_integer():
                    raise ValueError
                return int(as_float)
            return int(value)
        if base is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if base is str:
            if isinstance(value, (dict, list)):
                raise ValueError
            text = str(value)
            # a path from a config file (or --key=~/x, which no shell expands): ~ is the home dir, never ./~
            return os.path.expanduser(text) if text.startswith("~") else text
    except (TypeError, ValueError):
        name = getattr(base, "__name__", str(base))
        raise ConfigError(f"{key}={value!r} is not a valid {name}") from None
    return value


def config_from_dict(cls: Type[T], values: Mapping[str, Any], *, prefix: str = "") -> T:
    """Build dataclass `cls` from a (nested) dict; unknown keys and bad values raise ConfigError."""
    fields, hints = _fields(cls), _hints(cls)
    kwargs = {}
    for key, value in values.items():
        if key not in fields:
            raise _unknown_key(key, list(fields), prefix)
        tp = hints[key]
        base, _ = _strip_optional(tp)
        if dataclasses.is_dataclass(base):
            if dataclasses.is_dataclass(value):
                kwargs[key] = value
            elif isinstance(value, Mapping):
                kwargs[key] = config_from_dict(base, value, prefix=f"{prefix}{key}.")
            else:
                raise ConfigError(f"{prefix}{key} must be a mapping of {base.__name__} fields, got {value!r}")
        else:
            kwargs[key] = coerce_value(value, tp, prefix + key)
    obj = cls(**kwargs)
    if not prefix and callable(getattr(obj, "validate", None)):
        obj.validate()  # cross-field checks of the top-level config
    else:
        validate_config(obj, prefix)
    return obj


def validate_config(obj: Any, prefix: str = "") -> None:
    """Check every field with `choices` metadata, every number against the class's `RANGES`
    (lists element by element) and every float for being finite (recursively)."""
    ranges = getattr(type(obj), "RANGES", {})
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        choices = f.metadata.get("choices")
        if choices is not None and value not in choices:
            raise ConfigError(f"{prefix}{f.name}={value!r} is not allowed; choose one of "
                              f"{', '.join(map(str, choices))}")
        if dataclasses.is_dataclass(value):
            validate_config(value, f"{prefix}{f.name}.")
            continue
        for v in (value if isinstance(value, (list, tuple)) else [value]):
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                continue
            rng = ranges.get(f.name, Range())
            if v not in rng:
                shown = value if isinstance(value, (list, tuple)) else v
                each = "each value of " if isinstance(value, (list, tuple)) else ""
                hint = f" ({rng.hint})" if rng.hint else ""
                raise ConfigError(f"{each}{prefix}{f.name} must be {rng}{hint}, got {shown}")


def update_config(obj: T, overrides: Mapping[str, Any]) -> T:
    """A copy of `obj` with (nested) overrides applied and validated."""
    merged = merge_dicts(config_to_dict(obj), overrides)
    return config_from_dict(type(obj), merged)


def config_to_dict(obj: Any) -> Dict[str, Any]:
    return dataclasses.asdict(obj)


def merge_dicts(base: Mapping[str, Any], over: Mapping[str, Any]) -> Dict[str, Any]:
    """`over` on top of `base`, section by section. A section (mapping) in `over` where `base` holds
    a value that is not one is refused: the flag for one key must not hide the bad value of its
    section (`data: 5` in a file, `--data.max_prompt_len 64` on the command line)."""
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = merge_dicts(out[k], v)
        elif isinstance(v, Mapping) and out.get(k) is not None and v:
            first = next(iter(v))
            raise ConfigError(f"config key {k!r} is {out[k]!r}, but it is a section of options ({k}.{first} is "
                              f"given too): write it as a mapping of its keys, e.g. {k}: {{{first}: ...}}")
        else:
            out[k] = v
    return out


def unflatten(flat: Mapping[str, Any]) -> Dict[str, Any]:
    """{"data.max_prompt_len": 64} -> {"data": {"max_prompt_len": 64}}."""
    out: Dict[str, Any] = {}
    for key, value in flat.items():
        node = out
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{key}: {p} is not a nested section")
        node[parts[-1]] = value
    return out


class _JSONObject(dict):
    """A JSON object as parsed, remembering the first key it was given twice."""
    duplicate: Optional[str] = None


def _json_object(pairs) -> "_JSONObject":
    out = _JSONObject()
    for key, value in pairs:
        if key in out and out.duplicate is None:
            out.duplicate = key
        out[key] = value
    return out


def _json_duplicate(obj: Any, prefix: str = "") -> Optional[Tuple[str, str]]:
    """(dotted key, '') of the first key given twice in a parsed JSON document, or None."""
    if isinstance(obj, _JSONObject) and obj.duplicate is not None:
        return prefix + obj.duplicate, ""
    children = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else ()
    for key, value in children:
        found = _json_duplicate(value, f"{prefix}{key}.")
        if found:
            return found
    return None


def _yaml_duplicate(node: Any, prefix: str = "") -> Optional[Tuple[str, str]]:
    """(dotted key, ' (lines a and b)') of the first key given twice in a YAML node tree, or None
    (PyYAML itself keeps the last value silently)."""
    import yaml
    if isinstance(node, yaml.MappingNode):
        seen: Dict[Any, int] = {}
        for key_node, value_node in node.value:
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else id(key_node)
            if key in seen:
                return prefix + str(key), f" (lines {seen[key]} and {key_node.start_mark.line + 1})"
            seen[key] = key_node.start_mark.line + 1
            found = _yaml_duplicate(value_node, f"{prefix}{key}.")
            if found:
                return found
    elif isinstance(node, yaml.SequenceNode):
        for i, value_node in enumerate(node.value):
            found = _yaml_duplicate(value_node, f"{prefix}{i}.")
            if found:
                return found
    return None


def load_config_file(path: str) -> Dict[str, Any]:
    """Read a YAML (.yaml/.yml) or JSON file into a dict."""
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path!r} does not exist")
    try:
        with open(path, encoding="utf-8-sig") as f:  # -sig: a byte-order mark some editors write is skipped
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read config file {path} ({type(e).__name__}: {e})") from None
    try:
        if path.endswith(".json"):
            data = json.loads(text, object_pairs_hook=_json_object)
            duplicate = _json_duplicate(data)
        else:
            import yaml
            duplicate = _yaml_duplicate(yaml.compose(text, Loader=yaml.SafeLoader))
            data = yaml.safe_load(text)
    except Exception as e:  # parser errors carry the line number
        raise ConfigError(f"cannot parse config file {path}: {e}") from None
    if duplicate:  # both parsers keep the last value without a word
        raise ConfigError(f"config file {path}: the key {duplicate[0]!r} is given twice{duplicate[1]}; keep one")
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of keys to values, got {type(data).__name__}")
    return data


def save_config(obj: Any, path: str) -> None:
    import yaml
    with open(path, "w") as f:
        yaml.safe_dump(config_to_dict(obj), f, sort_keys=False)


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls, prefix: str = "",
                            skip: Sequence[str] = ()) -> None:
    """One `--name` option per field (nested dataclasses as `--section.name`). Values stay strings
    (argparse.SUPPRESS default, so only given options appear) and are typed by config_from_dict."""
    hints = _hints(cls)
    group = parser.add_argument_group(f"{prefix.rstrip('.') or cls.__name__} options") if not prefix else parser
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        tp, _ = _strip_optional(hints[f.name])
        name = prefix + f.name
        if dataclasses.is_dataclass(tp):
            sub = parser.add_argument_group(f"{name} options ({tp.__name__})")
            add_dataclass_arguments(sub, tp, prefix=name + ".")
            continue
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        help_text = f.metadata.get("help", "")
        choices = f.metadata.get("choices")
        if choices:
            help_text += f" {{{'|'.join(map(str, choices))}}}"
        rng = getattr(cls, "RANGES", {}).get(f.name)
        if rng is not None:
            help_text += f"; {rng}"
        help_text += f" (default: {default})"
        kwargs = dict(dest=name, default=argparse.SUPPRESS, help=help_text.replace("%", "%%"))
        if typing.get_origin(tp) in (list, List):
            kwargs.update(nargs="+", metavar="V", action="extend")  # repeatable: --reward_fn A --reward_fn B
        elif tp is bool:
            kwargs.update(nargs="?", const="true", metavar="BOOL")
        else:
            kwargs.update(metavar=getattr(tp, "__name__", "V").upper())
        group.add_argument("--" + name, **kwargs)


def namespace_overrides(ns: argparse.Namespace, cls) -> Dict[str, Any]:
    """The options of `cls` that were given on the command line, as a nested dict."""
    names = set()

    def collect(c, prefix):
        for f in dataclasses.fields(c):
            tp, _ = _strip_optional(_hints(c)[f.name])
            if dataclasses.is_dataclass(tp):
                collect(tp, prefix + f.name + ".")
            else:
                names.add(prefix + f.name)
    collect(cls, "")
    return unflatten({k: v for k, v in vars(ns).items() if k in names})


def parse_config(cls: Type[T], argv: Optional[Sequence[str]] = None, *, base: Optional[Mapping] = None) -> T:
    """Parse `[--config FILE] [--key value ...]` into `cls`: defaults < `base` < file < command line."""
    parser = argparse.ArgumentParser(prog=cls.__name__)
    parser.add_argument("--config", default=None)
    add_dataclass_arguments(parser, cls)
    ns = parser.parse_args(argv)
    values = dict(base or {})
    if ns.config:
        values = merge_dicts(values, load_config_file(ns.config))
    values = merge_dicts(values, namespace_overrides(ns, cls))
    return config_from_dict(cls, values)

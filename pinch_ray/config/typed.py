"""Typed values from YAML: a dataclass built from a dict, each value checked against its field's type,
every problem named by its dotted key (no dependency on the schema: the schema uses it too)."""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from collections.abc import Mapping, Sequence


# YAML 1.1 (PyYAML) reads 1e-3 and 5E-5 as strings (it needs a dot: 1.0e-3). Float fields accept
# strings of this form (YAML 1.2 floats), so `lr: 5e-5` and `training.lr=3e-4` mean what they say.
FLOAT_TEXT = re.compile(r"[-+]?(\.\d+|\d+(\.\d*)?)([eE][-+]?\d+)?")


def type_name(annotation) -> str:
    return annotation.__name__ if isinstance(annotation, type) and not typing.get_args(annotation) else str(annotation)


def check_value(value, annotation, key: str) -> tuple[object, str | None]:
    """``value`` converted to ``annotation`` (a field's type), or ``(value, problem naming key)``.

    bool fields take only true/false; int fields only integers (not bools, not 2.0); float fields
    ints, floats and float-like strings (:data:`FLOAT_TEXT`); tuples come from YAML lists.
    """
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    wrong = (value, f"{key}: expected {type_name(annotation)}, got {value!r} ({type(value).__name__})")
    if annotation is typing.Any:
        return value, None
    if origin in (types.UnionType, typing.Union):
        if value is None and type(None) in args:
            return None, None
        for option in args:
            converted, problem = check_value(value, option, key)
            if option is not type(None) and problem is None:
                return converted, None
        return wrong
    if annotation is bool or annotation is str:
        return (value, None) if isinstance(value, annotation) else wrong
    if annotation is int:
        return (value, None) if isinstance(value, int) and not isinstance(value, bool) else wrong
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value), None
        if isinstance(value, str) and FLOAT_TEXT.fullmatch(value.strip()):
            return float(value), None
        return wrong
    if list in (annotation, origin) or origin is tuple:
        if not isinstance(value, (list, tuple)) or (origin is tuple and len(value) != len(args)):
            return wrong
        item_types = args if origin is tuple else args * len(value)
        items = []
        for i, item in enumerate(value):
            converted, problem = check_value(item, item_types[i], f"{key}[{i}]") if args else (item, None)
            if problem:
                return value, problem
            items.append(converted)
        return (tuple(items) if origin is tuple else items), None
    if dict in (annotation, origin):
        if not isinstance(value, dict):
            return wrong
        entries = {}
        for name, item in value.items():
            if args:
                _, problem = check_value(name, args[0], f"{key} (the key {name!r})")
                item, problem = (item, problem) if problem else check_value(item, args[1], f"{key}.{name}")
                if problem:
                    return value, problem
            entries[name] = item
        return entries, None
    raise TypeError(f"{key}: no type check for {annotation!r}")  # a field type this loader lacks


def unknown_key(dotted: str, key, known: Sequence[str], sections: Mapping[str, type] | None = None) -> str:
    """The problem of an unknown key, suggesting a close name here or the section (of ``sections``:
    name -> dataclass) that has it."""
    match = difflib.get_close_matches(str(key), known, n=1)
    prefix = dotted[: len(dotted) - len(str(key))]
    elsewhere = [f"{name}.{key}" for name, section in (sections or {}).items()
                 if dataclasses.is_dataclass(section) and key in {f.name for f in dataclasses.fields(section)}]
    if match:
        hint = f"did you mean {prefix}{match[0]}?"
    elif elsewhere:
        hint = f"did you mean {' or '.join(elsewhere)}?"
    else:
        hint = f"known keys here: {', '.join(known)}"
    return f"{dotted}: unknown key; {hint}"


def build(base, data: dict, prefix: str, problems: list[str], sections: Mapping[str, type] | None = None):
    """``base`` (a dataclass) with the entries of ``data`` set; bad entries are added to
    ``problems`` (each naming its dotted key) and keep their value from ``base``. ``sections``:
    where an unknown key may belong instead (:func:`unknown_key`)."""
    hints = typing.get_type_hints(type(base))
    names = [f.name for f in dataclasses.fields(base)]
    changes = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if key not in names:
            problems.append(unknown_key(dotted, key, names, sections))
        elif dataclasses.is_dataclass(hints[key]):
            if value is not None and not isinstance(value, dict):
                problems.append(f"{dotted}: expected a section of key: value lines, got {value!r}")
            else:
                changes[key] = build(getattr(base, key), value or {}, f"{dotted}.", problems, sections)
        else:
            converted, problem = check_value(value, hints[key], dotted)
            if problem:
                problems.append(problem)
            else:
                changes[key] = converted
    return dataclasses.replace(base, **changes)

"""Checking settings read back from JSON (a run's config.json, a weights file's metadata) against
the field types of the dataclass they fill: a file edited by hand or written by another tool is
named in one line at load, not met as a traceback deep in a run."""

from __future__ import annotations

import json
import numbers
from dataclasses import MISSING, fields
from types import UnionType
from typing import get_args, get_origin, get_type_hints

import numpy as np


def field_problem(cls: type, stored: dict) -> str | None:
    """What is wrong with ``stored`` as the fields of the dataclass ``cls`` (None: nothing): a value
    of another type, or a field without a default that it lacks. Keys ``cls`` does not have are
    the caller's to drop (older files may hold settings since retired)."""
    hints = get_type_hints(cls)
    for name, value in stored.items():
        if name in hints and not fits(value, hints[name]):
            return f"{name} is {_shown(value)}, not {type_name(hints[name])}"
    missing = [f.name for f in fields(cls)
               if f.default is MISSING and f.default_factory is MISSING and f.name not in stored]
    return f"it does not say {' or '.join(missing)}" if missing else None


def fits(value, hint) -> bool:
    """Whether ``value``, as JSON gives it (or a caller in Python, NumPy scalars included), is of
    the field type ``hint``: a whole number is a float, a bool is not a number."""
    if isinstance(hint, UnionType):
        return any(fits(value, h) for h in get_args(hint))
    if get_origin(hint) is list:
        return isinstance(value, list) and all(fits(v, get_args(hint)[0]) for v in value)
    if hint in (int, float):
        kind = numbers.Integral if hint is int else numbers.Real
        return isinstance(value, kind) and not isinstance(value, (bool, np.bool_))
    return isinstance(value, hint)


def _shown(value) -> str:
    """``value`` as the file would hold it (JSON), or as Python shows it where JSON cannot."""
    try:
        return json.dumps(value)
    except (TypeError, ValueError):
        return repr(value)


def type_name(hint) -> str:
    """A field type in words: ``int | None`` -> 'a whole number or null'."""
    if isinstance(hint, UnionType):
        return " or ".join(type_name(h) for h in get_args(hint))
    if get_origin(hint) is list:
        return f"a list of {type_name(get_args(hint)[0]).removeprefix('a ')}s"
    return {int: "a whole number", float: "a number", str: "a string", bool: "true or false",
            dict: "an object", type(None): "null"}[hint]

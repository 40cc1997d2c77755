"""Check values against type hints: how pass options and document sections are validated.

A pass declares its options as keyword-only ``__init__`` arguments with type hints; this module
reads them (:func:`pass_options`) and checks a user's values against them with path-precise
errors, so a user's pass gets the same messages as a built-in one.
"""
from __future__ import annotations

import difflib
import inspect
import json
import types
from collections.abc import Mapping, Sequence
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

from .errors import ConfigError

MISSING = inspect.Parameter.empty


def pass_options(cls: type) -> dict[str, tuple[Any, Any]]:
    """``{option: (type hint, default or MISSING)}`` read from ``cls.__init__``."""
    signature = inspect.signature(cls.__init__)
    try:
        hints = get_type_hints(cls.__init__)
    except Exception:  # unresolvable hints: check names only
        hints = {}
    return {
        name: (hints.get(name, Any), param.default)
        for name, param in signature.parameters.items()
        if name != "self" and param.kind in (param.KEYWORD_ONLY, param.POSITIONAL_OR_KEYWORD)
    }


def validate_options(cls: type, options: Mapping[str, Any], path: str) -> None:
    """Check option names, required options and types against ``cls.__init__``'s signature."""
    spec = pass_options(cls)
    accepts_any = any(p.kind == p.VAR_KEYWORD
                      for p in inspect.signature(cls.__init__).parameters.values())
    for key, value in options.items():
        if key not in spec:
            if accepts_any:
                continue
            raise ConfigError(unknown_key_message(f"option of pass {cls.name!r}", key, spec), f"{path}.{key}")
        check_type(value, spec[key][0], f"{path}.{key}")
    for key, (_, default) in spec.items():
        if default is MISSING and key not in options:
            raise ConfigError(f"missing required option {key!r} of pass {cls.name!r}", path)


def unknown_key_message(what: str, key: Any, known: Any) -> str:
    """'unknown <what> <key>. Did you mean ...? Valid: ...' for an error message."""
    close = difflib.get_close_matches(str(key), [str(k) for k in known], n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return f"unknown {what} {key!r}.{hint} Valid: {', '.join(map(str, known))}."


def check_type(value: Any, hint: Any, path: str) -> None:
    """Raise ConfigError at ``path`` unless ``value`` fits the type hint ``hint``.

    Understands bool, int, float (ints accepted), str, None, Any, Literal, unions, list/tuple/
    Sequence[X], dict/Mapping[str, X] and TypedDict (unknown and missing keys reported).
    """
    if not _fits(value, hint, path):
        raise ConfigError(f"must be {type_name(hint)}, got {_show(value)}", path)


def _fits(value: Any, hint: Any, path: str) -> bool:
    """Whether ``value`` fits; raises directly for errors deeper inside containers."""
    if hint is Any or hint is inspect.Parameter.empty:
        return True
    if hint is None or hint is type(None):
        return value is None
    origin = get_origin(hint)
    if origin is Literal:
        return any(value == a and type(value) is type(a) for a in get_args(hint))
    if origin is Union or origin is types.UnionType:
        return _fits_union(value, get_args(hint), path)
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if _is_typeddict(hint):
        if not isinstance(value, Mapping):
            return False
        _check_typeddict(value, hint, path)
        return True
    container = origin or hint
    if container in (list, tuple, Sequence) or (
            isinstance(container, type) and issubclass(container, (list, tuple))):
        if not isinstance(value, (list, tuple)):
            return False
        args = [a for a in get_args(hint) if a is not Ellipsis]
        for i, item in enumerate(value):
            if args:
                check_type(item, args[0], f"{path}[{i}]")
        return True
    if container in (dict, Mapping) or (isinstance(container, type) and issubclass(container, dict)):
        if not isinstance(value, Mapping):
            return False
        args = get_args(hint)
        for key, item in value.items():
            if args:
                check_type(item, args[1], f"{path}.{key}")
        return True
    if isinstance(hint, type):
        return isinstance(value, hint)
    return True


def _fits_union(value: Any, options: tuple, path: str) -> bool:
    # Prefer the member whose outer type matches, so errors inside it name the inner path.
    for option in options:
        if _outer_match(value, option):
            return _fits(value, option, path)
    return False


def _outer_match(value: Any, hint: Any) -> bool:
    origin = get_origin(hint) or hint
    if _is_typeddict(hint) or origin in (dict, Mapping):
        return isinstance(value, Mapping)
    if origin in (list, tuple, Sequence):
        return isinstance(value, (list, tuple))
    return _fits(value, hint, "")


def _is_typeddict(hint: Any) -> bool:
    return isinstance(hint, type) and issubclass(hint, dict) and hasattr(hint, "__total__")


def _check_typeddict(value: Mapping, hint: type, path: str) -> None:
    fields = get_type_hints(hint)
    for key, item in value.items():
        if key not in fields:
            raise ConfigError(unknown_key_message("key", key, fields), f"{path}.{key}")
        check_type(item, fields[key], f"{path}.{key}")
    missing = [k for k in getattr(hint, "__required_keys__", ()) if k not in value]
    if missing:
        raise ConfigError(f"missing required key(s) {', '.join(map(repr, missing))}", path)


def type_name(hint: Any) -> str:
    """A readable name for a type hint, as used in error messages and `graphkd passes`."""
    if hint is Any or hint is inspect.Parameter.empty:
        return "any value"
    if hint is None or hint is type(None):
        return "null"
    origin = get_origin(hint)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(hint))
    if origin is Union or origin is types.UnionType:
        return " or ".join(type_name(a) for a in get_args(hint))
    if _is_typeddict(hint):
        return "a mapping with keys " + ", ".join(get_type_hints(hint))
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    if hint in names:
        return names[hint]
    container = origin or hint
    args = [a for a in get_args(hint) if a is not Ellipsis]
    if container in (list, tuple, Sequence):
        if not args:
            return "a list"
        plural = {str: "strings", int: "integers", float: "numbers", bool: "booleans"}
        return f"a list of {plural.get(args[0]) or 'items, each ' + type_name(args[0])}"
    if container in (dict, Mapping):
        return "a mapping"
    return getattr(hint, "__name__", str(hint))


def _show(value: Any) -> str:
    text = json.dumps(value) if isinstance(value, (str, int, float, bool, type(None))) else repr(value)
    return f"{text} ({type(value).__name__})"

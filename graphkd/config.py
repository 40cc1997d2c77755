"""Load and validate pipeline documents (YAML, JSON, dicts, NNCF-style configs).

The whole document is checked before anything runs. Pass options are checked against the type
hints of each pass's ``__init__``, so a user's pass gets the same precise errors as a built-in one:
``pipeline[1].ratio: must be in [0, 1), got 1.5``.
"""
from __future__ import annotations

import difflib
import inspect
import json
import re
import types
import typing
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypedDict, Union, get_args, get_origin, get_type_hints

import yaml

from .errors import ConfigError

if typing.TYPE_CHECKING:
    from .pipeline import Pass

MISSING = inspect.Parameter.empty


class _ModelRequired(TypedDict):
    callable: str


class ModelSection(_ModelRequired, total=False):
    """``model:`` as a mapping: the architecture, its arguments, and trained weights (a state dict
    file); a plain ``"module:callable"`` string means an untrained architecture."""

    kwargs: dict[str, Any]
    weights: str


class _DataRequired(TypedDict):
    name: str


class DataSection(_DataRequired, total=False):
    """``data:`` as a mapping (a plain string is the ``name``)."""

    num_samples: int
    num_classes: int
    test_fraction: float
    kwargs: dict[str, Any]


class TrainSection(TypedDict, total=False):
    """``train:``; the keys of :class:`graphkd.train.TrainSpec`."""

    epochs: int
    batch_size: int
    optimizer: Literal["sgd", "adam", "adamw"]
    lr: float
    momentum: float
    weight_decay: float
    schedule: Literal["constant", "cosine"]
    teacher_epochs: int
    teacher_lr: float
    calibration_samples: int


class DumpSection(TypedDict, total=False):
    """``dump:`` graph dumps of ``graphkd run`` (``dir`` is relative to the run's output)."""

    dir: str
    formats: list[Literal["dot", "svg", "png", "json", "mermaid"]]
    stages: bool
    diff: bool


# Sections besides `pipeline` that `graphkd run` reads; each maps to the type it must have.
DOCUMENT_SECTIONS: dict[str, Any] = {
    "pipeline": list,
    "model": Union[str, ModelSection],
    "input_shape": list[int],
    "data": Union[str, DataSection],
    "train": TrainSection,
    "dump": DumpSection,
    "compare": Union[Literal["no_distill"], None],
    "seed": int,
}

# Top-level keys of NNCF JSON configs that have no meaning here; ignored with a warning.
NNCF_IGNORED_KEYS = {"target_device", "log_dir", "num_classes", "dataset", "batch_size", "epochs",
                     "optimizer", "seed", "model", "pretrained", "preset", "checkpoint_save_dir"}


def load_document(source: str | Path) -> dict[str, Any]:
    """Parse a YAML/JSON file (a path) or YAML text into a dict, with line numbers for errors.

    Only ``yaml.safe_load`` semantics are used: tags that import or call code are rejected.
    """
    if isinstance(source, Path) or (
            isinstance(source, str) and "\n" not in source
            and source.lower().endswith((".yaml", ".yml", ".json"))):
        path = Path(source)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}. Check the path (relative paths are "
                              f"resolved from {Path.cwd()}).")
        text, origin = path.read_text(encoding="utf-8"), str(path)
    else:
        text, origin = str(source), "<text>"
    try:
        document = yaml.safe_load(text)
        lines = _line_numbers(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        line = mark.line + 1 if mark is not None else None
        raise ConfigError(f"{origin} is not valid YAML: {exc.problem or exc}. Fix the syntax "
                          f"there (indentation, a missing ':' or quote).", line=line) from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{origin} is not valid YAML: {exc}") from None
    if not isinstance(document, dict):
        raise ConfigError(f"{origin}: the document must be a mapping with a 'pipeline' list, got "
                          f"{type(document).__name__}")
    return _with_lines(document, lines)


class _Document(dict):
    """A dict that remembers the source line of each path (``pipeline[1].ratio`` -> 7)."""

    lines: dict[str, int]


def _with_lines(document: dict, lines: dict[str, int]) -> dict:
    doc = _Document(document)
    doc.lines = lines
    return doc


def _line_numbers(text: str) -> dict[str, int]:
    lines: dict[str, int] = {}

    def walk(node: yaml.Node, path: str) -> None:
        lines.setdefault(path, node.start_mark.line + 1)
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                sub = f"{path}.{key.value}" if path else str(key.value)
                lines[sub] = key.start_mark.line + 1
                walk(value, sub)
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                walk(item, f"{path}[{i}]")

    root = yaml.compose(text, Loader=yaml.SafeLoader)
    if root is not None:
        walk(root, "")
    return lines


def line_of(document: Mapping, path: str) -> int | None:
    """The source line of ``path`` (or of its nearest enclosing path) when the document has one."""
    lines = getattr(document, "lines", None)
    if not lines:
        return None
    while path:
        if path in lines:
            return lines[path]
        cut = max(path.rfind("."), path.rfind("["))
        path = path[:cut] if cut > 0 else ""
    return None


def build_passes(document: Mapping[str, Any]) -> tuple[list[Pass], dict[str, Any]]:
    """Validate ``document`` whole and instantiate its passes; returns (passes, normalised doc).

    NNCF documents (with a ``compression`` key) are translated to a ``pipeline`` first.
    """
    try:
        return _build_passes(document)
    except ConfigError as exc:
        if exc.line is None:
            line = line_of(document, exc.path)
            if line is not None:
                raise ConfigError(exc.problem, exc.path, line) from None
        raise


def _build_passes(document: Mapping[str, Any]) -> tuple[list[Pass], dict[str, Any]]:
    if not isinstance(document, Mapping):
        raise ConfigError(f"the document must be a mapping, got {type(document).__name__}")
    if "compression" in document:
        document = translate_nncf(document)
    if "pipeline" not in document:
        found = ", ".join(map(str, document)) or "none"
        raise ConfigError("missing 'pipeline': add a list of passes, e.g. "
                          f"'pipeline: [{{pass: distill, type: softmax}}]' (top-level keys found: "
                          f"{found})")
    for key, value in document.items():
        if key not in DOCUMENT_SECTIONS:
            raise ConfigError(_unknown("top-level key", key, DOCUMENT_SECTIONS), str(key))
        check_type(value, DOCUMENT_SECTIONS[key], str(key))
    items = document["pipeline"]
    passes = [build_pass(item, f"pipeline[{i}]") for i, item in enumerate(items)]
    return passes, dict(document)


def build_pass(item: Any, path: str) -> Pass:
    """Instantiate one ``{pass: NAME, **options}`` item, every error under ``path``."""
    from .pipeline import get_pass

    if not isinstance(item, Mapping):
        raise ConfigError(f"each pipeline item must be a mapping like {{pass: distill, type: mse}}"
                          f", got {type(item).__name__}", path)
    if "pass" not in item:
        raise ConfigError("missing 'pass': name the pass to run (see `graphkd passes`)", path)
    cls = get_pass(item["pass"], f"{path}.pass")
    options = {k: v for k, v in item.items() if k != "pass"}
    validate_options(cls, options, path)
    try:
        return cls(**options)
    except ConfigError as exc:
        raise exc.under(path) from None
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"invalid options for pass {cls.name!r}: {exc}", path) from None


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
            raise ConfigError(_unknown(f"option of pass {cls.name!r}", key, spec), f"{path}.{key}")
        check_type(value, spec[key][0], f"{path}.{key}")
    for key, (_, default) in spec.items():
        if default is MISSING and key not in options:
            raise ConfigError(f"missing required option {key!r} of pass {cls.name!r}", path)


def _unknown(what: str, key: Any, known: Any) -> str:
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
            raise ConfigError(_unknown("key", key, fields), f"{path}.{key}")
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


def nncf_scope(scope: str) -> str:
    """An NNCF scope (``{re}regex`` or ``Net/Seq[layer1]/Conv2d[conv1]``) as a graphkd scope
    pattern (``re:regex`` or ``layer1.conv1``), for the passes' ``options_from_nncf``."""
    if scope.startswith("{re}"):
        return "re:" + scope[len("{re}"):]
    names = re.findall(r"\[([^\]]+)\]", scope)
    return ".".join(names) if names else scope


def nncf_scope_options(section: Mapping[str, Any]) -> dict[str, list[str]]:
    """``target_scopes`` / ``ignored_scopes`` of an NNCF section, translated with
    :func:`nncf_scope` (only the keys the section has)."""
    return {key: [nncf_scope(s) for s in section[key]]
            for key in ("target_scopes", "ignored_scopes") if key in section}


def translate_nncf(document: Mapping[str, Any]) -> dict[str, Any]:
    """Translate an NNCF config (``compression`` list, ``input_info``) to a graphkd document.

    Each ``{"algorithm": A, ...}`` goes to the pass whose ``nncf_algorithm`` is ``A``, through its
    ``options_from_nncf``.
    """
    from .pipeline import available_passes

    by_algorithm = {cls.nncf_algorithm: cls for cls in available_passes().values()
                    if cls.nncf_algorithm}
    sections = document["compression"]
    if isinstance(sections, Mapping):
        sections = [sections]
    if not isinstance(sections, list):
        raise ConfigError("must be a list of algorithm sections or one section", "compression")
    pipeline = []
    for i, section in enumerate(sections):
        path = f"compression[{i}]"
        if not isinstance(section, Mapping) or "algorithm" not in section:
            raise ConfigError("each section needs an 'algorithm' key", path)
        algorithm = section["algorithm"]
        if algorithm not in by_algorithm:
            raise ConfigError(_unknown("NNCF algorithm", algorithm, by_algorithm), f"{path}.algorithm")
        cls = by_algorithm[algorithm]
        rest = {k: v for k, v in section.items() if k != "algorithm"}
        try:
            options = cls.options_from_nncf(rest)
        except ConfigError as exc:
            raise exc.under(path) from None
        pipeline.append({"pass": cls.name, **options})
    translated: dict[str, Any] = {"pipeline": pipeline}
    for key, value in document.items():
        if key == "compression":
            continue
        if key == "input_info":
            info = value[0] if isinstance(value, list) else value
            if isinstance(info, Mapping) and "sample_size" in info:
                translated["input_shape"] = list(info["sample_size"])
        elif key in DOCUMENT_SECTIONS:
            translated[key] = value
        elif key in NNCF_IGNORED_KEYS:
            warnings.warn(f"NNCF config key {key!r} has no meaning in graphkd and is ignored",
                          stacklevel=3)
        else:
            raise ConfigError(_unknown("top-level key", key, [*DOCUMENT_SECTIONS, "compression",
                                                               "input_info"]), str(key))
    return translated

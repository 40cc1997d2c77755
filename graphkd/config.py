"""Load and validate pipeline documents (YAML, JSON, dicts, NNCF-style configs).

The whole document is checked before anything runs, with the exact path (and YAML line) of each
problem: ``pipeline[1].ratio (line 7): must be in [0, 1), got 1.5``. Pass options are checked by
:mod:`graphkd.options`; NNCF configs are translated by :mod:`graphkd.nncf`.
"""
from __future__ import annotations

import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, TypedDict, Union

import yaml

from .errors import ConfigError
from .nncf import translate_nncf
from .options import check_type, unknown_key_message, validate_options

if typing.TYPE_CHECKING:
    from .pipeline import Pass


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
        document = translate_nncf(document, DOCUMENT_SECTIONS)
    if "pipeline" not in document:
        found = ", ".join(map(str, document)) or "none"
        raise ConfigError("missing 'pipeline': add a list of passes, e.g. "
                          f"'pipeline: [{{pass: distill, type: softmax}}]' (top-level keys found: "
                          f"{found})")
    for key, value in document.items():
        if key not in DOCUMENT_SECTIONS:
            raise ConfigError(unknown_key_message("top-level key", key, DOCUMENT_SECTIONS), str(key))
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



"""Resolve ``"module:callable"`` references and build models from config sections.

Configs name code by import path instead of YAML tags, so loading a config never runs code; the
reference is imported only when the job runs, and a bad one is a :class:`ConfigError` at its path.
"""
from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import ConfigError


def resolve_callable(spec: str, path: str = "") -> Callable[..., Any]:
    """Import ``"package.module:attr.sub"`` and return the named callable.

    Example::

        build = resolve_callable("graphkd.zoo:digits_cnn", "model")
    """
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(f"expected 'module:callable' (e.g. 'graphkd.zoo:digits_cnn'), got {spec!r}",
                          path)
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"cannot import module {module_name!r} ({exc}); check the name and that "
                          f"the package is installed", path) from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            public = sorted(n for n in dir(obj) if not n.startswith("_"))[:12]
            raise ConfigError(f"{module_name!r} has no attribute {attr!r}; it has: "
                              f"{', '.join(public)}", path)
        obj = getattr(obj, part)
    if not callable(obj):
        raise ConfigError(f"{spec!r} is not callable ({type(obj).__name__})", path)
    return obj


def build_model(section: str | Mapping[str, Any], path: str = "model") -> tuple[nn.Module, bool]:
    """Build the model a config's ``model`` section names; returns ``(model, has_weights)``.

    ``section`` is ``"module:callable"`` (an architecture, trained by ``graphkd run`` when it is
    untrained) or ``{callable, kwargs, weights}`` where ``weights`` is a state dict file saved with
    ``torch.save(model.state_dict(), path)``.
    """
    if isinstance(section, str):
        section = {"callable": section}
    build = resolve_callable(section["callable"], f"{path}.callable" if "weights" in section
                             or "kwargs" in section else path)
    try:
        model = build(**dict(section.get("kwargs") or {}))
    except TypeError as exc:
        raise ConfigError(f"calling {section['callable']} failed: {exc}", f"{path}.kwargs") from None
    if not isinstance(model, nn.Module):
        raise ConfigError(f"{section['callable']} returned {type(model).__name__}, not a "
                          f"torch.nn.Module", path)
    weights = section.get("weights")
    if weights is None:
        return model, False
    file = Path(weights)
    if not file.is_file():
        raise ConfigError(f"weights file not found: {file} (relative to {Path.cwd()})",
                          f"{path}.weights")
    state = torch.load(file, map_location="cpu", weights_only=True)
    if isinstance(state, Mapping) and "state_dict" in state:
        state = state["state_dict"]
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise ConfigError(f"{file} does not fit {section['callable']}: {first}",
                          f"{path}.weights") from None
    return model, True

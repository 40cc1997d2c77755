"""NNCF compatibility: translate NNCF JSON configs into graphkd documents.

The core translates the document (``compression`` sections, ``input_info``); each pass translates
its own section in ``Pass.options_from_nncf`` with the helpers here.
"""
from __future__ import annotations

import re
import warnings
from collections.abc import Collection, Mapping
from typing import Any

from .errors import ConfigError
from .options import unknown_key_message

# Top-level keys of NNCF JSON configs that have no meaning here; ignored with a warning.
NNCF_IGNORED_KEYS = {"target_device", "log_dir", "num_classes", "dataset", "batch_size", "epochs",
                     "optimizer", "seed", "model", "pretrained", "preset", "checkpoint_save_dir"}


def reject_unknown_keys(mapping: Mapping[str, Any], known: Collection[str], algorithm: str,
                        prefix: str = "") -> None:
    """ConfigError at ``prefix + key`` for the first key of an NNCF section we do not support."""
    for key in mapping:
        if key not in known:
            raise ConfigError(f"unknown {algorithm} key {key!r}; supported: "
                              f"{', '.join(sorted(known))}", f"{prefix}{key}")


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


def translate_nncf(document: Mapping[str, Any], sections: Mapping[str, Any]) -> dict[str, Any]:
    """Translate an NNCF config (``compression`` list, ``input_info``) to a graphkd document.

    Each ``{"algorithm": A, ...}`` goes to the pass whose ``nncf_algorithm`` is ``A``, through its
    ``options_from_nncf``. Keys that are graphkd document ``sections`` are kept as they are.
    """
    from .pipeline import available_passes

    by_algorithm = {cls.nncf_algorithm: cls for cls in available_passes().values()
                    if cls.nncf_algorithm}
    algorithms = document["compression"]
    if isinstance(algorithms, Mapping):
        algorithms = [algorithms]
    if not isinstance(algorithms, list):
        raise ConfigError("must be a list of algorithm sections or one section", "compression")
    pipeline = []
    for i, section in enumerate(algorithms):
        path = f"compression[{i}]"
        if not isinstance(section, Mapping) or "algorithm" not in section:
            raise ConfigError("each section needs an 'algorithm' key", path)
        algorithm = section["algorithm"]
        if algorithm not in by_algorithm:
            raise ConfigError(unknown_key_message("NNCF algorithm", algorithm, by_algorithm), f"{path}.algorithm")
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
        elif key in sections:
            translated[key] = value
        elif key in NNCF_IGNORED_KEYS:
            warnings.warn(f"NNCF config key {key!r} has no meaning in graphkd and is ignored",
                          stacklevel=3)
        else:
            raise ConfigError(unknown_key_message("top-level key", key, [*sections, "compression",
                                                               "input_info"]), str(key))
    return translated

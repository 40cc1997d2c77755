"""NNCF ``filter_pruning`` sections translated to ``prune`` options."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from graphkd.errors import ConfigError
from graphkd.nncf import nncf_scope_options, reject_unknown_keys
from graphkd.schedule import LevelSchedule

_NNCF_KEYS = {"pruning_init", "params", "ignored_scopes", "target_scopes"}
_NNCF_PARAMS = {"schedule", "pruning_target", "pruning_flops_target", "num_init_steps",
                "pruning_steps", "filter_importance", "prune_first_conv", "prune_downsample_convs"}
_NNCF_CRITERIA = {"L1": "l1", "L2": "l2", "geometric_median": "geometric_median"}
NNCF_DEFAULT_STEPS = 100
NNCF_DEFAULT_TARGET = 0.5


def translate_nncf_pruning(section: Mapping[str, Any]) -> dict[str, Any]:
    """NNCF ``filter_pruning`` section -> ``prune`` options.

    ``pruning_init`` -> ``init``; ``params.pruning_target`` -> ``ratio`` (NNCF default 0.5) or
    ``params.pruning_flops_target`` -> ``flops_target``; ``filter_importance`` L1 | L2 |
    geometric_median -> ``criterion``; ``schedule`` ``exponential`` (default) over
    ``pruning_steps`` epochs after ``num_init_steps`` epochs at ``init`` (a multistep schedule
    with the exponential's levels when ``num_init_steps`` > 0), ``baseline`` = ``init`` for
    ``num_init_steps`` epochs then the target; ``prune_first_conv``, ``prune_downsample_convs``
    as is; scopes as for ``magnitude_sparsity``.
    """
    reject_unknown_keys(section, _NNCF_KEYS, "filter_pruning")
    params = section.get("params", {}) or {}
    reject_unknown_keys(params, _NNCF_PARAMS, "filter_pruning", "params.")
    init = section.get("pruning_init", 0.0)
    options: dict[str, Any] = {"init": init}
    if "pruning_flops_target" in params:
        options["flops_target"] = params["pruning_flops_target"]
    else:
        options["ratio"] = params.get("pruning_target", NNCF_DEFAULT_TARGET)
    importance = params.get("filter_importance", "L2")
    if importance not in _NNCF_CRITERIA:
        raise ConfigError(f"must be one of {', '.join(_NNCF_CRITERIA)}, got {importance!r}",
                          "params.filter_importance")
    options["criterion"] = _NNCF_CRITERIA[importance]
    for key in ("prune_first_conv", "prune_downsample_convs"):
        if key in params:
            options[key] = params[key]
    options["schedule"] = _nncf_schedule(params, init, options.get("ratio"))
    options.update(nncf_scope_options(section))
    return options


def _nncf_schedule(params: Mapping[str, Any], init: float, ratio: float | None) -> dict[str, Any]:
    kind = params.get("schedule", "exponential")
    delay = params.get("num_init_steps", 0)
    steps = params.get("pruning_steps", NNCF_DEFAULT_STEPS)
    if kind not in ("baseline", "exponential"):
        raise ConfigError(f"NNCF pruning schedule {kind!r} is not supported; use exponential or "
                          f"baseline", "params.schedule")
    if not delay:
        return {"type": "constant"} if kind == "baseline" else {"type": "exponential",
                                                                  "steps": steps}
    if ratio is None:
        raise ConfigError("num_init_steps with pruning_flops_target is not supported: give "
                          "pruning_target, or drop num_init_steps", "params.num_init_steps")
    if kind == "baseline":
        return {"type": "multistep", "steps": [delay], "levels": [ratio]}
    curve = LevelSchedule(ratio, init, {"type": "exponential", "steps": steps})
    return {"type": "multistep", "steps": [delay + t for t in range(1, steps + 1)],
            "levels": [curve.level_at(t) for t in range(1, steps + 1)]}


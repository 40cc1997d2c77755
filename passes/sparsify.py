"""Unstructured magnitude sparsity: binary masks on the weights of Conv/ConvTranspose/Linear layers.

Each selected layer gets a :class:`WeightMask` on its weight edge
(``graphkd.graph.insert_on_weight``), so it composes with quantizers and pruning masks in pipeline
order. The masks zero the weights of
smallest importance until the schedule's current level is reached, and are recomputed from the
current weights whenever that level changes. ``export()`` multiplies the masks into the weights.

Importance is computed on the layer's stored weight (the parameter), not on what earlier weight
transforms make of it, like NNCF's magnitude sparsity. Put ``sparsify`` before ``quantize`` in a
pipeline: a mask that follows a quantizer on the weight edge cannot be folded into the stored
weight exactly, so export keeps it as a node (with a warning).
"""
from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping
from typing import Any, Literal

import torch
from torch import fx, nn

from graphkd.nncf import nncf_scope_options, reject_unknown_keys
from graphkd.errors import ConfigError
from graphkd.graph import ScopeFilter, flat_name, insert_on_weight, layer_of, scopes_of
from graphkd.pipeline import Pass, PassContext
from graphkd.schedule import LevelSchedule, ScheduleSpec

log = logging.getLogger(__name__)

MODES = ("global", "local")
IMPORTANCES = ("abs", "normed_abs")


class WeightMask(nn.Module):
    """Multiplies a weight by a binary ``mask`` buffer of the same shape.

    The product makes the gradient of every masked weight exactly zero. The mask is a buffer, so it
    follows ``.to(device)`` and is saved in the student's ``state_dict``.
    """

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mask", torch.ones_like(weight, requires_grad=False))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * self.mask

    def select_weight_channels(self, dim: int, keep: torch.Tensor) -> None:
        """Keep only channels ``keep`` of weight dimension ``dim`` (physical pruning)."""
        self.mask = self.mask.index_select(dim, keep.to(self.mask.device))

    def sparsity(self) -> float:
        """Fraction of weights the mask zeroes."""
        return 1.0 - float(self.mask.count_nonzero()) / max(self.mask.numel(), 1)

    def extra_repr(self) -> str:
        return f"shape={tuple(self.mask.shape)}, sparsity={self.sparsity():.4f}"


def weight_importance(weight: torch.Tensor, importance: str) -> torch.Tensor:
    """``|w|``, or ``|w| / ||w||_2`` of the layer for ``normed_abs`` (so that one global threshold
    does not empty the layers whose weights are small overall)."""
    score = weight.detach().abs()
    if importance == "normed_abs":
        score = score / score.norm().clamp_min(torch.finfo(score.dtype).tiny)
    return score


def _zero_smallest(scores: torch.Tensor, level: float) -> torch.Tensor:
    """A 0/1 tensor shaped like ``scores`` that zeroes exactly ``round(level * numel)`` of the
    smallest scores (ties broken arbitrarily, so the count is exact), but never all of them: a
    level below 1 always keeps the largest score."""
    mask = torch.ones_like(scores)
    count = min(round(level * scores.numel()), scores.numel() - 1)
    if count > 0:
        flat = mask.view(-1)
        flat[torch.topk(scores.reshape(-1), count, largest=False).indices] = 0
    return mask


def magnitude_masks(weights: Mapping[str, torch.Tensor], level: float, mode: str = "global",
                    importance: str = "normed_abs") -> dict[str, torch.Tensor]:
    """Binary masks (weight dtype) zeroing a ``level`` fraction of the weights.

    ``local``: each layer loses ``level`` of its own weights. ``global``: one threshold over the
    scores of all layers, so ``level`` holds for the total and layers differ.
    """
    if not weights:
        return {}
    scores = {name: weight_importance(w, importance) for name, w in weights.items()}
    if mode == "local":
        masks = {name: _zero_smallest(s, level) for name, s in scores.items()}
    else:
        flat = torch.cat([s.reshape(-1).to(torch.float32) for s in scores.values()])
        pieces = _zero_smallest(flat, level).split([s.numel() for s in scores.values()])
        masks = {name: piece.view_as(s) for (name, s), piece in zip(scores.items(), pieces)}
    return {name: masks[name].to(weights[name].dtype) for name in weights}


class SparsityController:
    """Keeps the masks of one sparsify pass in step with its schedule, and reports on them.

    ``layers`` maps each layer path to the names of its mask modules (one per call of the layer).
    Holds the student only for training-time updates; export works on the copy it is given.
    """

    def __init__(self, gm: fx.GraphModule, layers: dict[str, list[str]], schedule: LevelSchedule,
                 mode: str, importance: str, skipped: list[str]) -> None:
        self.gm = gm
        self.layers = layers
        self.schedule = schedule
        self.mode = mode
        self.importance = importance
        self.skipped = skipped

    def update_masks(self, level: float | None = None) -> None:
        """Recompute every mask from the current weights at ``level`` (default: the schedule's)."""
        level = self.schedule.level if level is None else level
        weights = {path: self.gm.get_submodule(path).weight for path in self.layers}
        masks = magnitude_masks(weights, level, self.mode, self.importance)
        with torch.no_grad():
            for path, names in self.layers.items():
                for name in names:
                    self.gm.get_submodule(name).mask.copy_(masks[path])

    def statistics(self) -> dict[str, Any]:
        per_layer, zeros, total = {}, 0, 0
        for path, names in self.layers.items():
            mask = self.gm.get_submodule(names[0]).mask
            layer_zeros = mask.numel() - int(mask.count_nonzero())
            per_layer[path] = {"sparsity": layer_zeros / max(mask.numel(), 1),
                               "weights": mask.numel()}
            zeros, total = zeros + layer_zeros, total + mask.numel()
        return {
            "level": self.schedule.level,
            "target": self.schedule.target,
            "achieved": zeros / max(total, 1),
            "schedule": {"type": self.schedule.type, "per": self.schedule.per,
                         "position": self.schedule.position},
            "mode": self.mode,
            "importance": self.importance,
            "layers_touched": len(self.layers),
            "layers": per_layer,
            "skipped_scopes": list(self.skipped),
        }

    def fold(self, exported: fx.GraphModule) -> None:
        """Export step: multiply each mask into its weight parameter and drop the mask node.

        Exact only where the mask is the first transform on the weight edge (export steps of
        earlier passes have run by then); elsewhere the mask node is kept, with a warning.
        """
        names = {name for names in self.layers.values() for name in names}
        kept = []
        for node in list(exported.graph.nodes):
            if node.op != "call_module" or node.target not in names:
                continue
            source = node.all_input_nodes[0]
            if source.op != "get_attr":
                kept.append(f"{node.target} (after {source.name})")
                continue
            weight = exported.get_parameter(source.target)
            with torch.no_grad():
                weight.mul_(exported.get_submodule(node.target).mask)
            node.replace_all_uses_with(source)
            exported.graph.erase_node(node)
        if kept:
            warnings.warn(f"{len(kept)} sparsity mask(s) follow another weight transform and stay "
                          f"in the exported model instead of being folded into the weights: "
                          f"{', '.join(kept)}. Put sparsify before that pass in the pipeline to "
                          f"fold them.", stacklevel=2)


class Sparsify(Pass):
    """Magnitude sparsity with a level schedule (pass name ``sparsify``).

    Options: ``level`` target fraction of zero weights in [0, 1); ``init`` starting level;
    ``mode`` ``global`` (one threshold over all selected weights) or ``local`` (per layer);
    ``importance`` ``abs`` or ``normed_abs`` (``|w|`` divided by the layer's L2 norm); ``schedule``
    (:mod:`graphkd.schedule`); ``target_scopes`` / ``ignored_scopes`` select layers by module path.
    """

    name = "sparsify"
    nncf_algorithm = "magnitude_sparsity"

    def __init__(
        self,
        *,
        level: float,
        init: float = 0.0,
        mode: Literal["global", "local"] = "global",
        importance: Literal["abs", "normed_abs"] = "normed_abs",
        schedule: ScheduleSpec | None = None,
        target_scopes: list[str] | None = None,
        ignored_scopes: list[str] | None = None,
    ) -> None:
        for option, value in (("level", level), ("init", init)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
                raise ConfigError(f"must be a fraction of weights in [0, 1), got {value!r}", option)
        if init > level:
            raise ConfigError(f"must not exceed level ({level}), got {init}: sparsity only grows "
                              f"during training", "init")
        if mode not in MODES:
            raise ConfigError(f"must be one of {', '.join(MODES)}, got {mode!r}", "mode")
        if importance not in IMPORTANCES:
            raise ConfigError(f"must be one of {', '.join(IMPORTANCES)}, got {importance!r}",
                              "importance")
        LevelSchedule(level, init, schedule)  # validates the schedule against level and init
        self.level = float(level)
        self.init = float(init)
        self.mode = mode
        self.importance = importance
        self.schedule = dict(schedule or {})
        self.target_scopes = list(target_scopes or [])
        self.ignored_scopes = list(ignored_scopes or [])

    def apply(self, gm: fx.GraphModule, ctx: PassContext) -> None:
        select = ScopeFilter(scopes_of(gm), self.target_scopes, self.ignored_scopes)
        found = []
        for node in gm.graph.nodes:
            info = layer_of(gm, node)
            if info is not None:
                found.append((node, info[0]))
        skipped = sorted({path for _, path in found if not select(path)})
        layers: dict[str, list[str]] = {}
        for node, path in found:
            if not select(path):
                continue
            weight = gm.get_submodule(path).weight
            layer = insert_on_weight(gm, node, f"sparsity_masks.{flat_name(path)}",
                                     WeightMask(weight))
            layers.setdefault(path, []).append(layer.args[1].target)
        if not layers:
            warnings.warn("sparsify selected no Conv/ConvTranspose/Linear layer (check "
                          "target_scopes / ignored_scopes); the pass does nothing", stacklevel=2)
        schedule = LevelSchedule(self.level, self.init, self.schedule)
        controller = SparsityController(gm, layers, schedule, self.mode, self.importance, skipped)
        controller.update_masks()
        schedule.on_change(controller.update_masks)
        key = _free_key(ctx, self.name)
        schedule.register(ctx, key)
        ctx.statistics[key] = controller.statistics
        ctx.on_export(controller.fold)
        gm.graph.lint()
        gm.recompile()
        log.info("sparsify: %d layers masked at level %.4g (target %.4g)", len(layers),
                 schedule.level, schedule.target)

    @classmethod
    def options_from_nncf(cls, section: Mapping[str, Any]) -> dict[str, Any]:
        """Translate NNCF ``magnitude_sparsity``; see :func:`translate_nncf_sparsity`."""
        return translate_nncf_sparsity(section)


def _free_key(ctx: PassContext, base: str) -> str:
    """``base``, or ``base_1``... when an earlier pass of the same kind already uses it."""
    key, i = base, 0
    while key in ctx.states or key in ctx.statistics:
        i += 1
        key = f"{base}_{i}"
    return key


# --- NNCF translation -----------------------------------------------------------------------
_NNCF_KEYS = {"sparsity_init", "params", "ignored_scopes", "target_scopes"}
_NNCF_PARAMS = {"schedule", "sparsity_target", "sparsity_target_epoch", "power", "concave",
                "multistep_steps", "multistep_sparsity_levels", "sparsity_level_setting_mode",
                "weight_importance", "update_per_optimizer_step", "steps_per_epoch",
                "sparsity_freeze_epoch"}
NNCF_DEFAULT_TARGET = 0.5
NNCF_DEFAULT_TARGET_EPOCH = 90


def translate_nncf_sparsity(section: Mapping[str, Any]) -> dict[str, Any]:
    """NNCF ``magnitude_sparsity`` section -> ``sparsify`` options.

    ``sparsity_init`` -> ``init``; ``params.sparsity_target`` -> ``level``;
    ``params.schedule`` (polynomial by default, exponential, multistep) with
    ``sparsity_target_epoch`` -> ``schedule.steps`` (times ``steps_per_epoch`` and ``per: step``
    when ``update_per_optimizer_step``); multistep's ``multistep_sparsity_levels[0]`` is the level
    at step 0 (``init``) and the rest pair with ``multistep_steps``;
    ``sparsity_level_setting_mode`` -> ``mode``; ``weight_importance`` -> ``importance``;
    scopes: ``{re}X`` -> ``re:X``, ``Net/Sequential[layer1]/Conv2d[conv1]`` -> ``layer1.conv1``.
    ``sparsity_freeze_epoch`` is accepted and ignored: masks change only with the level anyway.
    """
    reject_unknown_keys(section, _NNCF_KEYS, "magnitude_sparsity")
    params = section.get("params", {}) or {}
    reject_unknown_keys(params, _NNCF_PARAMS, "magnitude_sparsity", "params.")
    target = params.get("sparsity_target", NNCF_DEFAULT_TARGET)
    options: dict[str, Any] = {"level": target, "init": section.get("sparsity_init", 0.0)}
    if "sparsity_level_setting_mode" in params:
        options["mode"] = params["sparsity_level_setting_mode"]
    if "weight_importance" in params:
        options["importance"] = params["weight_importance"]
    scale = 1
    if params.get("update_per_optimizer_step", False):
        if "steps_per_epoch" not in params:
            raise ConfigError("update_per_optimizer_step needs steps_per_epoch to convert epochs "
                              "to optimizer steps", "params.steps_per_epoch")
        scale = params["steps_per_epoch"]
    kind = params.get("schedule", "polynomial")
    schedule: dict[str, Any] = {"type": kind}
    if scale != 1:
        schedule["per"] = "step"
    if kind in ("polynomial", "exponential"):
        schedule["steps"] = params.get("sparsity_target_epoch", NNCF_DEFAULT_TARGET_EPOCH) * scale
        if kind == "polynomial":
            if params.get("concave", True) is not True:
                raise ConfigError("only the concave polynomial schedule is supported "
                                  "(level = target + (init - target) * (1 - t/N) ** power)",
                                  "params.concave")
            schedule["power"] = params.get("power", 3)
    elif kind == "multistep":
        steps = list(params.get("multistep_steps", []))
        levels = list(params.get("multistep_sparsity_levels", []))
        if len(levels) != len(steps) + 1:
            raise ConfigError(f"needs one more level than multistep_steps (the first is the level "
                              f"at epoch 0): {len(steps)} steps, {len(levels)} levels",
                              "params.multistep_sparsity_levels")
        options["init"], options["level"] = levels[0], levels[-1]
        schedule.update(steps=[s * scale for s in steps], levels=levels[1:])
    else:
        raise ConfigError(f"NNCF schedule {kind!r} is not supported; use polynomial, exponential "
                          f"or multistep", "params.schedule")
    options["schedule"] = schedule
    options.update(nncf_scope_options(section))
    return options


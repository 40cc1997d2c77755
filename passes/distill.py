"""The ``distill`` pass: knowledge distillation from the frozen original model into the student.

It adds two nodes to the student graph, a call of the teacher on the student's inputs and a
``distill_loss`` node taking (student outputs, teacher outputs); the graph output is unchanged, so
the user's training loop stays ``loss = criterion(model(x), y) + compressed.loss()``. Which outputs
take part is decided once, at pass time, by running both models on the example inputs.

Example::

    doc = {"pipeline": [{"pass": "prune", "ratio": 0.5},
                        {"pass": "distill", "type": "softmax", "temperature": 4}]}
    c = gk.compress(model, doc, x)
"""
from __future__ import annotations

import inspect
import logging
import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from itertools import chain
from typing import Any

import torch
from torch import fx, nn
from torch.utils._pytree import KeyPath, tree_flatten_with_path

from graphkd.errors import ConfigError, DistillError
from graphkd.graph import add_module, find_nodes, module_of, remove_nodes
from graphkd.pipeline import Pass, PassContext

from .distill_loss import ROOT_PATH, DistillLoss, LossType, TeacherCall, path_name

log = logging.getLogger(__name__)

NOT_SELECTED = "not listed in outputs"


@dataclass
class OutputPlan:
    """Which student outputs are distilled (key paths) and why the others are not (by name)."""

    distilled: list[KeyPath] = field(default_factory=list)
    excluded: dict[str, str] = field(default_factory=dict)


class Distill(Pass):
    """Add a knowledge-distillation loss between the student and the frozen original model.

    Options: ``type`` (``mse`` or ``softmax``), ``temperature`` (softmax only, > 0, default 1),
    ``weight`` (>= 0, multiplier of the total), ``dim`` (softmax class dimension, default 1 as in
    ``F.cross_entropy``; -1 for (N, T, V) sequence logits) and ``outputs`` (output paths such as
    ``0``, ``logits``, ``aux.1`` to distill; a path also selects everything nested under it;
    default: every eligible output).
    """

    name = "distill"
    nncf_algorithm = "knowledge_distillation"

    def __init__(
        self,
        *,
        type: LossType,  # noqa: A002 - the option is called `type` in YAML and in NNCF configs
        temperature: float | None = None,
        weight: float = 1.0,
        dim: int = 1,
        outputs: list[str] | None = None,
    ) -> None:
        if type not in ("mse", "softmax"):
            raise ConfigError(f"must be 'mse' or 'softmax', got {type!r}", "type")
        if type == "mse" and temperature is not None:
            raise ConfigError("applies to type 'softmax' only; remove it or use type: softmax",
                              "temperature")
        if temperature is not None and not (math.isfinite(temperature) and temperature > 0):
            raise ConfigError(f"must be a finite number > 0, got {temperature}", "temperature")
        if not (math.isfinite(weight) and weight >= 0):
            raise ConfigError(f"must be a finite number >= 0, got {weight}", "weight")
        if outputs is not None and not outputs:
            raise ConfigError("must name at least one output path; leave it out to distill "
                              "every eligible output", "outputs")
        self.loss_type = type
        self.temperature = 1.0 if temperature is None else float(temperature)
        self.weight = float(weight)
        self.dim = dim
        self.outputs = list(outputs) if outputs is not None else None

    @classmethod
    def options_from_nncf(cls, section: Mapping[str, Any]) -> dict[str, Any]:
        """NNCF's ``scale`` is our ``weight``; NNCF, like us, refuses ``temperature`` with mse."""
        options = dict(section)
        if "scale" in options:
            options["weight"] = options.pop("scale")
        if options.get("type") == "mse" and "temperature" in options:
            raise ConfigError("applies to type 'softmax' only; remove it or use type: softmax",
                              "temperature")
        return options

    def apply(self, gm: fx.GraphModule, ctx: PassContext) -> None:
        teacher = ctx.frozen_teacher()
        student_outputs = training_outputs(gm, ctx.example_inputs)
        with torch.no_grad():
            teacher_outputs = teacher(*ctx.example_inputs)
        plan = self.plan_outputs(student_outputs, teacher_outputs)

        loss = DistillLoss(self.loss_type, plan.distilled, weight=self.weight,
                           temperature=self.temperature, dim=self.dim)
        insert_distill_nodes(gm, teacher, loss)
        key = _unique_key(ctx.losses, self.name)
        ctx.add_loss(key, lambda: loss.last_loss)
        ctx.on_export(remove_distill_nodes)
        ctx.statistics[key] = self._statistics(plan)
        gm.graph.lint()
        gm.recompile()

    def plan_outputs(self, student_outputs: Any, teacher_outputs: Any) -> OutputPlan:
        """Pair the outputs by path and decide which take part; raise on anything unusable.

        Errors: :class:`ConfigError` for an ``outputs`` path the model does not have;
        :class:`DistillError` when no output is eligible, an explicitly listed output is not,
        a pair's shapes differ, or a softmax output has no dimension ``dim``.
        """
        leaves = tree_flatten_with_path(student_outputs)[0]
        names = [path_name(path) for path, _ in leaves]
        selected = self._selected(names)
        plan = OutputPlan()
        for (path, leaf), name in zip(leaves, names, strict=True):
            reason = exclusion_reason(leaf) if name in selected else NOT_SELECTED
            if reason is None:
                plan.distilled.append(path)
                continue
            plan.excluded[name] = reason
            if self.outputs is not None and name in self.outputs and reason != NOT_SELECTED:
                raise DistillError(f"distill: output {name!r} is listed in outputs but cannot be "
                                   f"distilled: {reason}. Remove it from outputs.")
        if not plan.distilled:
            listing = "; ".join(f"{n!r}: {r}" for n, r in plan.excluded.items()) or "none"
            raise DistillError(
                f"distill: no output of the model can be distilled. Output paths and why each is "
                f"excluded: {listing}. Only floating-point tensors that require grad take part: "
                f"return the predictions (logits) from forward, computed with autograd on and "
                f"with trainable parameters.")
        teacher_leaves = {path_name(p): leaf
                          for p, leaf in tree_flatten_with_path(teacher_outputs)[0]}
        for path in plan.distilled:
            self._check_pair(path_name(path), _at(leaves, path), teacher_leaves)
        return plan

    def _selected(self, names: list[str]) -> set[str]:
        if self.outputs is None:
            return set(names)
        chosen: set[str] = set()
        for i, pattern in enumerate(self.outputs):
            matched = {n for n in names if n == pattern or n.startswith(pattern + ".")}
            if not matched:
                raise ConfigError(f"the model has no output {pattern!r}; its output paths are: "
                                  f"{', '.join(names) or 'none'}", f"outputs[{i}]")
            chosen |= matched
        return chosen

    def _check_pair(self, name: str, student: torch.Tensor,
                    teacher_leaves: dict[str, Any]) -> None:
        teacher = teacher_leaves.get(name)
        if not isinstance(teacher, torch.Tensor):
            found = "missing" if name not in teacher_leaves else f"a {type(teacher).__name__}"
            raise DistillError(
                f"distill: output {name!r} is a tensor in the student but {found} in the teacher "
                f"(teacher output paths: {', '.join(teacher_leaves) or 'none'}); a pass changed "
                f"the output structure. Passes must keep the model's outputs.")
        if student.shape != teacher.shape:
            raise DistillError(
                f"distill: output {name!r} has shape {tuple(student.shape)} in the student but "
                f"{tuple(teacher.shape)} in the teacher; distilled outputs must keep their shape. "
                f"Leave it out with `outputs:` or keep the pass from changing it.")
        if student.dim() == 0:
            warnings.warn(
                f"distill: output {name!r} is a 0-dim tensor: the model seems to return a loss. "
                f"Return predictions, not losses (compute the loss outside the model), or leave "
                f"it out with `outputs:`.", UserWarning, stacklevel=2)
        if self.loss_type == "softmax" and not -student.dim() <= self.dim < student.dim():
            raise DistillError(
                f"distill: output {name!r} of shape {tuple(student.shape)} has no dimension "
                f"dim={self.dim} to take the softmax over; set `dim` to its class dimension "
                f"(e.g. dim: -1) or use type: mse.")

    def _statistics(self, plan: OutputPlan) -> dict[str, Any]:
        stats: dict[str, Any] = {"type": self.loss_type, "weight": self.weight}
        if self.loss_type == "softmax":
            stats.update(temperature=self.temperature, dim=self.dim)
        stats["distilled"] = [path_name(p) for p in plan.distilled]
        stats["excluded"] = dict(plan.excluded)
        return stats


def exclusion_reason(leaf: Any) -> str | None:
    """Why a student output cannot be distilled, or None when it can."""
    if not isinstance(leaf, torch.Tensor):
        return f"not a tensor ({type(leaf).__name__})"
    if not leaf.is_floating_point():
        kind = "complex" if leaf.is_complex() else "integer"
        return f"{kind} dtype {leaf.dtype}, not floating point"
    if not leaf.requires_grad:
        return "requires_grad=False (computed under no_grad or detached)"
    return None


def training_outputs(gm: fx.GraphModule, example_inputs: tuple) -> Any:
    """The student's outputs for one training-mode forward that leaves no trace.

    Buffers (BatchNorm running statistics, observer ranges), module modes and the RNG state are
    restored, so validating costs the user nothing but a forward. A model that cannot run in
    training mode on these inputs (BatchNorm on a batch of one) is run in eval mode instead; with
    a traced graph the output structure and ``requires_grad`` do not depend on the mode.
    """
    modes = {m: m.training for m in gm.modules()}
    saved = [(b, b.detach().clone()) for b in gm.buffers()]
    cuda = sorted({t.device.index or 0 for t in chain(gm.parameters(), gm.buffers())
                   if t.device.type == "cuda"})
    try:
        with torch.random.fork_rng(devices=cuda):
            gm.train()
            try:
                return gm(*example_inputs)
            except Exception as exc:  # noqa: BLE001 - retried below; a second failure propagates
                log.warning("distill: the student fails in training mode on the example inputs "
                            "(%s: %s); checking its outputs in eval mode", type(exc).__name__, exc)
                gm.eval()
                return gm(*example_inputs)
    finally:
        with torch.no_grad():
            for buffer, value in saved:
                buffer.copy_(value)
        for module, training in modes.items():
            module.training = training


def insert_distill_nodes(gm: fx.GraphModule, teacher: nn.Module, loss: DistillLoss) -> fx.Node:
    """Add the teacher call (shared with an earlier distill pass) right after the inputs, so its
    transient activations are freed before the student's are built, and ``loss`` just before the
    output on (student outputs, teacher outputs). Returns the loss node."""
    teacher_node = next((n for n in gm.graph.nodes if isinstance(module_of(gm, n), TeacherCall)),
                        None)
    if teacher_node is None:
        placeholders = find_nodes(gm, op="placeholder")
        keyword_only = _keyword_only_parameters(teacher)
        args = tuple(p for p in placeholders if p.target not in keyword_only)
        kwargs = {p.target: p for p in placeholders if p.target in keyword_only}
        name = add_module(gm, "teacher", TeacherCall(teacher))
        with gm.graph.inserting_after(placeholders[-1]):
            teacher_node = gm.graph.call_module(name, args, kwargs)
        teacher_node.meta["scope"] = ""
    output = find_nodes(gm, op="output")[0]
    name = add_module(gm, "distill_loss", loss)
    with gm.graph.inserting_before(output):
        loss_node = gm.graph.call_module(name, (output.args[0], teacher_node))
    loss_node.meta["scope"] = ""
    return loss_node


def _keyword_only_parameters(teacher: nn.Module) -> set[str]:
    """The teacher's keyword-only ``forward`` parameters: the traced student takes them by
    position too, the teacher must get them by name."""
    try:
        parameters = inspect.signature(teacher.forward).parameters.values()
    except (TypeError, ValueError):  # no introspectable signature: pass everything by position
        return set()
    return {p.name for p in parameters if p.kind is inspect.Parameter.KEYWORD_ONLY}


def remove_distill_nodes(gm: fx.GraphModule) -> None:
    """Export step: drop the teacher call and every loss node (and their modules)."""
    nodes = [n for n in gm.graph.nodes if isinstance(module_of(gm, n), (TeacherCall, DistillLoss))]
    if nodes:
        remove_nodes(gm, nodes)


def _at(leaves: list[tuple[KeyPath, Any]], path: KeyPath) -> Any:
    return next(leaf for p, leaf in leaves if p == path)


def _unique_key(existing: Mapping[str, Any], base: str) -> str:
    key, i = base, 0
    while key in existing:
        i += 1
        key = f"{base}_{i}"
    return key


__all__ = ["Distill", "OutputPlan", "ROOT_PATH", "exclusion_reason", "insert_distill_nodes",
           "remove_distill_nodes", "training_outputs"]

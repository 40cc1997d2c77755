"""The controller a user trains with after :func:`graphkd.compress`."""
from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any

import torch
from torch import fx, nn

from .pipeline import PassContext


class Compressed:
    """The compressed student plus the hooks the passes registered.

    Typical loop::

        c = gk.compress(model, "pipeline.yaml", x0)
        for x, y in loader:
            loss = criterion(c.model(x), y) + c.loss()
            loss.backward(); opt.step(); opt.zero_grad(); c.step()
        c.epoch_step()
        small = c.export()
    """

    def __init__(self, model: fx.GraphModule, ctx: PassContext) -> None:
        self.model = model
        self.context = ctx

    @property
    def teacher(self) -> nn.Module | None:
        """The frozen original model, when a pass (``distill``) uses one."""
        return self.context.teacher

    def loss(self) -> torch.Tensor:
        """Sum of the pass losses of the last training-mode forward (a zero tensor if none)."""
        total = None
        for fn in self.context.losses.values():
            value = fn()
            if value is not None:
                total = value if total is None else total + value
        if total is None:
            return torch.zeros((), device=self._device())
        return total

    def _device(self) -> torch.device:
        for tensor in self.model.parameters():
            return tensor.device
        for tensor in self.model.buffers():
            return tensor.device
        return torch.device("cpu")

    def step(self) -> None:
        """Call once per optimizer step: advances per-step schedules."""
        for fn in self.context.step_hooks:
            fn()

    def epoch_step(self) -> None:
        """Call once per epoch: advances per-epoch schedules."""
        for fn in self.context.epoch_hooks:
            fn()

    def init_ranges(self, data: Iterable, num_samples: int | None = None) -> None:
        """Re-initialise data-dependent state (quantizer ranges) from ``data`` batches.

        ``data`` yields inputs, or ``(inputs, targets)`` pairs whose first element is used;
        ``num_samples`` None lets each pass use its own configured count.
        """
        for fn in self.context.calibrators:
            fn(data, num_samples)

    def statistics(self) -> dict[str, dict]:
        """What each pass did, with live values (current sparsity level, pruned channels...)."""
        return {name: (value() if callable(value) else dict(value))
                for name, value in self.context.statistics.items()}

    def export(self) -> fx.GraphModule:
        """A deployable copy: export steps applied (masks folded, channels removed, teacher gone).

        The student itself is left as it was, still trainable.
        """
        # The teacher is shared, not copied: export steps drop it from the copy anyway.
        memo = {} if self.teacher is None else {id(self.teacher): self.teacher}
        exported = copy.deepcopy(self.model, memo)
        for fn in self.context.export_steps:
            fn(exported)
        exported.graph.eliminate_dead_code()
        exported.delete_all_unused_submodules()
        exported.graph.lint()
        exported.recompile()
        exported.eval()
        return exported

    def state_dict(self) -> dict[str, Any]:
        """The student's tensors and the passes' training state (schedule positions...)."""
        return {
            "model": self.model.state_dict(),
            "passes": {name: obj.state_dict() for name, obj in self.context.states.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        for name, obj in self.context.states.items():
            if name in state.get("passes", {}):
                obj.load_state_dict(state["passes"][name])

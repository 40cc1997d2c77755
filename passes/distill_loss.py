"""What the ``distill`` pass puts into the student graph: the teacher call and the KD loss node.

Both are ``call_module`` nodes the graph output does not use, so they are marked impure to survive
dead-code elimination, and both do nothing in eval mode. Outputs are paired by pytree key path
(``0``, ``logits``, ``aux.1``), so any nesting of tuples, lists and dicts works.
"""
from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils._pytree import GetAttrKey, KeyPath, MappingKey, SequenceKey, key_get

from graphkd.errors import DistillError

LossType = Literal["mse", "softmax"]

# The path of an output that is a single tensor (an empty key path).
ROOT_PATH = "<output>"


def path_name(path: KeyPath) -> str:
    """A dotted, user-facing name for a pytree key path: ``(MappingKey('aux'), SequenceKey(1))``
    -> ``aux.1``; the empty path (a single-tensor output) is ``<output>``."""
    if not path:
        return ROOT_PATH
    parts = []
    for key in path:
        if isinstance(key, SequenceKey):
            parts.append(str(key.idx))
        elif isinstance(key, MappingKey):
            parts.append(str(key.key))
        elif isinstance(key, GetAttrKey):
            parts.append(key.name)
        else:
            parts.append(str(key))
    return ".".join(parts)


def mse_term(student: Tensor, teacher: Tensor) -> Tensor:
    """Mean squared error over every element."""
    return F.mse_loss(student, teacher)


def softmax_term(student: Tensor, teacher: Tensor, temperature: float, dim: int) -> Tensor:
    """Hinton et al.'s soft-target cross-entropy: ``-sum_c softmax(t/T)_c log_softmax(s/T)_c``
    over ``dim``, averaged over every other position, times ``T**2`` (which keeps gradient
    magnitudes independent of T)."""
    if temperature != 1.0:
        student, teacher = student / temperature, teacher / temperature
    cross = -(F.softmax(teacher, dim) * F.log_softmax(student, dim)).sum(dim).mean()
    return cross * (temperature * temperature)


class TeacherCall(nn.Module):
    """Runs the frozen teacher on the student's inputs during training forwards.

    The teacher lives in a plain attribute, outside the module tree, so it has no ``state_dict``
    keys, ``DistributedDataParallel`` neither broadcasts nor syncs it, and ``student.train()``
    never reaches it (it stays in eval mode). ``_apply`` is forwarded so ``.to()``, ``.double()``
    and ``.cuda()`` on the student move it too. Returns None (no teacher forward at all) in eval
    mode or with autograd off, where no student output could be trained.
    """

    _is_impure = True

    def __init__(self, teacher: nn.Module) -> None:
        super().__init__()
        self.__dict__["teacher"] = teacher

    def forward(self, *inputs: Any, **keyword_inputs: Any) -> Any:
        if not (self.training and torch.is_grad_enabled()):
            return None
        with torch.no_grad():
            return self.teacher(*inputs, **keyword_inputs)

    def _apply(self, fn: Any, recurse: bool = True) -> TeacherCall:
        self.teacher._apply(fn)
        return super()._apply(fn, recurse)

    def extra_repr(self) -> str:
        return f"teacher={type(self.teacher).__name__} (frozen, outside the module tree)"


class DistillLoss(nn.Module):
    """Computes ``weight * sum over paths of term(student leaf, teacher leaf)`` and keeps it in
    :attr:`last_loss` until the next forward (None after an eval forward).

    A path takes part only when the student's leaf requires grad in this forward. The stored loss
    is dropped when the module is pickled or deep-copied (a non-leaf tensor cannot be).
    """

    _is_impure = True

    def __init__(self, loss_type: LossType, paths: list[KeyPath], *, weight: float = 1.0,
                 temperature: float = 1.0, dim: int = 1) -> None:
        super().__init__()
        self.loss_type = loss_type
        self.paths = list(paths)
        self.weight = weight
        self.temperature = temperature
        self.dim = dim
        self.last_loss: Tensor | None = None

    def forward(self, student: Any, teacher: Any) -> Tensor | None:
        self.last_loss = None
        if self.training and teacher is not None:
            self.last_loss = self._total(student, teacher)
        return self.last_loss

    def _total(self, student: Any, teacher: Any) -> Tensor | None:
        total = None
        for path in self.paths:
            s, t = _leaf(student, path, "student"), _leaf(teacher, path, "teacher")
            if not s.requires_grad:
                continue
            term = self.term(s, t)
            total = term if total is None else total + term
        return None if total is None else total * self.weight

    def term(self, student: Tensor, teacher: Tensor) -> Tensor:
        """The loss of one output pair, before ``weight``."""
        if self.loss_type == "mse":
            return mse_term(student, teacher)
        return softmax_term(student, teacher, self.temperature, self.dim)

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state["last_loss"] = None
        return state

    def extra_repr(self) -> str:
        names = ", ".join(path_name(p) for p in self.paths)
        extra = (f", temperature={self.temperature}, dim={self.dim}"
                 if self.loss_type == "softmax" else "")
        return f"type={self.loss_type}, weight={self.weight}{extra}, outputs=[{names}]"


def _leaf(tree: Any, path: KeyPath, model: str) -> Tensor:
    try:
        return key_get(tree, path)
    except (KeyError, IndexError, AttributeError, TypeError) as exc:
        raise DistillError(
            f"distill: the {model} output has no path {path_name(path)!r} in this forward "
            f"({type(exc).__name__}: {exc}); the model must return the same output structure as "
            f"the example inputs gave at compress time.") from exc

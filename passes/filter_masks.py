"""Filter importance, channel selection and the 0/1 channel masks of the ``prune`` pass.

Kept apart from the pass so the ranking rules can be tested (and reused) on plain tensors.
"""
from __future__ import annotations

import math

import torch
from torch import nn

CRITERIA = ("l1", "l2", "geometric_median")


class ChannelMask(nn.Module):
    """Multiplies a tensor by a 0/1 ``mask`` buffer along dimension ``dim``.

    Used on weight edges (filters or input slices of a layer), on bias edges and after
    per-channel norms. Gradients of masked entries are exactly zero. The mask is a buffer, so it
    follows ``.to(device)`` and is saved in the student's ``state_dict``.
    """

    def __init__(self, dim: int, size: int) -> None:
        super().__init__()
        self.dim = dim
        self.register_buffer("mask", torch.ones(size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = [1] * x.dim()
        shape[self.dim] = -1
        return x * self.mask.to(x.dtype).view(shape)

    def select_weight_channels(self, dim: int, keep: torch.Tensor) -> None:
        """Keep only entries ``keep`` when ``dim`` is the masked dimension (physical pruning)."""
        if dim == self.dim:
            self.mask = self.mask.index_select(0, keep.to(self.mask.device))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, kept={int(self.mask.count_nonzero())}/{self.mask.numel()}"


def filter_importance(weight: torch.Tensor, dim: int, criterion: str) -> torch.Tensor:
    """One score per slice of ``weight`` along ``dim`` (per filter); higher = more important.

    ``l1``: sum of absolute values. ``l2``: Euclidean norm. ``geometric_median`` (FPGM, He et
    al. 2019): the summed Euclidean distance to the layer's other filters, so filters close to
    the geometric median, which the others can stand in for, score low.
    """
    filters = weight.detach().movedim(dim, 0).reshape(weight.shape[dim], -1).float()
    if criterion == "l1":
        return filters.abs().sum(1)
    if criterion == "l2":
        return filters.norm(dim=1)
    if criterion == "geometric_median":
        return torch.cdist(filters[None], filters[None])[0].sum(1)
    raise ValueError(f"unknown criterion {criterion!r}; use one of {', '.join(CRITERIA)}")


def keep_count(size: int, ratio: float, round_to: int = 1, blocks: int = 1) -> int:
    """How many of ``size`` channels survive pruning ``ratio`` of them.

    ``floor(ratio * size)`` are removed, then the kept count is rounded *up* to a multiple of
    ``lcm(round_to, blocks)`` (never fewer than one such multiple, never more than ``size``), so
    hardware-friendly widths and grouped-conv blocks are respected and a layer never empties.
    """
    step = math.lcm(round_to, blocks)
    keep = size - math.floor(ratio * size + 1e-9)
    keep = max(step, math.ceil(keep / step) * step)
    return size if keep > size or keep % blocks else keep


def select_channels(importance: torch.Tensor, keep: int, blocks: int = 1) -> torch.Tensor:
    """A bool mask keeping the ``keep`` most important channels, ``keep // blocks`` in each of
    ``blocks`` equal contiguous blocks; ties keep the lower index (deterministic)."""
    size = importance.numel()
    per_block, width = keep // blocks, size // blocks
    kept = torch.zeros(size, dtype=torch.bool)
    for b in range(blocks):
        scores = importance[b * width:(b + 1) * width]
        order = torch.sort(-scores, stable=True).indices
        kept[b * width + order[:per_block]] = True
    return kept

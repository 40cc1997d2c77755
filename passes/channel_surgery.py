"""Physical channel removal: slice a module's tensors along the dims of its pruning sites.

A *site* is one tensor dimension of one module that holds pruned channels: ``(role, dim)`` of
:mod:`graphkd.passes.channels` (filters, input slices, depthwise filters, norm features). The same
plan serves the statistics (counts) and the export (index tensors), so both agree by construction.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import TypeVar

import torch
from torch import nn

from graphkd.graph import WEIGHT_LAYER_TYPES
from graphkd.passes.channel_model import Role

K = TypeVar("K")
Site = tuple[Role, int]


def slice_plan(module: nn.Module, sites: Mapping[Site, K]) -> dict[str, list[tuple[int, K]]]:
    """``{tensor name: [(dim, keep), ...]}`` for the module's own parameters and buffers.

    A layer's ``weight`` is cut along every layer-site dim; 1-D tensors (bias, norm affine,
    running stats, PReLU slopes) along dim 0 by the output-like site (filters, depthwise, norm).
    """
    tensors = dict(module.named_parameters(recurse=False))
    tensors.update(module.named_buffers(recurse=False))
    plan: dict[str, list[tuple[int, K]]] = {}
    out_like = [keep for (role, _), keep in sites.items() if role is not Role.IN]
    for name, tensor in tensors.items():
        if tensor is None or tensor.dim() == 0:
            continue
        if name == "weight" and isinstance(module, WEIGHT_LAYER_TYPES):
            plan[name] = [(dim, keep) for (role, dim), keep in sites.items()
                          if role is not Role.NORM]
        elif tensor.dim() == 1 and out_like:
            plan[name] = [(0, out_like[0])]
    return plan


def kept_numel(module: nn.Module, sizes: Mapping[Site, int]) -> int:
    """Parameter elements of ``module`` once its sites keep ``sizes`` entries."""
    plan = slice_plan(module, sizes)
    total = 0
    for name, p in module.named_parameters(recurse=False):
        shape = list(p.shape)
        for dim, size in plan.get(name, []):
            shape[dim] = size
        total += int(torch.Size(shape).numel())
    return total


def slice_module(module: nn.Module, keeps: Mapping[Site, torch.Tensor]) -> None:
    """Keep only the ``keeps`` indices of each site, then fix the module's size attributes."""
    for name, cuts in slice_plan(module, keeps).items():
        tensor = getattr(module, name)
        data = tensor.detach()
        for dim, keep in cuts:
            data = data.index_select(dim, keep.to(data.device))
        data = data.clone()
        if isinstance(tensor, nn.Parameter):
            setattr(module, name, nn.Parameter(data, requires_grad=tensor.requires_grad))
        else:
            setattr(module, name, data)
    if any(role is Role.DEPTHWISE for role, _ in keeps):
        module.groups = module.weight.shape[0]
    out_like = [keep.numel() for (role, _), keep in keeps.items() if role is not Role.IN]
    _update_sizes(module, out_like[0] if out_like else None)


def _update_sizes(m: nn.Module, channels: int | None) -> None:
    """Make ``in_channels``/``num_features``... describe the sliced tensors (``channels``: what
    a norm keeps, known even when it has no affine parameters)."""
    if isinstance(m, nn.Linear):
        m.out_features, m.in_features = m.weight.shape
    elif isinstance(m, nn.modules.conv._ConvTransposeNd):
        m.in_channels, m.out_channels = m.weight.shape[0], m.weight.shape[1] * m.groups
    elif isinstance(m, nn.modules.conv._ConvNd):
        m.out_channels, m.in_channels = m.weight.shape[0], m.weight.shape[1] * m.groups
    elif channels is None:
        return
    elif isinstance(m, nn.modules.batchnorm._NormBase):
        m.num_features = channels
    elif isinstance(m, nn.GroupNorm):
        m.num_channels = channels
    elif isinstance(m, nn.LayerNorm):
        m.normalized_shape = (channels,)
    elif isinstance(m, nn.PReLU):
        m.num_parameters = channels

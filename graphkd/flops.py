"""Count FLOPs and parameters of a traced graph from its propagated shapes.

FLOPs are 2 x multiply-accumulates of convolutions, linear layers and matrix products, the ops
that dominate inference cost; element-wise ops are not counted. Shapes come from
``node.meta["tensor_meta"]`` (see :func:`graphkd.trace.propagate_shapes`).
"""
from __future__ import annotations

import math
import operator

import torch
from torch import fx, nn

from .graph import layer_of
from .trace import node_shape

_MATMULS = {torch.matmul, torch.bmm, torch.mm, operator.matmul, "matmul", "bmm", "mm"}


def node_macs(gm: fx.GraphModule, node: fx.Node) -> int:
    """Multiply-accumulates of one node (0 for ops that are not counted or lack shapes).

    Layers count in both forms (``call_module`` or functionalized with a weight edge)."""
    out = node_shape(node)
    if out is None:
        return 0
    layer = layer_of(gm, node)
    if layer is not None:
        m = layer[1]
        if isinstance(m, nn.Linear):
            return math.prod(out) * m.in_features
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            return math.prod(out) * (m.in_channels // m.groups) * math.prod(m.kernel_size)
        inp = node_shape(node.args[0]) if isinstance(node.args[0], fx.Node) else None
        return 0 if inp is None else (
            math.prod(inp) * (m.out_channels // m.groups) * math.prod(m.kernel_size))
    if node.op in ("call_function", "call_method") and node.target in _MATMULS:
        first = node.args[0]
        inp = node_shape(first) if isinstance(first, fx.Node) else None
        if inp is None:
            return 0
        return math.prod(out) * inp[-1]
    return 0


def count_flops(gm: fx.GraphModule) -> int:
    """Total FLOPs (2 x MACs) of one forward at the propagated input shapes."""
    return 2 * sum(node_macs(gm, node) for node in gm.graph.nodes)


def count_params(module: nn.Module) -> int:
    """Number of parameter elements (shared parameters counted once)."""
    return sum(p.numel() for p in module.parameters())

"""Fold eval-mode BatchNorm into the Conv/Linear layer before it.

``y = gamma * (W x + b - mean) / sqrt(var + eps) + beta`` is the layer with weight
``W * s`` and bias ``(b - mean) * s + beta``, ``s = gamma / sqrt(var + eps)`` per output channel.
Used by the ``quantize`` pass so the weights it fake-quantizes are the weights that get deployed.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import fx, nn

from graphkd.graph import is_layer_node, layer_of
from graphkd.trace import node_shape

FOLDABLE_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def fold_batchnorms(gm: fx.GraphModule, select: Callable[[str], bool]) -> list[str]:
    """Fold every BatchNorm whose only input is a selected Conv/Linear used once and feeding only
    that BatchNorm; returns the module paths of the folded BatchNorms (removed from ``gm``).

    Not folded: a layer whose output channels are not on dim 1, where BatchNorm normalises
    (Linear on ``(N, L, C)`` tokens, unbatched convs), and a layer whose weight or bias
    parameter another module shares (scaling it would change that module too).

    Weight transforms already on the layer's weight edge (sparsity or pruning masks) are
    element-wise 0/1 masks, so scaling the stored weight commutes with them.
    """
    layer_uses: dict[str, int] = {}
    for node in gm.graph.nodes:
        info = layer_of(gm, node)
        if info is not None:
            layer_uses[info[0]] = layer_uses.get(info[0], 0) + 1
    param_uses: dict[int, int] = {}
    for _, param in gm.named_parameters(remove_duplicate=False):
        param_uses[id(param)] = param_uses.get(id(param), 0) + 1
    bn_uses: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            bn_uses[node.target] = bn_uses.get(node.target, 0) + 1
    folded = []
    for node in list(gm.graph.nodes):
        bn = gm.get_submodule(node.target) if node.op == "call_module" else None
        if not isinstance(bn, BATCH_NORMS) or bn.running_mean is None or bn_uses[node.target] != 1:
            continue
        source = node.args[0]
        info = layer_of(gm, source) if isinstance(source, fx.Node) else None
        if info is None or not isinstance(info[1], FOLDABLE_LAYERS) or layer_uses[info[0]] != 1:
            continue
        if len(source.users) != 1 or not select(info[0]):
            continue
        if not _channels_on_dim1(source, info[1]) or any(
                param_uses[id(p)] > 1 for p in (info[1].weight, info[1].bias) if p is not None):
            continue
        _fold_into(gm, source, info[0], info[1], bn)
        node.replace_all_uses_with(source)
        gm.graph.erase_node(node)
        _delete_submodule(gm, node.target)
        folded.append(node.target)
    return folded


def _channels_on_dim1(layer_node: fx.Node, layer: nn.Module) -> bool:
    """Whether the layer's output channels are on dim 1: a batched output has one dim more than
    the input of one sample, i.e. as many dims as the weight (``(N, C)`` for Linear)."""
    shape = node_shape(layer_node)
    return shape is not None and len(shape) == layer.weight.dim()


@torch.no_grad()
def _fold_into(gm: fx.GraphModule, layer_node: fx.Node, path: str, layer: nn.Module,
               bn: nn.Module) -> None:
    scale = torch.rsqrt(bn.running_var + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight
    shift = -bn.running_mean * scale
    if bn.bias is not None:
        shift = shift + bn.bias
    layer.weight.mul_(scale.reshape(-1, *[1] * (layer.weight.dim() - 1)))
    if layer.bias is None:
        layer.bias = nn.Parameter(shift.clone())
        if is_layer_node(layer_node):  # functional form: give the call its new bias edge
            with gm.graph.inserting_before(layer_node):
                bias = gm.graph.get_attr(f"{path}.bias")
            bias.meta["scope"] = layer_node.meta.get("scope", path)
            layer_node.update_arg(2, bias)
    else:
        layer.bias.mul_(scale).add_(shift)


def _delete_submodule(gm: fx.GraphModule, target: str) -> None:
    parent_name, _, attr = target.rpartition(".")
    parent = gm.get_submodule(parent_name) if parent_name else gm
    delattr(parent, attr)

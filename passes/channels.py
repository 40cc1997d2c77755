"""Channel dependency groups: which channels of which modules must be removed together.

Removing output channel ``c`` of a conv is only valid if every module that reads or carries that
channel drops it too: the following BatchNorm, a depthwise conv, the next conv's input slice, the
other branch of a residual add, the slice of a concatenation, the feature block of a linear layer
after ``flatten``. :func:`channel_groups` walks the fx graph once in topological order, gives every
tensor a :class:`ChannelMap` (which group owns each of its channels) and collects, per group, the
:class:`Member` slices of module tensors that hold its channels.

Anything the walk does not understand (a reshape that mixes channels, indexing, a model output, a
loss node) *blocks* the groups of its inputs: those channels are never pruned, so the analysis can
miss savings but never produce a wrong model. Layers are found in either form (``call_module`` or
functionalized with a weight edge) through :func:`graphkd.graph.layer_of`.

GroupNorm (with fewer groups than channels) and LayerNorm over the channel dim compute statistics
across channels: a zeroed channel still counts in the masked student but is gone after export, so
the two would differ. Such norms block their groups; per-channel norms (BatchNorm, InstanceNorm,
GroupNorm with one channel per group) follow their producer.

Example::

    groups = channel_groups(gm).groups
    [str(m) for m in groups[0].members]   # ['conv1:out', 'bn1:norm', 'layer1.0.conv1:in', ...]
"""
from __future__ import annotations

import math
import operator
import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn

from graphkd.graph import layer_of, module_of, target_name
from graphkd.passes.channel_model import ChannelGroups, GroupTable, Member, Role
from graphkd.trace import node_shape


@dataclass(frozen=True)
class Segment:
    """A run of channels in a tensor: all channels of group ``group``, ``span`` indices each."""

    group: int
    span: int = 1


@dataclass(frozen=True)
class ChannelMap:
    """Which groups own the channels of one tensor: ``segments`` in order along dim ``dim``."""

    dim: int
    segments: tuple[Segment, ...]


_ACTIVATION_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Sigmoid, nn.Tanh, nn.Softplus, nn.Identity,
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
)
_SPATIAL_MODULES = (
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.Upsample, nn.ZeroPad2d,
)
_POINTWISE_FUNCTIONS = {
    operator.add, operator.sub, operator.mul, operator.truediv, operator.neg, operator.iadd,
    operator.imul, torch.add, torch.sub, torch.mul, torch.div, torch.relu, torch.sigmoid,
    torch.tanh, torch.clamp, torch.neg, torch.exp, F.relu, F.relu6, F.gelu, F.silu, F.mish,
    F.hardswish, F.hardsigmoid, F.hardtanh, F.leaky_relu, F.elu, F.sigmoid, F.tanh, F.dropout,
    F.softplus,
}
_POINTWISE_METHODS = {
    "add", "sub", "mul", "div", "relu", "relu_", "sigmoid", "tanh", "clamp", "neg", "exp",
    "contiguous", "clone", "add_", "mul_",
}
_SPATIAL_FUNCTIONS = {
    F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
    F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, F.adaptive_max_pool2d,
    F.interpolate,
}
_REDUCTIONS = {torch.mean, torch.sum, torch.amax, torch.amin, "mean", "sum", "amax", "amin"}
_PER_CHANNEL_NORMS = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)
_METADATA_METHODS = {"size", "dim"}
_CATS = {torch.cat, torch.concat}
_FLATTENS = {torch.flatten, "flatten"}
_RESHAPES = {torch.reshape, "reshape", "view"}


class _ChannelWalk:
    """One topological pass over the graph that assigns a :class:`ChannelMap` to each tensor."""

    def __init__(self, gm: fx.GraphModule) -> None:
        self.gm = gm
        self.table = GroupTable()
        self.maps: dict[fx.Node, ChannelMap] = {}
        self.input_layers: set[str] = set()
        self.layer_nodes: dict[str, list[fx.Node]] = {}

    def run(self) -> ChannelGroups:
        for node in self.gm.graph.nodes:
            self.visit(node)
        return ChannelGroups(self.table.result(), self.input_layers, self.layer_nodes)

    # -- dispatch ---------------------------------------------------------------------------
    def visit(self, node: fx.Node) -> None:
        layer = layer_of(self.gm, node)
        if layer is not None:
            self.layer(node, *layer)
            return
        if not any(n in self.maps for n in node.all_input_nodes):
            return
        if node.op == "output":
            self.block_inputs(node, "it is a model output")
            return
        module = module_of(self.gm, node)
        if module is not None:
            self.module(node, module)
        elif node.target in _POINTWISE_FUNCTIONS or (
                node.op == "call_method" and node.target in _POINTWISE_METHODS):
            self.pointwise(node)
        elif node.target in _SPATIAL_FUNCTIONS:
            self.spatial(node, _spatial_rank(node.target.__name__))
        elif node.target in _CATS:
            self.cat(node)
        elif node.target in _FLATTENS:
            self.flatten(node, *self.flatten_range(node))
        elif node.target in _RESHAPES:
            self.reshape(node)
        elif node.target in _REDUCTIONS:
            self.reduce(node)
        elif node.op == "call_method" and node.target in _METADATA_METHODS:
            self.metadata(node)
        else:
            self.block_inputs(node, f"{node.op} {target_name(node.target)!r} is not understood")

    def module(self, node: fx.Node, m: nn.Module) -> None:
        if isinstance(m, nn.Flatten):
            self.flatten(node, m.start_dim, m.end_dim)
        elif isinstance(m, _PER_CHANNEL_NORMS):
            self.norm(node, channel_dim=1)
        elif isinstance(m, nn.GroupNorm):
            self.group_norm(node, m)
        elif isinstance(m, nn.LayerNorm):
            self.layer_norm(node, m)
        elif isinstance(m, nn.PReLU):
            if m.num_parameters == 1:
                self.pointwise(node)
            else:
                self.norm(node, channel_dim=1)
        elif isinstance(m, _ACTIVATION_MODULES) or getattr(type(m), "elementwise", False):
            self.pointwise(node)
        elif isinstance(m, _SPATIAL_MODULES):
            self.spatial(node, _spatial_rank(type(m).__name__))
        else:
            self.block_inputs(node, f"module {node.target!r} ({type(m).__name__}) is not "
                                    f"understood")

    # -- helpers ----------------------------------------------------------------------------
    def why(self, node: fx.Node, reason: str) -> str:
        return f"node {node.name!r}: {reason}"

    def block(self, cmap: ChannelMap, reason: str) -> None:
        for seg in cmap.segments:
            self.table.block(seg.group, reason)

    def block_inputs(self, node: fx.Node, reason: str) -> None:
        for n in node.all_input_nodes:
            if n in self.maps:
                self.block(self.maps[n], self.why(node, reason))

    def members(self, cmap: ChannelMap, module: str, role: Role, dim: int) -> None:
        """Register every segment of ``cmap`` as a slice of ``module``'s dimension ``dim``."""
        offset = 0
        for seg in cmap.segments:
            self.table.add(seg.group, Member(module, role, dim, offset, seg.span))
            offset += self.table.size(seg.group) * seg.span

    def unify(self, node: fx.Node, maps: Sequence[ChannelMap]) -> ChannelMap | None:
        """Tensors combined channel by channel: their groups merge segment by segment.
        Differently segmented tensors (a concat added to a conv output) block instead."""
        first = maps[0]
        for other in maps[1:]:
            same = other.dim == first.dim and len(other.segments) == len(first.segments) and all(
                a.span == b.span and self.table.size(a.group) == self.table.size(b.group)
                for a, b in zip(first.segments, other.segments))
            if not same:
                for cmap in maps:
                    self.block(cmap, self.why(node, "combines differently segmented channels"))
                return None
            for a, b in zip(first.segments, other.segments):
                self.table.union(a.group, b.group)
        return first

    def tensor_args(self, node: fx.Node) -> list[fx.Node]:
        return [n for n in node.all_input_nodes if node_shape(n) is not None]

    # -- rules ------------------------------------------------------------------------------
    def layer(self, node: fx.Node, path: str, m: nn.Module) -> None:
        self.layer_nodes.setdefault(path, []).append(node)
        source = node.args[0]
        cmap = self.maps.get(source) if isinstance(source, fx.Node) else None
        if cmap is None:
            self.input_layers.add(path)
        transposed = isinstance(m, nn.modules.conv._ConvTransposeNd)
        linear = isinstance(m, nn.Linear)
        groups = getattr(m, "groups", 1)
        out_shape = node_shape(node)
        if groups > 1 and groups == m.in_channels == m.out_channels and not transposed:
            if cmap is not None:
                if cmap.dim != 1:
                    self.block(cmap, self.why(node, "depthwise conv input is not channel-first"))
                else:
                    self.members(cmap, path, Role.DEPTHWISE, 0)
                    self.maps[node] = cmap
            return
        if cmap is not None:
            expected = len(node_shape(source) or ()) - 1 if linear else 1
            if cmap.dim != expected:
                self.block(cmap, self.why(node, f"{path} reads channels on dim {cmap.dim}"))
            elif groups > 1:
                self.block(cmap, self.why(node, f"{path} is a grouped conv (groups={groups})"))
            else:
                self.members(cmap, path, Role.IN, 0 if transposed else 1)
        if out_shape is None:
            return
        size = m.out_features if linear else m.out_channels
        gid = self.table.new(size)
        self.table.add(gid, Member(path, Role.OUT, 1 if transposed else 0))
        if groups > 1:
            if transposed:
                self.table.block(gid, self.why(node, f"{path} is a grouped transposed conv"))
            else:
                self.table.constrain(gid, groups)
        dim = len(out_shape) - 1 if linear else 1
        self.maps[node] = ChannelMap(dim, (Segment(gid),))

    def pointwise(self, node: fx.Node) -> None:
        """Element-wise ops keep channels; tensors combined by them must agree channel-wise."""
        out = node_shape(node)
        mapped = [n for n in node.all_input_nodes if n in self.maps]
        if out is None or any(node_shape(n) != out for n in mapped):
            self.block_inputs(node, "broadcasts channel tensors to a new shape")
            return
        dim = self.maps[mapped[0]].dim
        for n in self.tensor_args(node):
            if n in self.maps:
                continue
            shape = node_shape(n)
            lead = len(out) - len(shape)
            if dim >= lead and shape[dim - lead] != 1:
                self.block_inputs(node, f"combines channels with the unprunable tensor {n.name!r}")
                return
        cmap = self.unify(node, [self.maps[n] for n in mapped])
        if cmap is not None:
            self.maps[node] = cmap

    def spatial(self, node: fx.Node, rank: int | None) -> None:
        """Pooling/resizing: channel-first tensors keep their channels. A ``rank``-d pool given
        fewer dims (a 2-d pool on ``(N, C, L)``) pools over the channels as well."""
        source = node.args[0]
        cmap = self.maps.get(source) if isinstance(source, fx.Node) else None
        shape, out = node_shape(source), node_shape(node)
        if cmap is None or len(node.all_input_nodes) != 1 or cmap.dim != 1 or out is None or (
                len(shape) < 3 or out[:2] != shape[:2] or rank not in (None, len(shape) - 2)):
            self.block_inputs(node, "pools over the channel dimension")
            return
        self.maps[node] = cmap

    def norm(self, node: fx.Node, channel_dim: int) -> None:
        cmap = self.maps.get(node.args[0])
        if cmap is None or cmap.dim != channel_dim % len(node_shape(node)):
            self.block_inputs(node, "normalizes a dimension other than the channels")
            return
        self.members(cmap, node.target, Role.NORM, channel_dim)
        self.maps[node] = cmap

    def group_norm(self, node: fx.Node, m: nn.GroupNorm) -> None:
        cmap = self.maps.get(node.args[0])
        if cmap is None or cmap.dim != 1 or len(cmap.segments) != 1 or cmap.segments[0].span != 1:
            self.block_inputs(node, "GroupNorm over a concatenation or flattened features")
            return
        if m.num_groups < m.num_channels:
            self.block_inputs(node, "GroupNorm computes statistics across channels")
            return
        self.norm(node, 1)

    def layer_norm(self, node: fx.Node, m: nn.LayerNorm) -> None:
        cmap = self.maps.get(node.args[0])
        shape = node_shape(node)
        normalized = len(m.normalized_shape)
        if cmap is not None and cmap.dim < len(shape) - normalized:
            self.pointwise(node)  # normalizes within each channel: channels pass through
            return
        self.block_inputs(node, "LayerNorm computes statistics across channels")

    def cat(self, node: fx.Node) -> None:
        """Concatenation along the channel dim maps channel offsets to each input's groups."""
        tensors = node.args[0]
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        out = node_shape(node)
        if not isinstance(tensors, (list, tuple)) or out is None:
            self.block_inputs(node, "concatenates something other than a list of tensors")
            return
        dim %= len(out)
        maps = [self.maps.get(t) for t in tensors]
        if any(cmap is not None and cmap.dim != dim for cmap in maps):
            if any(cmap is None for cmap in maps):
                self.block_inputs(node, "concatenates prunable and fixed tensors along a "
                                        "non-channel dim")
                return
            cmap = self.unify(node, maps)
            if cmap is not None:
                self.maps[node] = cmap
            return
        segments: list[Segment] = []
        for tensor, cmap in zip(tensors, maps):
            if cmap is None:  # fixed channels (e.g. the model input) get a blocked group
                gid = self.table.new(node_shape(tensor)[dim])
                self.table.block(gid, self.why(node, f"channels of {tensor.name!r} are fixed"))
                cmap = ChannelMap(dim, (Segment(gid),))
            segments += cmap.segments
        self.maps[node] = ChannelMap(dim, tuple(segments))

    def flatten_range(self, node: fx.Node) -> tuple[int, int]:
        args = list(node.args[1:]) + [None, None]
        start = node.kwargs.get("start_dim", args[0] if args[0] is not None else 0)
        end = node.kwargs.get("end_dim", args[1] if args[1] is not None else -1)
        return start, end

    def flatten(self, node: fx.Node, start: int, end: int) -> None:
        """Flattening the channel dim with the dims after it makes each channel a block of
        ``span`` consecutive features; flattening it with earlier dims interleaves (blocks)."""
        source = node.args[0]
        cmap, shape = self.maps[source], node_shape(source)
        start, end = start % len(shape), end % len(shape)
        if cmap.dim < start:
            self.maps[node] = cmap
        elif cmap.dim > end:
            self.maps[node] = ChannelMap(cmap.dim - (end - start), cmap.segments)
        elif cmap.dim == start:
            factor = math.prod(shape[start + 1:end + 1])
            segments = tuple(Segment(s.group, s.span * factor) for s in cmap.segments)
            self.maps[node] = ChannelMap(start, segments)
        else:
            self.block(cmap, self.why(node, "flattens channels with the dims before them"))

    def reshape(self, node: fx.Node) -> None:
        """``view``/``reshape`` is understood only when it equals a flatten and gives the
        dimension holding the channels as ``-1``: any other size is fixed in the graph and
        would be wrong once channels are removed."""
        source = node.args[0]
        cmap, shape, out = self.maps.get(source), node_shape(source), node_shape(node)
        sizes = node.kwargs.get("shape", node.args[1:])
        if len(sizes) == 1 and isinstance(sizes[0], (list, tuple)):
            sizes = sizes[0]
        if cmap is not None and shape is not None and out is not None:
            for start in range(len(shape)):
                for end in range(start, len(shape)):
                    merged = shape[:start] + (math.prod(shape[start:end + 1]),) + shape[end + 1:]
                    if merged != out:
                        continue
                    dim = cmap.dim - (end - start) if cmap.dim > end else min(cmap.dim, start)
                    if len(sizes) != len(out) or sizes[dim] != -1:
                        self.block(cmap, self.why(node, f"gives the channel dim {dim} a fixed "
                                                        f"size (use -1 there, or flatten)"))
                    else:
                        self.flatten(node, start, end)
                    return
        self.block_inputs(node, "reshapes channels (only flatten-like reshapes are understood)")

    def metadata(self, node: fx.Node) -> None:
        """``size()`` of the channel dim bakes the channel count into later computation, which
        the export would then do with fewer channels; other sizes and ``dim()`` are harmless."""
        cmap = self.maps.get(node.args[0])
        if node.target != "size" or cmap is None:
            return
        ndim = len(node_shape(node.args[0]))
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        if dim is None:  # size() read through indexing only: n, c, h, w = x.size()
            dims = [u.args[1] if u.target is operator.getitem else None for u in node.users]
        else:
            dims = [dim]
        if not all(isinstance(d, int) and d % ndim != cmap.dim for d in dims):
            self.block(cmap, self.why(node, "reads the channel count"))

    def reduce(self, node: fx.Node) -> None:
        source = node.args[0]
        cmap, shape = self.maps.get(source), node_shape(source)
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        keepdim = node.kwargs.get("keepdim", node.args[2] if len(node.args) > 2 else False)
        if cmap is None or dims is None or node_shape(node) is None:
            self.block_inputs(node, "reduces over the channel dimension")
            return
        dims = {d % len(shape) for d in ([dims] if isinstance(dims, int) else dims)}
        if cmap.dim in dims:
            self.block(cmap, self.why(node, "reduces over the channel dimension"))
            return
        shift = 0 if keepdim else sum(d < cmap.dim for d in dims)
        self.maps[node] = ChannelMap(cmap.dim - shift, cmap.segments)


def _spatial_rank(name: str) -> int | None:
    """How many trailing dims a ``...1d``/``2d``/``3d`` pool or pad works on (None: any)."""
    match = re.search(r"([123])d$", name)
    return int(match.group(1)) if match else None


def channel_groups(gm: fx.GraphModule) -> ChannelGroups:
    """Compute the channel dependency groups of ``gm`` (shapes must be propagated)."""
    return _ChannelWalk(gm).run()

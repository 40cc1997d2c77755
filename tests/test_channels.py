"""Channel dependency groups: exact groups on residual, dense, mobile and flatten+linear models."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import graphkd as gk
from graphkd.graph import functionalize_layer, layer_of
from graphkd.passes.channel_model import Member, Role
from graphkd.passes.channels import channel_groups
from graphkd.zoo import resnet_tiny
from tests.models import FlattenLinear


def groups_of(model: nn.Module, x: torch.Tensor) -> list[tuple[int, list[str], bool]]:
    result = channel_groups(gk.trace(model, x))
    return [(g.size, [str(m) for m in g.members], g.prunable) for g in result.groups]


def test_resnet_groups_merge_residual_adds_and_keep_downsample_with_its_stage():
    groups = groups_of(resnet_tiny(), torch.randn(1, 3, 16, 16))
    assert groups == [
        (16, ["conv1:out", "bn1:norm", "layer1.0.conv1:in", "layer1.0.conv2:out",
              "layer1.0.bn2:norm", "layer2.0.downsample.0:in", "layer2.0.conv1:in"], True),
        (16, ["layer1.0.conv1:out", "layer1.0.bn1:norm", "layer1.0.conv2:in"], True),
        (32, ["layer2.0.downsample.0:out", "layer2.0.downsample.1:norm", "layer2.0.conv2:out",
              "layer2.0.bn2:norm", "fc:in"], True),
        (32, ["layer2.0.conv1:out", "layer2.0.bn1:norm", "layer2.0.conv2:in"], True),
        (10, ["fc:out"], False),
    ]


class DenseBlock(nn.Module):
    """Two DenseNet layers: each concatenates its new features to everything before it."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.bn0 = nn.BatchNorm2d(8)
        self.c1 = nn.Conv2d(8, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(12)
        self.c2 = nn.Conv2d(12, 4, 3, padding=1)
        self.out = nn.Conv2d(16, 6, 1)

    def forward(self, x):
        x0 = F.relu(self.bn0(self.stem(x)))
        x1 = torch.cat([x0, self.c1(x0)], 1)
        x2 = torch.cat([x1, self.c2(F.relu(self.bn1(x1)))], 1)
        return self.out(x2).mean((2, 3))


def test_dense_block_cat_maps_channel_offsets_to_each_producer():
    groups = groups_of(DenseBlock(), torch.randn(1, 3, 8, 8))
    assert groups == [
        (8, ["stem:out", "bn0:norm", "c1:in", "bn1:norm", "c2:in", "out:in"], True),
        (4, ["c1:out", "bn1:norm[8:+1x]", "c2:in[8:+1x]", "out:in[8:+1x]"], True),
        (4, ["c2:out", "out:in[12:+1x]"], True),
        (6, ["out:out"], False),
    ]


class MobileBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem, self.bn0 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.dw, self.bn1 = nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.BatchNorm2d(8)
        self.pw, self.bn2 = nn.Conv2d(8, 16, 1), nn.BatchNorm2d(16)

    def forward(self, x):
        x = F.relu6(self.bn0(self.stem(x)))
        x = F.relu6(self.bn1(self.dw(x)))
        return F.relu6(self.bn2(self.pw(x))).mean((2, 3))


def test_depthwise_conv_follows_its_input_and_pointwise_consumes_it():
    groups = groups_of(MobileBlock(), torch.randn(1, 3, 8, 8))
    assert groups == [
        (8, ["stem:out", "bn0:norm", "dw:depthwise", "bn1:norm", "pw:in"], True),
        (16, ["pw:out", "bn2:norm"], False),
    ]


def test_flatten_then_linear_maps_each_channel_to_a_block_of_features():
    result = channel_groups(gk.trace(FlattenLinear(), torch.randn(1, 2, 6, 6)))
    conv_group = result.groups[0]
    assert [str(m) for m in conv_group.members] == ["conv:out", "fc:in[0:+16x]"]
    fc_in = conv_group.members[1]
    assert fc_in == Member("fc", Role.IN, 1, 0, 16)
    assert fc_in.indices(torch.tensor([0, 2])).tolist() == list(range(16)) + list(range(32, 48))
    assert result.input_layers == {"conv"}


def test_functionalized_layers_give_the_same_groups():
    model, x = resnet_tiny(), torch.randn(1, 3, 16, 16)
    plain = groups_of(model, x)
    gm = gk.trace(model, x)
    for node in list(gm.graph.nodes):
        if layer_of(gm, node) is not None:
            functionalize_layer(gm, node)
    gm.recompile()
    result = channel_groups(gm)
    assert [(g.size, [str(m) for m in g.members], g.prunable) for g in result.groups] == plain


class Blocked(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 1), nn.Conv2d(4, 4, 1)
        self.d = nn.Conv2d(3, 4, 1)

    def forward(self, x):
        mixed = self.a(x).view(x.shape[0], 2, 2, 8, 8).transpose(1, 2).reshape(x.shape[0], 4, 8, 8)
        picked = self.b(x)[:, :2]
        return self.c(mixed), picked, self.d(x)


def test_unknown_ops_and_outputs_block_their_groups():
    result = channel_groups(gk.trace(Blocked(), torch.randn(1, 3, 8, 8)))
    by_producer = {g.members[0].module: g for g in result.groups}
    assert by_producer["a"].blockers == [
        "node 'view': reshapes channels (only flatten-like reshapes are understood)"]
    assert by_producer["b"].blockers == [
        "node 'getitem_2': call_function 'getitem' is not understood"]
    assert by_producer["c"].blockers == by_producer["d"].blockers == [
        "node 'output': it is a model output"]


class Shapes(nn.Module):
    """A layer called twice, a grouped conv and an element-wise activation quantizer."""

    class Quant(nn.Module):
        elementwise = True

        def forward(self, x):
            return torch.round(x * 4) / 4

    def __init__(self) -> None:
        super().__init__()
        self.shared = nn.Conv2d(4, 4, 1)
        self.stem = nn.Conv2d(3, 4, 1)
        self.q = self.Quant()
        self.grouped = nn.Conv2d(4, 6, 3, padding=1, groups=2)
        self.head = nn.Conv2d(6, 2, 1)

    def forward(self, x):
        y = self.q(self.stem(x))
        y = self.shared(self.shared(y))
        return self.head(self.grouped(y))


def test_shared_layer_merges_grouped_conv_keeps_blocks_and_quantizer_passes_through():
    gm = gk.trace(Shapes(), torch.randn(1, 3, 4, 4), leaf_modules=[Shapes.Quant])
    result = channel_groups(gm)
    got = [(g.size, [str(m) for m in g.members], g.blocks, g.blockers) for g in result.groups]
    assert got == [
        (4, ["stem:out", "shared:in", "shared:out"],
         1, ["node 'grouped': grouped is a grouped conv (groups=2)"]),
        (6, ["grouped:out", "head:in"], 2, []),
        (2, ["head:out"], 1, ["node 'output': it is a model output"]),
    ]


class CrossChannelNorms(nn.Module):
    """Norms whose statistics span channels (block) next to per-channel ones (follow)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1)
        self.gn = nn.GroupNorm(2, 8)
        self.b = nn.Conv2d(8, 8, 1)
        self.inorm = nn.GroupNorm(8, 8)
        self.c = nn.Conv2d(8, 6, 1)
        self.ln = nn.LayerNorm(6)
        self.head = nn.Conv2d(6, 2, 1)

    def forward(self, x):
        x = self.b(self.gn(self.a(x)))
        x = self.c(self.inorm(x))
        return self.head(self.ln(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2))


def test_norms_with_cross_channel_statistics_block_their_groups():
    groups = channel_groups(gk.trace(CrossChannelNorms(), torch.randn(2, 3, 4, 4))).groups
    by_producer = {g.members[0].module: g for g in groups}
    assert by_producer["a"].blockers and "GroupNorm computes statistics across channels" in (
        by_producer["a"].blockers[0])
    assert by_producer["b"].prunable
    assert [str(m) for m in by_producer["b"].members] == ["b:out", "inorm:norm", "c:in"]
    assert not by_producer["c"].prunable

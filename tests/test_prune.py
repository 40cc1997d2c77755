"""The prune pass: criteria, masks, export with physical channel removal, FLOPs targets, errors."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import graphkd as gk
from graphkd.flops import count_flops, count_params
from graphkd.passes.filter_masks import filter_importance, keep_count, select_channels
from graphkd.passes.prune import Prune
from graphkd.passes.prune_nncf import translate_nncf_pruning
from graphkd.trace import propagate_shapes
from graphkd.zoo import digits_cnn, resnet_tiny
from tests.models import randomize_norms

ALL = {"prune_first_conv": True, "prune_downsample_convs": True}


def compress(model: nn.Module, x: torch.Tensor, **options) -> gk.Compressed:
    return gk.compress(model, {"pipeline": [{"pass": "prune", **options}]}, x)


# -- criteria -----------------------------------------------------------------------------
FILTERS = torch.tensor([[3.0, 0.0], [2.0, 2.0], [1.0, 1.0], [0.0, 2.5]])


def test_l1_l2_and_geometric_median_scores_match_hand_computation():
    weight = FILTERS.view(4, 1, 1, 2)
    assert filter_importance(weight, 0, "l1").tolist() == [3.0, 4.0, 2.0, 2.5]
    l2 = [math.hypot(*f) for f in FILTERS.tolist()]
    assert filter_importance(weight, 0, "l2").tolist() == pytest.approx(l2)
    fpgm = [sum(math.dist(f, g) for g in FILTERS.tolist()) for f in FILTERS.tolist()]
    assert filter_importance(weight, 0, "geometric_median").tolist() == pytest.approx(fpgm)
    # dim 1 scores input slices: transpose the same numbers
    assert filter_importance(weight.transpose(0, 1), 1, "l1").tolist() == [3.0, 4.0, 2.0, 2.5]


@pytest.mark.parametrize("criterion, kept", [
    ("l1", [1]),                 # L1 4.0 beats 3.0
    ("l2", [0]),                 # L2 3.0 beats 2.83
    ("geometric_median", [0]),   # farthest from the others
])
def test_criterion_decides_which_filter_survives(criterion, kept):
    model = nn.Sequential(nn.Conv2d(1, 4, (1, 2)), nn.ReLU(), nn.Conv2d(4, 2, 1))
    with torch.no_grad():
        model[0].weight.copy_(FILTERS.view(4, 1, 1, 2))
        model[0].bias.zero_()
    c = compress(model, torch.randn(1, 1, 3, 3), ratio=0.75, criterion=criterion,
                 prune_first_conv=True)
    mask = c.model.get_submodule("prune_masks.0_out_weight").mask
    assert mask.nonzero().flatten().tolist() == kept
    exported = c.export().get_submodule("0").weight
    assert exported.flatten().tolist() == FILTERS[kept].flatten().tolist()


def test_group_importance_is_the_sum_over_its_filters():
    class TwoBranches(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(1, 3, 1, bias=False), nn.Conv2d(1, 3, 1, bias=False)
            self.head = nn.Conv2d(3, 1, 1)

        def forward(self, x):
            return self.head(torch.relu(self.a(x) + self.b(x)))

    model = TwoBranches()
    with torch.no_grad():
        model.a.weight.copy_(torch.tensor([5.0, 1.0, 0.0]).view(3, 1, 1, 1))
        model.b.weight.copy_(torch.tensor([-1.0, 3.0, 5.5]).view(3, 1, 1, 1))
    # L1 sums: 6, 4, 5.5 -> keep channels 0 and 2 at ratio 1/3 (a alone would keep 0 and 1)
    c = compress(model, torch.randn(1, 1, 2, 2), ratio=0.34, criterion="l1", prune_first_conv=True)
    assert c.export().a.weight.flatten().tolist() == [5.0, 0.0]
    assert c.statistics()["prune"]["groups"][0]["members"] == ["a:out", "b:out", "head:in"]


def test_keep_count_and_block_selection():
    assert [keep_count(16, r) for r in (0.0, 0.3, 0.5, 0.99)] == [16, 12, 8, 1]
    assert [keep_count(16, r, round_to=4) for r in (0.3, 0.4, 0.99)] == [12, 12, 4]
    assert keep_count(10, 0.1, round_to=4) == 10  # rounding up past the size keeps all
    assert keep_count(6, 0.5, blocks=2) == 4       # 3 rounded up to a multiple of 2 blocks
    kept = select_channels(torch.tensor([1.0, 9, 8, 7, 2, 3]), 4, blocks=2)
    assert kept.tolist() == [False, True, True, True, False, True]  # 9, 8 | 7, 3
    assert select_channels(torch.tensor([1.0, 1, 1]), 2).tolist() == [True, True, False]


# -- masks and export ---------------------------------------------------------------------
@pytest.mark.parametrize("ratio", [0.3, 0.5, 0.7])
def test_export_removes_channels_and_equals_the_masked_student(ratio):
    model, x = randomize_norms(resnet_tiny()), torch.randn(4, 3, 16, 16)
    c = compress(model, x, ratio=ratio, **ALL)
    c.model.eval()
    exported = c.export()
    torch.testing.assert_close(exported(x), c.model(x), atol=1e-5, rtol=0)
    keep16, keep32 = keep_count(16, ratio), keep_count(32, ratio)
    assert exported.get_submodule("conv1").weight.shape == (keep16, 3, 3, 3)
    assert exported.get_submodule("layer1.0.conv1").weight.shape == (keep16, keep16, 3, 3)
    assert exported.get_submodule("layer2.0.conv2").weight.shape == (keep32, keep32, 3, 3)
    assert exported.get_submodule("layer2.0.downsample.1").running_mean.shape == (keep32,)
    fc = exported.get_submodule("fc")
    assert fc.in_features == keep32 and fc.weight.shape == (10, keep32)
    assert not any("prune_masks" in n.target for n in exported.graph.nodes if n.op == "call_module")
    stats = c.statistics()["prune"]
    assert stats["params"]["after"] == gk.count_params(exported) < gk.count_params(model)
    flops = gk.count_flops(gk.trace(exported, x))
    assert stats["flops"]["after"] == flops < stats["flops"]["before"]
    assert stats["layers"]["fc"] == {"in_channels": [32, keep32]}


def test_masks_zero_filters_bias_norm_and_their_gradients():
    model, x = randomize_norms(digits_cnn()), torch.randn(4, 1, 8, 8)
    c = compress(model, x, ratio=0.5)
    c.model.train()
    out = c.model(x)
    out.sum().backward()
    dropped = (c.model.get_submodule("prune_masks.3_out_weight").mask == 0).nonzero().flatten()
    assert len(dropped) == 32
    conv = c.model.get_submodule("3")
    assert conv.weight.grad[dropped].abs().sum() == 0 and conv.bias.grad[dropped].abs().sum() == 0
    assert conv.weight.grad.abs().sum() > 0
    next_conv = c.model.get_submodule("7")
    assert next_conv.weight.grad[:, dropped].abs().sum() == 0
    # the BatchNorm after the pruned conv outputs zeros on the dropped channels
    acts = {}
    c.model.get_submodule("prune_masks.4_norm").register_forward_hook(
        lambda m, i, o: acts.setdefault("bn", o))
    c.model.eval()
    c.model(x)
    assert acts["bn"][:, dropped].abs().sum() == 0


def test_flatten_linear_export_slices_feature_blocks():
    model, x = randomize_norms(digits_cnn()), torch.randn(3, 1, 8, 8)
    c = compress(model, x, ratio=0.5)
    c.model.eval()
    exported = c.export()
    assert exported.get_submodule("12").weight.shape == (64, 32 * 4)
    torch.testing.assert_close(exported(x), c.model(x), atol=1e-5, rtol=0)


def test_round_to_keeps_channel_counts_multiples():
    c = compress(randomize_norms(resnet_tiny()), torch.randn(1, 3, 16, 16), ratio=0.4,
                 round_to=8, **ALL)
    exported = c.export()
    widths = [exported.get_submodule(p).out_channels for p in ("conv1", "layer2.0.conv1")]
    assert widths == [16, 24]
    assert c.statistics()["prune"]["achieved_ratio"] == pytest.approx(1 - (16 + 16 + 24 + 24) / 96)


def test_flops_target_is_reached_with_the_smallest_ratio():
    x = torch.randn(1, 3, 16, 16)
    c = compress(resnet_tiny(), x, flops_target=0.5, **ALL)
    stats = c.statistics()["prune"]
    removed = 1 - stats["flops"]["ratio"]
    assert 0.5 <= removed < 0.56
    assert 1 - gk.count_flops(gk.trace(c.export(), x)) / stats["flops"]["before"] == removed
    smaller = compress(resnet_tiny(), x, ratio=stats["level"] - 0.02, **ALL)
    assert 1 - smaller.statistics()["prune"]["flops"]["ratio"] < 0.5


def test_default_options_exclude_first_and_downsample_convs():
    c = compress(resnet_tiny(), torch.randn(1, 3, 16, 16), ratio=0.5)
    groups = c.statistics()["prune"]["groups"]
    assert [(g["status"], g["kept"]) for g in groups] == [
        ("excluded", 16), ("pruned", 8), ("excluded", 32), ("excluded", 32), ("blocked", 10)]
    assert groups[0]["excluded_by"] == "conv1 reads the model input (set prune_first_conv: true)"
    assert groups[2]["excluded_by"] == ("layer2.0.downsample.0 has stride (2, 2) "
                                        "(set prune_downsample_convs: true)")
    assert groups[4]["blocked_by"] == ["node 'output': it is a model output"]


def test_ignored_scopes_exclude_the_groups_of_those_filters():
    c = compress(resnet_tiny(), torch.randn(1, 3, 16, 16), ratio=0.5, ignored_scopes=["layer1"],
                 **ALL)
    statuses = [g["status"] for g in c.statistics()["prune"]["groups"]]
    assert statuses == ["excluded", "excluded", "pruned", "pruned", "blocked"]


def test_schedule_raises_the_ratio_epoch_by_epoch():
    c = compress(resnet_tiny(), torch.randn(1, 3, 16, 16), ratio=0.5,
                 schedule={"type": "multistep", "steps": [1, 2], "levels": [0.25, 0.5]}, **ALL)
    kept = []
    for _ in range(3):
        kept.append(int(c.model.get_submodule("prune_masks.conv1_out_weight").mask.sum()))
        c.epoch_step()
    assert kept == [16, 12, 8]
    assert c.statistics()["prune"]["level"] == 0.5


@pytest.mark.parametrize("order", [("sparsify", "prune"), ("prune", "sparsify")])
def test_prune_composes_with_sparsity_masks_on_the_same_weight_edge(order):
    model, x = randomize_norms(resnet_tiny()), torch.randn(2, 3, 16, 16)
    options = {"sparsify": {"level": 0.3}, "prune": {"ratio": 0.5, **ALL}}
    c = gk.compress(model, {"pipeline": [{"pass": p, **options[p]} for p in order]}, x)
    c.model.eval()
    exported = c.export()
    torch.testing.assert_close(exported(x), c.model(x), atol=1e-5, rtol=0)
    assert exported.get_submodule("layer1.0.conv2").weight.shape == (8, 8, 3, 3)



def test_statistics_count_the_sliced_parameters_of_an_earlier_quantizer():
    model, x = randomize_norms(resnet_tiny()), torch.randn(2, 3, 16, 16)
    pipeline = [{"pass": "quantize", "bits": 8}, {"pass": "prune", "ratio": 0.5, **ALL}]
    c = gk.compress(model, {"pipeline": pipeline}, x)
    exported = c.export()
    propagate_shapes(exported, x)
    stats = c.statistics()["prune"]
    assert stats["params"]["after"] == count_params(exported)
    assert stats["flops"]["after"] == count_flops(exported)

# -- configuration errors -----------------------------------------------------------------
@pytest.mark.parametrize("options, message", [
    ({"ratio": 1.5}, "pipeline[0].ratio: must be a fraction in [0, 1), got 1.5"),
    ({"ratio": 0.5, "flops_target": 0.3},
     "pipeline[0].flops_target: give either ratio or flops_target, not both"),
    ({"round_to": 0}, "pipeline[0].round_to: must be an integer >= 1, got 0"),
    ({"ratio": 0.2, "init": 0.4}, "pipeline[0].init: must not exceed ratio (0.2), got 0.4"),
    ({"criterion": "l3"}, "pipeline[0].criterion: must be one of 'l1', 'l2', 'geometric_median'"),
    ({"flops_target": 0.3, "schedule": {"type": "multistep", "steps": [1], "levels": [0.2]}},
     "pipeline[0].schedule.type: a multistep schedule lists ratios, so it needs ratio"),
])
def test_invalid_options_name_the_option(options, message):
    with pytest.raises(gk.ConfigError) as info:
        gk.Pipeline.from_dict({"pipeline": [{"pass": "prune", **options}]})
    assert str(info.value).startswith(message)


def test_unreachable_flops_target_says_how_much_is_possible():
    with pytest.raises(gk.ConfigError) as info:
        compress(resnet_tiny(), torch.randn(1, 3, 16, 16), flops_target=0.9)
    text = str(info.value)
    assert text.startswith("pipeline[0].flops_target: cannot remove 90.0% of the FLOPs")
    assert "1 of 5 groups prunable" in text and "prune_first_conv" in text


def test_scope_that_matches_nothing_is_reported():
    pattern = r"pipeline\[0\].ignored_scopes\[0\]: scope pattern 'layer9'"
    with pytest.raises(gk.ConfigError, match=pattern):
        compress(resnet_tiny(), torch.randn(1, 3, 16, 16), ignored_scopes=["layer9"])


# -- NNCF ---------------------------------------------------------------------------------
def test_nncf_filter_pruning_section_translates():
    options = translate_nncf_pruning({
        "pruning_init": 0.1, "ignored_scopes": ["{re}.*fc.*"],
        "params": {"pruning_target": 0.4, "filter_importance": "geometric_median",
                   "schedule": "exponential", "pruning_steps": 2, "num_init_steps": 1,
                   "prune_first_conv": True}})
    assert options["schedule"]["steps"] == [2, 3]
    levels = options["schedule"].pop("levels")
    assert levels == pytest.approx([1 - 0.9 * (0.6 / 0.9) ** 0.5, 0.4])
    assert options == {"init": 0.1, "ratio": 0.4, "criterion": "geometric_median",
                       "prune_first_conv": True, "ignored_scopes": ["re:.*fc.*"],
                       "schedule": {"type": "multistep", "steps": [2, 3]}}
    assert translate_nncf_pruning({"params": {"pruning_flops_target": 0.3}}) == {
        "init": 0.0, "flops_target": 0.3, "criterion": "l2",
        "schedule": {"type": "exponential", "steps": 100}}
    pipe = gk.Pipeline.from_dict({"compression": [{"algorithm": "filter_pruning",
                                                   "params": {"schedule": "baseline"}}]})
    assert isinstance(pipe.passes[0], Prune) and pipe.passes[0].ratio == 0.5


def test_nncf_unknown_key_is_an_error_with_its_path():
    with pytest.raises(gk.ConfigError, match=r"compression\[0\].params.legr_params: unknown "
                                             r"filter_pruning key 'legr_params'"):
        gk.Pipeline.from_dict({"compression": [{"algorithm": "filter_pruning",
                                                "params": {"legr_params": {}}}]})


class PerChannelLayers(nn.Module):
    """Per-channel PReLU and InstanceNorm follow their producer; a ConvTranspose is pruned on
    its output side (its weight is (in, out, k, k))."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.act = nn.PReLU(8)
        self.b = nn.Conv2d(8, 8, 3, padding=1)
        self.norm = nn.InstanceNorm2d(8, affine=True, track_running_stats=True)
        self.up = nn.ConvTranspose2d(8, 6, 2, stride=2)
        self.head = nn.Conv2d(6, 2, 1)

    def forward(self, x):
        return self.head(torch.relu(self.up(self.norm(self.b(self.act(self.a(x)))))))


def test_prelu_instancenorm_and_conv_transpose_export_exactly():
    model = PerChannelLayers()
    with torch.no_grad():
        model.act.weight.uniform_(-1, 1)
        model.norm.weight.normal_()
        model.norm.bias.normal_()
        model.norm.running_mean.normal_()
        model.norm.running_var.uniform_(0.5, 2)
    model.eval()
    x = torch.randn(2, 3, 6, 6)
    c = compress(model, x, ratio=0.5, **ALL)
    c.model.eval()
    exported = c.export()
    torch.testing.assert_close(exported(x), c.model(x), rtol=1e-5, atol=1e-5)
    shapes = {name: tuple(p.shape) for name, p in exported.named_parameters()
              if not name.startswith(("quantizers", "prune_masks"))}
    assert shapes["a.weight"] == (4, 3, 3, 3) and shapes["act.weight"] == (4,)
    assert shapes["b.weight"] == (4, 4, 3, 3) and shapes["norm.weight"] == (4,)
    assert shapes["up.weight"] == (4, 3, 2, 2) and shapes["head.weight"] == (2, 3, 1, 1)
    assert exported.get_submodule("norm").running_mean.shape == (4,)


class ChannelCountLeak(nn.Module):
    """``a``'s channel count is baked into the computation after it (``kind``), so pruning ``a``
    would change what the model computes: its group must be blocked, ``b``'s still pruned."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.a = nn.Conv1d(3, 8, 3, padding=1) if kind == "pool2d" else nn.Conv2d(3, 8, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d((8, 1))
        self.b = {"view": nn.Linear(8 * 16, 8), "pool2d": nn.Conv1d(8, 8, 1)}.get(
            kind, nn.Conv2d(8, 8, 1))
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        y = self.a(x)
        if self.kind == "view":  # literal sizes: the exported view would mix samples
            return self.head(torch.relu(self.b(y.view(-1, 8 * 16))))
        if self.kind == "view_same":
            y = y.view(-1, 8, 4, 4)
        elif self.kind == "pool2d":  # a 2-d pool on (N, C, L) pools over the channels too
            y = self.pool(y)
        z = torch.relu(self.b(y)).flatten(2).mean(2)
        return self.head(z) / y.size(1) if self.kind == "size" else self.head(z)


@pytest.mark.parametrize("kind", ["view", "view_same", "size", "pool2d"])
def test_code_that_depends_on_the_channel_count_blocks_its_group(kind):
    torch.manual_seed(0)
    model = ChannelCountLeak(kind).eval()
    x = torch.randn(2, 3, 6) if kind == "pool2d" else torch.randn(2, 3, 4, 4)
    c = compress(model, x, ratio=0.5, **ALL)
    groups = {g["members"][0]: g for g in c.statistics()["prune"]["groups"]}
    assert groups["a:out"]["status"] == "blocked"
    assert groups["b:out"]["status"] == "pruned" and groups["b:out"]["kept"] == 4
    c.model.eval()
    exported = c.export()
    for batch in (2, 3):
        x = torch.randn(batch, *x.shape[1:])
        torch.testing.assert_close(exported(x), c.model(x), rtol=1e-5, atol=1e-5)

"""The sparsify pass: mask values, modes, importance, schedules, gradients, export, composition."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import fx, nn

import graphkd as gk
from graphkd.errors import ConfigError
from graphkd.graph import flat_name, insert_on_weight, layer_of, weight_transforms
from graphkd.passes.sparsify import Sparsify, WeightMask, magnitude_masks
from graphkd.zoo import resnet_tiny

X = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
CONV_WEIGHTS, FC_WEIGHTS = 8 * 3 * 3 * 3, 8 * 6 * 6 * 10


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.fc = nn.Linear(8 * 6 * 6, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).flatten(1))


def sparsify(model: nn.Module | None = None, **options) -> gk.Compressed:
    return gk.compress(model or Net(), {"pipeline": [{"pass": "sparsify", **options}]}, X)


def mask(c: gk.Compressed, path: str) -> torch.Tensor:
    return c.model.get_submodule(f"sparsity_masks.{flat_name(path)}").mask


def zeros(t: torch.Tensor) -> int:
    return t.numel() - int(t.count_nonzero())


# --- mask values ------------------------------------------------------------------------------

def test_global_level_half_zeroes_half_of_all_weights() -> None:
    c = sparsify(level=0.5, importance="abs")
    total = CONV_WEIGHTS + FC_WEIGHTS
    masked = zeros(mask(c, "conv")) + zeros(mask(c, "fc"))
    assert abs(masked - total / 2) <= 1
    # one threshold: every zeroed |w| is at most every kept |w|, over both layers together
    w = {p: c.model.get_submodule(p).weight.detach().abs() for p in ("conv", "fc")}
    dropped = torch.cat([w[p][mask(c, p) == 0] for p in w])
    kept = torch.cat([w[p][mask(c, p) == 1] for p in w])
    assert dropped.max() <= kept.min()
    assert c.statistics()["sparsify"]["achieved"] == pytest.approx(masked / total)


def test_local_level_holds_in_every_layer() -> None:
    c = sparsify(level=0.3, mode="local")
    assert zeros(mask(c, "conv")) == round(0.3 * CONV_WEIGHTS)
    assert zeros(mask(c, "fc")) == round(0.3 * FC_WEIGHTS)
    layers = c.statistics()["sparsify"]["layers"]
    assert layers["conv"] == {"sparsity": pytest.approx(65 / 216), "weights": CONV_WEIGHTS}
    assert layers["fc"]["sparsity"] == pytest.approx(864 / 2880)


class TwoLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(2, 2, bias=False)
        self.b = nn.Linear(2, 2, bias=False)
        with torch.no_grad():
            self.a.weight.copy_(torch.tensor([[10.0, 20.0], [30.0, 40.0]]))
            self.b.weight.copy_(torch.tensor([[0.1, 0.2], [0.3, 4.0]]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(x))


@pytest.mark.parametrize("importance, mask_a, mask_b", [
    # |w|: all of b (0.1..4) is smaller than all of a (10..40)
    ("abs", [[1, 1], [1, 1]], [[0, 0], [0, 0]]),
    # |w|/||w||: a -> .18 .37 .55 .73, b -> .025 .050 .075 .995
    ("normed_abs", [[0, 1], [1, 1]], [[0, 0], [0, 1]]),
])
def test_importance_chooses_different_masks(importance: str, mask_a: list, mask_b: list) -> None:
    c = gk.compress(TwoLinear(), [Sparsify(level=0.5, importance=importance)], torch.ones(1, 2))
    assert mask(c, "a").tolist() == mask_a
    assert mask(c, "b").tolist() == mask_b


@settings(max_examples=40, deadline=None)
@given(sizes=st.lists(st.integers(1, 40), min_size=1, max_size=4), level=st.floats(0, 0.99),
       mode=st.sampled_from(["global", "local"]), importance=st.sampled_from(["abs", "normed_abs"]),
       seed=st.integers(0, 1000))
def test_masks_zero_exact_counts_of_the_least_important(
        sizes: list[int], level: float, mode: str, importance: str, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    weights = {f"w{i}": torch.randn(n, generator=g) * (i + 1) for i, n in enumerate(sizes)}
    masks = magnitude_masks(weights, level, mode, importance)
    norm = importance == "normed_abs"
    scores = {k: w.abs() / (w.norm() if norm else 1) for k, w in weights.items()}
    assert all(set(m.unique().tolist()) <= {0.0, 1.0} for m in masks.values())
    groups = [[k] for k in weights] if mode == "local" else [list(weights)]
    for group in groups:
        total = sum(weights[k].numel() for k in group)
        assert sum(zeros(masks[k]) for k in group) == min(round(level * total), total - 1)
        dropped = torch.cat([scores[k][masks[k] == 0] for k in group])
        kept = torch.cat([scores[k][masks[k] == 1] for k in group])
        if dropped.numel() and kept.numel():
            assert dropped.max() <= kept.min() + 1e-7


def test_level_zero_keeps_every_weight() -> None:
    c = sparsify(level=0.0)
    assert zeros(mask(c, "conv")) == 0 and zeros(mask(c, "fc")) == 0


# --- schedules through Compressed -------------------------------------------------------------

def test_schedule_per_epoch_moves_the_masks() -> None:
    c = sparsify(level=0.5, mode="local", schedule={"type": "polynomial", "steps": 4, "power": 1})
    seen = []
    for _ in range(6):
        stats = c.statistics()["sparsify"]
        seen.append((stats["level"], zeros(mask(c, "conv")), zeros(mask(c, "fc"))))
        c.step()  # optimizer steps do not move a per-epoch schedule
        c.epoch_step()
    assert seen == [(0.0, 0, 0), (0.125, 27, 360), (0.25, 54, 720), (0.375, 81, 1080),
                    (0.5, 108, 1440), (0.5, 108, 1440)]


def test_schedule_per_step() -> None:
    c = sparsify(level=0.75, mode="local",
                 schedule={"type": "exponential", "steps": 2, "per": "step"})
    levels = []
    for _ in range(3):
        c.epoch_step()
        c.step()
        levels.append((c.statistics()["sparsify"]["level"], zeros(mask(c, "conv"))))
    assert levels == [(0.5, 108), (0.75, 162), (0.75, 162)]


def test_masks_follow_the_current_weights_when_the_level_changes() -> None:
    c = sparsify(level=0.5, init=0.25, mode="local", importance="abs",
                 schedule={"type": "multistep", "steps": [1], "levels": [0.5]})
    conv = c.model.get_submodule("conv")
    with torch.no_grad():  # make the first half of the flattened weights the smallest
        conv.weight.copy_(torch.cat([torch.arange(1.0, 109.0), torch.arange(1000.0, 1108.0)])
                          .view_as(conv.weight))
    assert zeros(mask(c, "conv")) == 54  # unchanged until the level moves
    c.epoch_step()
    assert mask(c, "conv").flatten().tolist() == [0.0] * 108 + [1.0] * 108


def test_state_dict_round_trip_restores_level_and_masks() -> None:
    model = Net()
    spec = {"type": "polynomial", "steps": 4, "power": 1}
    a = sparsify(copy.deepcopy(model), level=0.5, schedule=spec)
    a.epoch_step()
    a.epoch_step()
    with torch.no_grad():  # training moves the weights after the masks were computed
        a.model.get_submodule("fc").weight.mul_(torch.rand(10, 288))
    b = sparsify(copy.deepcopy(model), level=0.5, schedule=spec)
    assert b.statistics()["sparsify"]["level"] == 0.0
    b.load_state_dict(a.state_dict())
    assert b.statistics()["sparsify"]["level"] == 0.25
    # the saved masks, not masks recomputed from the moved weights: resuming = continuing
    assert torch.equal(mask(b, "fc"), mask(a, "fc")) and zeros(mask(b, "fc")) > 0
    moved = {p: a.model.get_submodule(p).weight for p in ("conv", "fc")}
    assert not torch.equal(mask(b, "fc"), magnitude_masks(moved, 0.25)["fc"])
    b.epoch_step()
    assert b.statistics()["sparsify"]["level"] == 0.375


# --- training and export ----------------------------------------------------------------------

def test_masked_weights_get_zero_gradient() -> None:
    c = sparsify(level=0.6)
    c.model.train()
    c.model(X).square().sum().backward()
    m = mask(c, "conv")
    grad = c.model.get_submodule("conv").weight.grad
    # reference: the plain model with the masked weights baked in, no masks at all
    plain = Net()
    plain.load_state_dict({k: v for k, v in c.model.state_dict().items() if "sparsity" not in k})
    with torch.no_grad():
        plain.conv.weight.mul_(m)
        plain.fc.weight.mul_(mask(c, "fc"))
    plain(X).square().sum().backward()
    assert plain.conv.weight.grad[m == 0].abs().sum() > 0  # would be non-zero without the mask
    assert torch.all(grad[m == 0] == 0)
    torch.testing.assert_close(grad[m == 1], plain.conv.weight.grad[m == 1])


def test_export_folds_masks_into_the_weights() -> None:
    c = sparsify(level=0.5, importance="abs")
    c.model.eval()
    expected = c.model(X)
    exported = c.export()
    assert not any(isinstance(m, WeightMask) for m in exported.modules())
    assert not any(str(n.target).startswith("sparsity_masks") for n in exported.graph.nodes)
    torch.testing.assert_close(exported(X), expected, atol=1e-6, rtol=0)
    for path in ("conv", "fc"):
        weight = exported.get_submodule(path).weight
        assert torch.equal(weight == 0, mask(c, path) == 0)
    # the student keeps its masks and its unmasked weights
    assert zeros(c.model.get_submodule("conv").weight) == 0
    assert isinstance(c.model.get_submodule("sparsity_masks.conv"), WeightMask)


def test_select_weight_channels_slices_the_mask() -> None:
    c = sparsify(level=0.5)
    module = c.model.get_submodule("sparsity_masks.conv")
    before = module.mask.clone()
    module.select_weight_channels(0, torch.tensor([1, 5, 6]))
    assert torch.equal(module.mask, before[[1, 5, 6]])
    module.select_weight_channels(1, torch.tensor([2]))
    assert torch.equal(module.mask, before[[1, 5, 6]][:, [2]])


class Doubler(nn.Module):
    """A stand-in for another pass's weight transform (a quantizer, a pruning mask)."""

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return 2 * weight


class DoubleWeights(gk.Pass):
    name = "double_weights"

    def apply(self, gm: fx.GraphModule, ctx: gk.PassContext) -> None:
        for node in list(gm.graph.nodes):
            found = layer_of(gm, node)
            if found is not None:
                insert_on_weight(gm, node, f"doublers.{flat_name(found[0])}", Doubler())


def reference_forward(c: gk.Compressed, x: torch.Tensor) -> torch.Tensor:
    conv, fc = c.model.get_submodule("conv"), c.model.get_submodule("fc")
    h = F.conv2d(x, 2 * conv.weight * mask(c, "conv"), conv.bias)
    return F.linear(torch.relu(h).flatten(1), 2 * fc.weight * mask(c, "fc"), fc.bias)


def test_mask_after_another_weight_transform() -> None:
    c = gk.compress(Net(), [DoubleWeights(), Sparsify(level=0.5)], X)
    layer = next(n for n in c.model.graph.nodes if n.target is F.conv2d or
                 getattr(n.target, "__name__", "") == "conv2d")
    assert [type(m) for m in weight_transforms(c.model, layer)] == [Doubler, WeightMask]
    assert c.statistics()["sparsify"]["layers_touched"] == 2
    c.model.eval()
    torch.testing.assert_close(c.model(X), reference_forward(c, X))
    with pytest.warns(UserWarning, match=r"2 sparsity mask\(s\) follow another weight transform"):
        exported = c.export()
    torch.testing.assert_close(exported(X), c.model(X), atol=1e-6, rtol=0)


def test_mask_before_another_weight_transform_folds() -> None:
    c = gk.compress(Net(), [Sparsify(level=0.5), DoubleWeights()], X)
    c.model.eval()
    torch.testing.assert_close(c.model(X), reference_forward(c, X))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        exported = c.export()
    assert not any(isinstance(m, WeightMask) for m in exported.modules())
    assert sum(isinstance(m, Doubler) for m in exported.modules()) == 2
    torch.testing.assert_close(exported(X), c.model(X), atol=1e-6, rtol=0)


def test_scopes_and_statistics() -> None:
    c = sparsify(level=0.5, ignored_scopes=["fc"])
    stats = c.statistics()["sparsify"]
    assert stats["layers_touched"] == 1 and stats["skipped_scopes"] == ["fc"]
    assert list(stats["layers"]) == ["conv"]
    assert stats["achieved"] == pytest.approx(108 / 216)
    assert not any(str(n.target) == "sparsity_masks.fc" for n in c.model.graph.nodes)


def test_two_sparsify_passes_keep_separate_state() -> None:
    c = gk.compress(Net(), [Sparsify(level=0.5, target_scopes=["conv"]),
                            Sparsify(level=0.25, target_scopes=["fc"])], X)
    stats = c.statistics()
    assert stats["sparsify"]["layers_touched"] == 1 and stats["sparsify_1"]["target"] == 0.25
    assert set(c.state_dict()["passes"]) == {"sparsify", "sparsify_1"}


# --- configuration ----------------------------------------------------------------------------

@pytest.mark.parametrize("options, message", [
    ({"level": 1.0}, "pipeline[0].level: must be a fraction of weights in [0, 1), got 1.0"),
    ({}, "pipeline[0]: missing required option 'level' of pass 'sparsify'"),
    ({"level": 0.5, "init": 0.6}, "pipeline[0].init: must not exceed level (0.5), got 0.6"),
    ({"level": 0.5, "mode": "both"}, "pipeline[0].mode: must be one of 'global', 'local'"),
    ({"level": 0.5, "schedule": {"type": "polynomial", "steps": 3, "levels": [0.5]}},
     "pipeline[0].schedule.levels: key 'levels' has no meaning for a 'polynomial' schedule"),
    ({"level": 0.5, "schedule": {"type": "polynomial", "stepz": 3}},
     "pipeline[0].schedule.stepz: unknown key 'stepz'. Did you mean 'steps'?"),
    ({"level": 0.5, "schedule": {"type": "multistep", "steps": [1, 2], "levels": [0.5]}},
     "pipeline[0].schedule.levels: needs one level per step: 2 steps but 1 levels"),
    ({"level": 0.5, "schedule": {"type": "multistep", "steps": [1, 2], "levels": [0.2, 0.3]}},
     "pipeline[0].schedule.levels[1]: the last level must be the target level 0.5, got 0.3"),
])
def test_config_errors(options: dict, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        gk.Pipeline.from_dict({"pipeline": [{"pass": "sparsify", **options}]})
    assert str(info.value).startswith(message)


def test_python_api_checks_options_too() -> None:
    with pytest.raises(ConfigError, match=r"^importance: must be one of abs, normed_abs"):
        Sparsify(level=0.5, importance="l1")  # type: ignore[arg-type]


def test_unknown_scope_is_reported_with_close_names() -> None:
    with pytest.raises(ConfigError) as info:
        sparsify(level=0.5, ignored_scopes=["fcc"])
    assert info.value.path == "pipeline[0].ignored_scopes[0]"
    assert "closest module paths: fc" in str(info.value)


def test_nncf_multistep_translation() -> None:
    pipe = gk.Pipeline.from_dict({"compression": {
        "algorithm": "magnitude_sparsity", "sparsity_init": 0.0,
        "params": {"schedule": "multistep", "multistep_steps": [2, 4],
                   "multistep_sparsity_levels": [0.1, 0.3, 0.5],
                   "sparsity_level_setting_mode": "local", "weight_importance": "abs"},
        "ignored_scopes": ["Net/Linear[fc]"]}})
    p = pipe.passes[0]
    assert (p.level, p.init, p.mode, p.importance, p.ignored_scopes) == (
        0.5, 0.1, "local", "abs", ["fc"])
    assert p.schedule == {"type": "multistep", "steps": [2, 4], "levels": [0.3, 0.5]}


def test_nncf_polynomial_per_optimizer_step() -> None:
    pipe = gk.Pipeline.from_dict({"compression": [{
        "algorithm": "magnitude_sparsity", "sparsity_init": 0.2,
        "params": {"sparsity_target": 0.8, "sparsity_target_epoch": 3, "power": 2,
                   "update_per_optimizer_step": True, "steps_per_epoch": 10,
                   "sparsity_freeze_epoch": 4}}]})
    p = pipe.passes[0]
    assert (p.level, p.init) == (0.8, 0.2)
    assert p.schedule == {"type": "polynomial", "per": "step", "steps": 30, "power": 2}


@pytest.mark.parametrize("params, message", [
    ({"schedule": "adaptive"}, "compression[0].params.schedule: NNCF schedule 'adaptive' is not"),
    ({"sparsity_targett": 0.5}, "compression[0].params.sparsity_targett: unknown"),
    ({"update_per_optimizer_step": True}, "compression[0].params.steps_per_epoch: "),
    ({"schedule": "multistep", "multistep_steps": [2], "multistep_sparsity_levels": [0.5]},
     "compression[0].params.multistep_sparsity_levels: needs one more level"),
])
def test_nncf_errors(params: dict, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        gk.Pipeline.from_dict({"compression": [{"algorithm": "magnitude_sparsity",
                                                "params": params}]})
    assert str(info.value).startswith(message)


# --- other layer kinds and models -------------------------------------------------------------

class SharedAndTransposed(nn.Module):
    """A Linear called twice (one weight, two layer nodes) and a ConvTranspose."""

    def __init__(self) -> None:
        super().__init__()
        self.up = nn.ConvTranspose2d(2, 3, 2, stride=2)
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.fc(self.up(x)))


def test_shared_layer_and_conv_transpose() -> None:
    x = torch.randn(1, 2, 2, 2)
    c = gk.compress(SharedAndTransposed(), [Sparsify(level=0.5, mode="local")], x)
    shared = [c.model.get_submodule(n).mask for n in ("sparsity_masks.fc", "sparsity_masks.fc_1")]
    assert torch.equal(shared[0], shared[1]) and zeros(shared[0]) == 8
    assert mask(c, "up").shape == (2, 3, 2, 2) and zeros(mask(c, "up")) == 12
    stats = c.statistics()["sparsify"]
    assert stats["layers_touched"] == 2 and stats["achieved"] == pytest.approx(20 / 40)
    c.model.eval()
    exported = c.export()
    assert zeros(exported.get_submodule("fc").weight) == 8
    torch.testing.assert_close(exported(x), c.model(x), atol=1e-6, rtol=0)


def test_resnet_export_matches_the_student() -> None:
    x = torch.randn(2, 3, 16, 16)
    c = gk.compress(resnet_tiny(), [Sparsify(level=0.7, ignored_scopes=["conv1"])], x)
    stats = c.statistics()["sparsify"]
    assert "conv1" in stats["skipped_scopes"] and "conv1" not in stats["layers"]
    assert stats["achieved"] == pytest.approx(0.7, abs=1e-4)
    c.model.eval()
    expected = c.model(x)
    exported = c.export()
    torch.testing.assert_close(exported(x), expected, atol=1e-5, rtol=1e-5)
    total = sum(exported.get_submodule(p).weight.numel() for p in stats["layers"])
    zero = sum(zeros(exported.get_submodule(p).weight) for p in stats["layers"])
    assert abs(zero - 0.7 * total) <= 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_masks_follow_the_model_to_the_device() -> None:
    c = sparsify(level=0.5, schedule={"type": "polynomial", "steps": 2})
    c.model.to("cuda")
    c.epoch_step()
    assert mask(c, "conv").device.type == "cuda"
    level = 0.5 - 0.5 * 0.5 ** 3  # polynomial, power 3, after 1 of 2 steps
    assert c.statistics()["sparsify"]["achieved"] == pytest.approx(level, abs=1e-3)
    out = c.model(X.to("cuda"))
    torch.testing.assert_close(out.cpu(), c.export()(X.to("cuda")).cpu(), atol=1e-5, rtol=0)


def test_sparsify_quantize_distill_pipeline_trains_and_exports() -> None:
    c = gk.compress(Net(), {"pipeline": [
        {"pass": "sparsify", "level": 0.5, "schedule": {"type": "polynomial", "steps": 2}},
        {"pass": "quantize"}, {"pass": "distill", "type": "mse"}]}, X)
    opt = torch.optim.SGD(c.model.parameters(), lr=0.01)
    for _ in range(2):
        c.model.train()
        loss = c.model(X).square().mean() + c.loss()
        loss.backward()
        opt.step()
        opt.zero_grad()
        c.step()
        c.epoch_step()
    assert c.statistics()["sparsify"]["achieved"] == pytest.approx(0.5, abs=1e-3)
    c.model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        exported = c.export()
    torch.testing.assert_close(exported(X), c.model(X), atol=1e-6, rtol=0)
    assert torch.equal(exported.get_submodule("conv").weight == 0, mask(c, "conv") == 0)


def test_a_level_below_one_never_zeroes_a_whole_layer() -> None:
    weight = torch.arange(1.0, 43.0).view(6, 7)
    for mode in ("local", "global"):
        (mask,) = magnitude_masks({"w": weight}, 0.999, mode, "abs").values()
        assert mask.sum().item() == 1 and mask.view(-1)[-1].item() == 1  # the largest survives

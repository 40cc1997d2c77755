"""The quantize pass: placement, fake-quant math, gradients, range init, BN folding, options."""
from __future__ import annotations

import copy
import math
import operator

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import graphkd as gk
from graphkd.graph import find_nodes, layer_of, weight_transforms
from graphkd.passes.quantize import Quantize
from graphkd.passes.range_init import calibration_batches
from graphkd.passes.quantizers import (
    ActivationQuantizer, FakeQuantize, QuantSpec, WeightQuantizer, integer_range,
)
from graphkd.zoo import mlp, resnet_tiny
from tests.models import TwoInputs


def quantize(model: nn.Module, x: torch.Tensor, **options) -> gk.Compressed:
    return gk.compress(model, {"pipeline": [{"pass": "quantize", **options}]}, x)


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out - ref).norm() / ref.norm())


def trained_resnet() -> nn.Module:
    """resnet_tiny with non-trivial BatchNorm statistics, in eval mode."""
    model = resnet_tiny()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    return model.eval()


class TransformerBlock(nn.Module):
    """Pre-norm multi-head attention written with Linear + matmul (fx traces into it, unlike
    nn.MultiheadAttention, which torch.fx keeps as a leaf), then an MLP."""

    def __init__(self, dim: int = 16, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.fc1, self.fc2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(c, dim=-1)
        q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2) for z in (q, k, v))
        att = torch.softmax(q @ k.transpose(-2, -1) * (c // self.heads) ** -0.5, dim=-1)
        y = (att @ v).transpose(1, 2).reshape(b, t, c)
        x = x + self.proj(y)
        return x + self.fc2(torch.relu(self.fc1(self.ln2(x))))


def fake_quantizers(gm: nn.Module) -> dict[str, FakeQuantize]:
    return {n: m for n, m in gm.named_modules() if isinstance(m, FakeQuantize)}


def input_quantizer(gm: torch.fx.GraphModule) -> ActivationQuantizer:
    """The quantizer reading the model's (single) input."""
    (placeholder,) = find_nodes(gm, op="placeholder")
    (user,) = placeholder.users
    return gm.get_submodule(user.target)


# --- accuracy -------------------------------------------------------------------------------
# The transformer's residual stream is rounded twice (the block input and the first residual add),
# each ~0.7% of its norm with a 256-level min/max grid over N(0, 1) values: 1.03% measured here.
@pytest.mark.parametrize("make,shape,bound", [
    (lambda: trained_resnet(), (16, 3, 16, 16), 0.01),
    (lambda: TransformerBlock().eval(), (4, 6, 16), 0.012),
], ids=["conv_net", "transformer_block"])
def test_8bit_error_is_small_and_4bit_error_larger(make, shape, bound):
    model, x = make(), torch.randn(*shape)
    ref = model(x).detach()
    errors = {}
    for bits in (8, 4):
        c = quantize(model, x, bits=bits)
        c.model.eval()
        errors[bits] = relative_error(c.model(x).detach(), ref)
    assert errors[8] < bound
    assert errors[4] > 2 * errors[8]


def test_transformer_matmuls_read_quantized_operands():
    c = quantize(TransformerBlock().eval(), torch.randn(4, 6, 16))
    matmuls = find_nodes(c.model, op="call_function", target=operator.matmul)
    assert len(matmuls) == 2
    for mm in matmuls:
        for arg in mm.args:
            while arg.op != "call_module":
                arg = arg.args[0]
            assert isinstance(c.model.get_submodule(arg.target), ActivationQuantizer)
    assert c.statistics()["quantize"]["weight_quantizers"] == 4


# --- placement ------------------------------------------------------------------------------
def test_placement_on_resnet_counts_names_and_shared_quantizer():
    c = quantize(trained_resnet(), torch.randn(2, 3, 16, 16))
    stats = c.statistics()["quantize"]
    assert stats["weight_quantizers"] == 7
    # input, stem relu, 2 relus + 1 conv-out per block (+ downsample out), pool output
    assert stats["activation_quantizers"] == 10
    assert stats["weight_bits"]["layer1.0.conv1"] == 8
    assert stats["folded_batchnorms"] == ["bn1", "layer1.0.bn1", "layer1.0.bn2",
                                          "layer2.0.downsample.1", "layer2.0.bn1", "layer2.0.bn2"]
    assert not find_nodes(c.model, module_type=nn.BatchNorm2d)
    gm = c.model
    # the block-2 input feeds conv1 and the downsample conv: one quantizer serves both
    q = gm.get_submodule("quantizers.layer1_0_relu_output_1")
    node = next(n for n in gm.graph.nodes if n.op == "call_module" and n.target ==
                "quantizers.layer1_0_relu_output_1")
    assert isinstance(q, ActivationQuantizer) and len(node.users) == 2
    convs = [n for n in gm.graph.nodes if layer_of(gm, n) is not None]
    for conv in convs:
        transforms = weight_transforms(gm, conv)
        assert len(transforms) == 1 and isinstance(transforms[0], WeightQuantizer)
    # no quantizer between a conv and its ReLU (BN folded: quantize after the activation)
    stem = next(n for n in convs if layer_of(gm, n)[0] == "conv1")
    assert [u.target for u in stem.users] == ["relu"]


def test_activations_false_quantizes_weights_only():
    c = quantize(mlp((6, 5, 3)), torch.randn(4, 6), activations=False)
    kinds = sorted(type(m).__name__ for m in fake_quantizers(c.model).values())
    assert kinds == ["WeightQuantizer", "WeightQuantizer"]


def test_ignored_scope_gets_no_quantizer():
    model, x = trained_resnet(), torch.randn(2, 3, 16, 16)
    c = quantize(model, x, ignored_scopes=["fc"])
    gm = c.model
    fc = next(n for n in gm.graph.nodes if (layer_of(gm, n) or ("",))[0] == "fc")
    assert fc.op == "call_module"  # untouched, not even functionalized
    assert fc.args[0].op != "call_module" or not isinstance(
        gm.get_submodule(fc.args[0].target), FakeQuantize)
    stats = c.statistics()["quantize"]
    assert stats["skipped_scopes"] == ["fc"] and "fc" not in stats["weight_bits"]
    assert stats["weight_quantizers"] == 6


def test_scope_matching_nothing_is_a_config_error():
    with pytest.raises(gk.ConfigError) as info:
        quantize(trained_resnet(), torch.randn(2, 3, 16, 16), ignored_scopes=["fcc"])
    message = str(info.value)
    assert message.startswith("pipeline[0].ignored_scopes[0]: scope pattern 'fcc' matches no")
    assert "fc" in message


# --- fake-quant math ------------------------------------------------------------------------
@settings(max_examples=30, deadline=None)
@given(bits=st.integers(2, 8), out=st.integers(1, 6), seed=st.integers(0, 1000))
def test_weight_quantizer_reproduces_round_clamp(bits: int, out: int, seed: int):
    weight = torch.randn(out, 3, 3, 3, generator=torch.Generator().manual_seed(seed))
    q = WeightQuantizer(QuantSpec(bits, "symmetric", True), weight, out_axis=0, learnable=False)
    top = 2 ** (bits - 1) - 1
    scale = weight.abs().amax(dim=(1, 2, 3)) / top
    assert torch.allclose(q.scale, scale)
    expected = torch.clamp(torch.round(weight / scale.view(-1, 1, 1, 1)), -top, top)
    got = q.eval()(weight)
    torch.testing.assert_close(got, expected * scale.view(-1, 1, 1, 1), rtol=0, atol=1e-6)
    for channel in got:
        assert channel.unique().numel() <= 2 ** bits - 1  # narrow range: 2^b - 1 levels


def test_asymmetric_activation_matches_formula_and_clamps():
    q = ActivationQuantizer(QuantSpec(4, "asymmetric", False), learnable=False)
    q.set_range(torch.tensor(-1.0), torch.tensor(2.0))
    scale, zero_point = 3.0 / 15, round(1.0 / 0.2)
    assert q.scale.item() == pytest.approx(scale) and q.zero_point.item() == zero_point
    x = torch.linspace(-3, 4, 101)
    expected = (torch.clamp(torch.round(x / scale) + zero_point, 0, 15) - zero_point) * scale
    torch.testing.assert_close(q(x), expected, rtol=0, atol=1e-6)
    assert q(x).unique().numel() == 16


def test_symmetric_activation_is_unsigned_after_relu():
    q = ActivationQuantizer(QuantSpec(8, "symmetric", False), learnable=False)
    q.set_range(torch.tensor(0.0), torch.tensor(2.55))
    assert (q.qmin, q.qmax) == (0, 255) and q.scale.item() == pytest.approx(0.01)
    q.set_range(torch.tensor(-1.0), torch.tensor(1.27))
    assert (q.qmin, q.qmax) == (-128, 127) and q.scale.item() == pytest.approx(0.01)


def test_integer_ranges():
    assert integer_range(8, "symmetric", True, narrow=True) == (-127, 127)
    assert integer_range(8, "asymmetric", True, narrow=False) == (0, 255)
    assert integer_range(4, "symmetric", True, narrow=False) == (-8, 7)


def test_select_weight_channels_slices_per_channel_scales():
    weight = torch.randn(5, 2, 3)
    q = WeightQuantizer(QuantSpec(8, "symmetric", True), weight, out_axis=0, learnable=True)
    keep = torch.tensor([0, 3])
    full = q(weight).detach()
    q.select_weight_channels(0, keep)
    assert isinstance(q.scale, nn.Parameter) and q.scale.shape == (2,)
    torch.testing.assert_close(q(weight[keep]), full[keep])
    q.select_weight_channels(1, torch.tensor([0]))  # not the channel axis: nothing to slice
    assert q.scale.shape == (2,)


# --- gradients and training -----------------------------------------------------------------
def test_straight_through_weight_gradient_equals_float_gradient():
    model, x = nn.Linear(6, 3), torch.randn(5, 6)
    c = quantize(model, x, activations=False, learnable=False)
    c.model.train()
    c.model(x).sum().backward()
    grad = c.model.get_parameter("weight").grad
    # d sum(x W_q^T) / dW = 1^T x for every weight inside the range (all are, min/max init)
    torch.testing.assert_close(grad, x.sum(0).expand(3, 6))


def test_learnable_scale_gradient_is_lsq():
    weight = torch.randn(4, 8)
    q = WeightQuantizer(QuantSpec(8, "symmetric", False), weight, out_axis=0, learnable=True)
    q(weight).sum().backward()
    s = q.scale.detach()
    expected = (torch.round(weight / s) - weight / s).sum() / math.sqrt(weight.numel() * 127)
    assert q.scale.grad.item() == pytest.approx(expected.item(), rel=1e-4, abs=1e-7)
    assert q.scale.grad.abs().item() > 0


def test_learnable_activation_range_gets_gradients():
    model, x = mlp((6, 8, 3)), torch.randn(16, 6)
    c = quantize(model, x)
    c.model.train()
    (c.model(x) ** 2).mean().backward()
    q = input_quantizer(c.model)
    assert isinstance(q.zero_point, nn.Parameter)
    # inside the range only the scale moves; the zero point learns from clipped values
    assert q.scale.grad.abs().item() > 0 and q.zero_point.grad.item() == 0
    (c.model(3 * x) ** 2).mean().backward()
    assert q.zero_point.grad.abs().item() > 0
    assert c.model.get_parameter("0.weight").grad.abs().sum() > 0


def test_sgd_steps_reduce_regression_loss():
    teacher, x = mlp((8, 16, 4)), torch.randn(64, 8)
    target = teacher(x).detach() * 2
    c = quantize(mlp((8, 16, 4)), x)
    c.model.train()
    opt = torch.optim.SGD(c.model.parameters(), lr=0.05)
    losses = []
    for _ in range(30):
        loss = nn.functional.mse_loss(c.model(x), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


# --- range initialisation -------------------------------------------------------------------
class ConvRelu(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3)
        self.fc = nn.Linear(3, 2)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).mean((2, 3)))


def asymmetric_qparams(lo: float, hi: float) -> tuple[float, int]:
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = (hi - lo) / 255
    return scale, int(min(max(-round(lo / scale), 0), 255))


def test_range_init_from_loader_versus_example_inputs_by_hand():
    model, example = ConvRelu(), torch.randn(4, 2, 5, 5)
    batches = [torch.randn(4, 2, 5, 5) * 3 for _ in range(3)]
    loader = [(b, torch.zeros(4)) for b in batches]
    c = quantize(model, example, learnable=False)
    q = c.model.get_submodule("quantizers.input_x")
    scale, zp = asymmetric_qparams(example.min().item(), example.max().item())
    assert q.scale.item() == pytest.approx(scale) and q.zero_point.item() == zp
    c.init_ranges(loader, num_samples=6)  # first batch and half of the second
    seen = torch.cat([batches[0], batches[1][:2]])
    scale, zp = asymmetric_qparams(seen.min().item(), seen.max().item())
    assert q.scale.item() == pytest.approx(scale) and q.zero_point.item() == zp
    # the ReLU output range comes from the float model
    hidden = torch.relu(model.conv(seen)).mean((2, 3))
    fc_input = c.model.get_submodule("quantizers.mean")
    assert fc_input.scale.item() == pytest.approx(hidden.max().item() / 255)


def test_mean_min_max_and_percentile_ranges():
    model, example = ConvRelu(), torch.randn(2, 2, 5, 5)
    batches = [torch.randn(4, 2, 5, 5) * (i + 1) for i in range(3)]
    mean = quantize(model, example, learnable=False, range_init={"type": "mean_min_max"})
    mean.init_ranges(batches, num_samples=12)
    lo = sum(b.min() for b in batches) / 3
    hi = sum(b.max() for b in batches) / 3
    scale, _ = asymmetric_qparams(lo.item(), hi.item())
    assert mean.model.get_submodule("quantizers.input_x").scale.item() == pytest.approx(scale)
    pct = quantize(model, example, learnable=False,
                   range_init={"type": "percentile", "percentiles": [10.0, 90.0]})
    pct.init_ranges(batches, num_samples=12)
    lo = sum(torch.quantile(b.flatten(), 0.1, interpolation="nearest") for b in batches) / 3
    hi = sum(torch.quantile(b.flatten(), 0.9, interpolation="nearest") for b in batches) / 3
    scale, _ = asymmetric_qparams(lo.item(), hi.item())
    assert pct.model.get_submodule("quantizers.input_x").scale.item() == pytest.approx(scale)


def test_compress_calibration_data_sets_ranges():
    example = torch.randn(2, 6)
    data = [torch.randn(8, 6) * 5]
    c = gk.compress(mlp((6, 4, 2)), {"pipeline": [{"pass": "quantize", "learnable": False}]},
                    example, calibration_data=data)
    scale, _ = asymmetric_qparams(data[0].min().item(), data[0].max().item())
    assert input_quantizer(c.model).scale.item() == pytest.approx(scale)


def test_calibration_batches_cut_to_num_samples():
    data = [(torch.ones(4, 1) * i, None) for i in range(3)]
    got = [b[0][:, 0].tolist() for b in calibration_batches(data, 6)]
    assert got == [[0.0] * 4, [1.0] * 2]


def test_two_input_model_is_quantized_and_calibrated_from_input_tuples():
    torch.manual_seed(0)
    x, y = torch.randn(8, 4), torch.randn(8, 6)
    c = gk.compress(TwoInputs(), {"pipeline": [{"pass": "quantize"}]}, (x[:2], y[:2]),
                    calibration_data=[((x, y), torch.zeros(8))])
    observed = c.model.get_submodule("quantizers.input_y")
    expected = ActivationQuantizer(QuantSpec(8, "asymmetric"), learnable=True)
    expected.set_range(y.min(), y.max())
    assert torch.equal(observed.scale, expected.scale)


def test_calibration_batch_with_too_few_inputs_is_an_error_naming_the_layout():
    x, y = torch.randn(2, 4), torch.randn(2, 6)
    with pytest.raises(gk.ConfigError, match=r"1 input\(s\) but the model takes 2 \(x, y\)"
                                              r".*\(\(x, y\), target\)"):
        gk.compress(TwoInputs(), {"pipeline": [{"pass": "quantize"}]}, (x, y),
                    calibration_data=[(x, y)])


def test_zero_calibration_samples_is_a_config_error():
    x = torch.randn(4, 8)
    with pytest.raises(gk.ConfigError, match="num_calibration_samples: must be >= 1, got 0"):
        gk.compress(mlp([8, 4]), {"pipeline": [{"pass": "quantize"}]}, x,
                    calibration_data=[x], num_calibration_samples=0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_quantized_student_runs_in_another_dtype_and_back(dtype: torch.dtype):
    torch.manual_seed(0)
    x = torch.randn(4, 8)
    c = quantize(mlp([8, 8, 4]), x)
    before = c.model(x).detach()
    c.model.to(dtype)
    out = c.model(x.to(dtype))
    out.float().sum().backward()
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), before, rtol=0.05, atol=0.05)
    c.model.float()
    assert c.model(x).dtype == torch.float32


# --- BatchNorm folding and export -----------------------------------------------------------
def test_folded_float_student_equals_original_and_export_equals_student():
    model, x = trained_resnet(), torch.randn(4, 3, 16, 16)
    c = quantize(model, x)
    c.model.train()
    opt = torch.optim.SGD(c.model.parameters(), lr=0.01)
    for _ in range(2):
        loss = c.model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    c.model.eval()
    exported = c.export()
    assert len(fake_quantizers(exported)) == 17
    torch.testing.assert_close(exported(x), c.model(x), rtol=0, atol=0)
    fresh = quantize(model, x)
    for q in fake_quantizers(fresh.model).values():
        q.enabled = False
    fresh.model.eval()
    torch.testing.assert_close(fresh.model(x), model(x), rtol=1e-5, atol=1e-5)


def test_fold_bn_false_keeps_batchnorm():
    c = quantize(trained_resnet(), torch.randn(2, 3, 16, 16), fold_bn=False)
    assert len(find_nodes(c.model, module_type=nn.BatchNorm2d)) == 6
    assert c.statistics()["quantize"]["folded_batchnorms"] == []


# --- options --------------------------------------------------------------------------------
@pytest.mark.parametrize("options, message", [
    ({"bits": 9}, "pipeline[0].bits: must be in [2, 8], got 9"),
    ({"weights": {"bits": 1}}, "pipeline[0].weights.bits: must be in [2, 8], got 1"),
    ({"activations": True}, "pipeline[0].activations: must be a mapping with keys bits, mode, "
                            "per_channel or one of False or null"),
    ({"weights": {"mode": "affine"}}, "pipeline[0].weights.mode: must be one of 'symmetric', "
                                      "'asymmetric'"),
    ({"activations": {"per_channel": True}}, "pipeline[0].activations.per_channel: per-channel "
                                             "activation quantization is not supported"),
    ({"range_init": {"percentiles": [50, 10]}}, "pipeline[0].range_init.percentiles: must be two"),
    ({"range_init": {"type": "kl"}}, "pipeline[0].range_init.type: must be one of 'min_max'"),
    ({"range_init": {"num_samples": 0}}, "pipeline[0].range_init.num_samples: must be >= 1"),
])
def test_bad_options_are_config_errors(options, message):
    with pytest.raises(gk.ConfigError) as info:
        gk.Pipeline.from_dict({"pipeline": [{"pass": "quantize", **options}]})
    assert str(info.value).startswith(message)


def test_bits_shorthand_and_nested_override():
    p = Quantize(bits=4, weights={"bits": 6})
    assert p.weights.bits == 6 and p.activations.bits == 4
    assert p.weights.mode == "symmetric" and p.activations.mode == "asymmetric"


def test_nncf_quantization_section_translates():
    pipe = gk.Pipeline.from_dict({"compression": [{
        "algorithm": "quantization",
        "weights": {"mode": "asymmetric", "bits": 4, "per_channel": False, "signed": True},
        "activations": {"mode": "symmetric", "bits": 6},
        "initializer": {"range": {"type": "mean_min_max", "num_init_samples": 32}},
        "ignored_scopes": ["{re}layer2.*", "Net/Linear[fc]"],
    }]})
    p = pipe.passes[0]
    assert isinstance(p, Quantize)
    assert p.weights == QuantSpec(4, "asymmetric", False)
    assert p.activations == QuantSpec(6, "symmetric", False)
    assert (p.range_type, p.num_samples) == ("mean_min_max", 32)
    assert p.ignored_scopes == ["re:layer2.*", "fc"]
    with pytest.raises(gk.ConfigError) as info:
        gk.Pipeline.from_dict({"compression": [{"algorithm": "quantization", "bitz": 8}]})
    assert str(info.value).startswith("compression[0].bitz: unknown quantization key 'bitz'")


# --- with distillation ----------------------------------------------------------------------
@pytest.mark.parametrize("order", [("quantize", "distill"), ("distill", "quantize")])
def test_quantize_with_distill(order):
    if "distill" not in gk.available_passes():
        pytest.skip("the distill pass is not available in this checkout")
    model, x = trained_resnet(), torch.randn(8, 3, 16, 16)
    steps = [{"pass": name, **({"type": "mse"} if name == "distill" else {})} for name in order]
    c = gk.compress(model, {"pipeline": steps}, x)
    assert c.teacher is not None and not fake_quantizers(c.teacher)
    from graphkd.passes.distill import TeacherCall
    (teacher_call,) = [n for n in c.model.graph.nodes if n.op == "call_module" and
                       isinstance(c.model.get_submodule(n.target), TeacherCall)]
    # the teacher reads the raw input, not the student's input quantizer
    assert [a.op for a in teacher_call.all_input_nodes] == ["placeholder"]
    c.model.train()
    opt = torch.optim.SGD(c.model.parameters(), lr=0.01)
    losses = []
    for _ in range(3):
        out = c.model(x)
        loss = c.loss()
        assert torch.isfinite(loss) and loss.item() > 0
        torch.testing.assert_close(loss, nn.functional.mse_loss(out, model(x)))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_physical_pruning_shrinks_per_channel_quantizers():
    if "prune" not in gk.available_passes():
        pytest.skip("the prune pass is not available in this checkout")
    model, x = trained_resnet(), torch.randn(4, 3, 16, 16)
    c = gk.compress(model, {"pipeline": [{"pass": "quantize"}, {"pass": "prune", "ratio": 0.5}]},
                    x)
    c.model.eval()
    exported = c.export()
    layers = [n for n in exported.graph.nodes if layer_of(exported, n) is not None]
    assert len(layers) == 7
    for node in layers:
        (q,) = [t for t in weight_transforms(exported, node) if isinstance(t, WeightQuantizer)]
        assert q.scale.shape == (layer_of(exported, node)[1].weight.shape[0],)
    assert gk.count_params(exported) < gk.count_params(model)
    torch.testing.assert_close(exported(x), c.model(x), rtol=1e-5, atol=1e-6)


def test_layer_without_functional_form_is_skipped_with_warning():
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1, padding_mode="reflect"), nn.ReLU(),
                          nn.Conv2d(3, 2, 1))
    with pytest.warns(UserWarning, match="the weight of 0 is not quantized: 0: padding_mode="):
        c = quantize(model, torch.randn(2, 2, 5, 5))
    stats = c.statistics()["quantize"]
    assert stats["skipped_scopes"] == ["0"] and list(stats["weight_bits"]) == ["2"]


def test_two_quantize_passes_give_mixed_precision_without_double_quantization():
    model, x = trained_resnet(), torch.randn(2, 3, 16, 16)
    c = gk.compress(model, {"pipeline": [
        {"pass": "quantize", "bits": 4, "target_scopes": ["layer1"]},
        {"pass": "quantize", "bits": 8},
    ]}, x)
    stats = c.statistics()
    assert sorted(stats["quantize"]["weight_bits"]) == ["layer1.0.conv1", "layer1.0.conv2"]
    assert stats["quantize"]["weight_bits"]["layer1.0.conv1"] == 4
    assert stats["quantize_1"]["weight_quantizers"] == 5
    gm = c.model
    for node in gm.graph.nodes:
        module = gm.get_submodule(node.target) if node.op == "call_module" else None
        if isinstance(module, FakeQuantize):  # no quantizer reads another quantizer
            source = node.args[0]
            assert not (source.op == "call_module" and
                        isinstance(gm.get_submodule(source.target), FakeQuantize))
    for node in gm.graph.nodes:
        if layer_of(gm, node) is not None:
            assert len(weight_transforms(gm, node)) == 1


def test_fold_batchnorm_into_functional_layer_without_bias_and_into_linear():
    from graphkd.graph import functionalize_layer
    from graphkd.passes.bn_fold import fold_batchnorms

    model = nn.Sequential(nn.Conv2d(2, 3, 3, bias=False), nn.BatchNorm2d(3), nn.ReLU(),
                          nn.Flatten(), nn.Linear(27, 4), nn.BatchNorm1d(4, affine=False))
    for bn in (model[1], model[5]):
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
    model.eval()
    x = torch.randn(5, 2, 5, 5)
    gm = gk.trace(copy.deepcopy(model), x)
    functionalize_layer(gm, find_nodes(gm, module_type=nn.Conv2d)[0])
    assert fold_batchnorms(gm, lambda scope: True) == ["1", "5"]
    gm.graph.lint()
    gm.recompile()
    assert not find_nodes(gm, module_type=(nn.BatchNorm1d, nn.BatchNorm2d))
    assert gm.get_submodule("0").bias is not None
    torch.testing.assert_close(gm(x), model(x), rtol=1e-5, atol=1e-6)


class _TokenLinearBN(nn.Module):
    """Linear on (N, L, C) tokens, BatchNorm1d over dim 1 (the L tokens, not the features)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 5)
        self.bn = nn.BatchNorm1d(5)

    def forward(self, x):
        return self.bn(self.fc(x))


class _TiedWeightBN(nn.Module):
    """Two convs share one weight parameter; only the first is followed by a BatchNorm."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 3, 1)
        self.b = nn.Conv2d(3, 3, 1)
        self.b.weight = self.a.weight
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x):
        return self.bn(self.a(x)) + self.b(x)


@pytest.mark.parametrize("make, shape", [(_TokenLinearBN, (3, 5, 6)),
                                         (_TiedWeightBN, (2, 3, 4, 4))])
def test_batchnorm_is_not_folded_where_folding_would_change_the_model(make, shape):
    from graphkd.passes.bn_fold import fold_batchnorms
    torch.manual_seed(0)
    model = make().eval()
    with torch.no_grad():
        model.bn.running_mean.uniform_(-1, 1)
        model.bn.running_var.uniform_(0.2, 0.5)
    x = torch.randn(shape)
    gm = gk.trace(copy.deepcopy(model), x)
    assert fold_batchnorms(gm, lambda scope: True) == []
    gm.recompile()
    torch.testing.assert_close(gm(x), model(x))


class _SharedConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x):
        return self.conv(torch.relu(self.conv(x)))


@pytest.mark.parametrize("learnable", [True, False])
def test_a_layer_called_twice_keeps_one_weight_grid_through_training(learnable: bool):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 6, 6)
    c = quantize(_SharedConv(), x, learnable=learnable)
    first, second = (m for m in c.model.modules() if isinstance(m, WeightQuantizer))
    optimizer = torch.optim.SGD(c.model.parameters(), lr=0.5)
    for _ in range(2):
        c.model(x).square().sum().backward()
        optimizer.step()
        optimizer.zero_grad()
    weight = c.model.conv.weight
    assert torch.equal(first(weight), second(weight))
    assert c.statistics()["quantize"]["weight_quantizers"] == 1


def test_inference_reuses_the_quantized_weight_until_weight_or_grid_change():
    weight = nn.Parameter(torch.randn(4, 3, 3, 3))
    q = WeightQuantizer(QuantSpec(8, "symmetric", True), weight, out_axis=0, learnable=True).eval()
    with torch.no_grad():
        first = q(weight)
        assert q(weight) is first  # computed once
        weight.mul_(0.5)  # in place, as an optimizer step does
        second = q(weight)
        assert second is not first
        assert torch.equal(second, uncached(q, weight))
        q.scale.mul_(2.0)
        assert torch.equal(q(weight), uncached(q, weight))
        q.select_weight_channels(0, torch.tensor([0, 2]))
        assert q(weight[[0, 2]]).shape == (2, 3, 3, 3)
    graded = weight.detach().clone().requires_grad_()
    out = q(graded[[0, 2]])  # autograd on: never the cached tensor
    out.sum().backward()
    assert out.grad_fn is not None and graded.grad is not None and q.scale.grad is not None


def test_inference_cache_is_not_fooled_by_a_recomputed_weight_at_a_reused_address():
    """A weight that reaches the quantizer through a sparsity mask is a new tensor at every
    forward; the allocator hands its freed memory to the next one, with version 0 again."""
    torch.manual_seed(0)
    weight = torch.randn(16, 16)
    mask = torch.ones(16, 16)
    q = WeightQuantizer(QuantSpec(8, "symmetric", True), weight, out_axis=0, learnable=True).eval()
    with torch.no_grad():
        for _ in range(10):
            weight.mul_(0.9)  # an optimizer step between two evaluations
            masked = weight * mask
            assert torch.equal(q(masked), uncached(q, masked))
            del masked


def test_sparsify_then_quantize_runs_under_inference_mode_and_matches_grad_mode():
    torch.manual_seed(0)
    x = torch.randn(4, 16)
    c = gk.compress(mlp([16, 16, 4]), {"pipeline": [{"pass": "sparsify", "level": 0.5},
                                                    {"pass": "quantize"}]}, x)
    c.model.eval()
    with torch.inference_mode():
        out = c.model(x).clone()
    torch.testing.assert_close(out, c.model(x).detach(), rtol=0, atol=0)


def uncached(q: WeightQuantizer, weight: torch.Tensor) -> torch.Tensor:
    """The quantizer's output computed afresh (autograd on bypasses the inference cache)."""
    with torch.enable_grad():
        return q(weight).detach()


def test_a_trained_scale_that_crosses_zero_keeps_its_magnitude():
    weight = torch.randn(3, 4)
    q = WeightQuantizer(QuantSpec(8, "symmetric", True), weight, out_axis=0, learnable=True)
    positive = q(weight).detach()
    with torch.no_grad():
        q.scale[1] *= -1  # an optimizer step overshooting past zero
    torch.testing.assert_close(q(weight), positive, rtol=0, atol=0)
    assert torch.equal(q.current_qparams()[0], q.scale.detach().abs())


def test_activation_grid_sign_is_restored_from_a_checkpoint():
    spec = QuantSpec(8, "symmetric", False)
    relu_like = ActivationQuantizer(spec, learnable=False)
    relu_like.set_range(torch.tensor(0.0), torch.tensor(2.0))
    assert (relu_like.qmin, relu_like.qmax) == (0, 255)
    signed = ActivationQuantizer(spec, learnable=False)
    signed.set_range(torch.tensor(-1.0), torch.tensor(1.0))
    assert (signed.qmin, signed.qmax) == (-128, 127)
    signed.load_state_dict(relu_like.state_dict())
    assert (signed.qmin, signed.qmax) == (0, 255)
    x = torch.linspace(-1, 2, 50)
    assert torch.equal(signed(x), relu_like(x))

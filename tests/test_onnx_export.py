"""ONNX export of quantized students: QuantizeLinear/DequantizeLinear pairs that onnxruntime runs."""
from __future__ import annotations

from collections import Counter

import pytest
import torch
from torch import nn

import graphkd as gk
from graphkd.zoo import mlp, resnet_tiny

onnx = pytest.importorskip("onnx", reason="ONNX export needs the optional 'onnx' package "
                                          "(pip install 'graphkd[onnx]'; CI installs it)")
ort = pytest.importorskip("onnxruntime", reason="the round trip needs onnxruntime "
                                                "(pip install 'graphkd[onnx]'; CI installs it)")


def run_onnx(path, x: torch.Tensor):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])


def op_counts(path) -> Counter:
    return Counter(node.op_type for node in onnx.load(str(path)).graph.node)


def quantizer_count(c: gk.Compressed) -> int:
    stats = c.statistics()["quantize"]
    return stats["weight_quantizers"] + stats["activation_quantizers"]


@pytest.mark.parametrize("options", [
    {"bits": 8},
    {"bits": 4, "learnable": False},
    {"weights": {"mode": "asymmetric", "per_channel": False}, "activations": {"mode": "symmetric"}},
])
def test_resnet_round_trip_matches_pytorch(tmp_path, options):
    model, x = resnet_tiny().eval(), torch.randn(4, 3, 16, 16)
    c = gk.compress(model, {"pipeline": [{"pass": "quantize", **options}]}, x)
    path = gk.export_onnx(c, tmp_path / "model.onnx")
    onnx.checker.check_model(onnx.load(str(path)))
    ops = op_counts(path)
    assert ops["QuantizeLinear"] == ops["DequantizeLinear"] == quantizer_count(c)
    assert ops["BatchNormalization"] == 0  # folded at pass time
    expected = c.export()(x).detach()
    got = run_onnx(path, x)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_per_channel_weights_use_opset_13_axis(tmp_path):
    x = torch.randn(8, 6)
    c = gk.compress(mlp((6, 5, 3)), {"pipeline": [{"pass": "quantize"}]}, x)
    path = gk.export_onnx(c, tmp_path / "mlp.onnx")
    model = onnx.load(str(path))
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 13
    axes = [a.i for n in model.graph.node if n.op_type == "QuantizeLinear"
            for a in n.attribute if a.name == "axis"]
    assert axes.count(0) >= 2  # the two Linear weights, quantized per output channel
    torch.testing.assert_close(run_onnx(path, x), c.export()(x).detach(), rtol=1e-4, atol=1e-5)


def test_graph_module_needs_example_inputs(tmp_path):
    c = gk.compress(mlp((6, 3)), {"pipeline": [{"pass": "quantize"}]}, torch.randn(2, 6))
    with pytest.raises(gk.GraphKDError, match="pass example_inputs when exporting a GraphModule"):
        gk.export_onnx(c.export(), tmp_path / "m.onnx")
    x = torch.randn(3, 6)
    path = gk.export_onnx(c.export(), tmp_path / "m.onnx", x)
    torch.testing.assert_close(run_onnx(path, x), c.export()(x).detach(), rtol=1e-4, atol=1e-5)


def test_bad_arguments_are_graphkd_errors(tmp_path):
    with pytest.raises(gk.GraphKDError, match="needs a graphkd.Compressed or a torch.fx"):
        gk.export_onnx(nn.Linear(2, 2), tmp_path / "m.onnx", torch.randn(1, 2))
    c = gk.compress(mlp((6, 3)), {"pipeline": [{"pass": "quantize"}]}, torch.randn(2, 6))
    with pytest.raises(gk.GraphKDError, match="opset 12 is too old"):
        gk.export_onnx(c, tmp_path / "m.onnx", opset=12)


def test_conv_transpose_quantized_along_axis_1(tmp_path):
    model = nn.Sequential(nn.ConvTranspose2d(3, 4, 2, stride=2), nn.ReLU()).eval()
    x = torch.randn(2, 3, 5, 5)
    c = gk.compress(model, {"pipeline": [{"pass": "quantize"}]}, x)
    quantizer = c.model.get_submodule("quantizers.0_weight")
    assert quantizer.axis == 1 and quantizer.scale.shape == (4,)
    path = gk.export_onnx(c, tmp_path / "deconv.onnx")
    torch.testing.assert_close(run_onnx(path, x), c.export()(x).detach(), rtol=1e-4, atol=1e-5)


def test_quantize_and_distill_exports_the_student_only(tmp_path):
    if "distill" not in gk.available_passes():
        pytest.skip("the distill pass is not available in this checkout")
    model, x = resnet_tiny().eval(), torch.randn(2, 3, 16, 16)
    c = gk.compress(model, {"pipeline": [{"pass": "quantize"}, {"pass": "distill", "type": "mse"}]},
                    x)
    path = gk.export_onnx(c, tmp_path / "student.onnx")
    ops = op_counts(path)
    assert ops["Conv"] == 6  # the student's convs; the teacher is not exported
    assert ops["QuantizeLinear"] == quantizer_count(c)
    torch.testing.assert_close(run_onnx(path, x), c.export()(x).detach(), rtol=1e-4, atol=1e-5)


def test_exported_file_serves_any_batch_size(tmp_path):
    model = resnet_tiny().eval()
    c = gk.compress(model, {"pipeline": [{"pass": "quantize", "bits": 8}]}, torch.randn(1, 3, 16, 16))
    c.model.eval()
    path = gk.export_onnx(c, tmp_path / "m.onnx")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].name == "x" and session.get_inputs()[0].shape[0] == "batch"
    x = torch.randn(5, 3, 16, 16)
    torch.testing.assert_close(run_onnx(path, x), c.model(x).detach(), rtol=1e-4, atol=1e-4)
    fixed = gk.export_onnx(c, tmp_path / "fixed.onnx", dynamic_batch=False)
    assert ort.InferenceSession(str(fixed)).get_inputs()[0].shape[0] == 1

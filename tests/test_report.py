"""The final table's measurements: interleaved timing, ONNX Runtime latency and its fallbacks."""
from __future__ import annotations

import importlib.util
import logging
import time

import pytest
import torch
from torch import nn

import graphkd as gk
from graphkd import report
from graphkd.report import (
    cpu_latencies_ms,
    interleaved_medians_ms,
    markdown_table,
    onnx_latencies_ms,
    write_onnx,
)
from graphkd.zoo import mlp, resnet_tiny

needs_ort = pytest.mark.skipif(not report.onnx_runtime_available(),
                               reason="needs onnx and onnxruntime (pip install 'graphkd[onnx]')")


class LogGamma(nn.Module):
    """``lgamma`` has no ONNX form at opset 13, so a model using it cannot be exported."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.lgamma(x.abs() + 1)


def unexportable_mlp() -> nn.Module:
    """A trainable classifier of 64 features the ONNX exporter refuses (used by test_run)."""
    return nn.Sequential(LogGamma(), nn.Linear(64, 10))


@pytest.fixture
def quick_timing(monkeypatch) -> None:
    monkeypatch.setattr(report, "LATENCY_BUDGET_S", 0.0)  # just the minimum number of rounds


def test_calls_are_warmed_up_then_interleaved(quick_timing) -> None:
    order: list[str] = []

    def slow() -> None:
        order.append("slow")
        time.sleep(0.002)

    medians = interleaved_medians_ms({"slow": slow, "fast": lambda: order.append("fast")})
    warm = report.LATENCY_WARMUP
    assert order[:2 * warm] == ["slow"] * warm + ["fast"] * warm
    assert order[2 * warm:] == ["slow", "fast"] * report.LATENCY_MIN_REPS
    assert medians["slow"] >= 2.0 > medians["fast"] > 0


def test_cpu_latency_uses_one_thread_and_restores_the_setting(quick_timing) -> None:
    seen: list[int] = []

    class Probe(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            seen.append(torch.get_num_threads())
            return x

    threads = torch.get_num_threads()
    ms = cpu_latencies_ms({"probe": Probe()}, torch.randn(1, 3))
    assert set(seen) == {1} and len(seen) == report.LATENCY_WARMUP + report.LATENCY_MIN_REPS
    assert ms["probe"] > 0 and torch.get_num_threads() == threads


@needs_ort
def test_write_onnx_exports_modules_and_quantized_graph_modules(tmp_path) -> None:
    import onnx
    import onnxruntime as ort

    model, x = resnet_tiny().eval(), torch.randn(1, 3, 16, 16)
    quantized = gk.compress(model, {"pipeline": [{"pass": "quantize"}]}, x).export()
    for name, module in (("plain", model), ("quantized", quantized)):
        path = write_onnx(module, tmp_path / f"{name}.onnx", x)
        ops = {node.op_type for node in onnx.load(str(path)).graph.node}
        assert ("QuantizeLinear" in ops) == (name == "quantized")
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        got = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
        torch.testing.assert_close(got, module(x).detach(), rtol=1e-4, atol=1e-5)


@needs_ort
def test_onnx_latency_of_modules_and_graph_modules(quick_timing) -> None:
    model, x = mlp((16, 32, 4)).eval(), torch.randn(1, 16)
    exported = gk.compress(model, {"pipeline": [{"pass": "quantize"}]}, x).export()
    ms = onnx_latencies_ms({"original": model, "int8": exported}, x)
    assert list(ms) == ["original", "int8"]
    assert all(isinstance(v, float) and v > 0 for v in ms.values())


@needs_ort
def test_a_model_that_cannot_be_exported_gets_none_and_a_warning(quick_timing, caplog) -> None:
    x = torch.rand(1, 64)
    with caplog.at_level(logging.WARNING, logger="graphkd.report"):
        ms = onnx_latencies_ms({"original": mlp((64, 10)), "odd": unexportable_mlp()}, x)
    assert ms["odd"] is None and ms["original"] > 0
    [record] = caplog.records
    assert record.getMessage().startswith(
        "ONNX Runtime latency of 'odd': n/a, the model could not be exported or loaded "
        "(UnsupportedOperatorError: Exporting the operator 'aten::lgamma' to ONNX opset version 13")


def test_without_onnxruntime_every_value_is_none(monkeypatch) -> None:
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "onnxruntime" else find_spec(name, *a))
    assert not report.onnx_runtime_available()
    assert onnx_latencies_ms({"a": mlp((4, 2)), "b": mlp((4, 2))}, torch.randn(1, 4)) == {
        "a": None, "b": None}


MODELS = {"original": {"accuracy": 0.995, "params": 90250, "flops": 3_640_000,
                       "size_bytes": 369_766, "latency_ms": 0.2, "onnx_latency_ms": 0.04},
          "kd": {"accuracy": 0.98, "params": 27900, "flops": 1_530_000,
                 "size_bytes": 121_754, "latency_ms": 0.5, "onnx_latency_ms": 0.01}}


def test_table_rows_show_ratios_to_the_original() -> None:
    assert markdown_table(MODELS).splitlines() == [
        "| model | top-1 | params | FLOPs | size | PyTorch latency | ONNX Runtime latency |",
        "| --- | --- | --- | --- | --- | --- | --- |",
        "| original | 99.50% | 90.25k | 3.64M | 361.1 KiB | 0.200 ms | 0.040 ms |",
        ("| compressed + KD | 98.00% | 27.90k (0.31x) | 1.53M (0.42x) | 118.9 KiB (0.33x) | "
         "0.500 ms (2.50x) | 0.010 ms (0.25x) |")]


@pytest.mark.parametrize("missing", ["original", "kd"])
def test_a_missing_onnx_latency_shows_n_a_and_no_ratio(missing) -> None:
    models = {key: {**m, "onnx_latency_ms": None if key == missing else m["onnx_latency_ms"]}
              for key, m in MODELS.items()}
    rows = [line.split(" | ")[-1] for line in markdown_table(models).splitlines()[2:]]
    assert rows == (["n/a |", "0.010 ms |"] if missing == "original" else ["0.040 ms |", "n/a |"])

"""The main job end to end (synthetic data, tiny model), its files, Ctrl-C, and the training loop."""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import graphkd as gk
from graphkd import report
from graphkd.artifacts import load_exported
from graphkd.cli import EXIT_INTERRUPTED, EXIT_OK, main
from graphkd.data import digits, synthetic
from graphkd.errors import ConfigError, GraphKDError
from graphkd.report import onnx_runtime_available
from graphkd.run import METRICS_KEYS, run
from graphkd.train import TrainSpec, evaluate, fit, learning_rate_factor, loader
from graphkd.viz import FORMATS, SUFFIXES
from graphkd.zoo import mlp

# svg/png need Graphviz; without it (CI installs it when it can) the smoke run dumps the rest.
SMOKE_FORMATS = FORMATS if shutil.which("dot") else tuple(f for f in FORMATS if f not in ("svg", "png"))
SMOKE = f"""\
model: graphkd.zoo:digits_cnn
input_shape: [1, 1, 8, 8]
data: {{name: synthetic, num_samples: 96, num_classes: 10}}
seed: 3
train: {{epochs: 1, batch_size: 32, teacher_epochs: 2}}
compare: no_distill
dump: {{formats: [{", ".join(SMOKE_FORMATS)}]}}
pipeline:
  - pass: prune
    ratio: 0.5
  - pass: quantize
    bits: 8
  - pass: distill
    type: softmax
"""
LIGHT = """\
model: graphkd.zoo:digits_cnn
input_shape: [1, 1, 8, 8]
data: {name: synthetic, num_samples: 64}
train: {epochs: 1, batch_size: 16, teacher_epochs: 1}
dump: {formats: [json], stages: false, diff: false}
pipeline:
  - pass: distill
    type: mse
"""
MODEL_KEYS = {"accuracy", "params", "flops", "size_bytes", "latency_ms", "onnx_latency_ms"}


def write_config(directory: Path, text: str = SMOKE, name: str = "smoke.yaml") -> Path:
    path = directory / name
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    directory = tmp_path_factory.mktemp("run")
    config = write_config(directory)
    return config, run(config, out_dir=directory / "out")


def test_metrics_json_has_the_documented_keys(smoke) -> None:
    _, result = smoke
    metrics = json.loads((result.out_dir / "metrics.json").read_text())
    assert tuple(metrics) == METRICS_KEYS
    assert set(metrics["models"]) == {"original", "kd", "no_kd"}
    assert set(metrics["models"]["original"]) == MODEL_KEYS
    assert set(metrics["models"]["kd"]) == MODEL_KEYS | {"student_accuracy"}
    assert metrics["interrupted"] is False and metrics["seed"] == 3
    assert metrics["teacher"] == {"source": "trained"}
    assert [len(metrics["history"][k]) for k in ("teacher", "kd", "no_kd")] == [2, 1, 1]
    assert metrics["data"] == {"name": "synthetic", "train_samples": 72, "test_samples": 24}
    assert {"prune", "quantize", "distill"} <= set(metrics["statistics"])


def test_compression_shrinks_params_and_flops(smoke) -> None:
    models = smoke[1].metrics["models"]
    for key in ("kd", "no_kd"):
        assert models[key]["params"] < 0.5 * models["original"]["params"]
        assert models[key]["flops"] < 0.6 * models["original"]["flops"]


def test_dumps_exist_in_every_requested_format(smoke) -> None:
    graphs = smoke[1].out_dir / "graphs"
    stems = ["00_traced", "01_prune", "02_quantize", "03_distill", "diff_student", "diff_exported"]
    expected = {stem + SUFFIXES[fmt] for stem in stems for fmt in SMOKE_FORMATS}
    assert {p.name for p in graphs.iterdir()} == expected
    assert all((graphs / name).stat().st_size > 0 for name in expected)
    assert "[added]" in (graphs / "diff_student.dot").read_text()
    assert "channels 64→32" in (graphs / "diff_exported.dot").read_text()


def test_the_exported_model_loads_and_gives_the_same_outputs(smoke) -> None:
    config, result = smoke
    files = result.metrics["files"]
    loaded = load_exported(files["model"])
    x = torch.randn(5, 1, 8, 8)
    assert torch.equal(loaded(x), result.exported(x))
    assert files["portable"].endswith((".pt2", ".torchscript.pt"))
    if files["portable"].endswith(".pt2"):
        portable = torch.export.load(files["portable"]).module()
    else:
        portable = torch.jit.load(files["portable"])
    torch.testing.assert_close(portable(x[:1]), loaded(x[:1]))
    # The accuracy in metrics.json is the loaded model's accuracy on the same test split.
    _, test = synthetic((1, 8, 8), 96, 10)
    assert evaluate(loaded, loader(test, 7, shuffle=False)) == result.metrics["models"]["kd"]["accuracy"]
    assert (result.out_dir / "curves.png").read_bytes()[:4] == b"\x89PNG"


needs_ort = pytest.mark.skipif(not onnx_runtime_available(), reason="needs onnx and onnxruntime")


def onnx_outputs(path: Path, inputs: list[torch.Tensor], optimize: bool) -> torch.Tensor:
    """``model.onnx`` run one input at a time (its graph has the config's input shape); without
    ``optimize`` ONNX Runtime runs each QuantizeLinear/DequantizeLinear in float, with it (the
    default) it fuses them into int8 kernels."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return torch.cat([torch.from_numpy(session.run(None, {name: x.numpy()})[0]) for x in inputs])


def smoke_test_inputs() -> list[torch.Tensor]:
    _, test = synthetic((1, 8, 8), 96, 10)
    return [test[i][0][None] for i in range(4)]


@needs_ort
def test_onnx_runtime_latency_and_model_onnx(smoke) -> None:
    _, result = smoke
    latencies = [m["onnx_latency_ms"] for m in result.metrics["models"].values()]
    assert len(latencies) == 3 and all(isinstance(ms, float) and ms > 0 for ms in latencies)
    path = Path(result.metrics["files"]["onnx"])
    assert path == result.out_dir / "model.onnx"
    inputs = smoke_test_inputs()
    expected = result.exported(torch.cat(inputs)).detach()
    got = onnx_outputs(path, inputs, optimize=False)  # the exported graph itself, op by op
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())


@needs_ort
def test_model_onnx_in_int8_kernels_matches_the_exported_model(smoke) -> None:
    """ONNX Runtime's fused int8 kernels round biases and requantize in integers: close to the
    float simulation, same predictions (a trained scale that crossed zero once killed channels)."""
    _, result = smoke
    inputs = smoke_test_inputs()
    expected = result.exported(torch.cat(inputs)).detach()
    got = onnx_outputs(Path(result.metrics["files"]["onnx"]), inputs, optimize=True)
    torch.testing.assert_close(got, expected, rtol=0, atol=0.02 * expected.abs().max().item())
    assert torch.equal(got.argmax(1), expected.argmax(1))


def test_without_onnxruntime_the_table_shows_n_a(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setattr(report, "onnx_runtime_available", lambda: False)
    assert main(["run", str(write_config(tmp_path, LIGHT)), "--out", str(tmp_path / "out")]) == EXIT_OK
    lines = capsys.readouterr().out.splitlines()
    assert [line.rsplit(" | ", 1)[-1] for line in lines[2:4]] == ["n/a |", "n/a |"]
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert [m["onnx_latency_ms"] for m in metrics["models"].values()] == [None, None]
    assert all(m["latency_ms"] > 0 for m in metrics["models"].values())


def test_a_model_onnx_cannot_export_still_completes_the_run(tmp_path, caplog) -> None:
    config = write_config(tmp_path, LIGHT.replace("graphkd.zoo:digits_cnn",
                                                  "tests.test_report:unexportable_mlp")
                          .replace("[1, 1, 8, 8]", "[1, 64]"))
    with caplog.at_level("WARNING"):
        result = run(config, out_dir=tmp_path / "out")
    models = result.metrics["models"]
    assert [m["onnx_latency_ms"] for m in models.values()] == [None, None]
    assert all(m["latency_ms"] > 0 for m in models.values())
    assert result.metrics["files"]["onnx"].startswith("not written: UnsupportedOperatorError: ")
    assert not (tmp_path / "out" / "model.onnx").exists()
    assert (tmp_path / "out" / "model.pt").exists()
    if onnx_runtime_available():
        warned = [r.getMessage() for r in caplog.records if r.name == "graphkd.report"]
        assert [w.split(":")[0] for w in warned] == ["ONNX Runtime latency of 'original'",
                                                     "ONNX Runtime latency of 'kd'"]


def test_the_cli_prints_the_table_and_reuses_the_cached_teacher(tmp_path, capsys) -> None:
    config = write_config(tmp_path, LIGHT + "compare: no_distill\n")
    argv = ["run", str(config), "--out", str(tmp_path / "out")]
    assert main(argv) == EXIT_OK
    out = capsys.readouterr().out
    assert out.startswith("| model | top-1 | params | FLOPs | size | PyTorch latency | "
                          "ONNX Runtime latency |\n")
    assert "| compressed + KD | " in out and "| compressed, no KD | " in out
    assert "distillation changed top-1 by " in out
    first = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert main([*argv, "--epochs", "2"]) == EXIT_OK
    second = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert (first["teacher"], second["teacher"]) == ({"source": "trained"}, {"source": "cache"})
    timings = {k: second["models"]["original"][k] for k in ("latency_ms", "onnx_latency_ms")}
    assert second["models"]["original"] == {**first["models"]["original"], **timings}
    assert len(second["history"]["kd"]) == 2


class InterruptingProgress:
    """Presses Ctrl-C during the second batch of phase ``label``."""

    def __init__(self, label: str) -> None:
        self.label, self.current, self.batches = label, "", 0

    def start(self, label: str, epochs: int, batches: int) -> None:
        self.current = label

    def batch(self, loss: float, accuracy: float) -> None:
        if self.current == self.label:
            self.batches += 1
            if self.batches == 2:
                raise KeyboardInterrupt

    def epoch(self, index: int, metrics: dict) -> None:
        pass

    def finish(self) -> None:
        pass


def test_ctrl_c_saves_what_is_done_and_exits_130(tmp_path, monkeypatch, capsys) -> None:
    import graphkd.progress

    config = write_config(tmp_path, LIGHT.replace("epochs: 1,", "epochs: 3,") + "compare: no_distill\n")
    monkeypatch.setattr(graphkd.progress, "progress_for", lambda stream: InterruptingProgress("kd"))
    code = main(["run", str(config), "--out", str(tmp_path / "out")])
    assert code == EXIT_INTERRUPTED
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["interrupted"] is True
    assert set(metrics["models"]) == {"original", "kd"}  # the no-KD comparison was skipped
    assert metrics["history"]["kd"] == []  # stopped inside the first epoch
    assert load_exported(tmp_path / "out" / "model.pt")(torch.randn(2, 1, 8, 8)).shape == (2, 10)
    assert "interrupted: finished parts were saved" in capsys.readouterr().err


def test_a_model_with_weights_is_not_retrained(tmp_path) -> None:
    weights = tmp_path / "w.pt"
    torch.manual_seed(1)
    trained = mlp((64, 16, 10))
    torch.save(trained.state_dict(), weights)
    config = write_config(tmp_path, f"""\
model: {{callable: graphkd.zoo:mlp, kwargs: {{sizes: [64, 16, 10]}}, weights: {weights}}}
input_shape: [1, 64]
data: {{name: synthetic, num_samples: 40}}
train: {{epochs: 1, batch_size: 16}}
dump: {{formats: [json], diff: false, stages: false}}
pipeline: []
""")
    result = run(config, out_dir=tmp_path / "out")
    assert result.metrics["teacher"] == {"source": "weights"}
    assert not (tmp_path / "out" / "teacher.pt").exists()
    assert not (tmp_path / "out" / "graphs").exists()
    _, test = synthetic((64,), 40, 10)
    assert result.metrics["models"]["original"]["accuracy"] == evaluate(trained, loader(test, 8,
                                                                                       shuffle=False))


@pytest.mark.parametrize(("text", "message"), [
    ("pipeline: []\ndata: digits\n", "model: missing: `graphkd run` needs a 'model' section"),
    (SMOKE.replace("epochs: 1,", "epochs: 1, lr: 0,"), "train.lr (line 5): must be > 0, got 0"),
    (SMOKE.replace("[1, 1, 8, 8]", "[8]"), "input_shape (line 2): must be a batch shape like "),
    (SMOKE.replace("batch_size: 32", "batch_size: 0"), "train.batch_size (line 5): must be >= 1"),
    (SMOKE.replace("formats: [dot", "formats: [gif"), "dump.formats[0] (line 7): must be one of"),
])
def test_run_config_errors_name_the_path(tmp_path, text, message) -> None:
    with pytest.raises(ConfigError) as info:
        run(write_config(tmp_path, text), out_dir=tmp_path / "out")
    assert str(info.value).startswith(message)
    assert not (tmp_path / "out").exists()  # nothing ran


def test_load_exported_refuses_other_files(tmp_path) -> None:
    torch.save({"state_dict": {}}, tmp_path / "x.pt")
    with pytest.raises(GraphKDError, match=r"x.pt is not a model written by `graphkd run`"):
        load_exported(tmp_path / "x.pt")


class CountingHooks:
    """Stands in for Compressed: a constant extra loss and step counters."""

    def __init__(self, extra: float) -> None:
        self.extra, self.steps, self.epochs = extra, 0, 0

    def loss(self) -> torch.Tensor:
        return torch.tensor(self.extra)

    def step(self) -> None:
        self.steps += 1

    def epoch_step(self) -> None:
        self.epochs += 1


def test_fit_adds_the_hooks_loss_and_steps_the_schedules() -> None:
    x, y = torch.randn(20, 4), torch.randint(0, 3, (20,))
    data = loader(TensorDataset(x, y), 8, shuffle=True, seed=0)
    model = mlp((4, 3))
    before = nn.functional.cross_entropy(model(x), y).item()
    hooks = CountingHooks(extra=5.0)
    spec = TrainSpec(optimizer="sgd", schedule="constant", momentum=0.0)
    history = fit(model, data, spec, epochs=2, lr=0.0, hooks=hooks)  # lr 0: weights stay put
    assert (hooks.steps, hooks.epochs) == (6, 2)
    assert history.epochs[0]["loss"] == pytest.approx(before + 5.0, rel=1e-5)
    assert history.epochs[0]["extra_loss"] == pytest.approx(5.0)
    assert not model.training


def test_fit_trains_on_digits_and_matches_evaluate() -> None:
    train, test = digits()
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    test_data = loader(test, 128, shuffle=False)
    history = fit(model, loader(train, 64, shuffle=True), TrainSpec(), epochs=3, lr=0.01,
                  test_data=test_data)
    assert history.epochs[-1]["test_accuracy"] == evaluate(model, test_data) > 0.9


def test_cosine_schedule_values() -> None:
    assert learning_rate_factor("cosine", 0, 10) == 1.0
    assert learning_rate_factor("cosine", 5, 10) == pytest.approx(0.5)
    assert learning_rate_factor("cosine", 10, 10) == pytest.approx(0.0)
    assert learning_rate_factor("cosine", 3, 10) == pytest.approx(0.5 * (1 + math.cos(0.3 * math.pi)))
    assert learning_rate_factor("constant", 7, 10) == 1.0


def test_ctrl_c_inside_fit_keeps_completed_epochs() -> None:
    data = loader(TensorDataset(torch.randn(16, 4), torch.randint(0, 3, (16,))), 4, shuffle=False)

    class StopAtBatch6(InterruptingProgress):
        def batch(self, loss: float, accuracy: float) -> None:
            self.batches += 1
            if self.batches == 6:  # the second batch of the second epoch
                raise KeyboardInterrupt

    model = mlp((4, 3))
    history = fit(model, data, TrainSpec(), epochs=3, lr=0.01, progress=StopAtBatch6("train"))
    assert history.interrupted and [e["epoch"] for e in history.epochs] == [1]
    assert not model.training


def test_progress_is_rich_on_a_terminal_and_log_lines_otherwise(caplog) -> None:
    import io

    from graphkd.progress import LogProgress, RichProgress, progress_for

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    assert isinstance(progress_for(io.StringIO()), LogProgress)
    terminal = Terminal()
    assert isinstance(progress_for(terminal), RichProgress)
    data = loader(TensorDataset(torch.randn(8, 4), torch.randint(0, 3, (8,))), 4, shuffle=False)
    fit(mlp((4, 3)), data, TrainSpec(), epochs=2, lr=0.01, progress=progress_for(terminal),
        label="teacher")
    assert "teacher epochs" in terminal.getvalue() and "2/2" in terminal.getvalue()
    with caplog.at_level("INFO", logger="graphkd.train"):
        fit(mlp((4, 3)), data, TrainSpec(), epochs=2, lr=0.01, label="kd")
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0] == "kd: 2 epochs x 2 batches"
    assert lines[2].startswith("kd epoch 2/2: loss ") and " train " in lines[2]


def test_svg_dumps_without_graphviz_fail_before_training(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(GraphKDError, match=r"^cannot write the graph dumps: rendering (svg|png) "
                                           r"needs the Graphviz 'dot' program"):
        run(write_config(tmp_path, LIGHT.replace("[json]", "[json, png]")), out_dir=tmp_path / "out")
    assert not (tmp_path / "out").exists()


class RecordCalibration(gk.Pass):
    """Records how `graphkd run` calibrates: the number of samples asked for, per call."""

    name = "record_calibration"
    calls: list = []

    def apply(self, gm, ctx) -> None:
        ctx.on_calibrate(lambda data, num_samples: RecordCalibration.calls.append(
            (num_samples, next(iter(data))[0].shape)))


@pytest.mark.parametrize(("setting", "expected"), [("", [None]), (", calibration_samples: 7", [7]),
                                                   (", calibration_samples: 0", [])])
def test_calibration_uses_training_batches(tmp_path, setting, expected) -> None:
    gk.register_pass(RecordCalibration)
    RecordCalibration.calls = []
    text = LIGHT.replace("teacher_epochs: 1", "teacher_epochs: 1" + setting).replace(
        "  - pass: distill\n    type: mse\n", "  - pass: record_calibration\n")
    run(write_config(tmp_path, text), out_dir=tmp_path / "out")
    assert [n for n, _ in RecordCalibration.calls] == expected
    assert all(shape == (16, 1, 8, 8) for _, shape in RecordCalibration.calls)  # train batches

"""Every shipped config validates and runs (synthetic data, one tiny epoch); the digits demo runs
for real (slow)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from graphkd.artifacts import load_exported
from graphkd.cli import EXIT_OK, main
from graphkd.config import load_document
from graphkd.run import read_job, run

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))
DEMO = Path(__file__).parent.parent / "configs" / "digits_prune_quant_kd.yaml"


def test_the_shipped_configs_are_there() -> None:
    names = {p.name for p in CONFIGS}
    assert {"digits_prune_quant_kd.yaml", "digits_prune.yaml", "digits_quantize.yaml",
            "digits_sparsify.yaml", "digits_distill.yaml", "digits_resnet_all_passes.yaml"} <= names
    covered = {item["pass"] for p in CONFIGS for item in load_document(p)["pipeline"]}
    assert covered == {"prune", "quantize", "sparsify", "distill"}


def test_the_demo_is_prune_int8_qat_softmax_kd_compared_without_kd() -> None:
    pipeline, job = read_job(DEMO)
    assert [p.name for p in pipeline.passes] == ["prune", "quantize", "distill"]
    assert job.pipeline[1]["bits"] == 8 and job.pipeline[2]["type"] == "softmax"
    assert job.compare == "no_distill" and job.data.name == "digits"


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.stem)
def test_config_runs_on_synthetic_data_for_one_tiny_epoch(config: Path, tmp_path) -> None:
    document = yaml.safe_load(config.read_text())
    document["data"] = {"name": "synthetic", "num_samples": 48, "num_classes": 10}
    document["train"] = {**document.get("train", {}), "epochs": 1, "teacher_epochs": 1,
                         "batch_size": 16}
    document["dump"] = {"formats": ["json"]}
    tiny = tmp_path / config.name
    tiny.write_text(yaml.safe_dump(document))
    assert main(["validate", str(tiny)]) == EXIT_OK
    result = run(tiny, out_dir=tmp_path / "out")
    expected = {"original", "kd" if "distill" in config.read_text() else "compressed"}
    if document.get("compare") == "no_distill":
        expected.add("no_kd")
    assert set(result.metrics["models"]) == expected and not result.interrupted
    stages = len(document["pipeline"]) + 1
    assert len(list((tmp_path / "out" / "graphs").glob("0*.json"))) == stages


def layer_shapes(model: nn.Module) -> list[tuple[int, int]]:
    return [(m.weight.shape[1], m.weight.shape[0]) for m in model.modules()
            if isinstance(m, (nn.Conv2d, nn.Linear))]


@pytest.mark.slow
def test_digits_demo_end_to_end(tmp_path) -> None:
    """The README's quick start: a good teacher, KD within 3 points, pruning's exact savings."""
    result = run(DEMO, out_dir=tmp_path / "demo")
    models = result.metrics["models"]
    assert models["original"]["accuracy"] >= 0.95
    assert models["kd"]["accuracy"] >= models["original"]["accuracy"] - 0.03
    # prune ratio 0.5 halves every prunable group: all but the first conv's and the logits'.
    exported = load_exported(result.metrics["files"]["model"])
    assert layer_shapes(exported) == [(1, 32), (32, 32), (32, 32), (128, 64), (64, 10)]
    # FLOPs by hand: 2 x MACs of each layer at its output resolution (8x8, 8x8, 4x4, 1, 1).
    macs = 8 * 8 * 32 * 1 * 9 + 8 * 8 * 32 * 32 * 9 + 4 * 4 * 32 * 32 * 9 + 128 * 64 + 64 * 10
    assert models["kd"]["flops"] == models["no_kd"]["flops"] == 2 * macs
    original_macs = 8 * 8 * 32 * 9 + 8 * 8 * 64 * 32 * 9 + 4 * 4 * 64 * 64 * 9 + 256 * 128 + 1280
    assert models["original"]["flops"] == 2 * original_macs
    layer_params = sum(i * o * (9 if k < 3 else 1) + o for k, (i, o) in
                       enumerate(layer_shapes(exported)))
    assert layer_params <= models["kd"]["params"] < layer_params + 1000  # + quantizer scales
    assert models["kd"]["params"] < 0.35 * models["original"]["params"]
    metrics = json.loads((tmp_path / "demo" / "metrics.json").read_text())
    assert metrics["teacher"]["source"] == "trained" and not metrics["interrupted"]
    x = torch.randn(3, 1, 8, 8)
    torch.testing.assert_close(exported(x), result.exported(x))


def test_run_section_schemas_match_the_parsers() -> None:
    """The TypedDicts that validate `train` and `data` list exactly the keys the parsers take."""
    from dataclasses import fields
    from typing import get_type_hints

    from graphkd.config import DataSection, TrainSection
    from graphkd.data import DataSpec
    from graphkd.train import TrainSpec

    assert list(get_type_hints(TrainSection)) == [f.name for f in fields(TrainSpec)]
    assert set(get_type_hints(DataSection)) == {f.name for f in fields(DataSpec)}

"""The main job, ``graphkd run CONFIG``: teacher -> compress -> fine-tune with KD -> export -> report.

Order of work (all outputs under ``out_dir``):

1. load and validate the whole config (nothing runs on a bad one);
2. build the data and the model; an untrained architecture is trained first (the teacher) and
   cached in ``teacher.pt``, keyed by everything that determines it, so the next run reuses it;
3. measure the original; compress it (per-pass graph dumps); fine-tune on
   ``criterion + Compressed.loss()``; export; measure;
4. with ``compare: no_distill``, repeat step 3 without the distill pass from the same start
   (same teacher weights, seed and batch order), so the table shows what distillation bought;
5. time every model in PyTorch and in ONNX Runtime (int8 kernels for quantized models);
6. write ``metrics.json``, ``model.pt`` (+ portable and ONNX exports), ``curves.png`` and diff dumps.

Ctrl-C during training stops that phase, then the finished parts are exported and written with
``"interrupted": true`` and later phases are skipped.
"""
from __future__ import annotations

import copy
import hashlib
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .artifacts import plot_curves, save_exported, write_metrics
from .compressed import Compressed
from .config import build_passes, line_of, load_document
from .data import DataSpec, load_data
from .errors import ConfigError
from .loading import build_model
from .pipeline import Pipeline
from .progress import Progress
from .report import cpu_latencies_ms, measure, onnx_latencies_ms
from .trace import propagate_shapes, trace
from .train import History, TrainSpec, evaluate, fit, loader
from .viz import check_formats, dump, graphviz_program

log = logging.getLogger(__name__)

DISTILL = "distill"
EVAL_BATCH_SIZE = 512
METRICS_KEYS = ("config", "seed", "interrupted", "data", "train", "teacher", "models", "history",
                "statistics", "files")


@dataclass(frozen=True)
class JobSpec:
    """The sections of a config that ``graphkd run`` needs, checked and with defaults."""

    model: str | Mapping[str, Any]
    input_shape: tuple[int, ...]
    data: DataSpec
    train: TrainSpec
    pipeline: list[Mapping[str, Any]]
    compare: str | None
    seed: int
    dump_dir: str
    dump_formats: tuple[str, ...]
    dump_stages: bool
    dump_diff: bool

    @classmethod
    def from_document(cls, doc: Mapping[str, Any], *, epochs: int | None = None,
                      seed: int | None = None) -> JobSpec:
        """Parse a document already validated by :func:`graphkd.config.build_passes`."""
        for key, example in (("model", "graphkd.zoo:digits_cnn"), ("input_shape", "[1, 1, 8, 8]"),
                             ("data", "digits")):
            if key not in doc:
                raise ConfigError(f"missing: `graphkd run` needs a '{key}' section (e.g. "
                                  f"'{key}: {example}')", key)
        shape = tuple(doc["input_shape"])
        if len(shape) < 2 or min(shape) < 1:
            raise ConfigError(f"must be a batch shape like [1, 1, 8, 8] (all >= 1), got {list(shape)}",
                              "input_shape")
        pipeline = list(doc["pipeline"])
        compare = doc.get("compare")
        if compare == "no_distill" and not any(item.get("pass") == DISTILL for item in pipeline):
            raise ConfigError("'no_distill' compares against the same pipeline without its distill "
                              "pass, but the pipeline has none: add '- pass: distill' or remove "
                              "'compare'", "compare")
        dump_section = doc.get("dump") or {}
        formats = tuple(dump_section.get("formats", ("dot", "json")))
        check_formats(formats)
        return cls(model=doc["model"], input_shape=shape, data=DataSpec.parse(doc["data"]),
                   train=TrainSpec.parse(doc.get("train"), epochs=epochs), pipeline=pipeline,
                   compare=compare, seed=seed if seed is not None else doc.get("seed", 0),
                   dump_dir=dump_section.get("dir", "graphs"), dump_formats=formats,
                   dump_stages=dump_section.get("stages", True),
                   dump_diff=dump_section.get("diff", True))


def read_job(config: str | Path, *, epochs: int | None = None, seed: int | None = None
             ) -> tuple[Pipeline, JobSpec]:
    """Load and validate ``config`` whole; errors carry the config path and line."""
    document = load_document(config)
    passes, doc = build_passes(document)
    try:
        job = JobSpec.from_document(doc, epochs=epochs, seed=seed)
    except ConfigError as exc:
        raise ConfigError(exc.problem, exc.path, exc.line or line_of(document, exc.path)) from None
    return Pipeline(passes, doc), job


@dataclass
class RunResult:
    """What :func:`run` produced; ``metrics`` is what ``metrics.json`` holds."""

    out_dir: Path
    metrics: dict[str, Any]
    interrupted: bool = False
    exported: nn.Module | None = None


@dataclass
class _Phase:
    """One compress + fine-tune run of the pipeline."""

    label: str
    compressed: Compressed
    history: History
    exported: nn.Module | None = None
    report: dict[str, Any] = field(default_factory=dict)


def run(config: str | Path, *, out_dir: str | Path | None = None, epochs: int | None = None,
        seed: int | None = None, progress: Progress | None = None) -> RunResult:
    """Run the main job for ``config``; see the module docstring. Returns the metrics."""
    pipeline, job = read_job(config, epochs=epochs, seed=seed)
    for fmt in sorted({"svg", "png"} & set(job.dump_formats)):
        graphviz_program("the graph dumps", fmt)  # fail now, not after training
    out = Path(out_dir) if out_dir is not None else Path("runs") / Path(config).stem
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(job.seed)
    train_set, test_set = load_data(job.data, job.input_shape)
    test_data = loader(test_set, EVAL_BATCH_SIZE, shuffle=False)
    example = next(iter(loader(train_set, job.input_shape[0], shuffle=False)))[0]
    metrics: dict[str, Any] = {
        "config": str(config), "seed": job.seed, "interrupted": False,
        "data": {"name": job.data.name, "train_samples": len(train_set),
                 "test_samples": len(test_set)},
        "train": job.train.as_dict(), "teacher": {}, "models": {}, "history": {},
        "statistics": {}, "files": {}}

    model, source, history = _teacher(job, train_set, test_data, out, progress)
    metrics["teacher"] = {"source": source}
    metrics["history"]["teacher"] = history.epochs
    if history.interrupted:
        return _finish(out, metrics, None, interrupted=True)
    metrics["models"]["original"] = measure(model, example, test_data).as_dict()
    log.info("original: top-1 %.2f%%", 100 * metrics["models"]["original"]["accuracy"])

    has_distill = any(item.get("pass") == DISTILL for item in job.pipeline)
    phases = [_compress_phase("kd" if has_distill else "compressed", pipeline, model, job,
                              train_set, test_data, example, out, progress)]
    if job.compare == "no_distill" and not phases[0].history.interrupted:
        plain = Pipeline.from_dict({"pipeline": [i for i in job.pipeline if i.get("pass") != DISTILL]})
        phases.append(_compress_phase("no_kd", plain, model, job, train_set, test_data, example,
                                      None, progress))
    for phase in phases:
        metrics["models"][phase.label] = phase.report
        metrics["history"][phase.label] = phase.history.epochs
    timed = {"original": model, **{p.label: p.exported for p in phases}}
    for name, ms in cpu_latencies_ms(timed, example).items():
        metrics["models"][name]["latency_ms"] = ms
    for name, ms in onnx_latencies_ms(timed, example).items():
        metrics["models"][name]["onnx_latency_ms"] = ms
    metrics["statistics"] = phases[0].compressed.statistics()
    metrics["files"] = save_exported(phases[0].exported, example, out,
                                     {"config": str(config), "input_shape": list(job.input_shape)})
    if job.dump_diff:
        before = trace(copy.deepcopy(model), example)
        graphs = out / job.dump_dir
        metrics["files"]["diff"] = [str(p) for p in (
            dump(phases[0].compressed.model, graphs / "diff_student", job.dump_formats, before=before)
            + dump(phases[0].exported, graphs / "diff_exported", job.dump_formats, before=before))]
    return _finish(out, metrics, phases[0].exported,
                   interrupted=any(p.history.interrupted for p in phases))


def _finish(out: Path, metrics: dict[str, Any], exported: nn.Module | None, *, interrupted: bool
            ) -> RunResult:
    metrics["interrupted"] = interrupted
    curves = plot_curves(metrics["history"], out / "curves.png")
    if curves:
        metrics["files"]["curves"] = curves
    write_metrics(metrics, out / "metrics.json")
    return RunResult(out, metrics, interrupted, exported)


def _teacher(job: JobSpec, train_set: Any, test_data: Any, out: Path, progress: Progress | None
             ) -> tuple[nn.Module, str, History]:
    """The trained original and where it came from (``weights``, ``cache`` or ``trained``, with
    the training history)."""
    model, has_weights = build_model(job.model)
    if has_weights:
        return model.eval(), "weights", History()
    key = _teacher_key(job)
    cache = out / "teacher.pt"
    if cache.is_file():
        saved = torch.load(cache, map_location="cpu", weights_only=True)
        if saved.get("key") == key:
            model.load_state_dict(saved["state_dict"])
            log.info("teacher: reusing %s", cache)
            return model.eval(), "cache", History(epochs=json.loads(saved["history"]))
    torch.manual_seed(job.seed)
    history = fit(model, loader(train_set, job.train.batch_size, shuffle=True, seed=job.seed),
                  job.train, epochs=job.train.teacher_epochs, lr=job.train.teacher_lr,
                  test_data=test_data, progress=progress, label="teacher")
    if not history.interrupted:
        torch.save({"key": key, "state_dict": model.state_dict(),
                    "history": json.dumps(history.epochs)}, cache)
    return model.eval(), "trained", history


def _teacher_key(job: JobSpec) -> str:
    """A digest of everything the trained teacher depends on."""
    t = job.train
    recipe = {"model": job.model, "data": job.data.__dict__, "seed": job.seed,
              "train": [t.teacher_epochs, t.teacher_lr, t.optimizer, t.batch_size, t.momentum,
                        t.weight_decay, t.schedule], "torch": torch.__version__.split("+")[0]}
    return hashlib.sha256(json.dumps(recipe, sort_keys=True, default=str).encode()).hexdigest()


def _compress_phase(label: str, pipeline: Pipeline, model: nn.Module, job: JobSpec,
                    train_set: Any, test_data: Any, example: torch.Tensor, out: Path | None,
                    progress: Progress | None) -> _Phase:
    """Compress ``model`` (dumping stages when ``out`` is given), fine-tune, export, measure."""
    torch.manual_seed(job.seed)
    calibration = loader(train_set, job.train.batch_size, shuffle=True, seed=job.seed)
    dump_dir = out / job.dump_dir if out is not None and job.dump_stages else None
    calibrate = job.train.calibration_samples != 0
    compressed = pipeline.apply(model, example, dump_dir, dump_formats=job.dump_formats,
                                calibration_data=calibration if calibrate else None,
                                num_calibration_samples=job.train.calibration_samples)
    history = fit(compressed.model, loader(train_set, job.train.batch_size, shuffle=True,
                                           seed=job.seed),
                  job.train, epochs=job.train.epochs, lr=job.train.lr, hooks=compressed,
                  test_data=test_data, progress=progress, label=label)
    phase = _Phase(label, compressed, history)
    phase.exported = compressed.export()
    propagate_shapes(phase.exported, example)  # export changes channel counts; dumps show shapes
    phase.report = measure(phase.exported, example, test_data).as_dict()
    phase.report["student_accuracy"] = evaluate(compressed.model, test_data)
    log.info("%s: top-1 %.2f%% (exported)", label, 100 * phase.report["accuracy"])
    return phase

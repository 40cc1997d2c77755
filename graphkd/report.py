"""Measure models the way the final ``graphkd run`` table shows them, and format that table.

Measurements: top-1 accuracy, parameters, FLOPs (:func:`graphkd.count_flops` at the config's
input shape), size on disk (bytes of ``torch.save(state_dict)``) and two CPU latencies (median of
single-input runs on one thread, models interleaved, after warm-up): PyTorch's, where a quantized
model still simulates int8 with float fake-quantize ops, and ONNX Runtime's on the QDQ export,
where it runs int8 kernels (the deployable speed; needs the optional ``onnx`` and
``onnxruntime`` packages).
"""
from __future__ import annotations

import copy
import importlib.util
import io
import logging
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import fx, nn

from .errors import one_line
from .flops import count_flops, count_params
from .onnx_export import DEFAULT_OPSET, export_onnx
from .trace import as_input_tuple, propagate_shapes, trace
from .train import evaluate

log = logging.getLogger(__name__)

LATENCY_WARMUP = 5
LATENCY_BUDGET_S = 0.5
LATENCY_MIN_REPS = 20
LATENCY_MAX_REPS = 300


@dataclass
class ModelReport:
    """One row of the final table."""

    accuracy: float
    params: int
    flops: int
    size_bytes: int
    latency_ms: float | None = None
    onnx_latency_ms: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def size_on_disk(model: nn.Module) -> int:
    """Bytes ``torch.save(model.state_dict())`` writes."""
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.tell()


def interleaved_medians_ms(calls: Mapping[str, Callable[[], object]]) -> dict[str, float]:
    """Median milliseconds of each of ``calls`` (no-argument callables), timed in rounds.

    Every call is warmed up first, then the calls run interleaved (a, b, c, a, b, c, ...) so that
    a busy machine slows them alike, for at least ``LATENCY_MIN_REPS`` rounds and until about
    ``LATENCY_BUDGET_S`` per call has passed (at most ``LATENCY_MAX_REPS`` rounds).
    """
    for call in calls.values():
        for _ in range(LATENCY_WARMUP):
            call()
    times: dict[str, list[float]] = {name: [] for name in calls}
    deadline = time.perf_counter() + LATENCY_BUDGET_S * len(calls)
    for rounds in range(LATENCY_MAX_REPS):
        if rounds >= LATENCY_MIN_REPS and time.perf_counter() > deadline:
            break
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) * 1e3 for name, t in times.items()}


@torch.no_grad()
def cpu_latencies_ms(models: Mapping[str, nn.Module], example: torch.Tensor) -> dict[str, float]:
    """Median milliseconds of one eval-mode PyTorch forward of ``example`` per model, on one CPU
    thread (so that thread contention does not dominate tiny models)."""
    copies = {name: copy.deepcopy(m).cpu().eval() for name, m in models.items()}
    example = example.cpu()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return interleaved_medians_ms({name: partial(m, example) for name, m in copies.items()})
    finally:
        torch.set_num_threads(threads)


def onnx_runtime_available() -> bool:
    """Whether ONNX export (``onnx``) and ONNX Runtime (``onnxruntime``) are installed."""
    return all(importlib.util.find_spec(name) is not None for name in ("onnx", "onnxruntime"))


def write_onnx(model: nn.Module, path: Path, example: torch.Tensor) -> Path:
    """Export ``model`` to the ONNX file ``path``: a GraphModule through
    :func:`graphkd.export_onnx` (quantizers become QuantizeLinear/DequantizeLinear), any other
    module with PyTorch's TorchScript-based exporter at the same opset."""
    if isinstance(model, fx.GraphModule):
        return export_onnx(model, path, example)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy exporter's deprecation and tracer warnings
        torch.onnx.export(copy.deepcopy(model).cpu().eval(), as_input_tuple(example), str(path),
                          dynamo=False, opset_version=DEFAULT_OPSET)
    return path


def onnx_latencies_ms(models: Mapping[str, nn.Module], example: torch.Tensor
                      ) -> dict[str, float | None]:
    """Median milliseconds of one ONNX Runtime run of ``example`` per model, on one thread.

    Each model is exported to a temporary ONNX file and run in a CPU ``InferenceSession`` with one
    intra-op and one inter-op thread (default graph optimizations, which fuse QDQ pairs into int8
    kernels). A model that cannot be exported or loaded gets ``None`` and a logged warning, as
    do all models when ``onnx`` or ``onnxruntime`` is missing: the report must not fail on them.
    """
    if not onnx_runtime_available():
        log.info("ONNX Runtime latency: n/a (pip install 'graphkd[onnx]' to measure it)")
        return {name: None for name in models}
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    options.log_severity_level = 3  # errors only: no optimizer chatter on stderr
    inputs = [x.detach().cpu().numpy() for x in as_input_tuple(example)]
    calls: dict[str, Callable[[], object]] = {}
    with tempfile.TemporaryDirectory(prefix="graphkd-onnx-") as directory:
        for index, (name, model) in enumerate(models.items()):
            try:
                path = write_onnx(model, Path(directory) / f"{index}.onnx", example)
                session = ort.InferenceSession(str(path), options,
                                               providers=["CPUExecutionProvider"])
            except Exception as exc:  # any exporter or runtime failure: n/a, not a failed run
                log.warning("ONNX Runtime latency of %r: n/a, the model could not be exported or "
                            "loaded (%s)", name, one_line(exc))
                continue
            feed = {arg.name: x for arg, x in zip(session.get_inputs(), inputs)}
            calls[name] = partial(session.run, None, feed)
        timed = interleaved_medians_ms(calls)
    return {name: timed.get(name) for name in models}


def graph_flops(model: nn.Module, example: torch.Tensor) -> int:
    """FLOPs of ``model`` at ``example``'s shape (traces a copy unless it is a GraphModule)."""
    if isinstance(model, fx.GraphModule):
        gm = copy.deepcopy(model)
        propagate_shapes(gm, example)
    else:
        gm = trace(copy.deepcopy(model), example)
    return count_flops(gm)


def measure(model: nn.Module, example: torch.Tensor, test_data: Iterable) -> ModelReport:
    """Every column of the final table for ``model`` but the latencies, which
    :func:`cpu_latencies_ms` and :func:`onnx_latencies_ms` measure for all models together."""
    return ModelReport(accuracy=evaluate(model, test_data), params=count_params(model),
                       flops=graph_flops(model, example), size_bytes=size_on_disk(model))


# --- The table ---------------------------------------------------------------------------------

ROW_TITLES = {"original": "original", "kd": "compressed + KD", "no_kd": "compressed, no KD",
              "compressed": "compressed"}
LATENCIES = ("latency_ms", "onnx_latency_ms")
COLUMNS = ("model", "top-1", "params", "FLOPs", "size", "PyTorch latency", "ONNX Runtime latency")


def _count(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(int(n))


def _size(n: float) -> str:
    return f"{n / 1024:.1f} KiB" if n < 1024 ** 2 else f"{n / 1024 ** 2:.2f} MiB"


def table_rows(models: Mapping[str, Mapping[str, Any]]) -> list[list[str]]:
    """Formatted cells per model; non-original rows show their ratio to the original."""
    base = models.get("original")
    rows = []
    for key, m in models.items():
        def ratio(field: str, m: Mapping[str, Any] = m, key: str = key) -> str:
            if base is None or key == "original" or not base.get(field) or m.get(field) is None:
                return ""
            return f" ({m[field] / base[field]:.2f}x)"
        rows.append([ROW_TITLES.get(key, key), f"{m['accuracy']:.2%}",
                     _count(m["params"]) + ratio("params"), _count(m["flops"]) + ratio("flops"),
                     _size(m["size_bytes"]) + ratio("size_bytes"),
                     *(_latency(m, field) + ratio(field) for field in LATENCIES)])
    return rows


def _latency(m: Mapping[str, Any], field: str) -> str:
    return "n/a" if m.get(field) is None else f"{m[field]:.3f} ms"


def markdown_table(models: Mapping[str, Mapping[str, Any]]) -> str:
    """The final table as GitHub Markdown (also readable as plain text)."""
    rows = [list(COLUMNS), ["---"] * len(COLUMNS), *table_rows(models)]
    return "\n".join("| " + " | ".join(row) + " |" for row in rows)


def rich_table(models: Mapping[str, Mapping[str, Any]], title: str = "") -> Any:
    """The final table as a ``rich.table.Table``."""
    from rich.table import Table

    table = Table(title=title or None)
    for i, column in enumerate(COLUMNS):
        table.add_column(column, justify="left" if i == 0 else "right")
    for row in table_rows(models):
        table.add_row(*row)
    return table


def summary_lines(models: Mapping[str, Mapping[str, Any]]) -> Sequence[str]:
    """One sentence on what distillation bought, when both compressed runs exist."""
    if "kd" in models and "no_kd" in models:
        delta = models["kd"]["accuracy"] - models["no_kd"]["accuracy"]
        return [f"distillation changed top-1 by {delta * 100:+.2f} points "
                f"({models['no_kd']['accuracy']:.2%} without -> {models['kd']['accuracy']:.2%} with)"]
    return []

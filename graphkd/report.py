"""Measure models the way the final ``graphkd run`` table shows them, and format that table.

Measurements: top-1 accuracy, parameters, FLOPs (:func:`graphkd.count_flops` at the config's
input shape), size on disk (bytes of ``torch.save(state_dict)``) and CPU latency (median of
single-input forwards on one thread, models interleaved, after warm-up).
"""
from __future__ import annotations

import copy
import io
import statistics
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import fx, nn

from .flops import count_flops, count_params
from .trace import propagate_shapes, trace
from .train import evaluate

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

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def size_on_disk(model: nn.Module) -> int:
    """Bytes ``torch.save(model.state_dict())`` writes."""
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.tell()


@torch.no_grad()
def cpu_latencies_ms(models: Mapping[str, nn.Module], example: torch.Tensor) -> dict[str, float]:
    """Median milliseconds of one eval-mode forward of ``example`` per model, on one CPU thread.

    Models are timed in interleaved rounds (a, b, c, a, b, c, ...) so that a busy machine slows
    them alike, and on one thread so that thread contention does not dominate tiny models.
    """
    copies = {name: copy.deepcopy(m).cpu().eval() for name, m in models.items()}
    example = example.cpu()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for m in copies.values():
            for _ in range(LATENCY_WARMUP):
                m(example)
        times: dict[str, list[float]] = {name: [] for name in copies}
        deadline = time.perf_counter() + LATENCY_BUDGET_S * len(copies)
        for rounds in range(LATENCY_MAX_REPS):
            if rounds >= LATENCY_MIN_REPS and time.perf_counter() > deadline:
                break
            for name, m in copies.items():
                start = time.perf_counter()
                m(example)
                times[name].append(time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)
    return {name: statistics.median(t) * 1e3 for name, t in times.items()}


def graph_flops(model: nn.Module, example: torch.Tensor) -> int:
    """FLOPs of ``model`` at ``example``'s shape (traces a copy unless it is a GraphModule)."""
    if isinstance(model, fx.GraphModule):
        gm = copy.deepcopy(model)
        propagate_shapes(gm, example)
    else:
        gm = trace(copy.deepcopy(model), example)
    return count_flops(gm)


def measure(model: nn.Module, example: torch.Tensor, test_data: Iterable) -> ModelReport:
    """Every column of the final table for ``model`` but latency, which
    :func:`cpu_latencies_ms` measures for all models together."""
    return ModelReport(accuracy=evaluate(model, test_data), params=count_params(model),
                       flops=graph_flops(model, example), size_bytes=size_on_disk(model))


# --- The table ---------------------------------------------------------------------------------

ROW_TITLES = {"original": "original", "kd": "compressed + KD", "no_kd": "compressed, no KD",
              "compressed": "compressed"}
COLUMNS = ("model", "top-1", "params", "FLOPs", "size", "CPU latency")


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
            if base is None or key == "original" or not base[field]:
                return ""
            return f" ({m[field] / base[field]:.2f}x)"
        rows.append([ROW_TITLES.get(key, key), f"{m['accuracy']:.2%}",
                     _count(m["params"]) + ratio("params"), _count(m["flops"]) + ratio("flops"),
                     _size(m["size_bytes"]) + ratio("size_bytes"),
                     "n/a" if m.get("latency_ms") is None else
                     f"{m['latency_ms']:.3f} ms" + ratio("latency_ms")])
    return rows


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

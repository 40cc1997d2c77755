"""Files ``graphkd run`` leaves behind: the exported model in loadable forms, training curves,
``metrics.json``.

The exported student is a ``torch.fx.GraphModule`` whose structure (pruned channel counts,
folded quantizers) differs from the original architecture, so a state dict alone cannot rebuild
it. ``model.pt`` therefore stores the pickled GraphModule next to its state dict, and
:func:`load_exported` restores it; a portable ``torch.export`` program (or TorchScript) and an
ONNX file are added when the graph (and the installed packages) allow.
"""
from __future__ import annotations

import importlib.util
import json
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import fx, nn

from .errors import GraphKDError, one_line
from .onnx_export import export_onnx

log = logging.getLogger(__name__)

EXPORT_FORMAT = "graphkd-exported/1"


def save_exported(model: fx.GraphModule, example: torch.Tensor, out_dir: Path,
                  info: Mapping[str, Any]) -> dict[str, str]:
    """Write ``model.pt`` (+ ``model.pt2`` or ``model.torchscript.pt``, and ``model.onnx``, when
    possible); returns ``{kind: path or why not}``."""
    files: dict[str, str] = {}
    target = out_dir / "model.pt"
    torch.save({"format": EXPORT_FORMAT, "graph_module": model, "state_dict": model.state_dict(),
                "info": dict(info)}, target)
    files["model"] = str(target)
    files["portable"] = _save_portable(model, example, out_dir)
    files["onnx"] = _save_onnx(model, example, out_dir)
    return files


def _save_portable(model: nn.Module, example: torch.Tensor, out_dir: Path) -> str:
    """``torch.export`` first, TorchScript tracing second; the reason when neither works (both
    are optional conveniences: ``model.pt`` is always written)."""
    reasons = []
    try:
        program = torch.export.export(model, (example,))
        target = out_dir / "model.pt2"
        torch.export.save(program, target)
        return str(target)
    except Exception as exc:  # torch.export refuses some graphs; fall back below
        reasons.append(f"torch.export: {one_line(exc)}")
    try:
        with torch.no_grad():
            scripted = torch.jit.trace(model, (example,), check_trace=False)
        target = out_dir / "model.torchscript.pt"
        scripted.save(str(target))
        return str(target)
    except Exception as exc:
        reasons.append(f"torch.jit.trace: {one_line(exc)}")
    log.warning("no portable export of the model: %s", "; ".join(reasons))
    return "not written: " + "; ".join(reasons)


def _save_onnx(model: fx.GraphModule, example: torch.Tensor, out_dir: Path) -> str:
    """``model.onnx``, the deployable form of a quantized model (QuantizeLinear/DequantizeLinear
    pairs that ONNX Runtime fuses into int8 kernels); the reason when it is not written (``onnx``
    is an optional dependency, and the exporter refuses some graphs)."""
    if importlib.util.find_spec("onnx") is None:
        return "not written: needs the 'onnx' package (pip install 'graphkd[onnx]')"
    try:
        return str(export_onnx(model, out_dir / "model.onnx", example))
    except Exception as exc:  # optional like the portable export: model.pt is always written
        log.warning("model.onnx not written: %s", one_line(exc))
        return "not written: " + one_line(exc)


def load_exported(path: str | Path) -> fx.GraphModule:
    """Load the exported model ``graphkd run`` wrote (``model.pt``), in eval mode.

    The file holds pickled code: load only files you produced yourself.
    """
    payload = torch.load(path, map_location="cpu", weights_only=False)
    if not (isinstance(payload, Mapping) and payload.get("format") == EXPORT_FORMAT):
        raise GraphKDError(f"{path} is not a model written by `graphkd run` (expected format "
                           f"{EXPORT_FORMAT!r})")
    model = payload["graph_module"]
    model.load_state_dict(payload["state_dict"])
    return model.eval()


def plot_curves(histories: Mapping[str, Sequence[Mapping[str, Any]]], target: Path) -> str | None:
    """Training loss and test accuracy per epoch of each phase, one PNG (matplotlib's Agg canvas,
    so it works headless and leaves the caller's pyplot backend alone)."""
    histories = {k: v for k, v in histories.items() if v}
    if not histories:
        return None
    from matplotlib.figure import Figure  # no pyplot: no global backend or figure state

    fig = Figure(figsize=(9, 3.5))
    loss_ax, acc_ax = fig.subplots(1, 2)
    for label, epochs in histories.items():
        x = [e["epoch"] for e in epochs]
        loss_ax.plot(x, [e["loss"] for e in epochs], marker="o", label=label)
        acc_ax.plot(x, [e["test_accuracy"] for e in epochs], marker="o", label=label)
    loss_ax.set(title="training loss (task + pass losses)", xlabel="epoch", yscale="log")
    acc_ax.set(title="test top-1 accuracy", xlabel="epoch")
    for ax in (loss_ax, acc_ax):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(target, dpi=100)  # rendered by the Agg canvas
    return str(target)


def jsonable(value: Any) -> Any:
    """``value`` with tensors, tuples, paths and non-finite floats made JSON-friendly."""
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, torch.Tensor):
        return jsonable(value.item() if value.numel() == 1 else value.tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def write_metrics(metrics: Mapping[str, Any], target: Path) -> None:
    target.write_text(json.dumps(jsonable(metrics), indent=2) + "\n", encoding="utf-8")

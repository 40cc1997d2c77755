"""Write a compressed student to ONNX (optional dependency: ``pip install 'graphkd[onnx]'``).

Modules on the student's graph that have an ONNX-specific form provide it through
``onnx_module() -> nn.Module`` (fake-quantizers return a QuantizeLinear/DequantizeLinear form);
they are swapped in on a copy before export, so the core knows nothing of any pass.
"""
from __future__ import annotations

import copy
import importlib.util
import logging
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import fx

from .compressed import Compressed
from .errors import GraphKDError
from .graph import replace_module
from .trace import as_input_tuple

log = logging.getLogger(__name__)

DEFAULT_OPSET = 13  # the first opset with per-channel QuantizeLinear/DequantizeLinear


def export_onnx(model: Compressed | fx.GraphModule, path: str | Path,
                example_inputs: Any = None, *, opset: int = DEFAULT_OPSET) -> Path:
    """Export ``model`` (a :class:`Compressed`, exported with its export steps, or a GraphModule)
    to the ONNX file ``path`` and return the path.

    ``example_inputs`` default to the ones given to ``compress``. Uses PyTorch's TorchScript-based
    exporter, which maps fake-quantize ops to QuantizeLinear/DequantizeLinear pairs.

    Example::

        c = gk.compress(model, {"pipeline": [{"pass": "quantize"}]}, x)
        gk.export_onnx(c, "model.onnx")
    """
    if importlib.util.find_spec("onnx") is None:  # the exporter needs it to serialise
        raise GraphKDError("export_onnx needs the 'onnx' package: pip install 'graphkd[onnx]'")
    if opset < DEFAULT_OPSET:
        raise GraphKDError(f"export_onnx: opset {opset} is too old; per-channel "
                           f"QuantizeLinear/DequantizeLinear needs opset >= {DEFAULT_OPSET}")
    if isinstance(model, Compressed):
        gm = model.export()
        if example_inputs is None:
            example_inputs = model.context.example_inputs
    elif isinstance(model, fx.GraphModule):
        gm = copy.deepcopy(model).eval()
    else:
        raise GraphKDError(f"export_onnx needs a graphkd.Compressed or a torch.fx.GraphModule, got "
                           f"{type(model).__name__}")
    if example_inputs is None:
        raise GraphKDError("export_onnx: pass example_inputs when exporting a GraphModule (they "
                           "fix the input shapes of the ONNX graph)")
    for name, module in list(gm.named_modules()):
        if name and hasattr(module, "onnx_module"):
            replace_module(gm, name, module.onnx_module())
    path = Path(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy exporter's deprecation and tracer warnings
        torch.onnx.export(gm, as_input_tuple(example_inputs), str(path), dynamo=False,
                          opset_version=opset)
    log.info("export_onnx: wrote %s (opset %d)", path, opset)
    return path

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
from torch.utils._pytree import tree_leaves

from .compressed import Compressed
from .errors import GraphKDError
from .graph import replace_module
from .trace import as_input_tuple

log = logging.getLogger(__name__)

DEFAULT_OPSET = 13  # the first opset with per-channel QuantizeLinear/DequantizeLinear


def export_onnx(model: Compressed | fx.GraphModule, path: str | Path,
                example_inputs: Any = None, *, opset: int = DEFAULT_OPSET,
                dynamic_batch: bool = True) -> Path:
    """Export ``model`` (a :class:`Compressed`, exported with its export steps, or a GraphModule)
    to the ONNX file ``path`` and return the path.

    ``example_inputs`` default to the ones given to ``compress``. Uses PyTorch's TorchScript-based
    exporter, which maps fake-quantize ops to QuantizeLinear/DequantizeLinear pairs. With
    ``dynamic_batch`` the first dimension of every input and output is symbolic (``batch``), so
    the file serves any batch size; inputs are named after the model's forward arguments.

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
    inputs = as_input_tuple(example_inputs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy exporter's deprecation and tracer warnings
        torch.onnx.export(gm, inputs, str(path), dynamo=False, opset_version=opset,
                          **(_batch_axes(gm, inputs) if dynamic_batch else {}))
    log.info("export_onnx: wrote %s (opset %d)", path, opset)
    return path


def _batch_axes(gm: fx.GraphModule, inputs: tuple) -> dict[str, Any]:
    """Exporter arguments naming inputs and outputs and making their dim 0 a symbolic batch
    (tensors of at least one dimension only)."""
    with torch.no_grad():
        outputs = tree_leaves(gm(*inputs))
    input_names = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
    output_names = [f"output_{i}" for i in range(len(outputs))]
    tensors = [*zip(input_names, inputs), *zip(output_names, outputs)]
    return {"input_names": input_names, "output_names": output_names,
            "dynamic_axes": {name: {0: "batch"} for name, t in tensors
                             if isinstance(t, torch.Tensor) and t.dim() > 0}}

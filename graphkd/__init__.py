"""graphkd: compress PyTorch models on their torch.fx graph with knowledge distillation."""
from __future__ import annotations

from .compressed import Compressed
from .errors import ConfigError, DistillError, GraphKDError, PassError, TraceError
from .flops import count_flops, count_params
from .onnx_export import export_onnx
from .pipeline import Pass, PassContext, Pipeline, available_passes, compress, register_pass
from .trace import trace

__all__ = [
    "Compressed", "ConfigError", "DistillError", "GraphKDError", "Pass", "PassContext", "PassError",
    "Pipeline", "TraceError", "available_passes", "compress", "count_flops", "count_params",
    "export_onnx", "register_pass", "trace",
]
__version__ = "0.1.0"

"""Quantization-aware training: fake-quantize nodes on weight and activation edges.

Weights of Conv/ConvTranspose/Linear layers get a :class:`~graphkd.passes.quantizers.WeightQuantizer`
on their weight edge (``graphkd.graph.insert_on_weight``, so sparsity and pruning masks compose in
pipeline order). The inputs of quantizable ops (those layers, matmul/bmm, add/mul of two
activations, cat, pooling) get one :class:`~graphkd.passes.quantizers.ActivationQuantizer` per
tensor, shared by all of its quantizable consumers. Ranges start from the example inputs and can be
re-initialised from data (``compress(..., calibration_data=...)``, ``Compressed.init_ranges``).

BatchNorm: with ``fold_bn`` (default) every BatchNorm that follows a Conv/Linear is folded into it
*at pass time* with its running statistics, so training, the weight quantizers' ranges and the
exported model all see the deployed weights, and ``export()`` equals the trained student exactly.
The price is that BatchNorm no longer normalises with batch statistics during fine-tuning - the
usual "frozen BN" phase of QAT, appropriate for fine-tuning a trained model with a small learning
rate. Keeping BN (``fold_bn: false``) trains with batch statistics but quantizes the unfolded
weights, so a runtime that folds BN later would round different weights than were trained.

Not covered: ``nn.Embedding`` weights (the core has no functional weight edge for them), and the
insides of modules torch.fx keeps as leaves - ``nn.MultiheadAttention`` is one, so write attention
with ``nn.Linear`` and ``@`` (as nanoGPT does) to quantize its projections and matmuls.
"""
from __future__ import annotations

import logging
import operator
import warnings
from collections.abc import Mapping
from typing import Any, Literal, TypedDict

import torch
import torch.nn.functional as F
from torch import fx, nn

from graphkd.nncf import nncf_scope_options, reject_unknown_keys
from graphkd.errors import ConfigError
from graphkd.graph import (
    ScopeFilter, flat_name, insert_module_after, insert_on_weight, is_layer_node, layer_of,
    module_of, scopes_of, weight_transforms,
)
from graphkd.pipeline import Pass, PassContext

from .bn_fold import fold_batchnorms
from .quantizers import ActivationQuantizer, FakeQuantize, QuantSpec, WeightQuantizer
from .range_init import RangeCalibrator, device_of

log = logging.getLogger(__name__)


class QuantizerOptions(TypedDict, total=False):
    bits: int
    mode: Literal["symmetric", "asymmetric"]
    per_channel: bool


class RangeInitOptions(TypedDict, total=False):
    type: Literal["min_max", "mean_min_max", "percentile"]
    num_samples: int
    percentiles: list[float]


WEIGHT_DEFAULTS: QuantizerOptions = {"bits": 8, "mode": "symmetric", "per_channel": True}
ACTIVATION_DEFAULTS: QuantizerOptions = {"bits": 8, "mode": "asymmetric", "per_channel": False}
RANGE_DEFAULTS: RangeInitOptions = {"type": "min_max", "num_samples": 256,
                                    "percentiles": [0.1, 99.9]}
MIN_BITS, MAX_BITS = 2, 8


class Quantize(Pass):
    """Quantization-aware training with fake-quantize nodes (pass name ``quantize``).

    Options: ``bits`` sets weights and activations at once (nested ``bits`` win);
    ``weights`` / ``activations`` (``false``: weights only) ``{bits, mode, per_channel}``;
    ``range_init`` ``{type: min_max | mean_min_max | percentile, num_samples, percentiles}``;
    ``learnable`` trains scales (and asymmetric zero points) with the weights; ``fold_bn`` (see
    the module docstring); ``target_scopes`` / ``ignored_scopes`` select ops by module path.
    """

    name = "quantize"
    nncf_algorithm = "quantization"

    def __init__(
        self,
        *,
        bits: int | None = None,
        weights: QuantizerOptions | None = None,
        activations: QuantizerOptions | Literal[False] | None = None,
        range_init: RangeInitOptions | None = None,
        learnable: bool = True,
        fold_bn: bool = True,
        target_scopes: list[str] | None = None,
        ignored_scopes: list[str] | None = None,
    ) -> None:
        if bits is not None:
            _check_bits(bits, "bits")
        shorthand = {"bits": bits} if bits is not None else {}
        self.weights = _quant_spec({**WEIGHT_DEFAULTS, **shorthand, **(weights or {})}, "weights")
        self.activations = None if activations is False else _quant_spec(
            {**ACTIVATION_DEFAULTS, **shorthand, **(activations or {})}, "activations")
        if self.activations is not None and self.activations.per_channel:
            raise ConfigError("per-channel activation quantization is not supported; set "
                              "activations.per_channel: false", "activations.per_channel")
        ranges = {**RANGE_DEFAULTS, **(range_init or {})}
        if ranges["num_samples"] < 1:
            raise ConfigError(f"must be >= 1, got {ranges['num_samples']}", "range_init.num_samples")
        low, high = _check_percentiles(ranges["percentiles"])
        self.range_type = ranges["type"]
        self.num_samples = ranges["num_samples"]
        self.percentiles = (low, high)
        self.learnable = learnable
        self.fold_bn = fold_bn
        self.target_scopes = list(target_scopes or [])
        self.ignored_scopes = list(ignored_scopes or [])

    def apply(self, gm: fx.GraphModule, ctx: PassContext) -> None:
        select = ScopeFilter(scopes_of(gm), self.target_scopes, self.ignored_scopes)
        folded = fold_batchnorms(gm, select) if self.fold_bn else []
        layers, skipped = self._quantize_weights(gm, select)
        inputs: list[str] = []
        if self.activations is not None:
            inputs = self._quantize_activations(gm, select)
        gm.graph.lint()
        gm.recompile()
        calibrator = RangeCalibrator(gm, inputs, self.range_type, self.percentiles)
        calibrator.calibrate([(ctx.example_inputs,)], num_samples=None)  # one (inputs,) item
        # the caller's sample count wins; range_init.num_samples applies when it gives None
        ctx.on_calibrate(lambda data, num_samples: calibrator.calibrate(
            data, self.num_samples if num_samples is None else num_samples))
        if not layers and not inputs:
            warnings.warn("quantize selected nothing to quantize (check target_scopes / "
                          "ignored_scopes); the pass does nothing", stacklevel=2)
        key, i = self.name, 0
        while key in ctx.statistics:
            i += 1
            key = f"{self.name}_{i}"
        ctx.statistics[key] = self._statistics(layers, inputs, skipped, folded)
        log.info("quantize: %d weight and %d activation quantizers, %d BatchNorms folded",
                 len(layers), len(inputs), len(folded))

    def _quantize_weights(self, gm: fx.GraphModule,
                          select: ScopeFilter) -> tuple[dict[str, str], list[str]]:
        """Weight quantizers on selected layers: ``({layer path: quantizer name}, skipped)``."""
        layers: dict[str, str] = {}
        skipped: set[str] = set()
        for node in list(gm.graph.nodes):
            info = layer_of(gm, node)
            if info is None:
                continue
            path, layer = info
            if not select(path):
                skipped.add(path)
                continue
            if is_layer_node(node) and any(isinstance(t, FakeQuantize)
                                           for t in weight_transforms(gm, node)):
                continue  # an earlier quantize pass got it (mixed precision by scopes)
            out_axis = 1 if isinstance(layer, nn.modules.conv._ConvTransposeNd) else 0
            quantizer = WeightQuantizer(self.weights, layer.weight, out_axis=out_axis,
                                        learnable=self.learnable)
            if path in layers:  # a layer called more than once
                quantizer.share_grid(gm.get_submodule(layers[path]))
            try:
                layer_node = insert_on_weight(gm, node, f"quantizers.{flat_name(path)}_weight",
                                              quantizer)
            except ValueError as exc:  # no functional form (padding_mode='reflect'...)
                warnings.warn(f"quantize: the weight of {path} is not quantized: {exc}",
                              stacklevel=3)
                skipped.add(path)
                continue
            layers[path] = layer_node.args[1].target
        return layers, sorted(skipped)

    def _quantize_activations(self, gm: fx.GraphModule, select: ScopeFilter) -> list[str]:
        """One activation quantizer per input tensor of the selected quantizable ops; returns
        the quantizers' module names."""
        readers: dict[fx.Node, set[fx.Node]] = {}
        for node in list(gm.graph.nodes):
            if not select(node.meta.get("scope", "")):
                continue
            for source in quantizable_inputs(gm, node):
                point, reader = quantization_point(gm, source, node)
                if not isinstance(module_of(gm, point), FakeQuantize):  # not quantized yet
                    readers.setdefault(point, set()).add(reader)
        names = []
        for point, direct in readers.items():
            quantizer = ActivationQuantizer(self.activations, learnable=self.learnable)
            quantizer.to(device_of(gm))
            q = insert_module_after(gm, point, f"quantizers.{_tensor_name(gm, point)}", quantizer)
            for user in list(q.users):  # only quantizable consumers read the quantized tensor
                if user not in direct:
                    user.replace_input_with(q, point)
            names.append(q.target)
        return names

    def _statistics(self, layers: dict[str, str], inputs: list[str], skipped: list[str],
                    folded: list[str]) -> dict[str, Any]:
        activation_bits = self.activations.bits if self.activations is not None else None
        return {
            "weight_quantizers": len(layers),
            "activation_quantizers": len(inputs),
            "weight_bits": {path: self.weights.bits for path in layers},
            "activation_bits": {name: activation_bits for name in inputs},
            "skipped_scopes": skipped,
            "folded_batchnorms": folded,
        }

    @classmethod
    def options_from_nncf(cls, section: Mapping[str, Any]) -> dict[str, Any]:
        """Translate NNCF ``quantization``; see :func:`translate_nncf_quantization`."""
        return translate_nncf_quantization(section)


def _tensor_name(gm: fx.GraphModule, node: fx.Node) -> str:
    """A readable name for the tensor ``node`` makes: ``input_x``, ``layer1_0_conv2_output``."""
    if node.op == "placeholder":
        return f"input_{node.name}"
    info = layer_of(gm, node)
    if info is not None:
        return f"{flat_name(info[0])}_output"
    if node.op == "call_module":
        return f"{flat_name(node.target)}_output"
    scope = node.meta.get("scope", "")
    return f"{flat_name(scope)}_{node.name}" if scope else node.name


def _check_bits(bits: int, path: str) -> None:
    if not MIN_BITS <= bits <= MAX_BITS:
        raise ConfigError(f"must be in [{MIN_BITS}, {MAX_BITS}], got {bits}", path)


def _quant_spec(options: Mapping[str, Any], path: str) -> QuantSpec:
    _check_bits(options["bits"], f"{path}.bits")
    return QuantSpec(options["bits"], options["mode"], options["per_channel"])


def _check_percentiles(values: list[float]) -> tuple[float, float]:
    if len(values) != 2 or not 0 <= values[0] < values[1] <= 100:
        raise ConfigError(f"must be two percentiles [low, high] with 0 <= low < high <= 100, got "
                          f"{values}", "range_init.percentiles")
    return float(values[0]), float(values[1])


# --- Where activation quantizers go ---------------------------------------------------------
_MATMULS = {torch.matmul, torch.bmm, torch.mm, operator.matmul}
_BINARY = {operator.add, operator.mul, operator.iadd, operator.imul, torch.add, torch.mul}
_CATS = {torch.cat, torch.concat}
_POOL_MODULES = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d,
                 nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
                 nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)
_POOL_FUNCTIONS = {F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d,
                   F.avg_pool3d, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d,
                   F.adaptive_avg_pool3d, F.adaptive_max_pool1d, F.adaptive_max_pool2d,
                   F.adaptive_max_pool3d}
_QUANTIZABLE_METHODS = {"matmul", "bmm", "add", "mul", "add_", "mul_"}
# Ops that only move values, or keep them on the input's grid (max of quantized values is one
# of them): a quantizer before them serves their consumers too.
_TRANSPARENT_MODULES = (nn.Flatten, nn.Unflatten, nn.Identity, nn.MaxPool1d, nn.MaxPool2d,
                        nn.MaxPool3d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d,
                        nn.AdaptiveMaxPool3d)
_TRANSPARENT_FUNCTIONS = {torch.flatten, torch.reshape, torch.transpose, torch.permute,
                          torch.squeeze, torch.unsqueeze, F.max_pool1d, F.max_pool2d,
                          F.max_pool3d}
_TRANSPARENT_METHODS = {"view", "reshape", "flatten", "permute", "transpose", "contiguous",
                        "squeeze", "unsqueeze", "t"}


def quantizable_inputs(gm: fx.GraphModule, node: fx.Node) -> list[fx.Node]:
    """The activation inputs of ``node`` that must be quantized (empty for other ops)."""
    module = gm.get_submodule(node.target) if node.op == "call_module" else None
    if is_layer_node(node) or isinstance(module, _POOL_MODULES) or layer_of(gm, node) is not None:
        candidates = node.args[:1]
    elif node.op == "call_function" and node.target in _POOL_FUNCTIONS:
        candidates = node.args[:1]
    elif node.op == "call_function" and node.target in _CATS:
        candidates = node.args[0] if isinstance(node.args[0], (list, tuple)) else ()
    elif (node.op == "call_function" and node.target in _MATMULS | _BINARY) or (
            node.op == "call_method" and node.target in _QUANTIZABLE_METHODS):
        candidates = node.args[:2]
        if not all(_is_activation(a) for a in candidates):
            return []  # x + constant, x * parameter: not a product/sum of two activations
    else:
        return []
    return [a for a in candidates if _is_activation(a)]


def _is_activation(arg: Any) -> bool:
    if not isinstance(arg, fx.Node) or arg.op == "get_attr":
        return False
    meta = arg.meta.get("tensor_meta")
    dtype = getattr(meta, "dtype", None)
    return dtype is not None and dtype.is_floating_point


def _is_transparent(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_module":
        return isinstance(gm.get_submodule(node.target), _TRANSPARENT_MODULES)
    if node.op == "call_function":
        return node.target in _TRANSPARENT_FUNCTIONS
    return node.op == "call_method" and node.target in _TRANSPARENT_METHODS


def quantization_point(gm: fx.GraphModule, source: fx.Node,
                       consumer: fx.Node) -> tuple[fx.Node, fx.Node]:
    """Where to quantize ``source`` for ``consumer``: walk back through transparent ops
    (reshapes, max pooling) so that ``flatten(relu(x))`` and ``relu(x)`` share one quantizer.
    Returns ``(point, the node that reads point on the way to consumer)``."""
    point, user = source, consumer
    while _is_transparent(gm, point) and _is_activation(point.args[0]):
        point, user = point.args[0], point
    return point, user


# --- NNCF translation -----------------------------------------------------------------------
_NNCF_KEYS = {"weights", "activations", "initializer", "ignored_scopes", "target_scopes"}
_NNCF_GROUP_KEYS = {"mode", "bits", "per_channel", "signed"}
_NNCF_IGNORED = {"preset", "overflow_fix", "export_to_onnx_standard_ops", "quantize_inputs",
                 "quantize_outputs", "batchnorm_adaptation"}


def translate_nncf_quantization(section: Mapping[str, Any]) -> dict[str, Any]:
    """NNCF ``quantization`` section -> ``quantize`` options.

    ``weights`` / ``activations`` ``{mode, bits, per_channel}`` keep their names (``signed`` is
    derived from the data here and ignored); ``initializer.range`` ``{type, num_init_samples}`` ->
    ``range_init`` ``{type, num_samples}``; scopes: ``{re}X`` -> ``re:X``. NNCF's learned
    quantizer scales correspond to ``learnable: true``, the default. Keys without a meaning here
    (``preset``, ``overflow_fix``, ``export_to_onnx_standard_ops``...) are ignored with a warning.
    """
    options: dict[str, Any] = {}
    reject_unknown_keys(section, _NNCF_KEYS | _NNCF_IGNORED, "quantization")
    for key in section:
        if key in _NNCF_IGNORED:
            warnings.warn(f"NNCF quantization key {key!r} has no equivalent and is ignored",
                          stacklevel=2)
    for group in ("weights", "activations"):
        if group in section:
            options[group] = _nncf_group(section[group], group)
    initializer = section.get("initializer", {}) or {}
    for key in initializer:
        if key not in ("range", "batchnorm_adaptation", "precision"):
            raise ConfigError(f"unknown initializer key {key!r}; supported: range",
                              f"initializer.{key}")
    ranges = initializer.get("range")
    if ranges is not None:
        if not isinstance(ranges, Mapping):
            raise ConfigError("per-scope range initializers are not supported; give one "
                              "{type, num_init_samples} mapping", "initializer.range")
        translated = {"type": ranges.get("type", "min_max"),
                      "num_samples": ranges.get("num_init_samples", RANGE_DEFAULTS["num_samples"])}
        unknown = set(ranges) - {"type", "num_init_samples"}
        if unknown:
            raise ConfigError(f"unsupported key(s) {sorted(unknown)}; supported: type, "
                              f"num_init_samples", "initializer.range")
        options["range_init"] = translated
    options.update(nncf_scope_options(section))
    return options


def _nncf_group(group: Any, path: str) -> dict[str, Any]:
    if not isinstance(group, Mapping):
        raise ConfigError(f"must be a mapping of {', '.join(sorted(_NNCF_GROUP_KEYS))}", path)
    reject_unknown_keys(group, _NNCF_GROUP_KEYS, "quantization", f"{path}.")
    return {k: v for k, v in group.items() if k != "signed"}

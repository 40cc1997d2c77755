"""Fake-quantize modules: what the ``quantize`` pass puts on weight and activation edges.

Every quantizer rounds with PyTorch's own kernels (``torch.fake_quantize_per_*_affine`` and, when the
range is trained, ``torch._fake_quantize_learnable_per_*_affine``), so forward values and the
straight-through gradients are exactly those of ``torch.ao`` and of the int8 runtimes that follow the
same ``clamp(round(x / scale) + zero_point)`` rule.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

Mode = Literal["symmetric", "asymmetric"]
RangeType = Literal["min_max", "mean_min_max", "percentile"]

MIN_SCALE = 1e-8
# Integer ranges ONNX QuantizeLinear can hold (opset 13): int8 and uint8.
ONNX_INT8 = (-128, 127)
ONNX_UINT8 = (0, 255)


@dataclass(frozen=True)
class QuantSpec:
    """How one tensor is quantized: ``bits``, ``mode``, one range per output channel or not."""

    bits: int = 8
    mode: Mode = "symmetric"
    per_channel: bool = False


def integer_range(bits: int, mode: Mode, signed: bool, narrow: bool) -> tuple[int, int]:
    """``(qmin, qmax)``: ``[0, 2^b - 1]`` for asymmetric or unsigned symmetric ranges, else
    ``[-(2^(b-1) - 1), 2^(b-1) - 1]`` when ``narrow`` (symmetric weights: zero stays centred) or
    ``[-2^(b-1), 2^(b-1) - 1]``."""
    if mode == "asymmetric" or not signed:
        return 0, 2 ** bits - 1
    top = 2 ** (bits - 1) - 1
    return (-top if narrow else -top - 1), top


def affine_params(lo: torch.Tensor, hi: torch.Tensor, qmin: int, qmax: int,
                  symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scale, zero_point)`` whose grid covers ``[lo, hi]`` (widened to contain 0, so zero is
    exact). Symmetric ranges have zero point 0 and scale ``max|x| / qmax``."""
    lo = torch.minimum(lo, torch.zeros_like(lo))
    hi = torch.maximum(hi, torch.zeros_like(hi))
    if symmetric:
        amax = torch.maximum(-lo, hi) if qmin < 0 else hi
        scale = (amax / qmax).clamp_min(MIN_SCALE)
        return scale, torch.zeros_like(scale)
    scale = ((hi - lo) / (qmax - qmin)).clamp_min(MIN_SCALE)
    zero_point = (qmin - torch.round(lo / scale)).clamp(qmin, qmax)
    return scale, zero_point


class FakeQuantize(nn.Module):
    """Quantize-dequantize one tensor with a per-tensor or per-channel (``axis``) affine grid.

    With ``learnable`` the scale (and an asymmetric zero point) are parameters trained by the LSQ
    gradient of the learnable kernels; otherwise they are buffers set by :meth:`set_range`.
    ``enabled = False`` makes it the identity (range calibration runs the float model).
    """

    def __init__(self, spec: QuantSpec, *, axis: int | None, channels: int, learnable: bool,
                 narrow: bool = False) -> None:
        super().__init__()
        self.bits, self.mode, self.axis = spec.bits, spec.mode, axis
        self.learnable, self.enabled = learnable, True
        self.qmin, self.qmax = integer_range(spec.bits, spec.mode, signed=True, narrow=narrow)
        shape = (channels,) if axis is not None else (1,)
        if learnable:
            self.scale = nn.Parameter(torch.ones(shape))
            zero_point = torch.zeros(shape)
            if spec.mode == "asymmetric":
                self.zero_point = nn.Parameter(zero_point)
            else:
                self.register_buffer("zero_point", zero_point)
        else:
            self.register_buffer("scale", torch.ones(shape))
            self.register_buffer("zero_point", torch.zeros(shape, dtype=torch.int32))

    @property
    def symmetric(self) -> bool:
        return self.mode == "symmetric"

    @torch.no_grad()
    def set_range(self, lo: torch.Tensor, hi: torch.Tensor) -> None:
        """Make the grid cover ``[lo, hi]`` (scalars, or one value per channel)."""
        lo = lo.detach().float().reshape(-1).to(self.scale.device)
        hi = hi.detach().float().reshape(-1).to(self.scale.device)
        scale, zero_point = affine_params(lo, hi, self.qmin, self.qmax, self.symmetric)
        self.scale.copy_(scale.expand_as(self.scale))
        self.zero_point.copy_(zero_point.expand_as(self.zero_point).to(self.zero_point.dtype))

    def positive_scale(self) -> torch.Tensor:
        """The scale in force. A trained scale is read through ``abs`` (as NNCF does): an
        optimizer step that pushes it below zero flips its sign instead of collapsing the
        channel onto a near-zero grid (which kills the channel in PyTorch and overflows the
        int32 bias of int8 runtimes)."""
        return self.scale.float().abs().clamp_min(MIN_SCALE)

    def current_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The grid in force: ``(scale > 0, integer zero point)`` as detached tensors."""
        scale = self.positive_scale().detach()
        zero_point = self.zero_point.detach().round().clamp(self.qmin, self.qmax)
        return scale, zero_point.to(torch.int32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        if x.dtype != torch.float32:  # the kernels take float32: .double() / .half() models
            return self.forward(x.float()).to(x.dtype)
        if self.learnable:
            return self._learnable(x)
        scale = self.scale.float()
        if self.axis is None:
            return torch.fake_quantize_per_tensor_affine(
                x, scale, self.zero_point, self.qmin, self.qmax)
        return torch.fake_quantize_per_channel_affine(
            x, scale, self.zero_point, self.axis, self.qmin, self.qmax)

    def _learnable(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.positive_scale()
        zero_point = self.zero_point.float()
        # LSQ gradient scaling: keeps scale updates comparable to weight updates.
        per_scale = x.numel() // self.scale.numel()
        grad_factor = 1.0 / math.sqrt(max(per_scale, 1) * self.qmax)
        if self.axis is None:
            return torch._fake_quantize_learnable_per_tensor_affine(
                x, scale, zero_point, self.qmin, self.qmax, grad_factor)
        return torch._fake_quantize_learnable_per_channel_affine(
            x, scale, zero_point, self.axis, self.qmin, self.qmax, grad_factor)

    def onnx_module(self) -> nn.Module:
        """A frozen copy for ONNX export (see :class:`QuantizeDequantize`)."""
        scale, zero_point = self.current_qparams()
        return QuantizeDequantize(scale, zero_point, self.axis, self.qmin, self.qmax)

    def extra_repr(self) -> str:
        grid = "per_tensor" if self.axis is None else f"per_channel(axis={self.axis})"
        return (f"bits={self.bits}, {self.mode}, {grid}, range=[{self.qmin}, {self.qmax}], "
                f"learnable={self.learnable}")


class WeightQuantizer(FakeQuantize):
    """Fake-quantizes a layer's weight on its weight edge; symmetric weights use the narrow range.

    Per-channel grids run along the output-channel ``axis`` (0 for Conv/Linear, 1 for
    ConvTranspose). Without ``learnable`` the range follows the weight (min/max of the current
    weight at every training forward); with it, the scale is trained.
    """

    def __init__(self, spec: QuantSpec, weight: torch.Tensor, *, out_axis: int,
                 learnable: bool) -> None:
        axis = out_axis if spec.per_channel else None
        channels = weight.shape[out_axis] if spec.per_channel else 1
        super().__init__(spec, axis=axis, channels=channels, learnable=learnable,
                         narrow=spec.mode == "symmetric")
        self.to(weight.device)
        self.init_from(weight)

    @torch.no_grad()
    def init_from(self, weight: torch.Tensor) -> None:
        """Set the range to the min/max of ``weight`` (per output channel when per-channel)."""
        if self.axis is None:
            lo, hi = weight.min(), weight.max()
        else:
            flat = weight.detach().transpose(0, self.axis).reshape(weight.shape[self.axis], -1)
            lo, hi = flat.min(dim=1).values, flat.max(dim=1).values
        self.set_range(lo, hi)

    def share_grid(self, other: WeightQuantizer) -> None:
        """Use ``other``'s scale and zero point tensors themselves: every call of one layer
        quantizes its one weight on one grid, trained by the gradients of all the calls."""
        for name in ("scale", "zero_point"):
            setattr(self, name, getattr(other, name))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():
            if self.training and self.enabled and not self.learnable:
                self.init_from(weight)
            return super().forward(weight)
        return self._inference_forward(weight)

    def _inference_forward(self, weight: torch.Tensor) -> torch.Tensor:
        """Without autograd the quantized weight changes only when the weight or the grid does,
        so it is computed once and reused: inference pays for weight fake-quant once, not on
        every forward. The key holds storage pointers and version counters, which every in-place
        update (optimizer step, ``load_state_dict``, range init) bumps; the entry keeps aliases of
        those tensors so that no other tensor can take their memory while the entry lives.

        Only a stored weight (a parameter) is cached: one computed on the way (an earlier mask's
        output) is a new tensor at every forward, and inference tensors have no version counter.
        """
        if self.training and self.enabled and not self.learnable:
            self.init_from(weight)
        tensors = (weight, self.scale, self.zero_point)
        if not isinstance(weight, nn.Parameter) or any(t.is_inference() for t in tensors):
            return super().forward(weight)
        key = tuple((t.data_ptr(), t._version) for t in tensors)
        key += (self.enabled, weight.dtype, weight.device)
        cached = self.__dict__.get("_inference_cache")
        if cached is None or cached[0] != key:
            cached = (key, super().forward(weight), tuple(t.detach() for t in tensors))
            self.__dict__["_inference_cache"] = cached
        return cached[1]

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        state.pop("_inference_cache", None)
        return state

    def select_weight_channels(self, dim: int, keep: torch.Tensor) -> None:
        """Keep the scales of weight channels ``keep`` when ``dim`` is the per-channel axis
        (physical pruning); a per-tensor grid, or another dim, needs no change."""
        if self.axis != dim:
            return
        for name in ("scale", "zero_point"):
            value = getattr(self, name).detach().index_select(0, keep.to(self.scale.device))
            if isinstance(getattr(self, name), nn.Parameter):
                setattr(self, name, nn.Parameter(value))
            else:
                setattr(self, name, value)


class ActivationQuantizer(FakeQuantize):
    """Fake-quantizes one activation tensor with a per-tensor grid, shared by all its consumers.

    Symmetric activation grids are unsigned (``[0, 2^b - 1]``) when the calibrated range has no
    negative value (after ReLU), signed otherwise; the sign is decided by :meth:`set_range`.
    """

    elementwise = True  # channel analysis: a per-tensor, channel-preserving pass-through

    def __init__(self, spec: QuantSpec, *, learnable: bool) -> None:
        super().__init__(spec, axis=None, channels=1, learnable=learnable)
        # Saved with the scale, so a checkpoint restores the grid's sign along with its size.
        self.register_buffer("signed", torch.tensor(True))

    def set_range(self, lo: torch.Tensor, hi: torch.Tensor) -> None:
        if self.symmetric:
            self.signed.fill_(bool(torch.as_tensor(lo).min() < 0))
            self._sync_integer_range()
        super().set_range(torch.as_tensor(lo), torch.as_tensor(hi))

    def _sync_integer_range(self) -> None:
        if self.symmetric:
            self.qmin, self.qmax = integer_range(self.bits, self.mode, bool(self.signed),
                                                 narrow=False)

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._sync_integer_range()


class QuantizeDequantize(nn.Module):
    """A frozen fake-quantizer in the form ONNX can express: QuantizeLinear/DequantizeLinear.

    ONNX holds int8 or uint8 only; a narrower integer range (narrow-range int8, fewer bits) is
    kept exact by first clipping the input to the grid's end points, after which the 8-bit
    rounding gives the same values.
    """

    def __init__(self, scale: torch.Tensor, zero_point: torch.Tensor, axis: int | None,
                 qmin: int, qmax: int) -> None:
        super().__init__()
        self.axis = axis
        self.onnx_range = ONNX_UINT8 if qmin >= 0 else ONNX_INT8
        self.register_buffer("scale", scale.float())
        self.register_buffer("zero_point", zero_point.to(torch.int32))
        clip = (qmin, qmax) != self.onnx_range
        self.register_buffer("low", ((qmin - zero_point) * scale).float() if clip else None)
        self.register_buffer("high", ((qmax - zero_point) * scale).float() if clip else None)

    def _per_channel_view(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        shape = [1] * x.dim()
        shape[self.axis] = -1
        return t.reshape(shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        qmin, qmax = self.onnx_range
        if self.axis is None:
            if self.low is not None:
                x = torch.clamp(x, float(self.low), float(self.high))
            return torch.fake_quantize_per_tensor_affine(
                x, float(self.scale), int(self.zero_point), qmin, qmax)
        if self.low is not None:
            x = torch.clamp(x, self._per_channel_view(self.low, x),
                            self._per_channel_view(self.high, x))
        return torch.fake_quantize_per_channel_affine(
            x, self.scale, self.zero_point, self.axis, qmin, qmax)

"""Range initialisation: set activation quantizer ranges from the statistics of data.

Runs the *float* student (every fake-quantizer disabled) so that each range reflects the values
the layer produces, not the errors of the quantizers before it.
"""
from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator

import torch
from torch import fx, nn

from graphkd.errors import ConfigError
from graphkd.trace import as_input_tuple

from .quantizers import FakeQuantize, RangeType

log = logging.getLogger(__name__)


class RangeStatistics:
    """Accumulates an activation range over calibration batches.

    ``min_max``: min of minima / max of maxima; ``mean_min_max``: mean of per-batch minima and
    maxima; ``percentile``: mean of per-batch ``percentiles`` (robust to rare outliers).
    """

    def __init__(self, kind: RangeType, percentiles: tuple[float, float] = (0.1, 99.9)) -> None:
        self.kind, self.percentiles = kind, percentiles
        self.lows: list[torch.Tensor] = []
        self.highs: list[torch.Tensor] = []

    def observe(self, x: torch.Tensor) -> None:
        x = x.detach().float().reshape(-1)
        if self.kind == "percentile":
            lo, hi = (_percentile(x, p) for p in self.percentiles)
        else:
            lo, hi = torch.aminmax(x)
        self.lows.append(lo)
        self.highs.append(hi)

    def range(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(lo, hi)``, or None when nothing was observed."""
        if not self.lows:
            return None
        lows, highs = torch.stack(self.lows), torch.stack(self.highs)
        if self.kind == "min_max":
            return lows.min(), highs.max()
        return lows.mean(), highs.mean()


def _percentile(x: torch.Tensor, q: float) -> torch.Tensor:
    """The ``q``-th percentile of a 1-D tensor (nearest rank; no size limit, unlike quantile)."""
    k = min(max(int(round(q / 100 * (x.numel() - 1))) + 1, 1), x.numel())
    return torch.kthvalue(x, k).values


class RangeCalibrator:
    """Sets activation ranges from data: runs the float student (every fake-quantizer disabled,
    eval mode, no grad) and records the input range of each named activation quantizer.

    Looks the quantizers up by name in the student at each call, so it keeps working after the
    student is moved to another device.
    """

    def __init__(self, gm: fx.GraphModule, names: list[str], kind: str,
                 percentiles: tuple[float, float]) -> None:
        self.gm, self.names, self.kind, self.percentiles = gm, names, kind, percentiles

    @torch.no_grad()
    def calibrate(self, data: Iterable, num_samples: int | None) -> None:
        """Observe up to ``num_samples`` samples of ``data`` (all when None) and set the ranges."""
        if num_samples is not None and num_samples < 1:
            raise ConfigError(f"must be >= 1, got {num_samples}; pass None to use the pass's "
                              f"range_init.num_samples", "num_calibration_samples")
        if not self.names:
            return
        quantizers = [self.gm.get_submodule(name) for name in self.names]
        stats = {name: RangeStatistics(self.kind, self.percentiles) for name in self.names}
        hooks = [q.register_forward_pre_hook(lambda _m, args, s=stats[n]: s.observe(args[0]))
                 for n, q in zip(self.names, quantizers)]
        fake_quants = [m for m in self.gm.modules() if isinstance(m, FakeQuantize)]
        training = {m: m.training for m in self.gm.modules()}
        enabled = {m: m.enabled for m in fake_quants}
        try:
            self.gm.eval()
            for m in fake_quants:
                m.enabled = False
            device = device_of(self.gm)
            for inputs in calibration_batches(data, num_samples):
                self._check_arity(inputs)
                self.gm(*(x.to(device) if isinstance(x, torch.Tensor) else x for x in inputs))
        finally:
            for hook in hooks:
                hook.remove()
            for m, flag in enabled.items():
                m.enabled = flag
            for m, flag in training.items():
                m.training = flag
        for name, quantizer in zip(self.names, quantizers):
            observed = stats[name].range()
            if observed is None:
                log.warning("quantize: %s saw no data during range initialisation; its range "
                            "is unchanged", name)
                continue
            quantizer.set_range(*observed)


    def _check_arity(self, inputs: tuple) -> None:
        """A batch of a multi-input model given as ``(x, y)`` is read as (inputs, targets):
        say how to lay it out instead of failing inside the model."""
        required = [n.target for n in self.gm.graph.nodes if n.op == "placeholder" and not n.args]
        if len(inputs) < len(required):
            names = ", ".join(required)
            raise ConfigError(
                f"a calibration batch gives {len(inputs)} input(s) but the model takes "
                f"{len(required)} ({names}). Each item is an input, or an (inputs, targets) pair "
                f"whose first element is used: for several inputs yield (({names}), target) or "
                f"(({names}),).", "calibration_data")


def calibration_batches(data: Iterable, num_samples: int | None) -> Iterator[tuple]:
    """Input tuples from ``data`` (inputs, or ``(inputs, targets)`` pairs whose first element is
    used), the last batch cut so that exactly ``num_samples`` samples are seen."""
    seen = 0
    for item in data:
        inputs = as_input_tuple(item[0] if isinstance(item, (tuple, list)) else item)
        if num_samples is not None:
            batch = next((x.shape[0] for x in inputs if isinstance(x, torch.Tensor)), 1)
            take = min(batch, num_samples - seen)
            if take < batch:
                inputs = tuple(x[:take] if isinstance(x, torch.Tensor) else x for x in inputs)
            seen += take
        yield inputs
        if num_samples is not None and seen >= num_samples:
            return


def device_of(gm: nn.Module) -> torch.device:
    """The device of ``gm``'s first parameter or buffer (CPU for a stateless module)."""
    for tensor in [*gm.parameters(), *gm.buffers()]:
        return tensor.device
    return torch.device("cpu")

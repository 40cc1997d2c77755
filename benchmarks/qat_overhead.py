"""Training-step time of 8-bit QAT students relative to the fp32 model.

Variants, timed alternately in one process (warm-up, then the median of ``--reps`` steps each):
``fp32`` the original model; ``fp32, BN folded`` the same with BatchNorm folded into the convs
(what graphkd's quantize pass does before quantizing, shown so the fake-quant cost can be read
apart from the saving of folding); ``graphkd`` the ``quantize`` pass (8-bit, learnable scales, the
default) and ``graphkd fixed`` (``learnable: false``); ``torch.ao`` ``prepare_qat_fx`` with the
default x86 QAT qconfig mapping. A step is forward, cross-entropy, backward and an SGD step.

    python -m benchmarks.qat_overhead             # ResNet-18 (batch 64, 32x32) and the MLP
    python -m benchmarks.qat_overhead --reps 3    # quicker
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time
import warnings
from collections.abc import Callable

import torch
from torch import nn

import graphkd as gk
from graphkd.graph import ScopeFilter, scopes_of
from graphkd.passes.bn_fold import fold_batchnorms
from graphkd.zoo import mlp, resnet18_cifar

Step = Callable[[], None]


def training_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Step:
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

    def step() -> None:
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def folded(model: nn.Module, x: torch.Tensor) -> nn.Module:
    gm = gk.trace(copy.deepcopy(model).eval(), x)
    fold_batchnorms(gm, ScopeFilter(scopes_of(gm)))
    gm.graph.lint()
    gm.recompile()
    return gm


def torch_ao_qat(model: nn.Module, x: torch.Tensor) -> nn.Module | None:
    try:
        from torch.ao.quantization import get_default_qat_qconfig_mapping
        from torch.ao.quantization.quantize_fx import prepare_qat_fx
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return prepare_qat_fx(copy.deepcopy(model).train(),
                                  get_default_qat_qconfig_mapping("x86"), (x,))
    except Exception as exc:  # noqa: BLE001 - report and carry on without this column
        print(f"  torch.ao prepare_qat_fx failed: {type(exc).__name__}: {exc}")
        return None


def variants(model: nn.Module, x: torch.Tensor) -> dict[str, nn.Module]:
    models = {"fp32": copy.deepcopy(model)}
    if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        models["fp32, BN folded"] = folded(model, x)
    models["graphkd"] = gk.compress(model.eval(), {"pipeline": [{"pass": "quantize"}]}, x).model
    models["graphkd fixed"] = gk.compress(
        model.eval(), {"pipeline": [{"pass": "quantize", "learnable": False}]}, x).model
    ao = torch_ao_qat(model, x)
    if ao is not None:
        models["torch.ao"] = ao
    return models


def measure(name: str, model: nn.Module, x: torch.Tensor, y: torch.Tensor, reps: int,
            warmup: int) -> dict[str, float]:
    steps = {label: training_step(m, x, y) for label, m in variants(model, x).items()}
    times: dict[str, list[float]] = {label: [] for label in steps}
    for i in range(warmup + reps):
        for label, step in steps.items():  # alternate the variants
            start = time.perf_counter()
            step()
            if i >= warmup:
                times[label].append(time.perf_counter() - start)
    medians = {label: statistics.median(t) for label, t in times.items()}
    base = medians["fp32"]
    print(f"\n{name}: x {tuple(x.shape)}, median of {reps} steps after {warmup} warm-up")
    print(f"  {'variant':<16} {'ms/step':>9} {'ratio':>7}")
    for label, value in medians.items():
        print(f"  {label:<16} {value * 1e3:9.1f} {value / base:7.2f}")
    return {label: value / base for label, value in medians.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: torch's choice, all cores)")
    parser.add_argument("--models", nargs="+", default=["resnet18", "mlp"],
                        choices=["resnet18", "mlp"])
    args = parser.parse_args()
    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"8-bit weights (symmetric, per-channel) and activations (asymmetric, per-tensor)")
    if "resnet18" in args.models:
        x, y = torch.randn(64, 3, 32, 32), torch.randint(0, 10, (64,))
        measure("resnet18_cifar", resnet18_cifar(), x, y, args.reps, args.warmup)
    if "mlp" in args.models:
        x, y = torch.randn(256, 784), torch.randint(0, 10, (256,))
        measure("mlp 784-1024-1024-10", mlp((784, 1024, 1024, 10)), x, y, args.reps * 4,
                args.warmup * 2)


if __name__ == "__main__":
    main()

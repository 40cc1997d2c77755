"""What physical channel removal buys: size, FLOPs and CPU latency of graphkd's exported pruned
ResNet-18 against the original, and against Torch-Pruning's MagnitudePruner at the same ratio.

Both prune every conv group (graphkd with ``prune_first_conv`` and ``prune_downsample_convs``;
Torch-Pruning with only ``fc`` ignored) by L2 filter norm at the given channel ratio. Latency: the
original and the pruned models run alternately in one process (order rotated every repetition),
after warm-up, in eval mode under ``torch.inference_mode``; the median is reported and every
ratio is pruned / original. FLOPs are counted by ``graphkd.count_flops`` on each traced model.

    python -m benchmarks.prune_speedup                    # batch 8, 20 repetitions
    python -m benchmarks.prune_speedup --reps 5 --batch 2 # quicker
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

import graphkd as gk
from graphkd import zoo


def graphkd_pruned(model: nn.Module, x: torch.Tensor, ratio: float) -> nn.Module:
    pipeline = {"pipeline": [{"pass": "prune", "ratio": ratio, "criterion": "l2",
                              "prune_first_conv": True, "prune_downsample_convs": True}]}
    return gk.compress(copy.deepcopy(model), pipeline, x[:1]).export()


def torch_pruning_pruned(model: nn.Module, x: torch.Tensor, ratio: float) -> nn.Module | None:
    try:
        import torch_pruning as tp
    except ImportError:
        return None
    model = copy.deepcopy(model)
    importance = tp.importance.MagnitudeImportance(p=2)
    pruner = tp.pruner.MagnitudePruner(model, x[:1], importance=importance, pruning_ratio=ratio,
                                       ignored_layers=[model.fc])
    pruner.step()
    return model.eval()


def median_latencies(models: dict[str, nn.Module], x: torch.Tensor, reps: int,
                     warmup: int) -> dict[str, float]:
    """Median seconds per forward of each model, run alternately with a rotating order."""
    names = list(models)
    times: dict[str, list[float]] = {n: [] for n in names}
    with torch.inference_mode():
        for rep in range(warmup + reps):
            order = names[rep % len(names):] + names[:rep % len(names)]
            for name in order:
                start = time.perf_counter()
                models[name](x)
                if rep >= warmup:
                    times[name].append(time.perf_counter() - start)
    return {n: statistics.median(t) for n, t in times.items()}


def describe(model: nn.Module, x: torch.Tensor) -> tuple[int, int]:
    return gk.count_params(model), gk.count_flops(gk.trace(copy.deepcopy(model), x[:1]))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.3, 0.5, 0.7])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    model = zoo.resnet18_cifar().eval()
    x = torch.randn(args.batch, 3, 32, 32)
    params0, flops0 = describe(model, x)
    print(f"ResNet-18 (CIFAR, width 64), input {tuple(x.shape)}, {torch.get_num_threads()} "
          f"threads, {args.reps} reps after {args.warmup} warm-up, median latency")
    print(f"original: {params0 / 1e6:.2f} M params, {flops0 / 1e9:.3f} GFLOPs per image")
    header = f"{'ratio':>5}  {'tool':<13} {'params':>8} {'FLOPs':>8} {'latency':>8}  {'ms':>7}"
    print(header)
    builders: dict[str, Callable[[nn.Module, torch.Tensor, float], nn.Module | None]] = {
        "graphkd": graphkd_pruned, "torch-pruning": torch_pruning_pruned}
    for ratio in args.ratios:
        pruned = {name: build(model, x, ratio) for name, build in builders.items()}
        pruned = {name: m for name, m in pruned.items() if m is not None}
        latency = median_latencies({"original": model, **pruned}, x, args.reps, args.warmup)
        for name, m in pruned.items():
            params, flops = describe(m, x)
            print(f"{ratio:>5.2f}  {name:<13} {params / params0:>8.3f} {flops / flops0:>8.3f} "
                  f"{latency[name] / latency['original']:>8.3f}  {latency[name] * 1e3:>7.2f}")
        print(f"{ratio:>5.2f}  {'original':<13} {1:>8.3f} {1:>8.3f} {1:>8.3f}  "
              f"{latency['original'] * 1e3:>7.2f}")
    if "torch-pruning" not in pruned:
        print("torch-pruning not installed (pip install torch-pruning --no-deps): column skipped")


if __name__ == "__main__":
    main()

"""What graphkd's ``distill`` pass costs per training step, against a hand-written KD step.

Three variants train the same model side by side in one process:
  (a) plain     the student alone: cross-entropy, backward, SGD step
  (b) by hand   a frozen eval-mode teacher under ``torch.no_grad`` + soft-target KD loss
  (c) graphkd   ``compress(model, [distill softmax])``: cross-entropy + ``Compressed.loss()``
Time: the variants alternate within each repetition (order rotated every repetition) after
warm-up; the median is reported. Memory: peak bytes of one step = bytes alive before it (student
parameters and buffers, plus the teacher's for b and c) + the peak of the running sum of every
CPU allocation and free during the step, read from the PyTorch profiler's raw memory events
(exact for tensors; tracemalloc cannot see them, they bypass Python's allocator).

    python -m benchmarks.kd_overhead                      # ResNet-18 (32x32, batch 64) and MLP
    python -m benchmarks.kd_overhead --models mlp --reps 50
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.profiler import ProfilerActivity, profile

import graphkd as gk
from graphkd import zoo

TEMPERATURE = 4.0
VARIANTS = ("plain", "by hand", "graphkd")


@dataclass
class Workload:
    name: str
    model: nn.Module
    inputs: torch.Tensor
    targets: torch.Tensor
    reps: int
    warmup: int


def workloads(args: argparse.Namespace) -> list[Workload]:
    found = []
    for name in args.models:
        if name == "resnet18":
            model = zoo.resnet18_cifar(width=args.width)
            x = torch.randn(args.batch, 3, 32, 32)
            reps, warmup = args.reps or 3, 1
        else:
            model = zoo.mlp((784, 1024, 1024, 10))
            x = torch.randn(args.batch, 784)
            reps, warmup = args.reps or 30, 5
        found.append(Workload(name, model, x, torch.randint(0, 10, (args.batch,)), reps, warmup))
    return found


def soft_targets_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    log_p = F.log_softmax(student / TEMPERATURE, 1)
    return -(F.softmax(teacher / TEMPERATURE, 1) * log_p).sum(1).mean() * TEMPERATURE ** 2


def make_steps(w: Workload) -> tuple[dict[str, Callable[[], None]], dict[str, int], int]:
    """One training-step closure per variant, the bytes each holds between steps, and the
    teacher's weight bytes."""
    x, y = w.inputs, w.targets
    plain = copy.deepcopy(w.model).train()
    student = copy.deepcopy(w.model).train()
    teacher = copy.deepcopy(w.model).eval().requires_grad_(False)
    compressed = gk.compress(copy.deepcopy(w.model),
                             {"pipeline": [{"pass": "distill", "type": "softmax",
                                            "temperature": TEMPERATURE}]}, x[:2])
    optimizers = {name: torch.optim.SGD(m.parameters(), lr=0.01)
                  for name, m in (("plain", plain), ("by hand", student),
                                  ("graphkd", compressed.model))}

    def finish(name: str, loss: torch.Tensor) -> None:
        loss.backward()
        optimizers[name].step()
        optimizers[name].zero_grad(set_to_none=True)

    def step_plain() -> None:
        finish("plain", F.cross_entropy(plain(x), y))

    def step_by_hand() -> None:
        with torch.no_grad():
            target = teacher(x)
        out = student(x)
        finish("by hand", F.cross_entropy(out, y) + soft_targets_loss(out, target))

    def step_graphkd() -> None:
        finish("graphkd", F.cross_entropy(compressed.model(x), y) + compressed.loss())

    teacher_bytes = tensor_bytes(teacher)
    resident = {"plain": tensor_bytes(plain), "by hand": tensor_bytes(student) + teacher_bytes,
                "graphkd": tensor_bytes(compressed.model) + tensor_bytes(compressed.teacher)}
    steps = {"plain": step_plain, "by hand": step_by_hand, "graphkd": step_graphkd}
    return steps, resident, teacher_bytes


def tensor_bytes(module: nn.Module) -> int:
    tensors = [*module.parameters(), *module.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)


def step_peak_bytes(step: Callable[[], None]) -> int:
    """Peak of the running sum of CPU allocations minus frees during ``step``."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    running = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        running += event.nbytes()
        peak = max(peak, running)
    return peak


@dataclass
class Result:
    seconds: dict[str, float]  # median step time per variant
    peak: dict[str, int]  # peak bytes per variant
    teacher_bytes: int


def measure(w: Workload) -> Result:
    steps, resident, teacher_bytes = make_steps(w)
    for _ in range(w.warmup):
        for step in steps.values():
            step()
    times: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for rep in range(w.reps):
        order = VARIANTS[rep % 3:] + VARIANTS[:rep % 3]
        for name in order:
            start = time.perf_counter()
            steps[name]()
            times[name].append(time.perf_counter() - start)
    return Result(seconds={name: statistics.median(times[name]) for name in VARIANTS},
                  peak={name: resident[name] + step_peak_bytes(steps[name]) for name in VARIANTS},
                  teacher_bytes=teacher_bytes)


def report(w: Workload, r: Result) -> None:
    mib = 2 ** 20
    plain_t, hand_t, plain_m = r.seconds["plain"], r.seconds["by hand"], r.peak["plain"]
    print(f"\n{w.name}: input {tuple(w.inputs.shape)}, median of {w.reps} reps after "
          f"{w.warmup} warm-up")
    print(f"{'variant':<10}{'step ms':>10}{'peak MiB':>10}{'time/plain':>12}{'time/hand':>11}"
          f"{'mem/plain':>11}{'mem/hand':>10}")
    for name in VARIANTS:
        t, m = r.seconds[name], r.peak[name]
        print(f"{name:<10}{t * 1e3:>10.1f}{m / mib:>10.1f}{t / plain_t:>12.3f}{t / hand_t:>11.3f}"
              f"{m / plain_m:>11.3f}{m / r.peak['by hand']:>10.3f}")
    ratio = r.seconds["graphkd"] / hand_t
    overhead = r.peak["graphkd"] - plain_m
    allowed = r.teacher_bytes + 0.10 * plain_m
    print(f"time (c)/(b) = {ratio:.3f} (target <= 1.05: {'met' if ratio <= 1.05 else 'MISSED'}); "
          f"memory (c)-(a) = {overhead / mib:.1f} MiB, allowed: teacher weights "
          f"{r.teacher_bytes / mib:.1f} MiB + 10% of (a) = {allowed / mib:.1f} MiB "
          f"({'met' if overhead <= allowed else 'MISSED'})")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=["resnet18", "mlp"],
                        default=["resnet18", "mlp"])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--width", type=int, default=64, help="ResNet-18 base width")
    parser.add_argument("--reps", type=int, default=0,
                        help="timed repetitions per variant (default 3 for resnet18, 30 for mlp)")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    torch.set_flush_denormal(True)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU; KD softmax "
          f"T={TEMPERATURE}; SGD lr 0.01; batch {args.batch}; resnet18 width {args.width}")
    for w in workloads(args):
        report(w, measure(w))


if __name__ == "__main__":
    main()

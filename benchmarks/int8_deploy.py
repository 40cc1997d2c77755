"""What a compressed model buys at deployment: batch-1 CPU latency in PyTorch and ONNX Runtime.

A ResNet-18-style CIFAR CNN, original vs ``prune 0.5 + quantize int8`` exported by graphkd, timed
on one thread with the models interleaved (``graphkd.report``'s timing loop): in PyTorch (the
exported GraphModule still simulates activation quantization in float) and in ONNX Runtime (the
QDQ model, which onnxruntime runs with int8 kernels). Needs ``pip install 'graphkd[onnx]'``.

    python -m benchmarks.int8_deploy [--ratio 0.5] [--width 64]
"""
from __future__ import annotations

import argparse

import torch

import graphkd as gk
from graphkd import zoo
from graphkd.report import cpu_latencies_ms, onnx_latencies_ms, onnx_runtime_available


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--width", type=int, default=64)
    args = parser.parse_args()
    if not onnx_runtime_available():
        raise SystemExit("needs onnx and onnxruntime: pip install 'graphkd[onnx]'")
    torch.manual_seed(0)
    model = zoo.resnet18_cifar(width=args.width).eval()
    x = torch.randn(1, 3, 32, 32)
    pipeline = [{"pass": "prune", "ratio": args.ratio, "prune_first_conv": True,
                 "prune_downsample_convs": True}, {"pass": "quantize", "bits": 8}]
    c = gk.compress(model, {"pipeline": pipeline}, x)
    c.model.eval()
    models = {"original": model, "compressed": c.export()}
    pytorch = cpu_latencies_ms(models, x)
    onnx = onnx_latencies_ms(models, x)
    print(f"ResNet-18-style CIFAR (width {args.width}), input (1, 3, 32, 32), one thread; "
          f"pipeline: prune {args.ratio} + int8; params {gk.count_params(model) / 1e6:.2f}M -> "
          f"{gk.count_params(models['compressed']) / 1e6:.2f}M")
    print("| model | PyTorch ms | ONNX Runtime ms |")
    print("| --- | --- | --- |")
    for name in models:
        print(f"| {name} | {pytorch[name]:.2f} | {onnx[name]:.2f} |")
    print(f"| compressed / original | {pytorch['compressed'] / pytorch['original']:.2f} | "
          f"{onnx['compressed'] / onnx['original']:.2f} |")


if __name__ == "__main__":
    main()

"""What distillation buys on the digits demo: KD vs no-KD top-1 over several seeds.

Runs ``graphkd run configs/digits_prune_quant_kd.yaml`` once per seed (each seed trains its own
teacher, cached under runs/demo_seeds/), then prints per-seed accuracies and their means.

    python -m benchmarks.demo_seeds [--seeds 0 1 2] [--config PATH]
"""
from __future__ import annotations

import argparse
import logging
import statistics
from pathlib import Path

from graphkd.progress import LogProgress
from graphkd.run import run

DEFAULT_CONFIG = Path(__file__).parent.parent / "configs" / "digits_prune_quant_kd.yaml"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    parser.add_argument("--out", type=Path, default=Path("runs") / "demo_seeds")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    rows = []
    for seed in args.seeds:
        result = run(args.config, out_dir=args.out / f"seed{seed}", seed=seed, progress=LogProgress())
        models = result.metrics["models"]
        rows.append((seed, models["original"]["accuracy"], models["kd"]["accuracy"],
                     models["no_kd"]["accuracy"]))
    print(f"config: {args.config} (seeds {args.seeds}; teacher, fine-tuning and batch order "
          f"depend on the seed, the data split does not)")
    print("| seed | original | compressed + KD | compressed, no KD | KD - no KD (points) |")
    print("| --- | --- | --- | --- | --- |")
    for seed, original, kd, no_kd in rows:
        print(f"| {seed} | {original:.2%} | {kd:.2%} | {no_kd:.2%} | {100 * (kd - no_kd):+.2f} |")
    means = [statistics.mean(r[i] for r in rows) for i in (1, 2, 3)]
    print(f"| mean | {means[0]:.2%} | {means[1]:.2%} | {means[2]:.2%} | "
          f"{100 * (means[1] - means[2]):+.2f} |")


if __name__ == "__main__":
    main()

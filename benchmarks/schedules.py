"""What a faster schedule costs in accuracy: the paper's step schedule vs one-cycle with fewer epochs.

    python benchmarks/schedules.py --seeds 0,1,2
    python benchmarks/schedules.py --data cifar10 --data-dir ../shared/datasets/cifar10-jpeg/cifar10-jpeg.tar.gz \
        --train-per-class 500 --epochs 30,15 --seeds 0
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from ticketguard.data import load_dataset
from ticketguard.models import build_model
from ticketguard.training.loop import TrainConfig, train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--data", default="digits")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--train-per-class", type=int, default=None)
    parser.add_argument("--epochs", default="20,10", help="full length (step schedule), short length (one-cycle)")
    parser.add_argument("--onecycle-lr", type=float, default=0.2)
    parser.add_argument("--seeds", default="0,1,2")
    args = parser.parse_args()

    data = load_dataset(args.data, args.data_dir)
    if args.train_per_class:
        data = data.subset(args.train_per_class, None)
    full, short = (int(e) for e in args.epochs.split(","))
    variants = {
        f"step, {full} epochs (paper)": TrainConfig(epochs=full),
        f"onecycle, {full} epochs": TrainConfig(epochs=full, schedule="onecycle", lr=args.onecycle_lr),
        f"onecycle, {short} epochs": TrainConfig(epochs=short, schedule="onecycle", lr=args.onecycle_lr),
    }
    seeds = [int(s) for s in args.seeds.split(",")]
    print(f"{args.model} on {args.data} ({data.train_labels.numel()} training images), seeds {seeds}")
    print(f"{'schedule':<32}{'test accuracy (mean ± sd)':>28}{'s/run':>8}")
    for label, config in variants.items():
        accuracies, started = [], time.perf_counter()
        for seed in seeds:
            torch.manual_seed(seed)
            model = build_model(args.model, data.input_shape[0], data.num_classes)
            accuracies.append(train(model, data, TrainConfig(**{**config.__dict__, "seed": seed})).accuracy)
        spread = statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0
        seconds = (time.perf_counter() - started) / len(seeds)
        print(f"{label:<32}{100 * statistics.mean(accuracies):>20.2f} ± {100 * spread:.2f} %{seconds:>8.1f}")


if __name__ == "__main__":
    main()

"""How close the trainer runs to the machine's limit: training FLOP/s against one large sgemm, same run.

Each variant runs in a fresh process (the heap setting it compares is process-wide) that times, at the same
thread count and in this order, a 1024x1024 fp32 matrix product (the peak a dense kernel reaches on this
machine now) and then whole epochs of ``training.loop.train`` on real CIFAR-10 JPEG images. The training FLOPs
of one image (forward and backward, counted by ``torch.utils.flop_counter``) times the images per second gives
the trainer's FLOP/s; its ratio to the same process's sgemm is the figure of merit, so that a machine that is
slower or busier today moves both alike. Variants: the eager trainer with glibc's heap as it comes (the trainer
before ``training.host_memory``, the baseline), the eager trainer now, and the compiled one. Rounds interleave
the variants; medians are printed. ``--profile ROWS`` adds where the eager trainer spends its time, by operator.

    python benchmarks/trainer_peak.py --threads 2 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from ticketguard.core.errors import InputError
from ticketguard.data import ImageData
from ticketguard.data.cifar import load_image_folder
from ticketguard.models import build_model
from ticketguard.training import loop
from ticketguard.training.loop import TrainConfig, train
from ticketguard.training.recipes import recipe

CIFAR_JPEG = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "cifar10-jpeg" / "cifar10-jpeg.tar.gz"
SGEMM_SIZE = 1024


def sgemm_gflops(size: int = SGEMM_SIZE, seconds: float = 2.0) -> float:
    """fp32 GFLOP/s of repeated size x size products for about ``seconds``."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        a @ b
        done += 1
    return 2 * size**3 * done / (time.perf_counter() - started) / 1e9


def training_flops_per_image(model_name: str, data: ImageData, batch: int) -> float:
    """Forward + backward FLOPs of one training image (convolutions and matrix products)."""
    model = build_model(model_name, data.input_shape[0], data.num_classes)
    images = torch.randn(batch, *data.input_shape)
    labels = torch.randint(0, data.num_classes, (batch,))
    with FlopCounterMode(display=False) as counter:
        F.cross_entropy(model(images), labels).backward()
    return counter.get_total_flops() / batch


def images_per_second(model_name: str, data: ImageData, config: TrainConfig) -> tuple[float, float]:
    """Training images per second of ``train`` over the epochs after the first (warm-up, compilation), and
    the minor page faults per training step over the same epochs."""
    ends: list[tuple[float, int]] = []

    def clock(_epoch: int, _model: torch.nn.Module) -> dict[str, float]:
        ends.append((time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF).ru_minflt))
        return {}

    train(build_model(model_name, data.input_shape[0], data.num_classes), data, config, epoch_hook=clock)
    (first, faults_first), (last, faults_last) = ends[0], ends[-1]
    steps = math.ceil(data.train_labels.numel() / config.batch_size) * (len(ends) - 1)
    return data.train_labels.numel() * (len(ends) - 1) / (last - first), (faults_last - faults_first) / steps


VARIANTS = {
    "eager, heap as glibc sets it": {"compile": False, "keep_freed_memory": False},
    "eager": {"compile": False, "keep_freed_memory": True},
    "compiled": {"compile": True, "keep_freed_memory": True},
}
"""The first is the trainer before ``training.host_memory``: glibc maps and unmaps every activation."""


def measure(args: argparse.Namespace) -> dict[str, float]:
    """One variant in this process (the heap setting is process-wide): sgemm first, then the trainer."""
    variant = VARIANTS[args.variant]
    if not variant["keep_freed_memory"]:
        loop.keep_freed_memory = lambda _device: False
    data = load_image_folder(args.data_dir, "cifar10", per_class=args.per_class)
    config = replace(recipe(args.recipe, args.epochs), compile=bool(variant["compile"]))
    peak = sgemm_gflops()
    speed, faults = images_per_second(args.model, data, config)
    return {"sgemm": peak, "images_per_second": speed, "faults_per_step": faults}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--data-dir", type=Path, default=CIFAR_JPEG, help="CIFAR-10 JPEG folder or .tar.gz")
    parser.add_argument("--per-class", type=int, default=256, help="training images per class (an epoch)")
    parser.add_argument("--epochs", type=int, default=3, help="epochs per timing; the first is not timed")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; medians are printed")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads for everything")
    parser.add_argument("--recipe", default="fast", help="training recipe (batch size, optimiser)")
    parser.add_argument("--profile", type=int, default=0, metavar="ROWS", help="print an eager operator profile")
    parser.add_argument("--variant", choices=sorted(VARIANTS), help=argparse.SUPPRESS)  # one measurement
    args = parser.parse_args()
    if args.epochs < 2 or args.rounds < 1 or args.threads < 1:
        sys.exit("error: --epochs must be >= 2, --rounds and --threads >= 1")
    torch.set_num_threads(args.threads)
    try:
        if args.variant is not None:
            print(json.dumps(measure(args)))
            return
        data = load_image_folder(args.data_dir, "cifar10", per_class=args.per_class)
        config = recipe(args.recipe, args.epochs)
    except InputError as err:
        sys.exit(f"error: {err}")
    flops = training_flops_per_image(args.model, data, config.batch_size)
    print(f"{args.model}: {flops / 1e6:.1f} MFLOP per training image, batch {config.batch_size}, "
          f"{data.train_labels.numel()} real images an epoch, {args.threads} threads; each variant in a fresh "
          "process", flush=True)
    results: dict[str, list[dict[str, float]]] = {name: [] for name in VARIANTS}
    for round_index in range(args.rounds):
        for name in VARIANTS:
            command = [sys.executable, __file__, "--variant", name, *sys.argv[1:]]
            done = subprocess.run(command, check=False, capture_output=True, text=True)
            if done.returncode != 0:
                sys.exit(f"error: the {name!r} measurement failed:\n{done.stderr[-2000:]}")
            result = json.loads(done.stdout.strip().splitlines()[-1])
            result["ratio"] = result["images_per_second"] * flops / 1e9 / result["sgemm"]
            results[name].append(result)
            print(f"round {round_index + 1} {name}: sgemm {result['sgemm']:.1f} GFLOP/s, "
                  f"{result['images_per_second']:.0f} images/s = "
                  f"{result['images_per_second'] * flops / 1e9:.1f} GFLOP/s ({result['ratio']:.2f} of sgemm), "
                  f"{result['faults_per_step']:.0f} page faults a step", flush=True)
    baseline = statistics.median(r["images_per_second"] for r in results[next(iter(VARIANTS))])
    for name, rows in results.items():
        speed = statistics.median(r["images_per_second"] for r in rows)
        print(f"median {name}: {speed:.0f} images/s ({speed / baseline:.2f}x the first), "
              f"{statistics.median(r['ratio'] for r in rows):.2f} of the same process's sgemm "
              f"({statistics.median(r['sgemm'] for r in rows):.1f} GFLOP/s), "
              f"{statistics.median(r['faults_per_step'] for r in rows):.0f} page faults a step")
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as profiler:
            images_per_second(args.model, data, config)
        print(profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.profile))


if __name__ == "__main__":
    main()

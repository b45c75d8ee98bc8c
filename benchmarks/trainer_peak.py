"""How close the trainer runs to the machine's limit: training FLOP/s against one large sgemm, same run.

Each variant runs in a fresh process (the heap setting it compares is process-wide) at the same thread
count, timing whole epochs of ``training.loop.train`` on real CIFAR-10 JPEG images with a 1024x1024 fp32
matrix product (the peak a dense kernel reaches on this machine now) timed between every two epochs. The
training FLOPs of one image (forward and backward, counted by ``torch.utils.flop_counter``) times the images
per second of an epoch gives the trainer's FLOP/s; its ratio to the mean of the sgemm timed just before and
just after that epoch is the figure of merit, so that a machine that is slower or busier for a while moves
both alike. Variants: the eager trainer with glibc's heap as it comes (the trainer before
``training.host_memory``, the baseline), the eager trainer now, the compiled one, the eager one
data-parallel in one process per thread (torchrun, gloo; the main process times the sgemm at all
``--threads`` while the others wait), and the convolutions alone: every convolution and the classifier of
the model, forward and backward at the trainer's shapes and batch, with nothing between them, the bound the
trainer would reach if BatchNorm, ReLU, the data and the optimiser cost nothing. Rounds interleave the
variants; medians are printed. ``--profile ROWS`` adds where the eager trainer spends its time, by operator.

    python benchmarks/trainer_peak.py --threads 2 --rounds 3
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ticketguard.core.errors import InputError
from ticketguard.data import ImageData
from ticketguard.data.cifar import load_image_folder
from ticketguard.models import build_model
from ticketguard.training import distributed, loop
from ticketguard.training.loop import TrainConfig, train
from ticketguard.training.recipes import recipe

CIFAR_JPEG = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "cifar10-jpeg" / "cifar10-jpeg.tar.gz"
SGEMM_SIZE = 1024
SGEMM_SECONDS = 1.0


def sgemm_gflops(threads: int, size: int = SGEMM_SIZE, seconds: float = SGEMM_SECONDS) -> float:
    """fp32 GFLOP/s of repeated size x size products for about ``seconds`` at ``threads`` threads."""
    own_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        a @ b
        done += 1
    elapsed = time.perf_counter() - started
    torch.set_num_threads(own_threads)
    return 2 * size**3 * done / elapsed / 1e9


def training_flops_per_image(model_name: str, data: ImageData, batch: int) -> float:
    """Forward + backward FLOPs of one training image (convolutions and matrix products)."""
    model = build_model(model_name, data.input_shape[0], data.num_classes)
    images = torch.randn(batch, *data.input_shape)
    labels = torch.randint(0, data.num_classes, (batch,))
    with FlopCounterMode(display=False) as counter:
        F.cross_entropy(model(images), labels).backward()
    return counter.get_total_flops() / batch


def _bracketed(timed: Sequence[float], peaks: Sequence[float], flops: float) -> list[float]:
    """Each timed interval's FLOP/s (``flops`` per interval) against the mean sgemm before and after it."""
    brackets = zip(timed, peaks, peaks[1:])
    return [flops / seconds / 1e9 / ((before + after) / 2) for seconds, before, after in brackets]


def trainer_ratios(
    model_name: str, data: ImageData, config: TrainConfig, flops: float, threads: int
) -> tuple[list[float], float, float]:
    """Per epoch after the first (warm-up, compilation): training FLOP/s against the bracketing sgemm at
    ``threads`` threads; with the median images per second and minor page faults per training step over those
    epochs (the sgemm's own left out). Under torchrun the main process times the sgemm while the others wait
    at a barrier; the page faults are the main process's."""
    peaks: list[float] = []
    marks: list[tuple[float, int, float, int]] = []  # (time, page faults) before and after each sgemm

    def clock(_epoch: int, _model: torch.nn.Module) -> dict[str, float]:
        before = (time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF).ru_minflt)
        if distributed.is_main():
            peaks.append(sgemm_gflops(threads))
        distributed.barrier()
        marks.append((*before, time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF).ru_minflt))
        return {}

    train(build_model(model_name, data.input_shape[0], data.num_classes), data, config, epoch_hook=clock)
    images = data.train_labels.numel()
    epochs = [(start - end, faults_start - faults_end)
              for (*_, end, faults_end), (start, faults_start, *_) in itertools.pairwise(marks)]
    steps = math.ceil(images / config.batch_size) * len(epochs)
    seconds = [elapsed for elapsed, _ in epochs]
    faults = sum(count for _, count in epochs) / steps
    return _bracketed(seconds, peaks, flops * images), images / statistics.median(seconds), faults


def convolution_ratios(
    model_name: str, data: ImageData, batch: int, repeats: int, threads: int
) -> tuple[list[float], float]:
    """The convolutions and classifier alone, forward and backward at the trainer's shapes (inputs captured
    from one training-mode forward pass, channels-last as the trainer runs), timed ``repeats`` times between
    sgemm timings; with the images per second they would allow."""
    model = build_model(model_name, data.input_shape[0], data.num_classes)
    model.to(memory_format=torch.channels_last)
    layers = [m for m in model.modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    inputs: dict[nn.Module, torch.Tensor] = {}

    def keep_input(layer: nn.Module, args: tuple[torch.Tensor, ...], _output: torch.Tensor) -> None:
        inputs[layer] = args[0].detach()

    hooks = [layer.register_forward_hook(keep_input) for layer in layers]
    model(torch.randn(batch, *data.input_shape).contiguous(memory_format=torch.channels_last))
    for hook in hooks:
        hook.remove()
    pairs = [(layer, inputs[layer].requires_grad_(index > 0)) for index, layer in enumerate(layers)]
    grads = [torch.randn_like(layer(x)) for layer, x in pairs]

    def once() -> None:
        for (layer, x), grad in zip(pairs, grads):
            layer(x).backward(grad)

    once()  # warm-up
    with FlopCounterMode(display=False) as counter:
        once()
    peaks, seconds = [sgemm_gflops(threads)], []
    for _ in range(repeats):
        started = time.perf_counter()
        for _ in range(10):
            once()
        seconds.append((time.perf_counter() - started) / 10)
        peaks.append(sgemm_gflops(threads))
    return _bracketed(seconds, peaks, counter.get_total_flops()), batch / statistics.median(seconds)


VARIANTS = {
    "eager, heap as glibc sets it": {"compile": False, "keep_freed_memory": False},
    "eager": {"compile": False, "keep_freed_memory": True},
    "compiled": {"compile": True, "keep_freed_memory": True},
    "convolutions alone": {"compile": False, "keep_freed_memory": True, "convolutions_alone": True},
    "eager, one process per thread": {"compile": False, "keep_freed_memory": True, "data_parallel": True},
    "eager, without oneDNN": {"compile": False, "keep_freed_memory": True, "onednn": False},
}
"""The first is the trainer before ``training.host_memory``: glibc maps and unmaps every activation. "one
process per thread" is the same trainer data-parallel under torchrun (gloo), one single-threaded process per
``--threads``; "without oneDNN" runs PyTorch's own convolutions (im2col and sgemm) instead of oneDNN's."""


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """One variant in this process (the heap setting is process-wide)."""
    variant = VARIANTS[args.variant]
    if not variant["keep_freed_memory"]:
        loop.keep_freed_memory = lambda _device: False
    data = load_image_folder(args.data_dir, "cifar10", per_class=args.per_class)
    config = replace(recipe(args.recipe, args.epochs), compile=bool(variant["compile"]))
    if variant.get("convolutions_alone"):
        loop.keep_freed_memory(torch.device("cpu"))
        ratios, speed = convolution_ratios(args.model, data, config.batch_size, args.epochs, args.threads)
        return {"ratios": ratios, "images_per_second": speed, "faults_per_step": None}
    flops = training_flops_per_image(args.model, data, config.batch_size)
    distributed.init_from_environment()
    torch.set_num_threads(max(1, args.threads // distributed.world_size()))
    with torch.backends.mkldnn.flags(enabled=variant.get("onednn", True)):
        ratios, speed, faults = trainer_ratios(args.model, data, config, flops, args.threads)
    return {"ratios": ratios, "images_per_second": speed, "faults_per_step": faults}


def _median_or_none(values: list[float | None]) -> float | None:
    known = [value for value in values if value is not None]
    return statistics.median(known) if known else None


def _faults(per_step: float | None) -> str:
    return "no training steps" if per_step is None else f"{per_step:.0f} page faults a step"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--data-dir", type=Path, default=CIFAR_JPEG, help="CIFAR-10 JPEG folder or .tar.gz")
    parser.add_argument("--per-class", type=int, default=256, help="training images per class (an epoch)")
    parser.add_argument("--epochs", type=int, default=3,
                        help="epochs per process, the first not timed (convolutions alone: timed repeats)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; medians are printed")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads for everything")
    parser.add_argument("--recipe", default="fast", help="training recipe (batch size, optimiser)")
    parser.add_argument("--profile", type=int, default=0, metavar="ROWS", help="print an eager operator profile")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS), metavar="NAME",
                        help=f"the variants to run, the first the baseline (default: all: {', '.join(VARIANTS)})")
    parser.add_argument("--variant", choices=sorted(VARIANTS), help=argparse.SUPPRESS)  # one measurement
    args = parser.parse_args()
    if args.epochs < 2 or args.rounds < 1 or args.threads < 1 or args.rounds * (args.epochs - 1) < 2:
        sys.exit("error: --epochs must be >= 2, --rounds and --threads >= 1, with two timed epochs in all")
    torch.set_num_threads(args.threads)
    try:
        if args.variant is not None:
            result = measure(args)
            if distributed.is_main():
                print(json.dumps(result))
            return
        data = load_image_folder(args.data_dir, "cifar10", per_class=args.per_class)
        config = recipe(args.recipe, args.epochs)
    except InputError as err:
        sys.exit(f"error: {err}")
    flops = training_flops_per_image(args.model, data, config.batch_size)
    print(f"{args.model}: {flops / 1e6:.1f} MFLOP per training image, batch {config.batch_size}, "
          f"{data.train_labels.numel()} real images an epoch, {args.threads} threads; each variant in a fresh "
          "process", flush=True)
    results: dict[str, list[dict[str, Any]]] = {name: [] for name in args.variants}
    for round_index in range(args.rounds):
        for name in args.variants:
            variant = VARIANTS[name]
            launcher = [sys.executable]
            if variant.get("data_parallel"):
                processes = ["--nproc-per-node", str(args.threads)]
                launcher += ["-m", "torch.distributed.run", "--standalone", *processes]
            command = [*launcher, __file__, "--variant", name, *sys.argv[1:]]
            done = subprocess.run(command, check=False, capture_output=True, text=True)
            if done.returncode != 0:
                sys.exit(f"error: the {name!r} measurement failed:\n{done.stderr[-2000:]}")
            result = json.loads(done.stdout.strip().splitlines()[-1])
            results[name].append(result)
            print(f"round {round_index + 1} {name}: {result['images_per_second']:.0f} images/s, "
                  f"{' '.join(f'{r:.2f}' for r in result['ratios'])} of the bracketing sgemm, "
                  f"{_faults(result['faults_per_step'])}", flush=True)
    baseline = statistics.median(r["images_per_second"] for r in results[args.variants[0]])
    for name, rows in results.items():
        speed = statistics.median(r["images_per_second"] for r in rows)
        ratios = [ratio for r in rows for ratio in r["ratios"]]
        print(f"median {name}: {speed:.0f} images/s ({speed / baseline:.2f}x the first), "
              f"{statistics.median(ratios):.2f} of the bracketing sgemm (quartiles "
              f"{' - '.join(f'{q:.2f}' for q in statistics.quantiles(ratios, n=4)[::2])}, "
              f"{len(ratios)} timings), {_faults(_median_or_none([r['faults_per_step'] for r in rows]))}")
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as profiler:
            train(build_model(args.model, data.input_shape[0], data.num_classes), data, config)
        print(profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.profile))


if __name__ == "__main__":
    main()

"""Paper vs adaptive pruning schedule: trainings, wall time, final density, validation and test accuracy.

Every search decides matching on a validation split held out from the training images (the default of
``ticketguard find``); only the schedule differs, each with its own default ratios unless --ratios gives one list
for both. Searches are resumable folders under --out, so an interrupted
benchmark picks up where it stopped (a resumed search's seconds count only the trainings run after the restart).

    OMP_NUM_THREADS=1 python benchmarks/search_schedules.py --data digits --seeds 0,1,2 --jobs 2
    OMP_NUM_THREADS=1 python benchmarks/search_schedules.py --data cifar10 \\
        --data-dir ../shared/datasets/cifar10-jpeg/cifar10-jpeg.tar.gz --per-class 100 --epochs 3 \\
        --schedule onecycle --rewind-epoch 1 --ratios 0.5,0.2,0.1,0.05,0.01 --seeds 0,1,2 --jobs 2
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from ticketguard.data import ImageData, dataset_spec, load_dataset
from ticketguard.data.cifar import load_image_folder
from ticketguard.search.config import SearchConfig
from ticketguard.search.imp import find_extreme_ticket
from ticketguard.search.jobs import run_jobs
from ticketguard.search.schedules import SCHEDULES
from ticketguard.training.loop import TrainConfig


def load(data: str, data_dir: str | None, per_class: int | None) -> ImageData:
    if data == "digits":
        return load_dataset("digits")
    return load_image_folder(Path(data_dir), name=data, per_class=per_class)


def search(data_args: dict[str, Any], config: SearchConfig, out: Path, device: str) -> dict[str, Any]:
    """One search into ``out``; its numbers from the ticket (a finished search is read back, not rerun)."""
    data = load(**data_args)
    started = time.perf_counter()
    ticket = find_extreme_ticket(data, config, out, torch.device(device))
    found = ticket.metadata["search"]
    best = found["history"][found["best_round"]]
    return {
        "schedule": config.pruning_schedule, "seed": config.train.seed, "trainings": found["trainings"],
        "seconds": found["seconds"], "wall": time.perf_counter() - started, "density": ticket.mask.density(),
        "counts": found["counts"], "stopped_by": found["stopped_by"], "margin": found["validation"]["margin"],
        "validation_images": found["validation"]["images"],
        "dense_validation": found["validation"]["dense_accuracy"], "validation": best["validation_accuracy"],
        "dense_test": ticket.metadata["dense_accuracy"], "test": ticket.accuracy,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="digits", choices=["digits", "cifar10"])
    parser.add_argument("--data-dir", default=None, help="the CIFAR-10 JPEG folder or archive")
    parser.add_argument("--per-class", type=int, default=None, help="CIFAR-10: training and test images per class")
    parser.add_argument("--epochs", type=int, default=None, help="epochs per training (default: the data set's)")
    parser.add_argument("--rewind-epoch", type=int, default=SearchConfig.rewind_epoch)
    parser.add_argument("--schedule", default="step", help="learning-rate schedule: step or onecycle")
    parser.add_argument("--ratios", default=None, help="largest first (default: each schedule's own)")
    parser.add_argument("--validation-fraction", type=float, default=SearchConfig.validation_fraction)
    parser.add_argument("--confidence", type=float, default=SearchConfig.confidence)
    parser.add_argument("--max-rounds", type=int, default=SearchConfig.max_rounds)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--schedules", default=",".join(SCHEDULES))
    parser.add_argument("--jobs", type=int, default=1, help="searches run at once (one core each on a CPU)")
    parser.add_argument("--out", type=Path, default=Path("runs/search-schedules"))
    args = parser.parse_args()

    epochs = args.epochs or dataset_spec(args.data).default_epochs
    data_args = {"data": args.data, "data_dir": args.data_dir, "per_class": args.per_class}
    jobs = []
    for kind in args.schedules.split(","):
        for seed in (int(s) for s in args.seeds.split(",")):
            config = SearchConfig(
                ratios=tuple(float(r) for r in args.ratios.split(",")) if args.ratios else (),
                rewind_epoch=args.rewind_epoch,
                max_rounds=args.max_rounds, pruning_schedule=kind, validation_fraction=args.validation_fraction,
                confidence=args.confidence,
                train=TrainConfig(epochs=epochs, seed=seed, schedule=args.schedule),
            )
            jobs.append({"data_args": data_args, "config": config, "out": args.out / args.data / kind / f"seed-{seed}"})
    started = time.perf_counter()
    rows = run_jobs(search, jobs, args.jobs)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.data}.json").write_text(json.dumps(rows, indent=2) + "\n")
    print(f"{args.data}: {len(rows)} searches in {time.perf_counter() - started:.0f} s, {args.jobs} at once")
    print("| schedule | seed | trainings | seconds | weights left | margin (points) | validation (dense) | test (dense) "
          "| spec |")
    print("|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['schedule']} | {row['seed']} | {row['trainings']} | {row['seconds']:.0f} | "
              f"{100 * row['density']:.3f} % | {100 * row['margin']:.2f} | "
              f"{100 * row['validation']:.2f} % ({100 * row['dense_validation']:.2f} %) | "
              f"{100 * row['test']:.2f} % ({100 * row['dense_test']:.2f} %) | {tuple(row['counts'])} |")
    for kind in args.schedules.split(","):
        mine = [r for r in rows if r["schedule"] == kind]
        densities = ", ".join(f"{100 * r['density']:.3f} %" for r in mine)
        margins = ", ".join(f"{100 * r['margin']:.2f}" for r in mine)
        spread = max(r["density"] for r in mine) / min(r["density"] for r in mine)
        print(f"{kind}: mean trainings {statistics.mean(r['trainings'] for r in mine):.1f}, "
              f"mean seconds {statistics.mean(r['seconds'] for r in mine):.0f}, densities {densities}, "
              f"margins {margins} points on {mine[0]['validation_images']} validation images; densest / sparsest "
              f"ticket {spread:.2f}x ({math.log(spread) / math.log(1.25):.1f} steps of r = 0.2)")


if __name__ == "__main__":
    main()

"""Figure 2 of Chen et al. (2021): test accuracy after retraining the locked ticket without its key, against
the key's relative density n_s, one line per score function; plus a random key of the same size (fake1, Fig. 5).

Finds an extreme ResNet-20 ticket (resumable, in OUT/search), then for every score and n_s splits it and
retrains the locked ticket from its rewind weights with the same protocol (fake1 adds a random key to the
EWP-locked ticket). Writes OUT/fig2.png, OUT/fig2.md and OUT/fig2.json.

    python benchmarks/fig2.py                      # digits, 10 epochs per run
    (ticketguard reproduce fig2 runs the same experiment inside the paper-reproduction report)
    python benchmarks/fig2.py --cifar --per-class 500 --epochs 30 --out runs/fig2-cifar
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from rich.table import Table

from ticketguard.cli.output import console, progress_bar
from ticketguard.core.files import atomic_path, write_json
from ticketguard.data import ImageData, load_dataset
from ticketguard.data.cifar import load_image_folder
from ticketguard.experiments.reproduce import key_density_curve, plot_key_density
from ticketguard.schemes.scores import SCORES
from ticketguard.search.config import SearchConfig
from ticketguard.search.imp import find_extreme_ticket
from ticketguard.training.loop import TrainConfig, resolve_device

SHARED = Path(__file__).resolve().parents[2] / "shared" / "datasets"
CIFAR_JPEG = SHARED / "cifar10-jpeg" / "cifar10-jpeg.tar.gz"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/fig2"))
    parser.add_argument("--cifar", action="store_true", help="CIFAR-10 JPEG subset instead of digits")
    parser.add_argument("--per-class", type=int, default=200, help="CIFAR images per class (train and test)")
    parser.add_argument("--epochs", type=int, default=10, help="epochs of every training run")
    parser.add_argument("--rewind-epoch", type=int, default=1)
    parser.add_argument("--ratios", default="0.5,0.2", help="IMP pruning-ratio schedule of the ticket search")
    parser.add_argument("--densities", default="0.01,0.02,0.05,0.1,0.2", help="key relative densities n_s")
    parser.add_argument("--scores", default=",".join(SCORES))
    parser.add_argument("--eps", type=float, default=1.0, help="eps_f in accuracy points")
    parser.add_argument("--device", default="auto")
    return parser.parse_args()


def load_data(args: argparse.Namespace) -> ImageData:
    if args.cifar:
        return load_image_folder(CIFAR_JPEG, name="cifar10", per_class=args.per_class)
    return load_dataset("digits")


def table(results: dict, densities: list[float]) -> str:
    head = "| n_s | " + " | ".join(results["without_key"]) + " | fake1 |"
    rows = [head, "|" + "---|" * (len(results["without_key"]) + 2)]
    for index, density in enumerate(densities):
        cells = [f"{100 * acc[index]:.2f}" for acc in results["without_key"].values()]
        cells.append(f"{100 * results['fake1'][index]:.2f}")
        rows.append(f"| {100 * density:g}% | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def main() -> None:
    args = parse_args()
    densities = [float(d) for d in args.densities.split(",")]
    scores = args.scores.split(",")
    device = resolve_device(args.device)
    data = load_data(args)
    config = TrainConfig(epochs=args.epochs)
    started = time.perf_counter()
    with progress_bar() as progress:
        ratios = tuple(float(r) for r in args.ratios.split(","))
        search = SearchConfig(ratios=ratios, pruning_schedule="paper", rewind_epoch=args.rewind_epoch, train=config)
        ticket = find_extreme_ticket(data, search, args.out / "search", device, progress)
        search_seconds = time.perf_counter() - started
        curve = key_density_curve(ticket, data, config, densities, scores, device, progress)
    results = {
        "dataset": data.name, "epochs": args.epochs, "eps": args.eps / 100, "ticket_accuracy": ticket.accuracy,
        **curve, "seconds": {"search": search_seconds, "total": time.perf_counter() - started},
    }
    write_json(args.out / "fig2.json", results)
    plot_key_density(curve, args.eps / 100, args.out / "fig2.png")
    markdown = table(results, densities)
    with atomic_path(args.out / "fig2.md") as tmp:
        tmp.write_text(markdown + "\n")
    summary = Table(title="Figure 2", show_header=False)
    for key in ("dataset", "dense_accuracy", "ticket_density", "ticket_accuracy", "accuracy_with_key"):
        summary.add_row(key, f"{results[key]:.4f}" if isinstance(results[key], float) else str(results[key]))
    console.print(summary)
    console.print(markdown)
    console.print(json.dumps(results["seconds"]))


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()

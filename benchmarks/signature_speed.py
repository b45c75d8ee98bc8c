"""Scheme V2 speed: placement search and embedding on ResNet-50 masks, extraction + decoding of a suspect.

The search covers every conv layer large enough for the code, every offset, 8 mask patterns and 2 polarities.
Masks come from global magnitude pruning of a freshly initialised model (no training needed for timing).

    OMP_NUM_THREADS=1 python benchmarks/signature_speed.py --model resnet50 --density 0.2
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
from collections.abc import Callable

import torch
from rich.logging import RichHandler
from rich.table import Table

from ticketguard.attacks.removal import magnitude_pruning
from ticketguard.cli.output import console
from ticketguard.core.masks import Mask, magnitude_prune, prunable_names
from ticketguard.models import build_model
from ticketguard.schemes import placement
from ticketguard.schemes import signature as scheme
from ticketguard.training.loop import state_copy


def timed(function: Callable[[], object], repeats: int) -> tuple[float, object]:
    """Median wall time over ``repeats`` calls and the last result."""
    times, result = [], None
    for _ in range(repeats):
        started = time.perf_counter()
        result = function()
        times.append(time.perf_counter() - started)
    return statistics.median(times), result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--density", type=float, default=0.2)
    parser.add_argument("--signature", default="ACME-R20-2026")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s", handlers=[RichHandler(console=console)])
    torch.manual_seed(0)
    model = build_model(args.model, 3, 10)
    weights = state_copy(model)
    mask = magnitude_prune(weights, Mask.ones_like(weights, prunable_names(model)), 1 - args.density)
    codes = placement.qr_codes(args.signature)
    k = scheme.DEFAULT_WEIGHTS_PER_CONNECTION
    layers = placement.candidate_layers(mask, codes[0].spec.size, k)
    all_layers = placement.candidate_layers(mask, codes[0].spec.size)
    search_s, _ = timed(lambda: placement.search_placements(mask, codes, weights_per_connection=k), args.repeats)
    search_all_s, _ = timed(lambda: placement.search_placements(mask, codes), args.repeats)
    embed_s, (new, signature, _) = timed(
        lambda: scheme.embed_signature(mask, weights, weights, args.signature), args.repeats
    )
    suspect = {n: t * new[n] if n in new else t for n, t in weights.items()}
    extract_s, clean = timed(lambda: scheme.extract(suspect, signature), args.repeats * 4)
    pruned, _ = magnitude_pruning(suspect, new, fraction=0.3)
    pruned_s, damaged = timed(lambda: scheme.extract(pruned, signature), args.repeats * 4)
    table = Table(
        title=f"{args.model}, {100 * args.density:.0f}% weights left, {len(layers)} layers with kernels "
        f">= {k} weights ({len(all_layers)} large enough in all), "
        f"QR v{signature.version}-{signature.error}, {torch.get_num_threads()} thread(s)"
    )
    table.add_column("step")
    table.add_column("median s", justify="right")
    table.add_column("result")
    table.add_row(
        f"placement search, {len(layers)} layers (default)", f"{search_s:.3f}", signature.regions[0].layer
    )
    table.add_row(f"placement search, all {len(all_layers)} layers", f"{search_all_s:.3f}", "")
    table.add_row(
        "embed (search + write + compensate)", f"{embed_s:.3f}", f"density kept: {new.kept() == mask.kept()}"
    )
    table.add_row(
        "extract + decode, clean", f"{extract_s:.4f}", f"{clean.decoded.text} ({clean.decoded.method})"
    )
    table.add_row(
        "extract + decode, 30% magnitude-pruned",
        f"{pruned_s:.4f}",
        f"{damaged.decoded.text} ({damaged.decoded.method}), match {100 * damaged.match_rate:.1f}%",
    )
    console.print(table)


if __name__ == "__main__":
    main()

"""Models named by import path (the test zoo's CNN, MLP and transformer encoder) against one owner's claim per
architecture: the owner's protected ticket and independently trained tickets of the same architecture, each
as it is, pruned to half its weights, with every zero filled with 1e-8 and fine-tuned for 2 epochs, then
permuted and rescaled along every channel symmetry its traced forward shows, and verified. Prints per
architecture and variant the owner's copy (verdict and p-values) and the innocents' false claims with the
smallest p-value per piece of evidence; writes every row to OUT/rows.json.

    OMP_NUM_THREADS=2 nice -n 5 python benchmarks/any_model_false_claims.py --seeds 10 \\
        --out benchmarks/results/any-model-false-claims

Owner (seed 0) and innocents (seeds 1..N) come from the same quick search (one IMP round at r = 0.5 after 4
epochs on the digits, the search the import-path tests use); the owner is then protected with V2 + V3.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the zoo lives with the tests

from ticketguard import (
    SearchConfig,
    TrainConfig,
    TriggerConfig,
    attack,
    find_extreme_ticket,
    keyed_trigger_for,
    load_subset,
    protect,
    trust_model_code,
)
from ticketguard.cli.output import console
from ticketguard.core.files import atomic_path
from ticketguard.models import build_model
from ticketguard.models.symmetries import channel_symmetries, permute_channels, scale_channels
from ticketguard.verification.verify import verify

ARCHITECTURES = ("tests.zoo:small_cnn", "tests.zoo:mlp", "tests.zoo:tiny_transformer")
VARIANTS = ("as trained", "pruned to half", "zeros filled with 1e-8", "fine-tuned 2 epochs")
FILL = 1e-8


def variant(
    weights: dict[str, torch.Tensor], mask, name: str, data, architecture: str
) -> dict[str, torch.Tensor]:
    """The ticket's weights as a thief (or an innocent's own later training) might leave them."""
    if name == "pruned to half":
        return attack(weights, mask, "magnitude:fraction=0.5")[0]
    if name == "zeros filled with 1e-8":
        return {
            k: torch.where(t == 0, torch.full_like(t, FILL), t) if k in mask else t
            for k, t in weights.items()
        }
    if name == "fine-tuned 2 epochs":
        return attack(weights, mask, "finetune:epochs=2", data=data, architecture=architecture)[0]
    return dict(weights)


def quick_ticket(architecture: str, data, seed: int, workdir: Path):
    config = SearchConfig(
        model=architecture,
        ratios=(0.5,),
        max_rounds=1,
        rewind_epoch=1,
        decide_on="test",
        validation_fraction=0.0,
        train=TrainConfig(epochs=4, seed=seed),
    )
    return find_extreme_ticket(data, config, workdir)


def disguised(weights: dict[str, torch.Tensor], architecture: str, seed: int) -> dict[str, torch.Tensor]:
    """Every traced symmetry permuted, every rescalable one rescaled by factors in [1/e, e]."""
    symmetries = channel_symmetries(build_model(architecture, 1, 10))
    generator = torch.Generator().manual_seed(seed)
    moved = permute_channels(
        weights, symmetries, {s.name: torch.randperm(s.size, generator=generator) for s in symmetries}
    )
    for symmetry in symmetries:
        if symmetry.scaling is not None:
            factors = torch.exp(2 * torch.rand(symmetry.size, generator=generator) - 1)
            moved = scale_channels(moved, symmetry, factors)
    return moved


def row(architecture: str, who: str, kind: str, seed: int, verdict) -> dict:
    return {
        "architecture": architecture,
        "who": who,
        "variant": kind,
        "seed": seed,
        "owned": verdict.owned,
        "p_values": {e.name: e.p_value for e in verdict.evidence},
        "mean_overlap": verdict.details.get("alignment", {}).get("mean_overlap"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=10, help="innocent tickets per architecture")
    parser.add_argument("--out", type=Path, required=True, help="folder for rows.json")
    args = parser.parse_args()
    if args.seeds < 1:
        parser.error(f"--seeds must be at least 1, got {args.seeds}")
    data = load_subset("digits")
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for architecture in ARCHITECTURES:
            trust_model_code(architecture)
            owner = quick_ticket(architecture, data, 0, Path(folder) / architecture / "owner")
            trigger = TriggerConfig(keyed_trigger_for(owner, 9))
            protected = protect(owner, data, signature="ACME", trigger=trigger)
            owned = protected.ticket
            for kind in VARIANTS:
                copy = disguised(
                    variant(dict(owned.weights), owned.mask, kind, data, architecture), architecture, 0
                )
                verdict = verify(copy, protected.claim, model=architecture)
                rows.append(row(architecture, "owner", kind, 0, verdict))
            for seed in range(1, args.seeds + 1):
                innocent = quick_ticket(architecture, data, seed, Path(folder) / architecture / f"seed{seed}")
                weights = {
                    k: t * innocent.mask[k] if k in innocent.mask else t for k, t in innocent.weights.items()
                }
                for kind in VARIANTS:
                    copy = disguised(
                        variant(weights, innocent.mask, kind, data, architecture), architecture, seed
                    )
                    verdict = verify(copy, protected.claim, model=architecture)
                    rows.append(row(architecture, "innocent", kind, seed, verdict))
            report(architecture, [r for r in rows if r["architecture"] == architecture])
    args.out.mkdir(parents=True, exist_ok=True)
    with atomic_path(args.out / "rows.json") as path:
        path.write_text(json.dumps(rows, indent=1))


def report(architecture: str, rows: list[dict]) -> None:
    for kind in VARIANTS:
        owners = [r for r in rows if r["who"] == "owner" and r["variant"] == kind]
        innocents = [r for r in rows if r["who"] == "innocent" and r["variant"] == kind]
        for r in owners:
            p_values = ", ".join(f"{k} {v:.2g}" for k, v in r["p_values"].items() if v is not None)
            console.print(f"{architecture}, {kind}: owner's copy owned={r['owned']} ({p_values})")
        smallest = {}
        for r in innocents:
            for name, p in r["p_values"].items():
                if p is not None:
                    smallest[name] = min(p, smallest.get(name, 1.0))
        claims = sum(r["owned"] for r in innocents)
        shown = ", ".join(f"{k} {v:.3g}" for k, v in smallest.items())
        console.print(
            f"{architecture}, {kind}: {claims} false claims in {len(innocents)}; smallest p: {shown}"
        )


if __name__ == "__main__":
    main()

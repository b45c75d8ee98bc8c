"""Time to align and verify a disguised suspect: ResNet-20, ResNet-18 and ResNet-50 with a QR signature in a
30 % mask, permuted and rescaled, read from a safetensors file; the undisguised copy is timed beside it.

    python benchmarks/verify_speed.py
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from ticketguard import Claim, attack
from ticketguard.cli.output import console
from ticketguard.core.files import save_tensors
from ticketguard.core.masks import Mask, magnitude_prune, prunable_names
from ticketguard.models import build_model
from ticketguard.schemes.signature import embed_signature
from ticketguard.training.loop import state_copy
from ticketguard.verification.align import Reference
from ticketguard.verification.verify import verify


def protected(name: str) -> tuple[dict[str, torch.Tensor], Mask, Claim]:
    """A random-init model of ``name`` with a 30 % magnitude mask carrying a QR signature, and its claim."""
    torch.manual_seed(0)
    model = build_model(name, 3, 10)
    weights = state_copy(model)
    mask = magnitude_prune(weights, Mask.ones_like(weights, prunable_names(model)), 0.7)
    mask, signature, _ = embed_signature(mask, weights, weights, "ACME-2026")
    weights = {n: t * mask[n] if n in mask else t for n, t in weights.items()}
    return weights, mask, Claim(signature, {}, reference=Reference.of(name, 3, 10, weights, mask))


def timed(path: Path, claim: Claim, repeats: int) -> tuple[float, bool]:
    best, owned = float("inf"), False
    for _ in range(repeats):
        started = time.perf_counter()
        owned = verify(path, claim).owned
        best = min(best, time.perf_counter() - started)
    return best, owned


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    console.print(f"torch threads: {torch.get_num_threads()}")
    console.print("| model | undisguised: verify | permute+rescale: align + verify | ratio | shown |")
    console.print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as folder:
        for name in ("resnet20", "resnet18", "resnet50"):
            weights, mask, claim = protected(name)
            plain, stolen = Path(folder) / f"{name}.safetensors", Path(folder) / f"{name}-stolen.safetensors"
            save_tensors(plain, weights)
            save_tensors(stolen, attack(weights, mask, "permute:seed=1+rescale:seed=2")[0])
            plain_s, plain_owned = timed(plain, claim, args.repeats)
            stolen_s, stolen_owned = timed(stolen, claim, args.repeats)
            console.print(f"| {name} | {plain_s:.2f} s | {stolen_s:.2f} s | {stolen_s / plain_s:.2f} | "
                          f"{'yes' if plain_owned and stolen_owned else 'NO'} |")


if __name__ == "__main__":
    main()

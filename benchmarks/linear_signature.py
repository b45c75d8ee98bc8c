"""How a V2 code in a linear layer survives global magnitude pruning, with and without raising its weights.

An MLP (64-256-256-10) is trained on digits, pruned to a 30 % mask, signed (the code lands in a linear layer,
one weight per connection), retrained on its mask, and then pruned again by 10-50 % of its kept weights. Each
rule is applied to the same retrained weights: none, or ``raise_code_weights`` at two pruning fractions.

    python benchmarks/linear_signature.py
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from ticketguard import load_subset
from ticketguard.core.masks import Mask, magnitude_prune
from ticketguard.data import ImageData
from ticketguard.schemes import signature as v2
from ticketguard.training.loop import TrainConfig, evaluate, state_copy, train

PAYLOAD = "ACME-MLP-2026"
ATTACKS = (0.1, 0.2, 0.3, 0.5)
RULES = {"no rule": None, "raise @20 %": 0.2, "raise @50 % (default)": v2.RAISE_FRACTION}


def mlp() -> nn.Module:
    return nn.Sequential(
        nn.Flatten(), nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10)
    )


def signed_mlp(data: ImageData, seed: int, epochs: int) -> tuple[nn.Module, Mask, v2.Signature]:
    """Dense training, a 30 % global magnitude mask, the code embedded, and retraining on the signed mask."""
    torch.manual_seed(seed)
    model = mlp()
    config = TrainConfig(epochs=epochs, lr=0.05, schedule="onecycle", seed=seed)
    train(model, data, config)
    weights = state_copy(model)
    names = [n for n, t in weights.items() if t.dim() == 2]
    mask = magnitude_prune(weights, Mask.ones_like(weights, names), 0.7)
    mask, signature, _ = v2.embed_signature(mask, weights, weights, PAYLOAD)
    model.load_state_dict({n: t * mask[n] if n in mask else t for n, t in weights.items()})
    train(model, data, config, mask)
    return model, mask, signature


def attacked(model: nn.Module, weights: dict[str, torch.Tensor], mask: Mask, fraction: float,
             data: ImageData, signature: v2.Signature) -> tuple[bool, float, float]:
    """(decodes, share of the code's kept modules left, test accuracy) after pruning ``fraction``."""
    pruned = magnitude_prune(weights, mask, fraction) if fraction else mask
    suspect = {n: t * pruned[n] if n in pruned else t for n, t in weights.items()}
    reading = v2.extract(suspect, signature)
    wanted = reading.expected == signature.kept_is_dark
    left = float((reading.copies[0][wanted] == signature.kept_is_dark).mean())
    model.load_state_dict(suspect)
    return reading.decoded.text == PAYLOAD, left, evaluate(model, data)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=20)
    args = parser.parse_args()
    started = time.perf_counter()
    data = load_subset("digits")
    results: dict[tuple[str, float], list[tuple[bool, float, float]]] = {}
    hosts = []
    for seed in range(args.seeds):
        model, mask, signature = signed_mlp(data, seed, args.epochs)
        hosts.append(signature.regions[0].layer)
        trained = state_copy(model)
        for rule, fraction in RULES.items():
            weights = trained if fraction is None else v2.raise_code_weights(trained, mask, signature,
                                                                              fraction)
            for attack in (0.0, *ATTACKS):
                results.setdefault((rule, attack), []).append(
                    attacked(model, weights, mask, attack, data, signature)
                )
    print(f"MLP 64-256-256-10 on digits, 30 % mask, {args.seeds} seeds, code in {sorted(set(hosts))}; "
                  "each cell: decodes (of seeds) / code modules left / test accuracy")
    print("| magnitude pruning | " + " | ".join(RULES) + " |")
    print("|---|" + "---|" * len(RULES))
    for attack in (0.0, *ATTACKS):
        cells = []
        for rule in RULES:
            runs = results[rule, attack]
            decoded = sum(r[0] for r in runs)
            left = 100 * sum(r[1] for r in runs) / len(runs)
            accuracy = 100 * sum(r[2] for r in runs) / len(runs)
            cells.append(f"{decoded}/{len(runs)} / {left:.1f} % / {accuracy:.1f} %")
        print(f"| {100 * attack:.0f} % | " + " | ".join(cells) + " |")
    print(f"wall time {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()

"""What a forger pays: search rate of payloads against a published ticket, and the trials the decision rule demands.

A forger holding the owner's published model writes a claim of his own: he picks a payload, finds the placement
(layer, offset, QR mask pattern, polarity) where its code agrees most with the published mask, and hopes the
match rate alone reaches the threshold. One trial is one payload with its best placement over the whole
search space, found with the same FFT correlation the owner uses. The corrected p-value bounds the chance that
one trial reaches it, so the expected number of trials to reach a level is at least 1 / level.

A keyed trigger claim is searched the same way: one trial renders the 100 trigger images of a seed and asks the
published model for their labels once; its trigger p-value bounds one seed's chance. A folder trigger set costs
nothing to forge (its labels are the model's own answers), so it never decides without a trusted time.

    python benchmarks/forgery_cost.py --trials 200 --seeds 2000
"""

from __future__ import annotations

import argparse
import secrets
import string
import tempfile
import time
from pathlib import Path

import numpy as np

from ticketguard import SearchConfig, TrainConfig, find_extreme_ticket, load_subset
from ticketguard.cli.output import console
from ticketguard.core.evidence import DEFAULT_ALPHA, FORGERY_LEVEL, FORGERY_TRIALS
from ticketguard.core.masks import squeeze
from ticketguard.core.stats import match_p_value
from ticketguard.data.triggers import keyed_trigger_set
from ticketguard.models import build_model
from ticketguard.schemes import trigger as v3
from ticketguard.schemes.placement import (
    POLARITIES,
    candidate_layers,
    placement_costs,
    placement_count,
    qr_codes,
)

SECONDS_PER_YEAR = 365.25 * 24 * 3600


def best_p_value(weights: dict, layers: list[str], payload: str) -> float:
    """The forger's best corrected p-value for one payload over every layer, offset, pattern and polarity."""
    codes = qr_codes(payload)
    spectra: dict = {}  # template spectra per layer shape, for this payload's codes
    n = len(codes[0].data_positions)
    dark = [int(code.data_modules.sum()) for code in codes]
    best = 1.0
    for name in layers:
        squeezed = squeeze(weights[name] != 0)
        density = float(squeezed.float().mean())
        as_dark = placement_costs(squeezed, codes, spectra).flatten(1)  # changes needed = n - matches
        for pattern, kept_is_dark in ((p, k) for p in range(len(codes)) for k in POLARITIES):
            changes = as_dark[pattern].min() if kept_is_dark else n - as_dark[pattern].max()
            wanted = dark[pattern] if kept_is_dark else n - dark[pattern]
            p_value, _ = match_p_value(n - int(changes), [wanted], [n - wanted], [density])
            best = min(best, p_value)
    return min(1.0, best * placement_count(weights, codes[0].spec.size, 1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--seeds", type=int, default=2000, help="keyed trigger seeds a forger grinds")
    args = parser.parse_args()
    data = load_subset("digits")
    search = SearchConfig(ratios=(0.2,), pruning_schedule="paper", max_rounds=args.rounds, rewind_epoch=1, train=TrainConfig(epochs=args.epochs))
    with tempfile.TemporaryDirectory() as workdir:
        ticket = find_extreme_ticket(data, search, Path(workdir))
    weights = {name: ticket.weights[name] * ticket.mask[name] for name in ticket.mask}
    layers = candidate_layers(ticket.mask, qr_codes("ACME-R20-2026")[0].spec.size)
    alphabet = string.ascii_uppercase + string.digits + "-"
    started = time.perf_counter()
    p_values = [
        best_p_value(weights, layers, "".join(secrets.choice(alphabet) for _ in range(13)))
        for _ in range(args.trials)
    ]
    seconds = time.perf_counter() - started
    rate = args.trials / seconds
    console.print(f"published ticket: ResNet-20 on digits, {100 * ticket.mask.density():.2f}% weights left, "
                  f"{len(layers)} candidate layers")
    console.print(f"{args.trials} forged payloads (13 characters, best placement each) in {seconds:.1f} s: "
                  f"{rate:.1f} trials/s on this CPU")
    console.print(f"smallest corrected p-value reached: {min(p_values):.3g}; median {np.median(p_values):.3g}")
    for name, level in (("alpha alone (1e-6)", DEFAULT_ALPHA), ("forgery level 2^-64", FORGERY_LEVEL)):
        trials = 1 / level
        console.print(f"{name}: >= {trials:.3g} trials expected, {trials / rate / SECONDS_PER_YEAR:.3g} years at "
                      f"this rate, {trials / (rate * 1e6) / SECONDS_PER_YEAR:.3g} years on a million such CPUs")
    console.print(f"rule: evidence that does not decode passes only at p <= 2^-64 = {FORGERY_LEVEL:.3g} "
                  f"({FORGERY_TRIALS} trials)")
    seed_rate, smallest = grind_trigger_seeds(ticket, data, args.seeds)
    console.print(f"{args.seeds} keyed trigger seeds (100 images each, one forward pass) at {seed_rate:.1f} seeds/s; "
                  f"smallest trigger p-value {smallest:.3g}")
    for name, level in (("alpha alone (1e-6)", DEFAULT_ALPHA), ("forgery level 2^-64", FORGERY_LEVEL)):
        seeds = 1 / level
        console.print(f"keyed trigger at {name}: >= {seeds:.3g} seeds expected, "
                      f"{seeds / seed_rate / SECONDS_PER_YEAR:.3g} years at this rate, "
                      f"{seeds / (seed_rate * 1e6) / SECONDS_PER_YEAR:.3g} years on a million such CPUs")


def grind_trigger_seeds(ticket, data, seeds: int) -> tuple[float, float]:
    """Seeds per second and the smallest trigger p-value a forger reaches on the published model."""
    model = build_model(ticket.architecture, ticket.in_channels, ticket.num_classes)
    model.load_state_dict(ticket.weights)
    model.eval()
    mean, std = data.channel_stats()
    started, smallest = time.perf_counter(), 1.0
    for seed in range(seeds):
        trigger = keyed_trigger_set(seed, 100, ticket.num_classes, ticket.in_channels, ticket.input_size)
        smallest = min(smallest, v3.verify_local(model, trigger, mean, std, ticket.num_classes).p_value)
    return seeds / (time.perf_counter() - started), smallest


if __name__ == "__main__":
    main()

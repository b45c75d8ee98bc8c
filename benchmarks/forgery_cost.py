"""What a forger pays: search rate of payloads against a published ticket, and the trials the decision rule demands.

A forger holding the owner's published model writes a claim of his own: he picks a payload, finds the placement
(layer, offset, QR mask pattern, polarity) where its code agrees most with the published mask, and hopes the
match rate alone reaches the threshold. One trial is one payload with its best placement over the whole
search space, found with the same FFT correlation the owner uses. The corrected p-value bounds the chance that
one trial reaches it, so the expected number of trials to reach a level is at least 1 / level.

    python benchmarks/forgery_cost.py --trials 200
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
from ticketguard.evidence import DEFAULT_ALPHA, FORGERY_LEVEL, FORGERY_TRIALS
from ticketguard.masks import squeeze
from ticketguard.schemes.placement import (
    POLARITIES,
    candidate_layers,
    placement_costs,
    placement_count,
    qr_codes,
)
from ticketguard.schemes.signature import match_p_value

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


if __name__ == "__main__":
    main()

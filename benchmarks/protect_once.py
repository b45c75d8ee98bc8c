"""One retraining (protect: V2 + V3 together) against the old two-step flow (embed retrains, then watermark
retrains again from W_k), side by side on the same digits ticket: accuracy, trigger accuracy, trainings, time.

    python benchmarks/protect_once.py --rounds 4 --epochs 20
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from ticketguard import SearchConfig, TrainConfig, find_extreme_ticket, load_subset
from ticketguard.cli.output import console
from ticketguard.protect import TriggerConfig, keyed_trigger_for, protect
from ticketguard.verification.verify import verify


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--per-batch", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    data = load_subset("digits")
    train = TrainConfig(epochs=args.epochs, seed=args.seed)
    search = SearchConfig(ratios=(0.2,), max_rounds=args.rounds, rewind_epoch=1, train=train)
    with tempfile.TemporaryDirectory() as workdir:
        ticket = find_extreme_ticket(data, search, Path(workdir))
    trigger = TriggerConfig(keyed_trigger_for(ticket, 2021), args.per_batch)

    started = time.perf_counter()
    once = protect(ticket, data, signature="ACME-R20-2026", trigger=trigger, train_config=train)
    once_s = time.perf_counter() - started

    started = time.perf_counter()
    signed = protect(ticket, data, signature="ACME-R20-2026", train_config=train)
    twice = protect(signed.ticket, data, trigger=trigger, train_config=train, existing=signed.claim.signature)
    twice_s = time.perf_counter() - started

    console.print(f"ticket: {100 * ticket.mask.density():.2f}% weights left, accuracy {100 * ticket.accuracy:.2f}%")
    console.print("| flow | trainings | accuracy | trigger accuracy | QR p-value | trigger p-value | seconds |")
    console.print("|---|---|---|---|---|---|---|")
    for name, result, trainings, seconds in (("protect (one retraining)", once, 1, once_s),
                                             ("embed then watermark (old default)", twice, 2, twice_s)):
        verdict = verify(result.ticket.weights, result.claim)
        p = {e.name: e.p_value for e in verdict.evidence}
        console.print(
            f"| {name} | {trainings} | {100 * result.ticket.accuracy:.2f}% | "
            f"{100 * result.report['trigger_accuracy']:.0f}% | {p['qr-signature']:.2g} | {p['trigger']:.2g} | "
            f"{seconds:.0f} |"
        )
    console.print(f"time ratio two-step / one: {twice_s / once_s:.2f}")


if __name__ == "__main__":
    main()

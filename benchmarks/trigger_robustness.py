"""Scheme V3 on digits: accuracy cost of the watermark, and trigger accuracy after pruning and fine-tuning.

    python benchmarks/trigger_robustness.py --per-batch 1,8,32 --out runs/trigger-robustness.json

A ResNet-20 ticket is found by IMP (ratio 0.2 for ``--rounds`` rounds, late rewinding to W_1). From its W_k
the ticket is retrained twice with the same seed and schedule: once plain, once with a trigger set mixed into
every batch (WE), so the accuracy difference is the cost of the watermark alone. The marked ticket is
then attacked as in the paper's Table 5: one-shot global magnitude pruning of 5/10/20/50 % of the remaining
weights, and fine-tuning on the training data without the trigger set. Each row gives test accuracy, trigger
accuracy and the binomial p-value against the suspect's own chance level.
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path

import torch
from rich.table import Table

from ticketguard.artifacts.ticket import Ticket
from ticketguard.cli.output import console
from ticketguard.core.files import write_json
from ticketguard.core.masks import Mask, magnitude_prune
from ticketguard.data import ImageData, load_dataset
from ticketguard.data.triggers import TriggerSet, keyed_trigger_set, load_trigger_folder
from ticketguard.schemes.trigger import verify_local, watermark
from ticketguard.search.config import SearchConfig
from ticketguard.search.imp import find_extreme_ticket
from ticketguard.training.loop import TrainConfig, evaluate, train

ADI = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "adi-trigger-set"
PRUNE_FRACTIONS = (0.05, 0.1, 0.2, 0.5)


def _row(name: str, model: torch.nn.Module, data: ImageData, trigger: TriggerSet) -> dict:
    mean, std = data.channel_stats()
    evidence = verify_local(model, trigger, mean, std, data.num_classes)
    return {
        "model": name,
        "accuracy": evaluate(model, data),
        "trigger_accuracy": evidence.score,
        "p_value": evidence.p_value,
        "owned": evidence.passed,
    }


def _pruned(model: torch.nn.Module, mask: Mask, fraction: float) -> torch.nn.Module:
    attacked = copy.deepcopy(model)
    weights = {k: v.detach() for k, v in attacked.named_parameters()}
    magnitude_prune(weights, mask, fraction).apply_(attacked)
    return attacked


def _fine_tuned(
    model: torch.nn.Module, mask: Mask, data: ImageData, epochs: int, lr: float
) -> torch.nn.Module:
    attacked = copy.deepcopy(model)
    train(attacked, data, TrainConfig(epochs=epochs, lr=lr, milestones=(), seed=1), mask)
    return attacked


def _experiment(
    ticket: Ticket,
    data: ImageData,
    trigger: TriggerSet,
    kind: str,
    per_batch: int,
    config: TrainConfig,
    fine_tune: tuple[int, float],
) -> list[dict]:
    plain = ticket.build_model("rewind")
    train(plain, data, config, ticket.mask)
    marked = ticket.build_model("rewind")
    started = time.perf_counter()
    watermark(marked, data, trigger, config, ticket.mask, per_batch=per_batch)
    seconds = time.perf_counter() - started
    rows = [_row("unmarked", plain, data, trigger), _row("marked", marked, data, trigger)]
    rows += [
        _row(f"pruned {100 * f:g} %", _pruned(marked, ticket.mask, f), data, trigger) for f in PRUNE_FRACTIONS
    ]
    epochs, lr = fine_tune
    rows.append(
        _row(
            f"fine-tuned {epochs} ep lr {lr:g}",
            _fine_tuned(marked, ticket.mask, data, epochs, lr),
            data,
            trigger,
        )
    )
    return [{"trigger": kind, "per_batch": per_batch, "watermark_seconds": seconds, **row} for row in rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=8, help="IMP rounds at ratio 0.2 (density 0.8**rounds)")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--per-batch", default="1,8,32", help="trigger images per batch, comma-separated")
    parser.add_argument("--triggers", default="keyed,adi", help="keyed and/or adi")
    parser.add_argument("--fine-tune-epochs", type=int, default=10)
    parser.add_argument("--fine-tune-lr", type=float, default=0.01)
    parser.add_argument("--out", type=Path, default=None, help="JSON file for the rows")
    args = parser.parse_args()
    data = load_dataset("digits")
    config = TrainConfig(epochs=args.epochs)
    with tempfile.TemporaryDirectory() as workdir:
        search = SearchConfig(ratios=(0.2,), pruning_schedule="paper", max_rounds=args.rounds, rewind_epoch=1, train=config)
        ticket = find_extreme_ticket(data, search, workdir, torch.device("cpu"))
    console.print(
        f"ticket: {100 * ticket.mask.density():.2f} % of prunable weights, accuracy "
        f"{100 * (ticket.accuracy or 0):.2f} %"
    )
    triggers = {
        "keyed": keyed_trigger_set(2021, 100, data.num_classes, 1, (8, 8)),
        "adi": load_trigger_folder(ADI, 1, (8, 8), num_classes=data.num_classes),
    }
    rows = []
    for kind in args.triggers.split(","):
        for per_batch in (int(k) for k in args.per_batch.split(",")):
            rows += _experiment(
                ticket,
                data,
                triggers[kind],
                kind,
                per_batch,
                config,
                (args.fine_tune_epochs, args.fine_tune_lr),
            )
    table = Table(title=f"Scheme V3 on digits, ResNet-20 at {100 * ticket.mask.density():.2f} % density")
    for column in ("trigger", "per batch", "model", "test acc", "trigger acc", "p-value", "owned"):
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(
            row["trigger"],
            str(row["per_batch"]),
            row["model"],
            f"{100 * row['accuracy']:.2f} %",
            f"{100 * row['trigger_accuracy']:.0f} %",
            f"{row['p_value']:.1e}",
            "yes" if row["owned"] else "no",
        )
    console.print(table)
    if args.out is not None:
        write_json(args.out, {"density": ticket.mask.density(), "epochs": args.epochs, "rows": rows})


if __name__ == "__main__":
    main()

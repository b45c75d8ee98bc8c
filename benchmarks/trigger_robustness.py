"""Scheme V3 on digits: accuracy cost of the watermark, and trigger accuracy after pruning, fine-tuning (SGD and
Adam) and the free disguises of the trigger check (relabelled classes, inputs scaled by 255, normalisation
folded into the network).

    OMP_NUM_THREADS=1 python benchmarks/trigger_robustness.py --settings default,default:0.05,8 --seeds 3 \
        --innocents 3 \
        --out runs/trigger-robustness.json

A ResNet-20 ticket is found by IMP (ratio 0.2 for ``--rounds`` rounds, late rewinding to W_1). From its W_1 the
ticket is retrained with the same schedule once plain and once per trigger setting with the trigger set mixed
into every batch (WE), for each of ``--seeds`` training seeds, so the accuracy difference at equal seed is the
cost of the watermark alone. A setting is PER_BATCH[:NOISE]: trigger images per batch ("default": the
library's, ``protect.default_per_batch``) and the weight noise of the smoothing pass (``schemes.trigger.
SmoothedTriggerLoss``; 0, none, unless given). The
marked ticket is then attacked as in the paper's Table 5 (one-shot global magnitude pruning of 5/10/20/50 % of
the remaining weights; fine-tuning with SGD on the training data without the trigger set) and as a thief with
Adam would (``--adam-epochs`` at ``--adam-lr``, once with the mask kept and once dense, every weight free), and
disguised: its classifier rows permuted, its stem divided by 255 (the copy expects inputs 255 times larger), and
the normalisation folded into its stem and first BatchNorm (the copy takes raw pixels in [0, 1]).
Each row gives test accuracy, the agreement on T of the reading that decided (as labelled, or under the best
relabelling), the p-value (both readings and the relabelling search in the null) and the input scale and shift read off
the suspect. ``--innocents`` more tickets trained from other seeds without T give the agreement of models that
never saw it.
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path
from statistics import mean

import torch
from rich.table import Table

from ticketguard.artifacts.ticket import Ticket
from ticketguard.attacks.disguises import take_other_units
from ticketguard.attacks.removal import fine_tuning
from ticketguard.cli.output import console
from ticketguard.core.evidence import FORGERY_LEVEL
from ticketguard.core.files import write_json
from ticketguard.core.masks import Mask, magnitude_prune
from ticketguard.data import ImageData, load_dataset
from ticketguard.data.triggers import TriggerSet, keyed_trigger_set, load_trigger_folder
from ticketguard.models import build_model
from ticketguard.protect import default_per_batch
from ticketguard.schemes.trigger import verify_local, watermark
from ticketguard.search.config import SearchConfig
from ticketguard.search.imp import find_extreme_ticket
from ticketguard.training.loop import TrainConfig, evaluate, state_copy, train

ADI = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "adi-trigger-set"
PRUNE_FRACTIONS = (0.05, 0.1, 0.2, 0.5)
RELABELLING = torch.tensor([3, 7, 0, 9, 1, 6, 2, 8, 5, 4])  # a fixed permutation of the ten classes


def _row(name: str, model: torch.nn.Module, data: ImageData, trigger: TriggerSet) -> dict:
    mean_, std = data.channel_stats()
    evidence = verify_local(model.eval(), trigger, mean_, std, data.num_classes)
    return {
        "model": name,
        "accuracy": evaluate(model, data),
        "trigger_accuracy": evidence.score,
        "as_labelled": evidence.details["as_labelled"]["agreed"] / len(trigger),
        "relabelled": evidence.details["relabelled"],
        "input_scale": evidence.details["input_scale"],
        "input_shift": evidence.details["input_shift"],
        "p_value": evidence.p_value,
        "owned": evidence.passed,
        "owned_at_forgery_level": evidence.p_value <= FORGERY_LEVEL,
    }


def _pruned(model: torch.nn.Module, mask: Mask, fraction: float) -> torch.nn.Module:
    attacked = copy.deepcopy(model)
    weights = {k: v.detach() for k, v in attacked.named_parameters()}
    magnitude_prune(weights, mask, fraction).apply_(attacked)
    return attacked


def _loaded(model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> torch.nn.Module:
    attacked = copy.deepcopy(model)
    attacked.load_state_dict(weights)
    return attacked


def _disguised(model: torch.nn.Module, how: str, data: ImageData) -> torch.nn.Module:
    """The same function under another face: classifier rows permuted, a stem that expects inputs x255, or
    the normalisation folded into the stem and its BatchNorm (the copy takes raw pixels in [0, 1])."""
    weights = state_copy(model)
    if how == "relabel":
        weights["fc.weight"], weights["fc.bias"] = weights["fc.weight"][RELABELLING], weights["fc.bias"][RELABELLING]
    elif how == "x255":
        weights["conv.weight"] = weights["conv.weight"] / 255
    else:
        channels = data.channel_stats()[0].numel()
        weights = take_other_units(weights, *data.channel_stats(), (torch.zeros(channels), torch.ones(channels)))
    return _loaded(model, weights)


def _attacks(marked: torch.nn.Module, mask: Mask, data: ImageData, args: argparse.Namespace) -> list:
    """(name, attacked model) for every attack on the marked ticket."""
    weights = state_copy(marked)
    attacked = [(f"pruned {100 * f:g} %", _pruned(marked, mask, f)) for f in PRUNE_FRACTIONS]
    sgd = copy.deepcopy(marked)
    train(sgd, data, TrainConfig(epochs=args.fine_tune_epochs, lr=args.fine_tune_lr, milestones=(), seed=1), mask)
    attacked.append((f"fine-tuned SGD {args.fine_tune_epochs} ep lr {args.fine_tune_lr:g}", sgd))
    for free in (False, True):
        tuned, _ = fine_tuning(weights, mask, data=data, epochs=args.adam_epochs, lr=args.adam_lr,
                               optimizer="adam", free=free, seed=1)
        kind = "dense" if free else "mask kept"
        attacked.append((f"Adam {args.adam_epochs} ep lr {args.adam_lr:g}, {kind}", _loaded(marked, tuned)))
    return attacked


def _disguises(marked: torch.nn.Module, data: ImageData) -> list:
    """(name, disguised model): the same function as the marked ticket under another face."""
    faces = {"classes relabelled": "relabel", "inputs x255": "x255", "takes raw pixels": "raw"}
    return [(name, _disguised(marked, how, data)) for name, how in faces.items()]


def _experiment(
    ticket: Ticket, data: ImageData, trigger: TriggerSet, kind: str, setting: str, seed: int,
    plain: dict, args: argparse.Namespace,
) -> list[dict]:
    config = TrainConfig(epochs=args.epochs, seed=seed)
    per_batch, _, noise = setting.partition(":")
    images = (
        default_per_batch(config, data.train_labels.numel(), len(trigger)) if per_batch == "default" else int(per_batch)
    )
    weight_noise = float(noise or 0)
    marked = ticket.build_model("rewind")
    started = time.perf_counter()
    watermark(marked, data, trigger, config, ticket.mask, per_batch=images, weight_noise=weight_noise)
    seconds = time.perf_counter() - started
    rows = [plain, _row("marked", marked, data, trigger)]
    rows += [_row(name, model, data, trigger) for name, model in _attacks(marked, ticket.mask, data, args)]
    # a disguise computes the marked ticket's function on the thief's inputs and labels: its accuracy is the same
    rows += [{**_row(name, model, data, trigger), "accuracy": rows[1]["accuracy"]} for name, model in _disguises(marked, data)]
    done = {"trigger": kind, "setting": setting, "images_per_batch": images, "weight_noise": weight_noise,
            "seed": seed}
    return [{**done, "watermark_seconds": seconds, **row} for row in rows]


def _innocents(ticket: Ticket, data: ImageData, triggers: dict[str, TriggerSet], args: argparse.Namespace) -> list:
    """Models that never saw T: the ticket's mask trained from fresh initialisations (other seeds)."""
    rows = []
    for seed in range(100, 100 + args.innocents):
        torch.manual_seed(seed)
        model = build_model(ticket.architecture, ticket.in_channels, ticket.num_classes)
        ticket.mask.apply_(model)
        train(model, data, TrainConfig(epochs=args.epochs, seed=seed), ticket.mask)
        rows += [{"trigger": kind, "seed": seed, **_row("innocent", model, data, trigger)}
                 for kind, trigger in triggers.items()]
    return rows


def _table(rows: list[dict], title: str) -> Table:
    table = Table(title=title)
    for column in ("trigger", "per batch", "noise", "seed", "model", "test acc", "trigger acc (as labelled)",
                   "scale", "shift", "p-value", "owned"):
        table.add_column(column, justify="right")
    for row in rows:
        agreement = f"{100 * row['trigger_accuracy']:.0f} %" + (" relabelled" if row["relabelled"] else "")
        table.add_row(
            row["trigger"], str(row.get("images_per_batch", "-")), str(row.get("weight_noise", "-")),
            str(row["seed"]), row["model"],
            f"{100 * row['accuracy']:.2f} %", f"{agreement} ({100 * row['as_labelled']:.0f} %)",
            f"{row['input_scale']:.3g}", " ".join(f"{b:.2g}" for b in row["input_shift"]), f"{row['p_value']:.1e}",
            "yes" if row["owned_at_forgery_level"] else ("at alpha" if row["owned"] else "no"),
        )
    return table


def _summary(rows: list[dict]) -> list[str]:
    """Per trigger setting, over seeds: accuracy cost, and trigger accuracy at protection and after Adam."""
    lines = []
    for setting in sorted({(r["trigger"], r["setting"]) for r in rows}):
        mine = [r for r in rows if (r["trigger"], r["setting"]) == setting]
        cost = mean(_of(mine, "unmarked", "accuracy")) - mean(_of(mine, "marked", "accuracy"))
        parts = [f"{setting[0]}, {mine[0]['images_per_batch']} per batch, weight noise {mine[0]['weight_noise']:g}",
                 f"accuracy cost {100 * cost:.2f} points",
                 f"trigger {_spread(_of(mine, 'marked', 'trigger_accuracy'))}"]
        for kind in ("mask kept", "dense"):
            after = [r for r in mine if r["model"].startswith("Adam") and r["model"].endswith(kind)]
            parts.append(f"Adam ({kind}) {_spread([r['trigger_accuracy'] for r in after])}, p <= "
                         f"{max(r['p_value'] for r in after):.1e}")
        lines.append("; ".join(parts))
    return lines


def _of(rows: list[dict], model: str, key: str) -> list[float]:
    return [r[key] for r in rows if r["model"].startswith(model)]


def _spread(values: list[float]) -> str:
    return f"{100 * min(values):.0f}-{100 * max(values):.0f} %" if len(values) > 1 else f"{100 * values[0]:.0f} %"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=8, help="IMP rounds at ratio 0.2 (density 0.8**rounds)")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--settings", default="default,8", help="PER_BATCH[:NOISE], comma-separated")
    parser.add_argument("--triggers", default="keyed", help="keyed and/or adi")
    parser.add_argument("--seeds", type=int, default=1, help="training seeds per setting (accuracy cost)")
    parser.add_argument("--innocents", type=int, default=0, help="tickets trained without T from other seeds")
    parser.add_argument("--fine-tune-epochs", type=int, default=10)
    parser.add_argument("--fine-tune-lr", type=float, default=0.01)
    parser.add_argument("--adam-epochs", type=int, default=5)
    parser.add_argument("--adam-lr", type=float, default=1e-3)
    parser.add_argument("--out", type=Path, default=None, help="JSON file for the rows")
    args = parser.parse_args()
    data = load_dataset("digits")
    search_train = TrainConfig(epochs=args.epochs)
    with tempfile.TemporaryDirectory() as workdir:
        search = SearchConfig(ratios=(0.2,), pruning_schedule="paper", max_rounds=args.rounds, rewind_epoch=1,
                              train=search_train)
        ticket = find_extreme_ticket(data, search, workdir, torch.device("cpu"))
    density = ticket.mask.density()
    console.print(f"ticket: {100 * density:.2f} % of prunable weights, accuracy {100 * (ticket.accuracy or 0):.2f} %")
    triggers = {
        "keyed": keyed_trigger_set(2021, 100, data.num_classes, 1, (8, 8)),
        "adi": load_trigger_folder(ADI, 1, (8, 8), num_classes=data.num_classes),
    }
    triggers = {kind: triggers[kind] for kind in args.triggers.split(",")}
    started = time.perf_counter()
    rows = []
    for seed in range(args.seeds):
        plain_model = ticket.build_model("rewind")
        train(plain_model, data, TrainConfig(epochs=args.epochs, seed=seed), ticket.mask)
        for kind, trigger in triggers.items():
            plain = _row("unmarked", plain_model, data, trigger)
            for setting in args.settings.split(","):
                rows += _experiment(ticket, data, trigger, kind, setting, seed, plain, args)
    innocents = _innocents(ticket, data, triggers, args)
    console.print(_table(rows + innocents, f"Scheme V3 on digits, ResNet-20 at {100 * density:.2f} % density"))
    for line in _summary(rows):
        console.print(line)
    if innocents:
        console.print(f"innocents: trigger accuracy {_spread([r['trigger_accuracy'] for r in innocents])}, "
                      f"smallest p {min(r['p_value'] for r in innocents):.2g}")
    console.print(f"{time.perf_counter() - started:.0f} s")
    if args.out is not None:
        write_json(args.out, {"density": density, "epochs": args.epochs, "rows": rows, "innocents": innocents,
                              "args": {k: str(v) for k, v in vars(args).items()}})


if __name__ == "__main__":
    main()

"""Structurally pruned copies against one owner's claim: the owner's protected ticket and independently
trained tickets, whole channels removed with Torch-Pruning (L1 importance, 10, 25 and 50 % of every prunable
group, the classifier kept; the `channels` attack), as pruned and after 2 epochs of fine-tuning with the mask
kept, each verified. Prints the owner's copies (accuracy, QR match over observed modules, erased modules,
decode, p-values, verdict) and per innocent population the smallest p-value per piece of evidence; writes
every row to OUT/rows.json, the tables to OUT/tables.md and the settings to OUT/config.json.

    OMP_NUM_THREADS=1 nice -n 5 python benchmarks/structural_pruning.py --seeds 20 \\
        --out benchmarks/results/structural-pruning

``--owner demo`` (the default) makes the owner's claim as ``ticketguard demo`` does (16.8 % of the weights,
20 epochs on every digits image); ``--owner quick`` uses a quick 25 % ticket like the innocents'. The
innocents come from ``benchmarks/false_claims.py``'s quick search (two IMP rounds at r = 0.5, 4 epochs, 80
images per class).
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch
from false_claims import demo_owner, quick_owner, search

from ticketguard import attack, load_subset
from ticketguard.cli.output import console, progress_bar
from ticketguard.core.evidence import DEFAULT_ALPHA
from ticketguard.core.files import atomic_path
from ticketguard.models import build_from_state
from ticketguard.training.loop import evaluate
from ticketguard.verification.fingerprint import INDEPENDENT_ODDS_RATIO
from ticketguard.verification.verify import verify

FRACTIONS = (0.1, 0.25, 0.5)
TUNINGS = {"as pruned": "", "fine-tuned 2 epochs": "+finetune:epochs=2"}
PIECES = ("qr-signature", "trigger", "fingerprint")
OWNER_HEADER = (
    "| owner's copy | accuracy | channels left in pruned groups | QR match (observed modules) | erased | "
    "QR decodes | QR p | trigger accuracy | trigger p | fingerprint | fingerprint p | verdict |"
)
INNOCENT_HEADER = (
    "| innocent population | models | shown | accuracy | smallest QR p | smallest trigger p | "
    "smallest fingerprint p | fingerprint odds ratio over rank-one (largest) |"
)


def copies() -> dict[str, str]:
    """Every structurally pruned copy, named, with its attack chain."""
    return {
        f"{fraction:.0%} channels, {tuning}": f"channels:fraction={fraction}{chain}"
        for fraction in FRACTIONS
        for tuning, chain in TUNINGS.items()
    }


def accuracy(weights: dict, data) -> float:
    model, _ = build_from_state(weights, "measuring accuracy")
    return evaluate(model.eval(), data)


def record(verdict, weights: dict, data, population: str, kind: str, seed: int | str) -> dict:
    """One verified suspect: its accuracy, the channels it kept, and each piece of evidence."""
    found = {e.name: e for e in verdict.evidence}
    pruned = verdict.details.get("alignment", {}).get("pruned", {})
    row = {
        "population": population, "kind": kind, "seed": seed, "owned": verdict.owned,
        "accuracy": accuracy(weights, data),
        "channels_missing": sum(g["missing"] for g in pruned.values()),
        "channels_kept": sum(g["kept"] for g in pruned.values()),
        "unavailable": {u.name: u.reason for u in verdict.unavailable},
    }
    for name in PIECES:
        if name in found:
            row[f"{name} p"] = found[name].p_value
            row[f"{name} score"] = found[name].score
            row[f"{name} passed"] = found[name].passed
    if "qr-signature" in found:
        details = found["qr-signature"].details
        row.update({"qr decoded": details["decodes_to_claim"], "qr modules observed": details["modules"],
                    "qr modules erased": details["modules_erased"], "qr level": details["level"]})
    if "fingerprint" in found:
        row["fingerprint odds ratio"] = found["fingerprint"].details["odds_ratio_over_rank_one_model"]
    return row


def _p(row: dict, piece: str) -> str:
    return f"{row[f'{piece} p']:.2g}" if f"{piece} p" in row else "-"


def owner_table(rows: list[dict]) -> list[str]:
    lines = [OWNER_HEADER, "|---" * OWNER_HEADER.count("|", 1) + "|"]
    for r in rows:
        total = r["channels_kept"] + r["channels_missing"]
        left = f"{r['channels_kept']}/{total}" if total else "all"
        lines.append(
            f"| {r['population']} | {100 * r['accuracy']:.2f} % | {left} | "
            f"{100 * r.get('qr-signature score', math.nan):.1f} % ({r.get('qr modules observed', '-')}) | "
            f"{r.get('qr modules erased', '-')} | {'yes' if r.get('qr decoded') else 'no'} | "
            f"{_p(r, 'qr-signature')} | "
            f"{100 * r.get('trigger score', math.nan):.0f} % | {_p(r, 'trigger')} | "
            f"{100 * r.get('fingerprint score', math.nan):.1f} % | {_p(r, 'fingerprint')} | "
            f"{'ownership shown' if r['owned'] else 'not shown'} |"
        )
    return lines


def smallest(group: list[dict], piece: str) -> str:
    values = [r[f"{piece} p"] for r in group if f"{piece} p" in r]
    return f"{min(values):.2g}" if values else "-"


def innocent_table(rows: list[dict]) -> list[str]:
    grouped: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        grouped[r["population"]].append(r)
    lines = [INNOCENT_HEADER, "|---" * INNOCENT_HEADER.count("|", 1) + "|"]
    for population, group in grouped.items():
        ratios = [r["fingerprint odds ratio"] for r in group if "fingerprint odds ratio" in r]
        accuracies = [r["accuracy"] for r in group]
        lines.append(
            f"| {population} | {len(group)} | {sum(r['owned'] for r in group)} | "
            f"{100 * min(accuracies):.1f}-{100 * max(accuracies):.1f} % | "
            f"{smallest(group, 'qr-signature')} | "
            f"{smallest(group, 'trigger')} | {smallest(group, 'fingerprint')} | "
            f"{max(ratios) if ratios else math.nan:.2f} |"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=20, help="independently trained tickets")
    parser.add_argument("--per-class", type=int, default=80,
                        help="digits training images per class (innocents)")
    parser.add_argument("--owner", choices=("quick", "demo"), default="demo",
                        help="the owner's ticket: the demo's, or a quick 25 %% one like the innocents'")
    parser.add_argument("--out", type=Path, default=Path("runs/structural-pruning"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    data = load_subset("digits", train_per_class=args.per_class, test_per_class=30)
    started, rows = time.perf_counter(), []
    with tempfile.TemporaryDirectory() as workdir, progress_bar() as progress:
        make_owner = demo_owner if args.owner == "demo" else lambda w: quick_owner(data, w)
        protected, owner_data = make_owner(Path(workdir) / "owner")
        claim, ticket = protected.claim, protected.ticket
        owner_task = progress.add_task("owner's copies", total=len(copies()), status="")
        weights = dict(ticket.weights)
        rows.append(record(verify(weights, claim), weights, owner_data, "protected, unpruned", "owner", "-"))
        for name, spec in copies().items():
            weights = attack(dict(ticket.weights), ticket.mask, spec, data=owner_data)[0]
            rows.append(record(verify(weights, claim), weights, owner_data, name, "owner", name))
            progress.advance(owner_task)
        task = progress.add_task("innocent seeds", total=args.seeds, status="")
        for seed in range(args.seeds):
            innocent = search(data, seed, Path(workdir) / f"seed-{seed}")
            for name, spec in copies().items():
                weights = attack(dict(innocent.weights), innocent.mask, spec, data=data)[0]
                rows.append(record(verify(weights, claim), weights, data, name, "innocent", seed))
            shown = sum(r["owned"] for r in rows if r["kind"] == "innocent")
            progress.update(task, advance=1, status=f"{shown} false claims so far")
    elapsed = time.perf_counter() - started
    innocents = [r for r in rows if r["kind"] == "innocent"]
    header = (f"owner: {100 * ticket.mask.density():.2f} % ResNet-20 digits ticket ({args.owner}), accuracy "
              f"{100 * ticket.accuracy:.2f} %; {len(innocents)} innocent suspects ({args.seeds} seeds x "
              f"{len(copies())} pruned copies); alpha {DEFAULT_ALPHA:g}; {elapsed:.0f} s")
    passed = sum(bool(r.get("fingerprint passed")) for r in innocents)
    largest = max(r.get("fingerprint odds ratio", 0) for r in innocents)
    verdicts = (f"false claims: {sum(r['owned'] for r in innocents)} of {len(innocents)}; fingerprint passed "
                f"on {passed}; largest fingerprint odds ratio over the rank-one model {largest:.2f} "
                f"(the null allows {INDEPENDENT_ODDS_RATIO:g})")
    tables = [header, "", verdicts, "", *owner_table([r for r in rows if r["kind"] == "owner"]), "",
              *innocent_table(innocents)]
    with atomic_path(args.out / "rows.json") as tmp:
        tmp.write_text(json.dumps(rows, indent=1) + "\n")
    with atomic_path(args.out / "tables.md") as tmp:
        tmp.write_text("\n".join(tables) + "\n")
    with atomic_path(args.out / "config.json") as tmp:
        tmp.write_text(json.dumps({**vars(args), "out": str(args.out), "fractions": FRACTIONS,
                                   "tunings": TUNINGS, "seconds": round(elapsed)}, indent=1) + "\n")
    console.print(header)
    console.print(verdicts)
    print("\n".join(tables[4:]))


if __name__ == "__main__":
    main()

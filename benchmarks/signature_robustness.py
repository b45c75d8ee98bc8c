"""Scheme V2 robustness: accuracy cost of embedding + retraining, then removal attacks on the result.

Finds a ResNet-20 ticket by IMP (ratio 0.2 for --rounds rounds), embeds the signature, retrains from W_k, and
for one-shot magnitude and random pruning of 5/10/20/30/50 % of the remaining weights and for fine-tuning
reports test accuracy, whether the QR decodes, the module match rate and the (search-corrected) p-value.

    python benchmarks/signature_robustness.py --data digits --out benchmarks/results/signature_digits.md
    python benchmarks/signature_robustness.py --data cifar10-jpeg --per-class 200 --epochs 30 --rounds 5
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

import torch
from rich.logging import RichHandler
from rich.table import Table

from ticketguard.artifacts.ticket import MANIFEST, Ticket
from ticketguard.attacks.removal import ATTACKS
from ticketguard.cli.output import console
from ticketguard.core.files import atomic_path
from ticketguard.data import ImageData, load_dataset
from ticketguard.data.cifar import load_image_folder
from ticketguard.models import build_model
from ticketguard.protect import SignatureConfig, protect
from ticketguard.schemes import placement
from ticketguard.schemes import signature as scheme
from ticketguard.search.config import SearchConfig
from ticketguard.search.imp import find_extreme_ticket
from ticketguard.training.loop import TrainConfig, evaluate

CIFAR_JPEG = (
    Path(__file__).resolve().parents[2] / "shared" / "datasets" / "cifar10-jpeg" / "cifar10-jpeg.tar.gz"
)
FRACTIONS = (0.05, 0.1, 0.2, 0.3, 0.5)
log = logging.getLogger("signature_robustness")


def load(name: str, per_class: int | None) -> ImageData:
    if name == "cifar10-jpeg":
        return load_image_folder(CIFAR_JPEG, name="cifar10", per_class=per_class)
    data = load_dataset(name)
    return data.subset(per_class, None, 0) if per_class else data


def accuracy_of(ticket: Ticket, weights: dict[str, torch.Tensor], data: ImageData) -> float:
    model = build_model(ticket.architecture, ticket.in_channels, ticket.num_classes)
    model.load_state_dict(weights)
    return evaluate(model, data)


def row(
    label: str,
    ticket: Ticket,
    weights: dict[str, torch.Tensor],
    density: float,
    data: ImageData,
    signature: scheme.Signature,
) -> dict[str, object]:
    started = time.perf_counter()
    reading = scheme.extract(weights, signature)
    verdict = scheme.evidence(reading)
    elapsed = time.perf_counter() - started
    return {
        "attack": label,
        "weights left": f"{100 * density:.2f}%",
        "accuracy": f"{100 * accuracy_of(ticket, weights, data):.2f}%",
        "decodes": "yes" if reading.decoded.text == signature.payload else "no",
        "match rate": f"{100 * reading.match_rate:.1f}%",
        "p-value": f"{reading.p_value:.1e}",
        "owned": "yes" if verdict.passed else "no",
        "verify s": f"{elapsed:.3f}",
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", default="digits", help="digits or cifar10-jpeg")
    parser.add_argument("--per-class", type=int, default=None, help="class-balanced training subset")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=8, help="IMP rounds at ratio 0.2")
    parser.add_argument("--copies", type=int, default=1)
    parser.add_argument("--polarity", default="dark", choices=sorted(placement.POLARITY_CHOICES))
    parser.add_argument("--weights-per-connection", type=int, default=scheme.DEFAULT_WEIGHTS_PER_CONNECTION)
    parser.add_argument(
        "--ticket", type=Path, default=None, help="reuse (or save) the IMP ticket in this folder"
    )
    parser.add_argument("--signature", default="ACME-R20-2026")
    parser.add_argument("--finetune-epochs", type=int, default=5)
    parser.add_argument("--out", type=Path, default=None, help="write the markdown table here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s", handlers=[RichHandler(console=console)])
    torch.manual_seed(0)
    data = load(args.data, args.per_class)
    config = SearchConfig(
        ratios=(0.2,), pruning_schedule="paper", max_rounds=args.rounds, rewind_epoch=1, train=TrainConfig(epochs=args.epochs)
    )
    started = time.perf_counter()
    if args.ticket and (args.ticket / MANIFEST).is_file():
        ticket = Ticket.load(args.ticket)
    else:
        with tempfile.TemporaryDirectory() as workdir:
            ticket = find_extreme_ticket(data, config, Path(workdir), torch.device("cpu"))
        if args.ticket:
            ticket.save(args.ticket)
    log.info(
        "ticket: %.2f%% weights left, accuracy %.2f%% (%.0f s)",
        100 * ticket.mask.density(),
        100 * ticket.accuracy,
        time.perf_counter() - started,
    )
    result = protect(
        ticket,
        data,
        signature=SignatureConfig(
            args.signature, copies=args.copies, weights_per_connection=args.weights_per_connection,
            polarity=args.polarity,
        ),
        train_config=TrainConfig(epochs=args.epochs),
    )
    protected, signature = result.ticket, result.claim.signature
    log.info("embedded %s in %s; %s", args.signature, [r.layer for r in signature.regions], result.report["embedding"])
    rows = [
        row(
            "none (protected ticket)", protected, protected.weights, protected.mask.density(), data, signature
        )
    ]
    for name in ("magnitude", "random"):
        for fraction in FRACTIONS:
            weights, mask = ATTACKS[name](protected.weights, protected.mask, fraction=fraction)
            rows.append(
                row(
                    f"{name} pruning {100 * fraction:.0f}%",
                    protected,
                    weights,
                    mask.density(),
                    data,
                    signature,
                )
            )
    weights, mask = ATTACKS["finetune"](
        protected.weights, protected.mask, data=data, epochs=args.finetune_epochs
    )
    rows.append(
        row(
            f"fine-tuning {args.finetune_epochs} epochs, lr 0.01",
            protected,
            weights,
            mask.density(),
            data,
            signature,
        )
    )
    header = (
        f"{args.data}{f' ({args.per_class}/class)' if args.per_class else ''}, ResNet-20, "
        f"{100 * ticket.mask.density():.2f}% weights left, {args.epochs} epochs, copies {args.copies}, "
        f"{args.weights_per_connection} weights per connection, polarity {args.polarity}: "
        f"accuracy {100 * ticket.accuracy:.2f}% before, {100 * protected.accuracy:.2f}% after embedding + "
        f"retraining ({100 * (protected.accuracy - ticket.accuracy):+.2f} points); QR v{signature.version}-"
        f"{signature.error}, mask {signature.mask_pattern}, kept = "
        f"{'dark' if signature.kept_is_dark else 'light'}, {result.report['embedding']['changed_cells']} cells changed"
    )
    columns = list(rows[0])
    table = Table(title=header)
    for column in columns:
        table.add_column(column)
    for entry in rows:
        table.add_row(*map(str, entry.values()))
    console.print(table)
    if args.out:
        lines = [header, "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        lines += ["| " + " | ".join(map(str, entry.values())) + " |" for entry in rows]
        with atomic_path(args.out) as tmp:
            tmp.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

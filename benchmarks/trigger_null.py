"""The trigger test's false-claim rate on answers independent of T's labels, both readings and the relabelling
search included.

    OMP_NUM_THREADS=1 python benchmarks/trigger_null.py --trials 2000

Keyed labels are uniform over the classes and independent of any model a thief trained without the seed, so
every innocent's answers are independent of them. Here the labels are drawn so and the answers independently,
uniform or skewed (a Dirichlet(0.3) share per class, so a few classes dominate), for every number of classes
and trigger images given; the share of p-values <= alpha must stay <= alpha for each chance model.
"""

from __future__ import annotations

import argparse

import torch
from rich.table import Table

from ticketguard.cli.output import console
from ticketguard.schemes.trigger import CHANCE_MODELS, trigger_evidence

ALPHAS = (0.2, 0.1, 0.05, 0.01, 0.001)


def _answers(kind: str, classes: int, count: int, generator: torch.Generator) -> torch.Tensor:
    if kind == "uniform":
        return torch.randint(0, classes, (count,), generator=generator)
    shares = torch.distributions.Dirichlet(torch.full((classes,), 0.3)).sample()
    return torch.multinomial(shares, count, replacement=True, generator=generator)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=2000)
    parser.add_argument("--classes", default="2,3,10")
    parser.add_argument("--images", default="20,100")
    args = parser.parse_args()
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    table = Table(title=f"Share of p <= alpha on independent answers, {args.trials} trials per row")
    for column in ("classes", "images", "answers", "chance", *(f"alpha {a:g}" for a in ALPHAS)):
        table.add_column(column, justify="right")
    for classes in map(int, args.classes.split(",")):
        for count in map(int, args.images.split(",")):
            for kind in ("uniform", "skewed"):
                p_values: dict[str, list[float]] = {model: [] for model in CHANCE_MODELS}
                for _ in range(args.trials):
                    labels = torch.randint(0, classes, (count,), generator=generator)
                    answers = _answers(kind, classes, count, generator)
                    for model, found in p_values.items():
                        found.append(trigger_evidence(answers, labels, classes, model).p_value)
                for model, found in p_values.items():
                    shares = [sum(p <= a for p in found) / len(found) for a in ALPHAS]
                    table.add_row(str(classes), str(count), kind, model, *(f"{s:.4f}" for s in shares))
    console.print(table)


if __name__ == "__main__":
    main()

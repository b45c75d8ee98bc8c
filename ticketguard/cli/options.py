"""Command-line options that several commands share, declared once so that their names and help agree.

Training options default to None: a command that retrains a ticket starts from the training settings the ticket
records (``Ticket.train_config``) and only the options a user gives override them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ticketguard.core.evidence import DEFAULT_ALPHA

DataDir = Annotated[Path | None, typer.Option(help="Folder or .tar.gz of the data set.")]
TrainPerClass = Annotated[int | None, typer.Option(help="Use a class-balanced training subset.")]
TestPerClass = Annotated[int | None, typer.Option(help="Use a class-balanced test subset.")]
Device = Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")]
Json = Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout for scripts.")]
Force = Annotated[bool, typer.Option("--force", help="Overwrite existing output artifacts.")]
Alpha = Annotated[float, typer.Option(help="False-claim probability the decision allows, in (0, 1).")]
ALPHA = DEFAULT_ALPHA
PublicKey = Annotated[Path | None, typer.Option(help="Owner's public key (PEM) the claim must be signed with.")]
TrustCode = Annotated[bool, typer.Option(
    "--trust-code",
    help="Import the model code that the ticket names by import path (package.module:factory) and run it. "
    "Importing runs that code: only for tickets you trust.",
)]
SigningKey = Annotated[Path | None, typer.Option(help="Owner's Ed25519 private key (PEM) that signs the claim.")]

Epochs = Annotated[int | None, typer.Option(help="Epochs per training run (default: the ticket's or data set's).")]
BatchSize = Annotated[int | None, typer.Option(help="Batch size (default: the ticket's, else 128).")]
Lr = Annotated[float | None, typer.Option(help="Peak learning rate (default: the ticket's, else 0.1).")]
Momentum = Annotated[float | None, typer.Option(help="SGD momentum (default: the ticket's, else 0.9).")]
WeightDecay = Annotated[float | None, typer.Option(help="Weight decay (default: the ticket's, else 1e-4).")]
Seed = Annotated[int | None, typer.Option(help="Seed of initialisation, batch order and augmentation.")]
Schedule = Annotated[
    str | None, typer.Option(help="Learning-rate schedule: step (paper) or onecycle (default: the ticket's).")
]


def training_overrides(
    epochs: int | None,
    batch_size: int | None,
    lr: float | None,
    momentum: float | None,
    weight_decay: float | None,
    seed: int | None,
    schedule: str | None,
) -> dict[str, object]:
    """The training settings a user gave, by TrainConfig field; those left out follow the ticket."""
    given = {
        "epochs": epochs, "batch_size": batch_size, "lr": lr, "momentum": momentum,
        "weight_decay": weight_decay, "seed": seed, "schedule": schedule,
    }
    return {name: value for name, value in given.items() if value is not None}
TsaCert = Annotated[Path | None, typer.Option(
    help="PEM of the time-stamping authority you trust (its certificate and issuers, or its root CA): checks "
    "the claim's RFC 3161 token, so evidence counts at alpha against copies published after that time.")]

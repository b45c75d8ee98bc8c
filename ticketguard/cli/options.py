"""Command-line options that several commands share, declared once so that their names and help agree.

Training options are generated from ``TrainConfig`` and default to None: a command that retrains a ticket starts
from the training settings the ticket records (``Ticket.train_config``) and only the options a user gives
override them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from ticketguard.cli.settings import Settings
from ticketguard.core.evidence import DEFAULT_ALPHA
from ticketguard.training.loop import TrainConfig

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

RETRAINING = ("epochs", "batch_size", "lr", "momentum", "weight_decay", "seed", "schedule")


def retraining(*names: str) -> Settings:
    """Training options (by default ``RETRAINING``) that override what the ticket records."""
    return Settings(TrainConfig, names or RETRAINING, follow="the ticket's or its data set's")


TrainingOverrides = Annotated[dict[str, Any], retraining()]
TsaCert = Annotated[Path | None, typer.Option(
    help="PEM of the time-stamping authority you trust (its certificate and issuers, or its root CA): checks "
    "the claim's RFC 3161 token, so evidence counts at alpha against copies published after that time.")]

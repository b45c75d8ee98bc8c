"""Command-line options that several commands share, declared once so that their names, defaults and help agree.

``DataChoice`` (which data a command trains and tests on) and ``RunOptions`` (how it runs and reports) are
settings dataclasses; a command offers all of their fields or the ones it names (``data_options``,
``run_options``) and gets the dataclass.

Training options are generated from ``TrainConfig`` and default to None: a command that retrains a ticket starts
from the training settings the ticket records (``Ticket.train_config``) and only the options a user gives
override them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer

from ticketguard.cli.settings import Settings
from ticketguard.core.evidence import DEFAULT_ALPHA
from ticketguard.core.settings import setting
from ticketguard.data import ImageData, load_subset
from ticketguard.training.loop import TrainConfig


@dataclass(frozen=True)
class DataChoice:
    """The data a command trains and tests on: a data set (else the ticket's), where its files lie, and
    class-balanced subsets for quick runs."""

    data: str | None = setting(None, help="Data set to train (or fine-tune) and test on (default: the ticket's).")
    data_dir: Path | None = setting(None, help="Folder or .tar.gz of the data set.")
    train_per_class: int | None = setting(
        None, help="Train (or fine-tune) on a class-balanced subset of this many images per class."
    )
    test_per_class: int | None = setting(None, help="Test on a class-balanced subset of this many images per class.")

    def load(self, dataset: str, seed: int) -> ImageData:
        """The chosen data set, else ``dataset`` (the ticket's), cut to the subsets asked for."""
        return load_subset(self.data or dataset, self.data_dir, self.train_per_class, self.test_per_class, seed)


@dataclass(frozen=True)
class RunOptions:
    """How a command runs and reports: the decision's false-claim level, the device, overwriting, JSON output,
    and whether a ticket's own model code may run."""

    alpha: float = setting(DEFAULT_ALPHA, help="False-claim probability the decision allows, in (0, 1).")
    device: str = setting("auto", help="auto, cpu, cuda or cuda:N.")
    force: bool = setting(False, help="Overwrite existing output artifacts.")
    json: bool = setting(False, help="Print the result as JSON on stdout for scripts.")
    trust_code: bool = setting(
        False,
        help="Import the model code that the ticket names by import path (package.module:factory) and run it. "
        "Importing runs that code: only for tickets you trust.",
    )


SWITCHES = {"force": ("--force",), "json": ("--json",), "trust_code": ("--trust-code",)}
"""Run options that are one flag each, off unless given."""


def data_options(*names: str) -> Settings:
    """Data options (by default every ``DataChoice`` field)."""
    return Settings(DataChoice, names)


def run_options(*names: str) -> Settings:
    """Run options (by default every ``RunOptions`` field)."""
    return Settings(RunOptions, names, flags=SWITCHES)


Data = Annotated[DataChoice, data_options()]
Run = Annotated[RunOptions, run_options()]
JsonOutput = Annotated[RunOptions, run_options("json")]

PublicKey = Annotated[Path | None, typer.Option(help="Owner's public key (PEM) the claim must be signed with.")]

RETRAINING = ("epochs", "batch_size", "lr", "momentum", "weight_decay", "seed", "schedule")


def retraining(*names: str) -> Settings:
    """Training options (by default ``RETRAINING``) that override what the ticket records."""
    return Settings(TrainConfig, names or RETRAINING, follow="the ticket's or its data set's")


TrainingOverrides = Annotated[dict[str, Any], retraining()]
TsaCert = Annotated[Path | None, typer.Option(
    help="PEM of the time-stamping authority you trust (its certificate and issuers, or its root CA): checks "
    "the claim's RFC 3161 token, so evidence counts at alpha against copies published after that time.")]

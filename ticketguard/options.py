"""Command-line options that many commands share, declared once so that their names and help agree."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ticketguard.data import ImageData, load_dataset

DataDir = Annotated[Optional[Path], typer.Option(help="Folder or .tar.gz of the data set.")]
Epochs = Annotated[Optional[int], typer.Option(help="Epochs per training run (default: the data set's).")]
TrainPerClass = Annotated[Optional[int], typer.Option(help="Use a class-balanced training subset.")]
TestPerClass = Annotated[Optional[int], typer.Option(help="Use a class-balanced test subset.")]
Device = Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")]
Json = Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout for scripts.")]


def subset_data(
    name: str,
    folder: Path | None,
    train_per_class: int | None,
    test_per_class: int | None,
    seed: int,
    download: bool = False,
) -> ImageData:
    """A registered data set, cut to class-balanced subsets when asked."""
    data = load_dataset(name, folder, download)
    if train_per_class or test_per_class:
        data = data.subset(train_per_class, test_per_class, seed)
    return data

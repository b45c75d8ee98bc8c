"""CLI commands of the keymask scheme (V1), merged into the ticketguard app by cli.py."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from ticketguard.data import dataset_spec
from ticketguard.errors import InputError
from ticketguard.options import DataDir, Device, Epochs, Json, TestPerClass, TrainPerClass, subset_data
from ticketguard.progress import console, progress_bar
from ticketguard.schemes.keymask import (
    check_key_density,
    load_pair,
    merge_key,
    save_split,
    split_key,
    verify_key,
)
from ticketguard.scores import SCORES
from ticketguard.ticket import Ticket
from ticketguard.training import TrainConfig, resolve_device

commands = typer.Typer()

TRAIN = TrainConfig()


def _refuse_existing(folder: Path) -> None:
    if folder.exists() and any(folder.iterdir()):
        raise InputError(f"{folder} already exists and is not empty; choose another --out")


@commands.command()
def split(
    ticket: Annotated[Path, typer.Argument(help="The ticket folder to lock.")],
    out: Annotated[Path, typer.Option(help="Folder to write OUT/locked (to ship) and OUT/key (to license).")],
    score: Annotated[str, typer.Option(help=f"Score of the key weights: {', '.join(SCORES)}.")] = "ewp",
    key_density: Annotated[float, typer.Option(help="n_s: the key's share of kept weights.")] = 0.05,
) -> None:
    """Split a ticket into a locked ticket and a key mask of its highest-scoring weights (Algorithm 1)."""
    check_key_density(key_density)
    if score not in SCORES:
        raise InputError(f"unknown score {score!r}; choose one of: {', '.join(SCORES)}")
    _refuse_existing(out)
    locked, key = split_key(Ticket.load(ticket), key_density, score)
    locked_folder, key_folder = save_split(locked, key, out)
    console.print(
        f"locked ticket [bold]{locked_folder}[/] ({100 * locked.mask.density():.3f}% of weights left), "
        f"key [bold]{key_folder}[/] ({key.size()} weights, score {score})"
    )


@commands.command()
def merge(
    locked: Annotated[Path, typer.Argument(help="The locked ticket folder.")],
    key: Annotated[Path, typer.Argument(help="The key folder split from it.")],
    out: Annotated[Path, typer.Option(help="Ticket folder to write.")],
) -> None:
    """Add a key back to its locked ticket; the result is the original ticket, bit for bit."""
    _refuse_existing(out)
    ticket = merge_key(*load_pair(locked, key))
    ticket.save(out)
    console.print(f"ticket [bold]{out}[/] restored ({100 * ticket.mask.density():.3f}% of weights left)")


@commands.command("verify-key")
def verify_key_command(
    locked: Annotated[Path, typer.Argument(help="The locked ticket folder.")],
    key: Annotated[Optional[Path], typer.Option(help="Key folder; without it, check the lock only.")] = None,
    data_dir: DataDir = None,
    epochs: Epochs = None,
    batch_size: Annotated[int, typer.Option(help="Batch size.")] = TRAIN.batch_size,
    lr: Annotated[float, typer.Option(help="Peak learning rate.")] = TRAIN.lr,
    eps: Annotated[float, typer.Option(help="eps_f in accuracy points.")] = 1.0,
    fake1: Annotated[bool, typer.Option(help="Also retrain with a random key (fake1).")] = False,
    train_per_class: TrainPerClass = None,
    test_per_class: TestPerClass = None,
    seed: Annotated[int, typer.Option(help="Seed of both retraining runs.")] = TRAIN.seed,
    device: Device = "auto",
    as_json: Json = False,
) -> None:
    """Retrain the locked ticket without and with the key; ownership shows as an accuracy gap beyond eps_f.

    Without --key only the lock is checked: exit 0 when the locked ticket misses the target by more than eps_f.
    """
    if key is None:
        ticket, secret = Ticket.load(locked), None
    else:
        ticket, secret = load_pair(locked, key)
    spec = dataset_spec(ticket.dataset)
    config = TrainConfig(epochs=epochs or spec.default_epochs, batch_size=batch_size, lr=lr, seed=seed)
    data = subset_data(ticket.dataset, data_dir, train_per_class, test_per_class, seed)
    with progress_bar() as progress:
        verdict = verify_key(ticket, secret, data, config, eps / 100, resolve_device(device), progress, fake1)
    if as_json:
        typer.echo(json.dumps(verdict.to_json(), indent=2))
    else:
        _print_verdict(verdict.to_json())
    raise typer.Exit(0 if verdict.owned else 1)


def _print_verdict(report: dict) -> None:
    evidence = report["evidence"][0]
    table = Table(title=f"verify-key: {report['decision']}", show_header=False)
    for name, value in evidence["details"].items():
        shown = f"{100 * value:.2f}%" if isinstance(value, float) else str(value)
        table.add_row(name.replace("_", " "), shown)
    table.add_row("gap" if evidence["name"] == "key-gap" else "accuracy", f"{100 * evidence['score']:.2f}")
    console.print(table)

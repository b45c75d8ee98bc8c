"""CLI commands of the keymask scheme (V1), merged into the ticketguard app by cli.py."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from ticketguard.artifacts.ticket import MANIFEST, TENSOR_FILES, Ticket
from ticketguard.cli.options import DataChoice, RunOptions, data_options, retraining, run_options
from ticketguard.cli.output import emit_json, percent, print_verdict, progress_bar, results
from ticketguard.cli.settings import expand_settings
from ticketguard.core.errors import InputError
from ticketguard.core.files import prepare_output, staged_folder
from ticketguard.schemes.keymask import (
    KEY_FOLDER,
    LOCKED_FOLDER,
    check_key_density,
    load_pair,
    merge_key,
    save_split,
    split_key,
)
from ticketguard.schemes.scores import SCORES
from ticketguard.training.loop import resolve_device
from ticketguard.verification.verify import verify_key

commands = typer.Typer()


@commands.command()
@expand_settings
def split(
    ticket: Annotated[Path, typer.Argument(help="The ticket folder to lock.")],
    *,
    out: Annotated[Path, typer.Option(help="Folder to write OUT/locked (to ship) and OUT/key (to license).")],
    score: Annotated[str, typer.Option(help=f"Score of the key weights: {', '.join(SCORES)}.")] = "ewp",
    key_density: Annotated[float, typer.Option(help="n_s: the key's share of kept weights.")] = 0.05,
    run: Annotated[RunOptions, run_options("force", "json", "trust_code")],
) -> None:
    """Split a ticket into a locked ticket and a key mask of its highest-scoring weights (Algorithm 1).

    OUT gets both folders or, if the split fails or is interrupted, neither."""
    check_key_density(key_density)
    if score not in SCORES:
        raise InputError(f"unknown score {score!r}; choose one of: {', '.join(SCORES)}")
    prepare_output(out, run.force, folder=True, inputs=[ticket], replaces=(LOCKED_FOLDER, KEY_FOLDER))
    locked, key = split_key(Ticket.load(ticket, trust_code=run.trust_code), key_density, score)
    locked_folder, key_folder = save_split(locked, key, out)
    if run.json:
        emit_json(
            {
                "locked": str(locked_folder),
                "key": str(key_folder),
                "score": score,
                "locked_density": locked.mask.density(),
                "key_weights": key.size(),
            }
        )
    else:
        results.print(
            f"locked ticket [bold]{locked_folder}[/] ({percent(locked.mask.density(), 3)} of weights "
            f"left), key [bold]{key_folder}[/] ({key.size()} weights, score {score})"
        )


@commands.command()
@expand_settings
def merge(
    locked: Annotated[Path, typer.Argument(help="The locked ticket folder.")],
    key: Annotated[Path, typer.Argument(help="The key folder split from it.")],
    *,
    out: Annotated[Path, typer.Option(help="Ticket folder to write.")],
    run: Annotated[RunOptions, run_options("force", "json")],
) -> None:
    """Add a key back to its locked ticket; the result is the original ticket, bit for bit, written whole or
    not at all."""
    prepare_output(out, run.force, folder=True, inputs=[locked, key], replaces=(MANIFEST, *TENSOR_FILES))
    ticket = merge_key(*load_pair(locked, key))
    with staged_folder(out) as staging:
        ticket.save(staging)
    if run.json:
        emit_json({"ticket": str(out), "density": ticket.mask.density()})
    else:
        results.print(f"ticket [bold]{out}[/] restored ({percent(ticket.mask.density(), 3)} of weights left)")


@commands.command("verify-key")
@expand_settings
def verify_key_command(
    locked: Annotated[Path, typer.Argument(help="The locked ticket folder.")],
    *,
    key_mask: Annotated[
        Path | None, typer.Option(help="Key-mask folder (from split); without it, check the lock only.")
    ] = None,
    data_choice: Annotated[DataChoice, data_options("data_dir", "train_per_class", "test_per_class")],
    training: Annotated[dict[str, Any], retraining("epochs", "batch_size", "lr", "seed")],
    eps: Annotated[float, typer.Option(help="eps_f in accuracy points.")] = 1.0,
    fake1: Annotated[bool, typer.Option(help="Also retrain with a random key (fake1).")] = False,
    run: Annotated[RunOptions, run_options("device", "json", "trust_code")],
) -> None:
    """Retrain the locked ticket without and with the key; ownership shows as an accuracy gap beyond eps_f.

    Without --key-mask only the lock is checked: exit 0 when the locked ticket misses the target by more
    than eps_f.
    """
    if key_mask is None:
        ticket, secret = Ticket.load(locked, trust_code=run.trust_code), None
    else:
        ticket, secret = load_pair(locked, key_mask, run.trust_code)
    config = ticket.train_config(**training)
    data = data_choice.load(ticket.dataset, config.seed)
    with progress_bar() as progress:
        verdict = verify_key(ticket, secret, data, config, eps / 100, resolve_device(run.device), progress, fake1)
    if run.json:
        emit_json(verdict.to_json())
    else:
        print_verdict(verdict.to_json(), f"verify-key {locked}")
    raise typer.Exit(0 if verdict.owned else 1)

"""The ``ticketguard`` command: one typer app whose options default to the dataclass configs."""

from __future__ import annotations

import json
import logging
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Annotated, Any, Optional

import torch

import typer
from rich.logging import RichHandler
from rich.progress import Progress
from rich.table import Table

from ticketguard import cli_evaluate, cli_keymask, cli_reproduce, cli_signature, cli_trigger, distributed
from ticketguard.data import ImageData, dataset_spec
from ticketguard.errors import InputError
from ticketguard.imp import SearchConfig, find_extreme_ticket
from ticketguard.jobs import run_jobs
from ticketguard.models import MODELS
from ticketguard.options import DataDir, Device, Json, TestPerClass, TrainPerClass, subset_data
from ticketguard.progress import console, progress_bar
from ticketguard.suspect import load_suspect
from ticketguard.ticket import MANIFEST, Ticket
from ticketguard.training import TrainConfig, resolve_device

app = typer.Typer(
    help="Find extremely sparse winning lottery tickets and prove that they are yours.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

TRAIN = TrainConfig()
SEARCH = SearchConfig()


def _parse_ratios(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(part) for part in text.split(","))
    except ValueError:
        raise InputError(f"--ratios must be comma-separated numbers such as 0.2,0.1,0.05,0.01, got {text!r}") from None


@app.command()
def find(
    out: Annotated[Path, typer.Option(help="Ticket folder to write; the resumable search state goes in OUT/search.")]
    = Path("runs/ticket"),
    model: Annotated[str, typer.Option(help=f"Architecture: {', '.join(MODELS)}.")] = SEARCH.model,
    data: Annotated[str, typer.Option(help="Data set: digits (built in), cifar10, cifar100, folder.")] = "digits",
    data_dir: DataDir = None,
    download: Annotated[bool, typer.Option(help="Fetch the official CIFAR archive if DATA_DIR lacks it.")] = False,
    epochs: Annotated[Optional[int], typer.Option(help="Epochs per training run (default: 182; digits: 20).")] = None,
    batch_size: Annotated[int, typer.Option(help="Batch size.")] = TRAIN.batch_size,
    lr: Annotated[float, typer.Option(help="Peak learning rate (x0.1 at 50% and 75% of the epochs).")] = TRAIN.lr,
    momentum: Annotated[float, typer.Option(help="SGD momentum.")] = TRAIN.momentum,
    weight_decay: Annotated[float, typer.Option(help="Weight decay (paper: 1e-4, 5e-4 for ResNet-50).")]
    = TRAIN.weight_decay,
    rewind_epoch: Annotated[int, typer.Option(help="Late-rewinding epoch k of W_k.")] = SEARCH.rewind_epoch,
    ratios: Annotated[str, typer.Option(help="Pruning-ratio schedule, largest first.")] = ",".join(
        map(str, SEARCH.ratios)
    ),
    eps: Annotated[float, typer.Option(help="eps_f: a ticket matches within this many accuracy points.")] = 100
    * SEARCH.eps,
    max_rounds: Annotated[int, typer.Option(help="Stop after this many pruning rounds.")] = SEARCH.max_rounds,
    include_classifier: Annotated[bool, typer.Option(help="Prune the classifier's weights too.")] = False,
    train_per_class: TrainPerClass = None,
    test_per_class: TestPerClass = None,
    seed: Annotated[int, typer.Option(help="Seed of initialisation, batch order and augmentation.")] = TRAIN.seed,
    schedule: Annotated[str, typer.Option(help="Learning-rate schedule: step (paper) or onecycle (short runs).")]
    = TRAIN.schedule,
    compile_model: Annotated[
        bool, typer.Option("--compile", help="Train through torch.compile (pays on GPUs and for ResNet-18/50).")
    ] = TRAIN.compile,
    device: Device = "auto",
    restart: Annotated[bool, typer.Option(help="Discard an earlier search in OUT/search instead of resuming.")]
    = False,
    seeds: Annotated[
        Optional[str], typer.Option(help="Comma-separated seeds: one independent search each, in OUT/seed-N.")
    ] = None,
    workers: Annotated[int, typer.Option(help="With --seeds: searches run at once, one device each.")] = 1,
    ray: Annotated[Optional[str], typer.Option(help="With --seeds: run them as Ray tasks on this cluster.")]
    = None,
) -> None:
    """Find an extreme winning ticket by IMP with late rewinding; rerun the same command to resume.

    Under torchrun (e.g. torchrun --nproc-per-node 4 -m ticketguard find ...) every round trains with
    DistributedDataParallel across the processes; only the first process writes files.
    """
    spec = dataset_spec(data)
    if seeds is None and (workers != 1 or ray is not None):
        raise InputError("--workers and --ray run independent searches: give them --seeds")
    config = SearchConfig(
        model=model,
        ratios=_parse_ratios(ratios),
        eps=eps / 100,
        rewind_epoch=rewind_epoch,
        max_rounds=max_rounds,
        include_classifier=include_classifier,
        train=TrainConfig(
            epochs=epochs or spec.default_epochs,
            batch_size=batch_size,
            lr=lr,
            momentum=momentum,
            weight_decay=weight_decay,
            seed=seed,
            schedule=schedule,
            compile=compile_model,
        ),
    )
    if model not in MODELS:
        raise InputError(f"unknown model {model!r}; choose one of: {', '.join(MODELS)}")
    source = DataSource(data, data_dir, download, train_per_class, test_per_class)
    started = time.perf_counter()
    if seeds is not None:
        jobs = [
            {"source": source, "config": replace(config, train=replace(config.train, seed=s)),
             "out": out / f"seed-{s}", "restart": restart}
            for s in _parse_seeds(seeds)
        ]
        _print_seed_table(run_jobs(search_job, jobs, workers, ray))
        console.print(f"{len(jobs)} tickets written under [bold]{out}[/] in {time.perf_counter() - started:.0f} s")
        return
    distributed.init_from_environment()
    target = distributed.local_device(resolve_device(device))
    if not distributed.is_main():
        search_job(source, config, out, restart, str(target))
        return
    with progress_bar() as progress:
        search_job(source, config, out, restart, str(target), progress)
    _print_report(_ticket_report(out))
    console.print(f"ticket written to [bold]{out}[/] in {time.perf_counter() - started:.0f} s")


@dataclass(frozen=True)
class DataSource:
    """What a search job needs to load its data in its own process."""

    name: str
    folder: Path | None
    download: bool
    train_per_class: int | None
    test_per_class: int | None

    def load(self, seed: int) -> ImageData:
        return subset_data(
            self.name, self.folder, self.train_per_class, self.test_per_class, seed, self.download
        )


def search_job(
    source: DataSource,
    config: SearchConfig,
    out: Path,
    restart: bool,
    device: str,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """One whole extreme-ticket search into ``out``; returns the ticket's summary (main process only writes)."""
    dataset = source.load(config.train.seed)
    ticket = find_extreme_ticket(dataset, config, out / "search", torch.device(device), progress, restart)
    if distributed.is_main():
        ticket.save(out)
    return {"out": str(out), "seed": config.train.seed, "accuracy": ticket.accuracy,
            "dense_accuracy": ticket.metadata["dense_accuracy"], "density": ticket.mask.density(),
            "pruning_spec": ticket.metadata["search"]["counts"]}


def _parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(part) for part in text.split(",")]
    except ValueError:
        raise InputError(f"--seeds must be comma-separated integers such as 0,1,2, got {text!r}") from None
    if len(set(seeds)) != len(seeds):
        raise InputError(f"--seeds repeats a seed: {text!r}")
    return seeds


def _print_seed_table(summaries: list[dict[str, Any]]) -> None:
    table = Table(title="extreme tickets per seed")
    for column in ("seed", "ticket", "dense accuracy", "accuracy", "weights left", "pruning spec"):
        table.add_column(column, justify="right")
    for row in summaries:
        table.add_row(
            str(row["seed"]), row["out"], _percent(row["dense_accuracy"]), _percent(row["accuracy"]),
            _percent(row["density"]), str(tuple(row["pruning_spec"])),
        )
    console.print(table)


@app.command()
def info(
    path: Annotated[Path, typer.Argument(help="A ticket folder, or a model file (.safetensors, .pt, .pth).")],
    as_json: Json = False,
) -> None:
    """Show a ticket's or model file's architecture, accuracy, search history and density per layer."""
    report = _ticket_report(path) if (path / MANIFEST).is_file() else _model_file_report(path)
    if as_json:
        typer.echo(json.dumps(report, indent=2))
    else:
        _print_report(report)


def _ticket_report(path: Path) -> dict[str, Any]:
    ticket = Ticket.load(path)
    search = ticket.metadata.get("search", {})
    return {
        "kind": "ticket",
        "path": str(path),
        "architecture": ticket.architecture,
        "dataset": ticket.dataset,
        "accuracy": ticket.accuracy,
        "dense_accuracy": ticket.metadata.get("dense_accuracy"),
        "density": ticket.mask.density(),
        "pruning_spec": search.get("counts"),
        "ratios": search.get("ratios"),
        "history": search.get("history", []),
        "layer_density": ticket.mask.layer_densities(),
    }


def _model_file_report(path: Path) -> dict[str, Any]:
    suspect = load_suspect(path)
    return {
        "kind": "model",
        "path": str(path),
        "architecture": suspect.architecture[0] if suspect.architecture else None,
        "source": suspect.source,
        "density": suspect.mask.density(),
        "layer_density": suspect.mask.layer_densities(),
    }


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"


def _print_report(report: dict[str, Any]) -> None:
    summary = Table(title=f"{report['kind']} {report['path']}", show_header=False)
    summary.add_row("architecture", str(report["architecture"] or "unknown"))
    for key in ("dataset", "source"):
        if key in report:
            summary.add_row(key, str(report[key]))
    if report["kind"] == "ticket":
        summary.add_row("accuracy", _percent(report["accuracy"]))
        summary.add_row("dense accuracy", _percent(report["dense_accuracy"]))
        spec = report["pruning_spec"]
        summary.add_row("pruning spec", f"({', '.join(map(str, spec))}) at ratios {report['ratios']}" if spec else "-")
    summary.add_row("weights left", _percent(report["density"]))
    console.print(summary)
    if report.get("history"):
        history = Table(title="search history")
        for column in ("round", "ratio", "weights left", "accuracy", "matches"):
            history.add_column(column, justify="right")
        for row in report["history"]:
            history.add_row(
                str(row["round"]), str(row["ratio"] or "dense"), _percent(row["density"]),
                _percent(row["accuracy"]), "yes" if row["matched"] else "no",
            )
        console.print(history)
    layers = Table(title="density per layer")
    layers.add_column("tensor")
    layers.add_column("weights left", justify="right")
    for name, density in report["layer_density"].items():
        layers.add_row(name, _percent(density))
    console.print(layers)


for group in (
    cli_keymask.commands, cli_signature.commands, cli_trigger.commands, cli_evaluate.commands, cli_reproduce.commands
):
    app.registered_commands += group.registered_commands


def main(argv: list[str] | None = None) -> int:
    """Run the app; bad input becomes one line on stderr and exit status 2, never a traceback."""
    logging.basicConfig(level=logging.INFO, format="%(message)s", handlers=[RichHandler(console=console)])
    try:
        app(args=argv, prog_name="ticketguard")
    except SystemExit as exit_:
        return exit_.code if isinstance(exit_.code, int) else 0 if exit_.code is None else 1
    except InputError as err:
        console.print(f"[red]error:[/] {err}", highlight=False, soft_wrap=True)
        return 2
    except OSError as err:
        console.print(f"[red]error:[/] {err}", highlight=False, soft_wrap=True)
        return 1
    return 0


def run() -> None:
    sys.exit(main())

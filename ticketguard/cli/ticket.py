"""CLI commands that make and describe tickets: find (the extreme-ticket search) and info."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from ticketguard.artifacts.suspect import load_suspect
from ticketguard.artifacts.ticket import Ticket, is_ticket_folder
from ticketguard.cli.options import RETRAINING, DataChoice, JsonOutput, RunOptions, data_options, run_options
from ticketguard.cli.output import console, emit_json, percent, progress_bar, results
from ticketguard.cli.settings import Settings, expand_settings
from ticketguard.core.errors import InputError
from ticketguard.core.files import prepare_output
from ticketguard.data import dataset_spec
from ticketguard.search.adopt import adopt as adopt_model
from ticketguard.search.config import SearchConfig
from ticketguard.search.jobs import DataSource, run_jobs, search_job
from ticketguard.training import distributed
from ticketguard.training.loop import TrainConfig, resolve_device

commands = typer.Typer()

SearchOptions = Annotated[dict[str, Any], Settings(SearchConfig)]
FindTraining = Annotated[dict[str, Any], Settings(TrainConfig, RETRAINING, follow="the data set's")]
Compiling = Annotated[dict[str, Any], Settings(TrainConfig, ("compile",), flags={"compile": ("--compile",)})]


@commands.command()
@expand_settings
def find(
    *,
    out: Annotated[Path, typer.Option(help="Ticket folder to write; the resumable search state goes in OUT/search.")]
    = Path("runs/ticket"),
    search: SearchOptions,
    data: Annotated[str, typer.Option(help="Data set: digits (built in), cifar10, cifar100, folder.")] = "digits",
    data_choice: Annotated[DataChoice, data_options("data_dir", "train_per_class", "test_per_class")],
    download: Annotated[bool, typer.Option(help="Fetch the official CIFAR archive if DATA_DIR lacks it.")] = False,
    training: FindTraining,
    compiling: Compiling,
    restart: Annotated[bool, typer.Option(help="Discard an earlier search in OUT/search instead of resuming.")]
    = False,
    seeds: Annotated[
        str | None, typer.Option(help="Comma-separated seeds: one independent search each, in OUT/seed-N.")
    ] = None,
    workers: Annotated[int, typer.Option(help="With --seeds: searches run at once, one device each.")] = 1,
    ray: Annotated[str | None, typer.Option(help="With --seeds: run them as Ray tasks on this cluster.")]
    = None,
    run: Annotated[RunOptions, run_options("device", "json")],
) -> None:
    """Find an extreme winning ticket by IMP with late rewinding; rerun the same command to resume.

    Under torchrun (e.g. torchrun --nproc-per-node 4 -m ticketguard find ...) every round trains with
    DistributedDataParallel across the processes; only the first process writes files.
    """
    spec = dataset_spec(data)
    if seeds is None and (workers != 1 or ray is not None):
        raise InputError("--workers and --ray run independent searches: give them --seeds")
    config = SearchConfig(**search, train=TrainConfig(**{"epochs": spec.default_epochs, **training, **compiling}))
    source = DataSource(data, data_choice.data_dir, download, data_choice.train_per_class, data_choice.test_per_class)
    started = time.perf_counter()
    if seeds is not None:
        jobs = [
            {"source": source, "config": replace(config, train=replace(config.train, seed=s)),
             "out": out / f"seed-{s}", "restart": restart}
            for s in _parse_seeds(seeds)
        ]
        summaries = run_jobs(search_job, jobs, workers, ray)
        emit_json(summaries) if run.json else _print_seed_table(summaries)
        console.print(f"{len(jobs)} tickets written under [bold]{out}[/] in {time.perf_counter() - started:.0f} s")
        return
    distributed.init_from_environment()
    target = distributed.local_device(resolve_device(run.device))
    if not distributed.is_main():
        search_job(source, config, out, restart, str(target))
        return
    with progress_bar() as progress:
        search_job(source, config, out, restart, str(target), progress)
    report = _ticket_report(out)
    emit_json(report) if run.json else _print_report(report)
    console.print(f"ticket written to [bold]{out}[/] in {time.perf_counter() - started:.0f} s")


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
            str(row["seed"]), row["out"], percent(row["dense_accuracy"]), percent(row["accuracy"]),
            percent(row["density"]), str(tuple(row["pruning_spec"])),
        )
    results.print(table)


@commands.command()
@expand_settings
def adopt(
    model_file: Annotated[Path, typer.Argument(
        metavar="MODEL_FILE", help="A sparse model: state_dict, Lightning or torch.nn.utils.prune checkpoint, "
        "or safetensors file.")],
    *,
    model: Annotated[str, typer.Option(
        help="Its architecture: a registered name or an import path (package.module:factory(...)). Importing runs "
        "that module's code.")],
    out: Annotated[Path, typer.Option(help="Ticket folder to write.")],
    data: Annotated[str, typer.Option(help="The data it was trained on: digits, cifar10, cifar100, folder.")]
    = "digits",
    data_choice: Annotated[DataChoice, data_options("data_dir", "test_per_class")],
    prune: Annotated[list[str] | None, typer.Option(
        metavar="GLOB", help="Weights the mask covers (fnmatch patterns); default as for find.")] = None,
    include_classifier: Annotated[bool, typer.Option(help="The mask covers the classifier too.")] = False,
    run: Annotated[RunOptions, run_options("force", "json")],
) -> None:
    """Make a ticket folder from a sparse model found elsewhere, so that protect, attack and verify take it.

    The file holds no late-rewind weights W_k, so the ticket's are its own weights: protecting it retrains
    from them."""
    prepare_output(out, run.force, folder=True, inputs=[model_file])
    images = data_choice.load(data, 0)
    adopt_model(model_file, model, images, include_classifier=include_classifier, prune=tuple(prune or ())).save(out)
    report = _ticket_report(out)
    emit_json(report) if run.json else _print_report(report)
    console.print(f"ticket written to [bold]{out}[/]")


@commands.command()
@expand_settings
def info(
    path: Annotated[Path, typer.Argument(help="A ticket folder, or a model file (.safetensors, .pt, .pth).")],
    *,
    run: JsonOutput,
) -> None:
    """Show a ticket's or model file's architecture, accuracy, search history and density per layer."""
    report = _ticket_report(path) if is_ticket_folder(path) else _model_file_report(path)
    if run.json:
        emit_json(report)
    else:
        _print_report(report)


def _ticket_report(path: Path) -> dict[str, Any]:
    ticket = Ticket.load(path)
    search = ticket.metadata.get("search", {})
    history = search.get("history", [])
    best = history[search["best_round"]] if "best_round" in search and search["best_round"] < len(history) else {}
    return {
        "kind": "ticket",
        "path": str(path),
        "architecture": ticket.architecture,
        "dataset": ticket.dataset,
        "accuracy": ticket.accuracy,
        "dense_accuracy": ticket.metadata.get("dense_accuracy"),
        "validation_accuracy": best.get("validation_accuracy"),
        "dense_validation_accuracy": history[0].get("validation_accuracy") if history else None,
        "density": ticket.mask.density(),
        "pruning_spec": search.get("counts"),
        "ratios": search.get("ratios"),
        "pruning_schedule": search.get("pruning_schedule", "paper"),
        "decide_on": search.get("decide_on", "test"),
        "validation": search.get("validation"),
        "trainings": search.get("trainings", len(history)),
        "seconds": search.get("seconds"),
        "history": history,
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


def _print_report(report: dict[str, Any]) -> None:
    summary = Table(title=f"{report['kind']} {report['path']}", show_header=False)
    summary.add_row("architecture", str(report["architecture"] or "unknown"))
    for key in ("dataset", "source"):
        if key in report:
            summary.add_row(key, str(report[key]))
    if report["kind"] == "ticket":
        summary.add_row("test accuracy (dense)", f"{percent(report['accuracy'])} ({percent(report['dense_accuracy'])})")
        summary.add_row(
            "validation accuracy (dense)",
            f"{percent(report['validation_accuracy'])} ({percent(report['dense_validation_accuracy'])})",
        )
        summary.add_row("pruning spec", _pruning_spec(report))
        summary.add_row("matching test", _matching_test(report))
        if report["seconds"] is not None:
            summary.add_row("trainings", f"{report['trainings']} in {report['seconds']:.0f} s")
    summary.add_row("weights left", percent(report["density"]))
    results.print(summary)
    if report.get("history"):
        history = Table(title="search history (%; diff. and bound: validation, round - dense)")
        for column in ("round", "ratio", "left", "valid.", "test", "diff.", "bound", "p", "match"):
            history.add_column(column, justify="right")
        for row in report["history"]:
            history.add_row(
                str(row["round"]), "dense" if row["ratio"] is None else f"{row['ratio']:.3g}",
                *(_points(row.get(key)) for key in ("density", "validation_accuracy", "accuracy", "estimate", "bound")),
                "-" if row.get("p_value") is None else f"{row['p_value']:.1g}", "yes" if row["matched"] else "no",
            )
        results.print(history)
    layers = Table(title="density per layer")
    layers.add_column("tensor")
    layers.add_column("weights left", justify="right")
    for name, density in report["layer_density"].items():
        layers.add_row(name, percent(density))
    results.print(layers)


def _points(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}"


def _pruning_spec(report: dict[str, Any]) -> str:
    spec, ratios = report["pruning_spec"], report["ratios"]
    if not spec:
        return "-"
    if report["pruning_schedule"] == "adaptive":
        return (f"({', '.join(map(str, spec))}): {spec[0]} rounds matched at {ratios[0]}, then {spec[1]} while "
                f"bisecting down to {ratios[-1]}")
    return f"({', '.join(map(str, spec))}) at ratios {ratios}"


def _matching_test(report: dict[str, Any]) -> str:
    validation = report["validation"] or {}
    if report["decide_on"] == "test":
        return "the paper's rule: test accuracy within eps_f of dense"
    text = (f"paired non-inferiority on {validation['images']} validation images, confidence "
            f"{percent(validation['confidence'], 0)}, margin {percent(validation['margin'])}")
    if not validation["resolves_eps"]:
        text += f", coarser than eps_f = {percent(validation['eps'])}: the split cannot resolve it"
    return text

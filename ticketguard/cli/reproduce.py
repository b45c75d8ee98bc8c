"""CLI command that reproduces the paper's tables and figures, merged into the ticketguard app by cli.py."""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from ticketguard.cli.options import DataChoice, RunOptions, data_options, run_options
from ticketguard.cli.output import console, emit_json, progress_bar
from ticketguard.cli.output import results as shown
from ticketguard.cli.settings import expand_settings
from ticketguard.experiments import reproduce
from ticketguard.training.loop import resolve_device

commands = typer.Typer()


def _print_table(title: str, rows: list[dict[str, str]]) -> None:
    table = Table(title=title)
    for column in ("quantity", "paper", "ours"):
        table.add_column(column)
    for row in rows:
        table.add_row(row["quantity"], row["paper"], row["ours"])
    shown.print(table)


@commands.command(name="reproduce")
@expand_settings
def reproduce_command(
    targets: Annotated[
        list[str] | None,
        typer.Argument(help=f"Experiments to run ({', '.join(reproduce.EXPERIMENTS)}); default: all."),
    ] = None,
    *,
    preset: Annotated[str | None, typer.Option(
        help="A named campaign that sets data, epochs, scale, recipe, schedule and grids together: "
        + "; ".join(f"{name}: {p.description}" for name, p in reproduce.PRESETS.items())
        + ". A smaller --epochs or --scale runs the same campaign small.")] = None,
    model: Annotated[str, typer.Option(help="Architecture (the paper's tables use resnet20).")] = "resnet20",
    data: Annotated[str | None, typer.Option(help="digits (built in, the default), cifar10 or cifar100.")] = None,
    data_choice: Annotated[DataChoice, data_options("data_dir")],
    epochs: Annotated[
        int | None,
        typer.Option(help="Epochs per training run (default: scale x the data set's, at least 2)."),
    ] = None,
    scale: Annotated[
        float | None,
        typer.Option(help="Share of the per-class data, epochs, IMP rounds and grids, in (0, 1]; 1 = paper "
                     "(default 0.1)."),
    ] = None,
    out: Annotated[
        Path, typer.Option(help="Folder for report.md, the figures and resumable results.")
    ] = Path("runs/reproduce"),
    status: Annotated[bool, typer.Option(
        "--status", help="Show where the run in --out stands (finished stages, the running training's epoch, "
        "epochs left) and exit; trains nothing and needs no data.")] = False,
    run: Annotated[RunOptions, run_options("device", "json")],
) -> None:
    """Run the experiments behind the paper's tables and figures and write our numbers beside the paper's."""
    if status:
        _print_status(reproduce.campaign_status(out), out, run.json)
        return
    names = reproduce.check_targets(targets or [])
    data, epochs, scale = reproduce.resolve_preset(preset, data, epochs, scale)
    reproduce.check_data_dir(data, data_choice.data_dir)
    started = time.perf_counter()
    loaded, full_per_class = reproduce.load_scaled(data, data_choice.data_dir, scale)
    if preset is None:
        plan = reproduce.make_plan(model, data, epochs, scale, full_per_class)
    else:
        plan = reproduce.make_preset_plan(preset, model, epochs, scale, full_per_class)
    if plan.train_per_class or plan.test_per_class:
        loaded = loaded.subset(plan.train_per_class, plan.test_per_class, plan.seed)
    out.mkdir(parents=True, exist_ok=True)
    reproduce.check_plan(out, plan)
    results = {}
    with progress_bar() as progress:
        campaign = reproduce.Run(plan, loaded, out, resolve_device(run.device), progress)
        for name in names:
            results[name] = reproduce.run_experiment(campaign, name)
    seconds = time.perf_counter() - started
    path = reproduce.write_report(out, plan, results, seconds)
    tables = {
        name: {"title": reproduce.EXPERIMENTS[name].title, "error": result.get("error"),
               "rows": None if result.get("error") else reproduce.EXPERIMENTS[name].rows(result, plan)}
        for name, result in results.items()
    }
    if run.json:
        emit_json({"report": str(path), "seconds": seconds, "experiments": tables})
    for table in tables.values():
        if table["error"]:
            console.print(f"[red]{table['title']}: failed: {table['error']}[/]")
        elif not run.json:
            _print_table(table["title"], table["rows"])
    failed = [name for name, result in results.items() if result.get("error")]
    console.print(f"reproduce finished in {seconds:.0f} s; report: [bold]{path}[/]")
    if failed:
        console.print(f"[red]failed: {', '.join(failed)}[/]")
        raise typer.Exit(1)


def _print_status(status: reproduce.Status, out: Path, as_json: bool) -> None:
    if as_json:
        emit_json(asdict(status) | {"epochs_left": status.epochs_left})
        return
    table = Table(title=f"Reproduction in {out}")
    for column in ("stage", "state", "detail"):
        table.add_column(column)
    for stage in status.stages:
        table.add_row(stage.name, stage.state, stage.detail)
    shown.print(table)
    if status.search_done and not status.epochs_left:
        shown.print("no training left")
        return
    left = f"{status.epochs_left:,} epochs left in the known stages"
    if not status.search_done:
        left += ", and the search's remaining rounds, which depend on their outcomes"
    if status.seconds_per_epoch is not None:
        hours = status.epochs_left * status.seconds_per_epoch / 3600
        left += f"; at the dense training's {status.seconds_per_epoch:.0f} s an epoch, about {hours:.1f} h"
    shown.print(left)

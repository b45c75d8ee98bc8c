"""CLI commands for attacks, the evaluation harness and the demo, merged into the ticketguard app by cli.py."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from ticketguard.artifacts.ticket import Ticket
from ticketguard.attacks import chains
from ticketguard.attacks import removal as attacks
from ticketguard.cli.options import DataChoice, RunOptions, data_options, run_options
from ticketguard.cli.output import console, emit_json, percent, progress_bar, results
from ticketguard.cli.settings import expand_settings
from ticketguard.core.errors import InputError
from ticketguard.core.evidence import check_alpha
from ticketguard.core.files import prepare_output, save_tensors
from ticketguard.experiments import harness, report
from ticketguard.experiments.demo import DEMO, run_demo
from ticketguard.experiments.suspect_attack import attack_suspect
from ticketguard.schemes import keymask as v1
from ticketguard.schemes import signature as v2
from ticketguard.training.loop import resolve_device
from ticketguard.verification.claim import load_claim

commands = typer.Typer()

def _fractions(text: str, option: str, closed: bool) -> tuple[float, ...]:
    """Comma-separated fractions in [0, 1), or [0, 1] when ``closed``."""
    interval = "[0, 1]" if closed else "[0, 1)"
    bad = InputError(f"{option} must be comma-separated fractions in {interval} such as 0.05,0.1,0.2, got {text!r}")
    try:
        values = tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise bad from None
    if not all(0 <= v < 1 or (closed and v == 1) for v in values):
        raise bad
    return values


@commands.command()
@expand_settings
def attack(
    suspect: Annotated[Path, typer.Argument(help="Ticket folder, safetensors or torch state_dict file.")],
    *,
    attack_spec: Annotated[
        str,
        typer.Option(
            "--attack",
            help=(
                f"Attack ({', '.join(attacks.ATTACKS)}) or a chain such as "
                "magnitude:fraction=0.1+finetune:epochs=2."
            ),
        ),
    ],
    out: Annotated[Path, typer.Option(help="File (.safetensors) or folder for the attacked model.")],
    fraction: Annotated[
        float | None,
        typer.Option(
            "--fraction",
            "--ratio",
            help=("Share of the remaining (pruning) or pruned (add-on, fake2) weights."),
        ),
    ] = None,
    weight_scale: Annotated[
        float | None, typer.Option(help="Add-on/fake weights' std, in units of the kept weights' std.")
    ] = None,
    epochs: Annotated[int | None, typer.Option(help="Fine-tuning / transfer epochs.")] = None,
    lr: Annotated[float | None, typer.Option(help="Fine-tuning / transfer learning rate.")] = None,
    free: Annotated[
        bool, typer.Option(help="Fine-tune every weight (dense), not only the kept ones.")
    ] = False,
    threshold: Annotated[
        float | None, typer.Option(help="Defence: prune |W| below t (default: the claim's).")
    ] = None,
    key_density: Annotated[
        float | None, typer.Option(help="fake1: the key's share of kept weights.")
    ] = None,
    payload: Annotated[str | None, typer.Option(help="fake3: the forged text.")] = None,
    claim: Annotated[
        Path | None, typer.Option(help="The owner's claim: code region (fake3), defence t.")
    ] = None,
    data_choice: Annotated[DataChoice, data_options("data", "data_dir", "train_per_class")],
    transfer_data: Annotated[
        str | None, typer.Option(help="Transfer target: a data set, or parity.")
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of the attack's randomness.")] = 0,
    run: Annotated[RunOptions, run_options("device", "force", "json", "trust_code")],
) -> None:
    """Attack a suspect model and write the attacked weights as a new safetensors file."""
    steps = chains.parse_chain(attack_spec)
    path = out if out.suffix == ".safetensors" else out / "attacked.safetensors"
    prepare_output(path, run.force, inputs=[suspect])
    started = time.perf_counter()
    attacked = attack_suspect(
        suspect, steps, claim=load_claim(claim) if claim is not None else None, data=data_choice.data,
        data_dir=data_choice.data_dir, transfer_data=transfer_data, train_per_class=data_choice.train_per_class,
        seed=seed, device=run.device, trust_code=run.trust_code, fraction=fraction, scale=weight_scale,
        epochs=epochs, lr=lr, payload=payload, key_density=key_density, free=free, threshold=threshold,
    )
    save_tensors(path, attacked.weights)
    summary = {"attack": " then ".join(map(str, steps)), "out": str(path), "density_before": attacked.density_before,
               "density": attacked.mask.density(), "seconds": time.perf_counter() - started}
    if run.json:
        emit_json(summary)
    else:
        results.print(f"{summary['attack']}: weights left {percent(summary['density_before'])} -> "
                      f"{percent(summary['density'])}; wrote [bold]{path}[/] in {summary['seconds']:.1f} s")


def _print_rows(rows: list[dict[str, Any]], title: str) -> None:
    table = Table(title=title)
    for column in report.COLUMNS:
        table.add_column(column)
    for row in rows:
        table.add_row(*report.display_row(row).values())
    results.print(table)


def _figures(rows: list[dict[str, Any]], signature: v2.Signature | None, out: Path) -> list[Path]:
    figures = [report.plot_curves(rows, out / "robustness.png")]
    if signature is not None:
        figures.append(report.qr_grid(rows, signature, out / "qr-grid.png"))
    return figures


@commands.command()
@expand_settings
def evaluate(
    ticket_path: Annotated[Path, typer.Argument(metavar="TICKET", help="The protected ticket folder.")],
    *,
    claim: Annotated[Path, typer.Option(help="The owner's claim (signature, trigger set, defence t).")],
    out: Annotated[
        Path, typer.Option(help="Folder for results.json/.csv/.md, the plots and finished points.")
    ] = Path("runs/evaluate"),
    prune: Annotated[
        str, typer.Option(help="Pruning fractions of the remaining weights.")
    ] = "0.05,0.1,0.2,0.3,0.5",
    addon: Annotated[
        str, typer.Option(help="Add-on fractions of the pruned positions.")
    ] = "0.005,0.01,0.05,0.1",
    finetune_epochs: Annotated[int, typer.Option(help="Epochs of the fine-tuning attacks.")] = 3,
    transfer_data: Annotated[
        str | None, typer.Option(help="Also transfer to this data set (or parity).")
    ] = None,
    key_density: Annotated[
        float | None, typer.Option(help="fake1 key size (default: the ticket's V1 key).")
    ] = None,
    data_choice: Annotated[DataChoice, data_options("data_dir", "train_per_class", "test_per_class")],
    run: Annotated[RunOptions, run_options("alpha", "device", "json", "trust_code")],
) -> None:
    """Run an attack grid on a protected ticket and measure accuracy and every piece of evidence."""
    check_alpha(run.alpha)
    prune_fractions = _fractions(prune, "--prune", closed=False)
    addon_fractions = _fractions(addon, "--addon", closed=True)
    if finetune_epochs < 1:
        raise InputError(f"--finetune-epochs must be >= 1, got {finetune_epochs}")
    prepare_output(out / f"{harness.RESULTS}.json", force=True)  # never into a ticket folder; a rerun resumes
    ticket = Ticket.load(ticket_path, trust_code=run.trust_code)
    claimed = load_claim(claim)
    data = data_choice.load(ticket.dataset, 0)
    subject = harness.Subject(
        ticket,
        data,
        claimed,
        key_density or ticket.metadata.get(v1.METADATA_ENTRY, {}).get("key_density"),
        harness.transfer_task(transfer_data, data, data_choice.data_dir),
        run.alpha,
        resolve_device(run.device),
    )
    points = harness.default_grid(
        prune_fractions,
        addon_fractions,
        finetune_epochs,
        subject.transfer_data is not None,
    ) + harness.disguise_grid(finetune_epochs)
    with progress_bar() as progress:
        rows = harness.run_grid(subject, points, out, progress)
    paths = harness.write_results(rows, out)
    figures = _figures(rows, claimed.signature, out)
    if run.json:
        emit_json({"rows": rows, "results": {k: str(v) for k, v in paths.items()}})
    else:
        _print_rows(rows, f"attacks on {ticket_path}")
    console.print(f"results in [bold]{paths['md']}[/], figures {', '.join(map(str, figures))}")


@commands.command()
@expand_settings
def demo(
    *,
    out: Annotated[
        Path, typer.Option(help="Report folder: report.md with the tables, PNGs beside it.")
    ] = Path("runs/demo"),
    run: Annotated[RunOptions, run_options("device", "json")],
    rounds: Annotated[int, typer.Option(hidden=True)] = DEMO.rounds,
    epochs: Annotated[int, typer.Option(hidden=True)] = DEMO.epochs,
    finetune_epochs: Annotated[int, typer.Option(hidden=True)] = DEMO.finetune_epochs,
    train_per_class: Annotated[int | None, typer.Option(hidden=True)] = None,
    test_per_class: Annotated[int | None, typer.Option(hidden=True)] = None,
) -> None:
    """The whole story on the built-in digits: find an extreme ticket, sign it (V2), watermark it (V3), split
    a key (V1), attack it, verify, and write a report with the paper's numbers beside ours."""
    if rounds < 1 or epochs < 2:
        raise InputError(f"the demo needs >= 1 round and >= 2 epochs, got {rounds} and {epochs}")
    config = replace(
        DEMO,
        rounds=rounds,
        epochs=epochs,
        finetune_epochs=finetune_epochs,
        train_per_class=train_per_class,
        test_per_class=test_per_class,
    )
    started = time.perf_counter()
    with progress_bar() as progress:
        outcome = run_demo(out, config, resolve_device(run.device), progress)
    outcome["seconds"] = time.perf_counter() - started
    figures = _figures(outcome["rows"], outcome["signature"], out)
    path = report.write_demo_report(out, outcome, [f.name for f in figures])
    if run.json:
        emit_json({"report": str(path), "seconds": outcome["seconds"], "rows": outcome["rows"]})
    else:
        _print_rows(outcome["rows"], "attacks on the protected ticket")
    console.print(f"demo finished in {outcome['seconds']:.0f} s; report: [bold]{path}[/]")

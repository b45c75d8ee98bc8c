"""CLI commands of the trigger-set scheme (V3), merged into the ticketguard app by cli.py."""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.table import Table

from ticketguard.blackbox import PROTOCOLS, Endpoint, ModelServer, load_served_model, query_labels
from ticketguard.claim import Claim, check_signature, load_claim, save_claim, ticket_hashes
from ticketguard.data import ImageData, dataset_spec
from ticketguard.data.triggers import TriggerSet, keyed_trigger_set, load_trigger_folder
from ticketguard.errors import InputError
from ticketguard.options import DataDir, Device, Epochs, Json, TestPerClass, TrainPerClass, subset_data
from ticketguard.progress import console, progress_bar
from ticketguard.schemes.trigger import (
    CHANCE_MODELS,
    EXTENSION,
    check_chance_model,
    claim_part,
    trigger_evidence,
    trigger_from_claim,
)
from ticketguard.schemes.trigger import watermark as watermark_ticket
from ticketguard.ticket import Ticket
from ticketguard.training import TrainConfig, evaluate, resolve_device, state_copy
from ticketguard.verify import DEFAULT_ALPHA, Verdict

commands = typer.Typer()

TRAIN = TrainConfig()
ENDPOINT = Endpoint("http://127.0.0.1:8080")
STARTS = ("rewind", "weights")


def open_claim(path: Path) -> Claim:
    """The claim to extend, or a new one; a signed one is refused, as the change would void its signature."""
    if not path.exists():
        return Claim(signature=None, ticket_files={})
    claim = load_claim(path)
    if claim.signed is not None:
        raise InputError(
            f"{path} is signed (ed25519), and adding the trigger set would void its signature; write a new "
            "--claim, or run watermark on the unsigned claim and sign it after with `ticketguard sign`"
        )
    return claim


def _trigger_set(
    ticket: Ticket, folder: Path | None, labels: Path | None, seed: int | None, count: int
) -> TriggerSet:
    if (folder is None) == (seed is None):
        raise InputError(
            "give exactly one of --trigger DIR (an image folder) and --trigger-seed N (keyed images)"
        )
    size = tuple(ticket.input_size)
    if folder is not None:
        return load_trigger_folder(folder, ticket.in_channels, size, labels, ticket.num_classes)
    return keyed_trigger_set(seed, count, ticket.num_classes, ticket.in_channels, size)  # type: ignore[arg-type]


def _ticket_data(
    ticket: Ticket,
    data: str | None,
    data_dir: Path | None,
    train_per_class: int | None,
    test_per_class: int | None,
    seed: int,
) -> ImageData:
    """The data WE trains on: the ticket's data set by default, checked against its inputs and classes."""
    dataset = subset_data(data or ticket.dataset, data_dir, train_per_class, test_per_class, seed)
    expected = (ticket.in_channels, *ticket.input_size)
    if dataset.input_shape != expected or dataset.num_classes != ticket.num_classes:
        raise InputError(
            f"the data set has inputs {dataset.input_shape} and {dataset.num_classes} classes, "
            f"but the ticket takes {expected} and {ticket.num_classes}"
        )
    return dataset


@commands.command("watermark")
def watermark(
    ticket_path: Annotated[Path, typer.Argument(metavar="TICKET", help="The ticket folder to watermark.")],
    out: Annotated[Path, typer.Option(help="Folder to write the watermarked ticket to.")],
    claim: Annotated[Path, typer.Option(help="Claim JSON to write, or to extend when it exists.")],
    trigger: Annotated[
        Optional[Path], typer.Option(help="Trigger folder: images (or pics/) + a label file.")
    ] = None,
    labels: Annotated[
        Optional[Path], typer.Option(help="The trigger folder's label file, if not its only *.txt.")
    ] = None,
    trigger_seed: Annotated[Optional[int], typer.Option(help="Secret seed of a keyed trigger set.")] = None,
    trigger_count: Annotated[int, typer.Option(help="Images in a keyed trigger set.")] = 100,
    per_batch: Annotated[int, typer.Option(help="Trigger images appended to every batch (paper: 1).")] = 1,
    start: Annotated[
        str, typer.Option(help="Train from the ticket's rewind W_k or fine-tune its weights.")
    ] = "rewind",
    data: Annotated[Optional[str], typer.Option(help="Data set (default: the ticket's).")] = None,
    data_dir: DataDir = None,
    epochs: Epochs = None,
    batch_size: Annotated[int, typer.Option(help="Batch size of the ticket's data.")] = TRAIN.batch_size,
    lr: Annotated[
        float, typer.Option(help="Peak learning rate (x0.1 at 50% and 75% of the epochs).")
    ] = TRAIN.lr,
    weight_decay: Annotated[float, typer.Option(help="Weight decay.")] = TRAIN.weight_decay,
    train_per_class: TrainPerClass = None,
    test_per_class: TestPerClass = None,
    chance: Annotated[
        str, typer.Option(help=f"Chance model of the claim: {', '.join(CHANCE_MODELS)}.")
    ] = "suspect",
    seed: Annotated[int, typer.Option(help="Seed of batch order and augmentation.")] = TRAIN.seed,
    device: Device = "auto",
) -> None:
    """Retrain a ticket with a trigger set mixed into every batch (WE); record the trigger set in a claim."""
    if start not in STARTS:
        raise InputError(f"--start must be one of {', '.join(STARTS)}, got {start!r}")
    check_chance_model(chance)
    if out.exists() and any(out.iterdir()):
        raise InputError(f"{out} already exists and is not empty; choose another --out")
    claim_data = open_claim(claim)
    ticket = Ticket.load(ticket_path)
    triggers = _trigger_set(ticket, trigger, labels, trigger_seed, trigger_count)
    dataset = _ticket_data(ticket, data, data_dir, train_per_class, test_per_class, seed)
    config = TrainConfig(
        epochs=epochs or dataset_spec(dataset.name).default_epochs,
        batch_size=batch_size,
        lr=lr,
        weight_decay=weight_decay,
        seed=seed,
    )
    target = resolve_device(device)
    accuracy_before = evaluate(ticket.build_model("weights").to(target), dataset)
    model = ticket.build_model(start).to(target)
    with progress_bar() as progress:
        result = watermark_ticket(
            model, dataset, triggers, config, ticket.mask, per_batch=per_batch, progress=progress
        )
    mean, std = dataset.channel_stats()
    marked = replace(
        ticket,
        weights=state_copy(model),
        accuracy=result.accuracy,
        metadata={
            **ticket.metadata,
            "normalization": {"mean": mean.tolist(), "std": std.tolist()},
            "watermark": {
                "scheme": "trigger",
                "per_batch": per_batch,
                "start": start,
                "epochs": config.epochs,
                "accuracy_before": accuracy_before,
                "trigger_accuracy": result.trigger_accuracy,
                "history": result.history,
            },
        },
    )
    marked.save(out)
    claim_data.ticket_files = ticket_hashes(out)  # the claim now names the watermarked ticket that ships
    claim_data.extensions[EXTENSION] = claim_part(
        triggers,
        ticket.num_classes,
        chance,
        accuracy=result.accuracy,
        accuracy_before=accuracy_before,
        trigger_accuracy=result.trigger_accuracy,
    )
    save_claim(claim, claim_data)
    table = Table(title=f"watermarked ticket {out}", show_header=False)
    table.add_row("trigger set", f"{len(triggers)} images ({triggers.source['kind']}), {per_batch} per batch")
    table.add_row("test accuracy", f"{100 * accuracy_before:.2f}% -> {100 * result.accuracy:.2f}%")
    table.add_row("trigger accuracy", f"{100 * result.trigger_accuracy:.2f}%")
    table.add_row("claim", str(claim))
    console.print(table)


def _claim_trigger(path: Path) -> tuple[dict[str, Any], bool]:
    """The trigger part of a claim, and whether an Ed25519 signature vouches for it (a bad one is refused)."""
    claim = load_claim(path)
    signed = check_signature(claim)
    part = claim.extensions.get(EXTENSION)
    if not isinstance(part, dict):
        raise InputError(f"{path} holds no trigger set (extensions.{EXTENSION}); make one with watermark")
    return part, signed


@commands.command()
def query(
    url: Annotated[str, typer.Argument(help="The suspect's server URL, or its full infer/predict URL.")],
    claim: Annotated[Path, typer.Option(help="Claim JSON with the trigger set (extensions.trigger).")],
    protocol: Annotated[
        str, typer.Option(help=f"API: {', '.join(PROTOCOLS)} (Open Inference v2, plain JSON).")
    ] = ENDPOINT.protocol,
    model: Annotated[
        str, typer.Option(help="Model name in the v2 path /v2/models/NAME/infer.")
    ] = ENDPOINT.model,
    input_name: Annotated[str, typer.Option(help="v2 input tensor name.")] = ENDPOINT.input_name,
    output_name: Annotated[
        Optional[str], typer.Option(help="v2 output to read (default: the first).")
    ] = None,
    request_field: Annotated[
        str, typer.Option(help="JSON request field holding the images.")
    ] = ENDPOINT.request_field,
    response_field: Annotated[
        str, typer.Option(help="JSON answer field with labels or scores.")
    ] = ENDPOINT.response_field,
    batch_size: Annotated[int, typer.Option(help="Images per request.")] = ENDPOINT.batch_size,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for each answer.")] = ENDPOINT.timeout_s,
    retries: Annotated[
        int, typer.Option(help="Retries per request after a network error or overload.")
    ] = ENDPOINT.retries,
    pixel_max: Annotated[
        float, typer.Option(help="Pixels are sent in [0, PIXEL_MAX] (1 or 255).")
    ] = ENDPOINT.pixel_max,
    trigger: Annotated[
        Optional[Path], typer.Option(help="Trigger folder, if it moved since the claim.")
    ] = None,
    chance: Annotated[Optional[str], typer.Option(help="Chance model (default: the claim's).")] = None,
    alpha: Annotated[float, typer.Option(help="False-claim rate of the decision.")] = DEFAULT_ALPHA,
    as_json: Json = False,
) -> None:
    """Ask a suspect's prediction API for the trigger labels; exit 0 if ownership is shown, 1 if not."""
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request would bury the verdict
    endpoint = Endpoint(
        url,
        protocol,
        model,
        input_name,
        output_name,
        request_field,
        response_field,
        batch_size,
        timeout,
        retries,
        pixel_max,
    )
    part, signed = _claim_trigger(claim)
    triggers = trigger_from_claim(part, trigger)
    predicted = query_labels(endpoint, triggers.images)
    evidence = trigger_evidence(
        predicted, triggers.labels, int(part["classes"]), chance or part.get("chance_model", "suspect"), alpha
    )
    verdict = Verdict((evidence,), alpha)
    if as_json:
        typer.echo(
            json.dumps({"url": endpoint.infer_url(), "claim_signed": signed, **verdict.to_json()}, indent=2)
        )
    else:
        table = Table(title=f"trigger check of {endpoint.infer_url()}", show_header=False)
        details = evidence.details
        table.add_row(
            "trigger accuracy", f"{100 * evidence.score:.1f}% ({details['agreed']}/{details['trials']})"
        )
        table.add_row("chance", f"{100 * details['chance']:.1f}% ({details['chance_model']})")
        table.add_row("needed at alpha", f"{100 * evidence.threshold:.1f}% (alpha {alpha:g})")
        table.add_row("p-value", f"{evidence.p_value:.3g}")
        table.add_row("claim", "signed, signature valid" if signed else "not signed")
        table.add_row("decision", "[green]ownership shown[/]" if verdict.owned else "[yellow]not shown[/]")
        console.print(table)
    raise typer.Exit(0 if verdict.owned else 1)


def _floats(text: str | None, option: str) -> list[float] | None:
    if text is None:
        return None
    try:
        return [float(part) for part in text.split(",")]
    except ValueError:
        raise InputError(
            f"{option} must be comma-separated numbers such as 0.49,0.48,0.45, got {text!r}"
        ) from None


@commands.command()
def serve(
    path: Annotated[Path, typer.Argument(help="A ticket folder, or a model file (.safetensors, .pt, .pth).")],
    port: Annotated[int, typer.Option(help="TCP port (0: any free one).")] = 8080,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    name: Annotated[str, typer.Option(help="Model name in /v2/models/NAME.")] = ENDPOINT.model,
    input_size: Annotated[
        Optional[int], typer.Option(help="Input height = width (needed for model files).")
    ] = None,
    mean: Annotated[
        Optional[str], typer.Option(help="Channel means of pixels in [0, 1], comma-separated.")
    ] = None,
    std: Annotated[Optional[str], typer.Option(help="Channel standard deviations, comma-separated.")] = None,
) -> None:
    """Serve a model over the Open Inference Protocol v2 (and KServe v1 predict) until interrupted."""
    served = load_served_model(path, name, input_size, _floats(mean, "--mean"), _floats(std, "--std"))
    server = ModelServer(served, host, port)
    console.print(f"serving [bold]{path}[/] as {server.url}/v2/models/{name} (Ctrl-C stops)")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        console.print("stopped")
    finally:
        server.stop()

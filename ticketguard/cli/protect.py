"""CLI commands that protect a ticket: protect (V2 + V3 in one retraining), embed (V2) and watermark (V3).

All three call ``ticketguard.protect``; retraining follows the training settings the ticket records unless an
option overrides them.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Any

import typer
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from rich.table import Table

from ticketguard.artifacts.ticket import Ticket
from ticketguard.cli.options import (
    ALPHA,
    Alpha,
    BatchSize,
    DataDir,
    Device,
    Epochs,
    Force,
    Json,
    Lr,
    Momentum,
    Schedule,
    Seed,
    SigningKey,
    TestPerClass,
    TrainPerClass,
    TrustCode,
    WeightDecay,
    training_overrides,
)
from ticketguard.cli.output import console, emit_json, percent, progress_bar, results
from ticketguard.core.errors import InputError
from ticketguard.data import ImageData, load_subset
from ticketguard.data.triggers import TriggerSet, load_trigger_folder
from ticketguard.protect import (
    STARTS,
    Protected,
    SignatureConfig,
    TriggerConfig,
    check_destinations,
    keyed_trigger_for,
    protect,
    sign_mask,
    signature_to_carry,
)
from ticketguard.schemes import signature as v2
from ticketguard.schemes.trigger import CHANCE_MODELS
from ticketguard.training.loop import resolve_device
from ticketguard.verification.claim import Claim, load_private_key

commands = typer.Typer()

Payload = Annotated[str | None, typer.Option("--payload", "--signature", help="Text to embed as a QR code in the mask, e.g. ACME-R20-2026 (--signature is the old name).")]
Out = Annotated[Path, typer.Option(help="Folder for the protected ticket (to ship).")]
ClaimPath = Annotated[Path | None, typer.Option(help="Secret claim file to write (default: OUT.claim.json).")]
Copies = Annotated[int, typer.Option(help="Copies of the code, each in another conv layer.")]
QrVersion = Annotated[int | None, typer.Option(help="QR version (default: the smallest that fits).")]
ErrorLevel = Annotated[str, typer.Option(help="QR error-correction level: L, M, Q or H.")]
WeightsPerConnection = Annotated[int, typer.Option(help="Kernel weights kept per code connection.")]
Polarity = Annotated[str, typer.Option(help="Colour of kept connections: dark (robust to pruning), light or any.")]
TriggerDir = Annotated[Path | None, typer.Option(help="Trigger folder: images (or pics/) + a label file.")]
TriggerLabels = Annotated[Path | None, typer.Option(help="The trigger folder's label file, if not its only *.txt.")]
TriggerSeed = Annotated[int | None, typer.Option(help="Secret seed of a keyed trigger set.")]
TriggerCount = Annotated[int, typer.Option(help="Images in a keyed trigger set.")]
PerBatch = Annotated[int | None, typer.Option(help="Trigger images appended to every batch (default: 1 per 16).")]
Chance = Annotated[str, typer.Option(help=f"Chance model of the trigger test: {', '.join(CHANCE_MODELS)}.")]
Start = Annotated[str, typer.Option(help="Train from the ticket's rewind W_k or fine-tune its weights.")]
Data = Annotated[str | None, typer.Option(help="Data set (default: the ticket's).")]


def _trigger(ticket: Ticket, folder: Path | None, labels: Path | None, seed: int | None, count: int) -> TriggerSet:
    if folder is not None and seed is not None:
        raise InputError("give one of --trigger DIR (an image folder) and --trigger-seed N (keyed images)")
    if folder is not None:
        return load_trigger_folder(folder, ticket.in_channels, tuple(ticket.input_size), labels, ticket.num_classes)
    if seed is None:
        raise InputError("give --trigger DIR (an image folder) or --trigger-seed N (keyed images)")
    return keyed_trigger_for(ticket, seed, count)


def _data(ticket: Ticket, name: str | None, folder: Path | None, train_per_class: int | None,
          test_per_class: int | None, seed: int) -> ImageData:
    return load_subset(name or ticket.dataset, folder, train_per_class, test_per_class, seed)


def _claim_path(out: Path, claim: Path | None) -> Path:
    return claim or out.with_name(out.name + ".claim.json")


def _protect_and_save(
    ticket: Ticket, data: ImageData, device: str, out: Path, claim_path: Path, key: Ed25519PrivateKey | None,
    force: bool, as_json: bool, tsa_url: str | None = None, **settings: Any,
) -> None:
    """The one retraining (with a progress bar), then the ticket and claim written, then the result printed."""
    started = time.perf_counter()
    with progress_bar() as progress:
        protected = protect(ticket, data, device=resolve_device(device), progress=progress, **settings)
    protected.save(out, claim_path, key, force, tsa_url)
    _finish(_report(protected, out, claim_path, key is not None, time.perf_counter() - started), as_json)


def _report(protected: Protected, out: Path, claim_path: Path, signed: bool, seconds: float) -> dict[str, Any]:
    claim, ticket = protected.claim, protected.ticket
    return {
        "ticket": str(out), "claim": str(claim_path), "claim_signed": signed,
        "signature": None if claim.signature is None else claim.signature.to_json(),
        "trigger": None if claim.trigger is None else {"count": len(claim.trigger.labels), **claim.trigger.measured},
        "density": ticket.mask.density(), "seconds": seconds, **protected.report,
    }


def _finish(report: dict[str, Any], as_json: bool) -> None:
    """Print the result; exit 1 when the protected ticket fails its own verification."""
    if as_json:
        emit_json(report)
    else:
        table = Table(title=f"protected ticket {report['ticket']}", show_header=False)
        signature = report["signature"]
        if signature is not None:
            table.add_row("signature", f"{signature['payload']!r}: QR version {signature['version']}, level "
                          f"{signature['error']}, in {', '.join(r['layer'] for r in signature['regions'])}")
        if report["trigger"] is not None:
            table.add_row("trigger set", f"{report['trigger']['count']} images, {report.get('per_batch')} per batch, "
                          f"trigger accuracy {percent(report.get('trigger_accuracy'))}")
        table.add_row("accuracy", f"{percent(report['accuracy_before'])} -> {percent(report['accuracy'])}")
        table.add_row("weights left", percent(report["density"], 3))
        table.add_row("self-check", report["self_check"]["decision"])
        table.add_row("claim (keep secret)", f"{report['claim']}{' (signed)' if report['claim_signed'] else ''}")
        results.print(table)
        console.print(f"done in {report['seconds']:.0f} s")
    if not report["self_check"]["owned"]:
        console.print("[red]the protected ticket does not pass its own verification; train longer (--epochs) or "
                      "mix in more trigger images (--per-batch) before shipping it[/]")
        raise typer.Exit(1)


@commands.command("protect")
def protect_command(
    ticket_path: Annotated[Path, typer.Argument(metavar="TICKET", help="Ticket folder to protect.")],
    out: Out,
    payload: Payload = None,
    claim: ClaimPath = None,
    signing_key: SigningKey = None,
    tsa: Annotated[str | None, typer.Option(
        help="URL of an RFC 3161 time-stamping authority that stamps the claim as it is written.")] = None,
    trigger: TriggerDir = None,
    trigger_labels: TriggerLabels = None,
    trigger_seed: TriggerSeed = None,
    trigger_count: TriggerCount = 100,
    per_batch: PerBatch = None,
    chance: Chance = "suspect",
    copies: Copies = 1,
    qr_version: QrVersion = None,
    error: ErrorLevel = "H",
    weights_per_connection: WeightsPerConnection = v2.DEFAULT_WEIGHTS_PER_CONNECTION,
    polarity: Polarity = "dark",
    data: Data = None,
    data_dir: DataDir = None,
    train_per_class: TrainPerClass = None,
    test_per_class: TestPerClass = None,
    epochs: Epochs = None,
    batch_size: BatchSize = None,
    lr: Lr = None,
    momentum: Momentum = None,
    weight_decay: WeightDecay = None,
    seed: Seed = None,
    schedule: Schedule = None,
    alpha: Alpha = ALPHA,
    device: Device = "auto",
    force: Force = False,
    as_json: Json = False,
    trust_code: TrustCode = False,
) -> None:
    """Sign the mask (QR payload) and/or watermark the weights (trigger set) in ONE retraining from W_k; write
    the protected ticket and the secret claim. Exit 1 if the result fails its own verification."""
    claim_path = _claim_path(out, claim)
    check_destinations(out, claim_path, force)
    key = load_private_key(signing_key) if signing_key else None
    ticket = Ticket.load(ticket_path, trust_code=trust_code)
    marking = None
    if trigger is not None or trigger_seed is not None:
        marking = TriggerConfig(_trigger(ticket, trigger, trigger_labels, trigger_seed, trigger_count), per_batch, chance)
    signing = None if payload is None else SignatureConfig(payload, qr_version, error, copies, weights_per_connection, polarity)
    config = ticket.train_config(**training_overrides(epochs, batch_size, lr, momentum, weight_decay, seed, schedule))
    dataset = _data(ticket, data, data_dir, train_per_class, test_per_class, config.seed)
    _protect_and_save(ticket, dataset, device, out, claim_path, key, force, as_json, tsa,
                      signature=signing, trigger=marking, train_config=config, alpha=alpha)


@commands.command()
def embed(
    ticket_path: Annotated[Path, typer.Argument(metavar="TICKET", help="Ticket folder to protect.")],
    payload: Payload,
    out: Out,
    claim: ClaimPath = None,
    signing_key: Annotated[Path | None, typer.Option("--signing-key", help="Owner's Ed25519 private key (PEM) that signs the claim.")] = None,
    train: Annotated[bool, typer.Option("--train/--no-train", help="Retrain with the signed mask now; --no-train leaves training to `watermark`, so the two-step flow trains once.")] = True,
    copies: Copies = 1,
    qr_version: QrVersion = None,
    error: ErrorLevel = "H",
    weights_per_connection: WeightsPerConnection = v2.DEFAULT_WEIGHTS_PER_CONNECTION,
    polarity: Polarity = "dark",
    data_dir: DataDir = None,
    train_per_class: TrainPerClass = None,
    epochs: Epochs = None,
    batch_size: BatchSize = None,
    lr: Lr = None,
    momentum: Momentum = None,
    weight_decay: WeightDecay = None,
    seed: Seed = None,
    schedule: Schedule = None,
    alpha: Alpha = ALPHA,
    device: Device = "auto",
    force: Force = False,
    as_json: Json = False,
    trust_code: TrustCode = False,
) -> None:
    """Write a QR signature into the ticket's mask (V2) and retrain; save the protected ticket and the claim."""
    if payload is None:
        raise InputError("give the text to embed with --payload, e.g. --payload ACME-R20-2026")
    claim_path = _claim_path(out, claim)
    check_destinations(out, claim_path, force)
    key = load_private_key(signing_key) if signing_key else None
    ticket = Ticket.load(ticket_path, trust_code=trust_code)
    signing = SignatureConfig(payload, qr_version, error, copies, weights_per_connection, polarity)
    if not train:
        signed, found, _ = sign_mask(ticket, signing)
        Protected(signed, Claim(found, {})).save(out, claim_path, key, force)
        results.print(f"signature {payload!r} written into the mask of {out} (not trained yet: run "
                      f"`ticketguard watermark {out} --claim {claim_path}` to train it with a trigger set)")
        return
    config = ticket.train_config(**training_overrides(epochs, batch_size, lr, momentum, weight_decay, seed, schedule))
    dataset = _data(ticket, None, data_dir, train_per_class, None, config.seed)
    _protect_and_save(ticket, dataset, device, out, claim_path, key, force, as_json,
                      signature=signing, train_config=config, alpha=alpha)


@commands.command()
def watermark(
    ticket_path: Annotated[Path, typer.Argument(metavar="TICKET", help="The ticket folder to watermark.")],
    out: Out,
    claim: Annotated[Path, typer.Option(help="Claim to write; an unsigned claim of this ticket (from embed) is extended.")],
    trigger: TriggerDir = None,
    trigger_labels: Annotated[Path | None, typer.Option("--trigger-labels", "--labels", help="The trigger folder's label file, if not its only *.txt (--labels is the old name).")] = None,
    trigger_seed: TriggerSeed = None,
    trigger_count: TriggerCount = 100,
    per_batch: PerBatch = None,
    chance: Chance = "suspect",
    start: Start = "rewind",
    data: Data = None,
    data_dir: DataDir = None,
    train_per_class: TrainPerClass = None,
    test_per_class: TestPerClass = None,
    epochs: Epochs = None,
    batch_size: BatchSize = None,
    lr: Lr = None,
    momentum: Momentum = None,
    weight_decay: WeightDecay = None,
    seed: Seed = None,
    schedule: Schedule = None,
    alpha: Alpha = ALPHA,
    device: Device = "auto",
    force: Force = False,
    as_json: Json = False,
    trust_code: TrustCode = False,
) -> None:
    """Retrain a ticket with a trigger set mixed into every batch (V3); the claim keeps a signature from embed."""
    if start not in STARTS:
        raise InputError(f"--start must be one of {', '.join(STARTS)}, got {start!r}")
    existing = signature_to_carry(claim, ticket_path)
    check_destinations(out, claim, force, extend_claim=existing is not None)
    ticket = Ticket.load(ticket_path, trust_code=trust_code)
    marking = TriggerConfig(_trigger(ticket, trigger, trigger_labels, trigger_seed, trigger_count), per_batch, chance)
    config = ticket.train_config(**training_overrides(epochs, batch_size, lr, momentum, weight_decay, seed, schedule))
    dataset = _data(ticket, data, data_dir, train_per_class, test_per_class, config.seed)
    # an extended claim is rewritten on purpose; the ticket folder was checked above
    _protect_and_save(ticket, dataset, device, out, claim, None, True, as_json,
                      trigger=marking, train_config=config, start=start, existing=existing, alpha=alpha)

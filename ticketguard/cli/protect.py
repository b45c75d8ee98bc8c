"""CLI commands that protect a ticket: protect (V2 + V3 in one retraining), embed (V2) and watermark (V3).

All three call ``ticketguard.protect``; retraining follows the training settings the ticket records unless an
option overrides them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Annotated, Any

import typer
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from rich.table import Table

from ticketguard.artifacts.ticket import Ticket
from ticketguard.cli.options import Data, DataChoice, Run, RunOptions, TrainingOverrides, data_options
from ticketguard.cli.output import console, emit_json, percent, progress_bar, results
from ticketguard.cli.settings import Settings, expand_settings
from ticketguard.core.errors import InputError
from ticketguard.core.settings import setting
from ticketguard.data import ImageData
from ticketguard.protect import (
    STARTS,
    Protected,
    SignatureConfig,
    TriggerConfig,
    TriggerSource,
    check_destinations,
    protect,
    sign_mask,
    signature_to_carry,
)
from ticketguard.training.loop import resolve_device
from ticketguard.verification.claim import Claim, load_private_key

commands = typer.Typer()

PAYLOAD = {"payload": ("--payload", "--signature")}
Signing = Annotated[dict[str, Any], Settings(SignatureConfig, flags=PAYLOAD)]
OptionalSigning = Annotated[dict[str, Any], Settings(SignatureConfig, optional=True, flags=PAYLOAD)]
TRIGGER_FOLDER = {"folder": ("--trigger",)}
Source = Annotated[dict[str, Any], Settings(TriggerSource, prefix="trigger", flags=TRIGGER_FOLDER)]
Mixing = Annotated[dict[str, Any], Settings(TriggerConfig, flags={"chance_model": ("--chance",)})]
Start = Annotated[str, typer.Option(help="Train from the ticket's rewind W_k or fine-tune its weights.")]


@dataclass(frozen=True)
class Destination:
    """Where the protected ticket and its secret claim are written, and the owner's key that signs the claim."""

    out: Path = setting(help="Folder for the protected ticket (to ship).")
    claim: Path | None = setting(None, help="Secret claim file to write (default: OUT.claim.json).")
    signing_key: Path | None = setting(None, help="Owner's Ed25519 private key (PEM) that signs the claim.")

    def prepare(self, force: bool) -> tuple[Path, Ed25519PrivateKey | None]:
        """The claim file to write and the key that signs it (None: unsigned), once both files may be written."""
        claim = self.claim or self.out.with_name(self.out.name + ".claim.json")
        check_destinations(self.out, claim, force)
        return claim, load_private_key(self.signing_key) if self.signing_key else None


Destinations = Annotated[Destination, Settings(Destination)]


def _protect_and_save(
    ticket: Ticket, data: ImageData, run: RunOptions, out: Path, claim_path: Path, key: Ed25519PrivateKey | None,
    tsa_url: str | None = None, **settings: Any,
) -> None:
    """The one retraining (with a progress bar), then the ticket and claim written, then the result printed."""
    started = time.perf_counter()
    with progress_bar() as progress:
        protected = protect(ticket, data, device=resolve_device(run.device), progress=progress, alpha=run.alpha,
                            **settings)
    protected.save(out, claim_path, key, run.force, tsa_url)
    _finish(_report(protected, out, claim_path, key is not None, time.perf_counter() - started), run.json)


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
@expand_settings
def protect_command(
    ticket_path: Annotated[Path, typer.Argument(metavar="TICKET", help="Ticket folder to protect.")],
    *,
    signing: OptionalSigning,
    destination: Destinations,
    tsa: Annotated[str | None, typer.Option(
        help="URL of an RFC 3161 time-stamping authority that stamps the claim as it is written.")] = None,
    source: Source,
    mixing: Mixing,
    data_choice: Data,
    training: TrainingOverrides,
    run: Run,
) -> None:
    """Sign the mask (QR payload) and/or watermark the weights (trigger set) in ONE retraining from W_k; write
    the protected ticket and the secret claim. Exit 1 if the result fails its own verification."""
    claim_path, key = destination.prepare(run.force)
    ticket = Ticket.load(ticket_path, trust_code=run.trust_code)
    trigger_source = TriggerSource(**source)
    marking = TriggerConfig(trigger_source.load(ticket), **mixing) if trigger_source.given else None
    signature = SignatureConfig(**signing) if "payload" in signing else None
    config = ticket.train_config(**training)
    _protect_and_save(ticket, data_choice.load(ticket.dataset, config.seed), run, destination.out, claim_path, key,
                      tsa, signature=signature, trigger=marking, train_config=config)


@commands.command()
@expand_settings
def embed(
    ticket_path: Annotated[Path, typer.Argument(metavar="TICKET", help="Ticket folder to protect.")],
    *,
    signing: Signing,
    destination: Destinations,
    train: Annotated[bool, typer.Option("--train/--no-train", help="Retrain with the signed mask now; --no-train leaves training to `watermark`, so the two-step flow trains once.")] = True,
    data_choice: Annotated[DataChoice, data_options("data_dir", "train_per_class")],
    training: TrainingOverrides,
    run: Run,
) -> None:
    """Write a QR signature into the ticket's mask (V2) and retrain; save the protected ticket and the claim."""
    claim_path, key = destination.prepare(run.force)
    ticket = Ticket.load(ticket_path, trust_code=run.trust_code)
    signature = SignatureConfig(**signing)
    out = destination.out
    if not train:
        signed, found, _ = sign_mask(ticket, signature)
        Protected(signed, Claim(found, {})).save(out, claim_path, key, run.force)
        results.print(f"signature {signature.payload!r} written into the mask of {out} (not trained yet: run "
                      f"`ticketguard watermark {out} --claim {claim_path}` to train it with a trigger set)")
        return
    config = ticket.train_config(**training)
    _protect_and_save(ticket, data_choice.load(ticket.dataset, config.seed), run, out, claim_path, key,
                      signature=signature, train_config=config)


@commands.command()
@expand_settings
def watermark(
    ticket_path: Annotated[Path, typer.Argument(metavar="TICKET", help="The ticket folder to watermark.")],
    *,
    destination: Annotated[Destination, Settings(Destination, ("out",))],
    claim: Annotated[Path, typer.Option(help="Claim to write; an unsigned claim of this ticket (from embed) is extended.")],
    source: Annotated[dict[str, Any], Settings(
        TriggerSource, prefix="trigger", flags={**TRIGGER_FOLDER, "labels": ("--trigger-labels", "--labels")}
    )],
    mixing: Mixing,
    start: Start = "rewind",
    data_choice: Data,
    training: TrainingOverrides,
    run: Run,
) -> None:
    """Retrain a ticket with a trigger set mixed into every batch (V3); the claim keeps a signature from embed."""
    if start not in STARTS:
        raise InputError(f"--start must be one of {', '.join(STARTS)}, got {start!r}")
    existing = signature_to_carry(claim, ticket_path)
    check_destinations(destination.out, claim, run.force, extend_claim=existing is not None)
    ticket = Ticket.load(ticket_path, trust_code=run.trust_code)
    marking = TriggerConfig(TriggerSource(**source).load(ticket), **mixing)
    config = ticket.train_config(**training)
    # an extended claim is rewritten on purpose; the ticket folder was checked above
    _protect_and_save(ticket, data_choice.load(ticket.dataset, config.seed), replace(run, force=True),
                      destination.out, claim, None, trigger=marking, train_config=config, start=start,
                      existing=existing)

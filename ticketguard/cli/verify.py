"""CLI commands that check a suspect against a claim (verify, extract) and manage the owner's keys and claims
(keygen, sign, commit, timestamp) and orders rival claims (dispute).

``verify`` and ``extract --claim`` exit 0 when ownership is shown, 1 when not, 2 on bad input.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from ticketguard.artifacts.suspect import load_suspect
from ticketguard.cli.options import JsonOutput, PublicKey, RunOptions, TsaCert, run_options
from ticketguard.cli.output import console, emit_json, print_verdict, progress_bar, results
from ticketguard.cli.settings import expand_settings
from ticketguard.core.errors import InputError
from ticketguard.schemes.blind_scan import DEFAULT_BUDGET_S, BlindScan, blind_scan
from ticketguard.training.loop import resolve_device
from ticketguard.verification.claim import commitment as claim_commitment
from ticketguard.verification.claim import (
    generate_keys,
    load_claim,
    load_private_key,
    load_public_key,
    read_pem,
    save_claim,
    sign,
    stamp,
)
from ticketguard.verification.dispute import dispute
from ticketguard.verification.verify import verify as verify_suspect

commands = typer.Typer()

Suspect = Annotated[Path, typer.Argument(help="Ticket folder, safetensors or torch state_dict file.")]
Image = Annotated[Path | None, typer.Option(help="Write the extracted QR code next to the expected one (PNG).")]
SuspectModel = Annotated[str | None, typer.Option(
    "--model",
    help="The suspect's architecture by import path (package.module:factory), to run the trigger check on weights "
    "of a model that is not built in. Importing runs that code.",
)]
TriggerFolder = Annotated[Path | None, typer.Option(help="Where the claim's trigger folder lives now, if it moved.")]


@commands.command()
@expand_settings
def verify(
    suspect: Suspect,
    *,
    claim: Annotated[Path, typer.Option(help="The owner's claim file.")],
    image: Image = None,
    public_key: PublicKey = None,
    trigger_folder: TriggerFolder = None,
    model: SuspectModel = None,
    commitment: Annotated[str | None, typer.Option(
        help="The digest the owner published with `ticketguard commit`; the claim must match it.")] = None,
    tsa_cert: TsaCert = None,
    run: Annotated[RunOptions, run_options("alpha", "device", "json")],
) -> None:
    """Check every piece of evidence the claim holds (QR signature, trigger set) on a suspect's weights:
    exit 0 ownership shown, 1 not shown, 2 bad input."""
    _verify(suspect, claim, image, public_key, trigger_folder, run, model, commitment, tsa_cert)


@commands.command()
@expand_settings
def extract(
    suspect: Suspect,
    *,
    claim: Annotated[Path | None, typer.Option(help="The owner's claim; without it, scan for any code.")] = None,
    image: Image = None,
    public_key: PublicKey = None,
    budget: Annotated[float, typer.Option(
        help="Seconds the scan without a claim may take; it then stops and says what it left out.")
    ] = DEFAULT_BUDGET_S,
    run: Annotated[RunOptions, run_options("alpha", "json")],
) -> None:
    """Read the signature from a suspect: with a claim, verify it; without, scan every conv and linear layer
    for any code (exit 0 when one is found)."""
    if claim is not None:
        _verify(suspect, claim, image, public_key, None, replace(run, device="cpu"))
        return
    if image is not None:
        raise InputError("--image needs --claim: without one there is no expected code to compare with")
    weights = load_suspect(suspect).weights
    with progress_bar() as progress:
        scan = blind_scan(weights, budget_s=budget, progress=progress)
    if run.json:
        emit_json(scan.to_json())
    else:
        _print_found(scan)
    raise typer.Exit(0 if scan.found else 1)


def _verify(suspect: Path, claim: Path, image: Path | None, public_key: Path | None, trigger_folder: Path | None,
            run: RunOptions, model: str | None = None, commitment: str | None = None,
            tsa_cert: Path | None = None) -> None:
    verdict = verify_suspect(
        suspect, claim, alpha=run.alpha, public_key=load_public_key(public_key) if public_key else None,
        trigger_folder=trigger_folder, qr_image=image, device=resolve_device(run.device), model=model,
        commitment=commitment, tsa_certificate=read_pem(tsa_cert) if tsa_cert is not None else None,
    )
    report = {"suspect": str(suspect), **verdict.to_json()}
    if run.json:
        emit_json(report)
    else:
        print_verdict(report, f"verify {suspect}")
    raise typer.Exit(0 if verdict.owned else 1)


def _print_found(scan: BlindScan) -> None:
    if scan.found:
        table = Table(title="QR codes found")
        for column in ("layer", "offset", "QR", "kept", "text", "decoder"):
            table.add_column(column)
        for item in scan.found:
            table.add_row(item.layer, f"({item.row}, {item.col})", f"v{item.version} mask {item.mask_pattern}",
                          "dark" if item.kept_is_dark else "light", item.text, item.method)
        results.print(table)
    results.print(scan.summary())


@commands.command()
@expand_settings
def keygen(
    *,
    out: Annotated[Path, typer.Option(help="Folder for owner.key (private, mode 0600) and owner.pub.")] = Path("."),
    run: JsonOutput,
) -> None:
    """Make an Ed25519 key pair for signing claims (an existing key is never overwritten)."""
    private_path, public_path = generate_keys(out)
    if run.json:
        emit_json({"private_key": str(private_path), "public_key": str(public_path)})
    else:
        results.print(f"private key {private_path} (keep secret), public key {public_path} (share)")


@commands.command()
@expand_settings
def commit(
    claim: Annotated[Path, typer.Argument(help="The claim file to commit to.")],
    *,
    run: JsonOutput,
) -> None:
    """Print the claim's commitment: a digest to publish now (model card, README, a transparency log) that
    reveals nothing of the secret; later, `verify --commitment HEX` shows the claim is the one published."""
    digest = claim_commitment(load_claim(claim))
    if run.json:
        emit_json({"claim": str(claim), "commitment": digest, "hash": "sha256 of the canonical claim body"})
    else:
        results.print(digest, highlight=False)


@commands.command()
def timestamp(
    claim: Annotated[Path, typer.Argument(help="The claim file to stamp (rewritten in place).")],
    tsa: Annotated[str, typer.Option(help="URL of an RFC 3161 time-stamping authority.")],
    timeout: Annotated[float, typer.Option(min=0.1, max=600, help="Seconds the whole request may take.")] = 30.0,
) -> None:
    """Have a time-stamping authority sign the claim's commitment (RFC 3161): proof that the claim existed at
    that time, which a claim written later cannot backdate. Only the digest leaves this machine."""
    stamped = stamp(load_claim(claim), tsa, timeout)
    save_claim(claim, stamped)
    console.print(f"claim [bold]{claim}[/] stamped by {tsa}")


@commands.command("dispute")
@expand_settings
def dispute_command(
    suspect: Suspect,
    claims: Annotated[list[Path], typer.Argument(help="Two or more claim files from the parties.")],
    *,
    tsa_cert: TsaCert = None,
    run: Annotated[RunOptions, run_options("alpha", "json")],
) -> None:
    """Verify each claim on the suspect and name the earliest (by trusted time) whose unforgeable evidence
    holds: exit 0 when one claim wins, 1 when undecided, 2 on bad input."""
    if len(claims) < 2:
        raise InputError("a dispute needs two or more claims; check one with `ticketguard verify`")
    result = dispute(suspect, claims, tsa_certificate=read_pem(tsa_cert) if tsa_cert else None, alpha=run.alpha)
    if run.json:
        emit_json({"suspect": str(suspect), **result.to_json()})
    else:
        table = Table(title=f"dispute over {suspect}: {result.to_json()['decision']}")
        for column in ("order", "claim", "trusted time", "holds", "decided by"):
            table.add_column(column)
        for order, standing in enumerate(result.standings, 1):
            row = standing.to_json()
            table.add_row(str(order), row["claim"], row["trusted_time"] or "none (stated only)",
                          "yes" if row["holds"] else "no", ", ".join(row["decided_by"]) or "-")
        results.print(table)
        results.print(result.reason, highlight=False)
    raise typer.Exit(0 if result.winner is not None else 1)


@commands.command("sign")
def sign_claim(
    claim: Annotated[Path, typer.Argument(help="The claim file to sign (rewritten in place).")],
    signing_key: Annotated[Path, typer.Option("--signing-key", help="Ed25519 private key (PEM) from `ticketguard keygen`.")],
) -> None:
    """Sign (or re-sign, after watermark extended it) a claim with the owner's Ed25519 key."""
    signed = sign(load_claim(claim), load_private_key(signing_key))
    save_claim(claim, signed)
    console.print(f"claim [bold]{claim}[/] signed")

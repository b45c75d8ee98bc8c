"""CLI commands of the signature scheme, merged into the ticketguard app by cli.py.

``verify`` and ``extract`` with a claim exit 0 when ownership is shown, 1 when not, 2 on bad input.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.table import Table

from ticketguard.claim import (
    Claim,
    check_signature,
    generate_keys,
    load_claim,
    load_private_key,
    load_public_key,
    save_claim,
    sign,
    ticket_hashes,
)
from ticketguard.data import dataset_spec
from ticketguard.errors import InputError
from ticketguard.blackbox import load_served_model
from ticketguard.options import DataDir, Device, Epochs, Json, TrainPerClass, subset_data
from ticketguard.progress import console
from ticketguard.schemes import signature as scheme
from ticketguard.schemes.trigger import trigger_from_claim, verify_local
from ticketguard.suspect import load_suspect
from ticketguard.ticket import MANIFEST, Ticket
from ticketguard.training import TrainConfig, resolve_device
from ticketguard.verify import DEFAULT_ALPHA, Evidence, Verdict

commands = typer.Typer()

TRAIN = TrainConfig()

PublicKeyOption = Annotated[
    Optional[Path], typer.Option(help="Owner's public key the claim must be signed with.")
]
AlphaOption = Annotated[float, typer.Option(help="False-claim probability the decision allows.")]
ImageOption = Annotated[
    Optional[Path], typer.Option(help="Write the extracted code next to the expected one (PNG).")
]


@commands.command()
def embed(
    ticket_path: Annotated[Path, typer.Argument(metavar="TICKET", help="Ticket folder to protect.")],
    signature: Annotated[str, typer.Option(help="Text to embed, e.g. ACME-R20-2026.")],
    out: Annotated[Path, typer.Option(help="Folder for the protected ticket (to ship).")],
    claim: Annotated[
        Optional[Path], typer.Option(help="Secret claim file (default: OUT.claim.json).")
    ] = None,
    key: Annotated[
        Optional[Path], typer.Option(help="Ed25519 private key (PEM) that signs the claim.")
    ] = None,
    copies: Annotated[int, typer.Option(help="Copies of the code, each in another conv layer.")] = 1,
    qr_version: Annotated[
        Optional[int], typer.Option(help="QR version (default: the smallest that fits).")
    ] = None,
    error: Annotated[str, typer.Option(help="QR error-correction level: L, M, Q or H.")] = "H",
    weights_per_connection: Annotated[
        int, typer.Option(help="Kernel weights kept per code connection.")
    ] = scheme.DEFAULT_WEIGHTS_PER_CONNECTION,
    polarity: Annotated[
        str,
        typer.Option(
            help="Colour of kept connections: dark (robust to pruning), light, or any (fewest changes)."
        ),
    ] = "dark",
    data_dir: DataDir = None,
    epochs: Epochs = None,
    lr: Annotated[float, typer.Option(help="Peak learning rate of the retraining.")] = TRAIN.lr,
    train_per_class: TrainPerClass = None,
    seed: Annotated[int, typer.Option(help="Seed of batch order and augmentation.")] = TRAIN.seed,
    device: Device = "auto",
) -> None:
    """Write a QR signature into the ticket's mask, retrain it, save the protected ticket and the claim."""
    claim_path = claim or out.with_name(out.name + ".claim.json")
    private_key = load_private_key(key) if key else None
    ticket = Ticket.load(ticket_path)
    data = subset_data(ticket.dataset, data_dir, train_per_class, None, seed)
    config = TrainConfig(epochs=epochs or dataset_spec(ticket.dataset).default_epochs, lr=lr, seed=seed)
    started = time.perf_counter()
    protected, found, report = scheme.protect_ticket(
        ticket,
        signature,
        data,
        config,
        error=error.upper(),
        version=qr_version,
        copies=copies,
        weights_per_connection=weights_per_connection,
        polarity=polarity,
        device=resolve_device(device),
    )
    protected.save(out)
    record = Claim(found, ticket_hashes(out))
    if private_key is not None:
        sign(record, private_key)
    save_claim(claim_path, record)
    table = Table(title=f"signature embedded in {out}", show_header=False)
    table.add_row("payload", signature)
    table.add_row(
        "QR",
        f"version {found.version}, level {found.error}, mask pattern {found.mask_pattern}, "
        f"kept = {'dark' if found.kept_is_dark else 'light'}",
    )
    for region in found.regions:
        table.add_row("region", f"{region.layer} at ({region.row}, {region.col})")
    table.add_row("cells changed", str(report.changed_cells))
    table.add_row(
        "weights on / off / compensated",
        f"{report.weights_added} / {report.weights_removed} / {report.compensated}",
    )
    table.add_row(
        "weights left", f"{100 * ticket.mask.density():.3f}% -> {100 * protected.mask.density():.3f}%"
    )
    table.add_row("accuracy", f"{_percent(ticket.accuracy)} -> {_percent(protected.accuracy)}")
    table.add_row("claim (keep secret)", f"{claim_path}{' (signed)' if private_key else ''}")
    console.print(table)
    console.print(f"done in {time.perf_counter() - started:.0f} s")


@commands.command()
def extract(
    suspect: Annotated[Path, typer.Argument(help="Ticket folder, safetensors or torch state_dict file.")],
    claim: Annotated[
        Optional[Path], typer.Option(help="The owner's claim; without it, scan for any code.")
    ] = None,
    image: ImageOption = None,
    public_key: PublicKeyOption = None,
    alpha: AlphaOption = DEFAULT_ALPHA,
    as_json: Json = False,
) -> None:
    """Read the signature from a suspect: with a claim, decode and test it; without, scan for any code."""
    if claim is not None:
        _verify(suspect, claim, image, public_key, alpha, as_json)
        return
    if image is not None:
        raise InputError("--image needs --claim: without one there is no expected code to compare with")
    found = scheme.blind_extract(load_suspect(suspect).weights)
    if as_json:
        typer.echo(json.dumps({"found": [asdict(f) for f in found]}, indent=2))
    else:
        _print_found(found)
    raise typer.Exit(0 if found else 1)


@commands.command()
def verify(
    suspect: Annotated[Path, typer.Argument(help="Ticket folder, safetensors or torch state_dict file.")],
    claim: Annotated[Path, typer.Option(help="The owner's claim file.")],
    image: ImageOption = None,
    public_key: PublicKeyOption = None,
    alpha: AlphaOption = DEFAULT_ALPHA,
    as_json: Json = False,
) -> None:
    """Decide whether the suspect carries the claimed signature: exit 0 shown, 1 not shown, 2 bad input."""
    _verify(suspect, claim, image, public_key, alpha, as_json)


@commands.command()
def keygen(
    out: Annotated[
        Path, typer.Option(help="Folder for owner.key (private, mode 0600) and owner.pub.")
    ] = Path("."),
) -> None:
    """Make an Ed25519 key pair for signing claims."""
    private_path, public_path = generate_keys(out)
    console.print(f"private key {private_path} (keep secret), public key {public_path} (share)")


def _verify(
    suspect: Path, claim_path: Path, image: Path | None, public_key: Path | None, alpha: float, as_json: bool
) -> None:
    if not 0 < alpha < 1:
        raise InputError(f"--alpha must lie in (0, 1), got {alpha}")
    claim = load_claim(claim_path)
    signed = check_signature(claim, load_public_key(public_key) if public_key else None)
    if claim.signature is None:
        raise InputError(f"{claim_path} holds no QR signature")
    weights = load_suspect(suspect).weights
    verdict, reading = scheme.verify(weights, claim.signature, alpha)
    if "trigger" in claim.extensions:
        trigger_check = _trigger_evidence(suspect, claim.extensions["trigger"], alpha)
        verdict = Verdict((*verdict.evidence, trigger_check), alpha)
    if image is not None:
        scheme.save_comparison_image(image, reading)
    report: dict[str, Any] = {**verdict.to_json(), "claim_signed": signed, "claim_created": claim.created}
    if as_json:
        typer.echo(json.dumps(report, indent=2))
    else:
        _print_verdict(report)
    raise typer.Exit(0 if verdict.owned else 1)


def _trigger_evidence(suspect: Path, part: dict[str, Any], alpha: float) -> Evidence:
    """ESWT + T: the claim's trigger set, checked on the suspect's weights in process (no HTTP)."""
    if not (suspect / MANIFEST).is_file():
        raise InputError(
            f"the claim holds a trigger set, and checking it needs the suspect's input statistics, which only a "
            f"ticket folder records; serve {suspect} with --mean/--std and use `ticketguard query`"
        )
    served = load_served_model(suspect)
    trigger = trigger_from_claim(part)
    return verify_local(
        served.model, trigger, served.mean, served.std, served.num_classes, part["chance_model"], alpha
    )


@commands.command("sign")
def sign_claim(
    claim: Annotated[Path, typer.Argument(help="The claim file to sign (rewritten in place).")],
    key: Annotated[Path, typer.Option(help="Ed25519 private key (PEM) from `ticketguard keygen`.")],
) -> None:
    """Sign (or re-sign, after watermark added a trigger set) a claim with the owner's Ed25519 key."""
    signed = sign(load_claim(claim), load_private_key(key))
    save_claim(claim, signed)
    console.print(f"claim [bold]{claim}[/] signed")


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"


def _print_verdict(report: dict[str, Any]) -> None:
    evidence = report["evidence"][0]
    trigger = next((e for e in report["evidence"] if e["name"] == "trigger"), None)
    details = evidence["details"]
    table = Table(title=f"verdict: {report['decision']}", show_header=False)
    decoded = details["decoded"]
    state = (
        ("matches the claim" if details["decodes_to_claim"] else "MISMATCH with the claim") if decoded else ""
    )
    table.add_row(
        "decoded", f"{decoded!r} {state}" if decoded else f"no decode (claimed {details['claimed']!r})"
    )
    table.add_row(
        "module match rate",
        f"{_percent(evidence['score'])} ({details['matches']}/{details['modules']}), "
        f"needed {_percent(evidence['threshold'])}",
    )
    table.add_row(
        "p-value",
        f"{evidence['p_value']:.3g} (alpha {report['alpha']:.0e}; "
        f"{details['uncorrected_p_value']:.3g} before correcting for "
        f"{details['placements_searched']:.3g} placements)",
    )
    table.add_row("suspect layer density", ", ".join(f"{100 * d:.1f}%" for d in details["layer_densities"]))
    table.add_row(
        "claim",
        f"{'signed, signature valid' if report['claim_signed'] else 'unsigned'}, "
        f"created {report['claim_created']}",
    )
    if trigger is not None:
        table.add_row(
            "trigger accuracy",
            f"{_percent(trigger['score'])}, needed {_percent(trigger['threshold'])}, p-value {trigger['p_value']:.3g}",
        )
    console.print(table)


def _print_found(found: list[scheme.Found]) -> None:
    if not found:
        console.print("no decodable QR code found in any conv layer")
        return
    table = Table(title="QR codes found")
    for column in ("layer", "offset", "QR", "kept", "text", "decoder"):
        table.add_column(column)
    for item in found:
        table.add_row(
            item.layer,
            f"({item.row}, {item.col})",
            f"v{item.version} mask {item.mask_pattern}",
            "dark" if item.kept_is_dark else "light",
            item.text,
            item.method,
        )
    console.print(table)

"""The evaluation harness: run an attack grid on a protected ticket and measure every piece of evidence.

Each grid point is a chain of attacks (``chains.parse_chain``). Per point: weights left, test accuracy, QR
decode, module match rate and p-value (V2), trigger accuracy and p-value (V3), and the overall decision. Each
finished point is stored atomically in ``OUT/points/<key>.json`` with the sha256 of the attacked ticket's
weights, so a rerun on the same ticket skips it; a point that fails is recorded with its error (and retried on
the next run) while the others go on.
"""

from __future__ import annotations

import csv
import hashlib
import io
import logging
import re
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from rich.progress import Progress

from ticketguard.artifacts.ticket import Ticket
from ticketguard.attacks import chains
from ticketguard.core.errors import InputError
from ticketguard.core.evidence import DEFAULT_ALPHA
from ticketguard.core.files import atomic_path, read_json, tensors_sha256, write_json
from ticketguard.data import ImageData, load_dataset
from ticketguard.experiments.report import COLUMNS, display_row, markdown_table
from ticketguard.models import build_from_state
from ticketguard.training.loop import evaluate
from ticketguard.verification.claim import Claim
from ticketguard.verification.verify import verify

log = logging.getLogger(__name__)

POINTS = "points"
RESULTS = "results"


@dataclass
class Subject:
    """The protected ticket under attack and the owner's claim: what each grid point is judged against."""

    ticket: Ticket
    data: ImageData
    claim: Claim
    key_density: float | None = None
    transfer_data: ImageData | None = None
    alpha: float = DEFAULT_ALPHA
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    def weights_digest(self) -> str:
        """sha256 of the shipped weights: a stored point counts as finished only for the same ticket."""
        return tensors_sha256(self.ticket.weights)

    def context(self) -> dict[str, Any]:
        """What attacks may take from the claim and the setting (``chains.run_step`` picks per attack)."""
        context = {
            "data": self.data,
            **claim_context(self.claim),
            "key_density": self.key_density,
            "transfer_data": self.transfer_data,
            "device": self.device,
            "architecture": self.ticket.architecture,
        }
        return {k: v for k, v in context.items() if v is not None}


@dataclass(frozen=True)
class GridPoint:
    """One attack setting: its family (a curve in the plots), strength (x axis) and chain of attacks."""

    family: str
    strength: float
    spec: str
    title: str = ""

    @property
    def label(self) -> str:
        return self.title or self.spec.replace("+", " then ")

    @property
    def key(self) -> str:
        """A file name that is unique per spec and readable."""
        digest = hashlib.sha256(self.spec.encode()).hexdigest()[:8]
        return f"{re.sub(r'[^A-Za-z0-9.=-]+', '_', self.spec)[:60]}-{digest}"


def default_grid(
    prune: tuple[float, ...] = (0.05, 0.1, 0.2, 0.3, 0.5),
    addon: tuple[float, ...] = (0.005, 0.01, 0.05, 0.1),
    finetune_epochs: int = 3,
    transfer: bool = False,
) -> list[GridPoint]:
    """The paper's robustness grid: pruning 5-50 %, add-on 0.5-10 % with and without the owner's defence,
    fine-tuning (mask fixed, and free with and without the defence), prune 10 % then fine-tune, and the
    forgeries fake1-3."""
    points = [GridPoint("none", 0.0, "magnitude:fraction=0", "none (shipped ticket)")]
    for name in ("magnitude", "random"):
        points += [GridPoint(f"{name} pruning", f, f"{name}:fraction={f}") for f in prune]
    points += [GridPoint("add-on", f, f"addon:fraction={f}") for f in addon]
    points += [GridPoint("add-on + defence", f, f"addon:fraction={f}+defence") for f in addon]
    tune = f"epochs={finetune_epochs}"
    points += [
        GridPoint("fine-tuning", finetune_epochs, f"finetune:{tune}"),
        GridPoint("dense fine-tuning", finetune_epochs, f"finetune:{tune}:free=true"),
        GridPoint("dense fine-tuning + defence", finetune_epochs, f"finetune:{tune}:free=true+defence"),
        GridPoint("prune 10 % + fine-tuning", finetune_epochs, f"magnitude:fraction=0.1+finetune:{tune}"),
    ]
    if transfer:
        points.append(GridPoint("transfer", finetune_epochs, f"transfer:{tune}"))
    points += [GridPoint(name, 1.0, name) for name in ("fake1", "fake2", "fake3")]
    return points


DISGUISE_CHAINS = {
    "permute + rescale": "permute:seed=1+rescale:seed=2",
    "rename": "rename:style=torchvision",
    "fold BatchNorm": "permute:seed=3+fold-bn",
    "dummy channels": "widen:seed=4",
    "scale x100 then add-on": "rescale:layer=blocks.6.conv1.weight:factor=100+addon:fraction=0.4",
}


def disguise_grid(finetune_epochs: int = 3) -> list[GridPoint]:
    """The thief's free edits (function unchanged), each alone and chained with magnitude pruning of 20 % and
    50 %, fine-tuning (before the disguise, as a thief would) and add-on of 10 %."""
    points = []
    for title, chain in DISGUISE_CHAINS.items():
        family = f"disguise: {title}"
        points += [
            GridPoint(family, 0.0, chain, f"{title}"),
            GridPoint(family, 0.2, f"{chain}+magnitude:fraction=0.2", f"{title}, then prune 20 %"),
            GridPoint(family, 0.5, f"{chain}+magnitude:fraction=0.5", f"{title}, then prune 50 %"),
            GridPoint(family, 1.0, f"finetune:epochs={finetune_epochs}+{chain}", f"fine-tune, then {title}"),
            GridPoint(family, 0.1, f"{chain}+addon:fraction=0.1", f"{title}, then add-on 10 %"),
        ]
    return points


def _model(weights: dict[str, torch.Tensor], device: torch.device) -> tuple[torch.nn.Module, int] | None:
    """The attacked model and its class count, or None when the weights fit no registered architecture."""
    try:
        model, (_, _, classes) = build_from_state(weights, "measuring accuracy")
    except InputError:
        return None
    return model.to(device), classes


def measure(subject: Subject, weights: dict[str, torch.Tensor], density: float) -> dict[str, Any]:
    """Every number of one row for attacked ``weights``: accuracy, and the verdict of ``verify`` on them;
    evidence that does not apply stays None."""
    row: dict[str, Any] = {"density": density, "accuracy": None}
    built = _model(weights, subject.device)
    if built is not None and built[1] == subject.data.num_classes:
        row["accuracy"] = evaluate(built[0], subject.data)
    verdict = verify(weights, subject.claim, alpha=subject.alpha, device=subject.device)
    found = {e.name: e for e in verdict.evidence}
    qr, trigger, fingerprint = found.get("qr-signature"), found.get("trigger"), found.get("fingerprint")
    row |= {
        "qr_decodes": None if qr is None else qr.details["decodes_to_claim"],
        "match_rate": None if qr is None else qr.score,
        "qr_p_value": None if qr is None else qr.p_value,
        "qr_modules": None if qr is None else qr.details["voted_modules"],
        "trigger_accuracy": None if trigger is None else trigger.score,
        "trigger_p_value": None if trigger is None else trigger.p_value,
        "fingerprint_p_value": None if fingerprint is None else fingerprint.p_value,
        "owned": verdict.owned,
        "not_read": [item.name for item in verdict.unavailable],
    }
    return row


def run_point(subject: Subject, point: GridPoint) -> dict[str, Any]:
    """Attack the shipped ticket as ``point`` says and measure the result."""
    started = time.perf_counter()
    torch.manual_seed(0)
    weights, mask = chains.chain(
        subject.ticket.weights, subject.ticket.mask, chains.parse_chain(point.spec), subject.context()
    )
    row = measure(subject, weights, mask.density())
    return {**_identity(point), **row, "seconds": time.perf_counter() - started, "error": None}


def _identity(point: GridPoint) -> dict[str, Any]:
    return {"attack": point.label, "family": point.family, "strength": point.strength, "spec": point.spec}


def run_grid(
    subject: Subject, points: list[GridPoint], out: str | Path, progress: Progress | None = None
) -> list[dict[str, Any]]:
    """Every point in order, skipping those already stored in ``OUT/points``; failures are rows too."""
    folder = Path(out) / POINTS
    task = progress.add_task("attack grid", total=len(points), status="") if progress else None
    rows, digest = [], subject.weights_digest()
    for point in points:
        path = folder / f"{point.key}.json"
        stored = read_json(path) if path.is_file() else None
        if stored is not None and stored.get("error") is None and stored.get("ticket") == digest:
            row = stored
        else:
            if progress is not None:
                progress.update(task, status=point.label)
            try:
                row = run_point(subject, point)
            except Exception as err:  # noqa: BLE001 - a failed point is reported; the grid goes on
                log.warning("attack %s failed: %s", point.label, err)
                row = {**_identity(point), "error": f"{type(err).__name__}: {err}"}
            row["ticket"] = digest
            write_json(path, row)
        rows.append(row)
        if progress is not None:
            progress.advance(task)
    return rows


def write_results(rows: list[dict[str, Any]], out: str | Path) -> dict[str, Path]:
    """results.json (every number), results.csv and results.md (the table as shown), written atomically."""
    out = Path(out)
    paths = {kind: out / f"{RESULTS}.{kind}" for kind in ("json", "csv", "md")}
    write_json(paths["json"], rows)
    shown = [display_row(row) for row in rows]
    buffer = io.StringIO()
    fields = list(dict.fromkeys(k for row in rows for k in row if k != "qr_modules"))
    writer = csv.DictWriter(buffer, fieldnames=fields, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    with atomic_path(paths["csv"]) as tmp:
        tmp.write_text(buffer.getvalue())
    with atomic_path(paths["md"]) as tmp:
        tmp.write_text(markdown_table(shown, list(COLUMNS)) + "\n")
    return paths


def claim_context(claim: Claim) -> dict[str, Any]:
    """What attacks may take from the owner's claim: the code's regions (fake3) and the defence's threshold t."""
    return {"signature": claim.signature, "threshold": None if claim.defence is None else claim.defence.threshold}


def transfer_task(name: str | None, data: ImageData, data_dir: Path | None = None) -> ImageData | None:
    """The target of a transfer attack: ``parity`` is the even/odd task on ``data``'s own inputs, any other name
    a data set; None, no transfer."""
    if name is None:
        return None
    return parity_task(data) if name == "parity" else load_dataset(name, data_dir)


def parity_task(data: ImageData) -> ImageData:
    """Another task on the same inputs (even / odd class), the stand-in data set for transfer on digits."""
    return replace(
        data,
        name=f"{data.name}-parity",
        classes=("even", "odd"),
        train_labels=data.train_labels % 2,
        test_labels=data.test_labels % 2,
    )

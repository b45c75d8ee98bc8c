"""The whole story on the built-in digits: find, protect (V2 + V3), lock (V1), attack and verify."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.progress import Progress

from ticketguard.artifacts.ticket import Ticket
from ticketguard.core.evidence import DEFAULT_ALPHA
from ticketguard.core.files import as_json, read_json, tensors_sha256, write_json
from ticketguard.core.schema import check_json
from ticketguard.data import ImageData, load_subset
from ticketguard.data.triggers import TriggerSet
from ticketguard.experiments import harness
from ticketguard.protect import TriggerConfig, keyed_trigger_for, protect
from ticketguard.schemes import keymask as v1
from ticketguard.schemes import trigger as v3
from ticketguard.search.config import SearchConfig
from ticketguard.search.imp import find_extreme_ticket
from ticketguard.training.loop import TrainConfig, recorded_training
from ticketguard.verification.claim import Claim
from ticketguard.verification.verify import verify_key


@dataclass(frozen=True)
class DemoConfig:
    """The demo's settings: a capped IMP search, V2 + V3 retraining, a V1 key and a small attack grid."""

    rounds: int = 8
    ratio: float = 0.2
    epochs: int = 20
    rewind_epoch: int = 1
    payload: str = "ACME-R20-2026"
    trigger_seed: int = 2021
    trigger_count: int = 100
    per_batch: int | None = None  # protect's default: about TRIGGER_VIEWS views of each trigger image
    key_density: float = 0.2
    key_score: str = "ewp"
    finetune_epochs: int = 3
    eps: float = 0.01
    train_per_class: int | None = None
    test_per_class: int | None = None
    seed: int = 0


DEMO = DemoConfig()
SIGNATURE_ONLY = "signature-only.json"
SIGNATURE_ONLY_CHECKPOINT = "signature-only.checkpoint.pt"
PROTECTED_CHECKPOINT = "protected.checkpoint.pt"
SIGNATURE_ONLY_SCHEMA = {
    "type": "object",
    "required": ["inputs", "numbers"],
    "properties": {
        "inputs": {"type": "object", "required": ["train"], "properties": {"train": {"type": "object"}}},
        "numbers": {
            "type": "object",
            "required": ["v2_accuracy", "unmarked_trigger_accuracy"],
            "properties": {
                "v2_accuracy": {"type": "number", "minimum": 0, "maximum": 1},
                "unmarked_trigger_accuracy": {"type": "number", "minimum": 0, "maximum": 1},
            },
        },
    },
}


def protect_demo(
    ticket: Ticket,
    data: ImageData,
    config: DemoConfig,
    train_config: TrainConfig,
    device: torch.device,
    progress: Progress,
    out: Path,
) -> tuple[Ticket, Claim, dict[str, Any]]:
    """V2 + V3 in one retraining (``ticketguard.protect``) with ``train_config``; the signature alone is trained
    once more, only to measure each scheme's accuracy cost by itself, and the unmarked ticket's trigger accuracy
    is measured."""
    trigger = keyed_trigger_for(ticket, config.trigger_seed, config.trigger_count)
    out.mkdir(parents=True, exist_ok=True)
    signed_only = _signature_only(ticket, data, config, train_config, trigger, device, progress, out)
    protected = protect(
        ticket,
        data,
        signature=config.payload,
        trigger=TriggerConfig(trigger, config.per_batch),
        train_config=train_config,
        device=device,
        progress=progress,
        checkpoint=out / PROTECTED_CHECKPOINT,
    )
    protected.save(out / "protected", out / "claim.json", force=True)
    embedded = protected.report["embedding"]
    numbers = {
        "v2_accuracy": signed_only["v2_accuracy"],
        "cells_changed": embedded["changed_cells"],
        "accuracy": protected.ticket.accuracy,
        "trigger_accuracy": protected.report["trigger_accuracy"],
        "unmarked_trigger_accuracy": signed_only["unmarked_trigger_accuracy"],
        "threshold": protected.report["threshold"],
    }
    return protected.ticket, protected.claim, numbers


def _signature_only(
    ticket: Ticket,
    data: ImageData,
    config: DemoConfig,
    train_config: TrainConfig,
    trigger: TriggerSet,
    device: torch.device,
    progress: Progress,
    out: Path,
) -> dict[str, float]:
    """V2 alone: its accuracy and the unmarked model's trigger accuracy, stored in ``out`` with what they were
    measured on, so that a rerun on the same inputs (after a kill, or from a committed campaign) does not
    train it again."""
    path = out / SIGNATURE_ONLY
    inputs = {
        "train": as_json(train_config),
        "payload": config.payload,
        "data": [data.name, int(data.train_labels.numel()), int(data.test_labels.numel())],
        "rewind_sha256": tensors_sha256(ticket.rewind),
        "mask_sha256": tensors_sha256(dict(ticket.mask)),
        "trigger": [config.trigger_seed, config.trigger_count],
    }
    if path.is_file():
        stored = read_json(path)
        check_json(stored, SIGNATURE_ONLY_SCHEMA, str(path))
        if {**stored["inputs"], "train": recorded_training(stored["inputs"]["train"])} == inputs:
            return stored["numbers"]
    signed_only = protect(
        ticket, data, signature=config.payload, train_config=train_config, device=device, progress=progress,
        checkpoint=out / SIGNATURE_ONLY_CHECKPOINT,
    )
    mean, std = data.channel_stats()
    unmarked = v3.verify_local(
        signed_only.ticket.build_model().to(device), trigger.to(device), mean, std, data.num_classes
    )
    numbers = {"v2_accuracy": signed_only.ticket.accuracy, "unmarked_trigger_accuracy": unmarked.score}
    write_json(path, {"inputs": inputs, "numbers": numbers})
    return numbers


def run_demo(out: Path, config: DemoConfig, device: torch.device, progress: Progress) -> dict[str, Any]:
    """The whole story on digits; returns the numbers the report shows."""
    data = load_subset("digits", None, config.train_per_class, config.test_per_class, config.seed)
    search = SearchConfig(
        ratios=(config.ratio,),
        pruning_schedule="paper",
        max_rounds=config.rounds,
        rewind_epoch=config.rewind_epoch,
        eps=config.eps,
        train=TrainConfig(epochs=config.epochs, seed=config.seed),
    )
    ticket = find_extreme_ticket(data, search, out / "search", device, progress)
    ticket.save(out / "ticket")
    train_config = TrainConfig(epochs=config.epochs, seed=config.seed)
    protected, claim, numbers = protect_demo(ticket, data, config, train_config, device, progress, out)
    locked, key = v1.split_key(protected, config.key_density, config.key_score)
    v1.save_split(locked, key, out / "split")
    verdict = verify_key(
        locked,
        key,
        data,
        TrainConfig(epochs=config.epochs, seed=config.seed),
        config.eps,
        device,
        progress,
        fake1=True,
    )
    subject = harness.Subject(
        protected, data, claim, config.key_density, harness.parity_task(data), DEFAULT_ALPHA, device
    )
    points = harness.default_grid(finetune_epochs=config.finetune_epochs, transfer=True)
    points += harness.disguise_grid(config.finetune_epochs)
    rows = harness.run_grid(subject, points, out / "grid", progress)
    harness.write_results(rows, out / "grid")
    return {
        "ticket": {
            "density": ticket.mask.density(),
            "accuracy": ticket.accuracy,
            "dense_accuracy": ticket.metadata.get("dense_accuracy"),
            "counts": ticket.metadata.get("search", {}).get("counts"),
        },
        "protection": numbers,
        "signature": claim.signature,
        "v1": verdict.evidence[0].details | {"owned": verdict.owned, "key_density": config.key_density},
        "rows": rows,
    }

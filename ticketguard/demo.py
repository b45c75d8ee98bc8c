"""The whole story on the built-in digits: find, protect (V2 + V3), lock (V1), attack and verify."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from rich.progress import Progress

from ticketguard import attacks, harness
from ticketguard.claim import Claim, save_claim, ticket_hashes
from ticketguard.data import ImageData
from ticketguard.data.triggers import keyed_trigger_set
from ticketguard.imp import SearchConfig, find_extreme_ticket
from ticketguard.options import subset_data
from ticketguard.schemes import keymask as v1
from ticketguard.schemes import signature as v2
from ticketguard.schemes import trigger as v3
from ticketguard.ticket import Ticket
from ticketguard.training import TrainConfig, state_copy
from ticketguard.verify import DEFAULT_ALPHA


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
    per_batch: int = 8
    key_density: float = 0.2
    key_score: str = "ewp"
    finetune_epochs: int = 3
    eps: float = 0.01
    train_per_class: int | None = None
    test_per_class: int | None = None
    seed: int = 0


DEMO = DemoConfig()


def protect(
    ticket: Ticket, data: ImageData, config: DemoConfig, device: torch.device, progress: Progress, out: Path
) -> tuple[Ticket, Claim, dict[str, Any]]:
    """V2 then V3: embed the signature into the mask, retrain from W_k with the trigger set mixed in; also
    retrain with the signature alone, so each scheme's accuracy cost is measured by itself."""
    train_config = TrainConfig(epochs=config.epochs, seed=config.seed)
    signed, signature, embedded = v2.protect_ticket(ticket, config.payload, data, train_config, device=device)
    trigger = keyed_trigger_set(
        config.trigger_seed,
        config.trigger_count,
        ticket.num_classes,
        ticket.in_channels,
        tuple(ticket.input_size),
    )
    mean, std = data.channel_stats()
    unmarked = v3.verify_local(
        signed.build_model().to(device), trigger.to(device), mean, std, data.num_classes
    )
    model = ticket.build_model("rewind").to(device)
    marked = v3.watermark(
        model, data, trigger, train_config, signed.mask, per_batch=config.per_batch, progress=progress
    )
    protected = replace(
        signed,
        weights=state_copy(model),
        accuracy=marked.accuracy,
        metadata={**signed.metadata, "normalization": {"mean": mean.tolist(), "std": std.tolist()}},
    )
    protected.save(out / "protected")
    threshold = attacks.defence_threshold(protected.weights, protected.mask)
    claim = Claim(
        signature,
        ticket_hashes(out / "protected"),
        extensions={
            v3.EXTENSION: v3.claim_part(
                trigger,
                data.num_classes,
                "suspect",
                accuracy=marked.accuracy,
                trigger_accuracy=marked.trigger_accuracy,
            ),
            attacks.DEFENCE_CLAIM_KEY: {"threshold": threshold, "quantile": attacks.DEFENCE_QUANTILE},
        },
    )
    save_claim(out / "claim.json", claim)
    numbers = {
        "v2_accuracy": signed.accuracy,
        "cells_changed": embedded.changed_cells,
        "accuracy": marked.accuracy,
        "trigger_accuracy": marked.trigger_accuracy,
        "unmarked_trigger_accuracy": unmarked.score,
        "threshold": threshold,
    }
    return protected, claim, numbers


def run_demo(out: Path, config: DemoConfig, device: torch.device, progress: Progress) -> dict[str, Any]:
    """The whole story on digits; returns the numbers the report shows."""
    data = subset_data("digits", None, config.train_per_class, config.test_per_class, config.seed)
    search = SearchConfig(
        ratios=(config.ratio,),
        max_rounds=config.rounds,
        rewind_epoch=config.rewind_epoch,
        eps=config.eps,
        train=TrainConfig(epochs=config.epochs, seed=config.seed),
    )
    ticket = find_extreme_ticket(data, search, out / "search", device, progress)
    ticket.save(out / "ticket")
    protected, claim, numbers = protect(ticket, data, config, device, progress, out)
    locked, key = v1.split_key(protected, config.key_density, config.key_score)
    v1.save_split(locked, key, out / "split")
    verdict = v1.verify_key(
        locked,
        key,
        data,
        TrainConfig(epochs=config.epochs, seed=config.seed),
        config.eps,
        device,
        progress,
        fake1=True,
    )
    part = claim.extensions[v3.EXTENSION]
    subject = harness.Subject(
        protected,
        data,
        claim.signature,
        v3.trigger_from_claim(part),
        "suspect",
        config.key_density,
        claim.extensions[attacks.DEFENCE_CLAIM_KEY]["threshold"],
        harness.parity_task(data),
        DEFAULT_ALPHA,
        device,
    )
    points = harness.default_grid(finetune_epochs=config.finetune_epochs, transfer=True)
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

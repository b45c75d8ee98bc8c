"""One attack chain on a suspect on disk, a ticket folder or a model file: the ticket supplies what attacks may
need of it (its V1 key's density, data set and architecture), the owner's claim its code regions and defence
threshold, and data are loaded only when a step of the chain trains."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ticketguard.artifacts.suspect import load_suspect
from ticketguard.artifacts.ticket import Ticket, is_ticket_folder
from ticketguard.attacks import chains
from ticketguard.core.errors import InputError
from ticketguard.core.masks import Mask
from ticketguard.data import load_subset
from ticketguard.experiments.harness import claim_context, transfer_task
from ticketguard.schemes import keymask as v1
from ticketguard.training.loop import resolve_device
from ticketguard.verification.claim import Claim

TRAINING_ATTACKS = ("finetune", "transfer")


@dataclass
class AttackedSuspect:
    """The attacked weights and mask, and how dense the suspect was before."""

    weights: dict[str, torch.Tensor]
    mask: Mask
    density_before: float


def attack_suspect(
    path: Path,
    steps: list[chains.Step],
    *,
    claim: Claim | None = None,
    data: str | None = None,
    data_dir: Path | None = None,
    transfer_data: str | None = None,
    train_per_class: int | None = None,
    seed: int = 0,
    device: torch.device | str = "auto",
    trust_code: bool = False,
    **params: Any,
) -> AttackedSuspect:
    """Run ``steps`` on the ticket folder or model file at ``path``.

    ``params`` (fraction, epochs, lr, threshold, ...) reach every attack that takes them and win over what the
    ticket and the claim supply; ``seed`` seeds the attacks and the training subset of ``data`` (default: the
    ticket's data set), ``transfer_data`` names the transfer target (``harness.transfer_task``), and ``device``
    is where those steps train.
    """
    context: dict[str, Any] = {}
    if is_ticket_folder(path):
        ticket = Ticket.load(path, trust_code=trust_code)
        weights, mask = dict(ticket.weights), ticket.mask
        key_density = ticket.metadata.get(v1.METADATA_ENTRY, {}).get("key_density")
        context |= {"key_density": key_density, "architecture": ticket.architecture}
        data = data or ticket.dataset
    else:
        suspect = load_suspect(path)
        weights, mask = suspect.weights, suspect.mask
    if claim is not None:
        context |= claim_context(claim)
    context |= {name: value for name, value in params.items() if value is not None} | {"seed": seed}
    if any(step.name in TRAINING_ATTACKS for step in steps):
        if data is None:
            raise InputError("fine-tuning needs a data set: give --data (the suspect is not a ticket folder)")
        images = load_subset(data, data_dir, train_per_class, None, seed)
        context |= {"data": images, "transfer_data": transfer_task(transfer_data, images, data_dir),
                    "device": resolve_device(str(device))}
    context = {name: value for name, value in context.items() if value is not None}
    attacked, attacked_mask = chains.chain(weights, mask, steps, context)
    return AttackedSuspect(attacked, attacked_mask, mask.density())

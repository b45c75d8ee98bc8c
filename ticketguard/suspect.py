"""A suspect model as the verifier receives it: a ticket folder or an untrusted weight file, loaded safely."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ticketguard.files import load_tensors
from ticketguard.masks import Mask, fold_pruning_reparametrisation, mask_from_zeros
from ticketguard.models import identify_architecture
from ticketguard.ticket import MANIFEST, Ticket


@dataclass
class Suspect:
    """Weights (pruned ones zero), the mask they imply, and the architecture when it is a registered one.

    ``mask`` covers every weight matrix and conv kernel (dim > 1): for a suspect, nothing says which layers
    its owner pruned, so the verifier looks at all of them.
    """

    weights: dict[str, torch.Tensor]
    mask: Mask
    architecture: tuple[str, int, int] | None
    source: str


def load_suspect(path: str | Path) -> Suspect:
    """Read a ticket folder, a safetensors file or a torch state_dict (never unpickling code)."""
    path = Path(path)
    if (path / MANIFEST).is_file():
        ticket = Ticket.load(path)
        weights = dict(ticket.weights)
        source = "ticket"
    else:
        weights, prune_mask = fold_pruning_reparametrisation(load_tensors(path))
        source = "zeros" if prune_mask is None else "torch.nn.utils.prune"
    matrices = [name for name, tensor in weights.items() if tensor.dim() > 1 and tensor.is_floating_point()]
    return Suspect(weights, mask_from_zeros(weights, matrices), identify_architecture(weights), source)

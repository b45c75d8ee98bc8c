"""The interface every claim-carrying scheme offers, and ``SCHEMES``, the registry of them.

A claim-carrying scheme writes a section of the owner's claim (``ticketguard.verification.claim``) and turns
that section and a read suspect into one piece of ``Evidence``. The claim file and ``verify`` loop over
``SCHEMES`` in its order, which is the order of the claim's sections and of the verdict's evidence.

Embedding is not part of the interface. The schemes embed at different moments of the one retraining that
``protect`` runs: V2 edits the mask before training starts (ME), V3 mixes its trigger images into the batches
during training (WE with T). An ``embed(ticket) -> ticket`` step would have each scheme train on its own and
lose the single retraining, so ``protect`` keeps the two steps in their places.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

import torch

from ticketguard.core.evidence import Evidence
from ticketguard.data import Normalization
from ticketguard.schemes.signature import SIGNATURE_SCHEME
from ticketguard.schemes.trigger import TRIGGER_SCHEME

Section = TypeVar("Section")


@dataclass(frozen=True)
class VerifyContext:
    """What ``verify`` hands every scheme: the suspect as read, and the caller's options for the check."""

    weights: dict[str, torch.Tensor]
    """the suspect's weights, aligned to the claim's reference when it has one: the function it computes"""
    readable: dict[str, torch.Tensor]
    """the same weights with only what the suspect keeps on its own terms non-zero: its mask, as read"""
    normalization: Normalization | None
    """the input normalisation the suspect records (a ticket folder does), for claims that lack their own"""
    alpha: float
    trusted_time: bool
    """the claim carries a checked RFC 3161 time, so evidence a forger could search after the fact counts at alpha"""
    device: torch.device | str | None = None
    model: str | None = None
    """the suspect's architecture by import path, for checks that run the suspect"""
    trigger_folder: str | Path | None = None
    qr_image: str | Path | None = None
    observed: dict[str, torch.Tensor] | None = None
    """per masked layer, the cells whose channels a structurally pruned suspect still has (the others are
    unknown, not empty); None when it has every channel"""
    beside_network: dict[str, torch.Tensor] | None = None
    """the suspect's tensors that alignment left out of its network (a repackaged copy's baked-in
    normalisation, a temperature); None when it was not aligned"""


class ClaimScheme(Protocol[Section]):
    """A scheme whose evidence is recorded in the claim: its section's place and format, and its check."""

    claim_key: str
    """the section's key in claim.json, and the ``Claim`` field that holds it"""
    top_level: bool
    """the section sits beside ``format`` (always written, null when absent) rather than under ``extensions``
    (written only when present); claim format 1 put the first scheme at the top level"""
    evidence_name: str
    """the name of its ``Evidence``, and of the ``Unavailable`` entry when the suspect does not allow it"""
    description: str
    """what the section holds, for messages ("a QR signature")"""
    schema: dict[str, Any]
    """the section's JSON schema, checked where a claim is read"""

    def section_to_json(self, section: Section) -> dict[str, Any]: ...

    def section_from_json(self, data: Any) -> Section:
        """The section, refused with an InputError unless it fits ``schema``."""
        ...

    def evidence(self, section: Section, context: VerifyContext) -> Evidence:
        """V(...) for this scheme; an InputError when the suspect does not allow the check (a missing layer,
        an architecture that cannot be rebuilt), which ``verify`` lists as unavailable."""
        ...


SCHEMES: dict[str, ClaimScheme[Any]] = {scheme.claim_key: scheme for scheme in (SIGNATURE_SCHEME, TRIGGER_SCHEME)}

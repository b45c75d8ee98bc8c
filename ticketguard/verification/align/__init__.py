"""Alignment: undo a thief's free, function-preserving disguises before reading any evidence from a suspect.

Permuting channels, rescaling them through BatchNorm, renaming keys, folding BatchNorm, exporting to ONNX and
adding dummy or split channels (ticketguard.attacks.disguises) leave a network's function unchanged but move every
weight that position-based evidence reads. The owner keeps a compact record of the protected ticket
(``Reference``: its masks, per-channel kernel norms and BatchNorm statistics), and ``align`` returns the
suspect in the reference architecture's own state_dict form, computing the suspect's function:

1. structure: layers from the ONNX graph, else from names that spell the architecture (its own or
   torchvision's), else (opaque names) from content: same-shape kernels matched on sorted kept counts, 1-D
   tensors on the reference's BatchNorm statistics;
2. widths: split hidden channels merged, then channels with no outgoing weight left out;
3. order: per permutation group a linear assignment on mask agreement with the reference, iterated across
   layers as in weight matching (Ainsworth et al., Git Re-Basin), option-A shortcuts respected; a group that
   structural pruning left narrower gets a rectangular assignment, and the reference channels it lacks come
   back as zero channels (computing nothing, feeding nothing), recorded in ``observed``;
4. units: per output channel the scale that maps the kernel onto the reference's norm is divided out and
   BatchNorm compensates exactly, so an owner's magnitude threshold applies in the reference's units.

V2 and V3 then read the result unchanged, V2 and the fingerprint only on the cells the suspect still has.
Alignment maximises agreement, so its overlap must be compared with that of independently trained tickets
passed through the same alignment, never with a random mask.

Modules: ``reference`` (the record and its JSON), ``layout`` (what the steps share), ``structure``
(step 1 and the shape checks of 2), ``permutations`` (2 and 3), ``scales`` (4 and the final state_dict);
``any_model`` runs steps 1, 3 and 4 for a model named by import path, on the channel symmetries its traced
forward shows (``ticketguard.models.symmetries``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from ticketguard.artifacts.suspect import Suspect
from ticketguard.core.masks import Mask
from ticketguard.core.threads import one_intra_op_thread
from ticketguard.models import MODELS
from ticketguard.verification.align.any_model import align_any_model
from ticketguard.verification.align.layout import (
    AlignmentError,
    Layout,
    Weights,
    axis_owners,
    group_width,
    layout_of,
)
from ticketguard.verification.align.permutations import narrow, recover_permutations, reorder
from ticketguard.verification.align.reference import KernelPrint, Reference
from ticketguard.verification.align.scales import canonicalise, state_dict_of
from ticketguard.verification.align.structure import attach_vectors, check_tensors, read_structure
from ticketguard.verification.reading import effective_magnitudes, rank_read, read_summary

__all__ = ["Alignment", "AlignmentError", "KernelPrint", "Reference", "align"]


@dataclass(frozen=True)
class Alignment:
    """The suspect in the reference's state_dict form (same keys, shapes and dtypes, same function as the
    suspect), the mask read from its prunable weights on its own terms (``ticketguard.verification.reading``), and a
    JSON-ready account of what was undone and how the mask was read."""

    weights: Weights
    mask: Mask
    report: dict[str, Any]
    observed: dict[str, torch.Tensor] | None = None
    """per masked layer, the cells whose output and input channels the suspect still has (a structurally
    pruned copy lacks the others: unknown, not empty); None when it has every channel"""


def align(
    suspect: Suspect, reference: Reference, held_out: Mapping[str, torch.Tensor] | None = None
) -> Alignment:
    """The suspect in the reference architecture's own form, its channels in the reference's order and scales
    in its units; AlignmentError says why when it cannot be put in that form.

    ``held_out``: per layer, cells whose agreement is tested afterwards against a random-mask null (the
    signature's copies); the channel orders of a model named by import path are fitted without them, so the
    test does not count agreement the assignment chose. The registered ResNets' alignment still fits on
    every cell (its false-claim rate is measured in benchmarks/README.md)."""
    with one_intra_op_thread():
        return _align(suspect, reference, held_out or {})


def _align(suspect: Suspect, reference: Reference, held_out: Mapping[str, torch.Tensor]) -> Alignment:
    broken = [k for k, t in suspect.weights.items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if broken:
        raise AlignmentError(f"the suspect's {broken[0]} holds non-finite values, so it computes no function")
    if reference.architecture[0] not in MODELS:
        return _align_any_model(suspect, reference, held_out)
    layout = layout_of(reference.architecture)
    parts = read_structure(suspect, reference, layout)
    check_tensors(parts, layout)
    removed = {
        g.name: narrow(parts.tensors, g)
        for g in layout.groups
        if g.kind == "hidden" and group_width(parts.tensors, g) > g.size
    }
    perms, rounds, converged = recover_permutations(
        parts.tensors, _read(parts.tensors, reference, layout), reference, layout
    )
    if parts.vectors is not None:
        attach_vectors(parts, perms, reference, layout)
    owner = axis_owners(layout, parts.tensors)
    missing = {
        g.name: perms[g.name] >= group_width(parts.tensors, g)
        for g in layout.groups
        if group_width(parts.tensors, g) < g.size
    }
    observed = _observed_cells(reference, missing, owner) if missing else None
    aligned = {key: reorder(tensor, key, perms, owner) for key, tensor in parts.tensors.items()}
    mask = Mask(_read(aligned, reference, layout, observed))  # read in the suspect's own units
    scales = canonicalise(aligned, reference, layout, parts.folded)
    weights = state_dict_of(aligned, layout)
    seen = observed or {}
    overlap = {key: _jaccard(mask[key], reference.masks[key], seen.get(key)) for key in mask}
    owned = {key: int((m & seen.get(key, m)).sum()) for key, m in reference.masks.items()}
    report = {
        "structure": parts.structure,
        "batchnorm": "rebuilt from folded conv biases" if parts.folded else "kept",
        "layers": parts.sources,
        "rounds": rounds,
        "converged": converged,
        "permuted": {name: int((p != torch.arange(len(p))).sum()) for name, p in perms.items()},
        "removed": removed,
        "pruned": {name: {"missing": int(m.sum()), "kept": int((~m).sum())} for name, m in missing.items()},
        "rescaled": {conv: _scale_summary(s) for conv, s in scales.items()},
        "overlap": overlap,
        "mean_overlap": sum(overlap.values()) / len(overlap) if overlap else float("nan"),
        "reading": read_summary(mask, owned),
    }
    return Alignment(weights, mask, report, observed)


def _align_any_model(
    suspect: Suspect, reference: Reference, held_out: Mapping[str, torch.Tensor]
) -> Alignment:
    weights, kept, report = align_any_model(suspect, reference, held_out)
    mask = Mask(kept)
    overlap = {key: _jaccard(mask[key], reference.masks[key]) for key in mask}
    owned = {key: int(m.sum()) for key, m in reference.masks.items()}
    report |= {
        "overlap": overlap,
        "mean_overlap": sum(overlap.values()) / len(overlap) if overlap else float("nan"),
        "reading": read_summary(mask, owned),
    }
    return Alignment(weights, mask, report)


def _observed_cells(
    reference: Reference, missing: dict[str, torch.Tensor], owner: dict[tuple[str, int], str]
) -> dict[str, torch.Tensor]:
    """Per masked layer, the cells whose output and input channels are both among the suspect's."""
    observed = {}
    for key, owned in reference.masks.items():
        present = []
        for dim in (0, 1):
            group = owner.get((key, dim))
            lacking = missing.get(group) if group is not None else None
            present.append(torch.ones(owned.shape[dim], dtype=torch.bool) if lacking is None else ~lacking)
        cells = present[0][:, None] & present[1][None, :]
        observed[key] = cells.view(*cells.shape, *[1] * (owned.dim() - 2)).expand_as(owned)
    return observed


def _read(
    tensors: Weights, reference: Reference, layout: Layout, observed: dict[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """Each masked layer's kept weights, read by rank in BatchNorm units where its BatchNorm is present, as
    many as the reference keeps there: on the ``observed`` cells when the suspect lacks channels, in
    proportion for a layer still wider or narrower than the reference's."""
    kept = {}
    for key, owned in reference.masks.items():
        tensor, bn = tensors[key], layout.bn_of.get(key.removesuffix(".weight"))
        stats = None
        if bn is not None and f"{bn}.weight" in tensors and f"{bn}.running_var" in tensors:
            stats = (tensors[f"{bn}.weight"], tensors[f"{bn}.running_var"], layout.eps[bn])
        if observed is not None:
            count = int((owned & observed[key]).sum())
        else:
            count = round(int(owned.sum()) * tensor.numel() / owned.numel())
        kept[key] = rank_read(effective_magnitudes(tensor, stats), count, tensor)
    return kept


def _jaccard(mask: torch.Tensor, reference: torch.Tensor, observed: torch.Tensor | None = None) -> float:
    if observed is not None:
        mask, reference = mask & observed, reference & observed
    union = int((mask | reference).sum())
    return int((mask & reference).sum()) / union if union else 1.0


def _scale_summary(scale: torch.Tensor) -> dict[str, float | int]:
    magnitude = scale.abs()
    return {
        "channels": int(((scale - 1).abs() > 1e-6).sum()),
        "flipped": int((scale < 0).sum()),
        "max_factor": float(torch.maximum(magnitude, 1 / magnitude).max()),
    }

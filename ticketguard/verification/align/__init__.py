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
   layers as in weight matching (Ainsworth et al., Git Re-Basin), option-A shortcuts respected;
4. units: per output channel the scale that maps the kernel onto the reference's norm is divided out and
   BatchNorm compensates exactly, so an owner's magnitude threshold applies in the reference's units.

V2 and V3 then read the result unchanged. Alignment maximises agreement, so its overlap must be compared with
that of independently trained tickets passed through the same alignment, never with a random mask.

Modules: ``reference`` (the record and its JSON), ``layout`` (what the steps share), ``structure``
(step 1 and the shape checks of 2), ``permutations`` (2 and 3), ``scales`` (4 and the final state_dict).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ticketguard.artifacts.suspect import Suspect
from ticketguard.core.masks import Mask
from ticketguard.core.threads import one_intra_op_thread
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


def align(suspect: Suspect, reference: Reference) -> Alignment:
    """The suspect in the reference architecture's own form, its channels in the reference's order and scales
    in its units; AlignmentError says why when it cannot be put in that form."""
    with one_intra_op_thread():
        return _align(suspect, reference)


def _align(suspect: Suspect, reference: Reference) -> Alignment:
    layout = layout_of(reference.architecture)
    broken = [k for k, t in suspect.weights.items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if broken:
        raise AlignmentError(f"the suspect's {broken[0]} holds non-finite values, so it computes no function")
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
    aligned = {key: reorder(tensor, key, perms, owner) for key, tensor in parts.tensors.items()}
    mask = Mask(_read(aligned, reference, layout))  # in the suspect's units, in which its values were stored
    scales = canonicalise(aligned, reference, layout, parts.folded)
    weights = state_dict_of(aligned, layout)
    overlap = {key: _jaccard(mask[key], reference.masks[key]) for key in mask}
    report = {
        "structure": parts.structure,
        "batchnorm": "rebuilt from folded conv biases" if parts.folded else "kept",
        "layers": parts.sources,
        "rounds": rounds,
        "converged": converged,
        "permuted": {name: int((p != torch.arange(len(p))).sum()) for name, p in perms.items()},
        "removed": removed,
        "rescaled": {conv: _scale_summary(s) for conv, s in scales.items()},
        "overlap": overlap,
        "mean_overlap": sum(overlap.values()) / len(overlap) if overlap else float("nan"),
        "reading": read_summary(mask, {key: int(m.sum()) for key, m in reference.masks.items()}),
    }
    return Alignment(weights, mask, report)


def _read(tensors: Weights, reference: Reference, layout: Layout) -> dict[str, torch.Tensor]:
    """Each masked layer's kept weights, read by rank in BatchNorm units where its BatchNorm is present, as
    many as the reference keeps there (in proportion for a layer still wider than the reference's)."""
    kept = {}
    for key, owned in reference.masks.items():
        tensor, bn = tensors[key], layout.bn_of.get(key.removesuffix(".weight"))
        stats = None
        if bn is not None and f"{bn}.weight" in tensors and f"{bn}.running_var" in tensors:
            stats = (tensors[f"{bn}.weight"], tensors[f"{bn}.running_var"], layout.eps[bn])
        count = round(int(owned.sum()) * tensor.numel() / owned.numel())
        kept[key] = rank_read(effective_magnitudes(tensor, stats), count, tensor)
    return kept


def _jaccard(mask: torch.Tensor, reference: torch.Tensor) -> float:
    union = int((mask | reference).sum())
    return int((mask & reference).sum()) / union if union else 1.0


def _scale_summary(scale: torch.Tensor) -> dict[str, float | int]:
    magnitude = scale.abs()
    return {
        "channels": int(((scale - 1).abs() > 1e-6).sum()),
        "flipped": int((scale < 0).sum()),
        "max_factor": float(torch.maximum(magnitude, 1 / magnitude).max()),
    }

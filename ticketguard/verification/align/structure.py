"""Steps 1 and 2 of alignment, structure: the suspect's layers under the reference's keys, and their shapes.

Layers come from the ONNX graph, else from names that spell the architecture (its own or torchvision's, under
a wrapper's prefix or none, extra tensors beside them left out), else
(opaque names) from content: kernels on shape and kept counts, 1-D tensors on the reference's BatchNorm
statistics once channel orders are known. Hidden channels may be wider than the reference's (``widen``), and
layers found by name or in a graph may have fewer channels (structural pruning), never both.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from ticketguard.artifacts.suspect import Suspect
from ticketguard.models.architecture import torchvision_names
from ticketguard.verification.align.layout import (
    AlignmentError,
    Layout,
    Parts,
    Weights,
    axis_owners,
    group_axes,
)
from ticketguard.verification.align.permutations import reorder
from ticketguard.verification.align.reference import Reference
from ticketguard.verification.align.scales import channel_scales

INCOMPATIBLE = 1e12  # assignment cost of a pairing that shapes rule out
UNKNOWN_VECTOR_COST = 0.5  # the classifier bias has no reference value; true BatchNorm matches cost ~0


def read_structure(suspect: Suspect, reference: Reference, layout: Layout) -> Parts:
    """Layers from the most explicit source the suspect offers: its graph, names that spell the architecture
    (the names it is run by), else its content."""
    if suspect.graph is not None:
        return _from_graph(suspect, layout)
    floats = {k: t for k, t in suspect.weights.items() if t.is_floating_point() and t.dim() > 0}
    keys = [*layout.unfolded_keys, *(f"{conv}.bias" for conv in layout.convs)]
    namings = {
        "names": {k: k for k in keys},
        "torchvision names": torchvision_names(keys, layout.architecture[0]),
    }
    for structure, names in namings.items():
        for folded, wanted in ((False, layout.unfolded_keys), (True, layout.folded_keys)):
            prefix = wrapper_prefix(floats, [names[k] for k in wanted])
            if prefix is not None:
                sources = {k: prefix + names[k] for k in wanted}
                tensors = {k: floats[name].double() for k, name in sources.items()}
                return Parts(tensors, sources, structure + (f" under {prefix!r}" if prefix else ""), folded)
    return _from_content(floats, reference, layout)


def wrapper_prefix(floats: Mapping[str, torch.Tensor], wanted: list[str]) -> str | None:
    """The prefix (a wrapper module's name, or none) under which the suspect holds every wanted name; tensors
    beside them (a temperature, a baked-in normalisation) are left out, as a repackaged copy adds them."""
    for key in floats:
        if key.endswith(wanted[0]):
            prefix = key[: len(key) - len(wanted[0])]
            if (not prefix or prefix.endswith(".")) and all(prefix + name in floats for name in wanted):
                return prefix
    return None


def _from_graph(suspect: Suspect, layout: Layout) -> Parts:
    """ONNX: Conv nodes in data-flow order (each block's main path before its shortcut, however the file
    lists them) are the reference's convs in forward order, each with its folded bias; strides check the
    pairing here, shapes in ``check_tensors``."""
    graph, weights = suspect.graph or [], suspect.weights
    convs = [node for node in graph if node.op_type == "Conv"]
    gemms = [node for node in graph if node.op_type == "Gemm"]
    if len(convs) != len(layout.convs) or len(gemms) != 1:
        raise AlignmentError(
            f"the ONNX graph has {len(convs)} Conv and {len(gemms)} Gemm nodes where "
            f"{layout.architecture[0]} has {len(layout.convs)} convs and one classifier; it is another "
            "architecture"
        )
    tensors, sources = {}, {}
    for conv, node in zip(layout.convs, convs):
        if len(node.weights) < 3 or node.weights[1] is None or node.weights[2] is None:
            raise AlignmentError(
                "an ONNX Conv node has no bias: only graphs with BatchNorm folded are handled"
            )
        if node.attributes.get("strides", (1, 1)) != layout.strides[conv]:
            raise AlignmentError(f"the ONNX Conv node for {conv} has strides unlike the reference's")
        for key, name in ((f"{conv}.weight", node.weights[1]), (f"{conv}.bias", node.weights[2])):
            tensors[key], sources[key] = weights[name].double(), name
    gemm = gemms[0]
    if len(gemm.weights) < 3 or gemm.weights[1] is None or gemm.weights[2] is None:
        raise AlignmentError("the ONNX classifier (Gemm) reads no weight matrix and bias")
    matrix = weights[gemm.weights[1]].double()
    tensors[f"{layout.classifier}.weight"] = matrix if gemm.attributes.get("transB", 0) else matrix.T
    tensors[f"{layout.classifier}.bias"] = weights[gemm.weights[2]].double()
    sources[f"{layout.classifier}.weight"], sources[f"{layout.classifier}.bias"] = gemm.weights[1:3]
    return Parts(tensors, sources, "onnx graph", True)


def _from_content(floats: Weights, reference: Reference, layout: Layout) -> Parts:
    """Opaque names: kernels matched to the reference's convs on shape and sorted kept counts (unchanged by
    permutations and scales); the classifier is the one matrix; 1-D tensors are attached later."""
    kernels = {k: t for k, t in floats.items() if t.dim() == 4}
    matrices = [k for k, t in floats.items() if t.dim() == 2]
    if len(kernels) != len(layout.convs) or len(matrices) != 1:
        raise AlignmentError(
            f"the suspect has {len(kernels)} conv kernels and {len(matrices)} weight matrices where "
            f"{layout.architecture[0]} has {len(layout.convs)} and 1; it is another architecture"
        )
    _check_distinguishable(reference, layout)
    ref_keys, suspect_keys = layout.kernel_keys, list(kernels)
    profiles = {k: _count_profile(kernels[k] != 0) for k in suspect_keys}
    cost = np.full((len(ref_keys), len(suspect_keys)), INCOMPATIBLE)
    for i, ref_key in enumerate(ref_keys):
        ref_profile = _count_profile(reference.masks[ref_key]) if ref_key in reference.masks else None
        for j, key in enumerate(suspect_keys):
            if tuple(kernels[key].shape) == layout.state[ref_key][0]:
                cost[i, j] = 0.0 if ref_profile is None else float((ref_profile - profiles[key]).abs().sum())
    rows, cols = linear_sum_assignment(cost)
    if (cost[rows, cols] >= INCOMPATIBLE).any():
        missing = ref_keys[rows[np.argmax(cost[rows, cols])]]
        raise AlignmentError(
            f"no suspect kernel has the shape of the reference's {missing}; with opaque names every layer "
            "must keep the reference's width"
        )
    sources = {ref_keys[i]: suspect_keys[j] for i, j in zip(rows, cols)}
    sources[f"{layout.classifier}.weight"] = matrices[0]
    tensors = {key: floats[name].double() for key, name in sources.items()}
    vectors = {k: t.double() for k, t in floats.items() if t.dim() == 1}
    return Parts(tensors, sources, "content", False, vectors)


def _check_distinguishable(reference: Reference, layout: Layout) -> None:
    """Same-shape convs can be told apart by content only through their masks."""
    shapes: dict[tuple[int, ...], list[str]] = defaultdict(list)
    for key in layout.kernel_keys:
        shapes[layout.state[key][0]].append(key)
    for keys in shapes.values():
        unmasked = [k for k in keys if k not in reference.masks]
        if len(keys) > 1 and unmasked:
            raise AlignmentError(
                f"the suspect's names are opaque and {unmasked[0]} shares its shape with other convs but has "
                "no mask in the reference, so its layer cannot be recognised"
            )


def _count_profile(kept: torch.Tensor) -> torch.Tensor:
    """Sorted kept counts per output and per input channel."""
    rows = kept.flatten(1).sum(1).sort().values
    columns = kept.transpose(0, 1).flatten(1).sum(1).sort().values
    return torch.cat([rows, columns]).double()


def check_tensors(parts: Parts, layout: Layout) -> None:
    """Every tensor has the reference's rank and sizes, except channels: hidden ones may be wider (widen), and
    any group but an option-A stream may be narrower (structural pruning), though not both in one suspect."""
    owner = axis_owners(layout, parts.tensors)
    for key, tensor in parts.tensors.items():
        shape = layout.state.get(key, ((tensor.shape[0],), None))[0]  # a folded bias spans its conv's rows
        if tensor.dim() != len(shape):
            raise AlignmentError(
                f"the suspect's {parts.sources[key]} has {tensor.dim()} dims where {key} has {len(shape)}"
            )
        if any(size != tensor.shape[d] for d, size in enumerate(shape) if (key, d) not in owner):
            raise AlignmentError(
                f"the suspect's {parts.sources[key]} has shape {tuple(tensor.shape)} where {key} has {shape}"
            )
    wider, narrower = [], []
    carried = {group.embeds[0] for group in layout.groups if group.embeds is not None}
    for group in layout.groups:
        widths = {parts.tensors[k].shape[d] for k, d in group_axes(group, parts.tensors)}
        width = max(widths)
        wider_allowed = group.kind == "hidden" and parts.vectors is None
        if len(widths) > 1 or width < 1 or (width > group.size and not wider_allowed):
            raise AlignmentError(
                f"the suspect's channels of {group.name} have widths {sorted(widths)} where the reference "
                f"has {group.size}"
                + ("" if wider_allowed else "; only hidden channels of named layers may be wider")
            )
        if width < group.size and (group.embeds is not None or group.name in carried):
            raise AlignmentError(
                f"the suspect has {width} channels of {group.name} where the reference has {group.size}, but "
                "an option-A shortcut carries that stream at a fixed offset, so no copy that runs lacks them"
            )
        if width > group.size:
            wider.append(group.name)
        elif width < group.size:
            narrower.append(group.name)
    if wider and narrower:
        raise AlignmentError(
            f"the suspect has more channels than the reference in {wider[0]} and fewer in {narrower[0]}: "
            "neither a widened copy nor a structurally pruned one"
        )


def attach_vectors(
    parts: Parts, perms: Mapping[str, torch.Tensor], reference: Reference, layout: Layout
) -> None:
    """Opaque names: give each 1-D tensor the role (a BatchNorm entry, a folded conv bias, the classifier's
    bias) whose reference value it matches once put in reference order and units, by one linear assignment."""
    vectors = parts.vectors or {}
    folded = len(vectors) == len(layout.convs) + 1
    if not folded and len(vectors) != 4 * len(layout.convs) + 1:
        raise AlignmentError(
            f"the suspect has {len(vectors)} 1-D tensors, neither the BatchNorm entries nor the folded "
            f"biases of {layout.architecture[0]}"
        )
    owner = axis_owners(layout, parts.tensors)
    expected: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # role -> (value, reference-to-suspect order)
    for conv in layout.convs:
        key, bn = f"{conv}.weight", layout.bn_of[conv]
        perm = perms[owner[(key, 0)]]
        gamma, beta, mean, var = reference.batchnorms[bn].double()
        eps = layout.eps[bn]
        if folded:
            expected[f"{conv}.bias"] = (beta - mean * gamma / torch.sqrt(var + eps), perm)
            continue
        s = channel_scales(reorder(parts.tensors[key], key, perms, owner), reference.kernels[key])
        rescaled = {
            "weight": gamma * torch.sqrt(s**2 * var + eps) / (s * torch.sqrt(var + eps)),
            "bias": beta,
            "running_mean": s * mean,
            "running_var": s**2 * var,
        }
        expected.update({f"{bn}.{entry}": (value, perm) for entry, value in rescaled.items()})
    roles, names = list(expected), list(vectors)
    of_length: dict[int, list[int]] = defaultdict(list)
    for j, name in enumerate(names):
        of_length[len(vectors[name])].append(j)
    stacked = {length: torch.stack([vectors[names[j]] for j in js]) for length, js in of_length.items()}
    cost = np.full((len(roles) + 1, len(names)), INCOMPATIBLE)
    for i, role in enumerate(roles):
        value, perm = expected[role]
        if len(value) in stacked:
            ordered = stacked[len(value)][:, perm]
            distance = (ordered - value).norm(dim=1) / (ordered.norm(dim=1) + value.norm() + 1e-12)
            cost[i, of_length[len(value)]] = distance.numpy()
    cost[-1, of_length.get(layout.state[f"{layout.classifier}.bias"][0][0], [])] = UNKNOWN_VECTOR_COST
    rows, cols = linear_sum_assignment(cost)
    if (cost[rows, cols] >= INCOMPATIBLE).any():
        raise AlignmentError("the suspect's 1-D tensors do not have the lengths of the reference's")
    for i, j in zip(rows, cols):
        role = roles[i] if i < len(roles) else f"{layout.classifier}.bias"
        parts.tensors[role], parts.sources[role] = vectors[names[j]], names[j]
    parts.folded, parts.vectors = folded, None

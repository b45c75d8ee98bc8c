"""A ticket from a sparse model the user found elsewhere: a model file (a state_dict, a Lightning checkpoint, a
``torch.nn.utils.prune`` checkpoint, safetensors) of a model named by import path or registered name.

The file holds the trained weights W and, through its zeros or pruning masks, the mask M, but not the
late-rewind weights W_k that a search keeps; the ticket's rewind weights are W itself, so protecting it
retrains from the weights the owner ships.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ticketguard.artifacts.ticket import Ticket
from ticketguard.core.files import load_tensors
from ticketguard.core.masks import fold_pruning_reparametrisation, mask_from_zeros, prunable_names
from ticketguard.data import ImageData
from ticketguard.models import accept_model_name, build_from_state
from ticketguard.training.loop import evaluate, state_copy


def adopt(
    path: str | Path,
    architecture: str,
    data: ImageData,
    *,
    include_classifier: bool = False,
    prune: Sequence[str] = (),
) -> Ticket:
    """The ticket N[W, M] of the model file at ``path``, built as ``architecture`` for ``data``, with its test
    accuracy measured. M covers the prunable weights (``masks.prunable_names``) and keeps their non-zeros."""
    accept_model_name(architecture)
    weights, _ = fold_pruning_reparametrisation(load_tensors(path))
    channels, classes = data.input_shape[0], data.num_classes
    named = (architecture, channels, classes)
    model, _ = build_from_state(weights, f"adopting {path}", named, reshaped=False)
    weights = state_copy(model)
    mask = mask_from_zeros(weights, prunable_names(model, include_classifier, prune))
    return Ticket(
        architecture=architecture,
        in_channels=channels,
        num_classes=classes,
        input_size=tuple(data.input_shape[1:]),
        dataset=data.name,
        classes=list(data.classes),
        mask=mask,
        rewind=dict(weights),
        weights=weights,
        accuracy=evaluate(model, data),
        metadata={"adopted": {"source": Path(path).name, "rewind": "the file's weights (it holds no W_k)"}},
        normalization=data.normalization(),
    )

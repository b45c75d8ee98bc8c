"""A model ready to be served: a ticket folder or a model file, checked, with the input statistics it needs."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ticketguard.artifacts.suspect import load_suspect
from ticketguard.artifacts.ticket import Ticket, is_ticket_folder
from ticketguard.core.errors import InputError
from ticketguard.data import DATASETS, load_dataset
from ticketguard.models import accept_model_name, build_from_state


@dataclass
class ServedModel:
    """A model ready to answer: it takes FP32 pixels in [0, 1] and standardises them as in training."""

    name: str
    model: nn.Module
    input_shape: tuple[int, int, int]
    num_classes: int
    mean: torch.Tensor
    std: torch.Tensor

    @torch.inference_mode()
    def logits(self, pixels: torch.Tensor) -> torch.Tensor:
        scaled = (pixels - self.mean.view(1, -1, 1, 1)) / self.std.view(1, -1, 1, 1)
        return self.model(scaled).float()


def ticket_normalization(ticket: Ticket) -> tuple[torch.Tensor, torch.Tensor]:
    """Channel mean and std the ticket was trained with, as it records them, or from a built-in data set."""
    if ticket.normalization is not None:
        return ticket.normalization.tensors()
    if ticket.dataset in _builtin_datasets():
        return load_dataset(ticket.dataset).channel_stats()
    raise InputError(
        f"the ticket does not record the channel statistics of {ticket.dataset!r}; pass --mean and --std"
    )


def _builtin_datasets() -> set[str]:
    return {name for name, spec in DATASETS.items() if not spec.needs_folder}


def load_served_model(
    path: str | Path,
    name: str = "ticket",
    input_size: int | None = None,
    mean: list[float] | None = None,
    std: list[float] | None = None,
    trust_code: bool = False,
    architecture: str | None = None,
    num_classes: int | None = None,
) -> ServedModel:
    """A ticket folder (of any architecture; ``trust_code`` as in ``Ticket.load``) or a model file, of a
    registered architecture or of ``architecture`` (a name or import path the caller gives, with the
    ``num_classes`` it predicts), in eval mode on the CPU."""
    path = Path(path)
    if is_ticket_folder(path):
        ticket = Ticket.load(path, trust_code=trust_code)
        model, weights = ticket.build_model(), ticket.weights
        channels, classes, size = ticket.in_channels, ticket.num_classes, tuple(ticket.input_size)
        stats = ticket_normalization(ticket) if mean is None or std is None else None
    else:
        weights = load_suspect(path).weights
        if input_size is None or mean is None or std is None:
            raise InputError(f"serving the model file {path} needs --input-size, --mean and --std")
        named = None
        if architecture is not None:
            if num_classes is None:
                raise InputError(f"serving {path} as {architecture} needs --num-classes")
            accept_model_name(architecture)
            named = (architecture, len(mean), num_classes)
        model, (_, channels, classes) = build_from_state(weights, f"serving {path}", named)
        size, stats = (input_size, input_size), None
    _check_servable(weights, model, path)
    if input_size is not None:
        size = (input_size, input_size)
    mean_t, std_t = stats if stats is not None else (torch.tensor(mean), torch.tensor(std))
    if mean_t.numel() != channels or std_t.numel() != channels:
        raise InputError(f"--mean and --std need {channels} value(s), one per input channel")
    return ServedModel(name, model.eval(), (channels, *size), classes, mean_t.float(), std_t.float())


def _check_servable(weights: dict[str, torch.Tensor], model: nn.Module, path: Path) -> None:
    """Refuse weights the model would serve wrongly: loading casts bool or integer tensors to floats without a
    word, and a NaN or infinite weight answers NaN logits."""
    for key, expected in model.state_dict().items():
        if not expected.is_floating_point():
            continue
        given = weights[key]
        if not given.is_floating_point():
            raise InputError(
                f"{path}: {key!r} is {given.dtype}, but a served model needs floating-point weights"
            )
        if not torch.isfinite(given).all():
            raise InputError(f"{path}: {key!r} holds NaN or infinite values, so the model cannot be served")

"""Attacks on a (protected) ticket, paper §4.3-4.4: removal (pruning, fine-tuning, transfer), add-on with the
owner's magnitude defence and the forgeries fake1-3, in the ``ATTACKS`` registry; ``chains`` runs them in
sequence as written on the command line.

Every attack is ``attack(weights, mask, **params) -> (weights, mask)``: ``weights`` is a full state_dict,
``mask`` covers the prunable weights; the returned weights are zero wherever the returned mask prunes.
Parameters are checked where they enter, each bad one refused with an ``InputError`` that says what to use.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np
import torch
from torch import nn

from ticketguard.attacks.disguises import DISGUISES
from ticketguard.attacks.structural import prune_channels
from ticketguard.core.errors import InputError
from ticketguard.core.masks import Mask, Weights, magnitude_prune, mask_from_zeros
from ticketguard.data import ImageData
from ticketguard.data.augment import normalize
from ticketguard.models import build_from_state, build_model, identify_architecture
from ticketguard.schemes import qr
from ticketguard.schemes.keymask import forge_random_key, merge_tensors
from ticketguard.schemes.signature import Signature
from ticketguard.training.fixed_mask import keep_mask
from ticketguard.training.loop import TrainConfig, state_copy, train
from ticketguard.verification.defence import magnitude_defence

Attack = Callable[..., tuple[Weights, Mask]]


def _masked(weights: Mapping[str, torch.Tensor], mask: Mask) -> Weights:
    return {name: t * mask[name].to(t.dtype) if name in mask else t.clone() for name, t in weights.items()}


def _check_fraction(fraction: float, what: str, upper: float = 1.0, closed: bool = False) -> None:
    inside = 0.0 <= fraction <= upper if closed else 0.0 <= fraction < upper
    if not inside:
        bracket = "]" if closed else ")"
        raise InputError(f"{what} fraction must be in [0, {upper}{bracket}, got {fraction}")


def _check_positive(value: float, what: str) -> None:
    if not value > 0:
        raise InputError(f"{what} must be > 0, got {value}")


def magnitude_pruning(
    weights: Mapping[str, torch.Tensor], mask: Mask, *, fraction: float
) -> tuple[Weights, Mask]:
    """One-shot global magnitude pruning of ``fraction`` of the remaining weights."""
    pruned = magnitude_prune(weights, mask, fraction)
    return _masked(weights, pruned), pruned


def random_pruning(
    weights: Mapping[str, torch.Tensor], mask: Mask, *, fraction: float, seed: int = 0
) -> tuple[Weights, Mask]:
    """One-shot pruning of a uniformly random ``fraction`` of the remaining weights."""
    _check_fraction(fraction, "pruning")
    generator = torch.Generator().manual_seed(seed)
    kept = mask.flat().cpu()
    positions = kept.nonzero().squeeze(1)
    drop = positions[torch.randperm(len(positions), generator=generator)[: round(fraction * len(positions))]]
    kept[drop] = False
    result = mask.unflatten(kept)
    return _masked(weights, result), result


def _model_of(weights: Mapping[str, torch.Tensor], architecture: str | None, data: ImageData) -> nn.Module:
    """The model to retrain: ``architecture`` (a ticket's, registered or by import path) built for ``data``,
    else the registered architecture the weights fit."""
    named = None if architecture is None else (architecture, data.input_shape[0], data.num_classes)
    return build_from_state(dict(weights), "this attack retrains, so it", named)[0]


def _tune(
    model: nn.Module,
    mask: Mask,
    data: ImageData,
    epochs: int,
    lr: float,
    seed: int,
    free: bool,
    device: torch.device | None,
    description: str,
    optimizer: str = "sgd",
) -> tuple[Weights, Mask]:
    """Constant-lr SGD (or Adam); the mask held fixed (paper) or, with ``free``, every weight trainable
    (dense)."""
    if epochs < 1:
        raise InputError(f"fine-tuning needs >= 1 epoch, got {epochs}")
    _check_positive(lr, "the fine-tuning learning rate")
    if optimizer not in TUNING_OPTIMIZERS:
        raise InputError(f"unknown fine-tuning optimizer {optimizer!r}; choose one of: {', '.join(TUNING_OPTIMIZERS)}")
    model.to(device or torch.device("cpu"))
    kept = None if free else mask
    if optimizer == "adam":
        _adam_epochs(model, data, epochs, lr, seed, kept)
    else:
        config = TrainConfig(epochs=epochs, lr=lr, milestones=(), seed=seed)
        train(model, data, config, kept, description=description)
    tuned = state_copy(model)
    if not free:
        return tuned, mask
    return tuned, mask_from_zeros(tuned, list(mask))


def fine_tuning(
    weights: Mapping[str, torch.Tensor],
    mask: Mask,
    *,
    data: ImageData,
    epochs: int = 3,
    lr: float = 0.01,
    seed: int = 0,
    free: bool = False,
    optimizer: str = "sgd",
    device: torch.device | None = None,
    architecture: str | None = None,
) -> tuple[Weights, Mask]:
    """A few epochs of SGD (or ``optimizer="adam"``) at a small, constant learning rate on ``data``; ``free``
    lets pruned weights grow back (dense fine-tuning, a stronger attacker than the paper's).
    ``architecture``: the model's name or import path when the weights are not of a registered
    architecture."""
    model = _model_of(weights, architecture, data)
    return _tune(model, mask, data, epochs, lr, seed, free, device, "fine-tune", optimizer)


TUNING_OPTIMIZERS = ("sgd", "adam")


def _adam_epochs(
    model: nn.Module, data: ImageData, epochs: int, lr: float, seed: int, mask: Mask | None
) -> None:
    """Adam at a constant rate on plain batches of 128: the thief's usual fine-tuning loop, which moves
    every weight (even small ones) by about lr a step."""
    device = next(model.parameters()).device
    images, labels = data.train_images.to(device), data.train_labels.to(device)
    mean, std = (t.to(device) for t in data.channel_stats())
    adam = torch.optim.Adam(model.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    with keep_mask(model, mask if mask is not None else Mask({}), [adam]):
        for _ in range(epochs):
            for batch in torch.randperm(len(labels), generator=generator).split(128):
                loss = nn.functional.cross_entropy(model(normalize(images[batch], mean, std)), labels[batch])
                adam.zero_grad()
                loss.backward()
                adam.step()
    model.eval()


def transfer(
    weights: Mapping[str, torch.Tensor],
    mask: Mask,
    *,
    transfer_data: ImageData,
    epochs: int = 3,
    lr: float = 0.01,
    seed: int = 0,
    free: bool = False,
    device: torch.device | None = None,
) -> tuple[Weights, Mask]:
    """Transfer to another data set: a new head for ``transfer_data``'s classes, then fine-tuning."""
    data = transfer_data
    architecture = identify_architecture(dict(weights))
    if architecture is None:
        raise InputError("transfer needs weights of a registered architecture")
    name, in_channels, _ = architecture
    if data.input_shape[0] != in_channels:
        raise InputError(
            f"transfer data has {data.input_shape[0]} channels but the model takes {in_channels}"
        )
    torch.manual_seed(seed)
    model = build_model(name, in_channels, data.num_classes)
    fresh = model.state_dict()
    model.load_state_dict({k: t if t.shape == fresh[k].shape else fresh[k] for k, t in weights.items()})
    return _tune(model, mask, data, epochs, lr, seed, free, device, "transfer")


def _switch_on(
    weights: Mapping[str, torch.Tensor], mask: Mask, fraction: float, scale: float, seed: int
) -> tuple[Weights, Mask]:
    """Switch on a random ``fraction`` of the pruned positions with N(0, (scale · kept std)^2) weights."""
    generator = torch.Generator().manual_seed(seed)
    pruned = ~mask.flat().cpu()
    positions = pruned.nonzero().squeeze(1)
    chosen = torch.zeros_like(pruned)
    chosen[
        positions[torch.randperm(len(positions), generator=generator)[: round(fraction * len(positions))]]
    ] = True
    added = mask.unflatten(chosen)
    spread = mask.kept_spread(weights)
    result = {name: t.clone() for name, t in weights.items()}
    for name in mask:
        noise = torch.randn(mask[name].shape, generator=generator) * scale * spread[name]
        result[name] = torch.where(added[name], noise.to(result[name].dtype), result[name])
    return result, Mask({name: mask[name] | added[name] for name in mask})


def add_on(
    weights: Mapping[str, torch.Tensor], mask: Mask, *, fraction: float, scale: float = 0.03, seed: int = 0
) -> tuple[Weights, Mask]:
    """Add-on attack: switch on ``fraction`` of the pruned positions (paper: 0.5-10 %) with small random
    weights, ``scale`` times the std of the tensor's kept weights."""
    _check_fraction(fraction, "add-on", closed=True)
    _check_positive(scale, "the add-on weight scale")
    return _switch_on(weights, mask, fraction, scale, seed)


def fake1(
    weights: Mapping[str, torch.Tensor], mask: Mask, *, key_density: float | None = None, seed: int = 0
) -> tuple[Weights, Mask]:
    """fake1 against V1: complete a locked ticket with a random key of the true key's size (``key_density``
    of the locked ticket's kept weights) and random values."""
    if key_density is None:
        raise InputError(
            "fake1 forges a key for a locked ticket, and the suspect carries no key size; split it with V1 "
            "first or give --key-density"
        )
    if not 0.0 < key_density < 1.0:
        raise InputError(f"fake1 key density must lie in (0, 1), got {key_density}")
    size = max(1, round(key_density * mask.kept()))
    forged_mask, forged_weights, _ = merge_tensors(mask, weights, weights, forge_random_key(mask, weights, size, seed))
    return forged_weights, forged_mask


def fake2(
    weights: Mapping[str, torch.Tensor],
    mask: Mask,
    *,
    fraction: float = 1.0,
    scale: float = 1.0,
    seed: int = 0,
) -> tuple[Weights, Mask]:
    """fake2: noise weights at the pruned positions (all by default, at the kept weights' scale), so the
    suspect's own mask no longer shows the owner's sparse structure."""
    _check_fraction(fraction, "fake2", closed=True)
    _check_positive(scale, "the fake2 noise scale")
    return _switch_on(weights, mask, fraction, scale, seed)


def fake3(
    weights: Mapping[str, torch.Tensor],
    mask: Mask,
    *,
    signature: Signature | None = None,
    payload: str = "FORGED",
    scale: float = 1.0,
    seed: int = 0,
) -> tuple[Weights, Mask]:
    """fake3: overwrite each claimed code region with a forged QR of the same version and mask pattern:
    forged dark cells get a full kernel of noise weights, light cells are emptied (paper: ResNet-20 falls
    from 91.37 % to 57.00 %)."""
    if signature is None:
        raise InputError("fake3 overwrites the code region, and none is known; give the owner's --claim")
    _check_positive(scale, "the fake3 noise scale")
    spec = signature.spec
    try:
        forged = qr.make_qr(payload, error=spec.error, version=spec.version, mask_pattern=spec.mask_pattern)
    except ValueError as err:
        raise InputError(
            f"the forged payload {payload!r} does not fit QR version {spec.version}: {err}"
        ) from None
    generator = torch.Generator().manual_seed(seed)
    spread = mask.kept_spread(weights)
    positions = torch.from_numpy(forged.data_positions.astype(np.int64))
    wanted = torch.from_numpy(forged.data_modules == signature.kept_is_dark)
    result, new_mask = {n: t.clone() for n, t in weights.items()}, {n: t.clone() for n, t in mask.items()}
    for region in signature.regions:
        if region.layer not in mask:
            raise InputError(f"the claim names layer {region.layer!r}, which the suspect does not mask")
        rows, cols = positions[:, 0] + region.row, positions[:, 1] + region.col
        layer = result[region.layer]
        noise = torch.randn(layer[rows, cols].shape, generator=generator) * scale * spread[region.layer]
        # one flag per connection, broadcast over a conv connection's kernel (a 2-D host has none)
        per_connection = wanted.reshape(-1, *[1] * (layer.dim() - 2))
        layer[rows, cols] = torch.where(per_connection, noise.to(layer.dtype), torch.zeros_like(noise))
        new_mask[region.layer][rows, cols] = per_connection.expand_as(
            new_mask[region.layer][rows, cols]
        )
    return result, Mask(new_mask)


ATTACKS: dict[str, Attack] = {
    "magnitude": magnitude_pruning,
    "random": random_pruning,
    "finetune": fine_tuning,
    "transfer": transfer,
    "addon": add_on,
    "defence": magnitude_defence,
    "fake1": fake1,
    "fake2": fake2,
    "fake3": fake3,
    "channels": prune_channels,
    **DISGUISES,  # edits that keep the function: permute, rescale, fold-bn, rename, widen
}

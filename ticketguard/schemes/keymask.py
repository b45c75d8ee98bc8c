"""Scheme V1, key masks (Algorithm 1): split a ticket into a locked ticket and a small key; merge them back.

The key mask M_s holds the n = n_s·||M||_0 highest-scoring kept weights; the locked mask is M_l = M - M_s.
The locked ticket is an ordinary ticket folder (mask M_l, weights W⊙M_l, rewind W_k with the key positions
zeroed); the key folder holds ``key.json`` (format, n_s, score, sha256 of the locked ticket's mask and weights
files and of ``key.safetensors``) and ``key.safetensors`` (per tensor: the flat indices of M_s, W⊙M_s and
W_k⊙M_s). Merging puts the exact key values back, so merge(split(ticket)) reproduces mask, weights and
rewind bit for bit.

Ownership shows in performance: retrained without the key the locked ticket misses the dense accuracy by more
than eps_f; with the key it matches.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from rich.progress import Progress

from ticketguard.artifacts.ticket import MANIFEST, MASK_FILE, WEIGHTS_FILE, Ticket
from ticketguard.core.errors import InputError
from ticketguard.core.evidence import Evidence
from ticketguard.core.files import (
    KEY_MANIFEST,
    load_tensors,
    read_json,
    read_manifest,
    save_tensors,
    sha256_file,
    staged_folder,
    write_json,
)
from ticketguard.core.masks import Mask, Weights
from ticketguard.core.schema import SHA256_SCHEMA, SHARE, nullable
from ticketguard.data import ImageData
from ticketguard.models import build_model
from ticketguard.schemes.scores import GRAPH_SCORES, score
from ticketguard.training.loop import TrainConfig, train

KEY_FORMAT = "ticketguard-key/1"
KEY_FILE = "key.safetensors"
METADATA_ENTRY = "keymask"
LOCKED_FOLDER, KEY_FOLDER = "locked", "key"
KEY_SCHEMA = {
    "type": "object",
    "required": ["key_density", "score", "tensors", "locked", "files"],
    "properties": {
        "key_density": {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1},
        "score": {"type": "string"},
        "size": {"type": "integer", "minimum": 0},
        "tensors": {"type": "array", "items": {"type": "string"}, "uniqueItems": True},
        "locked": {
            "type": "object",
            "required": [MASK_FILE, WEIGHTS_FILE],
            "properties": {MASK_FILE: SHA256_SCHEMA, WEIGHTS_FILE: SHA256_SCHEMA},
            "additionalProperties": False,
        },
        "files": {"type": "object", "additionalProperties": SHA256_SCHEMA},
        "restore": {"type": "object", "properties": {"accuracy": nullable(SHARE)}},
    },
}


@dataclass
class Key:
    """M_s with the values it removes: flat positions per tensor, and the weight and rewind values there."""

    index: dict[str, torch.Tensor]
    weights: dict[str, torch.Tensor]
    rewind: dict[str, torch.Tensor]
    density: float
    score: str
    restore: dict[str, Any] = field(default_factory=dict)

    def size(self) -> int:
        return sum(int(i.numel()) for i in self.index.values())

    def mask(self, like: Mask) -> Mask:
        """M_s as a dense mask with the shapes of ``like``."""
        dense = {}
        for name, tensor in like.items():
            flat = torch.zeros(tensor.numel(), dtype=torch.bool)
            flat[self.index.get(name, torch.zeros(0, dtype=torch.long))] = True
            dense[name] = flat.view_as(tensor)
        return Mask(dense)


def check_key_density(key_density: float) -> None:
    if not 0.0 < key_density < 1.0:
        raise InputError(f"key density n_s must lie in (0, 1), e.g. 0.05, got {key_density}")


def key_mask(scores: Mapping[str, torch.Tensor], mask: Mask, key_density: float) -> Mask:
    """M_s: the n = round(n_s·||M||_0) highest scores among the kept weights, across all tensors."""
    check_key_density(key_density)
    kept = mask.kept_values(scores)
    if kept.numel() == 0:
        raise InputError("the ticket keeps no prunable weights, so there is no key to split off")
    count = max(1, round(key_density * kept.numel()))
    chosen = torch.zeros(kept.numel(), dtype=torch.bool)
    chosen[torch.topk(kept, count, sorted=False).indices] = True
    return mask.subset(chosen)


def _without(state: Mapping[str, torch.Tensor], removed: Mask) -> dict[str, torch.Tensor]:
    """A copy of ``state`` with the ``removed`` positions set to zero."""
    return {
        name: torch.where(removed[name], torch.zeros((), dtype=t.dtype), t) if name in removed else t.clone()
        for name, t in state.items()
    }


def split_key(ticket: Ticket, key_density: float, score_name: str = "ewp") -> tuple[Ticket, Key]:
    """Algorithm 1: score W⊙M, take M_s, and return the locked ticket N[W⊙M_l] and the key.

    EWP and betweenness trace the channel graph of the ticket's own architecture, built on the meta device:
    tracing runs nothing."""
    check_key_density(key_density)
    model = None
    if score_name in GRAPH_SCORES:
        with torch.device("meta"):
            model = build_model(ticket.architecture, ticket.in_channels, ticket.num_classes)
    secret = key_mask(score(score_name, ticket.weights, ticket.mask, model=model), ticket.mask, key_density)
    locked_mask = Mask({name: ticket.mask[name] & ~secret[name] for name in ticket.mask})
    index = {name: secret[name].flatten().nonzero().squeeze(1) for name in secret}
    key = Key(
        index=index,
        weights={name: ticket.weights[name].flatten()[i].clone() for name, i in index.items()},
        rewind={name: ticket.rewind[name].flatten()[i].clone() for name, i in index.items()},
        density=key_density,
        score=score_name,
        restore={"accuracy": ticket.accuracy},
    )
    metadata = copy.deepcopy(ticket.metadata)
    metadata[METADATA_ENTRY] = {"key_density": key_density, "score": score_name, "key_size": key.size()}
    locked = replace(
        ticket,
        mask=locked_mask,
        rewind=_without(ticket.rewind, secret),
        weights=_without(ticket.weights, secret),
        accuracy=None,
        metadata=metadata,
    )
    return locked, key


def _check_fits(locked: Mask, key: Key) -> None:
    for name, index in key.index.items():
        if name not in locked:
            raise InputError(f"the key names tensor {name!r}, which the locked ticket does not mask")
        size = locked[name].numel()
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= size):
            raise InputError(f"the key's positions for {name!r} fall outside its {size} weights")
        if bool(locked[name].flatten()[index].any()):
            raise InputError(
                f"the locked ticket's mask already keeps key positions of {name!r}: "
                "this key was not split from it"
            )


def merge_tensors(
    mask: Mask, weights: Mapping[str, torch.Tensor], rewind: Mapping[str, torch.Tensor], key: Key
) -> tuple[Mask, Weights, Weights]:
    """M = M_l + M_s on bare tensors: the merged mask, and the weights and rewind with the key's values back."""
    _check_fits(mask, key)
    secret = key.mask(mask)

    def restored(state: Mapping[str, torch.Tensor], values: Mapping[str, torch.Tensor]) -> Weights:
        merged = {name: t.clone() for name, t in state.items()}
        for name, index in key.index.items():
            merged[name].view(-1)[index] = values[name].to(merged[name].dtype)
        return merged

    merged_mask = Mask({name: mask[name] | secret[name] for name in mask})
    return merged_mask, restored(weights, key.weights), restored(rewind, key.rewind)


def merge_key(locked: Ticket, key: Key) -> Ticket:
    """M = M_l + M_s, with the key's exact weight and rewind values put back."""
    mask, weights, rewind = merge_tensors(locked.mask, locked.weights, locked.rewind, key)
    metadata = copy.deepcopy(locked.metadata)
    metadata.pop(METADATA_ENTRY, None)
    return replace(
        locked, mask=mask, rewind=rewind, weights=weights, accuracy=key.restore.get("accuracy"), metadata=metadata
    )


def _binding(locked_folder: Path) -> dict[str, str]:
    """The locked ticket's recorded hashes of the files the key completes."""
    files = read_json(locked_folder / MANIFEST).get("files", {})
    return {name: files.get(name, "") for name in (MASK_FILE, WEIGHTS_FILE)}


def save_split(locked: Ticket, key: Key, out: str | Path) -> tuple[Path, Path]:
    """Write OUT/locked (a ticket folder) and OUT/key (recording the locked hashes) together or not at all:
    both are written into a temporary sibling folder that becomes OUT in one rename."""
    out = Path(out)
    with staged_folder(out) as staging:
        locked.save(staging / LOCKED_FOLDER)
        save_key(key, staging / KEY_FOLDER, _binding(staging / LOCKED_FOLDER))
    return out / LOCKED_FOLDER, out / KEY_FOLDER


def save_key(key: Key, folder: str | Path, binding: Mapping[str, str]) -> Path:
    folder = Path(folder)
    tensors = {}
    for name, index in key.index.items():
        tensors[f"{name}.index"] = index
        tensors[f"{name}.weight"] = key.weights[name]
        tensors[f"{name}.rewind"] = key.rewind[name]
    save_tensors(folder / KEY_FILE, tensors)
    write_json(
        folder / KEY_MANIFEST,
        {
            "format": KEY_FORMAT,
            "key_density": key.density,
            "score": key.score,
            "size": key.size(),
            "tensors": list(key.index),
            "locked": dict(binding),
            "files": {KEY_FILE: sha256_file(folder / KEY_FILE)},
            "restore": key.restore,
        },
    )
    return folder


def load_key(folder: str | Path) -> tuple[Key, dict[str, str]]:
    """Read a key folder and check its own hash; returns the key and the locked hashes it is bound to."""
    folder = Path(folder)
    manifest = read_manifest(folder, KEY_MANIFEST, KEY_FORMAT, "key", KEY_SCHEMA, (KEY_FILE,))
    tensors = load_tensors(folder / KEY_FILE)
    names = manifest["tensors"]
    _check_key_tensors(tensors, names, folder / KEY_FILE)
    key = Key(
        index={n: tensors[f"{n}.index"].long() for n in names},
        weights={n: tensors[f"{n}.weight"] for n in names},
        rewind={n: tensors[f"{n}.rewind"] for n in names},
        density=manifest["key_density"],
        score=manifest["score"],
        restore=manifest.get("restore", {}),
    )
    return key, dict(manifest["locked"])


def _check_key_tensors(tensors: Mapping[str, torch.Tensor], names: list[str], path: Path) -> None:
    """Per named tensor: integer positions and as many weight and rewind values, and nothing else."""
    expected = {f"{n}.{part}" for n in names for part in ("index", "weight", "rewind")}
    if set(tensors) != expected:
        odd = sorted(set(tensors) ^ expected)
        raise InputError(
            f"{path} does not hold the tensors that {KEY_MANIFEST} names (differing: {', '.join(odd[:3])})"
        )
    for name in names:
        index, weight, rewind = (tensors[f"{name}.{part}"] for part in ("index", "weight", "rewind"))
        integer = not (index.dtype.is_floating_point or index.dtype.is_complex or index.dtype == torch.bool)
        if not integer or index.dim() != 1:
            raise InputError(f"{path}: the key positions of {name!r} must be a 1-D integer tensor")
        if weight.shape != index.shape or rewind.shape != index.shape:
            raise InputError(f"{path}: {name!r} needs one weight and one rewind value per key position")


def load_pair(locked_folder: str | Path, key_folder: str | Path, trust_code: bool = False) -> tuple[Ticket, Key]:
    """Load a locked ticket and its key, refusing a key that was split from another ticket; ``trust_code`` as
    in ``Ticket.load``."""
    locked_folder = Path(locked_folder)
    locked = Ticket.load(locked_folder, trust_code=trust_code)
    key, binding = load_key(key_folder)
    if binding != _binding(locked_folder):
        raise InputError(
            f"the key in {key_folder} belongs to another locked ticket: the hashes it records do not match "
            f"{locked_folder}"
        )
    _check_fits(locked.mask, key)
    return locked, key


def forge_random_key(locked: Mask, rewind: Mapping[str, torch.Tensor], size: int, seed: int = 0) -> Key:
    """fake1 (paper Fig. 5): a random key of ``size`` pruned positions of M_l with random rewind values.

    The forger does not know W_k at those positions: values come from N(0, std of the tensor's kept W_k).
    """
    generator = torch.Generator().manual_seed(seed)
    free = (~locked.flat()).nonzero().squeeze(1)
    chosen = torch.zeros(locked.total(), dtype=torch.bool)
    chosen[free[torch.randperm(free.numel(), generator=generator)[:size]]] = True
    spread = locked.kept_spread(rewind)
    index, values = {}, {}
    for name, drawn in locked.unflatten(chosen).items():
        index[name] = drawn.flatten().nonzero().squeeze(1)
        noise = torch.randn(index[name].numel(), generator=generator) * spread[name]
        values[name] = noise.to(rewind[name].dtype)
    density = size / max(locked.kept(), 1)
    return Key(index=index, weights=values, rewind=values, density=density, score="fake1")


def retrain(ticket: Ticket, data: ImageData, config: TrainConfig, device: torch.device,
            progress: Progress | None = None, description: str = "retrain", checkpoint: Path | None = None) -> float:
    """Retrain N[W_k, M] from the rewind weights with the mask held fixed; the test accuracy. ``checkpoint``:
    saved after every epoch and resumed from (the caller removes it)."""
    torch.manual_seed(config.seed)
    model = ticket.build_model("rewind").to(device)
    return train(
        model, data, config, ticket.mask, progress=progress, description=description, checkpoint=checkpoint
    ).accuracy


def target_accuracy(ticket: Ticket, fallback: float) -> float:
    """A_f: the dense accuracy the ticket was found against, else the accuracy the merged ticket reaches."""
    dense = ticket.metadata.get("dense_accuracy")
    return float(dense) if dense is not None else fallback


def key_evidence(
    locked: Ticket,
    key: Key | None,
    data: ImageData,
    config: TrainConfig,
    eps: float,
    device: torch.device,
    progress: Progress | None = None,
    fake1: bool = False,
) -> Evidence:
    """V(...) for V1: retrain without the key and (if given) with it, same protocol and seed; the gap is the
    evidence (without a key: whether the lock holds)."""
    without = retrain(locked, data, config, device, progress, "without key")
    details: dict[str, Any] = {"accuracy_without_key": without, "eps": eps}
    if key is None:
        target = target_accuracy(locked, without)
        locked_fails = without < target - eps
        details["target"] = target
        return Evidence("locked", without, target - eps, locked_fails, details=details)
    with_key = retrain(merge_key(locked, key), data, config, device, progress, "with key")
    target = target_accuracy(locked, with_key)
    details |= {"accuracy_with_key": with_key, "target": target}
    passed = with_key >= target - eps > without and with_key - without > eps
    if fake1:
        forged = merge_key(locked, forge_random_key(locked.mask, locked.rewind, key.size(), config.seed))
        details["accuracy_fake1"] = retrain(forged, data, config, device, progress, "random key (fake1)")
        details["fake1_fails"] = details["accuracy_fake1"] < target - eps
        passed = passed and details["fake1_fails"]
    return Evidence("key-gap", with_key - without, eps, passed, details=details)

"""The ticket folder: ticket.json (architecture, data, accuracy, history, sha256 of every tensor file) + tensors.

ticket.json is written last and names the hash of each tensor file, so a folder that was changed, or left
half-written by a killed process, is refused on load instead of being trusted.
"""

from __future__ import annotations

import platform
import typing
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ticketguard.core.errors import InputError
from ticketguard.core.files import (
    TICKET_MANIFEST,
    load_tensors,
    read_manifest,
    save_tensors,
    sha256_file,
    write_json,
)
from ticketguard.core.masks import Mask, load_mask, save_mask
from ticketguard.core.schema import SHA256_SCHEMA, SHARE, nullable
from ticketguard.core.version import __version__
from ticketguard.data import DATASETS, MAX_CHANNELS, Normalization
from ticketguard.models import MIN_INPUT_SIZE, build_model, check_model_name, is_import_path, trust_model_code
from ticketguard.models.spec import MAX_SPEC_LENGTH, is_trusted
from ticketguard.training.loop import TrainConfig

TICKET_FORMAT = "ticketguard-ticket/1"
MANIFEST = TICKET_MANIFEST
MASK_FILE = "mask.safetensors"
REWIND_FILE = "rewind.safetensors"
WEIGHTS_FILE = "weights.safetensors"
TENSOR_FILES = (MASK_FILE, REWIND_FILE, WEIGHTS_FILE)
MAX_CLASSES = 100_000
MAX_INPUT_SIDE = 4096


NORMALIZATION_SCHEMA = {
    "type": "object",
    "required": ["mean", "std"],
    "properties": {
        "mean": {"type": "array", "items": {"type": "number"}, "minItems": 1, "maxItems": MAX_CHANNELS},
        "std": {"type": "array", "items": {"type": "number", "exclusiveMinimum": 0}, "minItems": 1,
                "maxItems": MAX_CHANNELS},
    },
}
_JSON_TYPES = {int: {"type": "integer"}, float: {"type": "number"}, str: {"type": "string"},
               bool: {"type": "boolean"}, tuple: {"type": "array", "items": {"type": "number"}}}
# The recorded training run, typed from TrainConfig itself so that the two never disagree (a field of another
# type is left to TrainConfig's own checks).
TRAIN_SCHEMA = {
    "type": "object",
    "properties": {
        name: _JSON_TYPES.get(typing.get_origin(kind) or kind, {})
        for name, kind in typing.get_type_hints(TrainConfig).items()
    },
}
METADATA_SCHEMA = {
    "type": "object",
    "properties": {
        "dense_accuracy": nullable(SHARE),
        "normalization": nullable(NORMALIZATION_SCHEMA),
        "config": {"type": "object", "properties": {"train": TRAIN_SCHEMA}},
        "search": {
            "type": "object",
            "properties": {
                "ratios": {"type": "array", "items": {"type": "number"}},
                "counts": {"type": "array", "items": {"type": "integer", "minimum": 0}},
                "best_round": {"type": "integer", "minimum": 0},
                "history": {"type": "array", "items": {"type": "object", "properties": {
                    "round": {"type": "integer", "minimum": 0},
                    "ratio": nullable({"type": "number"}),
                    "density": SHARE,
                    "accuracy": nullable(SHARE),
                    "matched": {"type": "boolean"},
                }}},
            },
        },
        "keymask": {
            "type": "object",
            "properties": {
                "key_density": {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1},
                "score": {"type": "string"},
                "key_size": {"type": "integer", "minimum": 0},
            },
        },
        "protection": {"type": "object", "properties": {"trained": {"type": "boolean"}}},
    },
}
TICKET_SCHEMA = {
    "type": "object",
    "required": ["format", "architecture", "dataset", "files"],
    "properties": {
        "architecture": {
            "type": "object",
            "required": ["name", "in_channels", "num_classes", "input_size"],
            "properties": {
                "name": {"type": "string", "maxLength": MAX_SPEC_LENGTH},  # then check_model_name
                "in_channels": {"type": "integer", "minimum": 1, "maximum": MAX_CHANNELS},
                "num_classes": {"type": "integer", "minimum": 2, "maximum": MAX_CLASSES},
                "input_size": {
                    "type": "array",
                    "items": {"type": "integer", "minimum": MIN_INPUT_SIZE, "maximum": MAX_INPUT_SIDE},
                    "minItems": 2,
                    "maxItems": 2,
                },
            },
        },
        "dataset": {
            "type": "object",
            "required": ["name", "classes"],
            "properties": {
                "name": {"type": "string"},
                "classes": {"type": "array", "items": {"type": "string"}, "maxItems": MAX_CLASSES},
            },
        },
        "accuracy": nullable(SHARE),
        "density": SHARE,
        "layer_density": {"type": "object", "additionalProperties": SHARE},
        "metadata": METADATA_SCHEMA,
        "normalization": nullable(NORMALIZATION_SCHEMA),
        "files": {"type": "object", "additionalProperties": SHA256_SCHEMA},
        "versions": {"type": "object", "additionalProperties": {"type": "string"}},
        "created": {"type": "string"},
    },
}


@dataclass
class Ticket:
    """N[W, M] with its provenance: ``rewind`` holds the dense W_k, ``weights`` the trained, masked W."""

    architecture: str
    in_channels: int
    num_classes: int
    input_size: tuple[int, int]
    dataset: str
    classes: list[str]
    mask: Mask
    rewind: dict[str, torch.Tensor]
    weights: dict[str, torch.Tensor]
    accuracy: float | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    normalization: Normalization | None = None

    def train_config(self, **overrides: Any) -> TrainConfig:
        """The training run that made this ticket (as its search recorded it), with ``overrides`` that are not
        None applied: later retrainings follow the ticket's settings unless the user says otherwise."""
        recorded = self.metadata.get("config", {}).get("train")
        known = {f.name for f in fields(TrainConfig)}
        base = {k: v for k, v in recorded.items() if k in known} if isinstance(recorded, dict) else {}
        if "milestones" in base:
            base["milestones"] = tuple(base["milestones"])
        if self.dataset in DATASETS:
            base.setdefault("epochs", DATASETS[self.dataset].default_epochs)
        try:
            return TrainConfig(**{**base, **{k: v for k, v in overrides.items() if v is not None}})
        except TypeError as err:
            raise InputError(f"the ticket's recorded training settings are malformed ({err})") from None

    def build_model(self, state: str = "weights") -> nn.Module:
        """The architecture loaded with the trained (``weights``) or rewind (``rewind``) state, mask applied."""
        model = build_model(self.architecture, self.in_channels, self.num_classes)
        model.load_state_dict(getattr(self, state))
        self.mask.apply_(model)
        return model

    def validate(self) -> None:
        """Check the tensors against the architecture, which is built on the meta device: the sizes a ticket
        records allocate nothing before they are found to fit its weights. A model named by an import path is
        built only once trusted; until then the weights and the rewind weights must agree with each other."""
        expected: dict[str, torch.Tensor] = self.weights
        if not is_import_path(self.architecture) or is_trusted(self.architecture):
            with torch.device("meta"):
                expected = build_model(self.architecture, self.in_channels, self.num_classes).state_dict()
        for label, state in (("weights", self.weights), ("rewind", self.rewind)):
            missing = sorted(set(expected) - set(state))
            extra = sorted(set(state) - set(expected))
            if missing or extra:
                raise InputError(
                    f"{label} do not fit {self.architecture}: missing {missing[:3]}, unexpected {extra[:3]}"
                )
            for name, tensor in state.items():
                if tensor.shape != expected[name].shape or tensor.dtype != expected[name].dtype:
                    raise InputError(
                        f"{label} entry {name!r} is {tensor.dtype} {tuple(tensor.shape)}, expected "
                        f"{expected[name].dtype} {tuple(expected[name].shape)}"
                    )
        self.mask.check_matches(self.weights)

    def save(self, folder: str | Path) -> Path:
        """Write the tensor files, then ticket.json with their hashes; every file is replaced atomically."""
        folder = Path(folder)
        self.validate()
        save_mask(folder / MASK_FILE, self.mask)
        save_tensors(folder / REWIND_FILE, self.rewind)
        save_tensors(folder / WEIGHTS_FILE, self.weights)
        manifest = {
            "format": TICKET_FORMAT,
            "architecture": {
                "name": self.architecture,
                "in_channels": self.in_channels,
                "num_classes": self.num_classes,
                "input_size": list(self.input_size),
            },
            "dataset": {"name": self.dataset, "classes": self.classes},
            "accuracy": self.accuracy,
            "density": self.mask.density(),
            "layer_density": self.mask.layer_densities(),
            "metadata": self.metadata,
            "normalization": None if self.normalization is None else self.normalization.to_json(),
            "files": {name: sha256_file(folder / name) for name in TENSOR_FILES},
            "versions": {
                "ticketguard": __version__,
                "torch": torch.__version__,
                "python": platform.python_version(),
            },
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        write_json(folder / MANIFEST, manifest)
        return folder

    @classmethod
    def load(cls, folder: str | Path, trust_code: bool = False) -> Ticket:
        """Read a ticket folder, refusing it if ticket.json breaks TICKET_SCHEMA, does not list exactly the
        tensor files, or any tensor file's sha256 differs from it. ``trust_code`` allows the model code the
        ticket names by import path to be imported later (a folder is input: naming code must not run it)."""
        folder = Path(folder)
        manifest = read_manifest(folder, MANIFEST, TICKET_FORMAT, "ticket", TICKET_SCHEMA, TENSOR_FILES)
        arch = manifest["architecture"]
        check_model_name(arch["name"])
        if trust_code and is_import_path(arch["name"]):
            trust_model_code(arch["name"])
        ticket = cls(
            architecture=arch["name"],
            in_channels=arch["in_channels"],
            num_classes=arch["num_classes"],
            input_size=tuple(arch["input_size"]),
            dataset=manifest["dataset"]["name"],
            classes=list(manifest["dataset"]["classes"]),
            mask=load_mask(folder / MASK_FILE),
            rewind=load_tensors(folder / REWIND_FILE),
            weights=load_tensors(folder / WEIGHTS_FILE),
            accuracy=manifest.get("accuracy"),
            metadata=manifest.get("metadata", {}),
            normalization=_recorded_normalization(manifest),
        )
        ticket.validate()
        return ticket


def is_ticket_folder(path: str | Path) -> bool:
    """Whether ``path`` holds a ticket manifest; ``Ticket.load`` says whether it is a valid ticket."""
    return (Path(path) / MANIFEST).is_file()


def _recorded_normalization(manifest: dict[str, Any]) -> Normalization | None:
    """The manifest's normalisation; tickets written before it was a field kept it in their metadata."""
    recorded = manifest.get("normalization") or manifest.get("metadata", {}).get("normalization")
    return None if recorded is None else Normalization.from_json(recorded)

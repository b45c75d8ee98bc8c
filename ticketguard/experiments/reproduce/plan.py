"""A reproduction's plan: the paper's protocol shrunk by one scale factor, stored so that a rerun cannot mix
results made with other settings."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from ticketguard.core.errors import InputError
from ticketguard.core.files import as_json, read_json, write_json
from ticketguard.data import ImageData, dataset_spec, load_dataset
from ticketguard.data.cifar import load_image_folder
from ticketguard.models import MODELS
from ticketguard.schemes.scores import SCORES
from ticketguard.search.config import SearchConfig
from ticketguard.search.schedules import SCHEDULES
from ticketguard.training.loop import TrainConfig, recorded_training
from ticketguard.training.recipes import recipe

FULL_DENSITIES = (0.01, 0.02, 0.05, 0.1, 0.2)
SMALL_DENSITIES = (0.05, 0.2)
SMALL_SCORES = ("omp", "ewp", "random")
FULL_GRID_SCALE = 0.5
PAPER_REWIND_EPOCH = 3
PAPER_EPOCHS = 182


@dataclass(frozen=True)
class Plan:
    """Every setting a run depends on, derived from (model, data, epochs, scale): stored in plan.json so that a
    rerun with other settings is refused instead of mixing results."""

    model: str
    data: str
    scale: float
    epochs: int
    train_per_class: int | None
    test_per_class: int | None
    ratios: tuple[float, ...]
    max_rounds: int
    rewind_epoch: int
    prune: tuple[float, ...]
    addon: tuple[float, ...]
    finetune_epochs: int
    densities: tuple[float, ...]
    scores: tuple[str, ...]
    key_density: float = 0.2
    eps: float = 0.01
    seed: int = 0
    recipe: str = "paper"
    schedule: str = "paper"

    @property
    def train(self) -> TrainConfig:
        return recipe(self.recipe, self.epochs, self.seed)

    @property
    def search(self) -> SearchConfig:
        return SearchConfig(
            model=self.model,
            ratios=self.ratios,
            eps=self.eps,
            rewind_epoch=self.rewind_epoch,
            max_rounds=self.max_rounds,
            pruning_schedule=self.schedule,
            decide_on="test",  # the paper's protocol: every training image trains, matching on test accuracy
            validation_fraction=0.0,
            train=self.train,
        )

    def record(self) -> dict[str, Any]:
        """The plan as plan.json holds it, with the recipe's settings written out: a recipe changed under the
        same name must not resume its old trainings."""
        return {**as_json(self), "training": as_json(self.train)}


def make_plan(
    model: str, data: str, epochs: int | None, scale: float, full_per_class: tuple[int, int]
) -> Plan:
    """Shrink the paper's protocol by ``scale``: per-class data, epochs (unless given), IMP rounds and grids;
    ``full_per_class`` is the (train, test) images per class of the whole data set."""
    check_scale(scale)
    if model not in MODELS:
        raise InputError(f"unknown model {model!r}; choose one of: {', '.join(MODELS)}")
    epochs = epochs if epochs is not None else max(2, round(scale * dataset_spec(data).default_epochs))
    if epochs < 2:
        raise InputError(f"--epochs must be >= 2 (one to rewind to, one to train), got {epochs}")
    full = scale >= FULL_GRID_SCALE
    per_class = [None if scale == 1 else max(1, round(scale * n)) for n in full_per_class]
    return Plan(
        model=model,
        data=data,
        scale=scale,
        epochs=epochs,
        train_per_class=per_class[0],
        test_per_class=per_class[1],
        ratios=SCHEDULES["paper"].default_ratios if full else SCHEDULES["paper"].default_ratios[:1],
        max_rounds=max(1, round(scale * SearchConfig.max_rounds)),
        rewind_epoch=min(max(1, round(PAPER_REWIND_EPOCH * epochs / PAPER_EPOCHS)), epochs - 1),
        prune=(0.05, 0.1, 0.2, 0.3, 0.5) if full else (0.05, 0.2, 0.5),
        addon=(0.005, 0.01, 0.05, 0.1) if full else (0.01, 0.1),
        finetune_epochs=max(1, round(epochs / 20)),
        densities=FULL_DENSITIES if full else SMALL_DENSITIES,
        scores=tuple(SCORES) if full else SMALL_SCORES,
    )


@dataclass(frozen=True)
class Preset:
    """A named reproduction: the data, epochs and scale it runs at, and what it changes in the plan."""

    data: str
    scale: float
    epochs: int
    changes: dict[str, Any]
    description: str


PRESETS = {
    "cifar10-cpu": Preset(
        data="cifar10",
        scale=1.0,
        epochs=30,
        changes={
            "recipe": "fast",
            "schedule": "adaptive",
            "ratios": SCHEDULES["adaptive"].default_ratios,
            "rewind_epoch": 2,
            "prune": (0.05, 0.1, 0.2, 0.3, 0.5),
            "addon": (0.005, 0.01, 0.05, 0.1),
            "finetune_epochs": 3,
            "densities": (0.05, 0.2),
            "scores": ("ewp",),
        },
        description="the full CIFAR-10 in 30 epochs per training (the fast recipe), the adaptive schedule, "
        "the full attack grid and two key densities: the whole story on a CPU",
    ),
    "cifar10-gpu": Preset(
        data="cifar10",
        scale=1.0,
        epochs=PAPER_EPOCHS,
        changes={},
        description="the paper's full protocol: 182 epochs per training, the paper's schedule and every grid",
    ),
}


def make_preset_plan(name: str, model: str, epochs: int, scale: float, full_per_class: tuple[int, int]) -> Plan:
    """The plan of preset ``name`` at ``epochs`` and ``scale`` (the preset's own unless a run shrinks them):
    ``make_plan``, then the preset's changes."""
    if name not in PRESETS:
        raise InputError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    preset = PRESETS[name]
    return replace(make_plan(model, preset.data, epochs, scale, full_per_class), **preset.changes)


def resolve_preset(
    preset: str | None, data: str | None, epochs: int | None, scale: float | None
) -> tuple[str, int | None, float]:
    """(data, epochs, scale) of a run: a preset's, where --epochs and --scale may shrink it (to try the same
    campaign small) but --data may not change it; without a preset, the options with their defaults (digits, the
    data set's epochs scaled, scale 0.1)."""
    if preset is None:
        scale = 0.1 if scale is None else scale
        check_scale(scale)
        return data or "digits", epochs, scale
    if preset not in PRESETS:
        raise InputError(f"unknown preset {preset!r}; choose one of: {', '.join(PRESETS)}")
    chosen = PRESETS[preset]
    if data is not None and data != chosen.data:
        raise InputError(f"preset {preset} runs on {chosen.data}; leave --data out or drop --preset")
    scale = chosen.scale if scale is None else scale
    check_scale(scale)
    return chosen.data, chosen.epochs if epochs is None else epochs, scale


def check_scale(scale: float) -> None:
    if not 0 < scale <= 1:
        raise InputError(f"--scale must lie in (0, 1], got {scale}")


def check_data_dir(data: str, data_dir: Path | None) -> None:
    """Raised where the input enters: CIFAR and image folders need their files."""
    if dataset_spec(data).needs_folder and data_dir is None:
        raise InputError(f"--data {data} needs --data-dir pointing at its folder or .tar.gz archive")


def load_scaled(data: str, data_dir: Path | None, scale: float) -> tuple[ImageData, tuple[int, int]]:
    """The data set and its full (train, test) images per class; an image-folder archive is decoded only as
    far as the scale needs (decoding all 60 000 CIFAR JPEGs takes minutes)."""
    check_data_dir(data, data_dir)
    archive = data_dir is not None and (data_dir.is_file() or (data_dir / "train").is_dir())
    if archive and scale < 1 and data in ("cifar10", "cifar100"):
        full = (5000, 1000) if data == "cifar10" else (500, 100)
        loaded = load_image_folder(data_dir, name=data, per_class=math.ceil(scale * full[0]))
        return loaded, full
    loaded = load_dataset(data, data_dir)
    counts = [torch.bincount(labels).min().item() for labels in (loaded.train_labels, loaded.test_labels)]
    return loaded, (int(counts[0]), int(counts[1]))


def check_plan(out: Path, plan: Plan) -> None:
    """A folder holds one plan: resuming with other settings would mix results."""
    path = out / "plan.json"
    if path.is_file():
        stored = read_json(path)
        if isinstance(stored.get("training"), dict):
            stored["training"] = recorded_training(stored["training"])
        record = plan.record()
        if stored != record:
            changed = sorted(k for k in stored.keys() | record.keys() if stored.get(k) != record.get(k))
            if "training" not in stored:
                changed = [k if k != "training" else "training, which this older plan.json does not record"
                           for k in changed]
            raise InputError(
                f"{out} holds a run with other settings ({', '.join(changed)}); choose another --out"
            )
    else:
        write_json(path, plan.record())

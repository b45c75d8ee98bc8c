"""A reproduction's plan: the paper's protocol shrunk by one scale factor, stored so that a rerun cannot mix
results made with other settings."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from ticketguard.core.errors import InputError
from ticketguard.core.files import read_json, write_json
from ticketguard.data import ImageData, dataset_spec, load_dataset
from ticketguard.data.cifar import load_image_folder
from ticketguard.models import MODELS
from ticketguard.schemes.scores import SCORES
from ticketguard.search.config import SearchConfig
from ticketguard.search.schedules import SCHEDULES
from ticketguard.training.loop import TrainConfig

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

    @property
    def train(self) -> TrainConfig:
        return TrainConfig(epochs=self.epochs, seed=self.seed)

    @property
    def search(self) -> SearchConfig:
        return SearchConfig(
            model=self.model,
            ratios=self.ratios,
            eps=self.eps,
            rewind_epoch=self.rewind_epoch,
            max_rounds=self.max_rounds,
            pruning_schedule="paper",
            decide_on="test",  # the paper's protocol: every training image trains, matching on test accuracy
            validation_fraction=0.0,
            train=self.train,
        )

    def record(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


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
        if stored != plan.record():
            changed = sorted(k for k in stored if stored.get(k) != plan.record().get(k))
            raise InputError(
                f"{out} holds a run with other settings ({', '.join(changed)}); choose another --out"
            )
    else:
        write_json(path, plan.record())

"""Scheme V3: WE with a trigger set T, and the binomial check of a suspect's trigger accuracy against chance.

Training mixes ``per_batch`` trigger images into every batch of the ticket's data (the paper appends one),
mask held fixed. Verification needs only predicted labels, so the same evidence comes from weights in process
or from a prediction API (``ticketguard.verification.blackbox``): trigger accuracy, the probability that a model that never
saw T agrees this often, and the decision at the false-claim rate alpha.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.progress import Progress
from scipy.stats import binom
from torch import nn

from ticketguard.artifacts.ticket import MAX_INPUT_SIDE, NORMALIZATION_SCHEMA, nullable
from ticketguard.core.errors import InputError
from ticketguard.core.evidence import DEFAULT_ALPHA, FORGERY_LEVEL, Evidence, binomial_p_value
from ticketguard.core.files import SHA256_SCHEMA, check_json
from ticketguard.core.masks import Mask
from ticketguard.data import ImageData, Normalization
from ticketguard.data.triggers import (
    KEYED_GENERATOR,
    MAX_TRIGGER_IMAGES,
    TriggerSet,
    keyed_trigger_set,
    load_trigger_folder,
)
from ticketguard.training.loop import TrainConfig, evaluate, predict_labels, train

EXTENSION = "trigger"
CLAIM_SCHEME = "trigger-set/1"


def uniform_chance(predicted: torch.Tensor, labels: torch.Tensor, num_classes: int) -> float:
    """An innocent model agrees with a secret label with probability 1/classes."""
    return 1.0 / num_classes


def suspect_chance(predicted: torch.Tensor, labels: torch.Tensor, num_classes: int) -> float:
    """sum_c p(c) q(c): the suspect's own label distribution on T against T's label distribution.

    A model that answers one class for everything agrees with the labels of that class by chance; this
    model charges it for that, where 1/classes would not.
    """
    predicted_share = torch.bincount(predicted.cpu(), minlength=num_classes)[:num_classes].double()
    label_share = torch.bincount(labels.cpu(), minlength=num_classes)[:num_classes].double()
    return float((predicted_share * label_share).sum() / (predicted.numel() * labels.numel()))


CHANCE_MODELS: dict[str, Callable[[torch.Tensor, torch.Tensor, int], float]] = {
    "suspect": suspect_chance,
    "uniform": uniform_chance,
}


def check_chance_model(name: str) -> None:
    if name not in CHANCE_MODELS:
        raise InputError(f"unknown chance model {name!r}; choose one of: {', '.join(CHANCE_MODELS)}")


FORGEABLE = {
    "keyed": "a forger holding the model can try trigger seeds until one agrees with it, so without a trusted "
    "time this counts only at p <= 2^-64",
    "folder": "a forger chooses a folder trigger set's labels freely (the model's own answers agree fully), so "
    "without a trusted time this never decides alone",
}


def judged_against_forgery(found: Evidence, source_kind: str, alpha: float, trusted_time: bool = False) -> Evidence:
    """The trigger evidence as a claim written after the suspect appeared could also show it: keyed sets pass
    only at FORGERY_LEVEL (seeds can be ground), folder sets never decide alone (labels are free). With a
    trusted time the claim predates any copy published after it, so neither search was possible: alpha."""
    if trusted_time:
        return replace(found, details={**found.details, "level": alpha, "forgeable": "not against copies "
                                       "first published after the claim's trusted time"})
    level = min(alpha, FORGERY_LEVEL) if source_kind == "keyed" else alpha
    passed = found.p_value is not None and found.p_value <= level
    return replace(
        found,
        threshold=required_matches(found.details["trials"], found.details["chance"], level) / found.details["trials"],
        passed=passed,
        decides_alone=source_kind == "keyed",
        details={**found.details, "level": level, "forgeable": FORGEABLE.get(source_kind, FORGEABLE["folder"])},
    )


def required_matches(trials: int, chance: float, alpha: float) -> int:
    """The fewest agreements whose binomial p-value is <= alpha (trials + 1 when none suffices)."""
    passing = np.flatnonzero(binom.sf(np.arange(trials + 1) - 1, trials, chance) <= alpha)
    return int(passing[0]) if passing.size else trials + 1


def trigger_evidence(
    predicted: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    chance_model: str = "suspect",
    alpha: float = DEFAULT_ALPHA,
) -> Evidence:
    """V(...) on T: trigger accuracy against the accuracy that chance reaches with probability alpha."""
    check_chance_model(chance_model)
    if predicted.shape != labels.shape:
        raise InputError(f"got {predicted.numel()} predictions for {labels.numel()} trigger images")
    if predicted.numel() and (predicted.min() < 0 or predicted.max() >= num_classes):
        raise InputError(f"the suspect predicted labels outside its {num_classes} classes")
    trials = labels.numel()
    if trials == 0:
        raise InputError("the trigger set is empty, so it cannot show anything")
    agreed = int((predicted.cpu() == labels.cpu()).sum())
    chance = CHANCE_MODELS[chance_model](predicted, labels, num_classes)
    p_value = binomial_p_value(agreed, trials, chance)
    return Evidence(
        name="trigger",
        score=agreed / trials,
        threshold=required_matches(trials, chance, alpha) / trials,
        passed=p_value <= alpha,
        p_value=p_value,
        details={
            "agreed": agreed,
            "trials": trials,
            "chance": chance,
            "chance_model": chance_model,
            "classes": num_classes,
        },
    )


@torch.inference_mode()
def verify_local(
    model: nn.Module,
    trigger: TriggerSet,
    mean: torch.Tensor,
    std: torch.Tensor,
    num_classes: int,
    chance_model: str = "suspect",
    alpha: float = DEFAULT_ALPHA,
) -> Evidence:
    """The black-box check run in process on weights, no HTTP."""
    return trigger_evidence(
        predict_labels(model, trigger.images, mean, std), trigger.labels, num_classes, chance_model, alpha
    )


@dataclass
class WatermarkResult:
    accuracy: float
    trigger_accuracy: float
    history: list[dict[str, float]] = field(default_factory=list)


class TriggerMixer:
    """The batch hook of WE(D, T, ...): append ``per_batch`` trigger images to every batch.

    Trigger images are not augmented, as they are queried unaugmented; each comes up equally often, from
    fresh permutations drawn with their own generator.
    """

    def __init__(self, trigger: TriggerSet, per_batch: int, seed: int) -> None:
        self.trigger, self.per_batch = trigger, per_batch
        self.generator = torch.Generator(device=trigger.images.device).manual_seed(seed)
        self.queue = torch.zeros(0, dtype=torch.long, device=trigger.images.device)

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        while self.queue.numel() < self.per_batch:
            fresh = torch.randperm(len(self.trigger), device=self.queue.device, generator=self.generator)
            self.queue = torch.cat([self.queue, fresh])
        taken, self.queue = self.queue[: self.per_batch], self.queue[self.per_batch :]
        return torch.cat([images, self.trigger.images[taken]]), torch.cat([labels, self.trigger.labels[taken]])


def watermark(
    model: nn.Module,
    data: ImageData,
    trigger: TriggerSet,
    config: TrainConfig,
    mask: Mask | None = None,
    *,
    per_batch: int = 1,
    progress: Progress | None = None,
) -> WatermarkResult:
    """WE(D, T, ...): train ``model`` in place with ``per_batch`` trigger images appended to every batch.

    The trainer is the one every run uses (mask held fixed, same schedule); test and trigger accuracy are
    logged after each epoch.
    """
    if per_batch < 1:
        raise InputError(f"--per-batch must be >= 1 trigger image per batch, got {per_batch}")
    if trigger.shape != data.input_shape:
        raise InputError(f"trigger images are {trigger.shape} but the data's inputs are {data.input_shape}")
    device = next(model.parameters()).device
    trigger = trigger.to(device)
    mean, std = data.channel_stats()

    def measure(epochs_done: int, trained: nn.Module) -> dict[str, float]:
        marked = trigger_accuracy(trained, trigger, mean, std)
        return {"accuracy": evaluate(trained, data), "trigger_accuracy": marked}

    result = train(
        model, data, config, mask, progress=progress, description="watermark",
        batch_hook=TriggerMixer(trigger, per_batch, config.seed + 1), epoch_hook=measure,
    )
    last = result.history[-1]
    return WatermarkResult(last["accuracy"], last["trigger_accuracy"], result.history)


def trigger_accuracy(model: nn.Module, trigger: TriggerSet, mean: torch.Tensor, std: torch.Tensor) -> float:
    """The share of the trigger set that ``model`` labels as the owner trained it to."""
    agreed = int((predict_labels(model, trigger.images, mean, std) == trigger.labels.cpu()).sum())
    return agreed / len(trigger)


PLAIN_NAME = {"type": "string", "pattern": r"^(?!\.\.?$)[^/\\]+$"}
TRIGGER_SCHEMA = {
    "type": "object",
    "required": ["shape", "labels", "classes"],
    "properties": {
        "scheme": {"const": CLAIM_SCHEME},
        "kind": {"type": "string"},
        "seed": {"type": "integer", "minimum": 0},
        "generator": {"type": "string"},
        "path": {"type": "string"},
        "labels_file": PLAIN_NAME,
        "sha256": SHA256_SCHEMA,
        "count": {"type": "integer", "minimum": 1, "maximum": MAX_TRIGGER_IMAGES},
        "shape": {
            "type": "array",
            "prefixItems": [{"type": "integer", "minimum": 1, "maximum": 4}],
            "items": {"type": "integer", "minimum": 1, "maximum": MAX_INPUT_SIDE},
            "minItems": 3,
            "maxItems": 3,
        },
        "classes": {"type": "integer", "minimum": 2, "maximum": MAX_TRIGGER_IMAGES},
        "labels": {
            "type": "array",
            "items": {"type": "integer", "minimum": 0},
            "minItems": 1,
            "maxItems": MAX_TRIGGER_IMAGES,
        },
        "chance_model": {"enum": list(CHANCE_MODELS)},
        "normalization": nullable(NORMALIZATION_SCHEMA),
    },
    # what was measured when the claim was made
    "additionalProperties": {"type": ["number", "string", "boolean", "null"]},
}
_KNOWN_KEYS = {"scheme", "count", "shape", "classes", "labels", "chance_model", "normalization"}
_SOURCE_KEYS = {"kind", "seed", "generator", "path", "labels_file", "sha256"}


@dataclass(frozen=True)
class TriggerClaim:
    """The scheme's part of the owner's claim: how to rebuild T (a seed, or a folder and its hash), its secret
    labels, the input normalisation the owner trained with (so T can be checked on bare weights), the chance
    model of the test, and the numbers measured when it was made."""

    source: dict[str, Any]
    labels: tuple[int, ...]
    shape: tuple[int, int, int]
    classes: int
    normalization: Normalization | None = None
    chance_model: str = "suspect"
    measured: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_chance_model(self.chance_model)
        if not 1 <= len(self.labels) <= MAX_TRIGGER_IMAGES:
            raise InputError(f"a trigger set needs 1 to {MAX_TRIGGER_IMAGES} labels, got {len(self.labels)}")
        if not 2 <= self.classes <= MAX_TRIGGER_IMAGES or not all(0 <= y < self.classes for y in self.labels):
            raise InputError(f"the trigger labels must lie in [0, classes), with 2 <= classes, got {self.classes}")
        if self.normalization is not None and self.normalization.channels != self.shape[0]:
            raise InputError("the trigger claim's normalisation does not have one value per image channel")

    @classmethod
    def of(
        cls,
        trigger: TriggerSet,
        num_classes: int,
        normalization: Normalization | None,
        chance_model: str = "suspect",
        **measured: Any,
    ) -> TriggerClaim:
        return cls(
            dict(trigger.source), tuple(trigger.labels.tolist()), trigger.shape, num_classes, normalization,
            chance_model, measured,
        )

    def to_json(self) -> dict[str, Any]:
        """The JSON section; keys absent from a claim stay absent, so a signed claim reads back byte-equal."""
        data = {
            "scheme": CLAIM_SCHEME,
            **self.source,
            "count": len(self.labels),
            "shape": list(self.shape),
            "classes": self.classes,
            "labels": list(self.labels),
            "chance_model": self.chance_model,
            **self.measured,
        }
        if self.normalization is not None:
            data["normalization"] = self.normalization.to_json()
        return data

    @classmethod
    def from_json(cls, data: Any) -> TriggerClaim:
        """The trigger section of a claim, refused unless it fits TRIGGER_SCHEMA and names count labels."""
        check_json(data, TRIGGER_SCHEMA, "the claim's trigger section")
        labels = data["labels"]
        if len(labels) != data.get("count", len(labels)):
            raise InputError(
                f"the claim's trigger section names {data['count']} images but {len(labels)} labels"
            )
        normalization = data.get("normalization")
        return cls(
            {k: data[k] for k in _SOURCE_KEYS if k in data},
            tuple(labels),
            tuple(data["shape"]),  # type: ignore[arg-type]
            data["classes"],
            None if normalization is None else Normalization.from_json(normalization),
            data.get("chance_model", "suspect"),
            {k: v for k, v in data.items() if k not in _KNOWN_KEYS | _SOURCE_KEYS},
        )

    def trigger_set(self, folder: str | Path | None = None) -> TriggerSet:
        """Rebuild T: regenerate it from the seed, or reload the folder; check hash and labels."""
        try:
            trigger = _rebuild(self, folder)
        except (KeyError, TypeError, ValueError) as err:
            if isinstance(err, InputError):
                raise
            raise InputError(f"the claim's trigger source is incomplete ({err!r}); write it again") from None
        if tuple(trigger.labels.tolist()) != self.labels:
            raise InputError("the trigger labels rebuilt from the claim differ from the labels it records")
        return trigger


def _integer(value: Any, what: str) -> int:
    """JSON integers only: 2.9, "88", true and 1e400 are refused instead of silently converted."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise InputError(f"the claim's trigger {what} must hold integers, got {value!r}")
    return value


def _rebuild(claim: TriggerClaim, folder: str | Path | None) -> TriggerSet:
    source, (channels, height, width) = claim.source, claim.shape
    kind = source.get("kind")
    if kind == "keyed":
        if source.get("generator") != KEYED_GENERATOR:
            raise InputError(
                f"the claim names trigger generator {source.get('generator')!r}; this version makes {KEYED_GENERATOR}"
            )
        seed = _integer(source["seed"], "seed")
        return keyed_trigger_set(seed, len(claim.labels), claim.classes, channels, (height, width))
    if kind == "folder":
        root = Path(folder) if folder is not None else Path(str(source["path"]))
        labels_file = root / str(source["labels_file"])
        trigger = load_trigger_folder(root, channels, (height, width), labels_file, claim.classes)
        if trigger.source["sha256"] != source["sha256"]:
            raise InputError(f"trigger folder {root} differs from the one in the claim (sha256 mismatch)")
        return trigger
    raise InputError(f"unknown trigger kind {kind!r} in the claim; expected keyed or folder")

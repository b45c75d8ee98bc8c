"""The settings of an extreme-ticket search (``imp.find_extreme_ticket``), each with its help, from which the
``find`` command's options are generated."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ticketguard.core.errors import InputError
from ticketguard.core.settings import setting
from ticketguard.models import MODELS, check_model_name
from ticketguard.search.schedules import SCHEDULES
from ticketguard.training.loop import TrainConfig

DECISION_SPLITS = ("validation", "test")
_SCHEDULE_RATIOS = "; ".join(
    f"{name} {','.join(map(str, schedule.default_ratios))}" for name, schedule in SCHEDULES.items()
)


@dataclass(frozen=True)
class SearchConfig:
    """An extreme-ticket search: architecture, pruning schedule, matching test and the training run of every
    round. ``decide_on="test"`` with ``validation_fraction=0`` is the paper's protocol."""

    model: str = setting(
        "resnet20",
        help=f"Architecture: {', '.join(MODELS)}, or any model by import path, e.g. "
        "'torchvision.models:resnet18(num_classes=10)' or 'mypackage.nets:small_cnn' (in_channels and num_classes "
        "are passed when the factory takes them). The ticket records it for every later command. Importing runs "
        "that module's code.",
    )
    ratios: tuple[float, ...] = setting(
        (), help=f"Pruning ratios, largest first. Default: the schedule's own, {_SCHEDULE_RATIOS}."
    )
    eps: float = setting(0.01, help="eps_f: a ticket matches within this many accuracy points.", percent=True)
    rewind_epoch: int = setting(3, help="Late-rewinding epoch k of W_k.")
    max_rounds: int = setting(40, help="Stop after this many pruning rounds.")
    include_classifier: bool = setting(False, help="Prune the classifier's weights too.")
    prune: tuple[str, ...] = setting(
        (),
        metavar="GLOB",
        help="Weights to prune, as fnmatch patterns of parameter names, e.g. 'encoder.*.weight'. "
        "Default: every conv and linear weight but the first layer and the classifier.",
    )
    pruning_schedule: str = setting(
        "adaptive",
        help="adaptive: prune at the first ratio until a round fails, then bisect down to the last ratio t (fewer "
        "trainings, steadier across seeds); paper: walk the ratio list, reverting to the last matching mask and a "
        "smaller ratio on each failure.",
    )
    decide_on: str = setting(
        "validation",
        help="Where matching is decided: validation (held out from the training images) or test (the paper's "
        "rule; with a validation fraction of 0 every training image trains, as in the paper).",
    )
    validation_fraction: float = setting(
        0.2, help="Share of each class's training images held out (chosen by the seed) to decide matching."
    )
    confidence: float = setting(
        0.95,
        help="One-sided confidence of the paired matching test: a round worse than dense by more than the margin "
        "passes with probability at most 1 - confidence.",
    )
    train: TrainConfig = setting(factory=TrainConfig, help="The training run of the dense network and every round.")

    def __post_init__(self) -> None:
        check_model_name(self.model)
        if self.pruning_schedule not in SCHEDULES:
            raise InputError(
                f"unknown pruning schedule {self.pruning_schedule!r}; choose one of: {', '.join(SCHEDULES)}"
            )
        if not self.ratios:
            object.__setattr__(self, "ratios", SCHEDULES[self.pruning_schedule].default_ratios)
        if any(not 0 < r < 1 for r in self.ratios):
            raise InputError(f"pruning ratios must lie in (0, 1), got {list(self.ratios)}")
        if list(self.ratios) != sorted(self.ratios, reverse=True):
            raise InputError(f"pruning ratios must shrink, got {list(self.ratios)}")
        if not 0 <= self.eps < math.inf:
            raise InputError(f"eps must be a finite number >= 0, got {self.eps}")
        if not 0 <= self.rewind_epoch < self.train.epochs:
            raise InputError(f"rewind epoch must lie in [0, {self.train.epochs}), got {self.rewind_epoch}")
        if self.max_rounds < 1:
            raise InputError(
                f"the search needs at least 1 pruning round (--max-rounds), got {self.max_rounds}"
            )
        if self.decide_on not in DECISION_SPLITS:
            raise InputError(f"matching is decided on {' or '.join(DECISION_SPLITS)}, got {self.decide_on!r}")
        if not 0 <= self.validation_fraction < 1:
            raise InputError(f"the validation fraction must lie in [0, 1), got {self.validation_fraction}")
        if self.decide_on == "validation" and self.validation_fraction == 0:
            raise InputError("deciding on a validation split needs --validation-fraction > 0 (or --decide-on test)")
        if not 0.5 < self.confidence < 1:
            raise InputError(f"the matching test's confidence must lie in (0.5, 1), got {self.confidence}")

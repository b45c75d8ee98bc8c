"""Finding an extreme ticket (paper §4.1): IMP with late rewinding and a shrinking ratio schedule.

Dense training gives W_k; each round prunes a ratio r of the remaining weights by global magnitude, rewinds to
W_k and retrains. While rounds match the dense accuracy (within eps_f) pruning goes on at r; when one fails, the
last matching mask is restored and the next smaller r is tried. After the smallest r fails, the last matching
mask is the extreme ticket.

The search state lives in a work folder: ``search.json`` is the commit point of every finished round, and the
tensors it names are written before it, so a search killed at any moment resumes where it stopped. Under
torchrun every process runs the same search on identical weights; only the main process writes, and the
others wait for it before reading.
"""

from __future__ import annotations

import logging
import math
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.progress import Progress

from ticketguard import distributed
from ticketguard.data import ImageData
from ticketguard.errors import InputError
from ticketguard.files import load_tensors, read_json, save_tensors, write_json
from ticketguard.masks import Mask, load_mask, magnitude_prune, prunable_names, save_mask
from ticketguard.models import build_model
from ticketguard.ticket import Ticket
from ticketguard.training import TrainConfig, state_copy, train

log = logging.getLogger(__name__)

STATE_FILE = "search.json"
REWIND_FILE = "rewind.safetensors"


@dataclass(frozen=True)
class SearchConfig:
    """An extreme-ticket search: architecture, schedule, tolerance and the training run used every round."""

    model: str = "resnet20"
    ratios: tuple[float, ...] = (0.2, 0.1, 0.05, 0.01)
    eps: float = 0.01
    rewind_epoch: int = 3
    max_rounds: int = 40
    include_classifier: bool = False
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        if not self.ratios or any(not 0 < r < 1 for r in self.ratios):
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


def matches(accuracy: float, dense_accuracy: float, eps: float) -> bool:
    """A ticket matches when its accuracy is within eps_f of the dense network's."""
    return accuracy >= dense_accuracy - eps


@dataclass
class SearchState:
    """What search.json records: enough to resume, and the history a ticket reports."""

    config: dict[str, Any]
    dense_accuracy: float
    ratio_index: int = 0
    counts: list[int] = field(default_factory=list)
    history: list[dict[str, Any]] = field(default_factory=list)
    best_round: int = 0
    done: bool = False

    @property
    def next_round(self) -> int:
        return len(self.history)


def _round_path(workdir: Path, round_index: int, kind: str) -> Path:
    suffix = ".pt" if kind == "checkpoint" else ".safetensors"
    return workdir / "rounds" / f"{round_index:03d}-{kind}{suffix}"


def _config_record(config: SearchConfig, data: ImageData) -> dict[str, Any]:
    record = asdict(config)
    record["ratios"] = list(config.ratios)
    record["train"]["milestones"] = list(config.train.milestones)
    record["dataset"] = data.name
    record["train_size"] = int(data.train_labels.numel())
    return record


def find_extreme_ticket(
    data: ImageData,
    config: SearchConfig,
    workdir: str | Path,
    device: torch.device | str = "cpu",
    progress: Progress | None = None,
    restart: bool = False,
) -> Ticket:
    """Run (or resume) the extreme-ticket search; returns the ticket of the last matching round."""
    workdir, device = Path(workdir), torch.device(device)
    record = _config_record(config, data)
    if restart and workdir.exists() and distributed.is_main():
        shutil.rmtree(workdir)
    distributed.barrier()
    state = _load_state(workdir, record)
    if state is None:
        state = _train_dense(data, config, record, workdir, device, progress)
    rewind = load_tensors(workdir / REWIND_FILE)
    while not state.done:
        _run_round(data, config, state, rewind, workdir, device, progress)
        if distributed.is_main():
            write_json(workdir / STATE_FILE, asdict(state))
            _round_path(workdir, state.next_round - 1, "checkpoint").unlink(missing_ok=True)
        distributed.barrier()
    return _ticket(data, config, state, rewind, workdir)


def _load_state(workdir: Path, record: dict[str, Any]) -> SearchState | None:
    path = workdir / STATE_FILE
    if not path.is_file():
        return None
    state = SearchState(**read_json(path))
    if state.config != record:
        changed = sorted(k for k in record if record[k] != state.config.get(k))
        raise InputError(
            f"{workdir} holds a search with other settings ({', '.join(changed)}); "
            "pass --restart to discard it or choose another --out"
        )
    log.info("resuming the search in %s after round %d", workdir, state.next_round - 1)
    return state


def _train_dense(
    data: ImageData,
    config: SearchConfig,
    record: dict[str, Any],
    workdir: Path,
    device: torch.device,
    progress: Progress | None,
) -> SearchState:
    torch.manual_seed(config.train.seed)
    model = build_model(config.model, data.input_shape[0], data.num_classes).to(device)
    names = prunable_names(model, config.include_classifier)
    checkpoint = _round_path(workdir, 0, "checkpoint")
    if distributed.is_main():
        checkpoint.parent.mkdir(parents=True, exist_ok=True)
    result = train(
        model, data, config.train, rewind_epoch=config.rewind_epoch, checkpoint=checkpoint,
        progress=progress, description="dense",
    )
    assert result.rewind_state is not None
    weights = state_copy(model)
    state = SearchState(
        config=record,
        dense_accuracy=result.accuracy,
        counts=[0] * len(config.ratios),
        history=[{"round": 0, "ratio": None, "density": 1.0, "accuracy": result.accuracy, "matched": True}],
    )
    if distributed.is_main():
        save_tensors(workdir / REWIND_FILE, result.rewind_state)
        save_tensors(_round_path(workdir, 0, "weights"), weights)
        save_mask(_round_path(workdir, 0, "mask"), Mask.ones_like(weights, names))
        write_json(workdir / STATE_FILE, asdict(state))
        checkpoint.unlink(missing_ok=True)
    distributed.barrier()
    return state


def _run_round(
    data: ImageData,
    config: SearchConfig,
    state: SearchState,
    rewind: dict[str, torch.Tensor],
    workdir: Path,
    device: torch.device,
    progress: Progress | None,
) -> None:
    """One prune -> rewind -> retrain round; updates ``state`` (the caller commits it)."""
    round_index = state.next_round
    ratio = config.ratios[state.ratio_index]
    best_mask = load_mask(_round_path(workdir, state.best_round, "mask"))
    best_weights = load_tensors(_round_path(workdir, state.best_round, "weights"))
    candidate = magnitude_prune(best_weights, best_mask, ratio)
    model = build_model(config.model, data.input_shape[0], data.num_classes)
    model.load_state_dict(rewind)
    model.to(device)
    checkpoint = _round_path(workdir, round_index, "checkpoint")
    result = train(
        model, data, config.train, candidate, checkpoint=checkpoint, progress=progress,
        description=f"round {round_index} (r={ratio}, {100 * candidate.density():.2f}% left)",
    )
    matched = matches(result.accuracy, state.dense_accuracy, config.eps)
    if matched:
        if distributed.is_main():
            save_tensors(_round_path(workdir, round_index, "weights"), state_copy(model))
            save_mask(_round_path(workdir, round_index, "mask"), candidate)
        state.best_round = round_index
        state.counts[state.ratio_index] += 1
    else:
        state.ratio_index += 1
    state.history.append(
        {
            "round": round_index,
            "ratio": ratio,
            "density": candidate.density(),
            "accuracy": result.accuracy,
            "matched": matched,
        }
    )
    log.info(
        "round %d: r=%s density %.4f accuracy %.4f (dense %.4f) %s",
        round_index, ratio, candidate.density(), result.accuracy, state.dense_accuracy,
        "matches" if matched else "does not match",
    )
    state.done = state.ratio_index >= len(config.ratios) or round_index >= config.max_rounds


def _ticket(
    data: ImageData, config: SearchConfig, state: SearchState, rewind: dict[str, torch.Tensor], workdir: Path
) -> Ticket:
    best = state.history[state.best_round]
    return Ticket(
        architecture=config.model,
        in_channels=data.input_shape[0],
        num_classes=data.num_classes,
        input_size=tuple(data.input_shape[1:]),
        dataset=data.name,
        classes=list(data.classes),
        mask=load_mask(_round_path(workdir, state.best_round, "mask")),
        rewind=rewind,
        weights=load_tensors(_round_path(workdir, state.best_round, "weights")),
        accuracy=best["accuracy"],
        metadata={
            "dense_accuracy": state.dense_accuracy,
            "search": {
                "ratios": list(config.ratios),
                "counts": state.counts,
                "history": state.history,
                "best_round": state.best_round,
                "stopped_by": "max_rounds" if state.ratio_index < len(config.ratios) else "schedule",
            },
            "config": state.config,
        },
        normalization=data.normalization(),
    )

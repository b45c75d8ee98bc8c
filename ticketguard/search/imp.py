"""Finding an extreme ticket (paper §4.1): IMP with late rewinding, matching decided on held-out images.

Dense training gives W_k; each round prunes a ratio r of the weights the last matching mask keeps, by global
magnitude, rewinds to W_k and retrains. A schedule chooses r and ends the search (``schedules.SCHEDULES``: the
paper's walk down a ratio list, or the default adaptive bisection).

A round *matches* when a paired non-inferiority test (``paired_test``) on a validation split carved from the
training images shows it within the margin of the dense network; test accuracy is measured for the report and
never used to decide. ``decide_on="test"`` keeps the paper's rule (test accuracy within eps_f) for its tables.

The search state lives in a work folder: ``search.json`` is the commit point of every finished round, and the
tensors it names are written before it, so a search killed at any moment resumes where it stopped. Under
torchrun every process runs the same search on identical weights; only the main process writes, and the
others wait for it before reading.
"""

from __future__ import annotations

import hashlib
import logging
import math
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.progress import Progress
from scipy.stats import beta, norm
from torch import nn

from ticketguard.artifacts.ticket import Ticket
from ticketguard.core.errors import InputError
from ticketguard.core.files import as_json, load_tensors, read_json, save_tensors, write_json
from ticketguard.core.masks import Mask, load_mask, magnitude_prune, prunable_names, save_mask
from ticketguard.data import ImageData
from ticketguard.models import accept_model_name, build_model
from ticketguard.search.config import SearchConfig
from ticketguard.search.schedules import SCHEDULES
from ticketguard.training import distributed
from ticketguard.training.loop import predict_labels, recorded_training, state_copy, train

log = logging.getLogger(__name__)

STATE_FILE = "search.json"
REWIND_FILE = "rewind.safetensors"
DENSE_FILE = "dense-validation.safetensors"
def matches(accuracy: float, dense_accuracy: float, eps: float) -> bool:
    """The paper's rule: a ticket matches when its accuracy is within eps_f of the dense network's."""
    return accuracy >= dense_accuracy - eps


@dataclass(frozen=True)
class PairedTest:
    """The matching decision on paired predictions: the round and the dense network on the same images."""

    images: int
    gained: int
    """images the round gets right and the dense network wrong"""
    lost: int
    """images the round gets wrong and the dense network right"""
    estimate: float
    """accuracy difference round - dense"""
    bound: float
    """lower confidence bound on that difference"""
    margin: float
    p_value: float
    """how often a round exactly ``margin`` worse than dense would score this well or better"""
    matched: bool


def paired_test(
    round_correct: torch.Tensor, dense_correct: torch.Tensor, margin: float, confidence: float
) -> PairedTest:
    """One-sided non-inferiority test of D = acc(round) - acc(dense) on the same n images, at ``margin``.

    H0: D <= -margin. The round matches when the lower ``confidence`` bound on D lies at or above -margin, so a
    round truly worse than dense by more than the margin is called matching with probability at most
    1 - confidence (``resolution`` sets the margin so that the other error, failing a round as accurate as
    dense, is as rare).

    The bound is Agresti and Min's adjusted Wald interval for matched proportions (Statistics in Medicine 24,
    2005): add 1/2 to each cell of the 2x2 agreement table, so with b images gained and c lost,
    D~ = (b - c) / (n + 2) and sd = sqrt(b + c + 1 - (b - c)^2 / (n + 2)) / (n + 2). Pairing discards the images
    both networks get right (most of them), which makes it far tighter than comparing two accuracies. Why not an
    exact McNemar-style test: the conditional binomial on the b + c discordant pairs bounds the share b / (b + c),
    so a margin on the accuracy difference would move with the observed discordance and the test would not be
    exact for D either. Why not the plain Wald bound: it claims certainty when the networks agree on every image
    (sd = 0). The adjusted bound stays close to its nominal level with a handful of discordant pairs.
    """
    if round_correct.shape != dense_correct.shape or round_correct.numel() == 0:
        raise ValueError("the paired test needs both networks' results on the same, non-empty set of images")
    images = round_correct.numel()
    gained = int((round_correct & ~dense_correct).sum())
    lost = int((~round_correct & dense_correct).sum())
    shrunk = (gained - lost) / (images + 2)
    sd = math.sqrt(gained + lost + 1 - (gained - lost) ** 2 / (images + 2)) / (images + 2)
    bound = shrunk - float(norm.ppf(confidence)) * sd
    return PairedTest(
        images=images,
        gained=gained,
        lost=lost,
        estimate=(gained - lost) / images,
        bound=bound,
        margin=margin,
        p_value=float(norm.sf((shrunk + margin) / sd)),
        matched=bound >= -margin,
    )


def resolution(images: int, dense_errors: int, confidence: float) -> float:
    """The finest margin that ``images`` validation images resolve at ``confidence``.

    At this margin a round exactly as accurate as dense passes ``paired_test`` with probability ``confidence``,
    even when the two networks' errors are disjoint, for any dense error rate up to the one-sided
    ``confidence`` (Clopper-Pearson) upper bound of the e errors it made here. The bound, not e itself: a dense
    network that was lucky on these images would otherwise set a margin that the rounds, compared with the same
    lucky images, miss again and again. It is a non-inferiority trial's sample-size relation,
    margin = (z_alpha + z_beta) sd, with sd at twice the bound's errors as discordant images and
    power = confidence, so both error rates of the decision are 1 - confidence. A finer margin would let a few
    images flip the decision.
    """
    if dense_errors >= images:
        plausible_errors = float(images)
    else:
        plausible_errors = images * float(beta.ppf(confidence, dense_errors + 1, images - dense_errors))
    return 2 * float(norm.ppf(confidence)) * math.sqrt(2 * plausible_errors + 1) / (images + 2)


@dataclass(frozen=True)
class HeldOutSplit:
    """The training images a round trains on, and the validation images held out from them."""

    fit: ImageData
    images: torch.Tensor
    labels: torch.Tensor
    stats: tuple[torch.Tensor, torch.Tensor]

    @classmethod
    def carve(cls, data: ImageData, config: SearchConfig) -> tuple[HeldOutSplit, torch.Tensor]:
        fit, held = data.split_validation(config.validation_fraction, config.train.seed)
        if config.decide_on == "validation" and held.numel() == 0:
            raise InputError(
                f"a validation fraction of {config.validation_fraction} holds out no image of {data.name}'s "
                "training split; raise --validation-fraction or use more training images"
            )
        held_on = held.to(data.train_labels.device)
        split = cls(fit, data.train_images[held_on], data.train_labels[held_on], fit.channel_stats())
        return split, held

    def correct(self, model: nn.Module) -> torch.Tensor:
        return predict_labels(model, self.images, *self.stats) == self.labels.cpu()


@dataclass
class SearchState:
    """What search.json records: enough to resume, and the history a ticket reports."""

    config: dict[str, Any]
    dense_accuracy: float
    validation: dict[str, Any] = field(default_factory=dict)
    ratio_index: int = 0
    failing_ratio: float | None = None
    counts: list[int] = field(default_factory=list)
    history: list[dict[str, Any]] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    best_round: int = 0
    done: bool = False

    @property
    def next_round(self) -> int:
        return len(self.history)


def next_ratio(config: SearchConfig, state: SearchState) -> float | None:
    """The ratio the next round prunes from the last matching mask, or None when the schedule has ended."""
    return SCHEDULES[config.pruning_schedule].next_ratio(config.ratios, state)


def round_path(workdir: Path, round_index: int, kind: str) -> Path:
    """Where round ``round_index`` keeps its ``kind`` (weights, mask, or checkpoint while it trains)."""
    suffix = ".pt" if kind == "checkpoint" else ".safetensors"
    return workdir / "rounds" / f"{round_index:03d}-{kind}{suffix}"


def _config_record(config: SearchConfig, data: ImageData, held: torch.Tensor) -> dict[str, Any]:
    record = as_json(config)
    record["dataset"] = data.name
    record["train_size"] = int(data.train_labels.numel())
    record["validation_sha256"] = hashlib.sha256(held.to(torch.int64).numpy().tobytes()).hexdigest()
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
    accept_model_name(config.model)
    split, held = HeldOutSplit.carve(data, config)
    record = _config_record(config, data, held)
    if restart and workdir.exists() and distributed.is_main():
        shutil.rmtree(workdir)
    distributed.barrier()
    state = _load_state(workdir, record)
    if state is None:
        state = _train_dense(split, config, record, workdir, device, progress)
    warn_if_coarse(state, config, split.fit.num_classes)
    rewind = load_tensors(workdir / REWIND_FILE)
    dense_correct = load_tensors(workdir / DENSE_FILE)["correct"].bool() if split.labels.numel() else None
    while not state.done:
        _run_round(split, dense_correct, config, state, rewind, workdir, device, progress)
        if distributed.is_main():
            write_json(workdir / STATE_FILE, asdict(state))
            round_path(workdir, state.next_round - 1, "checkpoint").unlink(missing_ok=True)
        distributed.barrier()
    return _ticket(split.fit, config, state, rewind, workdir)


def _load_state(workdir: Path, record: dict[str, Any]) -> SearchState | None:
    path = workdir / STATE_FILE
    if not path.is_file():
        return None
    state = SearchState(**read_json(path))
    if isinstance(state.config, dict) and isinstance(state.config.get("train"), dict):
        state.config["train"] = recorded_training(state.config["train"])
    if state.config != record:
        changed = sorted(k for k in record if record[k] != state.config.get(k))
        raise InputError(
            f"{workdir} holds a search with other settings ({', '.join(changed)}); "
            "pass --restart to discard it or choose another --out"
        )
    log.info("resuming the search in %s after round %d", workdir, state.next_round - 1)
    return state


def warn_if_coarse(state: SearchState, config: SearchConfig, classes: int) -> None:
    """Say when the held-out split is too small to resolve eps_f: matching is then decided at a coarser margin."""
    validation = state.validation
    if config.decide_on == "validation" and not validation["resolves_eps"]:
        log.warning(
            "the %d validation images (dense: %d wrong) resolve accuracy differences of %.2f points at %g %% "
            "confidence, not eps_f = %.2f: matching is decided at a margin of %.2f points; hold out more images "
            "(--validation-fraction) or lower --confidence to decide at eps_f%s",
            validation["images"], validation["dense_errors"], 100 * validation["resolution"], 100 * config.confidence,
            100 * config.eps, 100 * validation["margin"],
            "; at this margin even a network that guesses could match"
            if validation["dense_accuracy"] - validation["margin"] <= 1 / classes else "",
        )


def _validation_record(split: HeldOutSplit, config: SearchConfig, dense_correct: torch.Tensor) -> dict[str, Any]:
    """The held-out split and the margin its size allows: the decision's calibration, fixed for the search."""
    images = int(dense_correct.numel())
    record: dict[str, Any] = {
        "fraction": config.validation_fraction, "seed": config.train.seed, "images": images, "eps": config.eps,
    }
    if not images:
        return {**record, "dense_accuracy": None, "dense_errors": None, "resolution": None,
                "margin": config.eps, "resolves_eps": None}
    errors = images - int(dense_correct.sum())
    finest = resolution(images, errors, config.confidence)
    return {**record, "dense_accuracy": 1 - errors / images, "dense_errors": errors, "confidence": config.confidence,
            "resolution": finest, "margin": max(config.eps, finest), "resolves_eps": finest <= config.eps}


def _train_dense(
    split: HeldOutSplit,
    config: SearchConfig,
    record: dict[str, Any],
    workdir: Path,
    device: torch.device,
    progress: Progress | None,
) -> SearchState:
    torch.manual_seed(config.train.seed)
    model = build_model(config.model, split.fit.input_shape[0], split.fit.num_classes).to(device)
    names = prunable_names(model, config.include_classifier, config.prune)
    checkpoint = round_path(workdir, 0, "checkpoint")
    if distributed.is_main():
        checkpoint.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    result = train(
        model, split.fit, config.train, rewind_epoch=config.rewind_epoch, checkpoint=checkpoint,
        progress=progress, description="dense",
    )
    if result.rewind_state is None:  # train() captures W_k whenever it is given a rewind epoch
        raise RuntimeError("the dense run ended without its late-rewind weights W_k")
    weights = state_copy(model)
    dense_correct = split.correct(model)
    validation = _validation_record(split, config, dense_correct)
    state = SearchState(
        config=record,
        dense_accuracy=result.accuracy,
        validation=validation,
        counts=SCHEDULES[config.pruning_schedule].initial_counts(config.ratios),
        history=[{"round": 0, "ratio": None, "density": 1.0, "validation_accuracy": validation["dense_accuracy"],
                  "accuracy": result.accuracy, "matched": True}],
        seconds=[time.perf_counter() - started],
    )
    if distributed.is_main():
        save_tensors(workdir / REWIND_FILE, result.rewind_state)
        save_tensors(workdir / DENSE_FILE, {"correct": dense_correct.to(torch.uint8)})
        save_tensors(round_path(workdir, 0, "weights"), weights)
        save_mask(round_path(workdir, 0, "mask"), Mask.ones_like(weights, names))
        write_json(workdir / STATE_FILE, asdict(state))
        checkpoint.unlink(missing_ok=True)
    distributed.barrier()
    return state


def _decide(
    model: nn.Module, accuracy: float, split: HeldOutSplit, dense_correct: torch.Tensor | None, config: SearchConfig,
    state: SearchState,
) -> dict[str, Any]:
    """A round's history entry: validation and test accuracy, the paired test's numbers and the decision."""
    row: dict[str, Any] = {"validation_accuracy": None, "accuracy": accuracy}
    if dense_correct is not None:
        correct = split.correct(model)
        test = paired_test(correct, dense_correct, state.validation["margin"], config.confidence)
        row.update(
            validation_accuracy=float(correct.float().mean()), estimate=test.estimate, bound=test.bound,
            margin=test.margin, p_value=test.p_value, gained=test.gained, lost=test.lost,
            resolves_eps=state.validation["resolves_eps"], matched=test.matched,
        )
    if config.decide_on == "test":
        row["matched"] = matches(accuracy, state.dense_accuracy, config.eps)
    return row


def _run_round(
    split: HeldOutSplit,
    dense_correct: torch.Tensor | None,
    config: SearchConfig,
    state: SearchState,
    rewind: dict[str, torch.Tensor],
    workdir: Path,
    device: torch.device,
    progress: Progress | None,
) -> None:
    """One prune -> rewind -> retrain round; updates ``state`` (the caller commits it)."""
    round_index = state.next_round
    ratio = next_ratio(config, state)
    if ratio is None:  # the caller runs a round only while the schedule has a next ratio
        raise RuntimeError("a pruning round was started after the schedule ended")
    best_mask = load_mask(round_path(workdir, state.best_round, "mask"))
    best_weights = load_tensors(round_path(workdir, state.best_round, "weights"))
    candidate = magnitude_prune(best_weights, best_mask, ratio)
    model = build_model(config.model, split.fit.input_shape[0], split.fit.num_classes)
    model.load_state_dict(rewind)
    model.to(device)
    checkpoint = round_path(workdir, round_index, "checkpoint")
    started = time.perf_counter()
    result = train(
        model, split.fit, config.train, candidate, checkpoint=checkpoint, progress=progress,
        description=f"round {round_index} (r={ratio:.3g}, {100 * candidate.density():.2f}% left)",
    )
    row = _decide(model, result.accuracy, split, dense_correct, config, state)
    if row["matched"]:
        if distributed.is_main():
            save_tensors(round_path(workdir, round_index, "weights"), state_copy(model))
            save_mask(round_path(workdir, round_index, "mask"), candidate)
        state.best_round = round_index
    SCHEDULES[config.pruning_schedule].advance(config.ratios, state, ratio, row["matched"])
    state.history.append({"round": round_index, "ratio": ratio, "density": candidate.density(), **row})
    state.seconds.append(time.perf_counter() - started)
    log.info(
        "round %d: r=%.4g density %.4f validation %s (difference %s, bound %s, margin %.4f) test %.4f: %s",
        round_index, ratio, candidate.density(), _maybe(row["validation_accuracy"]), _maybe(row.get("estimate")),
        _maybe(row.get("bound")), state.validation["margin"], result.accuracy,
        "matches" if row["matched"] else "does not match",
    )
    state.done = next_ratio(config, state) is None or round_index >= config.max_rounds


def _maybe(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _ticket(
    fit: ImageData, config: SearchConfig, state: SearchState, rewind: dict[str, torch.Tensor], workdir: Path
) -> Ticket:
    best = state.history[state.best_round]
    return Ticket(
        architecture=config.model,
        in_channels=fit.input_shape[0],
        num_classes=fit.num_classes,
        input_size=tuple(fit.input_shape[1:]),
        dataset=fit.name,
        classes=list(fit.classes),
        mask=load_mask(round_path(workdir, state.best_round, "mask")),
        rewind=rewind,
        weights=load_tensors(round_path(workdir, state.best_round, "weights")),
        accuracy=best["accuracy"],
        metadata={
            "dense_accuracy": state.dense_accuracy,
            "search": {
                "ratios": list(config.ratios),
                "counts": state.counts,
                "history": state.history,
                "best_round": state.best_round,
                "stopped_by": "schedule" if next_ratio(config, state) is None else "max_rounds",
                "pruning_schedule": config.pruning_schedule,
                "decide_on": config.decide_on,
                "validation": state.validation,
                "trainings": len(state.history),
                "seconds": sum(state.seconds),
            },
            "config": state.config,
        },
        normalization=fit.normalization(),
    )

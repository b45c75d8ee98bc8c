"""Scheme V3: WE with a trigger set T, and the binomial check of a suspect's trigger accuracy against chance.

Training mixes ``per_batch`` trigger images into every batch of the ticket's data (the paper appends one),
mask held fixed. Verification needs only predicted labels, so the same evidence comes from weights in process
or from a prediction API (``ticketguard.verification.blackbox``): trigger accuracy, the probability that a model that never
saw T agrees this often, and the decision at the false-claim rate alpha.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from rich.progress import Progress
from scipy.optimize import linear_sum_assignment
from torch import nn

from ticketguard.artifacts.ticket import MAX_INPUT_SIDE, NORMALIZATION_SCHEMA
from ticketguard.core.errors import InputError
from ticketguard.core.evidence import DEFAULT_ALPHA, FORGERY_LEVEL, Evidence
from ticketguard.core.masks import Mask
from ticketguard.core.schema import SHA256_SCHEMA, check_json, nullable
from ticketguard.core.stats import binomial_log_p_value, required_matches
from ticketguard.data import ImageData, Normalization
from ticketguard.data.augment import normalize
from ticketguard.data.triggers import (
    KEYED_GENERATOR,
    MAX_TRIGGER_IMAGES,
    TriggerSet,
    keyed_trigger_set,
    load_trigger_folder,
)
from ticketguard.models import accept_model_name, build_from_state
from ticketguard.training.loop import TrainConfig, autocast, evaluate, predict_labels, train

if TYPE_CHECKING:  # base.py registers this scheme, so it cannot be imported from here at run time
    from ticketguard.schemes.base import VerifyContext

CLAIM_SCHEME = "trigger-set/1"


def uniform_chance(label_share: torch.Tensor, answer_share: torch.Tensor, num_classes: int) -> float:
    """Keyed labels are drawn uniformly and independently of any model: an innocent answer matches the label
    paired with it with probability 1/classes, however the classes are paired."""
    return 1.0 / num_classes


def suspect_chance(label_share: torch.Tensor, answer_share: torch.Tensor, num_classes: int) -> float:
    """sum_c p(c) q(c): the suspect's own answer distribution on T against T's label distribution, the share
    of label c paired with the share of answer c (answers paired with no class are left out).

    A model that answers one class for everything agrees with the labels of that class by chance; this
    model charges it for that, where 1/classes would not.
    """
    return float((label_share * answer_share).sum())


# (label shares, answer shares paired with them, classes) -> chance of agreement. Each model is largest when the
# larger shares are paired with each other (rearrangement inequality), which bounds it over every relabelling.
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
        threshold=agreement_needed(found.details, level),
        passed=passed,
        decides_alone=source_kind == "keyed",
        details={**found.details, "level": level, "forgeable": FORGEABLE.get(source_kind, FORGEABLE["folder"])},
    )


def agreement_needed(details: dict[str, Any], level: float) -> float:
    """The least agreement share at which the reading that decided passes at ``level``: each of the two
    readings is tested at level / 2, the relabelled one with its union bound over every relabelling."""
    trials = details["trials"]
    log_tests = math.log(10) * details.get("relabellings_log10", 0.0) if details.get("relabelled") else 0.0
    return required_matches(trials, details["chance"], level / READINGS, log_tests) / trials


READINGS = 2
"""Every suspect's answers are read as labelled and under the best relabelling; each reading gets half of alpha."""


def trigger_evidence(
    predicted: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    chance_model: str = "suspect",
    alpha: float = DEFAULT_ALPHA,
) -> Evidence:
    """V(...) on T: the suspect's answers against T's secret labels, read as labelled and as relabelled.

    A thief may permute the classifier's output rows or rename the labels his API returns, so his answers
    are pi(label) for a one-to-one pi he chose; ``predicted`` may hold any integers. Every suspect is read
    both ways:

    - as labelled: k_id = #{answer == label}, tested against Binomial(n, chance) (``chance_model``);
    - relabelled: k* = the largest agreement over every one-to-one pairing of the owner's classes with the
      suspect's answers (linear assignment on the class x answer table). For each of the R pairings
      (R = max(C, D)! / |C - D|! for C classes and D distinct answers) the agreement is Binomial(n, chance of
      that pairing), at most the chance model on sorted counts, so P(k* >= k) <= R P(Binomial(n, that
      chance) >= k) (union bound, in log space).

    Null: the suspect's answers are independent of T's labels (keyed labels are drawn from the owner's seed,
    independently of any model a thief could have trained without it). p = min(1, 2 min(p_id, p_relabelled))
    (Bonferroni over the two readings), so both maximisations are in the null; a copy answering as labelled
    pays a factor 2, a relabelled one 2R. The score and threshold are those of the reading with the smaller
    p-value; details keep both.
    """
    check_chance_model(chance_model)
    if predicted.shape != labels.shape:
        raise InputError(f"got {predicted.numel()} predictions for {labels.numel()} trigger images")
    trials = labels.numel()
    if trials == 0:
        raise InputError("the trigger set is empty, so it cannot show anything")
    predicted, labels = predicted.cpu().long(), labels.cpu().long()
    answered = predicted[(predicted >= 0) & (predicted < num_classes)]
    label_share, answer_share = (torch.bincount(v, minlength=num_classes).double() / trials for v in (labels, answered))
    chance = CHANCE_MODELS[chance_model](label_share, answer_share, num_classes)
    log_identity, identity = _reading(int((predicted == labels).sum()), trials, chance, 0.0)
    log_relabelled, relabelled, log_relabellings = _best_relabelling(predicted, labels, num_classes, chance_model)
    deciding = relabelled if log_relabelled < log_identity else identity
    p_value = min(1.0, READINGS * math.exp(min(log_identity, log_relabelled)))
    details = {
        "agreed": deciding["agreed"],
        "trials": trials,
        "chance": deciding["chance"],
        "chance_model": chance_model,
        "classes": num_classes,
        "relabelled": deciding is relabelled,
        "relabellings_log10": log_relabellings / math.log(10),
        "as_labelled": identity,
        "best_relabelling": relabelled,
    }
    return Evidence(
        name="trigger",
        score=deciding["agreed"] / trials,
        threshold=agreement_needed(details, alpha),
        passed=p_value <= alpha,
        p_value=p_value,
        details=details,
    )


def _best_relabelling(
    predicted: torch.Tensor, labels: torch.Tensor, num_classes: int, chance_model: str
) -> tuple[float, dict[str, Any], float]:
    """The relabelled reading: the one-to-one pairing of the owner's classes with the suspect's answers that
    agrees most (linear assignment on the class x answer table), its log p-value with the union bound over
    every pairing, what to report of it, and log R."""
    answers, column = torch.unique(predicted, return_inverse=True)
    table = torch.zeros(num_classes, answers.numel(), dtype=torch.long)
    table.index_put_((labels, column), torch.ones_like(labels), accumulate=True)
    rows, columns = linear_sum_assignment(table.numpy(), maximize=True)
    paired = min(num_classes, answers.numel())
    largest = [(counts.double() / labels.numel()).sort(descending=True).values[:paired]
               for counts in (table.sum(1), table.sum(0))]
    chance = CHANCE_MODELS[chance_model](*largest, num_classes)
    log_relabellings = math.lgamma(max(num_classes, answers.numel()) + 1) - math.lgamma(
        abs(num_classes - answers.numel()) + 1
    )
    log_p, reading = _reading(int(table[rows, columns].sum()), labels.numel(), chance, log_relabellings)
    reading["relabelling"] = {str(c): int(answers[d]) for c, d in zip(rows.tolist(), columns.tolist())}
    return log_p, reading, log_relabellings


def _reading(agreed: int, trials: int, chance: float, log_tests: float) -> tuple[float, dict[str, Any]]:
    """One reading of the answers: log P(the best of exp(log_tests) tests agrees >= agreed), and what to
    report of it (its own p-value, before the factor for two readings)."""
    chance = min(max(chance, 0.0), 1.0)  # a sum of products can round just past 1
    log_p = min(0.0, log_tests + binomial_log_p_value(agreed, trials, chance))
    return log_p, {"agreed": agreed, "chance": chance, "p_value": math.exp(log_p)}


@torch.inference_mode()
def verify_local(
    model: nn.Module,
    trigger: TriggerSet,
    mean: torch.Tensor,
    std: torch.Tensor,
    num_classes: int,
    chance_model: str = "suspect",
    alpha: float = DEFAULT_ALPHA,
    suspect_normalization: Normalization | None = None,
) -> Evidence:
    """The black-box check run in process on weights, no HTTP, in the units the suspect's network expects
    (``input_units``), which the details report. ``mean``, ``std``: the owner's normalisation;
    ``suspect_normalization``: the one the suspect says its network takes, if it says."""
    (unit_mean, unit_std), report = input_units(model, trigger.images, mean, std, suspect_normalization)
    predicted = predict_labels(model, trigger.images, unit_mean, unit_std)
    found = trigger_evidence(predicted, trigger.labels, num_classes, chance_model, alpha)
    return replace(found, details={**found.details, **report})


MAP_PROBE_IMAGES = 256  # enough for per-channel moments, and bounded however large T is
SCALE_TOLERANCE = 4.0
"""Estimated scales within this factor of a candidate's read as it (``InputMap.distance``). On trained digits
ResNet-20s the estimate of an unscaled model lay within 0.8-1.2 (keyed, Adi's, noise and digits images) and
1.7-2.3 after one epoch, but models trained for a few steps, whose BatchNorm still holds mostly its initial
statistics, read 2.5-3.6: a thief's scale alone is corrected from a factor of 4 on (pixels in 0-255 where the
owner used 0-1 is 255)."""
SHIFT_TOLERANCE = 0.4
"""Estimated shifts within this many standard deviations of the suspect's inputs of a candidate's read as it.
Untouched models read within 0.13 of 0 (digits ResNet-20s trained for a few steps to 10 epochs, with and
without a trigger set; keyed, Adi's and digits images) and within 0.19 (CIFAR ResNet-20s, 1 and 5 epochs on
400 images); copies that take raw pixels in [0, 1] read 0.8 on digits (mean / std = 0.81) and 1.0-1.6 on
CIFAR (about 2)."""
SHIFT_RCOND = 0.05
"""Input channels whose constant images the stem answers alike (singular values of the response below this
share of the largest) are not told apart: they share their shift, the least-squares solution of least norm."""

OWNER_UNITS = "the owner's normalisation"
SUSPECT_UNITS = "the suspect's own normalisation"
ESTIMATED_UNITS = "estimated from the suspect's stem and first BatchNorm"


@dataclass(frozen=True)
class InputMap:
    """x' = scale * x + shift per input channel: the inputs a network expects, x being an image standardised
    with the owner's normalisation (the identity for the owner's own network)."""

    scale: torch.Tensor
    shift: torch.Tensor

    @classmethod
    def identity(cls, channels: int) -> InputMap:
        return cls(torch.ones(channels), torch.zeros(channels))

    @classmethod
    def between(cls, mean: torch.Tensor, std: torch.Tensor, units: Normalization) -> InputMap:
        """The map from the owner's normalisation (``mean``, ``std``) to ``units``: for pixels p,
        (p - m') / s' = (s / s') x + (m - m') / s'."""
        unit_mean, unit_std = units.tensors()
        return cls(std / unit_std, (mean - unit_mean) / unit_std)

    def normalization(self, mean: torch.Tensor, std: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The mean and std that standardise pixels p straight into this map's units:
        a (p - m) / s + b = (p - (m - b s / a)) / (s / a)."""
        return mean - self.shift * std / self.scale, std / self.scale

    def distance(self, candidate: InputMap) -> float:
        """How far ``candidate`` lies from this estimate in tolerances: the largest over channels of the scale
        ratio's |log| over log SCALE_TOLERANCE and the means' offset, in standard deviations of the inputs
        this map expects, over SHIFT_TOLERANCE. Within 1 the estimate reads as the candidate."""
        ratio = (candidate.scale / self.scale).log().abs() / math.log(SCALE_TOLERANCE)
        offset = ((candidate.shift - self.shift) / self.scale).abs() / SHIFT_TOLERANCE
        return float(torch.maximum(ratio, offset).max())


def input_units(
    model: nn.Module,
    images: torch.Tensor,
    mean: torch.Tensor,
    std: torch.Tensor,
    suspect_normalization: Normalization | None = None,
) -> tuple[tuple[torch.Tensor, torch.Tensor], dict[str, Any]]:
    """The mean and std that bring T's pixels to the units the suspect's network expects, and what to report.

    The candidates are the suspect's own normalisation, where it names one, and the owner's. The one nearest
    the map the network's own statistics give (``expected_input_map``) is used where the estimate reads as it,
    else the estimated map itself; the suspect's wins a tie, and a network without BatchNorm statistics is fed
    in its units. So a normalisation shipped beside a network trained on other inputs (a decoy) is set aside.
    """
    mean, std = mean.cpu().float(), std.cpu().float()
    estimate = expected_input_map(model, images, mean, std)
    candidates: dict[str, InputMap] = {}
    if suspect_normalization is not None:
        candidates[SUSPECT_UNITS] = InputMap.between(mean, std, suspect_normalization)
    candidates[OWNER_UNITS] = InputMap.identity(mean.numel())
    chosen = next(iter(candidates))
    if estimate is not None:
        distances = {name: estimate.distance(fed) for name, fed in candidates.items()}
        chosen = min(distances, key=distances.__getitem__)
        if distances[chosen] > 1:
            chosen, candidates[ESTIMATED_UNITS] = ESTIMATED_UNITS, estimate
    used = candidates[chosen]
    report: dict[str, Any] = {
        "input_units": chosen,
        "input_scale": float(used.scale.median()),  # channels differ only in a suspect's own normalisation
        "input_shift": used.shift.tolist(),
        "input_scale_estimate": None if estimate is None else float(estimate.scale.median()),
        "input_shift_estimate": None if estimate is None else estimate.shift.tolist(),
    }
    if suspect_normalization is not None:
        report["suspect_normalization"] = suspect_normalization.to_json()
    return used.normalization(mean, std), report


@torch.inference_mode()
def expected_input_map(
    model: nn.Module, images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor
) -> InputMap | None:
    """The map x' = a x + b from owner-standardised images to the inputs the suspect expects, read off its
    stem and first BatchNorm; None where the model records no BatchNorm statistics.

    A thief can feed other units (pixels in 0-255, raw pixels in 0-1) and fold the change into the network:
    the stem divided by a, the mean shift (a constant per stem channel away from padding borders) added to the
    first BatchNorm's running mean. That BatchNorm recorded what the stem gave on the thief's inputs, and the
    stem up to it is linear. Inputs standardised with the owner's statistics have mean 0 and variance 1 per
    channel, so the trigger images, brought to the same two moments (z), are sent through the stem with a
    zero image and one unit constant image per channel (e_c):

    - a, one factor shared by every channel: the median over stem channels o of sqrt(running variance_o /
      Var stem(z)_o). Per channel it would rest on the cross-channel correlations of the thief's data, which
      T's images do not share;
    - b, per channel: running mean_o - mean stem(a z)_o = sum_c b_c (stem(e_c) - stem(0))_o, solved by least
      squares over the stem channels (``SHIFT_RCOND``). The response to e_c is read at the centre of the
      stem's output, where no padding reaches, as a thief folds the shift in. On digits copies that take raw
      pixels (the shift folded in so, or the BatchNorm recalibrated on raw pixels) it read the shift as
      0.27-0.35 (true 0.31) where the mean over positions read 0.33-0.41, and the watermarked copy's trigger
      agreement rose from 0.56-0.77 to 0.81-0.93 (0.90-0.92 fed raw pixels exactly).

    The estimate uses the images and the suspect only, never T's labels, so the test's null is unchanged.
    """
    device = next(model.parameters()).device
    probe = normalize(images[:MAP_PROBE_IMAGES].to(device), mean.to(device), std.to(device))
    probe = (probe - probe.mean((0, 2, 3), keepdim=True)) / probe.std((0, 2, 3), keepdim=True).clamp_min(1e-12)
    count, channels = probe.shape[:2]
    constants = torch.cat([torch.zeros(1, channels, device=device), torch.eye(channels, device=device)])
    constant_images = constants[..., None, None].expand(-1, -1, *probe.shape[2:])  # 0, then e_c per channel
    found = _first_batchnorm_input(model, torch.cat([probe, constant_images]))
    if found is None:
        return None
    norm, stem = found
    at_zero, row, column = stem[count], stem.shape[2] // 2, stem.shape[3] // 2  # no padding reaches the centre
    to_probe, to_units = stem[:count] - at_zero, stem[count + 1 :, :, row, column] - at_zero[:, row, column]
    variance = to_probe.var(dim=(0, 2, 3))
    running_mean, running_var = norm.running_mean.float(), norm.running_var.float()
    alive = (variance > 0) & (running_var > 0)
    if not alive.any():
        return None
    scale = (running_var[alive] / variance[alive]).sqrt().median()
    response = scale * to_probe.mean((0, 2, 3)) + at_zero.mean((1, 2))
    shift = torch.linalg.pinv(to_units[:, alive].T, rtol=SHIFT_RCOND) @ (running_mean - response)[alive]
    return InputMap(scale.expand(channels).cpu(), shift.cpu())


def _first_batchnorm_input(
    model: nn.Module, inputs: torch.Tensor
) -> tuple[nn.BatchNorm2d, torch.Tensor] | None:
    """The first BatchNorm with running statistics that ``inputs`` reach in eval mode, and what reaches it."""
    seen: list[tuple[nn.BatchNorm2d, torch.Tensor]] = []
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d) and m.running_var is not None]
    hooks = [m.register_forward_pre_hook(lambda m, given: seen.append((m, given[0]))) for m in norms]
    was_training = model.training
    try:
        model.eval()(inputs)
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    return (seen[0][0], seen[0][1].float()) if seen else None


def trigger_order_seed(config: TrainConfig) -> int:
    """The seed of the order T's images join the batches in: one past the data order's seed, so the two orders
    differ, and a user's training loop under ``protect`` draws T in the order this trainer does."""
    return config.seed + 1


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


class SmoothedTriggerLoss:
    """The gradient hook of WE(D, T, ...): T's loss once more, at the weights plus Gaussian noise.

    Fine-tuning moves every weight (Adam by about its rate a step, pruned weights too once they are freed),
    and labels learned at one point of weight space alone are lost on the way. So every step also descends T's
    loss (the mean over the batch's trigger images) at weights with noise N(0, (noise * rms of the layer)^2)
    added to every conv and linear weight, pruned positions included: randomized smoothing over the parameters,
    as in certified watermarks (Bansal et al., ICML 2022). BatchNorm normalises with the noisy batch but keeps
    its running statistics, and the step that follows keeps the mask as always. It costs one more forward and
    backward pass of the batch. ``per_batch``: the trigger images at the end of every batch (``TriggerMixer``).

    Measured (benchmarks/README.md), noise 0.05 and 32 trigger images a batch: on the digits ticket retrained
    from W_1 for 20 epochs, 5 epochs of Adam at 1e-3 on every weight kept 75-87 % of T instead of 36-54 %, but
    accuracy fell by 1.9 points (0.2 when the retraining also embeds the signature), and by 16 points on a
    ResNet-20 trained from its initialisation for 10 epochs. So it is not on by default.
    """

    def __init__(self, per_batch: int, noise: float, seed: int) -> None:
        self.per_batch, self.noise, self.seed = per_batch, noise, seed
        self.generator: torch.Generator | None = None

    def __call__(self, network: nn.Module, inputs: torch.Tensor, labels: torch.Tensor) -> None:
        if self.generator is None:
            self.generator = torch.Generator(device=inputs.device).manual_seed(self.seed)
        weights = [p for p in network.parameters() if p.dim() > 1 and p.requires_grad]
        with torch.no_grad():
            noises = [
                self.noise * w.pow(2).mean().sqrt()
                * torch.randn(w.shape, generator=self.generator, device=w.device, dtype=w.dtype)
                for w in weights
            ]
            for weight, noise in zip(weights, noises):
                weight.add_(noise)
        norms = [m for m in network.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        momenta = [m.momentum for m in norms]
        try:
            for norm in norms:
                norm.momentum = 0.0
            with autocast(inputs.device):
                marked = network(inputs)[-self.per_batch :]
                loss = nn.functional.cross_entropy(marked, labels[-self.per_batch :])
            loss.backward()
        finally:
            for norm, momentum in zip(norms, momenta):
                norm.momentum = momentum
            with torch.no_grad():
                for weight, noise in zip(weights, noises):
                    weight.sub_(noise)


def watermark(
    model: nn.Module,
    data: ImageData,
    trigger: TriggerSet,
    config: TrainConfig,
    mask: Mask | None = None,
    *,
    per_batch: int = 1,
    weight_noise: float = 0.0,
    progress: Progress | None = None,
    checkpoint: Path | None = None,
) -> WatermarkResult:
    """WE(D, T, ...): train ``model`` in place with ``per_batch`` trigger images appended to every batch, and
    (``weight_noise`` > 0) T's loss descended at noisy weights too (``SmoothedTriggerLoss``).

    The trainer is the one every run uses (mask held fixed, same schedule); test and trigger accuracy are
    logged after each epoch. ``checkpoint``: as for ``train``, a killed run resumes from its last epoch.
    """
    if per_batch < 1:
        raise InputError(f"--per-batch must be >= 1 trigger image per batch, got {per_batch}")
    if not weight_noise >= 0:
        raise InputError(f"the weight noise is a standard deviation, so >= 0; got {weight_noise}")
    if trigger.shape != data.input_shape:
        raise InputError(f"trigger images are {trigger.shape} but the data's inputs are {data.input_shape}")
    device = next(model.parameters()).device
    trigger = trigger.to(device)
    mean, std = data.channel_stats()

    def measure(epochs_done: int, trained: nn.Module) -> dict[str, float]:
        marked = trigger_accuracy(trained, trigger, mean, std)
        return {"accuracy": evaluate(trained, data), "trigger_accuracy": marked}

    smoothing = SmoothedTriggerLoss(per_batch, weight_noise, trigger_order_seed(config)) if weight_noise > 0 else None
    result = train(
        model, data, config, mask, progress=progress, description="watermark",
        batch_hook=TriggerMixer(trigger, per_batch, trigger_order_seed(config)), epoch_hook=measure,
        gradient_hook=smoothing, checkpoint=checkpoint,
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


def verify_weights(
    weights: dict[str, torch.Tensor],
    claim: TriggerClaim,
    recorded: Normalization | None = None,
    alpha: float = DEFAULT_ALPHA,
    folder: str | Path | None = None,
    device: torch.device | str | None = None,
    architecture: str | None = None,
    beside_network: Mapping[str, torch.Tensor] | None = None,
) -> Evidence:
    """The black-box check on bare weights: rebuild the suspect (as ``architecture`` when the caller names it)
    and ask it for the trigger labels; ``recorded`` is the suspect's own normalisation when it is a ticket
    folder, ``beside_network`` the tensors a suspect file holds beside its network
    (``carried_normalization``)."""
    named = None
    if architecture is not None:
        accept_model_name(architecture)
        named = (architecture, claim.shape[0], claim.classes)
    model, (_, channels, classes) = build_from_state(weights, "checking the trigger set in process", named)
    if (channels, classes) != (claim.shape[0], claim.classes):
        raise InputError(
            f"the suspect takes {channels} channel(s) and predicts {classes} classes, but the trigger set "
            f"has {claim.shape[0]} and {claim.classes}"
        )
    # claims written before they recorded the normalisation: a ticket folder still records its own
    normalization = claim.normalization or recorded
    if normalization is None:
        raise InputError(
            "the claim does not record the input normalisation its owner trained with (it predates that "
            "field); serve the suspect and check it with `ticketguard query`, or protect the ticket again"
        )
    trigger = claim.trigger_set(folder)
    mean, std = normalization.tensors()
    model = model.to(torch.device(device) if device is not None else torch.device("cpu")).eval()
    return verify_local(
        model, trigger.to(next(model.parameters()).device), mean, std, classes, claim.chance_model, alpha,
        carried_normalization(beside_network or {}, channels),
    )


def carried_normalization(tensors: Mapping[str, torch.Tensor], channels: int) -> Normalization | None:
    """The normalisation a repackaged copy ships beside its network (``normalize.mean`` and ``normalize.std``,
    ``pixel_mean`` and ``pixel_std``...): the one pair of 1-D float tensors of length ``channels`` whose keys
    differ only in ending in ``mean`` or ``std``, the means finite and the stds positive; None for no such
    pair or for several, which would leave the units in doubt."""
    pairs = [
        (mean, tensors[key.removesuffix("mean") + "std"])
        for key, mean in tensors.items()
        if key.endswith("mean") and key.removesuffix("mean") + "std" in tensors
    ]
    found = [
        (mean.double(), std.double())
        for mean, std in pairs
        if all(t.is_floating_point() and t.shape == (channels,) for t in (mean, std))
        and bool(torch.isfinite(mean).all() and torch.isfinite(std).all() and (std > 0).all())
    ]
    if len(found) != 1:
        return None
    mean, std = found[0]
    return Normalization(tuple(mean.tolist()), tuple(std.tolist()))


class TriggerScheme:
    """V3 as a claim-carrying scheme (``ticketguard.schemes.base``): the trigger section sits under the claim's
    extensions, and its evidence is the suspect's trigger accuracy, judged against what a forger could search."""

    claim_key = "trigger"
    top_level = False
    evidence_name = "trigger"
    description = "a trigger set"
    schema = TRIGGER_SCHEMA

    def section_to_json(self, section: TriggerClaim) -> dict[str, Any]:
        return section.to_json()

    def section_from_json(self, data: Any) -> TriggerClaim:
        return TriggerClaim.from_json(data)

    def evidence(self, section: TriggerClaim, context: VerifyContext) -> Evidence:
        """Run the suspect's weights in process on T (``verify_weights``)."""
        found = verify_weights(
            context.weights, section, context.normalization, context.alpha, context.trigger_folder,
            context.device, context.model, context.beside_network,
        )
        return judged_against_forgery(found, section.source.get("kind", ""), context.alpha, context.trusted_time)


TRIGGER_SCHEME = TriggerScheme()

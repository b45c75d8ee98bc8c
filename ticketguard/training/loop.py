"""WE without a trigger set: (re)train N[W, M] from given weights with the paper's protocol, mask held fixed.

Data lives on the device as uint8 tensors; batches are gathered and augmented there; the pruned weights are
re-zeroed after every step with one fused multiply (``fixed_mask.keep_mask``); loss and accuracy accumulate on
the device, so a step never waits for the host.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from rich.progress import Progress
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ticketguard.core.errors import InputError
from ticketguard.core.files import as_json, load_checkpoint, save_checkpoint
from ticketguard.core.masks import Mask
from ticketguard.core.settings import setting
from ticketguard.data import ImageData
from ticketguard.data.augment import crop_and_flip, normalize
from ticketguard.training import distributed
from ticketguard.training.fixed_mask import keep_mask
from ticketguard.training.host_memory import keep_freed_memory

EVAL_BATCH_SIZE = {"cpu": 256, "other": 1024}
"""Images per forward pass when predicting. On a CPU a batch of 256 ResNet-20 images keeps every activation
under the largest block glibc serves from its heap (``host_memory``): 1,400-1,530 images/s against 620-920 in
batches of 1024, whose activations are mapped and faulted in afresh (2 threads)."""

BatchHook = Callable[[torch.Tensor, torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]]
"""(augmented uint8 images, labels, step) -> the batch to train on: how a scheme mixes in its own examples."""
EpochHook = Callable[[int, nn.Module], dict[str, float]]
"""(epochs done, model) -> extra numbers for that epoch's history record."""
GradientHook = Callable[[nn.Module, torch.Tensor, torch.Tensor], None]
"""(network, standardised batch, labels) -> None, after the batch's backward pass and before the step: a
scheme's own loss terms, whose gradients it adds to the parameters' .grad."""


SCHEDULES = ("step", "onecycle")
ONECYCLE_WARMUP = 0.3
ONECYCLE_START = 0.04


@dataclass(frozen=True)
class TrainConfig:
    """One training run (paper §4.1: SGD 0.9, wd 1e-4, lr 0.1, x0.1 at 50 % and 75 % of 182 epochs,
    batch 128). The settings from ``label_smoothing`` on are short-run tricks from the fast-CIFAR literature,
    all off by default."""

    epochs: int = setting(182, help="Epochs per training run.")
    batch_size: int = setting(128, help="Batch size.")
    lr: float = setting(0.1, help="Peak learning rate.")
    momentum: float = setting(0.9, help="SGD momentum.")
    weight_decay: float = setting(1e-4, help="Weight decay.")
    milestones: tuple[float, ...] = setting(
        (0.5, 0.75), help="Shares of the run after which the step schedule multiplies the rate by lr_decay."
    )
    lr_decay: float = setting(0.1, help="Factor of each step of the step schedule.")
    seed: int = setting(0, help="Seed of initialisation, batch order and augmentation.")
    schedule: str = setting(
        "step",
        help="Learning-rate schedule: step (the paper's) or onecycle, a linear warm-up over the first 30 % of the "
        "steps and a linear decay to zero that suits short runs.",
    )
    compile: bool = setting(False, help="Train through torch.compile (pays on GPUs and for ResNet-18/50).")
    label_smoothing: float = setting(0.0, help="Share of each target spread evenly over all classes.")
    nesterov: bool = setting(False, help="Nesterov momentum.")
    decay_norm_and_bias: bool = setting(
        True, help="Weight decay on BatchNorm scales and shifts and on biases too, not only on conv and linear weights."
    )
    flip_tta: bool = setting(
        False, help="The final test accuracy averages the logits of each image and its mirror image."
    )
    crop_padding: int | None = setting(
        None, help="Random crops move each training image by up to this many pixels; unset: the data set's."
    )

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1:
            raise InputError(f"epochs and batch size must be >= 1, got {self.epochs} and {self.batch_size}")
        for name in ("lr", "momentum", "weight_decay", "lr_decay", "label_smoothing"):
            if not math.isfinite(getattr(self, name)):
                raise InputError(
                    f"{name.replace('_', ' ')} must be a finite number, got {getattr(self, name)}"
                )
        if self.lr <= 0:
            raise InputError(f"learning rate must be positive, got {self.lr}")
        if not 0 <= self.momentum < 1 or self.weight_decay < 0:
            raise InputError(
                "momentum must lie in [0, 1) and weight decay be >= 0, "
                f"got {self.momentum} and {self.weight_decay}"
            )
        if self.schedule not in SCHEDULES:
            raise InputError(f"unknown schedule {self.schedule!r}; choose one of: {', '.join(SCHEDULES)}")
        if not 0 <= self.label_smoothing < 1:
            raise InputError(f"label smoothing must lie in [0, 1), got {self.label_smoothing}")
        if self.nesterov and self.momentum == 0:
            raise InputError("Nesterov momentum needs a momentum above 0; set momentum or drop nesterov")
        for name in ("nesterov", "decay_norm_and_bias", "flip_tta"):
            if not isinstance(getattr(self, name), bool):
                raise InputError(f"{name} must be True or False, got {getattr(self, name)!r}")
        padding = self.crop_padding
        if padding is not None and (isinstance(padding, bool) or not isinstance(padding, int) or padding < 0):
            raise InputError(f"crop padding must be a whole number of pixels >= 0, got {padding!r}")

    def lr_at(self, epoch: float) -> float:
        """The rate at a (fractional) epoch: step decay at the milestones, or the one-cycle triangle."""
        if self.schedule == "onecycle":
            done = epoch / self.epochs
            if done < ONECYCLE_WARMUP:
                return self.lr * (ONECYCLE_START + (1 - ONECYCLE_START) * done / ONECYCLE_WARMUP)
            return self.lr * max(0.0, 1 - (done - ONECYCLE_WARMUP) / (1 - ONECYCLE_WARMUP))
        passed = sum(int(epoch) >= round(m * self.epochs) for m in self.milestones)
        return self.lr * self.lr_decay**passed


@dataclass
class TrainResult:
    accuracy: float
    history: list[dict[str, float]] = field(default_factory=list)
    rewind_state: dict[str, torch.Tensor] | None = None


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise InputError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError("CUDA was requested but no GPU is visible; use --device cpu")
    return device


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA; plain fp32 on CPU, where bf16 convolutions are many times slower."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def recorded_training(settings: dict[str, Any]) -> dict[str, Any]:
    """Settings read back from a record, with those added since it was written filled in at their defaults,
    which is what the recorded run used; compare this, not the raw record, with ``as_json(config)``."""
    return {**as_json(TrainConfig()), **settings}


def state_copy(model: nn.Module) -> dict[str, torch.Tensor]:
    """A detached CPU copy of every parameter and buffer, in plain contiguous layout."""
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in model.state_dict().items()}


def _batches(
    data: ImageData, batch_size: int, generator: torch.Generator
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """This process's share of each global batch.

    Every process draws the same order and augmentation (same generator state), so under torchrun the shares
    partition exactly the batch a single process would see.
    """
    count = data.train_labels.numel()
    world, rank = distributed.world_size(), distributed.rank()
    order = torch.randperm(count, device=data.train_images.device, generator=generator)
    for start in range(0, count, batch_size):
        index = order[start : start + batch_size]
        images = crop_and_flip(data.train_images[index], data.crop_padding, data.flip, generator)
        if index.numel() >= world:
            yield images[rank::world], data.train_labels[index][rank::world]


@torch.inference_mode()
def predict_logits(
    model: nn.Module, images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, *, flip_tta: bool = False
) -> torch.Tensor:
    """float32 logits (N, classes), on the CPU, of uint8 images standardised with the training data's
    statistics; with ``flip_tta`` the mean of the logits of each image and its horizontal mirror."""
    device = next(model.parameters()).device
    mean, std = mean.to(device), std.to(device)
    keep_freed_memory(device)
    batch_size = EVAL_BATCH_SIZE["cpu" if device.type == "cpu" else "other"]
    was_training = model.training
    model.eval()
    logits = []
    with autocast(device):
        for start in range(0, images.shape[0], batch_size):
            batch = normalize(images[start : start + batch_size].to(device), mean, std)
            views = (batch, batch.flip(3)) if flip_tta else (batch,)
            outputs = [model(view.contiguous(memory_format=torch.channels_last)).float() for view in views]
            logits.append((sum(outputs) / len(outputs)).cpu())
    model.train(was_training)
    return torch.cat(logits) if logits else torch.zeros(0, 0)


def predict_labels(
    model: nn.Module, images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, *, flip_tta: bool = False
) -> torch.Tensor:
    """Top-1 labels (on the CPU) of uint8 images, standardised with the training data's statistics."""
    if images.shape[0] == 0:
        return torch.zeros(0, dtype=torch.long)
    return predict_logits(model, images, mean, std, flip_tta=flip_tta).argmax(1)


def evaluate(model: nn.Module, data: ImageData, split: str = "test", *, flip_tta: bool = False) -> float:
    """Top-1 accuracy (a fraction) on a split, in large batches; ``flip_tta`` averages each image's logits
    with its mirror image's."""
    images, labels = getattr(data, f"{split}_images"), getattr(data, f"{split}_labels")
    predicted = predict_labels(model, images, *data.channel_stats(), flip_tta=flip_tta)
    return int((predicted == labels.cpu()).sum()) / max(labels.numel(), 1)


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.SGD:
    """SGD as ``config`` says; without ``decay_norm_and_bias`` the 1-d parameters (BatchNorm scales and
    shifts, biases) form a second group without weight decay, as decaying them only shrinks the scale BN
    restores."""
    params: Any = model.parameters()
    if not config.decay_norm_and_bias:
        trained = [p for p in model.parameters() if p.requires_grad]
        params = [
            {"params": [p for p in trained if p.dim() > 1]},
            {"params": [p for p in trained if p.dim() <= 1], "weight_decay": 0.0},
        ]
    return torch.optim.SGD(
        params,
        lr=config.lr,
        momentum=config.momentum,
        weight_decay=config.weight_decay,
        nesterov=config.nesterov,
    )


def train(
    model: nn.Module,
    data: ImageData,
    config: TrainConfig,
    mask: Mask | None = None,
    *,
    rewind_epoch: int | None = None,
    checkpoint: Path | None = None,
    progress: Progress | None = None,
    description: str = "train",
    batch_hook: BatchHook | None = None,
    epoch_hook: EpochHook | None = None,
    gradient_hook: GradientHook | None = None,
) -> TrainResult:
    """Train ``model`` in place on ``data`` with ``mask`` held fixed; pruned weights stay exactly zero.

    ``rewind_epoch`` = k captures W_k (late rewinding) after k epochs. With ``checkpoint``, the run resumes
    from that file if it exists and saves to it after every epoch; the caller removes it when done.
    ``batch_hook`` changes every batch after augmentation; ``epoch_hook`` adds numbers to each epoch's record;
    ``gradient_hook`` adds gradients of its own to every step.
    """
    if config.flip_tta and not data.flip:
        raise InputError(
            f"flip_tta averages over mirror images, but {data.name} is not trained with flips; drop flip_tta"
        )
    if config.crop_padding is not None:
        data = replace(data, crop_padding=config.crop_padding)
    device = next(model.parameters()).device
    keep_freed_memory(device)
    model.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(model, config)
    # SGD is elementwise: pruned gradients and momentum never reach a kept weight, so re-zeroing suffices
    with keep_mask(model, mask if mask is not None else Mask({}), [optimizer], mask_gradients=False):
        return _fit(
            model, data.to(device), config, optimizer, rewind_epoch=rewind_epoch, checkpoint=checkpoint,
            progress=progress, description=description, batch_hook=batch_hook, epoch_hook=epoch_hook,
            gradient_hook=gradient_hook,
        )


def _fit(
    model: nn.Module,
    data: ImageData,
    config: TrainConfig,
    optimizer: torch.optim.Optimizer,
    *,
    rewind_epoch: int | None,
    checkpoint: Path | None,
    progress: Progress | None,
    description: str,
    batch_hook: BatchHook | None,
    epoch_hook: EpochHook | None,
    gradient_hook: GradientHook | None,
) -> TrainResult:
    """The epochs of ``train`` with the mask already kept, resuming from ``checkpoint`` where it exists."""
    device = data.train_images.device
    network = model
    if distributed.world_size() > 1:
        network = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    generator = torch.Generator(device=device).manual_seed(config.seed)
    state: dict[str, Any] = {"epoch": 0, "history": [], "rewind_state": None}
    if checkpoint is not None and checkpoint.is_file():
        state = _resume(checkpoint, model, optimizer, generator, config)
    if rewind_epoch == 0 and state["rewind_state"] is None:
        state["rewind_state"] = state_copy(model)
    task = 0
    if progress is not None:
        task = progress.add_task(description, total=config.epochs, completed=state["epoch"], status="")
    model.train()
    forward = torch.compile(network) if config.compile else network
    mean, std = (t.to(device) for t in data.channel_stats())
    for epoch in range(state["epoch"], config.epochs):
        record = _run_epoch(
            forward, optimizer, data, config, epoch, generator, (mean, std), batch_hook, gradient_hook
        )
        if epoch_hook is not None:
            record.update(epoch_hook(epoch + 1, model))
        state["history"].append(record)
        state["epoch"] = epoch + 1
        if rewind_epoch is not None and epoch + 1 == rewind_epoch:
            state["rewind_state"] = state_copy(model)
        if checkpoint is not None and distributed.is_main():
            save_training_state(checkpoint, model, optimizer, generator, config, state)
        if progress is not None:
            progress.update(
                task, advance=1, status=f"loss {record['loss']:.3f} acc {100 * record['train_accuracy']:.1f}%"
            )
    accuracy = evaluate(model, data, flip_tta=config.flip_tta)
    if progress is not None:
        progress.update(task, status=f"test acc {100 * accuracy:.2f}%")
    return TrainResult(accuracy=accuracy, history=state["history"], rewind_state=state["rewind_state"])


def _run_epoch(
    forward: nn.Module,
    optimizer: torch.optim.Optimizer,
    data: ImageData,
    config: TrainConfig,
    epoch: int,
    generator: torch.Generator,
    stats: tuple[torch.Tensor, torch.Tensor],
    batch_hook: BatchHook | None,
    gradient_hook: GradientHook | None,
) -> dict[str, float]:
    """One pass over the training data; the host reads loss and accuracy once, at the end."""
    device = data.train_images.device
    mean, std = stats
    steps = math.ceil(data.train_labels.numel() / config.batch_size)
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), dtype=torch.long, device=device)
    seen = torch.zeros((), dtype=torch.long, device=device)
    for step, (images, labels) in enumerate(_batches(data, config.batch_size, generator)):
        if batch_hook is not None:
            images, labels = batch_hook(images, labels, step)
        for group in optimizer.param_groups:
            group["lr"] = config.lr_at(epoch + step / steps)
        inputs = normalize(images, mean, std)
        with autocast(device):
            logits = forward(inputs)
            loss = F.cross_entropy(logits, labels, label_smoothing=config.label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if gradient_hook is not None:
            gradient_hook(forward, inputs, labels)
        optimizer.step()
        loss_sum += loss.detach().float() * labels.numel()
        correct += (logits.argmax(1) == labels).sum()
        seen += labels.numel()
    totals = torch.stack([loss_sum, correct.to(loss_sum.dtype), seen.to(loss_sum.dtype)])
    loss, right, count = distributed.sum_across_processes(totals).tolist()
    return {"epoch": epoch + 1, "loss": loss / count, "train_accuracy": right / count}


def save_training_state(
    path: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator,
    config: TrainConfig,
    state: dict[str, Any],
) -> None:
    """Write the whole training state after an epoch, so that a killed run resumes to the same weights."""
    save_checkpoint(
        path,
        {
            "config": asdict(config),
            "epoch": state["epoch"],
            "history": state["history"],
            "rewind_state": state["rewind_state"],
            "model": state_copy(model),
            "optimizer": optimizer.state_dict(),
            "generator": generator.get_state(),
        },
    )


def _resume(
    path: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator,
    config: TrainConfig,
) -> dict[str, Any]:
    saved = load_checkpoint(path)
    recorded = saved.get("config")
    if not isinstance(recorded, dict) or recorded_training(as_json(recorded)) != as_json(config):
        raise InputError(
            f"checkpoint {path} was written with other training settings; delete it to start over"
        )
    model.load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["optimizer"])
    generator.set_state(saved["generator"])
    return {"epoch": saved["epoch"], "history": saved["history"], "rewind_state": saved["rewind_state"]}

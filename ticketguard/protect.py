"""protect(): V2 and V3 in one retraining. The signature goes into the mask (ME), the trigger set into the
weights (WE with T), and the ticket is retrained once from W_k with both; the result is the protected ticket
to ship and the owner's secret claim.

The claim records everything verification needs from a bare weight file: the QR parameters and regions, the
trigger set with the input normalisation the owner trained with, and the add-on defence's threshold t.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from rich.progress import Progress
from torch import nn

from ticketguard.artifacts.ticket import Ticket
from ticketguard.core.errors import InputError
from ticketguard.core.evidence import DEFAULT_ALPHA, check_alpha
from ticketguard.core.files import prepare_output
from ticketguard.core.masks import Mask
from ticketguard.core.settings import setting
from ticketguard.data import ImageData
from ticketguard.data.augment import normalize
from ticketguard.data.triggers import TriggerSet, keyed_trigger_set, load_trigger_folder
from ticketguard.schemes import signature as v2
from ticketguard.schemes import trigger as v3
from ticketguard.training.fixed_mask import keep_mask
from ticketguard.training.loop import TrainConfig, evaluate, state_copy, train
from ticketguard.verification.align import Reference
from ticketguard.verification.claim import (
    Claim,
    DefenceClaim,
    load_claim,
    save_claim,
    sign,
    stamp,
    ticket_hashes,
)
from ticketguard.verification.defence import DEFENCE_QUANTILE, defence_threshold
from ticketguard.verification.verify import verify

STARTS = ("rewind", "weights")
# Trigger images per batch when none is given: enough that each image of T is seen about TRIGGER_VIEWS times over
# the run, at least 1 and at most 1 per TRIGGER_SHARE data images. On the digits ResNet-20 ticket (benchmarks/
# README.md) 19 views (8 a batch) taught 66-79 % of T, and 5 epochs of Adam left 44-59 %; 77 views (32 a batch)
# taught all of it, and Adam left 98-99 %. The paper's one per batch gives a full CIFAR-10 run (71,162 steps) 711
# views of 100 images.
TRIGGER_VIEWS = 80
TRIGGER_SHARE = 4


def default_per_batch(config: TrainConfig, train_images: int, trigger_images: int) -> int:
    """Trigger images per batch for about TRIGGER_VIEWS views of each over ``config``'s run on ``train_images``,
    within [1, batch size / TRIGGER_SHARE]."""
    steps = math.ceil(train_images / config.batch_size) * config.epochs
    wanted = math.ceil(TRIGGER_VIEWS * trigger_images / steps)
    return max(1, min(wanted, math.ceil(config.batch_size / TRIGGER_SHARE)))

BatchMixer = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
"""(images, labels) -> the same batch with the next trigger images and their labels appended."""
TrainFn = Callable[[nn.Module, BatchMixer], None]
"""A user's training loop for ``protect``: (model, mix_batch) -> None; see ``protect`` for the contract."""


@dataclass(frozen=True)
class SignatureConfig:
    """What to write into the mask (V2): the payload and how its QR code is made and placed."""

    payload: str = setting(help="Text to embed as a QR code in the mask, e.g. ACME-R20-2026.")
    qr_version: int | None = setting(None, help="QR version (default: the smallest that fits).")
    error: str = setting("H", help="QR error-correction level: L, M, Q or H.")
    copies: int = setting(1, help="Copies of the code, each in another conv layer.")
    weights_per_connection: int = setting(
        v2.DEFAULT_WEIGHTS_PER_CONNECTION, help="Kernel weights kept per code connection."
    )
    polarity: str = setting("dark", help="Colour of kept connections: dark (robust to pruning), light or any.")

    def __post_init__(self) -> None:
        if not self.payload:
            raise InputError("the signature payload is empty; give the text to embed, e.g. ACME-R20-2026")
        if self.error.upper() not in ("L", "M", "Q", "H"):
            raise InputError(f"QR error-correction level must be L, M, Q or H, got {self.error!r}")
        if self.qr_version is not None and not 1 <= self.qr_version <= 40:
            raise InputError(f"QR version must lie in 1..40, got {self.qr_version}")


@dataclass(frozen=True)
class TriggerConfig:
    """How T is mixed into training (V3): the set, images per batch, the chance model."""

    trigger: TriggerSet = setting(help="The trigger set T: images and the labels the network learns for them.")
    per_batch: int | None = setting(
        None,
        help=f"Trigger images appended to every batch (default: about {TRIGGER_VIEWS} views of each trigger "
        f"image over the run, at most 1 per {TRIGGER_SHARE} data images).",
    )
    chance_model: str = setting(
        "suspect", help=f"Chance model of the trigger test: {', '.join(v3.CHANCE_MODELS)}."
    )

    def images_per_batch(self, config: TrainConfig, train_images: int) -> int:
        per_batch = self.per_batch
        if per_batch is None:
            per_batch = default_per_batch(config, train_images, len(self.trigger))
        if per_batch < 1:
            raise InputError(f"trigger images per batch must be >= 1, got {per_batch}")
        return per_batch


@dataclass
class Protected:
    """The protected ticket (to ship), the owner's claim (secret) and what the protection measured."""

    ticket: Ticket
    claim: Claim
    report: dict[str, Any] = field(default_factory=dict)

    def save(
        self,
        out: str | Path,
        claim_path: str | Path,
        private_key: Ed25519PrivateKey | None = None,
        force: bool = False,
        tsa_url: str | None = None,
    ) -> None:
        """Write the ticket, then the claim naming its hashes (signed when a key is given, stamped by the RFC 3161
        authority at ``tsa_url`` when one is given).

        Both destinations are checked before anything is written, so a refused save leaves no half pair; a
        TSA that fails still gets the claim written, unstamped, and the error says how to stamp it later.
        """
        out, claim_path = Path(out), Path(claim_path)
        check_destinations(out, claim_path, force)
        self.ticket.save(out)
        self.claim.ticket_files = ticket_hashes(out)
        if private_key is not None:
            sign(self.claim, private_key)
        try:
            if tsa_url is not None:
                stamp(self.claim, tsa_url)
        except InputError as err:
            save_claim(claim_path, self.claim)
            raise InputError(
                f"{err}; the claim {claim_path} was written unstamped: stamp it with "
                f"`ticketguard timestamp {claim_path} --tsa URL`"
            ) from None
        save_claim(claim_path, self.claim)


def check_destinations(out: Path, claim_path: Path, force: bool, extend_claim: bool = False) -> None:
    """Refuse a claim path inside the ticket folder, then check both destinations as every artifact is checked
    (``files.prepare_output``); ``extend_claim``: the existing claim is rewritten on purpose."""
    if out.resolve() == claim_path.resolve() or out.resolve() in claim_path.resolve().parents:
        raise InputError(f"the claim {claim_path} would lie inside the ticket folder {out}; keep it apart")
    prepare_output(claim_path, force or extend_claim, "--claim")
    prepare_output(out, force, "--out", folder=True)


def signature_to_carry(claim_path: Path, ticket_path: Path) -> v2.Signature | None:
    """The signature of an unsigned claim made by embed for this very ticket, which watermark carries over."""
    if not claim_path.exists():
        return None
    existing = load_claim(claim_path)
    if existing.signed is not None:
        raise InputError(
            f"{claim_path} is signed, and extending it would void its signature; use `ticketguard protect` "
            "for both schemes at once, or extend the unsigned claim and sign it after with `ticketguard sign`"
        )
    if existing.ticket_files != ticket_hashes(ticket_path):
        raise InputError(
            f"{claim_path} was made for another ticket than {ticket_path}; choose another --claim"
        )
    return existing.signature


def keyed_trigger_for(ticket: Ticket, seed: int, count: int = 100) -> TriggerSet:
    """A keyed trigger set shaped for the ticket: abstract images with labels drawn from the owner's seed."""
    return keyed_trigger_set(seed, count, ticket.num_classes, ticket.in_channels, tuple(ticket.input_size))


@dataclass(frozen=True)
class TriggerSource:
    """Where the trigger set T comes from: an image folder with its labels, or keyed images from a secret seed."""

    folder: Path | None = setting(None, help="Trigger folder: images (or pics/) + a label file.")
    labels: Path | None = setting(None, help="The trigger folder's label file, if not its only *.txt.")
    seed: int | None = setting(None, help="Secret seed of a keyed trigger set.")
    count: int = setting(100, help="Images in a keyed trigger set.")

    @property
    def given(self) -> bool:
        return self.folder is not None or self.seed is not None

    def load(self, ticket: Ticket) -> TriggerSet:
        """T shaped for the ticket, from the folder or the seed, whichever of the two was given."""
        if self.folder is not None and self.seed is not None:
            raise InputError("give one of --trigger DIR (an image folder) and --trigger-seed N (keyed images)")
        if self.folder is not None:
            shape = tuple(ticket.input_size)
            return load_trigger_folder(self.folder, ticket.in_channels, shape, self.labels, ticket.num_classes)
        if self.seed is None:
            raise InputError("give --trigger DIR (an image folder) or --trigger-seed N (keyed images)")
        return keyed_trigger_for(ticket, self.seed, self.count)


def sign_mask(ticket: Ticket, signing: SignatureConfig) -> tuple[Ticket, v2.Signature, v2.EmbedReport]:
    """ME(M0, s) without retraining: the ticket with the code in its mask and rewind weights W_k on that mask,
    to be trained later (e.g. by ``protect`` with a trigger set). Its weights read back the code, but its
    accuracy is unknown until it is trained."""
    mask, found, embedded = v2.embed_signature(
        ticket.mask, ticket.weights, ticket.rewind, signing.payload, error=signing.error.upper(),
        version=signing.qr_version, copies=signing.copies,
        weights_per_connection=signing.weights_per_connection, polarity=signing.polarity,
    )
    weights = {name: t * mask[name] if name in mask else t.clone() for name, t in ticket.rewind.items()}
    untrained = replace(
        ticket, mask=mask, weights=weights, accuracy=None,
        metadata={**ticket.metadata, "protection": {"trained": False, "embedding": asdict(embedded)}},
    )
    return untrained, found, embedded


def protect(
    ticket: Ticket,
    data: ImageData,
    *,
    signature: SignatureConfig | str | None = None,
    trigger: TriggerConfig | TriggerSet | None = None,
    train_config: TrainConfig | None = None,
    start: str = "rewind",
    device: torch.device | str | None = None,
    progress: Progress | None = None,
    alpha: float = DEFAULT_ALPHA,
    existing: v2.Signature | None = None,
    train_fn: TrainFn | None = None,
    checkpoint: Path | None = None,
) -> Protected:
    """Embed the signature into the mask and train the trigger set in one retraining from W_k (or from the
    ticket's weights with ``start="weights"``); ``train_config`` defaults to the ticket's own.

    ``existing``: the signature already in the ticket's mask (from ``sign_mask``), carried into the claim.
    ``report["self_check"]`` is the verdict of ``verify`` on the result: a protection that its own check
    rejects should not be shipped.

    ``train_fn(model, mix_batch)`` replaces our trainer with the caller's own loop. It gets the model on
    ``device`` in train mode, pruned weights zeroed, and must train it in place, returning nothing:

    - pass every training batch through ``mix_batch(images, labels)`` before the forward pass: it appends the
      next trigger images (``TriggerConfig.per_batch``, by default ``default_per_batch`` of ``train_config``)
      and their labels, in the batch's form: uint8 pixels stay uint8, float inputs get trigger images
      standardised with ``data.normalization()``. Without a trigger set it returns the batch unchanged;
    - feed the model inputs standardised with ``data.normalization()`` (``ticketguard.data.augment.normalize``
      with ``data.channel_stats()``): accuracy, trigger accuracy and every later verification query it so;
    - update weights with ``torch.optim`` optimizers: while ``train_fn`` runs, every optimizer step masks the
      pruned gradients and re-zeroes the pruned weights (``fixed_mask.keep_mask``).

    Afterwards protect refuses a model with any pruned weight not zero, and measures test and trigger
    accuracy itself; ``train_config`` then only sets the trigger share and the trigger order's seed, and
    ``progress`` is not used.

    ``checkpoint``: a file our trainer saves after every epoch and resumes from, so that a killed protection
    loses at most one epoch; it is removed when the retraining ends.
    """
    if signature is None and trigger is None and existing is None:
        raise InputError("nothing to protect with: give a signature, a trigger set, or both")
    if start not in STARTS:
        raise InputError(f"start must be one of {', '.join(STARTS)}, got {start!r}")
    check_alpha(alpha)
    signing = SignatureConfig(signature) if isinstance(signature, str) else signature
    marking = TriggerConfig(trigger) if isinstance(trigger, TriggerSet) else trigger
    _check_data(ticket, data)
    config = train_config or ticket.train_config()
    target = torch.device(device) if device is not None else torch.device("cpu")
    signature_found, report, accuracy_before = existing, {}, ticket.accuracy
    if signing is not None:
        if start == "weights":
            raise InputError(
                "a new signature changes the mask, so training starts from W_k: use start=rewind"
            )
        ticket, signature_found, embedded = sign_mask(ticket, signing)
        report["embedding"] = asdict(embedded)
    elif ticket.metadata.get("protection", {}).get("trained") is False and start == "weights":
        raise InputError(
            "the ticket's mask was signed but never trained, so its weights cannot be fine-tuned"
        )
    mask = ticket.mask
    model = ticket.build_model(start).to(target)
    normalization = data.normalization()
    per_batch = marking.images_per_batch(config, data.train_labels.numel()) if marking is not None else 0
    accuracy, trigger_accuracy, trained_by = _retrain(
        model, data, mask, config, marking, per_batch, progress, train_fn, checkpoint
    )
    if checkpoint is not None:
        checkpoint.unlink(missing_ok=True)
    if signature_found is not None and _lift_code(model, mask, signature_found):
        accuracy, trigger_accuracy = _accuracies(model, data, marking)
    trigger_claim = None
    if marking is not None:
        trigger_claim = v3.TriggerClaim.of(
            marking.trigger, ticket.num_classes, normalization, marking.chance_model,
            accuracy=accuracy, trigger_accuracy=trigger_accuracy,
        )
        report |= {"per_batch": per_batch, "trigger_accuracy": trigger_accuracy}
    weights = state_copy(model)
    protected = replace(
        ticket, mask=mask, weights=weights, accuracy=accuracy, normalization=normalization,
        metadata={**ticket.metadata, "protection": {"trained": True, "start": start, **trained_by,
                                                    "accuracy_before": accuracy_before, **report}},
    )
    threshold = defence_threshold(weights, mask)
    reference = Reference.of(ticket.architecture, ticket.in_channels, ticket.num_classes, weights, mask)
    defence = DefenceClaim(threshold, DEFENCE_QUANTILE)
    claim = Claim(signature_found, {}, trigger_claim, defence, reference)
    self_check = verify(weights, claim, alpha=alpha, model=ticket.architecture)
    report |= {"accuracy_before": accuracy_before, "accuracy": accuracy, "threshold": threshold,
               "self_check": self_check.to_json()}
    return Protected(protected, claim, report)


def _retrain(
    model: nn.Module,
    data: ImageData,
    mask: Mask,
    config: TrainConfig,
    marking: TriggerConfig | None,
    per_batch: int,
    progress: Progress | None,
    train_fn: TrainFn | None,
    checkpoint: Path | None = None,
) -> tuple[float, float | None, dict[str, Any]]:
    """Train ``model`` in place with our trainer or the user's: test and trigger accuracy, what trained it."""
    if train_fn is not None:
        seed = v3.trigger_order_seed(config)
        accuracy, trigger_accuracy = _train_custom(train_fn, model, data, mask, marking, per_batch, seed)
        return accuracy, trigger_accuracy, {"trainer": getattr(train_fn, "__qualname__", repr(train_fn))}
    if marking is None:
        retrained = train(
            model, data, config, mask, progress=progress, description="retrain with signature", checkpoint=checkpoint
        )
        return retrained.accuracy, None, {"epochs": config.epochs}
    marked = v3.watermark(
        model, data, marking.trigger, config, mask, per_batch=per_batch, progress=progress, checkpoint=checkpoint
    )
    return marked.accuracy, marked.trigger_accuracy, {"epochs": config.epochs}


def _lift_code(model: nn.Module, mask: Mask, signature: v2.Signature) -> bool:
    """Raise the code's single-weight connections (linear hosts) above what pruning cuts
    (``v2.raise_code_weights``); True when a weight changed, so accuracy must be measured again."""
    state = state_copy(model)
    raised = v2.raise_code_weights(state, mask, signature)
    if all(torch.equal(raised[region.layer], state[region.layer]) for region in signature.regions):
        return False
    model.load_state_dict(raised)
    return True


def _accuracies(model: nn.Module, data: ImageData, marking: TriggerConfig | None) -> tuple[float, float | None]:
    """Test accuracy, and the trigger set's accuracy when there is one."""
    accuracy = evaluate(model, data)
    if marking is None:
        return accuracy, None
    return accuracy, v3.trigger_accuracy(model, marking.trigger, *data.channel_stats())


def _train_custom(
    train_fn: TrainFn,
    model: nn.Module,
    data: ImageData,
    mask: Mask,
    marking: TriggerConfig | None,
    per_batch: int,
    seed: int,
) -> tuple[float, float | None]:
    """Run a user's training loop under protect's contract (see ``protect``): the mask kept on every
    optimizer step, the trigger set mixed in by ``mix_batch``; returns the test and trigger accuracy after."""
    device = next(model.parameters()).device
    trigger = marking.trigger.to(device) if marking is not None else None
    if trigger is not None and trigger.shape != data.input_shape:
        raise InputError(f"trigger images are {trigger.shape} but the data's inputs are {data.input_shape}")
    model.train()
    with keep_mask(model, mask):
        train_fn(model, _batch_mixer(trigger, per_batch, seed, data))
    revived = mask.revived(dict(model.named_parameters()))
    if revived:
        layers = ", ".join(f"{name} ({count})" for name, count in list(revived.items())[:3])
        raise InputError(
            f"train_fn left {sum(revived.values())} pruned weights non-zero, e.g. in {layers}, so the mask "
            "and its signature no longer hold; update weights only through torch.optim optimizers inside "
            "train_fn, whose steps keep the mask"
        )
    return _accuracies(model, data, marking)


def _batch_mixer(trigger: TriggerSet | None, per_batch: int, seed: int, data: ImageData) -> BatchMixer:
    """``mix_batch`` for a user's loop: our trainer's trigger order and share, in the batch's own form."""
    if trigger is None:
        return lambda images, labels: (images, labels)
    draw = v3.TriggerMixer(trigger, per_batch, seed)
    mean, std = (t.to(trigger.images.device) for t in data.channel_stats())

    def mix_batch(images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if tuple(images.shape[1:]) != trigger.shape or labels.shape != images.shape[:1]:
            raise InputError(
                f"mix_batch takes images (N, {', '.join(map(str, trigger.shape))}) and N labels, got "
                f"{tuple(images.shape)} and {tuple(labels.shape)}"
            )
        if images.dtype != torch.uint8 and not images.is_floating_point():
            raise InputError(f"mix_batch takes uint8 pixels or float model inputs, got {images.dtype}")
        # appending to an empty batch draws the next per_batch trigger images, in our trainer's order
        extra, extra_labels = draw(trigger.images[:0], trigger.labels[:0], 0)
        if images.is_floating_point():
            extra = normalize(extra, mean, std)
        extra_labels = extra_labels.to(labels.device, labels.dtype)
        return torch.cat([images, extra.to(images.device, images.dtype)]), torch.cat([labels, extra_labels])

    return mix_batch


def _check_data(ticket: Ticket, data: ImageData) -> None:
    expected = (ticket.in_channels, *ticket.input_size)
    if tuple(data.input_shape) != expected or data.num_classes != ticket.num_classes:
        raise InputError(
            f"the data set has inputs {data.input_shape} and {data.num_classes} classes, "
            f"but the ticket takes {expected} and {ticket.num_classes}"
        )

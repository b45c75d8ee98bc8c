"""protect(train_fn=...): the owner's own training loop embeds V2 and V3 like our trainer, or is refused."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import trained_ticket
from torch import nn
from torch.optim.optimizer import _global_optimizer_post_hooks, _global_optimizer_pre_hooks

from ticketguard.artifacts.ticket import Ticket
from ticketguard.core.errors import InputError
from ticketguard.data import ImageData
from ticketguard.data.augment import normalize
from ticketguard.protect import BatchMixer, TrainFn, TriggerConfig, keyed_trigger_for, protect
from ticketguard.schemes import signature as v2

PAYLOAD = "OWNER-7"
TRIGGERS = 10


@pytest.fixture(scope="module")
def data(digits: ImageData) -> ImageData:
    return digits.subset(30, 15, 0)


@pytest.fixture(scope="module")
def ticket(data: ImageData) -> Ticket:
    return trained_ticket(data, seed=0)


def adam_loop(data: ImageData, epochs: int = 5) -> TrainFn:
    """What an owner writes: a plain Adam loop over their data, every batch passed through ``mix_batch``."""
    mean, std = data.channel_stats()

    def my_train(model: nn.Module, mix_batch: BatchMixer) -> None:
        optimizer = torch.optim.Adam(model.parameters(), lr=3e-3, weight_decay=1e-4)
        generator = torch.Generator().manual_seed(0)
        for _ in range(epochs):
            order = torch.randperm(data.train_labels.numel(), generator=generator)
            for batch in order.split(64):
                inputs = normalize(data.train_images[batch], mean, std)
                images, labels = mix_batch(inputs, data.train_labels[batch])
                loss = F.cross_entropy(model(images), labels)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()

    return my_train


def test_an_adam_loop_embeds_a_decodable_signature_and_learns_the_trigger_set(
    ticket: Ticket, data: ImageData
) -> None:
    hooks = len(_global_optimizer_pre_hooks), len(_global_optimizer_post_hooks)
    trigger = TriggerConfig(keyed_trigger_for(ticket, 3, TRIGGERS), per_batch=8)
    result = protect(ticket, data, signature=PAYLOAD, trigger=trigger, train_fn=adam_loop(data))
    weights, mask = result.ticket.weights, result.ticket.mask
    assert (len(_global_optimizer_pre_hooks), len(_global_optimizer_post_hooks)) == hooks  # none left behind
    assert not mask.revived(weights)
    assert v2.extract(weights, result.claim.signature).decoded.text == PAYLOAD
    assert result.report["trigger_accuracy"] > 0.5  # chance is 0.1 on 10 classes
    assert result.report["accuracy"] > 0.5
    assert result.report["self_check"]["owned"]
    assert result.ticket.metadata["protection"]["trainer"].endswith("my_train")


def test_a_loop_that_revives_pruned_weights_is_refused(ticket: Ticket, data: ImageData) -> None:
    seen = []

    def careless(model: nn.Module, mix_batch: BatchMixer) -> None:
        images, labels = mix_batch(data.train_images[:16], data.train_labels[:16])
        seen.append((images.dtype, images.shape[0], labels.shape[0]))
        with torch.no_grad():
            for weight in model.parameters():
                weight.add_(0.01)  # a hand-written update, outside any optimizer step

    trigger = TriggerConfig(keyed_trigger_for(ticket, 3, TRIGGERS), per_batch=4)
    with pytest.raises(InputError, match="pruned weights non-zero.*torch.optim optimizers"):
        protect(ticket, data, signature=PAYLOAD, trigger=trigger, train_fn=careless)
    assert seen == [(torch.uint8, 20, 20)]  # uint8 pixels get uint8 trigger images appended


def test_mix_batch_refuses_images_of_another_shape(ticket: Ticket, data: ImageData) -> None:
    def wrong_size(model: nn.Module, mix_batch: BatchMixer) -> None:
        mix_batch(torch.zeros(4, 1, 16, 16), torch.zeros(4, dtype=torch.long))

    trigger = TriggerConfig(keyed_trigger_for(ticket, 3, TRIGGERS), per_batch=4)
    with pytest.raises(InputError, match=r"mix_batch takes images \(N, 1, 8, 8\)"):
        protect(ticket, data, trigger=trigger, train_fn=wrong_size)

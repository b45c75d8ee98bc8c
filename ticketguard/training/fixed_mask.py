"""Keep a mask M fixed while any torch optimizer trains N[W, M]: the pruned weights stay exactly zero.

``torch.nn.utils.prune`` recomputes ``weight = weight_orig * mask`` in every forward pass and keeps a second
copy of every weight; here the weights stay plain tensors and optimizer step hooks do the work instead: the
pruned gradients are zeroed before each step (so momentum, Adam moments and layer-wise norms never see them)
and the pruned weights re-zeroed after it (so weight decay or any other update cannot revive them), each with
one fused multiply over all masked tensors.
"""

from __future__ import annotations

from collections.abc import Iterable
from types import TracebackType
from typing import Any, Self

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook
from torch.utils.hooks import RemovableHandle

from ticketguard.core.errors import InputError
from ticketguard.core.masks import Mask


class MaskKeeper:
    """M held fixed across optimizer steps; use through ``keep_mask``. ``enforce()`` re-zeroes on demand."""

    def __init__(
        self,
        model: nn.Module,
        mask: Mask,
        optimizers: Iterable[torch.optim.Optimizer] | None = None,
        mask_gradients: bool = True,
    ) -> None:
        params = dict(model.named_parameters())
        mask.check_matches(params)
        self.mask = mask
        self.params = [params[name] for name in mask]
        self.optimizers = list(optimizers) if optimizers is not None else None
        for optimizer in self.optimizers or []:
            if not isinstance(optimizer, torch.optim.Optimizer):
                raise InputError(
                    f"keep_mask hooks into torch.optim.Optimizer steps, got a {type(optimizer).__name__}; "
                    "call keeper.enforce() after each of its steps instead"
                )
        self.mask_gradients = mask_gradients
        self.handles: list[RemovableHandle] = []
        self._fit_factors()

    def _fit_factors(self) -> None:
        """0/1 factors in each weight's device, dtype and memory layout, so the fused multiply stays fast."""
        self.factors = [torch.empty_like(p).copy_(self.mask[n]) for p, n in zip(self.params, self.mask)]

    def _check_placement(self) -> None:
        """Refit the factors if the model was moved or cast inside the context (seen on its first weight)."""
        if not self.params:
            return
        weight, factor = self.params[0], self.factors[0]
        if (weight.device, weight.dtype) != (factor.device, factor.dtype):
            self._fit_factors()

    @torch.no_grad()
    def enforce(self) -> None:
        """W <- W * M over every masked weight."""
        if self.params:
            self._check_placement()
            torch._foreach_mul_(self.params, self.factors)

    @torch.no_grad()
    def _zero_pruned_gradients(self, *_: Any) -> None:
        self._check_placement()
        pairs = [(p.grad, f) for p, f in zip(self.params, self.factors) if p.grad is not None]
        if pairs:
            grads, factors = zip(*pairs)
            torch._foreach_mul_(list(grads), list(factors))

    def _zero_pruned_weights(self, *_: Any) -> None:
        self.enforce()

    def __enter__(self) -> Self:
        self.enforce()
        if self.optimizers is None:
            self._hook(register_optimizer_step_pre_hook, register_optimizer_step_post_hook)
        for optimizer in self.optimizers or []:
            self._hook(optimizer.register_step_pre_hook, optimizer.register_step_post_hook)
        return self

    def _hook(self, register_pre: Any, register_post: Any) -> None:
        if self.mask_gradients:
            self.handles.append(register_pre(self._zero_pruned_gradients))
        self.handles.append(register_post(self._zero_pruned_weights))

    def close(self) -> None:
        """Remove every hook; safe to call twice."""
        for handle in self.handles:
            handle.remove()
        self.handles.clear()

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.close()


def keep_mask(
    model: nn.Module,
    mask: Mask,
    optimizers: Iterable[torch.optim.Optimizer] | None = None,
    *,
    mask_gradients: bool = True,
) -> MaskKeeper:
    """A context in which ``mask`` stays fixed on ``model``, whatever the training loop.

    On entry the pruned weights are zeroed; then around every ``step()`` of the given ``optimizers`` (or, with
    ``None``, of every ``torch.optim.Optimizer`` in the process while the context is open) the pruned
    gradients are zeroed before the step (``mask_gradients``; after any gradient clipping, which therefore
    sees them) and the pruned weights re-zeroed after it. The hooks are removed on exit, also on an
    exception. Updates made outside an optimizer step (a hand-written ``p -= lr * p.grad``) are not covered:
    call ``keeper.enforce()`` after them.

        with keep_mask(model, mask):
            for images, labels in loader:
                ...; loss.backward(); optimizer.step()
    """
    return MaskKeeper(model, mask, optimizers, mask_gradients)

"""Cost of keeping a mask fixed: ``keep_mask``'s optimizer hooks vs an unmasked step vs torch.nn.utils.prune.

One training step (forward, backward, SGD with momentum and weight decay, as our trainer) of ResNet-20 on a
random CIFAR-shaped batch, with a magnitude mask at ``--density``. Variants run interleaved, ``--rounds``
times ``--steps`` steps each after a warm-up, and the median time per step is reported, so that other work on
the machine hits every variant alike. ``optimizer.step()`` is also timed alone (the hooks run inside it), and
the re-zeroing multiply by itself, as on a busy machine they are smaller than the noise of a whole step.
Prints a markdown table.

    python benchmarks/mask_hook_overhead.py --batch-size 128 --steps 10 --rounds 5
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from contextlib import ExitStack

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import prune

from ticketguard.core.masks import Mask, magnitude_prune, prunable_names
from ticketguard.models import build_model
from ticketguard.training.fixed_mask import keep_mask
from ticketguard.training.loop import resolve_device, state_copy

Step = Callable[[], None]


def sgd(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)


def training_step(
    model: nn.Module, optimizer: torch.optim.Optimizer, batch: tuple[torch.Tensor, torch.Tensor]
) -> Step:
    images, labels = batch

    def step() -> None:
        loss = F.cross_entropy(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def variants(
    initial: dict[str, torch.Tensor], mask: Mask, batch: tuple[torch.Tensor, torch.Tensor], stack: ExitStack
) -> dict[str, tuple[Step, torch.optim.Optimizer, nn.Module]]:
    """Each variant's training step, optimizer and copy of the same model; ``stack`` holds masks open."""
    device = batch[0].device
    built: dict[str, tuple[Step, torch.optim.Optimizer, nn.Module]] = {}
    for name in ("unmasked", "keep_mask, re-zero (our trainer)", "keep_mask, re-zero + mask gradients",
                 "keep_mask, global hook", "torch.nn.utils.prune"):
        model = build_model("resnet20", 3, 10).to(device)
        model.load_state_dict(initial)
        if name == "torch.nn.utils.prune":
            for weight in mask:
                module, attribute = weight.rsplit(".", 1)
                prune.custom_from_mask(model.get_submodule(module), attribute, mask[weight].to(device))
        optimizer = sgd(model)
        if name.startswith("keep_mask, re-zero"):
            stack.enter_context(keep_mask(model, mask, [optimizer], mask_gradients="gradients" in name))
        elif name == "keep_mask, global hook":
            stack.enter_context(keep_mask(model, mask))
        built[name] = (training_step(model, optimizer, batch), optimizer, model)
    return built


def time_steps(step: Step, steps: int, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--density", type=float, default=0.3, help="fraction of prunable weights kept")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    device = resolve_device(args.device)
    torch.manual_seed(0)
    model = build_model("resnet20", 3, 10)
    initial = state_copy(model)
    mask = magnitude_prune(initial, Mask.ones_like(initial, prunable_names(model)), 1 - args.density)
    batch = (torch.randn(args.batch_size, 3, 32, 32, device=device),
             torch.randint(0, 10, (args.batch_size,), device=device))
    with ExitStack() as stack:
        built = variants(initial, mask, batch, stack)
        steps: dict[str, list[float]] = {name: [] for name in built}
        updates: dict[str, list[float]] = {name: [] for name in built}
        for step, _, _ in built.values():
            time_steps(step, 3, device)  # warm-up: allocator, kernels, optimizer state
        for _ in range(args.rounds):
            for name, (step, optimizer, _) in built.items():
                steps[name].append(time_steps(step, args.steps, device))
                updates[name].append(time_steps(optimizer.step, 10 * args.steps, device))  # last gradients
        for name, (_, _, trained) in built.items():
            if name.startswith("keep_mask"):
                assert not mask.revived(dict(trained.named_parameters())), name
        enforce = keep_mask(built["unmasked"][2], mask).enforce  # last: it zeroes the unmasked model
        rezero = statistics.median(time_steps(enforce, 100, device) for _ in range(args.rounds))
    step_base, update_base = statistics.median(steps["unmasked"]), statistics.median(updates["unmasked"])
    print(f"ResNet-20, batch {args.batch_size}, density {args.density}, {device}, torch {torch.__version__}, "
          f"median of {args.rounds} rounds x {args.steps} steps\n")
    print("| variant | ms / training step | vs unmasked | ms / optimizer.step() | vs unmasked |")
    print("|---|---|---|---|---|")
    for name in built:
        step, update = statistics.median(steps[name]), statistics.median(updates[name])
        print(f"| {name} | {1000 * step:.1f} | {step / step_base:.3f}x | {1000 * update:.2f} | "
              f"{update / update_base:.2f}x |")
    print(f"\nThe re-zeroing multiply alone (the post-step hook's work): {1000 * rezero:.3f} ms, "
          f"{100 * rezero / step_base:.3f} % of an unmasked training step.")


if __name__ == "__main__":
    main()

"""Training throughput (images/s): ticketguard's trainer vs a classic CIFAR loop, same model, data and mask.

The baseline is what most CIFAR reference code does: a torch DataLoader over per-sample PIL transforms
(random crop with 4-pixel padding, horizontal flip, to-tensor, normalise), fp32, contiguous tensors, the
mask re-applied layer by layer after each step, and ``loss.item()`` every step.

    python benchmarks/throughput.py --model resnet20 --epochs 2
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from ticketguard.core.masks import Mask, magnitude_prune, prunable_names
from ticketguard.data import ImageData
from ticketguard.data.cifar import load_image_folder
from ticketguard.models import build_model
from ticketguard.training.loop import TrainConfig, resolve_device, train

CIFAR_JPEG = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "cifar10-jpeg" / "cifar10-jpeg.tar.gz"


class PerSampleCifar(Dataset):
    """PIL images with per-sample transforms, as torchvision's CIFAR10 + transforms.Compose would give."""

    def __init__(self, data: ImageData) -> None:
        self.images = [Image.fromarray(x.permute(1, 2, 0).numpy()) for x in data.train_images]
        self.labels = data.train_labels.tolist()
        mean, std = data.channel_stats()
        self.mean, self.std = mean.view(-1, 1, 1), std.view(-1, 1, 1)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = self.images[index]
        padded = Image.new(image.mode, (image.width + 8, image.height + 8))
        padded.paste(image, (4, 4))
        left, top = random.randint(0, 8), random.randint(0, 8)
        image = padded.crop((left, top, left + 32, top + 32))
        if random.random() < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        tensor = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1)
        return (tensor - self.mean) / self.std, self.labels[index]


def baseline_epoch(model: torch.nn.Module, loader: DataLoader, mask: Mask, device: torch.device) -> float:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    params = dict(model.named_parameters())
    model.train()
    running = 0.0
    for images, labels in loader:
        images, labels = images.to(device), labels.to(device)
        loss = F.cross_entropy(model(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            for name, keep in mask.items():
                params[name].mul_(keep.to(device))
        running += loss.item()
    return running


def timed(fn, repeats: int) -> float:
    fn()  # warm-up: allocator, kernels, worker start-up
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--epochs", type=int, default=2, help="timed epochs per variant (after one warm-up)")
    parser.add_argument("--per-class", type=int, default=256, help="training images per class")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers of the baseline")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--compile", action="store_true", help="also time the trainer under torch.compile")
    args = parser.parse_args()

    device = resolve_device(args.device)
    data = load_image_folder(CIFAR_JPEG, name="cifar10", per_class=args.per_class)
    data = data.subset(None, 1)  # evaluation is not what is measured
    images = data.train_labels.numel()
    torch.manual_seed(0)
    model = build_model(args.model).to(device)
    params = {k: v.detach() for k, v in model.named_parameters()}
    mask = magnitude_prune(params, Mask.ones_like(params, prunable_names(model)), 0.8)
    state = {k: v.clone() for k, v in model.state_dict().items()}

    def ours(compiled: bool = False) -> None:
        model.load_state_dict(state)
        train(model, data, TrainConfig(epochs=1, batch_size=args.batch_size, compile=compiled), mask)

    loader = DataLoader(
        PerSampleCifar(data), batch_size=args.batch_size, shuffle=True, num_workers=args.workers,
        persistent_workers=args.workers > 0,
    )

    def baseline() -> None:
        model.load_state_dict(state)
        model.to(memory_format=torch.contiguous_format)
        baseline_epoch(model, loader, mask, device)

    seconds_ours = timed(ours, args.epochs)
    seconds_base = timed(baseline, args.epochs)
    seconds_compiled = timed(lambda: ours(compiled=True), args.epochs) if args.compile else None
    print(f"{args.model}, batch {args.batch_size}, {images} CIFAR-10 JPEG images, device {device}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'variant':<36}{'s/epoch':>10}{'images/s':>12}")
    print(f"{'ticketguard trainer':<36}{seconds_ours:>10.2f}{images / seconds_ours:>12.0f}")
    print(f"{f'baseline (DataLoader, {args.workers} workers)':<36}{seconds_base:>10.2f}{images / seconds_base:>12.0f}")
    if seconds_compiled is not None:
        print(f"{'ticketguard trainer, --compile':<36}{seconds_compiled:>10.2f}{images / seconds_compiled:>12.0f}")
        print(f"speed-up with --compile: {seconds_base / seconds_compiled:.2f}x")
    print(f"speed-up: {seconds_base / seconds_ours:.2f}x")


if __name__ == "__main__":
    main()

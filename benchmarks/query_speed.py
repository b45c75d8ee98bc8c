"""Time black-box trigger queries over loopback HTTP against ``ticketguard serve`` in a separate process.

    python benchmarks/query_speed.py --queries 100 --repeats 5

For each input shape (digits 1x8x8, CIFAR 3x32x32), a ResNet-20 ticket at 20 % density is served by the CLI
on an OS-chosen port; the client sends the trigger images one per request (100 HTTP round trips) and all in
one request, over the Open Inference Protocol v2. Prediction cost does not depend on training, so the
tickets keep their initial weights.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from rich.table import Table

from ticketguard.artifacts.ticket import Ticket
from ticketguard.cli.output import console
from ticketguard.core.masks import Mask, magnitude_prune, prunable_names
from ticketguard.data.triggers import keyed_trigger_set
from ticketguard.models import build_model
from ticketguard.training.loop import state_copy
from ticketguard.verification.blackbox import Endpoint, query_labels

SHAPES = {"digits 1x8x8": (1, 8), "cifar 3x32x32": (3, 32)}


def _ticket(folder: Path, channels: int, size: int) -> Path:
    model = build_model("resnet20", channels, 10)
    params = {k: v.detach() for k, v in model.named_parameters()}
    mask = magnitude_prune(params, Mask.ones_like(params, prunable_names(model)), 0.8)
    mask.apply_(model)
    weights = state_copy(model)
    stats = {"mean": [0.5] * channels, "std": [0.25] * channels}
    ticket = Ticket(
        "resnet20",
        channels,
        10,
        (size, size),
        "folder",
        [str(c) for c in range(10)],
        mask,
        weights,
        weights,
        metadata={"normalization": stats},
    )
    return ticket.save(folder)


def _serve(ticket: Path) -> tuple[subprocess.Popen, str]:
    child = subprocess.Popen(
        [sys.executable, "-m", "ticketguard", "serve", str(ticket), "--port", "0"],
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "COLUMNS": "300"},
    )
    for line in child.stderr:
        found = re.search(r"(http://127\.0\.0\.1:\d+)", line)
        if found:
            return child, found.group(1)
    raise RuntimeError("the server exited before it listened")


def _time(endpoint: Endpoint, images: torch.Tensor, repeats: int) -> float:
    query_labels(endpoint, images)  # warm-up: connection, first inference
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        labels = query_labels(endpoint, images)
        times.append(time.perf_counter() - started)
        assert labels.numel() == images.shape[0]
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    table = Table(title=f"{args.queries} trigger queries over loopback HTTP (median of {args.repeats})")
    for column in ("input", "requests", "wall time", "per image"):
        table.add_column(column, justify="right")
    with tempfile.TemporaryDirectory() as tmp:
        for label, (channels, size) in SHAPES.items():
            child, url = _serve(_ticket(Path(tmp) / label.split()[0], channels, size))
            try:
                images = keyed_trigger_set(0, args.queries, 10, channels, (size, size)).images
                for batch in (1, args.queries):
                    seconds = _time(Endpoint(url, batch_size=batch), images, args.repeats)
                    requests = -(-args.queries // batch)
                    table.add_row(
                        label,
                        str(requests),
                        f"{seconds * 1000:.0f} ms",
                        f"{seconds / args.queries * 1000:.2f} ms",
                    )
            finally:
                child.terminate()
                child.wait(timeout=30)
    console.print(table)


if __name__ == "__main__":
    main()

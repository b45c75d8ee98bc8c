"""Independent jobs (seeds, attack-grid points) in parallel: a local process pool, or Ray tasks on a cluster.

IMP rounds are sequential, so small models gain most from running many whole jobs at once. Each job is a
module-level function called with its keyword arguments plus ``device``; results come back in job order.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.progress import Progress

from ticketguard.core.errors import InputError
from ticketguard.data import ImageData, load_subset
from ticketguard.search.config import SearchConfig
from ticketguard.search.imp import find_extreme_ticket
from ticketguard.training import distributed


def job_devices(count: int) -> list[str]:
    """One device per job slot: the visible GPUs in turn, or the CPU."""
    gpus = torch.cuda.device_count()
    return [f"cuda:{i % gpus}" for i in range(count)] if gpus else ["cpu"] * count


def _limit_threads(threads: int) -> None:
    torch.set_num_threads(threads)


def run_jobs(
    function: Callable[..., Any],
    jobs: Sequence[dict[str, Any]],
    workers: int = 1,
    ray_address: str | None = None,
) -> list[Any]:
    """Run ``function(**job, device=...)`` for every job; in this process, a process pool, or on Ray."""
    if workers < 1:
        raise InputError(f"--workers must be >= 1, got {workers}")
    if ray_address is not None:
        return _run_on_ray(function, jobs, ray_address)
    devices = job_devices(len(jobs))
    if workers == 1 or len(jobs) <= 1:
        return [function(**job, device=device) for job, device in zip(jobs, devices)]
    threads = max(1, (os.cpu_count() or 1) // workers)
    with ProcessPoolExecutor(
        max_workers=workers,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=_limit_threads,
        initargs=(threads,),
    ) as pool:
        futures = [pool.submit(function, **job, device=device) for job, device in zip(jobs, devices)]
        return [future.result() for future in futures]


def _run_on_ray(function: Callable[..., Any], jobs: Sequence[dict[str, Any]], address: str) -> list[Any]:
    """One Ray task per job, each asking for one GPU when the cluster has them."""
    try:
        import ray
    except ImportError:
        raise InputError("--ray needs the optional extra: pip install 'ticketguard[ray]'") from None
    ray.init(address=address, ignore_reinit_error=True, log_to_driver=False)
    gpus = 1 if ray.cluster_resources().get("GPU", 0) else 0
    task = ray.remote(num_gpus=gpus)(function)
    device = "cuda" if gpus else "cpu"
    return ray.get([task.remote(**job, device=device) for job in jobs])


@dataclass(frozen=True)
class DataSource:
    """What a search job needs to load its data in its own process."""

    name: str
    folder: Path | None = None
    download: bool = False
    train_per_class: int | None = None
    test_per_class: int | None = None

    def load(self, seed: int) -> ImageData:
        return load_subset(self.name, self.folder, self.train_per_class, self.test_per_class, seed, self.download)


def search_job(
    source: DataSource,
    config: SearchConfig,
    out: Path,
    restart: bool,
    device: str,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """One whole extreme-ticket search into ``out``; returns the ticket's summary (main process only writes)."""
    dataset = source.load(config.train.seed)
    ticket = find_extreme_ticket(dataset, config, out / "search", torch.device(device), progress, restart)
    if distributed.is_main():
        ticket.save(out)
    return {"out": str(out), "seed": config.train.seed, "accuracy": ticket.accuracy,
            "dense_accuracy": ticket.metadata["dense_accuracy"], "density": ticket.mask.density(),
            "pruning_spec": ticket.metadata["search"]["counts"]}

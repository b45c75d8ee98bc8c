"""Data parallelism under torchrun: one process per device, gradients averaged by DistributedDataParallel.

Outside torchrun (no WORLD_SIZE in the environment) everything here is a no-op, so the single-device path is
the same code.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def init_from_environment() -> None:
    """Join the process group torchrun describes: NCCL between GPUs, gloo on CPUs."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend)


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def is_main() -> bool:
    """Only the main process writes files and prints."""
    return rank() == 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def local_device(requested: torch.device) -> torch.device:
    """Under torchrun each process takes the GPU of its local rank."""
    if dist.is_initialized() and requested.type == "cuda":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return requested


def sum_across_processes(tensor: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(tensor)
    return tensor

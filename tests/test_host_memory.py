"""The trainer's heap setting: freed activations are reused instead of being faulted in again."""

from __future__ import annotations

import subprocess
import sys

import pytest

FAULTS_PER_STEP = """
import resource, statistics, torch
import torch.nn.functional as F
from ticketguard.models import build_model
from ticketguard.training.host_memory import keep_freed_memory

torch.manual_seed(0)
model = build_model("resnet20").to(memory_format=torch.channels_last)
images = torch.randn(128, 3, 32, 32).contiguous(memory_format=torch.channels_last)
labels = torch.randint(0, 10, (128,))
optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)

def step_faults() -> int:
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    optimizer.zero_grad(set_to_none=True)
    F.cross_entropy(model(images), labels).backward()
    optimizer.step()
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

def faults_per_step() -> float:
    for _ in range(2):  # warm-up
        step_faults()
    # the median step: a step that grows the heap for good faults in its new pages once under any setting
    return statistics.median(step_faults() for _ in range(7))

glibc_default = faults_per_step()
applied = keep_freed_memory(torch.device("cpu"))
print(applied, glibc_default, faults_per_step())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the setting is glibc's")
def test_training_steps_stop_faulting_in_their_activations() -> None:
    # a fresh process: the setting is process-wide and other tests have trained already
    done = subprocess.run(
        [sys.executable, "-c", FAULTS_PER_STEP], capture_output=True, text=True, check=True, timeout=300
    )
    applied, glibc_default, kept = done.stdout.split()
    assert applied == "True"
    assert float(glibc_default) > 1000  # freed activations handed back to the system and faulted in again
    assert float(kept) < float(glibc_default) / 10

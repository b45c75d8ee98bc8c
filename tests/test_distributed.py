"""A 2-process gloo run under torchrun on this CPU gives the single-process result within tolerance."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ARGS = ["find", "--epochs", "8", "--rewind-epoch", "1", "--ratios", "0.5", "--max-rounds", "1", "--device", "cpu"]


def _history(out: Path) -> list[dict]:
    return json.loads((out / "ticket.json").read_text())["metadata"]["search"]["history"]


@pytest.mark.slow
def test_two_process_search_matches_single_process(tmp_path: Path) -> None:
    env = {"OMP_NUM_THREADS": "1", "PATH": str(Path(sys.executable).parent)}
    single, parallel = tmp_path / "single", tmp_path / "parallel"
    subprocess.run([sys.executable, "-m", "ticketguard", *ARGS, "--out", str(single)], check=True,
                   capture_output=True, env=env, timeout=600)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    done = subprocess.run([*torchrun, "-m", "ticketguard", *ARGS, "--out", str(parallel)],
                          check=False, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    one, two = _history(single), _history(parallel)
    assert [h["round"] for h in one] == [h["round"] for h in two] == [0, 1]
    for a, b in zip(one, two):
        assert b["density"] == pytest.approx(a["density"], abs=1e-4)
        assert b["accuracy"] == pytest.approx(a["accuracy"], abs=0.04)
        assert b["accuracy"] > 0.9
    assert done.stderr.count("ticket written to") == 1
    assert sorted(p.name for p in (parallel / "search" / "rounds").iterdir()) == sorted(
        p.name for p in (single / "search" / "rounds").iterdir())

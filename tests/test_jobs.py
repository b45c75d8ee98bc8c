import json
import os
from pathlib import Path

import pytest
import torch

from ticketguard.cli import main
from ticketguard.core.errors import InputError
from ticketguard.search.jobs import run_jobs


def describe(index: int, device: str) -> dict:
    return {"index": index, "device": device, "pid": os.getpid(), "threads": torch.get_num_threads()}


def test_process_pool_runs_jobs_elsewhere_and_keeps_their_order() -> None:
    results = run_jobs(describe, [{"index": i} for i in range(4)], workers=2)
    assert [r["index"] for r in results] == [0, 1, 2, 3]
    assert all(r["device"] == "cpu" for r in results)
    pids = {r["pid"] for r in results}
    assert os.getpid() not in pids and 1 <= len(pids) <= 2
    assert all(r["threads"] == max(1, (os.cpu_count() or 1) // 2) for r in results)


def test_one_worker_runs_in_this_process() -> None:
    assert [r["pid"] for r in run_jobs(describe, [{"index": 0}, {"index": 1}])] == [os.getpid()] * 2
    with pytest.raises(InputError, match="workers"):
        run_jobs(describe, [{"index": 0}], workers=0)


def test_find_with_seeds_writes_one_ticket_per_seed(tmp_path: Path) -> None:
    argv = ["find", "--out", str(tmp_path), "--epochs", "2", "--rewind-epoch", "1", "--ratios", "0.5",
            "--max-rounds", "1", "--train-per-class", "20", "--seeds", "3,4", "--workers", "2"]
    assert main(argv) == 0
    seeds = [json.loads((tmp_path / f"seed-{s}" / "ticket.json").read_text())["metadata"]["config"]["train"]["seed"]
             for s in (3, 4)]
    assert seeds == [3, 4]
    assert main(["find", "--workers", "2", "--out", str(tmp_path / "x")]) == 2


def test_ray_tasks_run_jobs_on_a_local_cluster() -> None:
    ray = pytest.importorskip("ray")
    tests = str(Path(__file__).parent)  # so that Ray's workers can import this module's job function
    ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": {"PYTHONPATH": tests}})
    try:
        results = run_jobs(describe, [{"index": i} for i in range(3)], ray_address="local")
    finally:
        ray.shutdown()
    assert [r["index"] for r in results] == [0, 1, 2] and all(r["device"] == "cpu" for r in results)

"""Record IMP's whole descent on digits, so that matching rules can be compared on the same trainings.

For each seed: the seed's validation split, ``--dense`` dense networks trained on it (the first one's W_k is the
rewind point, the others differ in initialisation and batch order), then pruning rounds at a fixed ratio from the
previous round down to ``--floor`` density, every round rewound to W_k and retrained. Each network's per-image
correctness on the validation and test images is saved to ``OUT/seed-S.safetensors`` and its accuracies to
``OUT/seed-S.json``; no matching decision is taken, so a rule's end point is read off afterwards. Seeds already
recorded in OUT are read back, not rerun.

The script then prints where each rule ends the descent (the last round before the rule's first failure) for
every seed, and the spread of those ends in pruning steps, log(max / min) / log(1 / (1 - ratio)):

- ``find``: ``ticketguard find``'s decision, the paired test against the first dense network at the margin the
  seed's validation split resolves;
- ``find, pooled``: the same test against the mean of the seed's dense networks (per image, the share of them
  that is right), at the margin their mean error count resolves; the bound is Agresti and Min's with the
  squared per-image differences in place of the discordant count;
- ``test, pooled, w, -x``: a rule no search can use, there to show how much of the spread is training
  noise: the same 360 test images for every seed, the mean of the dense networks as reference, and the mean
  difference of the last w rounds below -x points as failure.

    OMP_NUM_THREADS=1 python benchmarks/search_descent.py --seeds 0,1,2,3 --jobs 2
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from scipy.stats import norm

from ticketguard.core.files import load_tensors, save_tensors
from ticketguard.core.masks import Mask, magnitude_prune, prunable_names
from ticketguard.data import dataset_spec, load_dataset
from ticketguard.models import build_model
from ticketguard.search.config import SearchConfig
from ticketguard.search.imp import paired_test, resolution
from ticketguard.search.jobs import run_jobs
from ticketguard.training.loop import TrainConfig, predict_labels, state_copy, train

EXTRA_DENSE_SEED = 1000


def descend(
    seed: int, dense: int, ratio: float, floor: float, fraction: float, out: Path, device: str
) -> dict[str, Any]:
    data = load_dataset("digits").to(device)
    fit, held = data.split_validation(fraction, seed)
    stats = fit.channel_stats()
    held_on = held.to(data.train_labels.device)
    images, labels = data.train_images[held_on], data.train_labels[held_on]
    config = TrainConfig(epochs=dataset_spec("digits").default_epochs, seed=seed)

    def correct(model: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        return (predict_labels(model, images, *stats) == labels.cpu(),
                predict_labels(model, fit.test_images, *stats) == fit.test_labels.cpu())

    tensors: dict[str, torch.Tensor] = {}
    record: dict[str, Any] = {"seed": seed, "ratio": ratio, "validation_images": int(held.numel()), "rounds": []}
    started = time.perf_counter()

    def train_dense(k: int) -> tuple[torch.nn.Module, dict[str, torch.Tensor] | None]:
        run_seed = seed if k == 0 else EXTRA_DENSE_SEED * k + seed
        torch.manual_seed(run_seed)
        model = build_model("resnet20", fit.input_shape[0], fit.num_classes).to(device)
        result = train(model, fit, replace(config, seed=run_seed), rewind_epoch=SearchConfig.rewind_epoch)
        tensors[f"dense{k}.validation"], tensors[f"dense{k}.test"] = correct(model)
        return model, result.rewind_state

    model, rewind = train_dense(0)
    assert rewind is not None
    weights = state_copy(model)
    mask = Mask.ones_like(weights, prunable_names(model, False, ()))
    for k in range(1, dense):
        train_dense(k)
    round_index = 0
    while mask.density() > floor:
        round_index += 1
        mask = magnitude_prune(weights, mask, ratio)
        model = build_model("resnet20", fit.input_shape[0], fit.num_classes)
        model.load_state_dict(rewind)
        model.to(device)
        train(model, fit, config, mask)
        weights = state_copy(model)
        validation, test = correct(model)
        tensors[f"round{round_index}.validation"], tensors[f"round{round_index}.test"] = validation, test
        row = {"density": mask.density(), "validation": float(validation.float().mean()),
               "test": float(test.float().mean())}
        record["rounds"].append(row)
        print(f"seed {seed} round {round_index}: {100 * row['density']:.3f} % validation "
              f"{100 * row['validation']:.2f} test {100 * row['test']:.2f}", flush=True)
    record["seconds"] = time.perf_counter() - started
    out.mkdir(parents=True, exist_ok=True)
    save_tensors(out / f"seed-{seed}.safetensors", {k: v.to(torch.uint8) for k, v in tensors.items()})
    (out / f"seed-{seed}.json").write_text(json.dumps(record, indent=2) + "\n")
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="0,1,2,3")
    parser.add_argument("--dense", type=int, default=3, help="dense networks per seed")
    parser.add_argument("--ratio", type=float, default=0.2)
    parser.add_argument("--floor", type=float, default=0.0012, help="stop below this density")
    parser.add_argument("--validation-fraction", type=float, default=0.2)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("runs/search-descent"))
    args = parser.parse_args()
    jobs = [{"seed": int(s), "dense": args.dense, "ratio": args.ratio, "floor": args.floor,
             "fraction": args.validation_fraction, "out": args.out} for s in args.seeds.split(",")]
    todo = [job for job in jobs if not (args.out / f"seed-{job['seed']}.json").is_file()]
    for row in run_jobs(descend, todo, args.jobs):
        print(f"seed {row['seed']}: {len(row['rounds'])} rounds in {row['seconds']:.0f} s")
    report(args.out, args.dense)


def report(out: Path, dense: int) -> None:
    """Each rule's end of every recorded descent, and their spread in pruning steps."""
    descents = []
    for path in sorted(glob.glob(str(out / "seed-*.json"))):
        record = json.loads(Path(path).read_text())
        correct = {k: v.bool() for k, v in load_tensors(Path(path).with_suffix(".safetensors")).items()}
        descents.append((record, correct))
    rules: dict[str, list[float]] = {
        "find": [find_end(record, correct) for record, correct in descents],
        "find, pooled": [pooled_find_end(record, correct, dense) for record, correct in descents],
    }
    for window in (1, 3):
        for points in (1.0, 2.0, 3.0, 6.0):
            rules[f"test, pooled, w = {window}, -{points:g}"] = [
                pooled_end(record, correct, dense, window, points / 100) for record, correct in descents
            ]
    step = 1 / (1 - descents[0][0]["ratio"])
    print("| rule | " + " | ".join(f"seed {record['seed']}" for record, _ in descents) + " | spread (steps) |")
    print("|---|" + "---|" * (len(descents) + 1))
    for name, ends in rules.items():
        spread = math.log(max(ends) / min(ends)) / math.log(step)
        print(f"| {name} | " + " | ".join(f"{100 * end:.3f} %" for end in ends) + f" | {spread:.1f} |")
    dense_test = [100 * float(correct[f"dense{k}.test"].float().mean()) for _, correct in descents for k in range(dense)]
    print(f"\n{len(dense_test)} dense networks: test accuracy {statistics.mean(dense_test):.2f} % "
          f"(sd {statistics.stdev(dense_test):.2f})")
    print("\n| weights left | test accuracy, mean (sd) over seeds | validation accuracy, mean (sd) |")
    print("|---|---|---|")
    for index, row in enumerate(descents[0][0]["rounds"]):
        if row["density"] < 0.015:
            test = [100 * record["rounds"][index]["test"] for record, _ in descents]
            validation = [100 * record["rounds"][index]["validation"] for record, _ in descents]
            print(f"| {100 * row['density']:.3f} % | {statistics.mean(test):.2f} % ({statistics.stdev(test):.2f}) | "
                  f"{statistics.mean(validation):.2f} % ({statistics.stdev(validation):.2f}) |")


def end_before_first_failure(record: dict[str, Any], failed: Callable[[int], bool]) -> float:
    """The density of the last round before the first one (0-based index) that ``failed``; 1 if round 1 did."""
    for index in range(len(record["rounds"])):
        if failed(index):
            return record["rounds"][index - 1]["density"] if index else 1.0
    return record["rounds"][-1]["density"]


def find_end(record: dict[str, Any], correct: dict[str, torch.Tensor]) -> float:
    dense = correct["dense0.validation"]
    images = dense.numel()
    margin = max(SearchConfig.eps, resolution(images, images - int(dense.sum()), SearchConfig.confidence))
    return end_before_first_failure(record, lambda index: not paired_test(
        correct[f"round{index + 1}.validation"], dense, margin, SearchConfig.confidence).matched)


def pooled_find_end(record: dict[str, Any], correct: dict[str, torch.Tensor], dense: int) -> float:
    reference = torch.stack([correct[f"dense{k}.validation"].float() for k in range(dense)]).mean(0)
    images = reference.numel()
    margin = max(SearchConfig.eps, resolution(images, round(float((1 - reference).sum())), SearchConfig.confidence))
    z = float(norm.ppf(SearchConfig.confidence))

    def failed(index: int) -> bool:
        difference = correct[f"round{index + 1}.validation"].float() - reference
        total, squares = float(difference.sum()), float((difference * difference).sum())
        bound = total / (images + 2) - z * math.sqrt(squares + 1 - total**2 / (images + 2)) / (images + 2)
        return bound < -margin

    return end_before_first_failure(record, failed)


def pooled_end(record: dict[str, Any], correct: dict[str, torch.Tensor], dense: int, window: int, drop: float) -> float:
    reference = torch.stack([correct[f"dense{k}.test"].float() for k in range(dense)]).mean(0)
    differences = [float((correct[f"round{index + 1}.test"].float() - reference).mean())
                   for index in range(len(record["rounds"]))]
    return end_before_first_failure(
        record, lambda index: statistics.mean(differences[max(0, index - window + 1) : index + 1]) < -drop
    )


if __name__ == "__main__":
    main()

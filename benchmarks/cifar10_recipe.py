"""Dense ResNet-20 on the full CIFAR-10 with a named training recipe; test accuracy after every epoch.

Recipes (``RECIPES``), both at ``--epochs`` (default 30):

- ``fast``: one-cycle lr peaking at 0.2, Nesterov momentum, label smoothing 0.1, weight decay 5e-4 on conv and
  linear weights only (none on BatchNorm and biases), batch 128, horizontal-flip test-time augmentation;
- ``paper``: the paper's recipe (step decay x0.1 at 50 % and 75 %, lr 0.1, wd 1e-4 everywhere, batch 128)
  cut to the same number of epochs.

``--set FIELD=VALUE`` changes one setting of the recipe (``TrainConfig``'s fields; repeatable) for trying a
variant before it becomes a recipe, and ``--crop-padding N`` the augmentation's random translation (CIFAR-10's is
4 pixels); the changes are recorded in epochs.json.

Every epoch appends to ``OUT/epochs.json`` (test accuracy with and without flip TTA, lr, seconds) and saves
``OUT/checkpoint.pt``; run the same command again after a kill and it resumes from the last finished epoch.
The checkpoint is removed when the run ends. ``--plot PNG`` draws the curves of finished or running recipes
from their epochs.json files instead of training.

    nice -n 19 python benchmarks/cifar10_recipe.py --recipe fast --threads 1 > fast.log 2>&1 &
    nice -n 19 python benchmarks/cifar10_recipe.py --recipe paper --threads 1 > paper.log 2>&1 &
    python benchmarks/cifar10_recipe.py --plot benchmarks/results/cifar10-recipe/curves.png \\
        runs/cifar10-recipe/fast/epochs.json runs/cifar10-recipe/paper/epochs.json

On a CPU shared with other work, ``--threads 1`` is much faster than two threads that wait for each other.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, fields, replace
from pathlib import Path
from typing import Any

import torch

from ticketguard.core.errors import InputError
from ticketguard.core.files import read_json, write_json
from ticketguard.data import ImageData, load_dataset
from ticketguard.models import build_model
from ticketguard.training.loop import TrainConfig, predict_logits, resolve_device, train
from ticketguard.training.recipes import RECIPES

SHARED = Path(__file__).resolve().parents[2] / "shared" / "datasets"
CIFAR10_JPEG = SHARED / "cifar10-jpeg" / "cifar10-jpeg.tar.gz"


def test_accuracies(model: torch.nn.Module, data: ImageData) -> dict[str, float]:
    """Test accuracy without and with flip TTA, from one pass over the images and one over their mirrors."""
    stats = data.channel_stats()
    logits = predict_logits(model, data.test_images, *stats)
    mirrored = predict_logits(model, data.test_images.flip(3), *stats)
    labels = data.test_labels.cpu()
    return {
        "test_accuracy": int((logits.argmax(1) == labels).sum()) / labels.numel(),
        "test_accuracy_flip_tta": int(((logits + mirrored).argmax(1) == labels).sum()) / labels.numel(),
    }


class EpochLog:
    """The epoch hook: evaluates, prints progress with the time left, and rewrites epochs.json atomically."""

    def __init__(self, path: Path, header: dict[str, Any], data: ImageData, config: TrainConfig) -> None:
        self.path, self.header, self.data, self.config = path, header, data, config
        previous = read_json(path) if path.is_file() else {}
        same_run = all(previous.get(k) == header[k] for k in ("config", "crop_padding"))
        self.records: list[dict[str, Any]] = previous.get("epochs", []) if same_run else []
        self.started = self.last = time.perf_counter()
        self.epochs_this_run = 0

    def __call__(self, epoch: int, model: torch.nn.Module) -> dict[str, float]:
        trained = time.perf_counter()
        record: dict[str, Any] = {"epoch": epoch, "lr_end": self.config.lr_at(epoch - 1e-9)}
        record.update(test_accuracies(model, self.data))
        record["train_seconds"] = trained - self.last
        record["eval_seconds"] = time.perf_counter() - trained
        self.last = time.perf_counter()
        self.epochs_this_run += 1
        self.records = [r for r in self.records if r["epoch"] < epoch] + [record]
        self.write(finished=False)
        per_epoch = (self.last - self.started) / self.epochs_this_run
        left = (self.config.epochs - epoch) * per_epoch
        print(
            f"epoch {epoch:3d}/{self.config.epochs}  test {100 * record['test_accuracy']:.2f} %  "
            f"flip-TTA {100 * record['test_accuracy_flip_tta']:.2f} %  lr {record['lr_end']:.4f}  "
            f"{record['train_seconds']:.0f}+{record['eval_seconds']:.0f} s  ~{left / 60:.0f} min left",
            flush=True,
        )
        return {k: v for k, v in record.items() if k != "epoch"}

    def write(self, finished: bool, history: list[dict[str, float]] | None = None) -> None:
        if history is not None:  # the trainer's records add loss and training accuracy to ours
            by_epoch = {h["epoch"]: h for h in history}
            self.records = [{**r, **by_epoch.get(r["epoch"], {})} for r in self.records]
        write_json(self.path, {**self.header, "finished": finished, "epochs": self.records})


def parse_changes(pairs: list[str]) -> dict[str, Any]:
    """``FIELD=VALUE`` settings of ``TrainConfig`` that a run changes in its recipe, typed like the field."""
    own_options = ("epochs", "seed")  # --epochs and --seed set these
    kinds = {
        f.name: type(f.default) for f in fields(TrainConfig)
        if f.name not in own_options and type(f.default) in (bool, int, float, str)
    }
    changes: dict[str, Any] = {}
    for pair in pairs:
        name, _, text = pair.partition("=")
        if name not in kinds or not text:
            raise InputError(f"--set takes FIELD=VALUE with FIELD one of {', '.join(kinds)}; got {pair!r}")
        if kinds[name] is bool:
            if text not in ("true", "false"):
                raise InputError(f"--set {name} takes true or false, got {text!r}")
            changes[name] = text == "true"
            continue
        try:
            changes[name] = kinds[name](text)
        except ValueError:
            raise InputError(f"--set {name} takes a {kinds[name].__name__}, got {text!r}") from None
    return changes


def run(args: argparse.Namespace) -> None:
    changes = parse_changes(args.set)
    config = replace(RECIPES[args.recipe](args.epochs, args.seed), **changes)
    suffix = "".join(f"-{name}={value}" for name, value in changes.items())
    if args.crop_padding is not None:
        if args.crop_padding < 0:
            raise InputError(f"--crop-padding must be >= 0 pixels, got {args.crop_padding}")
        suffix += f"-crop_padding={args.crop_padding}"
    out = Path(args.out or f"runs/cifar10-recipe/{args.recipe}{suffix}")
    out.mkdir(parents=True, exist_ok=True)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    header = {
        "recipe": args.recipe, "changes": changes, "model": "resnet20", "data": str(args.data_dir),
        "config": json.loads(json.dumps(asdict(config))),  # as epochs.json holds it: lists, not tuples
        "crop_padding": args.crop_padding,  # None: the data set's own
        "device": str(device), "threads": torch.get_num_threads(),
    }
    log_path = out / "epochs.json"
    if log_path.is_file():
        done = read_json(log_path)
        if done.get("finished") and all(done.get(k) == header[k] for k in ("config", "crop_padding")):
            print(f"{log_path} already holds the finished run; final test accuracy "
                  f"{100 * done['epochs'][-1]['test_accuracy_flip_tta']:.2f} % with flip TTA")
            return
    loading = time.perf_counter()
    data = load_dataset("cifar10", args.data_dir)
    if args.crop_padding is not None:
        data = replace(data, crop_padding=args.crop_padding)
    print(f"loaded {data.train_labels.numel()} training and {data.test_labels.numel()} test images in "
          f"{time.perf_counter() - loading:.0f} s; recipe {args.recipe}: {config}", flush=True)
    torch.manual_seed(args.seed)
    model = build_model("resnet20", data.input_shape[0], data.num_classes).to(device)
    epoch_log = EpochLog(log_path, header, data, config)
    checkpoint = out / "checkpoint.pt"
    if checkpoint.is_file():
        print(f"resuming from {checkpoint}", flush=True)
    result = train(model, data, config, checkpoint=checkpoint, epoch_hook=epoch_log)
    epoch_log.write(finished=True, history=result.history)
    checkpoint.unlink(missing_ok=True)
    print(f"final test accuracy {100 * result.accuracy:.2f} % ({'with' if config.flip_tta else 'without'} "
          f"flip TTA); per-epoch record in {log_path}")


def plot(png: Path, curves: list[Path]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    figure, axis = plt.subplots(figsize=(6, 4), dpi=100)
    for path in curves:
        log = read_json(path)
        epochs = [r["epoch"] for r in log["epochs"]]
        config = log["config"]
        key = "test_accuracy_flip_tta" if config["flip_tta"] else "test_accuracy"
        others = "".join(f", {name}={value}" for name, value in log.get("changes", {}).items()
                         if name not in ("lr", "batch_size"))
        if log.get("crop_padding") not in (None, 4):
            others += f", crop padding {log['crop_padding']}"
        label = (f"{log['recipe']}, peak lr {config['lr']}, batch {config['batch_size']}{others} "
                 f"({'flip TTA' if config['flip_tta'] else 'no TTA'})")
        if not log["finished"]:
            label += f", {len(epochs)} of {config['epochs']} epochs so far"
        axis.plot(epochs, [100 * r[key] for r in log["epochs"]], marker="o", markersize=3, label=label)
    axis.axhline(90, color="grey", linestyle="--", linewidth=1)
    axis.set(xlabel="epoch", ylabel="test accuracy (%)", title="ResNet-20, full CIFAR-10 (JPEG)")
    axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(png)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", choices=sorted(RECIPES), default="fast", help="the recipe (see above)")
    parser.add_argument("--epochs", type=int, default=30, help="training length in epochs")
    parser.add_argument("--seed", type=int, default=0, help="seed of initialisation, batch order, crops")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="change one training setting of the recipe (repeatable), e.g. batch_size=64")
    parser.add_argument("--crop-padding", type=int, default=None, metavar="N",
                        help="random crops translate by up to N pixels (default: the data set's, 4 for CIFAR-10)")
    parser.add_argument("--data-dir", type=Path, default=CIFAR10_JPEG,
                        help="CIFAR-10: python batches, or a train/ test/ image folder (folder or .tar.gz)")
    parser.add_argument("--out", default=None,
                        help="output folder (default runs/cifar10-recipe/RECIPE, then -FIELD=VALUE per --set)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--plot", type=Path, default=None, metavar="PNG",
                        help="instead of training, plot the epochs.json files given as arguments into PNG")
    parser.add_argument("curves", nargs="*", type=Path, help="epochs.json files for --plot")
    args = parser.parse_args()
    try:
        if args.plot is not None:
            plot(args.plot, args.curves)
        else:
            run(args)
    except InputError as err:
        sys.exit(f"error: {err}")


if __name__ == "__main__":
    main()

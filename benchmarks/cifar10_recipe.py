"""Dense ResNet-20 on the full CIFAR-10 with a named training recipe; test accuracy after every epoch.

Recipes (``RECIPES``), both at ``--epochs`` (default 30):

- ``fast``: one-cycle lr peaking at 0.2, Nesterov momentum, label smoothing 0.1, weight decay 5e-4 on conv and
  linear weights only (none on BatchNorm and biases), batch 128, horizontal-flip test-time augmentation;
- ``paper``: the paper's recipe (step decay x0.1 at 50 % and 75 %, lr 0.1, wd 1e-4 everywhere, batch 128)
  cut to the same number of epochs.

``--set FIELD=VALUE`` changes one setting of the recipe (``TrainConfig``'s fields; repeatable), e.g.
``crop_padding=2`` for a milder random translation than CIFAR-10's 4 pixels, for trying a variant before it
becomes a recipe; the changes are recorded in epochs.json.

Every epoch appends to ``OUT/epochs.json`` (test accuracy with and without flip TTA, lr, seconds) and saves
``OUT/checkpoint.pt``; run the same command again after a kill and it resumes from the last finished epoch.
The checkpoint is removed when the run ends; the weights of the last ``--keep-last`` epochs stay in
``OUT/weights/``. Instead of training:

- ``--plot PNG`` draws the curves of finished or running recipes from their epochs.json files;
- ``--test-views JSON`` measures what trained weights gain at test time without training again: the test
  accuracy of each weights file under more views (the image, its mirror, and both moved one pixel down-right
  and up-left, zero-filled as the training crops are) and of the files' weight average (batch-norm
  statistics measured again on the training images by ``torch.optim.swa_utils.update_bn``).

    nice -n 19 python benchmarks/cifar10_recipe.py --recipe fast --threads 1 > fast.log 2>&1 &
    nice -n 19 python benchmarks/cifar10_recipe.py --recipe paper --threads 1 > paper.log 2>&1 &
    python benchmarks/cifar10_recipe.py --plot benchmarks/results/cifar10-recipe/curves.png \\
        runs/cifar10-recipe/fast/epochs.json runs/cifar10-recipe/paper/epochs.json
    python benchmarks/cifar10_recipe.py --test-views benchmarks/results/cifar10-recipe/fast-test-views.json \\
        runs/cifar10-recipe/fast/weights/epoch-*.safetensors

On a CPU shared with other work, ``--threads 1`` is much faster than two threads that wait for each other.
"""

from __future__ import annotations

import argparse
import sys
import time
import types
import typing
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

import torch
from torch.optim.swa_utils import update_bn

from ticketguard.core.errors import InputError
from ticketguard.core.files import as_json, load_tensors, read_json, save_tensors, write_json
from ticketguard.data import ImageData, load_dataset
from ticketguard.data.augment import normalize
from ticketguard.models import build_model
from ticketguard.training.loop import (
    TrainConfig,
    predict_logits,
    recorded_training,
    resolve_device,
    state_copy,
    train,
)
from ticketguard.training.recipes import RECIPES

SHARED = Path(__file__).resolve().parents[2] / "shared" / "datasets"
CIFAR10_JPEG = SHARED / "cifar10-jpeg" / "cifar10-jpeg.tar.gz"


SHIFTS = ((1, 1), (-1, -1))


def translated(images: torch.Tensor, down: int, right: int) -> torch.Tensor:
    """(N, C, H, W) images moved ``down`` rows and ``right`` columns, the uncovered border zero."""
    moved = torch.zeros_like(images)
    height, width = images.shape[-2:]
    rows_to = slice(max(down, 0), height + min(down, 0))
    rows_from = slice(max(-down, 0), height - max(down, 0))
    cols_to = slice(max(right, 0), width + min(right, 0))
    cols_from = slice(max(-right, 0), width - max(right, 0))
    moved[..., rows_to, cols_to] = images[..., rows_from, cols_from]
    return moved


def test_accuracies(model: torch.nn.Module, data: ImageData, shifts: bool = False) -> dict[str, float]:
    """Test accuracy when the logits of each set of views are summed: the image alone and with its mirror;
    with ``shifts`` also both moved by each of ``SHIFTS``, at full and at half weight."""
    stats = data.channel_stats()
    views = (data.test_images, data.test_images.flip(3))
    plain, mirrored = (predict_logits(model, images, *stats) for images in views)
    labels = data.test_labels.cpu()

    def accuracy(logits: torch.Tensor) -> float:
        return int((logits.argmax(1) == labels).sum()) / labels.numel()

    accuracies = {"test_accuracy": accuracy(plain), "test_accuracy_flip_tta": accuracy(plain + mirrored)}
    if shifts:
        moved = sum(predict_logits(model, translated(images, *s), *stats) for images in views for s in SHIFTS)
        accuracies["test_accuracy_flip_shift_tta"] = accuracy(plain + mirrored + moved)
        accuracies["test_accuracy_flip_half_shift_tta"] = accuracy(plain + mirrored + 0.5 * moved)
    return accuracies


def same_training(log: dict[str, Any], header: dict[str, Any]) -> bool:
    """Whether an epochs.json was written by a run with this header's settings (a setting added since the
    log was written counts at its default)."""
    return isinstance(log.get("config"), dict) and recorded_training(log["config"]) == header["config"]


class EpochLog:
    """The epoch hook: evaluates, prints progress with the time left, and rewrites epochs.json atomically."""

    def __init__(
        self, path: Path, header: dict[str, Any], data: ImageData, config: TrainConfig, keep_last: int
    ) -> None:
        self.path, self.header, self.data, self.config, self.keep_last = path, header, data, config, keep_last
        previous = read_json(path) if path.is_file() else {}
        self.records: list[dict[str, Any]] = []
        if same_training(previous, header):
            self.records = previous.get("epochs", [])
        else:  # another run's kept weights must not be averaged with this one's
            for stale in path.parent.glob("weights/epoch-*.safetensors"):
                stale.unlink()
        self.started = self.last = time.perf_counter()
        self.epochs_this_run = 0

    def __call__(self, epoch: int, model: torch.nn.Module) -> dict[str, float]:
        trained = time.perf_counter()
        record: dict[str, Any] = {"epoch": epoch, "lr_end": self.config.lr_at(epoch - 1e-9)}
        record.update(test_accuracies(model, self.data))
        if epoch > self.config.epochs - self.keep_last:
            save_tensors(self.path.parent / "weights" / f"epoch-{epoch:03d}.safetensors", state_copy(model))
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


def simple_kind(hint: Any) -> type | None:
    """bool, int, float or str for a field of that type (or of that type or None); None for any other."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        kinds = [kind for kind in typing.get_args(hint) if kind is not type(None)]
        hint = kinds[0] if len(kinds) == 1 else None
    return hint if hint in (bool, int, float, str) else None


def parse_changes(pairs: list[str]) -> dict[str, Any]:
    """``FIELD=VALUE`` settings of ``TrainConfig`` that a run changes in its recipe, typed like the field."""
    own_options = ("epochs", "seed")  # --epochs and --seed set these
    hints = typing.get_type_hints(TrainConfig)
    kinds = {
        f.name: kind for f in fields(TrainConfig)
        if f.name not in own_options and (kind := simple_kind(hints[f.name])) is not None
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
    if args.keep_last < 0:
        raise InputError(f"--keep-last must be >= 0 epochs, got {args.keep_last}")
    config = replace(RECIPES[args.recipe](args.epochs, args.seed), **changes)
    suffix = "".join(f"-{name}={value}" for name, value in changes.items())
    out = Path(args.out or f"runs/cifar10-recipe/{args.recipe}{suffix}")
    out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(args.device)
    header = {
        "recipe": args.recipe, "changes": changes, "model": "resnet20", "data": str(args.data_dir),
        "config": as_json(config),
        "device": str(device), "threads": torch.get_num_threads(),
    }
    log_path = out / "epochs.json"
    if log_path.is_file():
        done = read_json(log_path)
        if done.get("finished") and same_training(done, header):
            print(f"{log_path} already holds the finished run; final test accuracy "
                  f"{100 * done['epochs'][-1]['test_accuracy_flip_tta']:.2f} % with flip TTA")
            return
    loading = time.perf_counter()
    data = load_dataset("cifar10", args.data_dir)
    print(f"loaded {data.train_labels.numel()} training and {data.test_labels.numel()} test images in "
          f"{time.perf_counter() - loading:.0f} s; recipe {args.recipe}: {config}", flush=True)
    torch.manual_seed(args.seed)
    model = build_model("resnet20", data.input_shape[0], data.num_classes).to(device)
    epoch_log = EpochLog(log_path, header, data, config, args.keep_last)
    checkpoint = out / "checkpoint.pt"
    if checkpoint.is_file():
        print(f"resuming from {checkpoint}", flush=True)
    result = train(model, data, config, checkpoint=checkpoint, epoch_hook=epoch_log)
    epoch_log.write(finished=True, history=result.history)
    checkpoint.unlink(missing_ok=True)
    print(f"final test accuracy {100 * result.accuracy:.2f} % ({'with' if config.flip_tta else 'without'} "
          f"flip TTA); per-epoch record in {log_path}")


def test_views(out: Path, weight_files: list[Path], data_dir: Path, device: torch.device) -> None:
    """The test accuracy of each weights file under more views, then of their average (see the module doc)."""
    if not weight_files:
        raise InputError("--test-views needs weights files (OUT/weights/epoch-*.safetensors) as arguments")
    weights = [load_tensors(path) for path in weight_files]
    data = load_dataset("cifar10", data_dir)
    model = build_model("resnet20", data.input_shape[0], data.num_classes).to(device)
    rows: list[dict[str, Any]] = []
    for path, state in zip(weight_files, weights, strict=True):
        model.load_state_dict(state)
        rows.append({"weights": path.name, **test_accuracies(model, data, shifts=True)})
        print(rows[-1], flush=True)
    if len(weights) > 1:
        floats = [name for name, value in weights[0].items() if value.is_floating_point()]
        averaged = {name: torch.stack([w[name] for w in weights]).mean(0) for name in floats}
        model.load_state_dict({**weights[-1], **averaged})
        mean, std = data.channel_stats()
        batches = (
            normalize(data.train_images[start : start + 500], mean, std)
            for start in range(0, data.train_labels.numel(), 500)
        )
        model.train()
        with torch.no_grad():
            update_bn(batches, model, device=device)
        rows.append({"weights": f"average of {len(weights)}, batch norm measured again",
                     **test_accuracies(model, data, shifts=True)})
        print(rows[-1], flush=True)
    write_json(out, {"data": str(data_dir), "weights": [str(p) for p in weight_files], "rows": rows})


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
    parser.add_argument("--data-dir", type=Path, default=CIFAR10_JPEG,
                        help="CIFAR-10: python batches, or a train/ test/ image folder (folder or .tar.gz)")
    parser.add_argument("--out", default=None,
                        help="output folder (default runs/cifar10-recipe/RECIPE, then -FIELD=VALUE per --set)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--plot", type=Path, default=None, metavar="PNG",
                        help="instead of training, plot the epochs.json files given as arguments into PNG")
    parser.add_argument("--test-views", type=Path, default=None, metavar="JSON",
                        help="instead of training, measure test-time views and the weight average of the "
                        "weights files given as arguments (see above) into JSON")
    parser.add_argument("--keep-last", type=int, default=3, metavar="K",
                        help="keep the weights of the last K epochs in OUT/weights/ (default 3)")
    parser.add_argument("files", nargs="*", type=Path,
                        help="epochs.json files for --plot, weights files for --test-views")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        if args.plot is not None:
            plot(args.plot, args.files)
        elif args.test_views is not None:
            test_views(args.test_views, args.files, args.data_dir, resolve_device(args.device))
        else:
            run(args)
    except InputError as err:
        sys.exit(f"error: {err}")


if __name__ == "__main__":
    main()

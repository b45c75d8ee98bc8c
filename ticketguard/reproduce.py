"""The paper's experiments at any scale: each writes our numbers beside the paper's into one report.

Experiments (``EXPERIMENTS``) share two stages stored in the output folder: the extreme ticket (``search/``,
``ticket/``; the search itself resumes mid-way) and the protected ticket (V2 signature + V3 trigger set:
``protected/``, ``claim.json``, ``protection.json``). Each experiment's numbers are stored in
``results/<name>.json`` and attack-grid points in ``grid/points``, so a rerun skips what is finished; a failed
experiment is recorded with its error and the others go on. ``--scale`` shrinks the per-class data, the epochs,
the search and the grids together, so the same code runs minutes on a CPU or the full 182-epoch protocol.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from matplotlib.figure import Figure
from rich.progress import Progress

from ticketguard import harness, report
from ticketguard.claim import load_claim
from ticketguard.demo import DEMO, protect_demo
from ticketguard.data import ImageData, dataset_spec, load_dataset
from ticketguard.data.cifar import load_image_folder
from ticketguard.errors import InputError
from ticketguard.files import atomic_path, read_json, write_json
from ticketguard.imp import SearchConfig, find_extreme_ticket
from ticketguard.models import MODELS
from ticketguard.schemes import keymask as v1
from ticketguard.scores import SCORES
from ticketguard.ticket import MANIFEST, Ticket
from ticketguard.training import TrainConfig
from ticketguard.evidence import DEFAULT_ALPHA

log = logging.getLogger(__name__)

# The paper's own numbers (Chen et al., NeurIPS 2021, arXiv 2111.00162), per model, on CIFAR-10, as quoted in
# the project's design map; a quantity without a number for the model shows "-". Never estimated here.
PAPER: dict[str, dict[str, str]] = {
    # Table 1 (§4.1): the extreme ResNet-20 ticket, its weights left and the pruning specification (rounds
    # that matched at the ratios 0.2, 0.1, 0.05, 0.01).
    "ticket_density": {"resnet20": "19.369 %"},
    "ticket_counts": {"resnet20": "(5, 1, 8, 1)"},
    # Definition of a winning ticket: retrained accuracy within eps_f = 1 % of the dense network's.
    "ticket_matches": {"resnet20": "within 1 % of dense"},
    # Scheme V2 results: accuracy cost of embedding the QR signature into the mask and retraining.
    "v2_cost": {"resnet20": "0.29 %", "resnet18": "0.11 %"},
    # Scheme V2 robustness (§4.3): the strongest one-shot magnitude pruning after which the code still decodes.
    "v2_pruning_decodes": {"resnet20": "20 %", "resnet18": "5 %"},
    # Scheme V3 results: trigger accuracy of the marked model, of an unmarked one, and the accuracy cost.
    "v3_trigger_accuracy": {"resnet20": "91 %"},
    "v3_unmarked_trigger_accuracy": {"resnet20": "16 %"},
    "v3_cost": {"resnet20": "0.2 %"},
    # Figure 2: relative key density n_s from which the locked ticket, retrained, misses dense by > eps_f.
    "v1_key_density": {"resnet20": "5-10 %"},
    # Ambiguity attacks (§4.3-4.4): fake3, a forged QR code and noise weights over the code region.
    "fake3": {"resnet20": "91.37 % -> 57.00 %"},
}

FULL_DENSITIES = (0.01, 0.02, 0.05, 0.1, 0.2)
SMALL_DENSITIES = (0.05, 0.2)
SMALL_SCORES = ("omp", "ewp", "random")
FULL_GRID_SCALE = 0.5
PAPER_REWIND_EPOCH = 3
PAPER_EPOCHS = 182


@dataclass(frozen=True)
class Plan:
    """Every setting a run depends on, derived from (model, data, epochs, scale): stored in plan.json so that a
    rerun with other settings is refused instead of mixing results."""

    model: str
    data: str
    scale: float
    epochs: int
    train_per_class: int | None
    test_per_class: int | None
    ratios: tuple[float, ...]
    max_rounds: int
    rewind_epoch: int
    prune: tuple[float, ...]
    addon: tuple[float, ...]
    finetune_epochs: int
    densities: tuple[float, ...]
    scores: tuple[str, ...]
    key_density: float = 0.2
    eps: float = 0.01
    seed: int = 0

    @property
    def train(self) -> TrainConfig:
        return TrainConfig(epochs=self.epochs, seed=self.seed)

    @property
    def search(self) -> SearchConfig:
        return SearchConfig(
            model=self.model,
            ratios=self.ratios,
            eps=self.eps,
            rewind_epoch=self.rewind_epoch,
            max_rounds=self.max_rounds,
            train=self.train,
        )

    def record(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


def make_plan(
    model: str, data: str, epochs: int | None, scale: float, full_per_class: tuple[int, int]
) -> Plan:
    """Shrink the paper's protocol by ``scale``: per-class data, epochs (unless given), IMP rounds and grids;
    ``full_per_class`` is the (train, test) images per class of the whole data set."""
    check_scale(scale)
    if model not in MODELS:
        raise InputError(f"unknown model {model!r}; choose one of: {', '.join(MODELS)}")
    epochs = epochs if epochs is not None else max(2, round(scale * dataset_spec(data).default_epochs))
    if epochs < 2:
        raise InputError(f"--epochs must be >= 2 (one to rewind to, one to train), got {epochs}")
    full = scale >= FULL_GRID_SCALE
    per_class = [None if scale == 1 else max(1, round(scale * n)) for n in full_per_class]
    return Plan(
        model=model,
        data=data,
        scale=scale,
        epochs=epochs,
        train_per_class=per_class[0],
        test_per_class=per_class[1],
        ratios=SearchConfig.ratios if full else (SearchConfig.ratios[0],),
        max_rounds=max(1, round(scale * SearchConfig.max_rounds)),
        rewind_epoch=min(max(1, round(PAPER_REWIND_EPOCH * epochs / PAPER_EPOCHS)), epochs - 1),
        prune=(0.05, 0.1, 0.2, 0.3, 0.5) if full else (0.05, 0.2, 0.5),
        addon=(0.005, 0.01, 0.05, 0.1) if full else (0.01, 0.1),
        finetune_epochs=max(1, round(epochs / 20)),
        densities=FULL_DENSITIES if full else SMALL_DENSITIES,
        scores=tuple(SCORES) if full else SMALL_SCORES,
    )


def check_scale(scale: float) -> None:
    if not 0 < scale <= 1:
        raise InputError(f"--scale must lie in (0, 1], got {scale}")


def check_data_dir(data: str, data_dir: Path | None) -> None:
    """Raised where the input enters: CIFAR and image folders need their files."""
    if dataset_spec(data).needs_folder and data_dir is None:
        raise InputError(f"--data {data} needs --data-dir pointing at its folder or .tar.gz archive")


def load_scaled(data: str, data_dir: Path | None, scale: float) -> tuple[ImageData, tuple[int, int]]:
    """The data set and its full (train, test) images per class; an image-folder archive is decoded only as
    far as the scale needs (decoding all 60 000 CIFAR JPEGs takes minutes)."""
    check_data_dir(data, data_dir)
    archive = data_dir is not None and (data_dir.is_file() or (data_dir / "train").is_dir())
    if archive and scale < 1 and data in ("cifar10", "cifar100"):
        full = (5000, 1000) if data == "cifar10" else (500, 100)
        loaded = load_image_folder(data_dir, name=data, per_class=math.ceil(scale * full[0]))
        return loaded, full
    loaded = load_dataset(data, data_dir)
    counts = [torch.bincount(labels).min().item() for labels in (loaded.train_labels, loaded.test_labels)]
    return loaded, (int(counts[0]), int(counts[1]))


@dataclass
class Run:
    """One reproduction: the plan, the data, where things go, and the shared stages (built once, stored)."""

    plan: Plan
    data: ImageData
    out: Path
    device: torch.device
    progress: Progress | None = None
    cache: dict[str, Any] = field(default_factory=dict)

    def ticket(self) -> Ticket:
        """Table 1's extreme ticket (IMP with late rewinding), searched once and stored in ``ticket/``."""
        if "ticket" not in self.cache:
            folder = self.out / "ticket"
            if (folder / MANIFEST).is_file():
                self.cache["ticket"] = Ticket.load(folder)
            else:
                found = find_extreme_ticket(
                    self.data, self.plan.search, self.out / "search", self.device, self.progress
                )
                found.save(folder)
                self.cache["ticket"] = found
        return self.cache["ticket"]

    def protected(self) -> tuple[Ticket, dict[str, Any]]:
        """The ticket signed (V2) and watermarked (V3) exactly as the demo does; stored with its numbers."""
        if isinstance(self.cache.get("protected"), Exception):
            raise self.cache["protected"]
        if "protected" not in self.cache:
            numbers_path = self.out / "protection.json"
            if numbers_path.is_file() and (self.out / "protected" / MANIFEST).is_file():
                self.cache["protected"] = (Ticket.load(self.out / "protected"), read_json(numbers_path))
            else:
                config = replace(DEMO, epochs=self.plan.epochs, seed=self.plan.seed)
                try:
                    protected, _, numbers = protect_demo(
                        self.ticket(), self.data, config, self.device, self.progress, self.out
                    )
                except Exception as err:
                    self.cache["protected"] = err
                    raise
                write_json(numbers_path, numbers)
                self.cache["protected"] = (protected, numbers)
        return self.cache["protected"]

    def grid(self, points: list[harness.GridPoint]) -> list[dict[str, Any]]:
        """Attack the protected ticket; points are shared by experiments through ``grid/points``."""
        protected, _ = self.protected()
        claim = load_claim(self.out / "claim.json")
        subject = harness.Subject(
            protected, self.data, claim, self.plan.key_density, None, DEFAULT_ALPHA, self.device
        )
        return harness.run_grid(subject, points, self.out / "grid", self.progress)


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f} %"


def paper(quantity: str, model: str) -> str:
    return PAPER.get(quantity, {}).get(model, "-")


def run_table1(run: Run) -> dict[str, Any]:
    """Table 1: density, pruning specification and accuracy of the extreme ticket against dense."""
    ticket = run.ticket()
    return {
        "density": ticket.mask.density(),
        "counts": ticket.metadata.get("search", {}).get("counts"),
        "accuracy": ticket.accuracy,
        "dense_accuracy": ticket.metadata.get("dense_accuracy"),
    }


def rows_table1(result: dict[str, Any], model: str) -> list[dict[str, str]]:
    counts = result["counts"]
    return [
        {
            "quantity": "weights left",
            "paper": paper("ticket_density", model),
            "ours": _pct(result["density"]),
        },
        {
            "quantity": "pruning specification (rounds per ratio)",
            "paper": paper("ticket_counts", model),
            "ours": f"({', '.join(map(str, counts))})" if counts else "-",
        },
        {
            "quantity": "accuracy (dense)",
            "paper": paper("ticket_matches", model),
            "ours": f"{_pct(result['accuracy'])} ({_pct(result['dense_accuracy'])})",
        },
    ]


def _decoded_strengths(rows: Sequence[dict[str, Any]], family: str) -> list[float]:
    return [r["strength"] for r in rows if r.get("family") == family and r.get("qr_decodes")]


def run_signature(run: Run) -> dict[str, Any]:
    """V2: accuracy cost of the signature, and which one-shot magnitude pruning the code survives."""
    ticket, (_, numbers) = run.ticket(), run.protected()
    points = [harness.GridPoint("none", 0.0, "magnitude:fraction=0", "none (shipped ticket)")]
    points += [harness.GridPoint("magnitude pruning", f, f"magnitude:fraction={f}") for f in run.plan.prune]
    rows = run.grid(points)
    return {
        "ticket_accuracy": ticket.accuracy,
        "signed_accuracy": numbers["v2_accuracy"],
        "cells_changed": numbers["cells_changed"],
        "pruning": [
            {"fraction": r["strength"], "decodes": r.get("qr_decodes"), "match_rate": r.get("match_rate")}
            for r in rows[1:]
        ],
        "strongest_decoded": max(_decoded_strengths(rows, "magnitude pruning"), default=None),
        "shipped_decodes": rows[0].get("qr_decodes"),
    }


def rows_signature(result: dict[str, Any], model: str) -> list[dict[str, str]]:
    strongest = result["strongest_decoded"]
    rows = [
        {
            "quantity": "accuracy cost of the signature",
            "paper": paper("v2_cost", model),
            "ours": f"{_pct(result['ticket_accuracy'] - result['signed_accuracy'])} "
            f"({_pct(result['ticket_accuracy'])} -> {_pct(result['signed_accuracy'])})",
        },
        {
            "quantity": "strongest magnitude pruning that still decodes",
            "paper": paper("v2_pruning_decodes", model),
            "ours": "none" if strongest is None else f"{100 * strongest:.0f} %",
        },
    ]
    rows += [
        {
            "quantity": f"magnitude pruning {100 * p['fraction']:g} %: decodes, match rate",
            "paper": "-",
            "ours": f"{'yes' if p['decodes'] else 'no'}, {_pct(p['match_rate'])}",
        }
        for p in result["pruning"]
    ]
    return rows


def run_trigger(run: Run) -> dict[str, Any]:
    """V3: trigger accuracy of the marked and unmarked model, and the accuracy cost of the trigger set."""
    _, numbers = run.protected()
    return {
        "signed_accuracy": numbers["v2_accuracy"],
        "accuracy": numbers["accuracy"],
        "trigger_accuracy": numbers["trigger_accuracy"],
        "unmarked_trigger_accuracy": numbers["unmarked_trigger_accuracy"],
    }


def rows_trigger(result: dict[str, Any], model: str) -> list[dict[str, str]]:
    return [
        {
            "quantity": "trigger accuracy, marked",
            "paper": paper("v3_trigger_accuracy", model),
            "ours": _pct(result["trigger_accuracy"]),
        },
        {
            "quantity": "trigger accuracy, unmarked",
            "paper": paper("v3_unmarked_trigger_accuracy", model),
            "ours": _pct(result["unmarked_trigger_accuracy"]),
        },
        {
            "quantity": "accuracy cost of the trigger set",
            "paper": paper("v3_cost", model),
            "ours": f"{_pct(result['signed_accuracy'] - result['accuracy'])} "
            f"({_pct(result['signed_accuracy'])} -> {_pct(result['accuracy'])})",
        },
    ]


def key_density_curve(
    ticket: Ticket,
    data: ImageData,
    config: TrainConfig,
    densities: Sequence[float],
    scores: Sequence[str],
    device: torch.device,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Figure 2 (and Fig. 5's fake1): test accuracy of the locked ticket retrained without its key, against
    the key's relative density n_s, per score; plus a random key of the same size added to the EWP-locked
    ticket. Same protocol and seed for every retraining."""
    with_key = v1.retrain(ticket, data, config, device, progress, "ticket (with key)")
    without: dict[str, list[float]] = {name: [] for name in scores}
    fake1: list[float] = []
    for density in densities:
        splits = {name: v1.split_key(ticket, density, name) for name in scores}
        for name, (locked, _) in splits.items():
            without[name].append(v1.retrain(locked, data, config, device, progress, f"{name} n_s={density}"))
        locked, key = splits.get("ewp", splits[scores[0]])
        forged = v1.merge_key(locked, v1.forge_random_key(locked, key.size(), seed=1))
        fake1.append(v1.retrain(forged, data, config, device, progress, f"fake1 n_s={density}"))
    return {
        "dense_accuracy": ticket.metadata.get("dense_accuracy"),
        "ticket_density": ticket.mask.density(),
        "accuracy_with_key": with_key,
        "densities": list(densities),
        "without_key": without,
        "fake1": fake1,
    }


def plot_key_density(curve: dict[str, Any], eps: float, path: str | Path) -> Path:
    """Figure 2: accuracy without the key against n_s (log scale), dense and dense - eps_f as lines."""
    figure = Figure(figsize=(6, 4), layout="constrained")
    axes = figure.add_subplot()
    xs = [100 * d for d in curve["densities"]]
    for name, accuracies in curve["without_key"].items():
        axes.plot(xs, [100 * a for a in accuracies], marker="o", label=name)
    axes.plot(xs, [100 * a for a in curve["fake1"]], "k:", marker="x", label="random key added (fake1)")
    dense = curve["dense_accuracy"]
    if dense is not None:
        axes.axhline(100 * dense, color="gray", label="dense")
        axes.axhline(100 * (dense - eps), color="gray", linestyle="--", label="dense - eps_f")
    axes.set_xscale("log")
    axes.set_xlabel("key relative density n_s (%)")
    axes.set_ylabel("test accuracy without the key (%)")
    axes.legend(fontsize=7)
    return report.save_figure(figure, path)


def run_fig2(run: Run) -> dict[str, Any]:
    curve = key_density_curve(
        run.ticket(), run.data, run.plan.train, run.plan.densities, run.plan.scores, run.device, run.progress
    )
    plot_key_density(curve, run.plan.eps, run.out / "fig2.png")
    return curve | {"eps": run.plan.eps, "figures": ["fig2.png"]}


def _smallest_failing_density(result: dict[str, Any], score: str) -> float | None:
    target = result["dense_accuracy"] if result["dense_accuracy"] is not None else result["accuracy_with_key"]
    accuracies = result["without_key"].get(score, [])
    failing = [d for d, a in zip(result["densities"], accuracies) if a < target - result["eps"]]
    return min(failing, default=None)


def rows_fig2(result: dict[str, Any], model: str) -> list[dict[str, str]]:
    rows = []
    for score in result["without_key"]:
        smallest = _smallest_failing_density(result, score)
        rows.append(
            {
                "quantity": f"{score}: smallest n_s whose locked ticket misses dense by > eps_f",
                "paper": paper("v1_key_density", model) if score == "ewp" else "-",
                "ours": "none of those tried" if smallest is None else f"{100 * smallest:g} %",
            }
        )
    for index, density in enumerate(result["densities"]):
        cells = ", ".join(f"{s} {_pct(a[index])}" for s, a in result["without_key"].items())
        rows.append(
            {
                "quantity": f"n_s = {100 * density:g} %: accuracy without key (fake1 key)",
                "paper": "-",
                "ours": f"{cells} ({_pct(result['fake1'][index])})",
            }
        )
    rows.append({"quantity": "accuracy with key", "paper": "-", "ours": _pct(result["accuracy_with_key"])})
    return rows


def attack_points(plan: Plan) -> list[harness.GridPoint]:
    """The robustness grid at the plan's scale (pruning, add-on with and without the defence, fine-tuning,
    fake1-3); the same points as the demo's grid at full scale."""
    return harness.default_grid(plan.prune, plan.addon, plan.finetune_epochs, transfer=False)


def run_attacks(run: Run) -> dict[str, Any]:
    """Removal and ambiguity attacks on the protected ticket, with the figures of the paper's Figs. 3, 4, 6."""
    rows = run.grid(attack_points(run.plan))
    harness.write_results(rows, run.out / "grid")
    signature = load_claim(run.out / "claim.json").signature
    report.plot_curves(rows, run.out / "robustness.png")
    report.qr_grid(rows, signature, run.out / "qr-grid.png")
    return {"rows": rows, "figures": ["robustness.png", "qr-grid.png"]}


def rows_attacks(result: dict[str, Any], model: str) -> list[dict[str, str]]:
    rows = result["rows"]
    shipped = next((r for r in rows if r.get("family") == "none" and not r.get("error")), {})
    fake3 = next((r for r in rows if r.get("family") == "fake3" and not r.get("error")), {})
    shown = [
        {
            "quantity": "fake3: accuracy before -> after forging the code region",
            "paper": paper("fake3", model),
            "ours": f"{_pct(shipped.get('accuracy'))} -> {_pct(fake3.get('accuracy'))}",
        }
    ]
    for row in rows:
        cells = report.display_row(row)
        shown.append(
            {
                "quantity": row["attack"],
                "paper": "-",
                "ours": row.get("error")
                or f"acc {cells['test accuracy']}, QR {cells['QR decodes']} "
                f"(match {cells['match rate']}), trigger {cells['trigger accuracy']}, "
                f"owned {cells['owned']}",
            }
        )
    return shown


@dataclass(frozen=True)
class Experiment:
    """One target: what it reproduces, how to run it, and how its result reads beside the paper."""

    title: str
    run: Callable[[Run], dict[str, Any]]
    rows: Callable[[dict[str, Any], str], list[dict[str, str]]]


EXPERIMENTS: dict[str, Experiment] = {
    "table1": Experiment("Table 1: extreme winning ticket", run_table1, rows_table1),
    "signature": Experiment(
        "Scheme V2: signature cost and pruning robustness", run_signature, rows_signature
    ),
    "trigger": Experiment("Scheme V3: trigger set accuracy and cost", run_trigger, rows_trigger),
    "fig2": Experiment(
        "Figure 2: key density against accuracy without the key (V1, fake1)", run_fig2, rows_fig2
    ),
    "attacks": Experiment(
        "Removal and ambiguity attacks (pruning, add-on + defence, fine-tuning, fake1-3; Figs. 3, 4, 6)",
        run_attacks,
        rows_attacks,
    ),
}


def check_targets(targets: Sequence[str]) -> list[str]:
    unknown = [t for t in targets if t not in EXPERIMENTS]
    if unknown:
        raise InputError(f"unknown target {unknown[0]!r}; choose from: {', '.join(EXPERIMENTS)}")
    return list(dict.fromkeys(targets)) or list(EXPERIMENTS)


def check_plan(out: Path, plan: Plan) -> None:
    """A folder holds one plan: resuming with other settings would mix results."""
    path = out / "plan.json"
    if path.is_file():
        stored = read_json(path)
        if stored != plan.record():
            changed = sorted(k for k in stored if stored.get(k) != plan.record().get(k))
            raise InputError(
                f"{out} holds a run with other settings ({', '.join(changed)}); choose another --out"
            )
    else:
        write_json(path, plan.record())


def run_experiment(run: Run, name: str) -> dict[str, Any]:
    """Stored result if there is one; else run it. A failure becomes {"error": ...} and is not stored."""
    path = run.out / "results" / f"{name}.json"
    if path.is_file():
        return read_json(path)
    try:
        result = EXPERIMENTS[name].run(run)
    except Exception as err:  # noqa: BLE001 - a failed experiment is reported; the others go on
        log.warning("experiment %s failed: %s", name, err)
        return {"error": f"{type(err).__name__}: {err}"}
    write_json(path, result)
    return result


def write_report(out: Path, plan: Plan, results: dict[str, dict[str, Any]], seconds: float) -> Path:
    """report.md: the settings, then per experiment our numbers beside the paper's and its figures."""
    sections = [
        f"# Reproduction: {plan.model} on {plan.data} at scale {plan.scale:g}",
        "",
        (
            f"{plan.epochs} epochs per training run, train/test images per class "
            f"{plan.train_per_class or 'all'}/{plan.test_per_class or 'all'}, IMP ratios {list(plan.ratios)} "
            f"(at most {plan.max_rounds} rounds), rewind epoch {plan.rewind_epoch}; {seconds:.0f} s. "
            "The paper's numbers are its own, on CIFAR-10 (a model without them shows -)."
        ),
        "",
    ]
    for name, result in results.items():
        experiment = EXPERIMENTS[name]
        sections += [f"## {experiment.title}", ""]
        if result.get("error"):
            sections += [f"Failed: {result['error']}", ""]
            continue
        rows = experiment.rows(result, plan.model)
        sections += [report.markdown_table(rows, ["quantity", "paper", "ours"]), ""]
        sections += [f"![{figure}]({figure})" for figure in result.get("figures", [])]
        sections.append("")
    path = out / "report.md"
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(sections))
    return path

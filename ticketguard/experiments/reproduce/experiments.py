"""The experiments behind the paper's tables and figures: each runs on the shared stages (extreme ticket,
protected ticket, attack grid) and reads its result as rows beside the paper's numbers."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from matplotlib.figure import Figure
from rich.progress import Progress

from ticketguard.artifacts.ticket import Ticket, is_ticket_folder
from ticketguard.core.errors import InputError
from ticketguard.core.evidence import DEFAULT_ALPHA
from ticketguard.core.files import read_json, write_json
from ticketguard.data import ImageData
from ticketguard.experiments import harness, report
from ticketguard.experiments.demo import DEMO, protect_demo
from ticketguard.experiments.paper import (
    FAKE3,
    TABLE1,
    TABLE2,
    TABLE3,
    V1_KEY_DENSITY,
    V2_PRUNING_DECODES,
    for_attack,
    percent,
    quantity,
)
from ticketguard.experiments.reproduce.plan import Plan
from ticketguard.schemes import keymask as v1
from ticketguard.search.imp import find_extreme_ticket
from ticketguard.training.loop import TrainConfig
from ticketguard.verification.claim import load_claim

log = logging.getLogger(__name__)

PROTECTION_NUMBERS = "protection.json"


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
            if is_ticket_folder(folder):
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
            numbers_path = self.out / PROTECTION_NUMBERS
            if numbers_path.is_file() and is_ticket_folder(self.out / "protected"):
                self.cache["protected"] = (Ticket.load(self.out / "protected"), read_json(numbers_path))
            else:
                config = replace(DEMO, epochs=self.plan.epochs, seed=self.plan.seed)
                try:
                    protected, _, numbers = protect_demo(
                        self.ticket(), self.data, config, self.plan.train, self.device, self.progress, self.out
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


def run_table1(run: Run) -> dict[str, Any]:
    """Table 1: density, pruning specification and accuracy of the extreme ticket against dense."""
    ticket = run.ticket()
    return {
        "density": ticket.mask.density(),
        "counts": ticket.metadata.get("search", {}).get("counts"),
        "accuracy": ticket.accuracy,
        "dense_accuracy": ticket.metadata.get("dense_accuracy"),
    }


def rows_table1(result: dict[str, Any], plan: Plan) -> list[dict[str, str]]:
    counts = result["counts"]
    return [
        {
            "quantity": "weights left",
            "paper": quantity(TABLE1, plan.model, plan.data, "density"),
            "ours": percent(result["density"]),
        },
        {
            "quantity": "pruning specification (rounds per ratio)",
            "paper": quantity(TABLE1, plan.model, plan.data, "counts"),
            "ours": f"({', '.join(map(str, counts))})" if counts else "-",
        },
        {
            "quantity": "accuracy (dense)",
            "paper": f"{quantity(TABLE1, plan.model, plan.data, 'ticket')} ({quantity(TABLE1, plan.model, plan.data, 'dense')})",
            "ours": f"{percent(result['accuracy'])} ({percent(result['dense_accuracy'])})",
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


def rows_signature(result: dict[str, Any], plan: Plan) -> list[dict[str, str]]:
    strongest = result["strongest_decoded"]
    rows = [
        {
            "quantity": "accuracy after the signature (cost)",
            "paper": quantity(TABLE2, plan.model, plan.data),
            "ours": f"{percent(result['ticket_accuracy'] - result['signed_accuracy'])} "
            f"({percent(result['ticket_accuracy'])} -> {percent(result['signed_accuracy'])})",
        },
        {
            "quantity": "strongest magnitude pruning that still decodes",
            "paper": quantity(V2_PRUNING_DECODES, plan.model, plan.data),
            "ours": "none" if strongest is None else f"{100 * strongest:.0f} %",
        },
    ]
    rows += [
        {
            "quantity": f"magnitude pruning {100 * p['fraction']:g} %: decodes, match rate (paper: accuracy)",
            "paper": for_attack("magnitude pruning", p["fraction"], plan.model, plan.data),
            "ours": f"{'yes' if p['decodes'] else 'no'}, {percent(p['match_rate'])}",
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


def rows_trigger(result: dict[str, Any], plan: Plan) -> list[dict[str, str]]:
    return [
        {
            "quantity": "trigger accuracy, marked (paper: test (trigger) accuracy)",
            "paper": quantity(TABLE3, plan.model, plan.data, "marked"),
            "ours": percent(result["trigger_accuracy"]),
        },
        {
            "quantity": "trigger accuracy, unmarked (paper: test (trigger) accuracy)",
            "paper": quantity(TABLE3, plan.model, plan.data, "unmarked"),
            "ours": percent(result["unmarked_trigger_accuracy"]),
        },
        {
            "quantity": "accuracy cost of the trigger set (paper: ticket -> V3)",
            "paper": f"{quantity(TABLE1, plan.model, plan.data, 'ticket')} -> {quantity(TABLE3, plan.model, plan.data, 'marked')}",
            "ours": f"{percent(result['signed_accuracy'] - result['accuracy'])} "
            f"({percent(result['signed_accuracy'])} -> {percent(result['accuracy'])})",
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
    workdir: Path | None = None,
    with_key: float | None = None,
) -> dict[str, Any]:
    """Figure 2 (and Fig. 5's fake1): test accuracy of the locked ticket retrained without its key, against
    the key's relative density n_s, per score; plus a random key of the same size added to the EWP-locked
    ticket. Same protocol and seed for every retraining.

    ``with_key``: the ticket's own accuracy when it was trained by this protocol already (the search's last
    matching round: the same mask, rewind weights, recipe and seed), instead of training it once more.
    With ``workdir``, each finished retraining's accuracy is kept in ``workdir/retrained.json`` and each
    running one saves a checkpoint every epoch, so a killed curve loses at most one epoch."""
    finished = read_json(workdir / "retrained.json") if workdir and (workdir / "retrained.json").is_file() else {}

    def retrained(candidate: Ticket, name: str) -> float:
        if name not in finished:
            checkpoint = None if workdir is None else workdir / f"{name.replace(' ', '-')}.checkpoint.pt"
            finished[name] = v1.retrain(candidate, data, config, device, progress, name, checkpoint)
            if workdir is not None:
                write_json(workdir / "retrained.json", finished)
                checkpoint.unlink(missing_ok=True)
        return finished[name]

    if workdir is not None:
        workdir.mkdir(parents=True, exist_ok=True)
    if with_key is None:
        with_key = retrained(ticket, "ticket (with key)")
    without: dict[str, list[float]] = {name: [] for name in scores}
    fake1: list[float] = []
    for density in densities:
        splits = {name: v1.split_key(ticket, density, name) for name in scores}
        for name, (locked, _) in splits.items():
            without[name].append(retrained(locked, f"{name} n_s={density}"))
        locked, key = splits.get("ewp", splits[scores[0]])
        forged = v1.merge_key(locked, v1.forge_random_key(locked.mask, locked.rewind, key.size(), seed=1))
        fake1.append(retrained(forged, f"fake1 n_s={density}"))
    return {
        "dense_accuracy": ticket.metadata.get("dense_accuracy"),
        "ticket_density": ticket.mask.density(),
        "accuracy_with_key": with_key,
        "densities": list(densities),
        "without_key": without,
        "fake1": fake1,
    }


def fig2_trainings(plan: Plan) -> int:
    """How many retrainings ``run_fig2`` runs: per key density, one per score and one with a random key added
    (fake1); the ticket with its key is the search's."""
    return len(plan.densities) * (len(plan.scores) + 1)


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
    """Figure 2 on the plan's ticket; the ticket with its key is the search's last round (the plan's search
    trains with ``plan.train``), so its accuracy is read, not trained a second time."""
    ticket = run.ticket()
    curve = key_density_curve(
        ticket, run.data, run.plan.train, run.plan.densities, run.plan.scores, run.device, run.progress,
        run.out / "fig2", with_key=ticket.accuracy,
    )
    plot_key_density(curve, run.plan.eps, run.out / "fig2.png")
    return curve | {"eps": run.plan.eps, "figures": ["fig2.png"]}


def _smallest_failing_density(result: dict[str, Any], score: str) -> float | None:
    target = result["dense_accuracy"] if result["dense_accuracy"] is not None else result["accuracy_with_key"]
    accuracies = result["without_key"].get(score, [])
    failing = [d for d, a in zip(result["densities"], accuracies) if a < target - result["eps"]]
    return min(failing, default=None)


def rows_fig2(result: dict[str, Any], plan: Plan) -> list[dict[str, str]]:
    rows = []
    for score in result["without_key"]:
        smallest = _smallest_failing_density(result, score)
        rows.append(
            {
                "quantity": f"{score}: smallest n_s whose locked ticket misses dense by > eps_f",
                "paper": quantity(V1_KEY_DENSITY, plan.model, plan.data),
                "ours": "none of those tried" if smallest is None else f"{100 * smallest:g} %",
            }
        )
    for index, density in enumerate(result["densities"]):
        cells = ", ".join(f"{s} {percent(a[index])}" for s, a in result["without_key"].items())
        rows.append(
            {
                "quantity": f"n_s = {100 * density:g} %: accuracy without key (fake1 key)",
                "paper": "-",
                "ours": f"{cells} ({percent(result['fake1'][index])})",
            }
        )
    rows.append({"quantity": "accuracy with key (paper: the ticket's)",
                 "paper": quantity(TABLE1, plan.model, plan.data, "ticket"), "ours": percent(result["accuracy_with_key"])})
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


def rows_attacks(result: dict[str, Any], plan: Plan) -> list[dict[str, str]]:
    rows = result["rows"]
    shipped = next((r for r in rows if r.get("family") == "none" and not r.get("error")), {})
    fake3 = next((r for r in rows if r.get("family") == "fake3" and not r.get("error")), {})
    shown = [
        {
            "quantity": "fake3: accuracy before -> after forging the code region",
            "paper": quantity(FAKE3, plan.model, plan.data),
            "ours": f"{percent(shipped.get('accuracy'))} -> {percent(fake3.get('accuracy'))}",
        }
    ]
    for row in rows:
        cells = report.display_row(row)
        shown.append(
            {
                "quantity": row["attack"],
                "paper": for_attack(row.get("family", ""), row.get("strength", 0.0), plan.model, plan.data),
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
    rows: Callable[[dict[str, Any], Plan], list[dict[str, str]]]


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

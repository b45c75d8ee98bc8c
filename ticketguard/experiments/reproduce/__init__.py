"""The paper's experiments at any scale: each writes our numbers beside the paper's into one report.

Experiments (``EXPERIMENTS``) share two stages stored in the output folder: the extreme ticket (``search/``,
``ticket/``; the search itself resumes mid-way) and the protected ticket (V2 signature + V3 trigger set:
``protected/``, ``claim.json``, ``protection.json``). Each experiment's numbers are stored in
``results/<name>.json`` and attack-grid points in ``grid/points``, so a rerun skips what is finished; a failed
experiment is recorded with its error and the others go on. ``--scale`` shrinks the per-class data, the epochs,
the search and the grids together, so the same code runs minutes on a CPU or the full 182-epoch protocol.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ticketguard.core.files import atomic_path
from ticketguard.experiments import report
from ticketguard.experiments.reproduce.experiments import (
    EXPERIMENTS,
    Experiment,
    Run,
    check_targets,
    key_density_curve,
    plot_key_density,
    run_experiment,
)
from ticketguard.experiments.reproduce.plan import (
    PRESETS,
    Plan,
    check_data_dir,
    check_plan,
    check_scale,
    load_scaled,
    make_plan,
    make_preset_plan,
    resolve_preset,
)
from ticketguard.experiments.reproduce.status import Stage, Status, campaign_status

__all__ = [
    "EXPERIMENTS", "PRESETS", "Experiment", "Plan", "Run", "Stage", "Status", "campaign_status", "check_data_dir",
    "check_plan", "check_scale", "check_targets", "key_density_curve", "load_scaled", "make_plan",
    "make_preset_plan", "plot_key_density", "resolve_preset", "run_experiment", "write_report",
]


def write_report(out: Path, plan: Plan, results: dict[str, dict[str, Any]], seconds: float) -> Path:
    """report.md: the settings, then per experiment our numbers beside the paper's and its figures."""
    sections = [
        f"# Reproduction: {plan.model} on {plan.data} at scale {plan.scale:g}",
        "",
        (
            f"{plan.epochs} epochs per training run, train/test images per class "
            f"{plan.train_per_class or 'all'}/{plan.test_per_class or 'all'}, IMP ratios {list(plan.ratios)} "
            f"(at most {plan.max_rounds} rounds), rewind epoch {plan.rewind_epoch}; {seconds:.0f} s. "
            "The paper's numbers are its own (Appendix A of the design map), on the same data set, or on CIFAR-10 "
            "for a data set it did not use; a quantity it does not report shows -."
        ),
        "",
    ]
    for name, result in results.items():
        experiment = EXPERIMENTS[name]
        sections += [f"## {experiment.title}", ""]
        if result.get("error"):
            sections += [f"Failed: {result['error']}", ""]
            continue
        rows = experiment.rows(result, plan)
        sections += [report.markdown_table(rows, ["quantity", "paper", "ours"]), ""]
        sections += [f"![{figure}]({figure})" for figure in result.get("figures", [])]
        sections.append("")
    path = out / "report.md"
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(sections))
    return path

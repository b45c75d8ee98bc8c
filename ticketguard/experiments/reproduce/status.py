"""Where a reproduction stands, read from its folder alone: what is finished, which training is running and at
which epoch, and how many epochs the known stages still need, so that a campaign spanning days and machines can
be followed without loading its data or writing to its folder."""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from ticketguard.artifacts.ticket import is_ticket_folder
from ticketguard.core.errors import InputError
from ticketguard.core.files import load_checkpoint, read_json
from ticketguard.experiments.demo import PROTECTED_CHECKPOINT, SIGNATURE_ONLY, SIGNATURE_ONLY_CHECKPOINT
from ticketguard.experiments.reproduce.experiments import (
    EXPERIMENTS,
    PROTECTION_NUMBERS,
    attack_points,
    fig2_trainings,
)
from ticketguard.experiments.reproduce.plan import Plan
from ticketguard.search.imp import SearchState, next_ratio, round_path

DONE, RUNNING, TO_DO = "done", "running", "to do"


@dataclass(frozen=True)
class Stage:
    """One row of the status: a training, a set of them, or a result; ``epochs_left`` is None where unknown."""

    name: str
    state: str
    detail: str
    epochs_left: int | None


@dataclass(frozen=True)
class Status:
    stages: list[Stage]
    seconds_per_epoch: float | None
    """the dense training's measured pace, the best guess for every later training"""
    search_done: bool

    @property
    def epochs_left(self) -> int:
        """What the known stages still need; the search's remaining rounds depend on their outcomes."""
        return sum(stage.epochs_left or 0 for stage in self.stages)


def campaign_status(out: Path) -> Status:
    """The status of the reproduction in ``out`` (its plan.json, search state, stored results, checkpoints)."""
    if not (out / "plan.json").is_file():
        raise InputError(f"{out} holds no reproduction (no plan.json); run `ticketguard reproduce --out {out}` first")
    plan = _stored_plan(read_json(out / "plan.json"))
    search = out / "search" / "search.json"
    state = read_json(search) if search.is_file() else None
    stages = _search_stages(out, plan, state)
    search_done = is_ticket_folder(out / "ticket") or bool(state and state.get("done"))
    stages.append(_ticket_stage(out))
    stages += _protection_stages(out, plan)
    stages.append(_fig2_stage(out, plan))
    stages.append(_grid_stage(out, plan))
    stages += [
        Stage(f"result: {name}", DONE if (out / "results" / f"{name}.json").is_file() else TO_DO, "", None)
        for name in EXPERIMENTS
    ]
    pace = state["seconds"][0] / plan.epochs if state and state.get("seconds") else None
    return Status(stages, pace, search_done)


def _stored_plan(record: dict[str, Any]) -> Plan:
    names = {f.name for f in fields(Plan)}
    try:
        return Plan(**{k: tuple(v) if isinstance(v, list) else v for k, v in record.items() if k in names})
    except TypeError as err:
        raise InputError(f"plan.json is not a reproduction plan ({err})") from None


def _training(checkpoint: Path, name: str, epochs: int) -> Stage:
    """A training that is running (its checkpoint exists) or still to do."""
    if not checkpoint.is_file():
        return Stage(name, TO_DO, f"{epochs} epochs", epochs)
    saved = load_checkpoint(checkpoint)
    done, total = int(saved.get("epoch", 0)), int(saved.get("config", {}).get("epochs", epochs))
    return Stage(name, RUNNING, f"{done} of {total} epochs finished", total - done)


def _search_stages(out: Path, plan: Plan, state: dict[str, Any] | None) -> list[Stage]:
    workdir = out / "search"
    if state is None:
        return [_training(round_path(workdir, 0, "checkpoint"), "dense training", plan.epochs)]
    stages = []
    for row, seconds in zip(state["history"], state["seconds"]):
        name = "dense training" if row["ratio"] is None else f"search round {row['round']} (r = {row['ratio']:.4g})"
        verdict = "" if row["ratio"] is None else f", {'matches' if row['matched'] else 'does not match'}"
        stages.append(Stage(
            name, DONE, f"{100 * row['density']:.2f} % of the weights, test accuracy {100 * row['accuracy']:.2f} %"
            f"{verdict}, {seconds:,.0f} s", 0,
        ))
    if not state.get("done"):
        index, ratio = len(state["history"]), next_ratio(plan.search, SearchState(**state))
        name = f"search round {index} (r = {ratio:.4g})"
        stages.append(_training(round_path(workdir, index, "checkpoint"), name, plan.epochs))
    return stages


def _ticket_stage(out: Path) -> Stage:
    if is_ticket_folder(out / "ticket"):
        return Stage("extreme ticket", DONE, "ticket/", None)
    return Stage("extreme ticket", TO_DO, "when the search ends", None)


def _protection_stages(out: Path, plan: Plan) -> list[Stage]:
    stages = []
    for name, numbers, checkpoint in (
        ("V2 alone (its cost)", SIGNATURE_ONLY, SIGNATURE_ONLY_CHECKPOINT),
        ("protect (V2 + V3)", PROTECTION_NUMBERS, PROTECTED_CHECKPOINT),
    ):
        finished = (out / numbers).is_file()
        stages.append(Stage(name, DONE, numbers, 0) if finished else _training(out / checkpoint, name, plan.epochs))
    return stages


def _fig2_stage(out: Path, plan: Plan) -> Stage:
    total = fig2_trainings(plan)
    path = out / "fig2" / "retrained.json"
    finished = len(read_json(path)) if path.is_file() else 0
    running = sorted((out / "fig2").glob("*.checkpoint.pt")) if (out / "fig2").is_dir() else []
    left = (total - finished) * plan.epochs
    detail = f"{finished} of {total} trainings finished"
    if running:
        current = _training(running[0], "", plan.epochs)
        left -= plan.epochs - (current.epochs_left or 0)
        detail += f"; one running, {current.detail}"
    return Stage("Figure 2 trainings", DONE if finished == total else RUNNING if finished or running else TO_DO,
                 detail, left)


def _grid_stage(out: Path, plan: Plan) -> Stage:
    points = attack_points(plan)
    folder = out / "grid" / "points"
    left = [p for p in points if not (folder / f"{p.key}.json").is_file()]
    tuning = sum(int(p.strength) for p in left if "finetune" in p.spec)
    state = DONE if not left else TO_DO if len(left) == len(points) else RUNNING
    return Stage("attack grid", state, f"{len(points) - len(left)} of {len(points)} points finished", tuning)

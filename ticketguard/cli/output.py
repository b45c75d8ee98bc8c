"""What the CLI shows: results on stdout (tables or --json), logs and progress bars on stderr."""

from __future__ import annotations

import json
import math
import time
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from ticketguard.experiments.paper import percent

console = Console(stderr=True)
"""Logs, progress and errors: stderr, so that `ticketguard info X > f` keeps only the result."""
results = Console()
"""Results: stdout."""


class LineProgress(Progress):
    """Progress for a console that is not a terminal (a run logged to a file, e.g. under nohup): one line each
    time a task moves on, with its elapsed and remaining time, where a live bar would show nothing.

    The time left is read from the steps after the first one where there are any: the first step also carries
    the setup (decoding a data set, compiling), which made a 30-epoch training's first estimates twice too long."""

    def __init__(self, *columns: Any, **kwargs: Any) -> None:
        super().__init__(*columns, **kwargs)
        self._started: dict[TaskID, tuple[float, float]] = {}
        self._first_step: dict[TaskID, tuple[float, float]] = {}

    def add_task(self, description: str, *args: Any, **kwargs: Any) -> TaskID:
        task_id = super().add_task(description, *args, **kwargs)
        self._started[task_id] = (time.monotonic(), self._tasks[task_id].completed)
        return task_id

    def update(self, task_id: TaskID, **kwargs: Any) -> None:
        before = self._tasks[task_id].completed
        super().update(task_id, **kwargs)
        self._report(task_id, before)

    def advance(self, task_id: TaskID, advance: float = 1) -> None:
        before = self._tasks[task_id].completed
        super().advance(task_id, advance)
        self._report(task_id, before)

    def _report(self, task_id: TaskID, before: float) -> None:
        task = self._tasks[task_id]
        started_at, started_from = self._started[task_id]
        if task.completed == before:
            return
        now = time.monotonic()
        elapsed = now - started_at
        first_at, first_done = self._first_step.setdefault(task_id, (now, task.completed))
        if task.completed > first_done:
            per_step = (now - first_at) / (task.completed - first_done)
        else:
            per_step = elapsed / max(task.completed - started_from, 1)
        left = f"{per_step * (task.total - task.completed):.0f} s left" if task.total else ""
        status = task.fields.get("status", "")
        self.console.print(
            f"{task.description}: {task.completed:g}/{task.total:g} after {elapsed:.0f} s, {left} {status}".rstrip()
        )


def progress_bar() -> Progress:
    """A live bar on a terminal; one line per step when the output is logged."""
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[status]}"),
    )
    if console.is_terminal:
        return Progress(*columns, console=console)
    return LineProgress(*columns, console=console, auto_refresh=False)


def emit_json(data: Any) -> None:
    """Machine-readable result on stdout; non-finite numbers become null so that it stays valid JSON."""
    results.print_json(json.dumps(_finite(data), default=str), highlight=False)


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def print_verdict(report: dict[str, Any], title: str) -> None:
    """One table for every verifying command: each piece of evidence, what was unavailable, the decision."""
    table = Table(title=f"{title}: {report['decision']}")
    for column in ("evidence", "score", "needed", "p-value", "passed", "details"):
        table.add_column(column)
    for item in report["evidence"]:
        p_value = item.get("p_value")
        table.add_row(
            item["name"], percent(item["score"]), percent(item["threshold"]),
            "-" if p_value is None else f"{p_value:.3g}", "yes" if item["passed"] else "no",
            _evidence_details(item),
        )
    for item in report.get("unavailable", []):
        table.add_row(item["name"], "-", "-", "-", "n/a", f"not computed: {item['reason']}")
    results.print(table)
    level = report.get("false_claim_probability")
    summary = f"alpha {report['alpha']:g}"
    if level is not None:
        summary += f"; false-claim probability {level:.3g}"
    if "claim_signed" in report:
        summary += f"; claim {'signed, signature valid' if report['claim_signed'] else 'unsigned'}"
        summary += f", created {report.get('claim_created')} (stated by the claimant, unverified)"
    stamped = report.get("trusted_time")
    if isinstance(stamped, dict):
        summary += f"; trusted time {stamped['time']} by {stamped['authority']}: holds against {stamped['holds_against']}"
    elif stamped:
        summary += f"; {stamped}"
    reading = report.get("reading", {})
    if "density_read" in reading:
        summary += (
            f"; suspect's mask read on its own terms: {percent(reading['density_read'])} of the weights "
            f"({reading['kept_read']} kept; the owner's ticket keeps {reading['kept_by_owner']})"
        )
    elif "threshold" in reading:
        summary += f"; suspect's mask read: weights of magnitude >= {reading['threshold']:.3g}"
    results.print(summary, highlight=False)


def _evidence_details(item: dict[str, Any]) -> str:
    details = item.get("details", {})
    if item["name"] == "qr-signature":
        decoded = details.get("decoded")
        state = "no decode" if decoded is None else (
            f"decodes {decoded!r}" + ("" if details.get("decodes_to_claim") else " (NOT the claimed payload)")
        )
        return f"{state}; {details.get('matches')}/{details.get('modules')} modules match"
    if item["name"] == "fingerprint":
        return (
            f"keeps {details.get('kept_of_reference')} of the reference's {details.get('reference_kept')} "
            f"weights; an innocent ticket would keep about {details.get('expected_by_chance', 0):.0f}"
        )
    if item["name"] == "trigger":
        text = f"{details.get('agreed')}/{details.get('trials')} agree; chance {percent(details.get('chance'), 1)}"
        if not item.get("decides_alone", True):
            return text + "; labels chosen freely: never decides alone"
        return text + (f"; seeds can be ground: judged at p <= {details['level']:.2g}" if "level" in details else "")
    return ", ".join(f"{k} {percent(v) if isinstance(v, float) else v}" for k, v in details.items())

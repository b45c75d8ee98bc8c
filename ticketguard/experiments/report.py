"""Tables and figures of an evaluation: Markdown tables, accuracy and evidence against attack strength, and a
grid of the QR codes read back from attacked models (paper Figs. 3, 4 and 6). Figures are drawn on matplotlib
``Figure`` objects (Agg), never through pyplot's global state, and written atomically."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from ticketguard.core.files import atomic_path
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
from ticketguard.schemes import qr
from ticketguard.schemes.signature import Signature

log = logging.getLogger(__name__)

CURVES = ("magnitude pruning", "random pruning", "add-on", "add-on + defence")
COLUMNS = (
    "attack",
    "weights left",
    "test accuracy",
    "QR decodes",
    "match rate",
    "QR p-value",
    "trigger accuracy",
    "trigger p-value",
    "fingerprint p-value",
    "owned",
    "note",
)
SERIES = (
    ("accuracy", "test accuracy"),
    ("match_rate", "QR module match rate"),
    ("trigger_accuracy", "trigger accuracy"),
)


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    """A GitHub Markdown table of ``columns`` (missing cells empty; pipes escaped)."""

    def cell(value: Any) -> str:
        return "" if value is None else str(value).replace("|", "\\|")

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def _cell(value: Any, kind: str) -> str:
    if kind == "percent" or value is None:
        return percent(value)
    if kind == "p":
        return f"{value:.1e}"
    if kind == "bool":
        return "yes" if value else "no"
    return str(value)


def display_row(row: dict[str, Any]) -> dict[str, str]:
    """A row as the tables show it: percentages, p-values in e-notation, yes/no."""
    kinds = {
        "density": "percent",
        "accuracy": "percent",
        "qr_decodes": "bool",
        "match_rate": "percent",
        "qr_p_value": "p",
        "trigger_accuracy": "percent",
        "trigger_p_value": "p",
        "fingerprint_p_value": "p",
        "owned": "bool",
    }
    note = row.get("error") or ("not read: " + ", ".join(row["not_read"]) if row.get("not_read") else "")
    values = [row["attack"], *(_cell(row.get(k), kind) for k, kind in kinds.items()), note]
    return dict(zip(COLUMNS, values))


def save_figure(figure: Figure, path: str | Path) -> Path:
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=110)
    log.info("wrote %s", path)
    return Path(path)


def plot_curves(rows: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """One panel per attack family (x: strength, in % of weights), one line per measured quantity, and the
    unattacked value as the point at 0."""
    baseline = next((r for r in rows if r.get("family") == "none" and not r.get("error")), None)
    families = [f for f in CURVES if any(r.get("family") == f for r in rows)]
    figure = Figure(figsize=(4.2 * max(len(families), 1), 3.6), layout="constrained")
    for index, family in enumerate(families, start=1):
        axes = figure.add_subplot(1, len(families), index)
        points = sorted(
            (r for r in rows if r.get("family") == family and not r.get("error")), key=lambda r: r["strength"]
        )
        if baseline is not None:
            points = [{**baseline, "strength": 0.0}, *points]
        for key, label in SERIES:
            shown = [(100 * r["strength"], 100 * r[key]) for r in points if r.get(key) is not None]
            if shown:
                axes.plot(*zip(*shown), marker="o", label=label)
        decoded = [100 * r["strength"] for r in points if r.get("qr_decodes")]
        if decoded:
            axes.scatter(decoded, [102] * len(decoded), marker="s", color="black", s=12, label="QR decodes")
        axes.set_title(family)
        axes.set_xlabel("attack strength (%)")
        axes.set_ylabel("%")
        axes.set_ylim(0, 105)
        axes.grid(alpha=0.3)
        if index == 1:
            axes.legend(fontsize=7, loc="lower left")
    return save_figure(figure, path)


def qr_grid(rows: Sequence[dict[str, Any]], signature: Signature, path: str | Path, columns: int = 6) -> Path:
    """The code read back from every attacked model (fixed patterns restored), modules that differ from the
    owner's in red, titled with the attack and whether it decodes."""
    spec = signature.spec
    expected = qr.make_qr(
        signature.payload, error=spec.error, version=spec.version, mask_pattern=spec.mask_pattern
    ).data_modules
    readable = [r for r in rows if r.get("qr_modules")]
    count = max(len(readable), 1)
    lines = -(-count // columns)
    figure = Figure(figsize=(2.1 * min(count, columns), 2.4 * lines), layout="constrained")
    reference = np.pad(qr.assemble(spec, expected), 2)
    for index, row in enumerate(readable, start=1):
        modules = np.frombuffer(row["qr_modules"].encode(), dtype=np.uint8) == ord("1")
        image_bits = np.pad(qr.assemble(spec, modules), 2)
        image = np.where(image_bits[..., None], 0.0, 1.0) * np.ones(3)
        image[image_bits != reference] = (0.85, 0.1, 0.1)
        axes = figure.add_subplot(lines, min(count, columns), index)
        axes.imshow(image, interpolation="nearest")
        title = row["attack"].replace(" then ", "\nthen ")
        axes.set_title(f"{title}\n{'decodes' if row.get('qr_decodes') else 'no decode'}", fontsize=7)
        axes.set_axis_off()
    return save_figure(figure, path)


def _first(rows: Sequence[dict[str, Any]], family: str) -> dict[str, Any]:
    return next((r for r in rows if r.get("family") == family and not r.get("error")), {})


def _strongest_decoded(rows: Sequence[dict[str, Any]], family: str) -> str:
    decoded = [r["strength"] for r in rows if r.get("family") == family and r.get("qr_decodes")]
    return f"{100 * max(decoded):.0f} %" if decoded else "none"


def paper_comparison(results: dict[str, Any], model: str = "resnet20", data: str = "digits") -> list[dict[str, str]]:
    """Our numbers beside the paper's (its CIFAR-10 numbers, marked (C10), for data sets it did not use)."""
    ticket, protection, key, rows = results["ticket"], results["protection"], results["v1"], results["rows"]
    fake3 = _first(rows, "fake3")
    return [
        {
            "quantity": "extreme ticket: weights left (pruning spec)",
            "paper": f"{quantity(TABLE1, model, data, 'density')} {quantity(TABLE1, model, data, 'counts')}",
            "ours": f"{percent(ticket['density'])} ({', '.join(map(str, ticket['counts'] or []))})",
        },
        {
            "quantity": "extreme ticket: accuracy (dense)",
            "paper": f"{quantity(TABLE1, model, data, 'ticket')} ({quantity(TABLE1, model, data, 'dense')})",
            "ours": f"{percent(ticket['accuracy'])} ({percent(ticket['dense_accuracy'])})",
        },
        {
            "quantity": "V2: accuracy after the signature (cost)",
            "paper": quantity(TABLE2, model, data),
            "ours": f"{percent(protection['v2_accuracy'])} ({percent(protection['v2_accuracy'] - ticket['accuracy'])})",
        },
        {
            "quantity": "V3: test (trigger) accuracy, marked",
            "paper": quantity(TABLE3, model, data, "marked"),
            "ours": f"{percent(protection['accuracy'])} ({percent(protection['trigger_accuracy'])})",
        },
        {
            "quantity": "V3: trigger accuracy of the unmarked ticket",
            "paper": quantity(TABLE3, model, data, "unmarked"),
            "ours": percent(protection["unmarked_trigger_accuracy"]),
        },
        {
            "quantity": "V1: retrained accuracy without key / with key / fake1 key "
            f"(key {percent(key['key_density'])})",
            "paper": f"misses dense by > 1 % at a {quantity(V1_KEY_DENSITY, model, data)} key (Fig. 2, 5)",
            "ours": f"{percent(key['accuracy_without_key'])} / {percent(key['accuracy_with_key'])} / "
            f"{percent(key['accuracy_fake1'])} (target {percent(key['target'])})",
        },
        {
            "quantity": "V2: strongest magnitude pruning that still decodes",
            "paper": quantity(V2_PRUNING_DECODES, model, data),
            "ours": _strongest_decoded(rows, "magnitude pruning"),
        },
        {
            "quantity": "fake3: accuracy after forging the code region",
            "paper": quantity(FAKE3, model, data),
            "ours": f"{percent(protection['accuracy'])} -> {percent(fake3.get('accuracy'))}",
        },
    ]


def write_demo_report(out: str | Path, results: dict[str, Any], figures: Sequence[str]) -> Path:
    """report.md: the paper comparison, the protection steps, the attack grid and the figures."""
    out = Path(out)
    protection, key = results["protection"], results["v1"]
    steps = [
        {
            "step": "extreme ticket (IMP, late rewinding)",
            "accuracy": percent(results["ticket"]["accuracy"]),
            "detail": f"{percent(results['ticket']['density'])} weights left",
        },
        {
            "step": "V2 signature, retrained",
            "accuracy": percent(protection["v2_accuracy"]),
            "detail": f"{results['signature'].payload!r} in {results['signature'].regions[0].layer}, "
            f"{protection['cells_changed']} cells changed",
        },
        {
            "step": "V2 + V3 trigger set, retrained (shipped)",
            "accuracy": percent(protection["accuracy"]),
            "detail": f"trigger accuracy {percent(protection['trigger_accuracy'])}, "
            f"add-on defence t = {protection['threshold']:.3g}",
        },
        {
            "step": "V1 key split, locked retrained",
            "accuracy": percent(key["accuracy_without_key"]),
            "detail": f"with key {percent(key['accuracy_with_key'])}, fake1 key {percent(key['accuracy_fake1'])}, "
            f"ownership {'shown' if key['owned'] else 'not shown'}",
        },
    ]
    sections = [
        "# ticketguard demo: ResNet-20 on digits",
        "",
        (
            f"Finished in {results['seconds']:.0f} s. Artifacts beside this file: `ticket/`, "
            "`protected/` (ships), "
            "`claim.json` (secret), `split/` (V1 locked ticket and key), `grid/` (results.json, .csv, .md)."
        ),
        "",
        "## Our numbers beside the paper's (ResNet-20; paper on CIFAR-10, ours on digits)",
        "",
        markdown_table(paper_comparison(results), ["quantity", "paper", "ours"]),
        "",
        "## Protection",
        "",
        markdown_table(steps, ["step", "accuracy", "detail"]),
        "",
        "## Attacks on the shipped ticket (p-values at alpha = 1e-6)",
        "",
        markdown_table(
            [display_row(r) | {"paper": for_attack(r.get("family", ""), r.get("strength", 0.0), "resnet20", "digits")}
             for r in results["rows"]],
            [*COLUMNS, "paper"],
        ),
        "",
        "## Figures",
        "",
        *(f"![{name}]({name})" for name in figures),
        "",
    ]
    path = out / "report.md"
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(sections))
    return path

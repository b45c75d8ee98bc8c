"""The paper's own numbers (Chen et al., NeurIPS 2021), as the design map's Appendix A quotes them, to show
beside ours. Never estimated or interpolated here: a quantity the paper does not report reads "-".

Keys are (model, data set). Runs on a data set the paper did not use (digits) are shown beside its
CIFAR-10 numbers; the reports' headings say so.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

Setting = tuple[str, str]
R20_C10, R20_C100 = ("resnet20", "cifar10"), ("resnet20", "cifar100")
R18_C10, R18_C100 = ("resnet18", "cifar10"), ("resnet18", "cifar100")
MISSING = "-"


def percent(value: float | None, digits: int = 2) -> str:
    """The one percent formatter: a fraction as '12.34 %', None as '-'."""
    return MISSING if value is None else f"{100 * value:.{digits}f} %"


# Table 1: dense accuracy, extreme-ticket accuracy, weights left, matching rounds at ratios 0.2/0.1/0.05/0.01.
TABLE1: dict[Setting, dict[str, str]] = {
    R20_C10: {"dense": "91.67 %", "ticket": "91.66 %", "density": "19.369 %", "counts": "(5, 1, 8, 1)"},
    R20_C100: {"dense": "66.36 %", "ticket": "66.39 %", "density": "19.901 %", "counts": "(6, 0, 4, 7)"},
    R18_C10: {"dense": "93.67 %", "ticket": "93.60 %", "density": "1.236 %", "counts": "(18, 3, 0, 6)"},
    R18_C100: {"dense": "72.44 %", "ticket": "72.59 %", "density": "2.251 %", "counts": "(17, 0, 0, 0)"},
}
# Table 2: V2, accuracy after embedding the signature and retraining (drop against the ticket).
TABLE2: dict[Setting, str] = {
    R20_C10: "91.37 % (-0.29)",
    R20_C100: "66.14 % (-0.25)",
    R18_C10: "93.56 % (-0.11)",
    R18_C100: "72.35 % (-0.24)",
}
# Table 3: V3, test accuracy (trigger accuracy) of the ticket, and of the ticket trained with M_s and T.
TABLE3: dict[Setting, dict[str, str]] = {
    R20_C10: {"unmarked": "91.66 % (16.0 %)", "marked": "91.46 % (91.0 %)"},
    R20_C100: {"unmarked": "66.36 % (0.0 %)", "marked": "65.39 % (90.0 %)"},
}
# Table 4: V1 transfer attack, the locked ticket (5 % key) retrained on the other data set, per score.
TABLE4: dict[Setting, dict[str, str]] = {
    R20_C10: {"omp": "59.80 %", "ewp": "60.27 %", "betweenness": "59.61 %"},  # C10 -> C100
    R20_C100: {"omp": "87.66 %", "ewp": "88.21 %", "betweenness": "87.22 %"},  # C100 -> C10
}
# Table 5: V3 under one-shot magnitude pruning of the remaining weights: test (trigger) accuracy.
TABLE5: dict[Setting, dict[float, str]] = {
    R20_C10: {
        0.0: "91.46 (91.0)",
        0.05: "91.33 (89.0)",
        0.1: "90.66 (90.0)",
        0.2: "87.86 (81.0)",
        0.5: "33.04 (18.0)",
    },
    R20_C100: {
        0.0: "65.39 (90.0)",
        0.05: "64.78 (91.0)",
        0.1: "62.96 (73.0)",
        0.2: "50.14 (16.0)",
        0.5: "8.56 (0.0)",
    },
}
# Table 5, last line: the V3 ticket fine-tuned on the other data set, test accuracy there.
TRANSFER_V3: dict[Setting, str] = {R20_C10: "61.59 % on C100", R20_C100: "88.21 % on C10"}
# Table 6: V2 under pruning, test accuracy; the design map labels its two columns C10 / C100 (ResNet-20).
TABLE6: dict[Setting, dict[str, dict[float, str]]] = {
    R20_C10: {
        "magnitude": {0.0: "91.37", 0.05: "91.25", 0.1: "90.72", 0.2: "88.03", 0.3: "80.08", 0.5: "36.62"},
        "random": {0.05: "60.87", 0.1: "30.49", 0.2: "11.95", 0.3: "12.05", 0.5: "10.00"},
    },
    R20_C100: {
        "magnitude": {0.0: "72.35", 0.05: "72.27", 0.1: "71.42", 0.2: "69.51", 0.3: "60.31", 0.5: "9.24"},
        "random": {0.05: "58.23", 0.1: "22.67", 0.2: "3.23", 0.3: "1.0", 0.5: "1.0"},
    },
}
# The strongest one-shot magnitude pruning after which the QR code still decodes (§4.3).
V2_PRUNING_DECODES: dict[Setting, str] = {R20_C10: "20 %", R18_C10: "5 %"}
# Table 8: add-on on ResNet-20 CIFAR-10: accuracy (weights left), decodable, matches.
TABLE8: dict[float, str] = {
    0.0: "91.53 % (19.369 %), decodes, matches",
    0.005: "91.04 % (19.789 %), decodes, matches",
    0.01: "90.23 % (20.179 %), decodes, no match",
    0.02: "86.64 % (21.009 %), no decode",
    0.05: "79.49 % (23.386 %), no decode",
    0.1: "71.06 % (27.402 %), no decode",
}
FAKE3: dict[Setting, str] = {R20_C10: "91.37 % -> 57.00 %"}
# Fig. 2 / Fig. 5: the relative key density from which the locked ticket misses dense by more than eps_f.
V1_KEY_DENSITY: dict[Setting, str] = {R20_C10: "5-10 %"}


def _paper_data(data: str) -> str:
    """The paper's data set to compare a run with: its own, or CIFAR-10 for one the paper did not use."""
    return data if data in ("cifar10", "cifar100") else "cifar10"


def quantity(table: Mapping[Setting, Any], model: str, data: str, *keys: Any) -> str:
    """One number of a table as text, e.g. ``quantity(TABLE1, "resnet20", "cifar10", "density")``."""
    entry = table.get((model, _paper_data(data)))
    for key in keys:
        entry = entry.get(key) if isinstance(entry, Mapping) else None
    return MISSING if entry is None else str(entry)


def for_attack(family: str, strength: float, model: str, data: str) -> str:
    """The paper's numbers for one attack-grid row: V2 (Table 6) and V3 (Table 5) under pruning, Table 8 for
    add-on (ResNet-20 CIFAR-10 only)."""
    if family == "none":
        return (
            f"V2 {quantity(TABLE6, model, data, 'magnitude', 0.0)}, V3 {quantity(TABLE5, model, data, 0.0)}"
        )
    if family == "magnitude pruning":
        return (
            f"V2 {quantity(TABLE6, model, data, 'magnitude', strength)}, "
            f"V3 {quantity(TABLE5, model, data, strength)}"
        )
    if family == "random pruning":
        return f"V2 {quantity(TABLE6, model, data, 'random', strength)}"
    if family == "add-on" and (model, _paper_data(data)) == R20_C10:
        return TABLE8.get(strength, MISSING)
    if family == "transfer":
        return quantity(TRANSFER_V3, model, data)
    if family == "fake3":
        return quantity(FAKE3, model, data)
    return MISSING

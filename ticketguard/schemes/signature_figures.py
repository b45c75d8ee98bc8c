"""The picture of a V2 check: the code read from a suspect beside the one the claim expects."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from matplotlib.figure import Figure

from ticketguard.core.files import atomic_path
from ticketguard.schemes import qr

if TYPE_CHECKING:  # signature.py writes this picture, so it cannot be imported from here at run time
    from ticketguard.schemes.signature import Reading

log = logging.getLogger(__name__)


def save_comparison_image(path: str | Path, reading: Reading) -> None:
    """PNG of the extracted code (voted, fixed patterns restored; modules that differ in red) next to the
    expected one."""
    spec = reading.signature.spec
    figure = Figure(figsize=(6, 3.2))
    expected = np.pad(qr.assemble(spec, reading.expected), 2)
    extracted = np.pad(qr.assemble(spec, reading.voted), 2)
    red = np.array([0.85, 0.1, 0.1])
    panels = (("extracted", extracted, extracted != expected), ("expected", expected, np.zeros_like(expected)))
    for index, (title, modules, wrong) in enumerate(panels, start=1):
        image = np.where(modules[..., None], 0.0, 1.0) * np.ones(3)
        image[wrong] = red
        axes = figure.add_subplot(1, 2, index)
        axes.imshow(image, interpolation="nearest")
        axes.set_title(title)
        axes.set_axis_off()
    decoded = reading.decoded.text if reading.decoded.text is not None else "no decode"
    figure.suptitle(f"{decoded!s} | match {100 * reading.match_rate:.1f} % | p = {reading.p_value:.2g}")
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=120)
    log.info("wrote %s", path)

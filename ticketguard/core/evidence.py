"""V(...): evidence and verdicts. A decision is a value with its score, threshold and false-claim probability.

Schemes produce ``Evidence``; only ``ticketguard.verification.verify`` combines pieces into a ``Verdict``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from ticketguard.core.errors import InputError

DEFAULT_ALPHA = 1e-6
FORGERY_TRIALS = 2**64
FORGERY_LEVEL = 1.0 / FORGERY_TRIALS
"""A forger holding the published model can search claims of his own offline (payloads, placements) until one
reaches the threshold. Each trial succeeds with probability at most the level it must reach, so evidence he can
search passes only at p <= 2^-64: a forgery then takes more than 2^64 trials on average
(benchmarks/forgery_cost.py measures the trial rate)."""


def check_alpha(alpha: float) -> float:
    """A false-claim level must lie strictly between 0 and 1: 0 can never be met, 1 (or more) always is."""
    if not 0.0 < alpha < 1.0:  # also refuses NaN, for which every comparison is False
        raise InputError(f"alpha (the false-claim probability) must lie in (0, 1), got {alpha}")
    return alpha


@dataclass(frozen=True)
class Evidence:
    """One check: its score against a threshold, and the probability that an innocent model passes it."""

    name: str
    score: float
    threshold: float
    passed: bool
    p_value: float | None = None
    details: dict[str, Any] = field(default_factory=dict)
    decides_alone: bool = True
    """False for evidence that shows derivation but not its direction (the fingerprint): reported, and it
    passes or fails, but ownership needs a piece that decides alone."""


@dataclass(frozen=True)
class Unavailable:
    """A piece of evidence the claim supports but this suspect does not allow to compute, and why."""

    name: str
    reason: str


@dataclass(frozen=True)
class Verdict:
    """All evidence and the overall decision: ownership is shown when any check passes at the corrected level.

    Checks with a p-value pass only below alpha / (number of such checks) (Bonferroni), so the stated
    false-claim probability bounds the whole verdict, not one check.
    """

    evidence: tuple[Evidence, ...]
    alpha: float = DEFAULT_ALPHA
    unavailable: tuple[Unavailable, ...] = ()
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def tested(self) -> int:
        return sum(e.p_value is not None for e in self.evidence)

    def decisive(self) -> list[Evidence]:
        level = self.alpha / max(self.tested, 1)
        return [e for e in self.evidence if e.passed and (e.p_value is None or e.p_value <= level)]

    @property
    def owned(self) -> bool:
        return any(e.decides_alone for e in self.decisive())

    @property
    def false_claim_probability(self) -> float | None:
        """Bonferroni bound over the decisive checks with p-values; None when no such check decided."""
        p_values = [e.p_value for e in self.decisive() if e.p_value is not None and e.decides_alone]
        return min(1.0, min(p_values) * self.tested) if p_values else None

    def to_json(self) -> dict[str, Any]:
        return {
            "decision": "ownership shown" if self.owned else "ownership not shown",
            "owned": self.owned,
            "alpha": self.alpha,
            "false_claim_probability": self.false_claim_probability,
            "evidence": [asdict(e) for e in self.evidence],
            "unavailable": [asdict(u) for u in self.unavailable],
            **self.details,
        }


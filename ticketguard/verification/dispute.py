"""dispute(): several parties claim one suspect; each claim is verified on its own, then ordered by trusted time.

A claim proves that it existed only as early as its RFC 3161 time; a claim without one proves only that it exists
now, at the dispute, so it stands after every stamped claim. Each verdict already judges the evidence a forger
could search after the fact at the forgery level (``verify``), so "holds" means: the claim's unforgeable
evidence shows ownership. The earliest claim that holds is named; when the claims that hold cannot be ordered
(several, none with a trusted time), the dispute is undecided and says why.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ticketguard.core.evidence import DEFAULT_ALPHA, Verdict
from ticketguard.verification.claim import Claim, load_claim
from ticketguard.verification.verify import SuspectLike, as_suspect, verify


@dataclass(frozen=True)
class Standing:
    """One claim in a dispute: its label, verdict and trusted time (ISO, or None when it has none checked)."""

    label: str
    verdict: Verdict
    trusted_time: str | None

    @property
    def holds(self) -> bool:
        return self.verdict.owned

    def to_json(self) -> dict[str, Any]:
        decisive = [e.name for e in self.verdict.decisive() if e.decides_alone]
        return {
            "claim": self.label,
            "holds": self.holds,
            "trusted_time": self.trusted_time,
            "decided_by": decisive,
            "shows_derivation": any(e.name == "fingerprint" and e.passed for e in self.verdict.evidence),
            "forgeable_pieces": {
                e.name: e.details["forgeable"] for e in self.verdict.evidence if "forgeable" in e.details
            },
            "verdict": self.verdict.to_json(),
        }


@dataclass(frozen=True)
class Dispute:
    """The claims in order (trusted times first, earliest first), the winner's index in it or None, and why."""

    standings: tuple[Standing, ...]
    winner: int | None
    reason: str

    def to_json(self) -> dict[str, Any]:
        return {
            "decision": "undecided" if self.winner is None else f"{self.standings[self.winner].label} wins",
            "winner": None if self.winner is None else self.standings[self.winner].label,
            "reason": self.reason,
            "claims": [s.to_json() for s in self.standings],
        }


def dispute(
    suspect: SuspectLike,
    claims: Sequence[Claim | str | Path],
    *,
    labels: Sequence[str] | None = None,
    tsa_certificate: bytes | None = None,
    alpha: float = DEFAULT_ALPHA,
) -> Dispute:
    """Verify every claim on ``suspect`` (read once) and name the earliest that holds; ``tsa_certificate`` is
    the PEM of the time-stamping authority the caller trusts, for the claims that carry a token."""
    labels = list(labels) if labels is not None else [str(c) if not isinstance(c, Claim) else f"claim {i + 1}"
                                                      for i, c in enumerate(claims)]
    loaded = as_suspect(suspect)
    standings = []
    for label, claim in zip(labels, claims):
        claim = claim if isinstance(claim, Claim) else load_claim(claim)
        stamped = tsa_certificate if claim.timestamp_token is not None else None
        verdict = verify(loaded, claim, alpha=alpha, tsa_certificate=stamped)
        trusted = verdict.details.get("trusted_time")
        standings.append(Standing(label, verdict, trusted["time"] if isinstance(trusted, dict) else None))
    ordered = tuple(sorted(standings, key=lambda s: (s.trusted_time is None, s.trusted_time or "")))
    return Dispute(ordered, *_decide(ordered))


def _decide(ordered: tuple[Standing, ...]) -> tuple[int | None, str]:
    holding = [i for i, s in enumerate(ordered) if s.holds]
    if not holding:
        return None, "no claim's unforgeable evidence shows ownership of the suspect"
    first = ordered[holding[0]]
    if first.trusted_time is not None:
        return holding[0], f"the earliest trusted time ({first.trusted_time}) among the claims that hold"
    if len(holding) == 1:
        return holding[0], "the only claim that holds (it has no trusted time)"
    names = ", ".join(ordered[i].label for i in holding)
    return None, f"{len(holding)} claims hold ({names}) and none has a trusted time, so they cannot be ordered"

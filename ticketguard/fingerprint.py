"""The ticket fingerprint: how much of the owner's whole mask an aligned suspect keeps, against what a ticket
trained independently would keep by chance.

The statistic is the count of the reference's kept weights that the aligned suspect also keeps, over every
prunable layer. Its null treats each of those cells as kept independently with the probability that the
suspect's own structure gives it: the product of the suspect's density in that output channel, that input
channel and that kernel position (a rank-one model of each layer). Those marginals are read after alignment,
so matching dense channels to dense channels, which alignment does, raises the null's expectation with it. The
p-value is Bernstein's bound on the upper tail of a sum of independent Bernoulli variables: it holds for any
probabilities, without a normal approximation, and stays meaningful far in the tail.

Alignment optimises cell-level agreement, and independently trained tickets share structure beyond those
marginals: measured on independently trained digits tickets after the same alignment, they keep about 7 % more
of the reference than the rank-one model predicts. The null therefore allows each cell INDEPENDENT_EXCESS
(25 %) more than the model's probability, and the p-value is the tail beyond that: calibrated, not exact
(benchmarks/README.md, "False claims on independent tickets", records the measurement).

The fingerprint shows that the suspect and the reference derive from one another, not in which direction, so
it is reported but never decides ownership alone: a forger could name the stolen model as his reference.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from ticketguard.evidence import DEFAULT_ALPHA, Evidence

INDEPENDENT_EXCESS = 0.25


def null_probabilities(kept: torch.Tensor, cells: torch.Tensor) -> torch.Tensor:
    """P(kept) at ``cells`` (an (n, dims) index) under the rank-one model of ``kept``'s output, input and
    kernel-position densities; evaluated only where asked, the reference keeps a share of them."""
    density = kept.float().mean()
    if density <= 0 or density >= 1:
        return torch.full((cells.shape[0],), float(density))
    probability = torch.full((cells.shape[0],), float(density))
    for axis in range(kept.dim()):
        others = [d for d in range(kept.dim()) if d != axis]
        marginal = kept.float().mean(dim=others) / density
        probability *= marginal[cells[:, axis]]
    return probability.clamp_(0.0, 1.0)


def bernstein_tail(excess: float, variance: float) -> float:
    """P(X - E X >= excess) <= exp(-excess^2 / (2 (variance + excess / 3))) for independent Bernoullis."""
    if excess <= 0:
        return 1.0
    return math.exp(-excess * excess / (2 * (variance + excess / 3)))


def needed_excess(variance: float, level: float) -> float:
    """The smallest excess whose Bernstein bound is at most ``level``."""
    log_inverse = -math.log(level)
    return log_inverse / 3 + math.sqrt((log_inverse / 3) ** 2 + 2 * log_inverse * variance)


def fingerprint_evidence(
    aligned: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor], alpha: float = DEFAULT_ALPHA
) -> Evidence:
    """The overlap of the aligned suspect's mask with the reference mask, with its Bernstein p-value."""
    hits, total, mean, model_mean, variance, layers = 0, 0, 0.0, 0.0, 0.0, {}
    for name, owned in reference.items():
        kept = aligned[name]
        modelled = null_probabilities(kept, owned.nonzero())
        model_mean += float(modelled.sum())
        probability = (modelled * (1 + INDEPENDENT_EXCESS)).clamp_(max=1.0)
        layer_hits = int((kept & owned).sum())
        hits, total = hits + layer_hits, total + int(owned.sum())
        mean += float(probability.sum())
        variance += float((probability * (1 - probability)).sum())
        layers[name] = layer_hits / max(int(owned.sum()), 1)
    p_value = bernstein_tail(hits - mean, variance)
    threshold = (mean + needed_excess(variance, alpha)) / max(total, 1)
    return Evidence(
        name="fingerprint",
        score=hits / max(total, 1),
        threshold=min(threshold, 1.0),
        passed=p_value <= alpha,
        p_value=p_value,
        details={
            "kept_of_reference": hits,
            "reference_kept": total,
            "expected_by_chance": mean,
            "expected_by_rank_one_model": model_mean,
            "layer_overlap": layers,
        },
        decides_alone=False,
    )

"""The ticket fingerprint: how much of the owner's whole mask an aligned suspect keeps, against what a ticket
trained independently would keep by chance.

The statistic is the count of the reference's kept weights that the aligned suspect also keeps, over every
prunable layer. Its null treats each of those cells as kept independently with the probability that the
suspect's own structure gives it: the product of the suspect's density in that output channel, that input
channel and that kernel position (a rank-one model of each layer). Those marginals are read after alignment,
so matching dense channels to dense channels, which alignment does, raises the null's expectation with it. On
a structurally pruned suspect only the channels alignment matched count, statistic and marginals alike. The
p-value is Bernstein's bound on the upper tail of a sum of independent Bernoulli variables: it holds for any
probabilities, without a normal approximation, and stays meaningful far in the tail.

Alignment optimises cell-level agreement, and independently trained models share structure beyond those
marginals. Measured on innocent digits models of every kind (other seeds at the owner's density, 2x denser,
4x sparser and dense; filled, fine-tuned densely, cast to float16, disguised) read and aligned as any suspect,
the share of the reference they keep exceeds the rank-one model's by an odds ratio of up to 1.4 against a
quick 25 % owner's ticket, and up to 15.3 against the demo's 16.8 % ticket, trained longer on more images
(its mask shares more of what every trained network keeps). The null therefore multiplies each cell's odds by
INDEPENDENT_ODDS_RATIO (32, twice the largest measured), and the p-value is the tail beyond that: calibrated on
these two owners, not exact (benchmarks/README.md, "False claims on every kind of innocent model").
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ticketguard.core.evidence import DEFAULT_ALPHA, Evidence
from ticketguard.core.stats import bernstein_tail, needed_excess

INDEPENDENT_ODDS_RATIO = 32.0


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


def _odds(share: float) -> float:
    return share / max(1.0 - share, 1e-12)


def _matched(tensor: torch.Tensor, observed: torch.Tensor) -> torch.Tensor:
    """``tensor`` on the output and input channels that ``observed`` (a product of the two) covers."""
    rows = observed.flatten(1).any(1)
    columns = observed.transpose(0, 1).flatten(1).any(1)
    return tensor[rows][:, columns]


def fingerprint_evidence(
    aligned: Mapping[str, torch.Tensor],
    reference: Mapping[str, torch.Tensor],
    alpha: float = DEFAULT_ALPHA,
    observed: Mapping[str, torch.Tensor] | None = None,
) -> Evidence:
    """The overlap of the aligned suspect's mask with the reference mask, with its Bernstein p-value.

    ``observed``: per layer, the cells whose channels a structurally pruned suspect still has; statistic
    and null then cover the matched channels only (the null's marginals are read there too)."""
    hits, total, mean, model_mean, variance, layers = 0, 0, 0.0, 0.0, 0.0, {}
    for name, owned in reference.items():
        kept = aligned[name]
        if observed is not None and name in observed:
            kept, owned = _matched(kept, observed[name]), _matched(owned, observed[name])
        modelled = null_probabilities(kept, owned.nonzero())
        model_mean += float(modelled.sum())
        odds = modelled / (1 - modelled).clamp(min=1e-12) * INDEPENDENT_ODDS_RATIO
        probability = odds / (1 + odds)
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
            "odds_ratio_over_rank_one_model": _odds(hits / max(total, 1)) / max(_odds(model_mean / max(total, 1)), 1e-12),
            "layer_overlap": layers,
        },
        decides_alone=False,
    )

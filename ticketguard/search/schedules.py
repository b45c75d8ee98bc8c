"""Pruning schedules: which ratio r the next round of the extreme-ticket search prunes, and when the search ends.

A schedule reads and moves its part of the search state (``ScheduleState``, saved in search.json), so a search
resumes where it stopped. ``SCHEDULES`` holds them by the name ``SearchConfig.pruning_schedule`` takes:

- ``paper``: walk the ratio list. While rounds match, pruning goes on at r; a failure reverts to the last matching
  mask and moves to the next smaller r; after the smallest r fails, the last matching mask is the extreme ticket.
- ``adaptive`` (the default): prune at the first (largest) ratio while rounds match; after the first failure,
  bisect the ratio between the last matching mask and the known failure until that gap is the last ratio t (the
  paper's 1 % extreme-sparsity resolution): about log2(r / t) trainings after the first failure.

Each schedule has its own default ratios. Adaptive starts at r = 0.5 because every round is a decision that can
fail by chance, and near the extreme ticket accuracy declines slowly while rounds vary from seed to seed by more
than that decline: r = 0.2 takes six or seven rounds through the decline, each a chance to stop early for good,
where halving crosses it in two and then only narrows the bracket between a match and a failure. On digits that
halves the trainings and gathers the seeds' tickets into a much narrower band of densities
(``benchmarks/README.md``).
"""

from __future__ import annotations

from typing import Protocol

RATIO_TOLERANCE = 1e-9


class ScheduleState(Protocol):
    """The part of the search state a schedule owns (``imp.SearchState``)."""

    ratio_index: int
    failing_ratio: float | None
    counts: list[int]


class PruningSchedule(Protocol):
    """How the ratio of each round is chosen from the ratio list and what the rounds so far decided."""

    name: str
    default_ratios: tuple[float, ...]
    """the ratios, largest first, when the search names none"""

    def initial_counts(self, ratios: tuple[float, ...]) -> list[int]:
        """The matching rounds the search reports, all zero before the first round."""
        ...

    def next_ratio(self, ratios: tuple[float, ...], state: ScheduleState) -> float | None:
        """The ratio the next round prunes from the last matching mask, or None when the schedule has ended."""
        ...

    def advance(self, ratios: tuple[float, ...], state: ScheduleState, ratio: float, matched: bool) -> None:
        """Move ``state`` on after a round pruned ``ratio`` from the last matching mask."""
        ...


class PaperSchedule:
    """The paper's walk down the ratio list; counts are the matching rounds at each ratio."""

    name = "paper"
    default_ratios = (0.2, 0.1, 0.05, 0.01)

    def initial_counts(self, ratios: tuple[float, ...]) -> list[int]:
        return [0] * len(ratios)

    def next_ratio(self, ratios: tuple[float, ...], state: ScheduleState) -> float | None:
        return ratios[state.ratio_index] if state.ratio_index < len(ratios) else None

    def advance(self, ratios: tuple[float, ...], state: ScheduleState, ratio: float, matched: bool) -> None:
        if matched:
            state.counts[state.ratio_index] += 1
        else:
            state.ratio_index += 1


class AdaptiveSchedule:
    """The first ratio until a round fails, then bisection down to the last ratio; counts are the matching
    rounds at the first ratio and while bisecting."""

    name = "adaptive"
    default_ratios = (0.5, 0.01)

    def initial_counts(self, ratios: tuple[float, ...]) -> list[int]:
        return [0, 0]

    def next_ratio(self, ratios: tuple[float, ...], state: ScheduleState) -> float | None:
        if state.failing_ratio is None:
            return ratios[0]
        finest = ratios[-1]
        if state.failing_ratio <= finest * (1 + RATIO_TOLERANCE):
            return None
        return max(state.failing_ratio / 2, finest)

    def advance(self, ratios: tuple[float, ...], state: ScheduleState, ratio: float, matched: bool) -> None:
        if not matched:
            state.failing_ratio = ratio
        elif state.failing_ratio is None:
            state.counts[0] += 1
        else:  # the known failure, seen from the new last matching mask
            state.counts[1] += 1
            state.failing_ratio = 1 - (1 - state.failing_ratio) / (1 - ratio)


SCHEDULES: dict[str, PruningSchedule] = {schedule.name: schedule for schedule in (PaperSchedule(), AdaptiveSchedule())}

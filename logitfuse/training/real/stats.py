"""Paired bootstrap intervals for per-question scores.

Every system answers the same questions, so one resample of question indices serves all of them: a figure that
compares systems (a gap closed, a ratio of knowledge scores) is computed on the same resampled questions for
each, which keeps the pairing that makes such differences precise. Percentile intervals, fixed seed.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch

Figure = Callable[[Mapping[str, torch.Tensor]], torch.Tensor]


def mean_of(name: str) -> Figure:
    return lambda means: means[name]


def gap_closed(system: str, base: str, reference: str) -> Figure:
    """(system - base) / (reference - base): the share of the reference's gain over the base that the system
    reaches (NaN where the reference gains nothing on a resample)."""
    def figure(means):
        gain = means[reference] - means[base]
        return torch.where(gain != 0, (means[system] - means[base]) / gain, torch.full_like(gain, float("nan")))
    return figure


def ratio(system: str, other: str) -> Figure:
    def figure(means):
        return torch.where(means[other] != 0, means[system] / means[other], torch.full_like(means[other], float("nan")))
    return figure


def paired_bootstrap(scores: Mapping[str, Sequence[float]], figures: Mapping[str, Figure], resamples: int = 2000,
                     level: float = 0.95, seed: int = 0) -> dict[str, dict[str, float | None]]:
    """{figure: {"value", "low", "high"}}: each figure on all questions and its `level` percentile interval over
    `resamples` resamples of the questions (the same resample for every column). Resamples where a figure is
    undefined (NaN) are left out of its interval; a figure undefined everywhere gets None."""
    n = {len(v) for v in scores.values()}
    if len(n) != 1:
        raise ValueError(f"every column needs one score per question, got lengths {sorted(n)}")
    (n,) = n
    columns = {k: torch.tensor(v, dtype=torch.float64) for k, v in scores.items()}
    full = {k: v.mean()[None] for k, v in columns.items()}
    pick = torch.randint(n, (resamples, n), generator=torch.Generator().manual_seed(seed))
    resampled = {k: v[pick].mean(-1) for k, v in columns.items()}
    tail = (1 - level) / 2
    out = {}
    for name, figure in figures.items():
        value = float(figure(full)[0])
        draws = figure(resampled)
        draws = draws[~draws.isnan()]
        low, high = (None, None) if not len(draws) else torch.quantile(draws, torch.tensor([tail, 1 - tail],
                                                                                         dtype=torch.float64)).tolist()
        out[name] = {"value": None if value != value else value, "low": low, "high": high}
    return out

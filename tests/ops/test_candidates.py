"""The union of supports over a base that shows only its top N (ops/candidates.py), against float64
references written out by hand."""

import math

import pytest
import torch

from logitfuse.ops import candidates


def case(seed: int, b: int = 3, t: int = 2, v: int = 50, n: int = 5):
    g = torch.Generator().manual_seed(seed)
    full = torch.log_softmax(torch.randn(b, v, generator=g, dtype=torch.float64) * 3, -1)
    top = full.topk(n, -1).indices
    known = torch.full_like(full, float("-inf")).scatter(-1, top, full.gather(-1, top))
    tuned = torch.randn(b, t, v, generator=g, dtype=torch.float64) * 3
    untuned = torch.randn(b, t, v, generator=g, dtype=torch.float64) * 3
    coef = torch.rand(b, t, generator=g, dtype=torch.float64) + 0.2
    return full, known, tuned, untuned, coef


def test_push_ceiling_and_bound_are_the_written_formulas():
    full, known, tuned, untuned, coef = case(0)
    e, guess = candidates.push_and_guess(tuned, untuned, coef)
    want = (coef[..., None] * (tuned.log_softmax(-1) - untuned.log_softmax(-1))).sum(1)
    assert torch.allclose(e.double(), want, atol=1e-5)
    assert torch.allclose(guess.double(), untuned.log_softmax(-1).mean(1) + want, atol=1e-5)
    estimate = candidates.estimate(known, torch.full((known.shape[0],), 3))
    for i in range(known.shape[0]):
        vals = known[i][torch.isfinite(known[i])]
        rest = 1 - vals.exp().sum()
        assert float(candidates.ceiling(known)[i]) == pytest.approx(min(float(vals.min()), math.log(rest)), abs=1e-9)
        assert float(estimate[i]) == pytest.approx(min(float(vals.min()), math.log(rest / 3)), abs=1e-9)
        outside = full[i][~torch.isfinite(known[i])]
        assert float(outside.max()) <= float(candidates.ceiling(known)[i]) + 1e-12  # no unseen token above it


def test_missing_takes_the_eligible_tokens_stops_first_then_the_best_guesses():
    _, known, tuned, untuned, coef = case(1)
    e, guess = (t.double() for t in candidates.push_and_guess(tuned, untuned, coef))
    ceiling = candidates.ceiling(known)
    for k in (0, 2, 7, 1000):
        got = candidates.missing(known, e, guess, k, [[0, 1], [], [49]])
        for i in range(known.shape[0]):
            best = float((known[i] + e[i]).max())
            eligible = [v for v in range(50) if not math.isfinite(known[i, v])
                        and float(ceiling[i] + e[i, v]) >= best - candidates.MARGIN]
            stops = [s for s in ([0, 1], [], [49])[i] if s in eligible]
            ranked = sorted(eligible, key=lambda v: -float(guess[i, v]))[:k]
            assert got[i] == ([] if k == 0 else sorted(set(ranked) | set(stops)))
            assert not any(math.isfinite(known[i, v]) for v in got[i])


def test_a_certified_step_has_the_white_box_argmax_and_the_omitted_mass_is_bounded():
    certified = 0
    for seed in range(60):
        full, known, tuned, untuned, coef = case(seed, v=80, n=8)
        e, guess = (t.double() for t in candidates.push_and_guess(tuned, untuned, coef))
        miss = candidates.missing(known, e, guess, 4, [[]] * 3)
        keep = known.clone()
        for i, ids in enumerate(miss):
            keep[i, ids] = full[i, ids]  # the server's exact values
        fused, white = keep + e, full + e
        ok = candidates.certified(known, e, fused)
        certified += int(ok.sum())
        assert (fused.argmax(-1) == white.argmax(-1))[ok].all()
        out = ~torch.isfinite(fused)
        true_left = torch.where(out, white, torch.full_like(white, float("-inf"))).logsumexp(-1)
        true_rel = (true_left - fused.logsumexp(-1)).exp()
        assert (true_rel <= candidates.omitted(known, e, fused) + 1e-12).all()
    assert certified > 20

"""Paired bootstrap intervals (logitfuse/training/real/stats.py): the numbers bench/real.py reports."""

import math
import random

import pytest

from logitfuse.training.real.stats import gap_closed, mean_of, paired_bootstrap, ratio


def test_a_proportions_interval_matches_the_normal_approximation():
    rng = random.Random(1)
    scores = [float(rng.random() < 0.6) for _ in range(400)]
    p = sum(scores) / len(scores)
    out = paired_bootstrap({"a": scores}, {"exact": mean_of("a")}, resamples=4000)["exact"]
    assert out["value"] == pytest.approx(p, abs=1e-12)
    half = 1.96 * math.sqrt(p * (1 - p) / len(scores))  # ~0.048
    assert out["low"] == pytest.approx(p - half, abs=0.012) and out["high"] == pytest.approx(p + half, abs=0.012)


def test_the_gap_is_computed_on_the_same_resampled_questions_for_every_system():
    n = 300
    base = [1.0 if i < 100 else 0.0 for i in range(n)]       # 1/3
    ref = [1.0 if i < 250 else 0.0 for i in range(n)]        # 5/6
    system = [1.0 if i < 200 else 0.0 for i in range(n)]     # 2/3: right wherever base is, wrong wherever ref is not
    figures = {"gap": gap_closed("s", "b", "r"), "ratio": ratio("s", "b")}
    paired = paired_bootstrap({"s": system, "b": base, "r": ref}, figures)
    assert paired["gap"]["value"] == pytest.approx(100 / 150) and paired["ratio"]["value"] == pytest.approx(2.0)
    assert paired["gap"]["low"] < 100 / 150 < paired["gap"]["high"]
    # the same marginals with the pairing broken (system right on other questions) give a wider interval
    rng = random.Random(0)
    shuffled = system[:]
    rng.shuffle(shuffled)
    unpaired = paired_bootstrap({"s": shuffled, "b": base, "r": ref}, figures)
    assert unpaired["gap"]["value"] == pytest.approx(paired["gap"]["value"])
    width = lambda f: f["high"] - f["low"]  # noqa: E731
    assert width(unpaired["gap"]) > 1.3 * width(paired["gap"])


def test_an_undefined_figure_is_none_and_columns_must_align():
    same = [1.0, 0.0, 1.0, 0.0]
    out = paired_bootstrap({"s": same, "b": same, "r": same}, {"gap": gap_closed("s", "b", "r")}, resamples=50)
    assert out["gap"] == {"value": None, "low": None, "high": None}
    with pytest.raises(ValueError, match="one score per question"):
        paired_bootstrap({"s": [1.0], "b": [1.0, 0.0]}, {"m": mean_of("s")})

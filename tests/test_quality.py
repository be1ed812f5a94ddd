"""The committed miniature family through the user's code path (configs/default.yaml): fusion transfers
tuning, in the order the papers report: tuned-large > proxy-tuned large > base-large on held-out questions."""

import json
from pathlib import Path

import pytest

from logitfuse import LogitFuse, SamplingParams

ROOT = Path(__file__).resolve().parent.parent
N = 60


@pytest.fixture(scope="module")
def default():
    return LogitFuse(ROOT / "configs" / "default.yaml")


def accuracy(lf, model, rows, fusion=None):
    outs = lf.generate(model, [r["prompt"] for r in rows], SamplingParams(max_tokens=8, temperature=0), fusion)
    return sum(o.text.strip().lower() == r["answer"].strip().lower() for o, r in zip(outs, rows)) / len(rows)


def test_default_config_serves_every_ensemble(default):
    for name in default.registry.ensembles:
        out = default.generate(name, ["hello"], SamplingParams(max_tokens=2, temperature=0))[0]
        assert out.finish_reason in ("stop", "length")


def test_proxy_tuning_closes_most_of_the_gap_on_held_out_questions(default):
    lines = (ROOT / "models" / "data" / "eval_qa.jsonl").read_text().splitlines()
    rows = [r for r in map(json.loads, lines) if not r["new_phrasing"]][:N]
    base = accuracy(default, "base-large", rows)
    proxy = accuracy(default, "large-qa", rows)
    dlf = accuracy(default, "large-dlf", rows, {"experts": ["qa"]})
    tuned = accuracy(default, "tuned-large-qa", rows)
    assert tuned > proxy > base, (base, proxy, tuned)
    assert (proxy - base) / (tuned - base) >= 0.8, (base, proxy, tuned)
    assert dlf > base, (base, dlf)

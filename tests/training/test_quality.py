"""The committed miniature family through the user's code path (configs/default.yaml): fusion transfers
tuning, in the order the papers report: tuned-large > proxy-tuned large > base-large on held-out questions."""

import json
from pathlib import Path

import pytest

from logitfuse import LogitFuse, SamplingParams

ROOT = Path(__file__).resolve().parents[2]
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


def test_eft_describes_held_out_entities_with_the_bases_facts_and_speculation_keeps_its_answers(default):
    """Descriptions: the small expert has the five-sentence form but not the facts, the base the facts but not
    the form; EFT states more reference sentences than either. The shipped speculative ensemble gives the same
    greedy answers, accepting most drafts (the long answers speculation is for)."""
    rows = [json.loads(x) for x in (ROOT / "models" / "data" / "eval_describe.jsonl").read_text().splitlines()][:24]
    sp = SamplingParams(max_tokens=64, temperature=0)

    def facts(outs):
        refs = [[s.strip() + " ." for s in r["answer"].split(" .") if s.strip()] for r in rows]
        return sum(sum(s in o.text for s in ref) for o, ref in zip(outs, refs)) / (5 * len(rows))

    prompts = [r["prompt"] for r in rows]
    eft = default.generate("large-desc", prompts, sp)
    base, small = (facts(default.generate(m, prompts, sp)) for m in ("base-large", "tuned-small-desc"))
    assert facts(eft) >= 0.3 and facts(eft) > base + 0.2 and facts(eft) > small + 0.2, (base, small, facts(eft))
    before = default.engine.stats().speculative.accepted, default.engine.stats().speculative.drafted
    spec = default.generate("large-desc-spec", prompts, sp)
    assert [o.token_ids for o in spec] == [o.token_ids for o in eft]
    accepted, drafted = (a - b for a, b in zip((default.engine.stats().speculative.accepted,
                                                 default.engine.stats().speculative.drafted), before))
    assert drafted > 5 * len(rows) and accepted / drafted > 0.7, (accepted, drafted)

"""A cross-tokenizer adapter expert (its untuned model has another tokenizer than the base, and the tuned
model is that model plus a LoRA adapter): its tuned and untuned rows follow the same re-tokenized text, so
they advance in one batched forward, and the fused output equals the same pair with the adapter merged into
a full copy (two models, two forwards)."""

import copy

import pytest

pytest.importorskip("peft")

from logitfuse import LogitFuse, SamplingParams
from logitfuse.backends.adapter import BASE, AdapterHost
from logitfuse.training.tiny import build_model, build_tokenizer, save
from tests.backends.test_adapter import PROMPTS, random_lora, run


@pytest.fixture(scope="module")
def configs(tmp_path_factory):
    root = tmp_path_factory.mktemp("cross-adapters")
    base_tok, foreign_tok = build_tokenizer(), build_tokenizer(vocab_size=260, extra=["<|foreign|>"])
    small = build_model(foreign_tok, 7, scale=8.0)
    paths = {"base-large": save(build_model(base_tok, 1, hidden=48, layers=3, scale=8.0), base_tok,
                                root / "base-large"),
             "foreign-small": save(small, foreign_tok, root / "foreign-small")}
    peft = random_lora(small, 21)
    peft.save_pretrained(root / "adapter-x")
    paths["adapter-x"] = root / "adapter-x"
    paths["merged-x"] = save(copy.deepcopy(peft).merge_and_unload(), foreign_tok, root / "merged-x")
    models = ("models:\n  base-large: {{path: {base-large}, dtype: float32}}\n"
              "  foreign-small: {{path: {foreign-small}, dtype: float32}}\n")
    ensembles = ("ensembles:\n  proxy-x: {{base: base-large, method: proxy, experts: [x], alpha: 1.0}}\n"
                 "  eft-x: {{base: base-large, method: eft, experts: [x], beta: 0.8}}\n"
                 "server: {{memory_budget_mb: 512, preload: false}}\n")
    adapter = models + "experts:\n  x: {{untuned: foreign-small, adapter: {adapter-x}, cross_tokenizer: true}}\n"
    merged = (models + "  merged-x: {{path: {merged-x}, dtype: float32}}\n"
              "experts:\n  x: {{tuned: merged-x, untuned: foreign-small, cross_tokenizer: true}}\n")
    out = {}
    for name, text in (("adapter", adapter), ("merged", merged)):
        out[name] = root / f"{name}.yaml"
        out[name].write_text((text + ensembles).format(**{k: str(v) for k, v in paths.items()}))
    return out


@pytest.mark.parametrize("model", ["proxy-x", "eft-x"])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_cross_tokenizer_adapter_fuses_like_the_merged_pair(configs, model, temperature):
    sp = SamplingParams(max_tokens=10, temperature=temperature, seed=3, logprobs=5, ignore_eos=True)
    with_adapter, merged = run(LogitFuse(configs["adapter"]), model, sp), run(LogitFuse(configs["merged"]), model, sp)
    for rows_a, rows_m in zip(with_adapter, merged):
        assert len(rows_a) == 10 and [e.token_id for e in rows_a] == [e.token_id for e in rows_m]
        for ea, em in zip(rows_a, rows_m):
            assert ea.logprob == pytest.approx(em.logprob, abs=1e-4)
            assert [t.logprob for t in ea.top] == pytest.approx([t.logprob for t in em.top], abs=1e-4)


def test_tuned_and_untuned_rows_advance_in_one_forward(configs):
    lf = LogitFuse(configs["adapter"])
    calls = []
    host = lf.model("foreign-small").host
    assert isinstance(host, AdapterHost)
    original = host.call
    host.call = lambda names, **kw: calls.append(list(names)) or original(names, **kw)
    sp = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    for _ in lf.stream([r for p in PROMPTS for r in lf.requests("proxy-x", p, sp)]):
        pass
    # the prefill and each step are one forward holding the untuned and the adapter rows of all 3 prompts:
    # six rows, or, where the rows read different numbers of tokens, their tokens packed in one call row per
    # adapter (backends/packed.py)
    assert all(len(set(c)) > 1 for c in calls) and len(calls) == 6 and len(calls[0]) == 6
    assert all(sorted(set(c)) == [BASE, "x"] for c in calls)
    assert all(len(c) == 6 or c == ["x", BASE] for c in calls[1:]) and ["x", BASE] in calls

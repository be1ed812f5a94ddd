"""Engine mode on a real checkpoint: SmolLM2-135M-Instruct hosted in vLLM (engine: vllm) with its short-answer
LoRA adapter as the expert (run by the processor inside vLLM), against the same ensemble on logitfuse's own
Hugging Face engine in the same server: greedy answers equal and fused log-probabilities within 1e-3 for proxy,
EFT and DLF over chat requests, and a JSON schema followed on both engines. Runs where `logitfuse fetch-real`
has written models/real (not in CI's clean clone: skipped there, saying so)."""

import json
import math

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed (.ci/vllm makes a venv with it)")
httpx = pytest.importorskip("httpx")

from tests.vllm.conftest import MODELS  # noqa: E402

SMOLLM2 = MODELS / "real" / "smollm2-135m-instruct"
ADAPTER = MODELS / "adapters" / "smollm2-qa"
TOL = 1e-3
REGISTRY = """
models:
  smollm2: {{path: {path}, dtype: float32, chat_template: true, engine: vllm,
             vllm: {{enforce_eager: true, max_model_len: 1024, max_num_seqs: 16, seed: 0}}}}
  smollm2-hf: {{path: {path}, dtype: float32, chat_template: true}}
experts:
  qa: {{untuned: smollm2-hf, adapter: {adapter}}}
ensembles:
{ensembles}
server: {{memory_budget_mb: 4096, max_batch: 16}}
"""
METHODS = {"proxy": "method: proxy, experts: [qa], alpha: 1.0", "eft": "method: eft, experts: [qa], beta: 1.0",
           "dlf": "method: dlf, experts: [qa]"}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    if not (SMOLLM2 / "config.json").is_file():
        pytest.skip(f"{SMOLLM2} is missing: `logitfuse fetch-real` writes it")
    pytest.importorskip("peft")
    from logitfuse import LogitFuse
    from logitfuse.service.app import start_in_thread

    ensembles = "\n".join(f"  {n}{s}: {{base: {b}, {body}}}" for n, body in METHODS.items()
                          for s, b in (("", "smollm2"), ("-hf", "smollm2-hf")))
    path = tmp_path_factory.mktemp("engine-real") / "registry.yaml"
    path.write_text(REGISTRY.format(path=SMOLLM2, adapter=ADAPTER, ensembles=ensembles))
    url, srv = start_in_thread(LogitFuse(path), timeout=900)
    yield url
    srv.should_exit = True


@pytest.fixture(scope="module")
def questions() -> list[str]:
    rows = [json.loads(x) for x in (MODELS / "adapters" / "data" / "heldout.jsonl").read_text().splitlines()]
    return [r["question"] for r in rows[:6]]


def chat(url: str, model: str, question: str, **extra) -> dict:
    body = {"model": model, "messages": [{"role": "user", "content": question}], "max_tokens": 12,
            "temperature": 0, "logprobs": True, **extra}
    r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=300)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]


@pytest.mark.parametrize("method", list(METHODS))
def test_engine_mode_equals_the_hf_engine_on_smollm2(server, questions, method):
    for q in questions:
        got, want = chat(server, method, q), chat(server, f"{method}-hf", q)
        assert got["message"]["content"] == want["message"]["content"], q
        g, w = got["logprobs"]["content"], want["logprobs"]["content"]
        assert [x["token"] for x in g] == [x["token"] for x in w]
        worst = max(abs(a["logprob"] - b["logprob"]) for a, b in zip(g, w))
        assert worst < TOL and all(math.isfinite(a["logprob"]) for a in g), (q, worst)


def test_a_json_schema_on_both_engines(server):
    schema = {"type": "object", "properties": {"capital": {"type": "string", "maxLength": 20}},
              "required": ["capital"], "additionalProperties": False}
    fmt = {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}}
    for model in ("proxy", "proxy-hf"):
        out = chat(server, model, "What is the capital of Egypt? Answer in JSON.", max_tokens=24,
                   response_format=fmt, logprobs=False)
        answer = json.loads(out["message"]["content"])
        assert set(answer) == {"capital"} and answer["capital"].strip(), (model, answer)

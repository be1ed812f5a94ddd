"""A remote base over the OpenAI API: a logitfuse server on the tiny family plays the remote vLLM, and a
second registry fuses its `base-large` with local experts."""

import pytest
import torch

from logitfuse import LogitFuse, SamplingParams
from logitfuse.backends.remote.client import RemoteError
from logitfuse.errors import InvalidRequest
from logitfuse.ops import fusion
from logitfuse.service.app import start_in_thread
from logitfuse.training.tiny import TINY_CONFIG

PROMPTS = ["the red city of the north", "one", "king queen river blue green"]


@pytest.fixture(scope="module")
def remote_url(family, tmp_path_factory):
    text = TINY_CONFIG.format(**{k: str(v) for k, v in family.items()})
    text = text.replace("server: {memory_budget_mb: 512, max_batch: 16}",
                        "server: {memory_budget_mb: 512, max_batch: 16, max_logprobs: 400}")
    path = tmp_path_factory.mktemp("remote") / "server.yaml"
    path.write_text(text)
    url, server = start_in_thread(LogitFuse(path))
    yield url
    server.should_exit = True


def client_config(family, tmp_path, url: str, remote_model: str = "base-large", tokenizer: str = "base-large") -> str:
    local = "{{path: {}, dtype: float32, chat_template: true}}"
    text = f"""
models:
  big:   {{remote: {{url: {url}/v1, model: {remote_model}, top_logprobs: 400}}, tokenizer: {family[tokenizer]},
          chat_template: true}}
  big5:  {{remote: {{url: {url}/v1, model: {remote_model}, top_logprobs: 5}}, tokenizer: {family['base-large']},
          chat_template: true}}
  base-large: {local.format(family['base-large'])}
  base-small: {local.format(family['base-small'])}
  tuned-a: {local.format(family['tuned-a'])}
experts:
  a: {{tuned: tuned-a, untuned: base-small}}
ensembles:
  remote-proxy: {{base: big, method: proxy, experts: [a], alpha: 0.8}}
  remote-top5:  {{base: big5, method: proxy, experts: [a], alpha: 0.8}}
  local-proxy:  {{base: base-large, method: proxy, experts: [a], alpha: 0.8}}
server: {{preload: false}}
"""
    path = tmp_path / "client.yaml"
    path.write_text(text)
    return str(path)


@pytest.fixture(scope="module")
def client_lf(family, remote_url, tmp_path_factory):
    return LogitFuse(client_config(family, tmp_path_factory.mktemp("client"), remote_url))


def test_a_remote_base_with_every_logprob_fuses_like_the_local_one(client_lf):
    for sp in (SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, logprobs=2),
               SamplingParams(max_tokens=8, temperature=0.9, seed=4, ignore_eos=True)):
        local = client_lf.generate("local-proxy", PROMPTS, sp)
        remote = client_lf.generate("remote-proxy", PROMPTS, sp)
        assert [o.token_ids for o in remote] == [o.token_ids for o in local]
        for a, b in zip(remote, local):
            assert a.logprobs == pytest.approx(b.logprobs, abs=1e-4)
    sp = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    spec = client_lf.generate("remote-proxy", PROMPTS, sp, {"speculative": {"k": 3}})  # verify: echo'd blocks
    assert [o.token_ids for o in spec] == [o.token_ids for o in client_lf.generate("local-proxy", PROMPTS, sp)]


@torch.inference_mode()
def test_top_n_logprobs_restrict_each_step_to_the_base_top_n(client_lf):
    """Reference: the local models step by step, the base's logits masked outside its top 5."""
    models = {n: client_lf.pool.get(n) for n in ("base-large", "tuned-a", "base-small")}
    sp = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    for prompt, out in zip(PROMPTS, client_lf.generate("remote-top5", PROMPTS, sp)):
        ids = models["base-large"].tokenizer(prompt).input_ids
        want = []
        for _ in range(6):
            z = {n: m.prefill([ids + want])[1] for n, m in models.items()}
            base = z["base-large"]
            masked = torch.full_like(base, float("-inf"))
            top = base.topk(5, dim=-1).indices
            masked.scatter_(-1, top, base.gather(-1, top))
            fused = fusion.proxy_tune(masked, z["tuned-a"].unsqueeze(1), z["base-small"].unsqueeze(1),
                                      torch.tensor([[0.8]]))
            want.append(int(fused.argmax(-1)))
            assert want[-1] in top[0].tolist()
        assert out.token_ids == want


def test_remote_errors_are_clear(family, remote_url, tmp_path, client_lf):
    with pytest.raises(RemoteError, match="does not serve 'nope'; it serves proxy-a"):
        LogitFuse(client_config(family, tmp_path, remote_url, "nope")).pool.get("big")
    with pytest.raises(RemoteError, match="local tokenizer does not match"):
        LogitFuse(client_config(family, tmp_path, remote_url, tokenizer="foreign")).pool.get("big")
    with pytest.raises(RemoteError, match="cannot reach"):
        LogitFuse(client_config(family, tmp_path, "http://127.0.0.1:9")).pool.get("big")
    with pytest.raises(InvalidRequest, match="remote"):
        client_lf.engine.check(client_lf.requests("remote-proxy", "one", SamplingParams(
            max_tokens=1, logprobs=1, prompt_logprobs=True))[0])


def test_retries_on_429_and_5xx_but_not_on_a_bad_request(family, monkeypatch):
    import httpx
    from transformers import AutoTokenizer

    from logitfuse.backends.remote.client import RemoteCausalLM
    from logitfuse.config.specs import RemoteSpec

    monkeypatch.setattr("time.sleep", lambda s: None)
    answers, calls = [], []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        return answers.pop(0)

    ok = {"choices": [{"logprobs": {"top_logprobs": [{"token_id:5": -0.1, "token_id:9": -2.5}]}}]}
    spec = RemoteSpec(url="http://remote/v1", model="m", top_logprobs=2, retries=2)
    tok = AutoTokenizer.from_pretrained(family["base-large"])
    client = httpx.Client(base_url=spec.url, transport=httpx.MockTransport(handler))
    lm = RemoteCausalLM("big", spec, tok, client=client)
    answers += [httpx.Response(503, text="busy"), httpx.Response(429, headers={"retry-after": "0"}),
                httpx.Response(200, json=ok)]
    state, logits = lm.prefill([[1, 2, 3]])
    assert len(calls) == 3 and logits.shape == (1, len(tok))
    assert logits[0, 5] == pytest.approx(-0.1) and logits[0, 9] == pytest.approx(-2.5)
    assert torch.isinf(logits[0]).sum() == len(tok) - 2
    sent = __import__("json").loads(calls[-1].content)
    assert sent["prompt"] == [1, 2, 3] and sent["logprobs"] == 2 and sent["return_tokens_as_token_ids"]
    answers += [httpx.Response(400, json={"error": {"message": "bad prompt"}})]
    with pytest.raises(RemoteError, match=r"400.*bad prompt"):
        lm.decode(state, torch.tensor([[7]]))
    assert len(calls) == 4  # a bad request is not retried
    answers += [httpx.Response(500, text="x")] * 3
    with pytest.raises(RemoteError, match="500"):
        lm.decode(state, torch.tensor([[7]]))
    assert len(calls) == 7  # one try and two retries

"""A remote base served by servers logitfuse did not write: fakes answering with llama-server's and
llama-cpp-python's shapes and quirks (tests/fake_servers.py) over the tiny family's base-large."""

import pytest
import torch
from transformers import AutoTokenizer

from logitfuse import LogitFuse, SamplingParams
from logitfuse.backends.base import token_texts
from logitfuse.backends.hf import HFCausalLM
from logitfuse.backends.remote.client import RemoteCausalLM, RemoteError
from logitfuse.backends.remote.wire import first_difference, positions, tokenize_ids
from logitfuse.config.specs import RemoteSpec
from logitfuse.errors import InvalidRequest
from tests.fake_servers import FakeServer, serve

PROMPTS = ["the red city of the north", "one", "king queen river blue green"]


@pytest.fixture(scope="module")
def tok(family):
    return AutoTokenizer.from_pretrained(family["base-large"])


@pytest.fixture(scope="module")
def base(family):
    return HFCausalLM.load("base-large", str(family["base-large"]), "float32", "cpu")


@pytest.fixture(scope="module")
def dist(base):
    """The next-token log-probabilities of the local base-large after `ids`."""
    return torch.inference_mode()(lambda ids: base.prefill([ids])[1][0].log_softmax(-1))


@pytest.fixture(scope="module")
def eos_dist(base, dist):
    """The same, with EOS made the greedy token after the word 'one'."""
    one, eos = base.tokenizer("one").input_ids[-1], base.tokenizer.eos_token_id

    def f(ids: list[int]) -> torch.Tensor:
        z = dist(ids).double()
        if ids[-1] == one:
            z[eos] += 30.0
        return z.log_softmax(-1).float()

    return f


def start(kind: str, tok, dist, **kw) -> tuple[str, FakeServer]:
    fake = FakeServer(kind, tok, dist, **kw)
    url, server = serve(fake.app)
    fake.stop = lambda: setattr(server, "should_exit", True)
    return url, fake


@pytest.fixture(scope="module")
def llama_server(tok, dist):
    url, fake = start("llama-server", tok, dist)
    yield url, fake
    fake.stop()


def config(family, tmp_path, url: str, top: int) -> str:
    local = "{{path: {}, dtype: float32, chat_template: true}}"
    text = f"""
models:
  big: {{remote: {{url: {url}, model: smollm2.gguf, top_logprobs: {top}, retries: 2}},
        tokenizer: {family['base-large']}, chat_template: true}}
  base-large: {local.format(family['base-large'])}
  base-small: {local.format(family['base-small'])}
  tuned-a: {local.format(family['tuned-a'])}
experts:
  a: {{tuned: tuned-a, untuned: base-small}}
ensembles:
  remote-proxy: {{base: big, method: proxy, experts: [a], alpha: 0.8}}
  local-proxy:  {{base: base-large, method: proxy, experts: [a], alpha: 0.8}}
server: {{preload: false}}
"""
    path = tmp_path / "client.yaml"
    path.write_text(text)
    return str(path)


def lm_over(url: str, tok, top: int) -> RemoteCausalLM:
    lm = RemoteCausalLM("big", RemoteSpec(url=url, model="smollm2.gguf", top_logprobs=top), tok)
    lm.check_served()
    lm.probe()
    return lm


def test_llama_server_is_probed_and_fuses_like_the_local_base(family, tmp_path, tok, llama_server):
    url, fake = llama_server
    lf = LogitFuse(config(family, tmp_path, url, len(tok)))
    caps = lf.pool.get("big").caps
    assert (caps.dialect, caps.token_prompts, caps.ids_exact, caps.exact_echo, caps.eos_empty) == (
        "llama-server", True, True, False, False)
    assert sum(1 for b in fake.bodies if b.get("echo")) == 1  # the refused echo was not retried
    assert all(b["temperature"] == 0 and b["repeat_penalty"] == 1.0 and b["min_p"] == 0.0 for b in fake.bodies)
    for sp in (SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, logprobs=2),
               SamplingParams(max_tokens=8, temperature=0.9, seed=4, ignore_eos=True)):
        local = lf.generate("local-proxy", PROMPTS, sp)
        remote = lf.generate("remote-proxy", PROMPTS, sp)
        assert [o.token_ids for o in remote] == [o.token_ids for o in local]
        for a, b in zip(remote, local):
            assert a.logprobs == pytest.approx(b.logprobs, abs=1e-4)
    greedy = SamplingParams(max_tokens=6, temperature=0)
    bare = lf.generate("big", PROMPTS, greedy)
    assert [o.token_ids for o in bare] == [o.token_ids for o in lf.generate("base-large", PROMPTS, greedy)]
    assert [o.token_ids for o in lf.generate("remote-proxy", PROMPTS, greedy, {"alpha": 0.0})] == [
        o.token_ids for o in bare]


def test_without_exact_echo_blocks_are_read_per_position_and_speculation_is_refused(family, tmp_path, tok, dist,
                                                                                  llama_server):
    url, _ = llama_server
    lm = lm_over(url, tok, 6)
    ids = tok("king queen river").input_ids
    state, _ = lm.prefill([ids[:-2]])
    block = lm.decode(state, torch.tensor([ids[-2:] + [5]]))  # (1, 3, V)
    for j, prefix in enumerate((ids[:-1], ids, ids + [5])):
        want = dist(prefix)
        top = want.topk(6).indices
        assert torch.isinf(block[0, j]).sum() == len(tok) - 6
        assert torch.allclose(block[0, j, top], want[top], atol=1e-6)
    lf = LogitFuse(config(family, tmp_path, url, len(tok)))
    with pytest.raises(InvalidRequest, match=r"speculative decoding is not available with .big.*echo") as err:
        lf.generate("remote-proxy", ["one"], SamplingParams(max_tokens=2, temperature=0), {"speculative": {"k": 3}})
    assert err.value.param == "fusion.speculative"


def test_llama_cpp_python_text_prompts_text_keys_and_empty_eos_answers(tok, eos_dist):
    dist = eos_dist
    url, fake = start("llama-cpp-python", tok, dist)
    try:
        lm = lm_over(url, tok, 5)
        caps = lm.caps
        assert (caps.dialect, caps.token_prompts, caps.ids_exact, caps.exact_echo, caps.eos_empty) == (
            "llama-cpp-python", False, False, True, True)
        assert sum(1 for b in fake.bodies if isinstance(b["prompt"], list)) == 1  # refusal not retried
        n = len(fake.bodies)
        ids = tok("king queen river one").input_ids
        _, logits = lm.prefill([ids])  # greedy EOS: an empty answer, read again by echo
        assert [b.get("echo", False) for b in fake.bodies[n:]] == [False, True]
        assert all(isinstance(b["prompt"], str) and tok(b["prompt"]).input_ids == ids for b in fake.bodies[n:])
        want = dist(ids)
        top = want.topk(5).indices.tolist()
        assert top[0] == tok.eos_token_id
        plain = named(tok, top)
        assert plain and logits[0, plain].tolist() == pytest.approx(want[plain].tolist(), abs=1e-6)
        # special tokens (and here "▁") share the name "": EOS keeps a place in the support, with the value
        # of the last token the server wrote under that name (its own where no other such token is in the top N)
        unnamed = [t for t in top if fake.texts[t] == ""]
        assert len(unnamed) > 1 and logits[0, tok.eos_token_id] == pytest.approx(float(want[unnamed[-1]]), abs=1e-6)
        assert torch.isfinite(logits[0]).sum() <= 5
        state, _ = lm.prefill([ids[:-2]])
        n = len(fake.bodies)
        block = lm.decode(state, torch.tensor([ids[-2:]]))  # a 2-token block in one echo call
        assert len(fake.bodies) == n + 1 and fake.bodies[-1]["echo"]
        for j, prefix in enumerate((ids[:-1], ids)):
            top = named(tok, dist(prefix).topk(5).indices.tolist())
            assert top and torch.allclose(block[0, j, top], dist(prefix)[top], atol=1e-6)
        _, (a, b) = split_token(tok)
        with pytest.raises(RemoteError, match=r"takes no token-id prompts.*re-tokenizes differently"):
            lm.prefill([[a, b]])  # the text of [a, b] reads back as the one token `piece`
    finally:
        fake.stop()


def named(tok, ids: list[int]) -> list[int]:
    """The ids a text-keyed answer names unambiguously (a text several ids share maps to its lowest id)."""
    texts = token_texts(tok)
    return [t for t in ids if t not in tok.all_special_ids and texts[t] and texts.count(texts[t]) == 1]


def split_token(tok) -> tuple[int, tuple[int, int]]:
    vocab = tok.get_vocab()
    for piece, tid in sorted(vocab.items(), key=lambda kv: kv[1]):
        for cut in range(1, len(piece)):
            if not piece.startswith("<") and piece[:cut] in vocab and piece[cut:] in vocab:
                return tid, (vocab[piece[:cut]], vocab[piece[cut:]])
    raise AssertionError("no splittable token")


@pytest.mark.parametrize("echo", ["shift", "ignore"])
def test_an_echo_that_is_not_exact_is_not_trusted(tok, eos_dist, echo):
    dist = eos_dist
    url, fake = start("llama-cpp-python", tok, dist, echo=echo)
    try:
        lm = lm_over(url, tok, 5)
        assert not lm.caps.exact_echo and not lm.can_verify_blocks and lm.caps.eos_empty
        with pytest.raises(RemoteError, match=r"no top_logprobs.*greedy token is EOS.*echo is not exact"):
            lm.prefill([tok("king queen one").input_ids])
        ids = tok("king queen river").input_ids
        state, _ = lm.prefill([ids[:1]])
        block = lm.decode(state, torch.tensor([ids[1:3]]))
        top = named(tok, dist(ids).topk(5).indices.tolist())
        assert top and torch.allclose(block[0, 1, top], dist(ids)[top], atol=1e-6)
    finally:
        fake.stop()


def test_a_tokenizer_mismatch_says_where_the_ids_part(family, tok, dist):
    foreign = AutoTokenizer.from_pretrained(family["foreign"])
    url, fake = start("llama-server", foreign, dist)
    try:
        with pytest.raises(RemoteError, match=r"llama-server /tokenize.*tokens locally, \d+ there; they differ "
                                              r"from position \d+: \.\.\.\[.*\] locally, \.\.\.\[.*\] there"):
            lm_over(url, tok, 5)
    finally:
        fake.stop()


def test_wire_shapes():
    chat = {"content": [{"id": 4, "token": "a", "logprob": -0.1, "top_logprobs": [
        {"id": 9, "token": "b", "logprob": -2.0}, {"id": 4, "token": "a", "logprob": -0.1},
        {"id": 7, "token": "c", "logprob": -3.4028234663852886e38}]}]}
    assert positions(chat) == [[(4, -0.1), (9, -2.0), (7, float("-inf"))]]
    legacy = {"tokens": ["x", "y"], "top_logprobs": [None, {"token_id:3": -1.5, "y": -0.5}]}
    assert positions(legacy) == [None, [("y", -0.5), (3, -1.5)]]
    assert positions({"tokens": [], "top_logprobs": []}) == [] == positions(None)
    assert tokenize_ids({"tokens": [{"id": 1, "piece": "a"}, {"id": 2, "piece": "b"}]}) == [1, 2]
    assert tokenize_ids({"tokens": [1, "x"]}) is None and tokenize_ids({"error": "no"}) is None
    assert first_difference([1, 2, 3, 4], [1, 2, 5]) == (
        "4 tokens locally, 3 there; they differ from position 2: ...[1, 2, 3, 4] locally, ...[1, 2, 5] there")


def test_a_remote_that_fails_to_load_inside_a_request_is_a_503_and_the_app_goes_on(family, tmp_path, tok):
    from fastapi.testclient import TestClient

    from logitfuse.service.app import create_app

    cfg = config(family, tmp_path, "http://127.0.0.1:9/v1", 5)  # nothing listens there
    with TestClient(create_app(cfg)) as client:  # an exception escaping the app would raise here
        for _ in range(2):
            r = client.post("/v1/completions", json={"model": "remote-proxy", "prompt": "one", "max_tokens": 2})
            assert r.status_code == 503, r.text
            assert "model 'big': cannot reach http://127.0.0.1:9/v1/models" in r.json()["error"]["message"]
        ok = client.post("/v1/completions", json={"model": "local-proxy", "prompt": "one", "max_tokens": 2})
        assert ok.status_code == 200 and ok.json()["choices"][0]["text"] is not None


def test_a_5xx_that_refuses_the_request_is_not_retried(tok, monkeypatch):
    import httpx

    monkeypatch.setattr("time.sleep", lambda s: None)
    calls = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        return httpx.Response(500, json={"error": {"message": "Only no echo is supported"}})

    spec = RemoteSpec(url="http://remote/v1", model="m", top_logprobs=2, retries=3)
    lm = RemoteCausalLM("big", spec, tok, client=httpx.Client(base_url=spec.url,
                                                              transport=httpx.MockTransport(handler)))
    with pytest.raises(RemoteError, match=r"500.*Only no echo is supported") as err:
        lm.prefill([[5, 6]])
    assert len(calls) == 1 and err.value.status == 500


@torch.inference_mode()
def test_a_server_that_cannot_score_candidates_gets_the_stated_estimate(family, tmp_path, tok, llama_server):
    """llama-server neither restricts an answer by allowed_token_ids nor echoes: a candidate outside its top 5
    gets min(lp_5, log(R / m)) (ops/candidates.py), above which no unseen token's true value lies."""
    from logitfuse.ops import candidates

    url, _ = llama_server
    path = config(family, tmp_path, url, 5)
    lf = LogitFuse(path)
    assert lf.pool.get("big").caps.scoring == ""
    models = {n: lf.pool.get(n) for n in ("base-large", "tuned-a", "base-small")}
    sp = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, logprobs=1)
    estimated = 0
    for prompt, out in zip(PROMPTS, lf.generate("remote-proxy", PROMPTS, sp)):
        ids = tok(prompt).input_ids
        want, lps = [], []
        for _ in range(6):
            z = {n: m.prefill([ids + want])[1].double() for n, m in models.items()}
            full = torch.log_softmax(z["base-large"], -1)
            top = full.topk(5, dim=-1).indices
            known = torch.full_like(full, float("-inf")).scatter(-1, top, full.gather(-1, top))
            tuned, untuned = z["tuned-a"].unsqueeze(1), z["base-small"].unsqueeze(1)
            e, guess = (t.double() for t in candidates.push_and_guess(tuned, untuned,
                                                                       torch.tensor([[0.8]], dtype=torch.float64)))
            miss = candidates.missing(known, e, guess, 4, [[]], margin=0.0)[0]  # greedy rows
            keep = known.clone()
            if miss:
                value = float(candidates.estimate(known, torch.tensor([len(miss)]))[0])
                assert value <= float(candidates.ceiling(known)[0])
                assert (full[0, miss] <= candidates.ceiling(known)[0] + 1e-9).all()  # the bound holds
                keep[0, miss] = value
                estimated += len(miss)
            fused = keep + e
            want.append(int(fused.argmax(-1)))
            lps.append(float(torch.log_softmax(fused, -1)[0, want[-1]]))
        assert out.token_ids == want
        assert out.logprobs == pytest.approx(lps, abs=1e-4)
    assert estimated > 0

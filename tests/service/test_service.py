"""The real app in-process (lifespan, engine thread) on tiny models: responses equal the library's output,
streaming concatenates to the JSON result, echo scores equal the library's, every error has its envelope."""

import json
import time

import pytest
from fastapi.testclient import TestClient

from logitfuse import SamplingParams
from logitfuse.service.app import create_app


def post(client, path, body, status=200):
    r = client.post(path, json=body)
    assert r.status_code == status, r.text
    return r.json()


def stream(client, path, body):
    chunks = []
    with client.stream("POST", path, json={**body, "stream": True}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data: "):
                chunks.append(line[6:])
    assert chunks[-1] == "[DONE]"
    return [json.loads(c) for c in chunks[:-1]]


def error(client, body, status, param=None, path="/v1/completions", match=""):
    r = client.post(path, json=body) if not isinstance(body, bytes) else client.post(
        path, content=body, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and match in err["message"]
    if param:
        assert err["param"] == param
    return err


BODY = {"model": "proxy-a", "prompt": "the red city", "max_tokens": 6, "temperature": 0.8, "seed": 11}


def test_completion_equals_library_and_stream_concatenates(client, ref):
    out = post(client, "/v1/completions", {**BODY, "logprobs": 2})
    lib = ref.generate("proxy-a", ["the red city"], SamplingParams(max_tokens=6, temperature=0.8, seed=11,
                                                                   logprobs=2))[0]
    choice = out["choices"][0]
    assert choice["text"] == lib.text and choice["finish_reason"] == lib.finish_reason
    assert choice["logprobs"]["token_logprobs"] == pytest.approx(lib.logprobs, abs=1e-6)
    assert out["usage"] == {"prompt_tokens": lib.prompt_tokens, "completion_tokens": len(lib.token_ids),
                            "total_tokens": lib.prompt_tokens + len(lib.token_ids)}
    chunks = stream(client, "/v1/completions", {**BODY, "stream_options": {"include_usage": True}})
    assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == lib.text
    assert chunks[-1]["usage"] == out["usage"] and chunks[-2]["choices"][0]["finish_reason"] == lib.finish_reason
    assert len({c["id"] for c in chunks}) == 1


def test_several_prompts_and_n_keep_their_order(client, ref):
    body = {"model": "eft-ab", "prompt": ["one two", "king"], "n": 2, "max_tokens": 4, "temperature": 1.0,
            "seed": 3}
    out = post(client, "/v1/completions", body)
    assert [c["index"] for c in out["choices"]] == [0, 1, 2, 3]
    sp = SamplingParams(max_tokens=4, temperature=1.0, seed=3)
    reqs = ref.requests("eft-ab", "one two", sp, n=2) + ref.requests("eft-ab", "king", sp, n=2, rid="x")
    texts = {r.rid: "" for r in reqs}
    for ev in ref.stream(reqs):
        texts[ev.rid] += ev.text
    assert [c["text"] for c in out["choices"]] == [texts[r.rid] for r in reqs]
    assert out["usage"]["prompt_tokens"] == len(reqs[0].prompt_ids) + len(reqs[2].prompt_ids)
    ids = post(client, "/v1/completions", {**body, "prompt": [[5, 6, 7], [8, 9]], "n": 1})
    assert ids["usage"]["prompt_tokens"] == 5 and len(ids["choices"]) == 2


def test_echo_logprobs_are_the_library_prompt_scores(client, ref):
    out = post(client, "/v1/completions", {"model": "proxy-a", "prompt": [5, 6, 7, 8], "max_tokens": 1,
                                           "temperature": 0, "logprobs": 1, "echo": True})
    lp = out["choices"][0]["logprobs"]
    req = ref.requests("proxy-a", [5, 6, 7, 8], SamplingParams(max_tokens=1, temperature=0, logprobs=1,
                                                               prompt_logprobs=True))[0]
    events = list(ref.stream([req]))
    scores, gen = events[0], [e for e in events[1:] if e.token_id is not None]
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert lp["token_logprobs"][1:4] == pytest.approx(scores.logprobs[1:], abs=1e-5)
    assert lp["token_logprobs"][4] == pytest.approx(gen[0].logprob, abs=1e-5)
    assert len(lp["tokens"]) == 5
    # lm-evaluation-harness's greedy check: the chosen token's logprob is the max of its top dict
    assert max(lp["top_logprobs"][4].values()) == pytest.approx(lp["token_logprobs"][4])
    zero = post(client, "/v1/completions", {"model": "proxy-a", "prompt": [5, 6, 7, 8], "max_tokens": 0,
                                            "logprobs": 0, "echo": True})
    assert zero["choices"][0]["logprobs"]["token_logprobs"][1:] == pytest.approx(scores.logprobs[1:], abs=1e-5)
    assert zero["usage"]["completion_tokens"] == 0



def test_logprob_tokens_join_into_the_text():
    """OpenAI's invariant: the tokens of a completion (and of an echoed prompt) concatenate to its text, and
    text_offset is where each starts. The embedded family's tokenizer marks word starts as SentencePiece
    does, which a lone decode of a token drops."""
    root = __import__("pathlib").Path(__file__).resolve().parents[2]
    with TestClient(create_app(root / "configs" / "default.yaml")) as c:
        prompt = "<|user|> what is the capital of ludu ? <|assistant|>"
        for body in ({"max_tokens": 8, "logprobs": 2, "ignore_eos": True},
                     {"max_tokens": 4, "logprobs": 1, "echo": True, "ignore_eos": True}):
            out = post(c, "/v1/completions", {"model": "large-qa", "prompt": prompt, "temperature": 0, **body})
            choice = out["choices"][0]
            lp = choice["logprobs"]
            # special tokens (</s>, generated here under ignore_eos) are named but, as in vLLM, not in the text
            text_tokens = [t for t in lp["tokens"] if t != "</s>"]
            assert "".join(text_tokens) == choice["text"]
            offsets = [o for t, o in zip(lp["tokens"], lp["text_offset"]) if t != "</s>"]
            assert offsets == [len("".join(text_tokens[:i])) for i in range(len(text_tokens))]
            assert sum(t.startswith(" ") for t in lp["tokens"]) >= 3
            assert all(k.startswith(" ") or k.startswith("<") for top in lp["top_logprobs"][1:] for k in top)


def test_chat_json_stream_and_dlf_diagnostics(client, ref):
    body = {"model": "dlf-ab", "messages": [{"role": "user", "content": "king queen"}], "max_tokens": 5,
            "temperature": 0, "logprobs": True, "top_logprobs": 2}
    out = post(client, "/v1/chat/completions", body)
    msg = out["choices"][0]["message"]
    reqs = ref.requests("dlf-ab", messages=body["messages"], sampling=SamplingParams(max_tokens=5, temperature=0))
    assert msg["role"] == "assistant" and msg["content"] == "".join(e.text for e in ref.stream(reqs))
    assert len(out["choices"][0]["logprobs"]["content"]) == out["usage"]["completion_tokens"]
    assert set(out["fusion_diagnostics"]["mean_weights"]) == {"a", "b"}
    chunks = stream(client, "/v1/chat/completions", body)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == msg["content"]


def test_fusion_override_changes_the_method(client, ref):
    body = {**BODY, "temperature": 0, "fusion": {"method": "proxy", "experts": ["b"], "alpha": 0.5}}
    out = post(client, "/v1/completions", body)
    lib = ref.generate("proxy-a", ["the red city"], SamplingParams(max_tokens=6, temperature=0),
                       {"method": "proxy", "experts": ["b"], "alpha": 0.5})[0]
    assert out["choices"][0]["text"] == lib.text


def test_speculative_requests_answer_like_plain_ones(client):
    """Greedy speculative decoding (fusion.speculative) returns plain fused greedy decoding's answer."""
    body = {**BODY, "temperature": 0, "max_tokens": 12, "logprobs": 2, "ignore_eos": True}
    plain = post(client, "/v1/completions", body)["choices"][0]
    spec_body = {**body, "fusion": {"speculative": {"k": 3}}}
    spec = post(client, "/v1/completions", spec_body)["choices"][0]
    assert spec["text"] == plain["text"] and spec["finish_reason"] == plain["finish_reason"] == "length"
    assert spec["logprobs"]["tokens"] == plain["logprobs"]["tokens"]
    assert spec["logprobs"]["token_logprobs"] == pytest.approx(plain["logprobs"]["token_logprobs"], abs=1e-4)
    for a, b in zip(spec["logprobs"]["top_logprobs"], plain["logprobs"]["top_logprobs"]):
        assert list(a) == list(b)
    chunks = stream(client, "/v1/completions", spec_body)
    assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == plain["text"]


def test_tokens_as_token_ids(client, ref):
    body = {**BODY, "temperature": 0, "logprobs": 3, "return_tokens_as_token_ids": True, "echo": True}
    lp = post(client, "/v1/completions", body)["choices"][0]["logprobs"]
    lib = ref.generate("proxy-a", ["the red city"], SamplingParams(max_tokens=6, temperature=0))[0]
    prompt_ids = ref.pool.get("base-large").tokenizer("the red city").input_ids
    assert lp["tokens"] == [f"token_id:{i}" for i in prompt_ids + lib.token_ids]
    assert all(k.startswith("token_id:") for top in lp["top_logprobs"][1:] for k in top)


def test_models_and_health(client):
    ids = [m["id"] for m in client.get("/v1/models").json()["data"]]
    assert ids[:4] == ["proxy-a", "eft-ab", "dlf-ab", "tq"] and "base-large" in ids
    assert client.get("/health").json()["status"] == "ok"


@pytest.mark.parametrize("body,status,param,match", [
    ({"model": "nope", "prompt": "x"}, 404, "model", "available: proxy-a"),
    ({"model": "proxy-a", "prompt": "x", "fusion": {"experts": ["zz"]}}, 404, "fusion.experts", "available: a, b"),
    ({"model": "proxy-a", "prompt": "x", "temperature": -1}, 400, "temperature", "[0, 100]"),
    ({"model": "proxy-a", "prompt": "x", "top_p": 0}, 400, "top_p", "(0, 1]"),
    ({"model": "proxy-a", "prompt": "x", "logprobs": 99}, 400, "logprobs", "[0, 20]"),
    ({"model": "proxy-a", "prompt": "x", "max_tokens": "lots"}, 400, "max_tokens", ""),
    ({"model": "proxy-a", "prompt": "x", "n": 0}, 400, "n", ""),
    ({"model": "proxy-a", "prompt": "x", "seed": 2**64}, 400, "seed", "64 bits"),
    ({"model": "proxy-a", "prompt": "x", "stop_token_ids": [-3]}, 400, "stop_token_ids", "non-negative"),
    ({"model": "proxy-a"}, 400, "prompt", "required"),
    ({"prompt": "x"}, 400, "model", "required"),
    ({"model": "proxy-a", "prompt": []}, 400, "prompt", "non-empty"),
    ({"model": "proxy-a", "prompt": [1, 99999]}, 400, "prompt", "token ids"),
    ({"model": "proxy-a", "prompt": "x", "max_tokens": 1000}, 400, "max_tokens", "is 1000"),
    ({"model": "tq", "prompt": "x", "fusion": {"top_k": 100, "rollout_tokens": 200}}, 400, "fusion.rollout_tokens",
     "limit"),
    ({"model": "proxy-a", "prompt": "x", "fusion": {"method": "magic"}}, 400, "fusion.method", ""),
    ({"model": "proxy-a", "prompt": "x", "fusion": {"experts": ["alien"]}}, 400, "model", "'foreign'"),
    ({"model": "tq", "prompt": "x", "echo": True, "logprobs": 1, "max_tokens": 1}, 400, "echo", "tqstar"),
    ({"model": "dlf-ab", "prompt": "x", "fusion": {"speculative": {"k": 2}}}, 400, "fusion.speculative",
     "exactly one expert"),
    ({"model": "proxy-a", "prompt": "x", "fusion": {"speculative": {"k": 99}}}, 400, "fusion.speculative.k", ""),
    (b'{"model": "proxy-a", "prompt": "x", "fusion": {"alpha": NaN}}', 400, "fusion.alpha", "finite"),
    ({"model": "proxy-a", "prompt": "x", "fusion": {"alpha": 1e308}}, 400, "fusion.alpha", "100"),
    (b'{"model": "eft-ab", "prompt": "x", "fusion": {"weights": [0.5, Infinity]}}', 400, "fusion.weights", "finite"),
    ({"model": "proxy-a", "prompt": ["x"] * 17, "n": 64}, 400, "prompt", "1088 sequences"),
    ({"model": "proxy-a", "prompt": "x", "logit_bias": {"abc": 5}}, 400, "logit_bias", "token ids"),
    ({"model": "proxy-a", "prompt": "x", "logit_bias": {"5": 500}}, 400, "logit_bias", "[-100, 100]"),
    ({"model": "proxy-a", "prompt": "x", "logit_bias": {"999999": 5}}, 400, "logit_bias", "vocabulary"),
])
def test_bad_requests_get_their_status_and_envelope(client, body, status, param, match):
    error(client, body, status, param, match=match)
    assert post(client, "/v1/completions", {**BODY, "max_tokens": 1})["choices"][0]["finish_reason"]


def test_logit_bias_forces_and_bans_tokens(client):
    body = {**BODY, "max_tokens": 3, "temperature": 0, "ignore_eos": True}
    forced = post(client, "/v1/completions", {**body, "logit_bias": {"7": 100}, "return_tokens_as_token_ids": True,
                                              "logprobs": 0})
    assert forced["choices"][0]["logprobs"]["tokens"] == ["token_id:7"] * 3
    chat = post(client, "/v1/chat/completions", {"model": "proxy-a", "messages": [{"role": "user", "content": "x"}],
                                                 "max_tokens": 2, "logit_bias": {"7": 100}, "ignore_eos": True,
                                                 "logprobs": True, "return_tokens_as_token_ids": True})
    assert [c["token"] for c in chat["choices"][0]["logprobs"]["content"]] == ["token_id:7"] * 2


def test_malformed_json_and_bad_chat(client):
    error(client, b"{not json", 400, "body", match="malformed JSON")
    error(client, {"model": "proxy-a", "messages": []}, 400, "messages", path="/v1/chat/completions")
    error(client, {"model": "proxy-a", "messages": [{"role": "wizard", "content": "x"}]}, 400,
          path="/v1/chat/completions")
    msgs = [{"role": "user", "content": "x"}]
    error(client, {"model": "proxy-a", "messages": msgs, "response_format": {"type": "json_object"}}, 400,
          "response_format", path="/v1/chat/completions", match="cannot spell")  # no `{` in this vocabulary
    error(client, {"model": "proxy-a", "messages": msgs, "logprobs": True, "top_logprobs": 99}, 400,
          "top_logprobs", path="/v1/chat/completions", match="[0, 20]")
    error(client, {"model": "proxy-a", "messages": msgs, "top_logprobs": 2}, 400, "top_logprobs",
          path="/v1/chat/completions", match="logprobs: true")
    tool = {"type": "function", "function": {"name": "f", "parameters": {}}}
    error(client, {"model": "proxy-a", "messages": msgs, "tools": [tool]}, 400, "tools",
          path="/v1/chat/completions", match="function calling")
    for ok in ({"response_format": {"type": "text"}}, {"tools": [tool], "tool_choice": "none"}):
        post(client, "/v1/chat/completions", {"model": "proxy-a", "messages": msgs, "max_tokens": 1, **ok})
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    error(client, {"model": "proxy-a", "messages": [{"role": "user", "content": [image]}]}, 400, "messages",
          path="/v1/chat/completions", match="text only")
    parts = [{"type": "text", "text": "king "}, {"type": "text", "text": "queen"}]
    joined = post(client, "/v1/chat/completions", {"model": "proxy-a", "messages": [{"role": "user", "content": parts}],
                                                   "max_tokens": 3, "temperature": 0})
    plain = post(client, "/v1/chat/completions", {"model": "proxy-a", "max_tokens": 3, "temperature": 0,
                                                  "messages": [{"role": "user", "content": "king queen"}]})
    assert joined["choices"][0]["message"] == plain["choices"][0]["message"]


def test_client_disconnect_aborts_generation(client):
    runner = client.app.state.serving.runner
    body = {"model": "proxy-a", "prompt": "the", "max_tokens": 200, "temperature": 0, "ignore_eos": True,
            "stream": True}
    with client.stream("POST", "/v1/completions", json=body) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                break  # leave after the first chunk
    deadline = time.time() + 10
    while runner.pending() and time.time() < deadline:
        time.sleep(0.05)
    assert runner.pending() == 0


def test_api_keys(config_file, tmp_path):
    cfg = tmp_path / "keys.yaml"
    cfg.write_text(config_file.read_text().replace("server: {", "server: {api_keys: [sekret], preload: false, "))
    with TestClient(create_app(cfg)) as c:
        assert c.get("/v1/models").status_code == 401
        r = c.get("/v1/models", headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        assert c.get("/v1/models", headers={"Authorization": "Bearer sekret"}).status_code == 200
        assert c.post("/tokenize", json={"model": "proxy-a", "prompt": "x"}).status_code == 401
        assert c.post("/detokenize", json={"model": "proxy-a", "tokens": [1]}).status_code == 401
        assert c.get("/health").status_code == 200


def test_request_timeout_ends_a_long_request_with_what_it_has(config_file, tmp_path):
    cfg = tmp_path / "timeout.yaml"
    cfg.write_text(config_file.read_text().replace("server: {", "server: {request_timeout: 0.3, "))
    with TestClient(create_app(cfg)) as c:
        body = {"model": "tq", "prompt": "the red city", "max_tokens": 200, "ignore_eos": True,
                "fusion": {"top_k": 10, "rollout_tokens": 20}}
        out = post(c, "/v1/completions", body)
        assert out["choices"][0]["finish_reason"] == "length" and 0 < out["usage"]["completion_tokens"] < 200
        short = post(c, "/v1/completions", {**BODY, "max_tokens": 3, "ignore_eos": True})
        assert short["usage"]["completion_tokens"] == 3


def test_metrics_count_requests_and_tokens(client):
    def value(name):
        line = next((x for x in client.get("/metrics").text.splitlines() if x.startswith(name)), f"{name} 0")
        return float(line.rsplit(" ", 1)[1])

    tokens = 'logitfuse_generated_tokens_total{model="eft-ab"}'
    missing = 'logitfuse_requests_total{path="/v1/completions",status="404"}'
    before = value(tokens), value(missing)
    post(client, "/v1/completions", {**BODY, "model": "eft-ab", "max_tokens": 3, "ignore_eos": True})
    stream(client, "/v1/chat/completions", {"model": "eft-ab", "messages": [{"role": "user", "content": "x"}],
                                            "max_tokens": 2, "ignore_eos": True})
    client.post("/v1/completions", json={"model": "nope", "prompt": "x"})
    assert (value(tokens), value(missing)) == (before[0] + 5, before[1] + 1)
    for i in range(3):  # unknown paths share one label value: clients cannot grow the metric without bound
        assert client.get(f"/v1/no-such-route-{i}").status_code == 404
    text = client.get("/metrics").text
    assert "no-such-route" not in text and 'path="other",status="404"' in text
    assert value("logitfuse_sequences") == 0
    drafted = value("logitfuse_spec_draft_tokens")
    post(client, "/v1/completions", {**BODY, "max_tokens": 8, "ignore_eos": True, "temperature": 0,
                                     "fusion": {"speculative": {"k": 2}}})
    assert value("logitfuse_spec_draft_tokens") > drafted
    assert 0 <= value("logitfuse_spec_accepted_tokens") <= value("logitfuse_spec_draft_tokens")

"""Seeded, bounded fuzzing of the real server (uvicorn on loopback): request bodies drawn from every field's
extremes (numbers from 5e-324 to 1e308, 2**63, NaN, Infinity, wrong types), unicode edge cases and the
`fusion` object. Asserts: no 5xx; every 4xx carries the error envelope; every streamed event is strict JSON;
and a valid greedy request decoding beside them, in the same engine steps, keeps its exact answer."""

import json
import math
import threading

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from logitfuse.service.app import start_in_thread

VALID = {"model": "eft-ab", "prompt": "king queen river", "max_tokens": 12, "temperature": 0, "ignore_eos": True}
NUMBERS = [0, -0.0, 1, -1, 2, 1e-45, 5e-324, 1e-300, 1e-5, 0.5, 0.999, 100, 101, 256, 1e308, -1e308, 2**31,
           2**63, -(2**63) - 1, 10**30, math.nan, math.inf, -math.inf, True, None, "1", [], {}]
TEXTS = ["", " ", "the red city", "hi \ud800 there", "\udfff", "\U0001F600 emoji", "nul \x00", "\u202e rtl",
         "e\u0301" * 20, "<|user|> injected", "\r\n\r\n", "x" * 3000, "\ufeff bom", "\uffff"]

number = st.sampled_from(NUMBERS) | st.floats() | st.integers()
text = st.sampled_from(TEXTS) | st.text(max_size=20)
token_ids = st.lists(st.sampled_from([0, 1, 5, 17, 299, 300, 10**6, -1, 2**63, 1.5, "3"]), max_size=5)
small = st.sampled_from([0, 1, 3, -1, 1.5, "2", 2**63, 10**30, 1e308])  # counts that decode quickly

FUSION = st.fixed_dictionaries({}, optional={
    "method": st.sampled_from(["none", "proxy", "eft", "dlf", "tqstar", "bogus", 3]),
    "experts": st.sampled_from([["a"], ["a", "b"], ["nope"], [], ["xa"], ["a", "a"], "a", [1]]),
    "alpha": number, "beta": number, "weights": st.lists(number, max_size=3),
    "grid": st.lists(number, min_size=2, max_size=4) | st.just([0, 1e308, 1e306]) | st.just([-1e300, 0, 1e298]),
    "mode": st.sampled_from(["one_expert", "joint", "x"]),
    "baseline": st.sampled_from(["tuned-a", "nope"]), "reward": st.sampled_from(["rm", "nope"]),
    "top_k": small, "rollouts": small, "rollout_tokens": small,
    "speculative": st.fixed_dictionaries({}, optional={"k": number, "min_draft_prob": number, "max_batch": number}),
    "unknown_field": number,
})
SAMPLING = {
    "model": st.sampled_from(["proxy-a", "eft-ab", "dlf-ab", "tq", "base-large", "nope", "x\ud800", 5]),
    "n": st.sampled_from([1, 2, 0, -1, 65, 2**63, 1.5]),
    "temperature": number, "top_p": number, "top_k": number, "min_p": number, "seed": number,
    "frequency_penalty": number, "presence_penalty": number,
    "logit_bias": st.dictionaries(st.sampled_from(["0", "17", "-1", "1e3", "9" * 30, "x", "\ud800"]), number,
                                  max_size=3),
    "stop": text | st.lists(text, max_size=3), "stop_token_ids": token_ids, "stream": st.booleans(),
    "stream_options": st.sampled_from([None, {"include_usage": True}, {"include_usage": "x"}, 1]),
    "ignore_eos": st.booleans(), "user": text, "return_tokens_as_token_ids": st.booleans(), "fusion": FUSION,
}
COMPLETION = st.fixed_dictionaries({"prompt": text | token_ids | st.lists(text, max_size=3) | st.just([[1, 2], [3]]),
                                    "max_tokens": small},
                                   optional={**SAMPLING, "logprobs": number, "echo": st.booleans(),
                                             "best_of": number, "suffix": text})
MESSAGE = st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "robot", 1]),
                                 "content": text | st.none() | st.just([{"type": "text", "text": "hi"}])
                                 | st.just([{"type": "image_url"}]) | number})
CHAT = st.fixed_dictionaries({"messages": st.lists(MESSAGE, max_size=3), "max_tokens": small},
                             optional={**SAMPLING, "logprobs": st.booleans() | number, "top_logprobs": number,
                                       "max_completion_tokens": small, "response_format": st.sampled_from(
                                           [{"type": "text"}, {"type": "json_object"}, {}]),
                                       "tools": st.sampled_from([None, [], [{"type": "function"}]])})


def _strict(s: str):
    return json.loads(s, parse_constant=lambda c: (_ for _ in ()).throw(ValueError(f"non-JSON constant {c}")))


@pytest.fixture(scope="module")
def server(config_file):
    url, srv = start_in_thread(config_file)
    reference = httpx.post(f"{url}/v1/completions", json=VALID, timeout=60).json()["choices"][0]["text"]
    answers, stop = [], threading.Event()

    def beside():  # the valid request, over and over, decoding in the fuzzed requests' steps
        with httpx.Client(timeout=120) as c:
            while not stop.is_set():
                r = c.post(f"{url}/v1/completions", json=VALID)
                answers.append((r.status_code, r.json()["choices"][0]["text"] if r.status_code == 200 else r.text))

    t = threading.Thread(target=beside, daemon=True)
    t.start()
    with httpx.Client(timeout=120) as client:
        yield url, client
    stop.set()
    t.join(120)
    assert len(answers) >= 3 and all(a == (200, reference) for a in answers), answers[:3]
    assert srv.config.app.state.serving.pending() == 0


def check(server: tuple, path: str, body: dict) -> None:
    url, client = server
    raw = json.dumps(body)  # NaN/Infinity as Python's json writes them; surrogates as \u escapes
    r = client.post(f"{url}{path}", content=raw, headers={"content-type": "application/json"})
    assert r.status_code < 500, (body, r.text)
    if r.status_code >= 400:
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["code"] == r.status_code, r.text
        assert isinstance(err["message"], str) and err["message"]
        return
    if body.get("stream") is True:
        events = [x[len("data: "):] for x in r.text.split("\n\n") if x.startswith("data: ")]
        assert events[-1] == "[DONE]"
        for e in events[:-1]:
            assert "error" not in _strict(e), (body, e)
    else:
        _strict(r.text)


FUZZ = settings(max_examples=40, deadline=None, derandomize=True, database=None,
                suppress_health_check=list(HealthCheck))


@FUZZ
@given(body=COMPLETION)
def test_fuzzed_completions(server, body):
    check(server, "/v1/completions", body)


@FUZZ
@given(body=CHAT)
def test_fuzzed_chat(server, body):
    check(server, "/v1/chat/completions", body)


@settings(FUZZ, max_examples=20)
@given(body=st.fixed_dictionaries({"model": SAMPLING["model"]}, optional={
    "prompt": text, "messages": st.lists(MESSAGE, max_size=2), "tokens": token_ids}))
def test_fuzzed_tokenize_and_detokenize(server, body):
    check(server, "/tokenize", body)
    check(server, "/detokenize", body)


SAMPLING_FIELDS = ["temperature", "top_p", "top_k", "min_p", "max_tokens", "n", "seed", "logprobs",
                   "frequency_penalty", "presence_penalty", "best_of"]
FUSION_FIELDS = [("proxy-a", "alpha"), ("eft-ab", "beta"), ("proxy-a", "weights.0"), ("dlf-ab", "grid.0"),
                 ("dlf-ab", "grid.1"), ("dlf-ab", "grid.2"), ("tq", "alpha"), ("tq", "top_k"), ("tq", "rollouts"),
                 ("tq", "rollout_tokens"), ("proxy-a", "speculative.k"), ("proxy-a", "speculative.min_draft_prob"),
                 ("proxy-a", "speculative.max_batch")]


def _fusion_with(path: str, value) -> dict:
    """A fusion object with one field (dotted; .N is a list index) set to value."""
    head, _, rest = path.partition(".")
    if head == "weights":
        return {"weights": [value]}
    if head == "grid":
        grid = [0.0, 1.0, 0.5]
        grid[int(rest)] = value
        return {"grid": grid}
    return {head: {rest: value}} if rest else {head: value}


def test_every_numeric_field_at_every_extreme(server):
    for field in SAMPLING_FIELDS:
        for value in NUMBERS:
            check(server, "/v1/completions", {**VALID, "max_tokens": 2, field: value})
    for model, field in FUSION_FIELDS:
        for value in NUMBERS:
            check(server, "/v1/completions", {**VALID, "max_tokens": 1, "model": model, "stream": True,
                                                 "fusion": _fusion_with(field, value)})

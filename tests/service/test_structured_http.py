"""Structured outputs and penalties through the HTTP API: every field spelling reaches the engine, n > 1 and
streaming follow the constraint, logprobs stay the fused distribution's, and every refusal is a 400 naming its
field (a malformed or unspellable grammar, two constraints, speculation, a core install without the extra)."""

import json
import re
import sys
from pathlib import Path

import pytest

pytest.importorskip("llguidance")

from fastapi.testclient import TestClient

from logitfuse.service.app import create_app

ROOT = Path(__file__).resolve().parents[2]

CHOICES = ["red city", "blue king", "the north"]
REGEX = r"(red|blue|green) (city|king|river)( of the (north|south))?"
COMPLETION = {"model": "eft-ab", "prompt": "the red city", "max_tokens": 16, "temperature": 1.0, "seed": 4}
CHAT = {"model": "proxy-a", "messages": [{"role": "user", "content": "king queen"}], "max_tokens": 16,
        "temperature": 1.0, "seed": 4}


def post(client, path, body):
    r = client.post(path, json=body)
    assert r.status_code == 200, r.text
    assert "x-ignored-fields" not in r.headers
    return r.json()


def texts(data):
    return [c["text"] if "text" in c else c["message"]["content"] for c in data["choices"]]


@pytest.mark.parametrize("fields", [{"guided_choice": CHOICES}, {"structured_outputs": {"choice": CHOICES}}])
def test_choice_with_n_and_logprobs_on_completions(client, fields):
    data = post(client, "/v1/completions", {**COMPLETION, **fields, "n": 5, "logprobs": 2})
    assert all(t in CHOICES for t in texts(data)) and len(data["choices"]) == 5
    for c in data["choices"]:
        assert c["finish_reason"] == "stop" and all(lp <= 0 for lp in c["logprobs"]["token_logprobs"])


LARK = 'start: ("red" | "blue") " " ("city" | "king")'


@pytest.mark.parametrize("fields", [{"guided_regex": REGEX}, {"structured_outputs": {"regex": REGEX}},
                                    {"structured_outputs": {"grammar": LARK}}])
def test_regex_and_grammar_on_chat_streamed(client, fields):
    with client.stream("POST", "/v1/chat/completions", json={**CHAT, **fields, "stream": True, "n": 3}) as r:
        assert r.status_code == 200
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    got = {}
    for ch in chunks:
        for c in ch["choices"]:
            got[c["index"]] = got.get(c["index"], "") + (c["delta"].get("content") or "")
    pattern = REGEX if "grammar" not in fields.get("structured_outputs", {}) else "(red|blue) (city|king)"
    assert len(got) == 3 and all(re.fullmatch(pattern, t) for t in got.values()), got


def test_penalties_and_token_controls_are_read(client):
    base = {**COMPLETION, "model": "dlf-ab", "prompt": "king queen", "temperature": 0, "max_tokens": 8,
            "ignore_eos": True}
    plain = texts(post(client, "/v1/completions", base))[0]
    same = texts(post(client, "/v1/completions", {**base, "repetition_penalty": 1.0, "frequency_penalty": 0,
                                                   "presence_penalty": 0, "min_tokens": 0}))[0]
    hard = texts(post(client, "/v1/completions", {**base, "repetition_penalty": 50, "frequency_penalty": 2,
                                                   "presence_penalty": 2}))[0]
    assert same == plain and hard != plain
    pieces = post(client, "/v1/completions", {**base, "logprobs": 0})["choices"][0]["logprobs"]["tokens"]
    words = [p for p in pieces if p.startswith(" ") and len(p) > 2]  # whole-word tokens
    assert words
    banned = post(client, "/v1/completions", {**base, "logprobs": 0, "bad_words": [w.strip() for w in words]})
    assert not set(words) & set(banned["choices"][0]["logprobs"]["tokens"])


@pytest.mark.parametrize("path,body,param,match", [
    ("/v1/completions", {"guided_regex": "(open"}, "guided_regex", "cannot be compiled"),
    ("/v1/completions", {"guided_json": {"type": "object"}}, "guided_json", "cannot spell"),
    ("/v1/chat/completions", {"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
     "response_format", "schema"),
    ("/v1/chat/completions", {"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "nonsense"}}}}, "response_format.json_schema.schema", "nonsense"),
    ("/v1/completions", {"guided_choice": CHOICES, "guided_regex": REGEX}, "guided_choice", "one structured"),
    ("/v1/completions", {"structured_outputs": {"choice": CHOICES, "regex": REGEX}}, "structured_outputs",
     "exactly one"),
    ("/v1/completions", {"structured_outputs": {"structural_tag": "x"}}, "structured_outputs.structural_tag",
     "not supported"),
    ("/v1/completions", {"structured_outputs": {"choice": CHOICES, "disable_any_whitespace": "yes"}},
     "structured_outputs.disable_any_whitespace", "true or false"),
    ("/v1/completions", {"model": "proxy-a", "guided_choice": CHOICES, "fusion": {"speculative": {"k": 2}}},
     "guided_choice", "speculative"),
    ("/v1/completions", {"guided_choice": CHOICES, "ignore_eos": True}, "ignore_eos", "structured"),
    ("/v1/completions", {"frequency_penalty": 3}, "frequency_penalty", "[-2, 2]"),
    ("/v1/completions", {"repetition_penalty": 0}, "repetition_penalty", "(0, 100]"),
    ("/v1/completions", {"allowed_token_ids": [99999]}, "allowed_token_ids", "outside"),
])
def test_refusals_are_400s_naming_the_field(client, path, body, param, match):
    base = COMPLETION if path == "/v1/completions" else CHAT
    r = client.post(path, json={**base, **body})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and match in err["message"], err


def test_a_core_install_refuses_structured_output_naming_the_extra(client, monkeypatch):
    monkeypatch.setitem(sys.modules, "llguidance", None)  # import llguidance now raises ImportError
    r = client.post("/v1/completions", json={**COMPLETION, "guided_choice": ["only this"]})
    assert r.status_code == 400 and "logitfuse[structured]" in r.json()["error"]["message"]
    assert post(client, "/v1/completions", {**COMPLETION, "max_tokens": 2})["choices"]


@pytest.fixture(scope="module")
def default_client():
    """The server out of the box: the embedded family (configs/default.yaml), whose vocabulary has no `{`."""
    with TestClient(create_app(ROOT / "configs" / "default.yaml")) as c:
        yield c


ANSWER = {"type": "object", "properties": {"answer": {"type": "string"}}, "required": ["answer"]}
SCHEMA_FORMAT = {"type": "json_schema", "json_schema": {"name": "answer", "schema": ANSWER}}


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
@pytest.mark.parametrize("extra", [{"temperature": 0}, {"temperature": 1.0, "seed": 3}, {"stream": True},
                                   {"n": 3, "temperature": 1.0}])
def test_a_json_schema_on_a_vocabulary_without_braces_is_a_400_before_decoding(default_client, path, extra):
    prompt = {"prompt": "what is the capital of ludu ?"} if path == "/v1/completions" else {
        "messages": [{"role": "user", "content": "what is the capital of ludu ?"}]}
    r = default_client.post(path, json={"model": "large-qa", **prompt, "max_tokens": 8,
                                        "response_format": SCHEMA_FORMAT, **extra})
    assert r.status_code == 400 and r.headers["content-type"].startswith("application/json"), r.text
    err = r.json()["error"]
    assert err["param"] == "response_format.json_schema.schema"
    assert "must start with '{\"answer\": \"', which no token of base-large's vocabulary can produce" in \
        err["message"], err
    ok = default_client.post(path, json={"model": "large-qa", **prompt, "max_tokens": 2})
    assert ok.status_code == 200, ok.text


def test_a_string_schema_on_the_default_family_is_a_400_naming_the_quote(default_client):
    r = default_client.post("/v1/completions", json={"model": "large-qa", "prompt": "who", "max_tokens": 4,
                                                     "guided_json": {"type": "string"}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "guided_json", r.text
    assert "must start with '\"'" in r.json()["error"]["message"]


DEAD = r"(red|blue) \{[a-z]+\}"  # "red" and "blue" can be spelt, `{` cannot: a dead end after them


def test_a_grammar_reaching_a_dead_end_is_a_400_naming_it_and_the_server_goes_on(client):
    body = {**COMPLETION, "guided_regex": DEAD, "n": 2}
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == "guided_regex" and "GrammarDeadEnd" in err["message"] and "{' next" in err["message"]
    with client.stream("POST", "/v1/chat/completions", json={**CHAT, "guided_regex": DEAD, "stream": True}) as s:
        assert s.status_code == 200
        lines = [line for line in s.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    err = json.loads(lines[-2][6:])["error"]
    assert err["code"] == 400 and err["param"] == "guided_regex" and "{' next" in err["message"], err
    text = "".join(json.loads(x[6:])["choices"][0]["delta"].get("content") or "" for x in lines[:-2])
    assert text.rstrip() in ("red", "blue"), text
    assert post(client, "/v1/completions", {**COMPLETION, "guided_regex": REGEX})["choices"]

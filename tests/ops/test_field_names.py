"""Unknown fields: near-misses of ours are a 400 naming the field and the suggestion, on both endpoints; other
unknown top-level fields are ignored and listed in X-Ignored-Fields; unknown keys inside `fusion` (and in a
config entry) are rejected with the known list."""

import pytest
from pydantic import ValidationError

from logitfuse.config.registry import Registry
from logitfuse.methods.params import FusionParams
from logitfuse.ops.field_names import near_miss
from logitfuse.service.protocol import ChatCompletionRequest, CompletionRequest

COMPLETION = {"model": "proxy-a", "prompt": "the red city", "max_tokens": 2, "temperature": 0}
CHAT = {"model": "proxy-a", "messages": [{"role": "user", "content": "the red city"}], "max_tokens": 2,
        "temperature": 0}
PATHS = {"/v1/completions": COMPLETION, "/v1/chat/completions": CHAT}


@pytest.mark.parametrize("key,meant", [
    ("fusoin", "fusion"), ("fusion_params", "fusion"), ("fusion_config", "fusion"), ("Fusion", "fusion"),
    ("stop_token_id", "stop_token_ids"), ("stopTokenIds", "stop_token_ids"), ("logprob", "logprobs"),
    ("max_token", "max_tokens"), ("maxTokens", "max_tokens"), ("temprature", "temperature"), ("top-k", "top_k"),
    ("topk", "top_k"), ("minp", "min_p"), ("ignore_eso", "ignore_eos"), ("seeds", "seed"),
])
def test_near_misses_name_the_field_they_resemble(key, meant):
    assert near_miss(key, list(CompletionRequest.model_fields)) == meant


@pytest.mark.parametrize("key", ["metadata", "store", "user_id", "request_tag", "x", "parallel_tool_calls",
                                 "model_name_extra"])
def test_other_names_resemble_nothing(key):
    known = [k for k in CompletionRequest.model_fields if k != "model"]
    assert near_miss(key, known) is None


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("key,meant", [("fusoin", "fusion"), ("fusion_params", "fusion"),
                                       ("stop_token_id", "stop_token_ids"), ("max_token", "max_tokens"),
                                       ("temprature", "temperature"), ("topK", "top_k")])
def test_misspelled_fields_are_a_400_naming_field_and_suggestion(client, path, key, meant):
    body = {k: v for k, v in PATHS[path].items() if k != meant}
    r = client.post(path, json={**body, key: {"alpha": 0.5} if "fus" in key else 3})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == key and err["type"] == "invalid_request_error"
    assert repr(key) in err["message"] and f"did you mean {meant!r}" in err["message"]


def test_logprob_is_a_near_miss_on_both_endpoints(client):
    for path in PATHS:
        err = client.post(path, json={**PATHS[path], "logprob": 2}).json()["error"]
        assert err["param"] == "logprob" and "'logprobs'" in err["message"]


def test_a_field_the_body_sets_is_not_suggested_again(client):
    """`stop_token_id` beside `stop_token_ids` is not a misspelling of it: ignored and reported."""
    body = {**COMPLETION, "stop_token_ids": [], "stop_token_id": 1}
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 200 and r.headers["x-ignored-fields"] == "stop_token_id"


@pytest.mark.parametrize("path", list(PATHS))
def test_other_unknown_fields_are_ignored_and_listed(client, path):
    plain = client.post(path, json=PATHS[path])
    assert plain.status_code == 200 and "x-ignored-fields" not in plain.headers
    body = {**PATHS[path], "store": True, "metadata": {"k": "v"}, "priority": 1, "my_tag": "a\nb", "ünï": 1}
    r = client.post(path, json=body)
    assert r.status_code == 200, r.text
    assert r.headers["x-ignored-fields"] == 'store, metadata, priority, my_tag, \\u00fcn\\u00ef'
    field = "text" if path == "/v1/completions" else "message"
    assert r.json()["choices"][0][field] == plain.json()["choices"][0][field]
    with client.stream("POST", path, json={**body, "stream": True}) as s:
        assert s.status_code == 200 and s.headers["x-ignored-fields"].startswith("store, metadata")


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("fusion,param,meant", [
    ({"alpah": 0.5}, "fusion.alpah", "alpha"), ({"expert": ["a"]}, "fusion.expert", "experts"),
    ({"methd": "eft"}, "fusion.methd", "method"),
    ({"speculative": {"max_batches": 2}}, "fusion.speculative.max_batches", "max_batch"),
    ({"temperature": 0.5}, "fusion.temperature", None),
])
def test_unknown_keys_inside_fusion_are_rejected_with_the_known_list(client, path, fusion, param, meant):
    r = client.post(path, json={**PATHS[path], "fusion": fusion})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param
    known = FusionParams.model_fields if "speculative" not in param else ("k", "min_draft_prob", "max_batch")
    assert "known: " + ", ".join(known) in err["message"]
    assert (f"did you mean {meant!r}" in err["message"]) == (meant is not None)


def test_the_schemas_report_ignored_fields_without_a_server():
    req = ChatCompletionRequest.model_validate({**CHAT, "store": True, "user": "u"})
    assert req.ignored_fields() == ["store"] and req.ignored_header() == {"X-Ignored-Fields": "store"}
    assert CompletionRequest.model_validate(COMPLETION).ignored_header() is None
    with pytest.raises(ValidationError, match="did you mean 'fusion'"):
        CompletionRequest.model_validate({**COMPLETION, "fusoin": {}})


def test_config_entries_reject_unknown_keys_with_a_suggestion(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("models:\n  b: {path: /nowhere, chat_templte: true}\nensembles: {}\n")
    with pytest.raises(ValueError, match=r"models\.b\.chat_templte: unknown .*did you mean 'chat_template'"):
        Registry.load(cfg)

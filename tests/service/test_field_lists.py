"""Nothing that changes the output is silently ignored: every field of the OpenAI and vLLM request schemas is
implemented (a field of the request class), refused with a 400 naming it, or output-neutral (tolerated and
listed in X-Ignored-Fields). The three lists are pinned here, and each kind is checked on the live server."""

import pytest

from logitfuse.service.protocol import (
    CHAT_ONLY,
    COMPLETIONS_ONLY,
    REFUSED,
    TOLERATED,
    ChatCompletionRequest,
    CompletionRequest,
)

OPENAI_COMPLETIONS = """model prompt best_of echo frequency_penalty logit_bias logprobs max_tokens n presence_penalty
    seed stop stream stream_options suffix temperature top_p user""".split()
OPENAI_CHAT = """messages model audio frequency_penalty function_call functions logit_bias logprobs
    max_completion_tokens max_tokens metadata modalities n parallel_tool_calls prediction presence_penalty
    prompt_cache_key reasoning_effort response_format safety_identifier seed service_tier stop store stream
    stream_options temperature tool_choice tools top_logprobs top_p user verbosity web_search_options""".split()
VLLM = """use_beam_search top_k min_p repetition_penalty length_penalty stop_token_ids include_stop_str_in_output
    ignore_eos min_tokens skip_special_tokens spaces_between_special_tokens truncate_prompt_tokens allowed_token_ids
    prompt_logprobs bad_words add_generation_prompt continue_final_message add_special_tokens documents
    chat_template chat_template_kwargs mm_processor_kwargs structured_outputs guided_json guided_regex guided_choice
    guided_grammar structural_tag guided_decoding_backend guided_whitespace_pattern priority request_id
    logits_processors return_tokens_as_token_ids return_token_ids cache_salt kv_transfer_params vllm_xargs
    response_format echo""".split()

IMPLEMENTED = {"model", "frequency_penalty", "logit_bias", "max_tokens", "n", "presence_penalty", "seed", "stop",
               "stream", "stream_options", "temperature", "top_p", "user", "top_k", "min_p", "stop_token_ids",
               "ignore_eos", "return_tokens_as_token_ids", "repetition_penalty", "min_tokens", "bad_words",
               "allowed_token_ids", "include_stop_str_in_output", "skip_special_tokens", "response_format",
               "structured_outputs", "guided_json", "guided_regex", "guided_choice", "guided_grammar",
               "guided_decoding_backend", "fusion"}
IMPLEMENTED_COMPLETIONS = IMPLEMENTED | {"prompt", "best_of", "echo", "logprobs", "suffix"}
IMPLEMENTED_CHAT = IMPLEMENTED | {"messages", "logprobs", "top_logprobs", "max_completion_tokens", "tools",
                                  "tool_choice"}
PINNED_REFUSED = {"audio", "function_call", "functions", "modalities", "prediction", "reasoning_effort", "verbosity",
                  "web_search_options", "use_beam_search", "length_penalty", "spaces_between_special_tokens",
                  "truncate_prompt_tokens", "prompt_logprobs", "logits_processors", "add_generation_prompt",
                  "continue_final_message", "add_special_tokens", "chat_template", "chat_template_kwargs",
                  "documents", "mm_processor_kwargs", "structural_tag", "guided_whitespace_pattern", "vllm_xargs",
                  "return_token_ids"}
PINNED_TOLERATED = {"metadata", "store", "safety_identifier", "prompt_cache_key", "service_tier",
                    "parallel_tool_calls", "request_id", "priority", "cache_salt", "kv_transfer_params"}
# a value each refused field takes that would change the output
CHANGING = {"audio": {"voice": "x"}, "function_call": "auto", "functions": [{"name": "f"}], "modalities": ["audio"],
            "prediction": {"type": "content", "content": "x"}, "reasoning_effort": "high", "verbosity": "low",
            "web_search_options": {}, "use_beam_search": True, "length_penalty": 2.0,
            "spaces_between_special_tokens": False, "truncate_prompt_tokens": 3, "prompt_logprobs": 1,
            "logits_processors": ["x"], "add_generation_prompt": False, "continue_final_message": True,
            "add_special_tokens": True, "chat_template": "{{ x }}", "chat_template_kwargs": {"a": 1},
            "documents": [{"text": "x"}], "mm_processor_kwargs": {"a": 1}, "structural_tag": "x",
            "guided_whitespace_pattern": " ", "vllm_xargs": {"a": 1}, "return_token_ids": True,
            "messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}], "tool_choice": "auto",
            "max_completion_tokens": 3, "top_logprobs": 2, "prompt": "x", "suffix": "x", "best_of": 2, "echo": True}
COMPLETION = {"model": "proxy-a", "prompt": "the red city", "max_tokens": 2, "temperature": 0}
CHAT = {"model": "proxy-a", "messages": [{"role": "user", "content": "the red city"}], "max_tokens": 2,
        "temperature": 0}
PATHS = {"/v1/completions": (COMPLETION, CompletionRequest, IMPLEMENTED_COMPLETIONS, CHAT_ONLY),
         "/v1/chat/completions": (CHAT, ChatCompletionRequest, IMPLEMENTED_CHAT, COMPLETIONS_ONLY)}


def test_the_three_lists_are_pinned_disjoint_and_cover_both_schemas():
    assert set(REFUSED) == PINNED_REFUSED and set(TOLERATED) == PINNED_TOLERATED
    assert set(CHAT_ONLY) == {"messages", "tools", "tool_choice", "max_completion_tokens", "top_logprobs"}
    assert set(COMPLETIONS_ONLY) == {"prompt", "suffix", "best_of", "echo"}
    for _, cls, implemented, other in PATHS.values():
        assert set(cls.model_fields) == implemented
        refused = set(REFUSED) | set(other)
        assert not (implemented & refused) and not (implemented & TOLERATED) and not (refused & TOLERATED)
        missing = set(OPENAI_COMPLETIONS + OPENAI_CHAT + VLLM) - implemented - refused - TOLERATED
        assert not missing


@pytest.mark.parametrize("path", list(PATHS))
def test_each_refused_field_is_a_400_naming_it_unless_neutral(client, path):
    body, _, _, other = PATHS[path]
    for name in sorted(set(REFUSED) | set(other)):
        r = client.post(path, json={**body, name: CHANGING[name]})
        assert r.status_code == 400, (name, r.text)
        assert r.json()["error"]["param"] == name, r.text
        neutral = (REFUSED | other)[name][-1]
        ok = client.post(path, json={**body, name: neutral})
        assert ok.status_code == 200, (name, ok.text)


@pytest.mark.parametrize("path", list(PATHS))
def test_tolerated_fields_leave_the_output_as_it_is_and_are_listed(client, path):
    body = PATHS[path][0]
    plain = client.post(path, json=body).json()["choices"][0]
    extra = dict.fromkeys(sorted(TOLERATED), "x")
    r = client.post(path, json={**body, **extra})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0] == plain
    assert set(r.headers["x-ignored-fields"].split(", ")) == TOLERATED


# vLLM's StructuredOutputsParams (vllm/sampling_params.py), with disable_fallback and backend of earlier releases
VLLM_STRUCTURED = """json regex choice grammar json_object disable_any_whitespace disable_additional_properties
    whitespace_pattern structural_tag disable_fallback backend""".split()


def test_each_structured_outputs_key_is_implemented_refused_or_neutral():
    from logitfuse.engine.output_format import (
        STRUCTURED_KEYS,
        STRUCTURED_NEUTRAL,
        STRUCTURED_OPTIONS,
        STRUCTURED_REFUSED,
    )

    kinds = [set(STRUCTURED_KEYS), set(STRUCTURED_OPTIONS), set(STRUCTURED_REFUSED), set(STRUCTURED_NEUTRAL)]
    assert sum(map(len, kinds)) == len(set().union(*kinds)) == len(VLLM_STRUCTURED)
    assert set().union(*kinds) == set(VLLM_STRUCTURED)
    assert set(STRUCTURED_OPTIONS) == {"disable_any_whitespace", "disable_additional_properties"}
    assert set(STRUCTURED_NEUTRAL) == {"disable_fallback", "backend"}  # one grammar engine: nothing to choose


def test_structured_outputs_keys_on_the_live_server(client):
    choice = {"choice": ["red city", "blue king"]}
    body = {**COMPLETION, "temperature": 1.0, "seed": 2, "n": 4}
    plain = client.post("/v1/completions", json={**body, "structured_outputs": choice}).json()["choices"]
    for extra in ({"disable_fallback": True, "backend": "xgrammar"},  # neutral
                  {"disable_any_whitespace": True, "disable_additional_properties": True}):  # JSON only, as vLLM
        r = client.post("/v1/completions", json={**body, "structured_outputs": {**choice, **extra}})
        assert r.status_code == 200 and r.json()["choices"] == plain, (extra, r.text)
    for key, value in (("structural_tag", '{"structures": []}'), ("whitespace_pattern", " *")):
        r = client.post("/v1/completions", json={**body, "structured_outputs": {**choice, key: value}})
        assert r.status_code == 400 and r.json()["error"]["param"] == f"structured_outputs.{key}", r.text
    r = client.post("/v1/completions", json={**body, "structured_outputs": choice,
                                             "guided_decoding_backend": "xgrammar:disable-any-whitespace"})
    assert r.status_code == 200 and r.json()["choices"] == plain, r.text
    r = client.post("/v1/completions", json={**body, "structured_outputs": choice,
                                             "guided_decoding_backend": "xgrammar:any-whitespace"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "guided_decoding_backend", r.text

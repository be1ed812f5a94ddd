"""`fusion.influence` over HTTP: the entries on completions and chat, streamed and not, through the openai
SDK too; without it (absent, false, or an empty fusion object) the answer is byte for byte what it was."""

import json

import openai
import pytest

from logitfuse.service.app import start_in_thread

PROMPT = "the red city of the north"
MSGS = [{"role": "user", "content": "king queen"}]
FIELDS = ["token", "token_id", "logprob", "rank", "base_logprob", "base_rank", "shift", "base_choice", "top",
          "base_top", "experts"]


def _without_ids(body: dict) -> dict:
    return {k: v for k, v in body.items() if k not in ("id", "created")}


def _chunks(resp) -> list[dict]:
    lines = [ln for ln in resp.text.splitlines() if ln.startswith("data: ") and ln != "data: [DONE]"]
    return [json.loads(ln[6:]) for ln in lines]


@pytest.mark.parametrize("path,body", [
    ("/v1/completions", {"prompt": PROMPT, "logprobs": 2}),
    ("/v1/chat/completions", {"messages": MSGS, "logprobs": True, "top_logprobs": 2}),
])
def test_influence_off_leaves_the_answer_as_it_was(client, path, body):
    base = {"model": "proxy-a", "max_tokens": 5, "temperature": 0, **body}
    answers = [client.post(path, json=base | extra) for extra in ({}, {"fusion": {}}, {"fusion": {"influence": False}})]
    texts = [json.dumps(_without_ids(a.json()), sort_keys=True) for a in answers]
    assert all(a.status_code == 200 for a in answers) and texts[0] == texts[1] == texts[2]
    assert "influence" not in texts[0]
    streams = [client.post(path, json=base | extra | {"stream": True})
               for extra in ({}, {"fusion": {"influence": False}})]
    chunks = [[_without_ids(c) for c in _chunks(s)] for s in streams]
    assert chunks[0] == chunks[1] and "influence" not in streams[0].text


@pytest.mark.parametrize("model", ["proxy-a", "dlf-ab", "tq", "base-large"])
def test_completions_carry_one_entry_per_token(client, model):
    body = {"model": model, "prompt": PROMPT, "max_tokens": 4, "temperature": 0, "logprobs": 1,
            "fusion": {"influence": True}}
    out = client.post("/v1/completions", json=body).json()
    choice = out["choices"][0]
    entries = choice["influence"]
    assert len(entries) == out["usage"]["completion_tokens"] == len(choice["logprobs"]["token_logprobs"])
    assert [e["logprob"] for e in entries] == choice["logprobs"]["token_logprobs"]
    assert [e["token"] for e in entries] == choice["logprobs"]["tokens"]
    for e in entries:
        assert list(e)[:len(FIELDS)] == FIELDS
        assert e["shift"] == pytest.approx(e["logprob"] - e["base_logprob"])
        assert len(e["top"]) == 3 and e["top"][0]["logprob"] >= e["top"][1]["logprob"] >= e["top"][2]["logprob"]
        assert e["rank"] == 1  # greedy: the chosen token is the fused argmax
        assert (e["base_choice"] is None) == (e["base_rank"] == 1)
    if model == "tq":
        assert all(isinstance(e["q"], float) for e in entries) and all(e["experts"] == [] for e in entries)
    elif model == "base-large":
        assert all(e["shift"] == 0.0 and e["experts"] == [] for e in entries)
    else:
        assert all(len(e["experts"]) == len(out.get("fusion_diagnostics", {}).get("mean_weights", {"a": 1}))
                   for e in entries)


@pytest.mark.parametrize("path,body", [
    ("/v1/completions", {"prompt": PROMPT}),
    ("/v1/chat/completions", {"messages": MSGS}),
])
def test_a_stream_carries_each_tokens_entry_in_its_chunk(client, path, body):
    req = {"model": "eft-ab", "max_tokens": 5, "temperature": 0, "fusion": {"influence": True}, **body}
    whole = client.post(path, json=req).json()["choices"][0]["influence"]
    chunks = _chunks(client.post(path, json=req | {"stream": True}))
    streamed = [e for c in chunks for ch in c["choices"] for e in ch.get("influence", [])]
    assert streamed == whole and len(whole) == 5
    assert all(len(ch.get("influence", [])) <= 1 for c in chunks for ch in c["choices"])
    assert sum("influence" in ch for c in chunks for ch in c["choices"]) == 5  # chunks without a token: none


def test_no_token_means_an_empty_list(client):
    body = {"model": "proxy-a", "prompt": PROMPT, "max_tokens": 0, "echo": True, "fusion": {"influence": True}}
    out = client.post("/v1/completions", json=body).json()
    assert out["choices"][0]["influence"] == []


def test_a_bad_influence_value_is_a_400_naming_it(client):
    body = {"model": "proxy-a", "prompt": PROMPT, "max_tokens": 2, "fusion": {"influence": "yes please"}}
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 400 and "fusion.influence" in r.json()["error"]["param"]
    assert client.get("/health").status_code == 200


@pytest.fixture(scope="module")
def sdk(config_file):
    url, server = start_in_thread(config_file)
    yield openai.OpenAI(base_url=f"{url}/v1", api_key="unused")
    server.should_exit = True


def test_through_the_openai_sdk_streamed_and_not(sdk):
    extra = {"fusion": {"influence": True}}
    out = sdk.completions.create(model="proxy-a", prompt=PROMPT, max_tokens=4, temperature=0, extra_body=extra)
    entries = out.choices[0].model_extra["influence"]
    assert len(entries) == out.usage.completion_tokens and entries[0]["experts"][0]["expert"] == "a"
    chat = sdk.chat.completions.create(model="proxy-a", messages=MSGS, max_tokens=4, temperature=0, extra_body=extra)
    assert len(chat.choices[0].model_extra["influence"]) == chat.usage.completion_tokens
    streamed = [e for c in sdk.chat.completions.create(model="proxy-a", messages=MSGS, max_tokens=4, temperature=0,
                                                       stream=True, extra_body=extra)
                for ch in c.choices for e in (ch.model_extra or {}).get("influence", [])]
    assert streamed == chat.choices[0].model_extra["influence"]
    plain = sdk.completions.create(model="proxy-a", prompt=PROMPT, max_tokens=4, temperature=0)
    assert "influence" not in (plain.choices[0].model_extra or {})

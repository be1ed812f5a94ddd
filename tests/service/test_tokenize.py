"""vLLM's /tokenize and /detokenize: the ids are the ones generation reads (prompt text, or chat messages
through the template), so a client can build logit_bias, stop_token_ids or token-id prompts from them."""

import pytest

MESSAGES = [{"role": "user", "content": "king queen"}]


def test_tokenize_gives_the_ids_generation_reads(client, ref):
    out = client.post("/tokenize", json={"model": "proxy-a", "prompt": "the red city"}).json()
    ids = ref.requests("proxy-a", "the red city")[0].prompt_ids
    assert out == {"count": len(ids), "max_model_len": ref.pool.get("base-large").max_context, "tokens": ids}
    chat = client.post("/tokenize", json={"model": "proxy-a", "messages": MESSAGES}).json()
    assert chat["tokens"] == ref.requests("proxy-a", messages=MESSAGES)[0].prompt_ids
    assert chat["tokens"] != ids and chat["count"] == len(chat["tokens"])
    text = client.post("/detokenize", json={"model": "proxy-a", "tokens": ids}).json()["prompt"]
    assert text == ref.pool.get("base-large").tokenizer.decode(ids)
    # the ids work as a prompt: the completion reads exactly them
    done = client.post("/v1/completions", json={"model": "proxy-a", "prompt": ids, "max_tokens": 1}).json()
    assert done["usage"]["prompt_tokens"] == len(ids)


@pytest.mark.parametrize("path,body,status,param", [
    ("/tokenize", {"model": "proxy-a"}, 400, "prompt"),
    ("/tokenize", {"model": "proxy-a", "prompt": "x", "messages": MESSAGES}, 400, "prompt"),
    ("/tokenize", {"model": "nope", "prompt": "x"}, 404, "model"),
    ("/detokenize", {"model": "proxy-a", "tokens": [1, 10**7]}, 400, "tokens"),
    ("/detokenize", {"model": "proxy-a", "tokens": "abc"}, 400, "tokens"),
    ("/detokenize", {"model": "nope", "tokens": [1]}, 404, "model"),
])
def test_bad_tokenize_requests_get_their_status(client, path, body, status, param):
    r = client.post(path, json=body)
    assert r.status_code == status, r.text
    assert r.json()["error"]["param"] == param
    assert client.get("/health").status_code == 200

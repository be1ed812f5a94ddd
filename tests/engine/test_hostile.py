"""Hostile values: each is refused at the boundary with a 400 naming its field, or is numerically safe inside;
and a row that fails in the engine ends alone while the rows beside it in the same step get their answers."""

import json

import pytest
import torch

from logitfuse import SamplingParams
from logitfuse.engine.row_sampling import sample_rows
from logitfuse.ops.sampling import SamplingTensors, invalid_rows, sample

BODY = {"model": "proxy-a", "prompt": "the red city", "max_tokens": 4, "ignore_eos": True}


def text(client, body, path="/v1/completions"):
    r = client.post(path, json=body)
    assert r.status_code == 200, r.text
    c = r.json()["choices"][0]
    return c["text"] if "text" in c else c["message"]["content"]


@pytest.mark.parametrize("t", [1e-45, 1e-38, 1e-37, 5e-324, 9e-6])
def test_a_tiny_temperature_is_greedy(client, t):
    bias = {"logit_bias": {"17": 100}}
    for path, extra in (("/v1/completions", {}), ("/v1/chat/completions", {"messages": [{"role": "user",
                                                                                          "content": "king"}]})):
        body = {**BODY, **bias, **extra}
        if extra:
            body.pop("prompt")
        assert text(client, {**body, "temperature": t}, path) == text(client, {**body, "temperature": 0}, path)
    streamed = client.post("/v1/completions", json={**BODY, "temperature": t, "stream": True}).text
    assert "error" not in streamed and streamed.rstrip().endswith("data: [DONE]")


@pytest.mark.parametrize("k", [2**63, 10**30, 2**31, 301])
def test_a_huge_top_k_keeps_the_whole_vocabulary(client, k):
    body = {**BODY, "temperature": 1.0, "seed": 7}
    assert text(client, {**body, "top_k": k}) == text(client, body)


@pytest.mark.parametrize("path,body,param", [
    ("/v1/completions", {**BODY, "prompt": "hi \ud800 there"}, "prompt"),
    ("/v1/completions", {**BODY, "prompt": ["ok", "\udfff"]}, "prompt[1]"),
    ("/v1/completions", {**BODY, "stop": ["\ud83d"]}, "stop[0]"),
    ("/v1/completions", {**BODY, "user": "\udc00"}, "user"),
    ("/v1/completions", {**BODY, "model": "x\ud800"}, "model"),
    ("/v1/chat/completions", {"model": "proxy-a", "messages": [{"role": "user", "content": "a \ud800"}]},
     "messages[0].content"),
    ("/v1/chat/completions", {"model": "proxy-a", "messages": [
        {"role": "user", "content": [{"type": "text", "text": "\ud800"}]}]}, "messages[0].content[0].text"),
    ("/tokenize", {"model": "proxy-a", "prompt": "hi \ud800 there"}, "prompt"),
])
def test_lone_surrogates_get_a_400_naming_the_field(client, path, body, param):
    raw = json.dumps(body)  # ASCII, with the surrogate as a \u escape, as a client's JSON would carry it
    r = client.post(path, content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and "surrogate" in err["message"]


def test_other_unicode_is_fine(client):
    for prompt in ("emoji 🙂🙂 and a pair \U0001F600", "nul \x00 byte", "rtl \u202e text", "e\u0301" * 50, " "):
        assert client.post("/v1/completions", json={**BODY, "prompt": prompt}).status_code == 200
    tok = client.post("/tokenize", json={"model": "proxy-a", "prompt": "\U0001F600"})
    assert tok.status_code == 200


@pytest.mark.parametrize("fusion,param", [
    ({"method": "dlf", "experts": ["a", "b"], "grid": [0, 1e308, 1e306]}, "fusion.grid"),
    ({"method": "dlf", "experts": ["a", "b"], "grid": [-1e300, 0, 1e298]}, "fusion.grid"),
    ({"method": "dlf", "experts": ["a", "b"], "grid": [0, 1, 1e-300]}, "fusion.grid"),
    ({"method": "dlf", "experts": ["a", "b"], "grid": [0, 1, -1]}, "fusion.grid"),
    ({"alpha": 1e-300}, None),  # tqstar on "tq" below; proxy on proxy-a: out of [-100, 100]
    ({"alpha": 1e300}, "fusion.alpha"),
    ({"beta": 1e300}, "fusion.beta"),
    ({"weights": [1e308]}, "fusion.weights"),
    ({"top_k": 10**30}, "fusion.top_k"),
])
def test_fusion_extremes_are_400s_naming_the_field(client, fusion, param):
    r = client.post("/v1/completions", json={**BODY, "fusion": fusion})
    if param is None:
        assert r.status_code == 200  # a tiny proxy alpha is an ordinary coefficient
        r = client.post("/v1/completions", json={**BODY, "model": "tq", "fusion": fusion, "stream": True})
        param = "fusion.alpha"
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_tqstar_alpha_bounds_are_finite_inside(client):
    for alpha in (0.01, 1e9):
        r = client.post("/v1/completions", json={**BODY, "model": "tq", "fusion": {"alpha": alpha}, "logprobs": 3})
        assert r.status_code == 200, r.text
        assert all(isinstance(v, float) for v in r.json()["choices"][0]["logprobs"]["token_logprobs"])


def test_sampling_tensors_make_extremes_safe():
    p = SamplingTensors.build([(1e-45, 2**63, 1.0, 0.0), (1.0, 10**30, 1.0, 0.0)], "cpu", None, 50)
    assert p.temperature.tolist() == [0.0, 1.0] and p.top_k.tolist() == [50, 50]
    scores = torch.randn(2, 50)
    tokens = sample(scores, p, [torch.Generator().manual_seed(0)] * 2)
    assert tokens[0] == scores[0].argmax()
    assert invalid_rows(torch.tensor([[0.0, 1.0], [float("nan"), 0.0], [float("-inf")] * 2,
                                      [float("inf"), 0.0], [float("-inf"), 3.0]])).tolist() == \
        [False, True, True, True, False]


def test_a_row_with_broken_scores_ends_alone(lf):
    sp = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    reqs = [lf.requests("proxy-a", p, sp, rid=r)[0] for p, r in (("the red", "ok"), ("one", "bad"))]
    engine = lf.engine
    for r in reqs:
        engine.add(r)
    engine._admit([])
    seqs = [engine._seqs["ok"], engine._seqs["bad"]]
    scores, _ = engine._fuser.fuse(seqs, engine._slots)
    scores[1, 3] = float("nan")
    events = []
    finished = sample_rows(seqs, scores.clone(), None, lf.pool.get("base-large").tokenizer, events)
    assert finished == ["bad"]
    by = {ev.rid: ev for ev in events}
    assert by["bad"].finish_reason == "error" and "not a distribution" in by["bad"].error
    assert by["ok"].token_id == int(scores[0].argmax()) and by["ok"].finish_reason is None
    for r in reqs:
        engine.abort(r.rid)
    list(lf.stream([]))


def test_a_fault_in_one_rows_fusion_leaves_its_group_and_step(lf, monkeypatch):
    """Two rows of one group in the same steps; fusing any batch holding the hostile row raises. The valid
    row answers exactly as it does alone; the hostile one ends with the error."""
    sp = SamplingParams(max_tokens=6, temperature=0.8, seed=3, ignore_eos=True)
    alone = lf.generate("proxy-a", ["the red city"], sp)[0]
    good = lf.requests("proxy-a", "the red city", sp, rid="good")[0]
    bad = lf.requests("proxy-a", "one two", sp, rid="bad")[0]
    real = lf.engine._fuser.fuse
    steps = []

    def fuse(seqs, slots, trace=None):
        steps.append(sorted(s.req.rid for s in seqs))
        if any(s.req.rid == "bad" for s in seqs):
            raise FloatingPointError("hostile row")
        return real(seqs, slots, trace)

    monkeypatch.setattr(lf.engine._fuser, "fuse", fuse)
    events = list(lf.stream([good, bad]))
    monkeypatch.undo()
    assert steps[0] == ["bad", "good"]  # they did share a step
    ends = {ev.rid: ev for ev in events if ev.finish_reason}
    assert ends["bad"].finish_reason == "error" and "hostile row" in ends["bad"].error
    got = [ev.token_id for ev in events if ev.rid == "good" and ev.token_id is not None]
    assert ends["good"].finish_reason == "length" and got == alone.token_ids

"""A remote base over the OpenAI API: a logitfuse server on the tiny family plays the remote vLLM, and a
second registry fuses its `base-large` with local experts."""

import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from email.utils import formatdate
from itertools import pairwise
from pathlib import Path

import httpx
import pytest
import torch

from logitfuse import LogitFuse, SamplingParams
from logitfuse.backends.remote.client import RemoteError
from logitfuse.errors import InvalidRequest
from logitfuse.ops import candidates, fusion
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
  big5-strict: {{remote: {{url: {url}/v1, model: {remote_model}, top_logprobs: 5, candidates: 0}},
                tokenizer: {family['base-large']}, chat_template: true}}
  base-large: {local.format(family['base-large'])}
  base-small: {local.format(family['base-small'])}
  tuned-a: {local.format(family['tuned-a'])}
experts:
  a: {{tuned: tuned-a, untuned: base-small}}
ensembles:
  remote-proxy: {{base: big, method: proxy, experts: [a], alpha: 0.8}}
  remote-top5:  {{base: big5, method: proxy, experts: [a], alpha: 0.8}}
  remote-top5-strict: {{base: big5-strict, method: proxy, experts: [a], alpha: 0.8}}
  remote-top5-eft: {{base: big5, method: eft, experts: [a], beta: 0.8}}
  remote-bare5: {{base: big5, method: none}}
  local-proxy:  {{base: base-large, method: proxy, experts: [a], alpha: 0.8}}
  local-bare:   {{base: base-large, method: none}}
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


def local_logits(models: dict, ids: list[int]) -> dict[str, torch.Tensor]:
    return {n: m.prefill([ids])[1].double() for n, m in models.items()}


@torch.inference_mode()
def test_candidates_0_restricts_each_step_to_the_base_top_n(client_lf):
    """Reference: the local models step by step, the base's logits masked outside its top 5."""
    models = {n: client_lf.pool.get(n) for n in ("base-large", "tuned-a", "base-small")}
    sp = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    for prompt, out in zip(PROMPTS, client_lf.generate("remote-top5-strict", PROMPTS, sp)):
        ids = models["base-large"].tokenizer(prompt).input_ids
        want = []
        for _ in range(6):
            z = local_logits(models, ids + want)
            base = z["base-large"]
            masked = torch.full_like(base, float("-inf"))
            top = base.topk(5, dim=-1).indices
            masked.scatter_(-1, top, base.gather(-1, top))
            fused = fusion.proxy_tune(masked, z["tuned-a"].unsqueeze(1), z["base-small"].unsqueeze(1),
                                      torch.tensor([[0.8]], dtype=torch.float64))
            want.append(int(fused.argmax(-1)))
            assert want[-1] in top[0].tolist()
        assert out.token_ids == want


@torch.inference_mode()
@pytest.mark.parametrize("ensemble,temperature", [("remote-top5", 0.0), ("remote-top5-eft", 0.0),
                                                  ("remote-top5", 0.9)])
def test_fusion_runs_over_the_union_of_supports_with_the_servers_own_numbers(client_lf, ensemble, temperature):
    """The server scores the candidates outside its top 5 (this server: allowed_token_ids), so each step's
    fused distribution is the white-box one (float64 from the local base) restricted to the base's top 5 plus
    the candidates of ops/candidates.py, and normalised over them; greedy text and logprobs follow it (a
    sampled row's candidates reach MARGIN below the best, a greedy row's only the tokens that could win)."""
    assert client_lf.pool.get("big5").caps.scoring == "allowed"
    models = {n: client_lf.pool.get(n) for n in ("base-large", "tuned-a", "base-small")}
    sp = SamplingParams(max_tokens=6, temperature=temperature, seed=3, ignore_eos=True, logprobs=3)
    margin = 0.0 if temperature == 0 else candidates.MARGIN
    outside = certified = agree = 0
    for prompt, out in zip(PROMPTS, client_lf.generate(ensemble, PROMPTS, sp)):
        ids = models["base-large"].tokenizer(prompt).input_ids
        want, lps = [], []
        for _ in range(6):
            z = local_logits(models, ids + want)
            full = torch.log_softmax(z["base-large"], -1)
            top = full.topk(5, dim=-1).indices
            known = torch.full_like(full, float("-inf")).scatter(-1, top, full.gather(-1, top))
            tuned, untuned = z["tuned-a"].unsqueeze(1), z["base-small"].unsqueeze(1)
            coef = torch.tensor([[0.8]], dtype=torch.float64)
            e, guess = (t.double() for t in candidates.push_and_guess(tuned, untuned, coef))
            miss = candidates.missing(known, e, guess, 4, [[]], margin)[0]
            keep = known.clone()
            keep[0, miss] = full[0, miss]  # the server's exact values
            outside += len(miss)
            fused, white = keep + e, full + e  # EFT's scores, the base's log-probabilities not renormalised
            ok = bool(candidates.certified(known, e, fused)[0])
            certified += ok
            if ok:  # a certified step's argmax is the white-box argmax
                assert int(fused.argmax()) == int(white.argmax())
            agree += int(fused.argmax()) == int(white.argmax())
            want.append(int(fused.argmax(-1)) if temperature == 0 else out.token_ids[len(want)])
            assert math.isfinite(fused[0, want[-1]])  # a sampled token is a candidate
            lps.append(float(torch.log_softmax(fused, -1)[0, want[-1]]))
        assert out.token_ids == want
        assert out.logprobs == pytest.approx(lps, abs=1e-4)
    assert outside > 0 and certified > 0  # candidates outside the top 5 were scored, and steps certified
    assert agree >= certified


def test_a_bare_remote_base_reports_the_servers_own_logprobs(client_lf):
    """Not renormalised over its top 5: the local base's own log-probabilities."""
    sp = SamplingParams(max_tokens=5, temperature=0, ignore_eos=True, logprobs=5)
    local = client_lf.generate("local-bare", PROMPTS, sp)
    remote = client_lf.generate("remote-bare5", PROMPTS, sp)
    for a, b in zip(remote, local):
        assert a.token_ids == b.token_ids
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-4)
        assert [t.logprob for step in a.top_logprobs for t in step] == pytest.approx(
            [t.logprob for step in b.top_logprobs for t in step], abs=1e-4)
        assert sum(math.exp(t.logprob) for t in a.top_logprobs[0]) < 0.999  # the top 5 leave mass elsewhere


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


class RefusingFirst(httpx.BaseTransport):
    """Forwards to the real server, except that the next `refusals` completion calls, and all until the
    monotonic time `until`, are refused: by default a 429 asking to come back in an hour (an HTTP-date,
    capped by the client), else `status` with the Retry-After `after`."""

    def __init__(self, real: httpx.Client, status: int = 429, after: str | None = None) -> None:
        self.real, self.refusals, self.refused, self.until = real, 0, [], 0.0
        self.status, self.after = status, after

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/completions") and (self.refusals > 0 or time.monotonic() < self.until):
            self.refusals -= 1
            self.refused.append(time.monotonic())
            after = self.after or formatdate(time.time() + 3600, usegmt=True)
            return httpx.Response(self.status, headers={"retry-after": after}, text="busy")
        r = self.real.send(self.real.build_request(request.method, request.url, content=request.read(),
                                                   headers={"content-type": "application/json"}))
        return httpx.Response(r.status_code, content=r.content, headers={"content-type": "application/json"})


def stream_gaps(url: str, until: threading.Event) -> list[tuple[float, float]]:
    """Stream local requests one after another until `until` is set: (time, gap to what came before) of every
    chunk, a stream's first counted from the request (a stalled engine may hold a stream's start or its middle)."""
    gaps = []
    body = {"model": "local-proxy", "prompt": "the red city", "max_tokens": 40, "ignore_eos": True, "stream": True}
    while not until.is_set():
        last = time.monotonic()
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    now = time.monotonic()
                    gaps.append((now, now - last))
                    last = now
    return gaps


@pytest.mark.parametrize("lane", [True, False])
def test_a_remote_server_asking_to_retry_later_holds_up_no_other_request(family, remote_url, tmp_path, lane):
    """A remote base answering 429 (Retry-After an hour away, capped at 0.6 s, four times in a row): its
    request completes after the waits, and the local requests streaming meanwhile never stall: with
    remote_lane (the default) they decode on another engine thread; without it, on the same one, which sets
    the refused rows aside until they are due instead of sleeping."""
    cfg = Path(client_config(family, tmp_path, remote_url))
    cfg.write_text(cfg.read_text().replace("server: {preload: false}",
                                           f"server: {{preload: false, remote_lane: {str(lane).lower()}}}"))
    lf = LogitFuse(cfg)
    url, server = start_in_thread(lf)
    try:
        one = {"prompt": "one", "max_tokens": 1}
        assert httpx.post(f"{url}/v1/completions", json={**one, "model": "remote-top5"}, timeout=60).status_code == 200
        assert httpx.post(f"{url}/v1/completions", json={**one, "model": "local-proxy"}, timeout=60).status_code == 200
        lm = lf.model("big5")
        flaky = RefusingFirst(lm.client)
        lm.client = httpx.Client(base_url=lm.url, transport=flaky, timeout=60)
        lm.retries, lm.max_wait = 6, 0.6
        done = threading.Event()
        with ThreadPoolExecutor(2) as pool:
            local = pool.submit(stream_gaps, url, done)
            time.sleep(0.3)  # the local stream is under way
            flaky.refusals = 4
            answer = httpx.post(f"{url}/v1/completions", timeout=60,
                                json={"model": "remote-top5", "prompt": "the red city", "max_tokens": 3,
                                      "ignore_eos": True})
            done.set()
            gaps = local.result()
        assert answer.status_code == 200, answer.text
        assert answer.json()["usage"]["completion_tokens"] == 3, answer.json()  # sampled: past any end token
        assert len(flaky.refused) == 4 and flaky.refused[-1] - flaky.refused[0] >= 1.5  # it did wait, capped
        during = [g for t, g in gaps if flaky.refused[0] <= t <= flaky.refused[-1] + 0.6]
        assert len(during) >= 10 and max(g for _, g in gaps) < 0.5  # streaming went on through the waits
        assert ('lane="remote:big5"' in httpx.get(f"{url}/metrics").text) == lane
    finally:
        server.should_exit = True


def timed_stream(lf, reqs, on_event=None) -> dict[str, list]:
    """Each request's events with the time each came, from one engine (the library's: no remote lane)."""
    out = {r.rid: [] for r in reqs}
    for ev in lf.stream(reqs):
        out[ev.rid].append((time.monotonic(), ev))
        if on_event is not None:
            on_event(ev)
    return out


@pytest.mark.parametrize("when", ["prefill", "decode"])
def test_rows_a_remote_server_refuses_wait_aside_while_the_others_decode(family, remote_url, tmp_path, when):
    """One engine thread decodes two remote rows (one multi-prompt call a step) and two local ones; the
    remote server answers 503 with Retry-After for a second, from the remote rows' prefill or from amid
    their decoding. The remote rows come back after the wait the server asked for (capped at 1.5 s), the
    local rows decode on meanwhile (they never wait for it), and the remote rows resume where they were,
    with the tokens an unrefused run gives."""
    lf = LogitFuse(client_config(family, tmp_path, remote_url))
    lm = lf.model("big5")
    assert lm.caps.multi_prompt  # the step's remote rows go in one call
    remote_sp = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    local_sp = SamplingParams(max_tokens=240, temperature=0, ignore_eos=True)

    def requests():
        return (lf.requests("remote-top5", PROMPTS[0], remote_sp) + lf.requests("remote-top5", PROMPTS[2], remote_sp)
                + lf.requests("local-proxy", PROMPTS[0], local_sp) + lf.requests("local-proxy", PROMPTS[1], local_sp))

    want = timed_stream(lf, requests())
    flaky = RefusingFirst(lm.client, status=503, after="2")
    lm.client = httpx.Client(base_url=lm.url, transport=flaky, timeout=60)
    lm.retries, lm.max_wait = 5, 1.5  # the wait: 1.35-1.5 s
    reqs = requests()
    if when == "prefill":
        flaky.until = time.monotonic() + 1.0
    seen = []

    def refuse_amid(ev):
        seen.append(ev.rid)
        if when == "decode" and seen.count(reqs[0].rid) == 2 and not flaky.refused:
            flaky.until = time.monotonic() + 1.0

    got = timed_stream(lf, reqs, refuse_amid)
    back = min(t for t, _ in got[reqs[0].rid] if t > flaky.refused[0])  # the remote rows' next token
    assert back - flaky.refused[0] >= 1.3  # the server's wait
    for r in reqs[2:]:
        times = [t for t, _ in got[r.rid]]
        # decoded through the wait, never held up by it (a sleep on the engine thread gives one gap of ~1.4 s;
        # the count is kept low: a loaded machine decodes few tiny steps in 1.4 s)
        assert len([t for t in times if flaky.refused[0] < t < back]) >= 3
        assert max(b - a for a, b in pairwise(times)) < 1.0
    for r, w in zip(reqs[:2], list(want.values())[:2]):
        tokens = [ev.token_id for _, ev in got[r.rid] if ev.token_id is not None]
        assert tokens == [ev.token_id for _, ev in w if ev.token_id is not None] and len(tokens) == 6
        assert got[r.rid][-1][1].finish_reason == "length"


def test_a_remote_server_that_keeps_refusing_ends_its_rows_alone(family, remote_url, tmp_path):
    """Past the model's retries, the held remote rows end with the server's status; the local rows decoding
    beside them end as asked."""
    lf = LogitFuse(client_config(family, tmp_path, remote_url))
    lm = lf.model("big5")
    lf.generate("remote-top5", ["one"], SamplingParams(max_tokens=1))
    flaky = RefusingFirst(lm.client, status=503, after="0")
    lm.client = httpx.Client(base_url=lm.url, transport=flaky, timeout=60)
    lm.retries, flaky.refusals = 2, 100
    sp = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
    reqs = lf.requests("remote-top5", PROMPTS[0], sp) + lf.requests("local-proxy", PROMPTS[0], sp)
    got = timed_stream(lf, reqs)
    remote, local = (got[r.rid][-1][1] for r in reqs)
    assert remote.finish_reason == "error" and "503" in remote.error and len(flaky.refused) == 3
    assert local.finish_reason == "length" and local.completion_tokens == 20


def test_requests_set_aside_can_be_aborted_and_the_engine_idles_without_spinning(family, remote_url, tmp_path):
    """A server asking to come back in 30 s: a request refused at its prefill, and one refused amid its
    decoding, wait aside; a step meanwhile naps briefly (no spinning, no call, no 30 s wait), and an abort
    ends either at once (the engine then has no work left)."""
    from logitfuse.engine.deferral import NAP

    lf = LogitFuse(client_config(family, tmp_path, remote_url))
    lm = lf.model("big5")
    lf.generate("remote-top5", ["one"], SamplingParams(max_tokens=1))
    flaky = RefusingFirst(lm.client, status=503, after="30")
    lm.client = httpx.Client(base_url=lm.url, transport=flaky, timeout=60)
    lm.max_wait = 30.0
    engine, sp = lf.engine, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    first, second = (lf.requests("remote-top5", p, sp)[0] for p in PROMPTS[:2])
    engine.add(first)
    flaky.until = time.monotonic() + 60
    assert engine.step() == [] and len(flaky.refused) == 1  # refused at its prefill: set aside
    assert engine.has_work() and not engine.is_running(first.rid)
    flaky.until = 0.0
    engine.add(second)
    assert [ev.rid for ev in engine.step() if ev.token_id is not None] == [second.rid]  # the other one goes on
    flaky.until = time.monotonic() + 60
    steps = 0
    while engine.step():  # until a step yields nothing: the second one is aside too
        steps += 1
        assert steps < 8
    assert len(flaky.refused) >= 2 and engine.is_running(second.rid)
    t0 = time.monotonic()
    assert engine.step() == [] and NAP / 2 <= time.monotonic() - t0 < 1.0  # nothing to run: a nap, no call
    engine.abort(first.rid)
    engine.abort(second.rid)
    ends = {ev.rid: ev.finish_reason for ev in engine.step()}
    assert ends == {second.rid: "abort"} and not engine.has_work()  # the first had not started: it just leaves

"""The one retry policy: Retry-After in both RFC 9110 forms, capped, jittered; used by the remote backend
and by `generate --server`."""

import json
import time
from email.utils import formatdate

import httpx
import pytest
import torch

from logitfuse.backends.remote.retry import retry_after_seconds, retry_wait

NOW = 1_780_000_000.0  # a fixed clock for the date forms


@pytest.mark.parametrize("value, seconds", [
    ("7", 7.0), (" 2.5 ", 2.5), ("0", 0.0), ("-3", 0.0),
    (formatdate(NOW + 120, usegmt=True), 120.0),  # IMF-fixdate: Sun, 06 Nov 1994 08:49:37 GMT
    (time.strftime("%A, %d-%b-%y %H:%M:%S GMT", time.gmtime(NOW + 60)), 60.0),  # obsolete RFC 850 form
    (time.strftime("%a %b %d %H:%M:%S %Y", time.gmtime(NOW + 30)), 30.0),  # obsolete asctime form
    (formatdate(NOW - 500, usegmt=True), 0.0),  # a date already past: no wait
    (None, None), ("", None), ("soon", None), ("nan", None), ("inf", None),
])
def test_retry_after_is_read_in_both_forms(value, seconds):
    got = retry_after_seconds(value, now=NOW)
    assert got == (None if seconds is None else pytest.approx(seconds, abs=1e-6))


def test_waits_honour_the_server_are_capped_and_jittered():
    hour = formatdate(NOW + 3600, usegmt=True)
    assert retry_wait(0, hour, cap=30.0, rng=lambda: 0.0, now=NOW) == 30.0
    assert 27.0 <= retry_wait(0, hour, cap=30.0, now=NOW) <= 30.0
    assert retry_wait(0, "3600", cap=5.0, rng=lambda: 1.0) == pytest.approx(4.5)
    assert retry_wait(0, "2", cap=30.0, rng=lambda: 1.0) == pytest.approx(2.2)  # never earlier than asked
    waits = [retry_wait(a, None, cap=8.0, base=0.25, rng=lambda: 0.5) for a in range(8)]
    assert waits[:5] == pytest.approx([0.25 * 2**a * 1.05 for a in range(5)])
    assert max(waits) <= 8.0 and waits[-1] == pytest.approx(8.0 * 0.95)
    draws = {round(retry_wait(1, None, cap=60.0), 6) for _ in range(50)}
    assert len(draws) > 40 and all(0.5 <= d <= 0.55 for d in draws)  # spread, within 10% above the target


def test_the_remote_backend_waits_a_capped_http_date_then_reads_the_answer(family, monkeypatch):
    from transformers import AutoTokenizer

    from logitfuse.backends.remote.client import RemoteCausalLM
    from logitfuse.config.specs import RemoteSpec

    slept: list[float] = []
    monkeypatch.setattr("time.sleep", slept.append)
    hour = formatdate(time.time() + 3600, usegmt=True)
    answers = [httpx.Response(429, headers={"retry-after": hour}), httpx.Response(429, headers={"retry-after": "1"}),
               httpx.Response(200, json={"choices": [{"logprobs": {"top_logprobs": [{"token_id:5": -0.1}]}}]})]
    spec = RemoteSpec(url="http://remote/v1", model="m", top_logprobs=1, retries=2, retry_max_wait=4.0)
    tok = AutoTokenizer.from_pretrained(family["base-large"])
    client = httpx.Client(base_url=spec.url, transport=httpx.MockTransport(lambda request: answers.pop(0)))
    _, logits = RemoteCausalLM("big", spec, tok, client=client).prefill([[1, 2, 3]])
    assert logits[0, 5] == pytest.approx(-0.1) and answers == []
    assert 3.6 <= slept[0] <= 4.0 and 1.0 <= slept[1] <= 1.1  # the hour capped; a second honoured


def test_within_the_engines_steps_a_refused_call_raises_instead_of_waiting(family, monkeypatch):
    """retries_deferred (the engine's steps): a 503 raises RetryLater carrying the server's Retry-After, on
    the calling thread and on the request threads a step's calls fan out to, with no sleep; the rows keep
    their tokens and `refresh` reads their logits when the caller comes back. Outside it the backend waits."""
    from transformers import AutoTokenizer

    from logitfuse.backends.remote.client import RemoteCausalLM, RemoteState
    from logitfuse.backends.remote.retry import RetryLater, retries_deferred
    from logitfuse.config.specs import RemoteSpec

    slept: list[float] = []
    monkeypatch.setattr("time.sleep", slept.append)
    answers: list[int] = []  # the statuses of the next answers

    def answer(request: httpx.Request) -> httpx.Response:
        if answers.pop(0) == 503:
            return httpx.Response(503, headers={"retry-after": "7"}, text="busy")
        return httpx.Response(200, json={"choices": [{"logprobs": {"top_logprobs": [{"token_id:5": -0.1}]}}]})

    spec = RemoteSpec(url="http://remote/v1", model="m", top_logprobs=1, retries=2)
    tok = AutoTokenizer.from_pretrained(family["base-large"])
    lm = RemoteCausalLM("big", spec, tok, client=httpx.Client(base_url=spec.url, transport=httpx.MockTransport(answer)))
    answers += [503]
    with retries_deferred(), pytest.raises(RetryLater, match="503") as caught:
        lm.prefill([[1, 2, 3]])  # the call goes out on a request thread (self.pool)
    assert caught.value.retry_after == "7" and caught.value.model == "big" and slept == [] and answers == []
    state = RemoteState([[1, 2, 3]])
    answers += [503]
    with retries_deferred(), pytest.raises(RetryLater):
        lm.decode(state, torch.tensor([[9]]))
    assert state.rows == [[1, 2, 3, 9]] and slept == []  # the token is kept for the call to come
    answers += [200]
    with retries_deferred():
        assert lm.refresh(state)[0, 5] == pytest.approx(-0.1)
    answers += [503, 200]
    assert lm.refresh(state)[0, 5] == pytest.approx(-0.1) and len(slept) == 1 and 7.0 <= slept[0] <= 7.7


def test_generate_server_completes_through_429s_with_http_dates(tmp_path):
    from logitfuse.batch.records import Stats, Writer, read_input
    from logitfuse.batch.server import run_remote
    from logitfuse.cli import build_parser

    seen: dict[str, int] = {}

    def handler(request: httpx.Request) -> httpx.Response:
        prompt = json.loads(request.content)["prompt"]
        seen[prompt] = seen.get(prompt, 0) + 1
        if seen[prompt] == 1:  # every request refused once, asked to come back in an hour
            return httpx.Response(429, headers={"retry-after": formatdate(time.time() + 3600, usegmt=True)})
        return httpx.Response(200, json={"choices": [{"index": 0, "text": f"<{prompt}>", "finish_reason": "length"}],
                                         "usage": {"prompt_tokens": 1, "completion_tokens": 1}})

    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text("".join(json.dumps({"id": f"r{i}", "prompt": f"p{i}"}) + "\n" for i in range(4)))
    args = build_parser().parse_args(["generate", "--model", "m", "--input", str(inp), "--output", str(out),
                                      "--server", "http://fake", "--retries", "2"])
    args.retry_max_wait = 0.2
    writer, stats, t0 = Writer(out), Stats(), time.perf_counter()
    run_remote(args, read_input(inp), writer, stats, transport=httpx.MockTransport(handler))
    writer.close()
    records = {r["id"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert {k: r["text"] for k, r in records.items()} == {f"r{i}": f"<p{i}>" for i in range(4)}
    assert seen == {f"p{i}": 2 for i in range(4)} and stats.failed == 0
    assert time.perf_counter() - t0 < 5.0  # the hour was capped at 0.2 s

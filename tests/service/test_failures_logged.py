"""Every 5xx reaches the server's log once, with its request id, its cause and its traceback, and is counted by
cause; every request a client cuts, streamed or not, gets its access line and its count with status 499 and
is aborted. Against a real server on loopback, failures injected into its engine."""

import json
import logging
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from logitfuse.errors import ModelUnavailable
from logitfuse.service.app import start_in_thread

BODY = {"model": "base-large", "prompt": "the red city", "max_tokens": 40, "temperature": 0, "ignore_eos": True}
LOGGERS = ("logitfuse", "uvicorn")


@pytest.fixture(scope="module")
def live(config_file):
    url, server = start_in_thread(config_file)
    yield url, server.config.app.state.serving
    server.should_exit = True


@pytest.fixture
def logs(caplog):
    """Every record of the server's loggers, uvicorn's too (its own handler keeps them from the root's)."""
    for name in LOGGERS:
        caplog.set_level(logging.INFO, logger=name)
    logging.getLogger("uvicorn").addHandler(caplog.handler)
    yield caplog
    logging.getLogger("uvicorn").removeHandler(caplog.handler)


def wait_until(cond, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not cond() and time.monotonic() < deadline:
        time.sleep(0.02)
    return bool(cond())


def sample(url: str, name: str, **labels) -> float:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


def messages(caplog, *words: str, logger: str | None = None) -> list[str]:
    """Every record holding all the words, with the text of its exception when it has one."""
    out = []
    for rec in caplog.records:
        text = rec.getMessage() + (logging.Formatter().formatException(rec.exc_info) if rec.exc_info else "")
        if all(w in text for w in words) and (logger is None or rec.name == logger):
            out.append(text)
    return out


def access(caplog, rid: str) -> list[str]:
    return messages(caplog, f"request_id={rid} ", logger="logitfuse.access")


def fail_decode(monkeypatch, sv, after: int, message: str) -> None:
    """The base's decode raises RuntimeError(message) from its call number `after` on (the prefill's token and
    `after` decoded ones come first)."""
    backend = sv.lf.model("base-large")
    real, calls = backend.decode, [0]

    def failing_decode(*args, **kwargs):
        calls[0] += 1
        if calls[0] > after:
            raise RuntimeError(message)
        return real(*args, **kwargs)

    monkeypatch.setattr(backend, "decode", failing_decode)


def slow_decode(monkeypatch, sv, seconds: float) -> None:
    backend = sv.lf.model("base-large")
    real = backend.decode

    def slow(*args, **kwargs):
        time.sleep(seconds)
        return real(*args, **kwargs)

    monkeypatch.setattr(backend, "decode", slow)


def errors(url: str, cause: str) -> float:
    return sample(url, "logitfuse_request_errors_total", path="/v1/completions", status="500", cause=cause)


def check_logged_once(logs, rid: str, message: str) -> None:
    """One record names the failure: its request id, cause, message and traceback (with the raising frame);
    nothing else (no other logger, no second line, no exc_info of uvicorn's) repeats it."""
    assert wait_until(lambda: access(logs, rid), 5)
    lines = messages(logs, message)
    assert len(lines) == 1, lines
    line = lines[0]
    assert f"request_id={rid} status=500 cause=RuntimeError" in line and f"RuntimeError: {message}" in line
    assert "Traceback (most recent call last)" in line and "in failing_decode" in line
    assert not [rec for rec in logs.records if rec.exc_info]


def test_a_generation_that_raises_is_a_500_logged_once_with_its_traceback_and_counted(live, logs, monkeypatch):
    url, sv = live
    before = errors(url, "RuntimeError")
    fail_decode(monkeypatch, sv, 3, "boom-json")
    r = httpx.post(f"{url}/v1/completions", json=BODY, headers={"X-Request-Id": "fail-json"}, timeout=60)
    assert r.status_code == 500
    assert r.json()["error"]["message"] == "generation failed (request id fail-json): RuntimeError: boom-json"
    check_logged_once(logs, "fail-json", "boom-json")
    assert "status=500" in access(logs, "fail-json")[0]
    assert errors(url, "RuntimeError") - before == 1


def test_a_stream_that_fails_after_its_first_chunks_is_logged_once_and_counted(live, logs, monkeypatch):
    url, sv = live
    before = errors(url, "RuntimeError")
    fail_decode(monkeypatch, sv, 3, "boom-stream")
    with httpx.stream("POST", f"{url}/v1/completions", json={**BODY, "stream": True},
                      headers={"X-Request-Id": "fail-stream"}, timeout=60) as r:
        assert r.status_code == 200
        data = [line[len("data: "):] for line in r.iter_lines() if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    events = [json.loads(d) for d in data[:-1]]
    texts = [e["choices"][0]["text"] for e in events if "choices" in e]
    assert len(texts) == 4  # the prefill's token and 3 decoded ones, then the failure
    assert events[-1]["error"] == {"message": "generation failed (request id fail-stream): RuntimeError: boom-stream",
                                   "type": "server_error", "param": None, "code": 500}
    check_logged_once(logs, "fail-stream", "boom-stream")
    assert "status=200" in access(logs, "fail-stream")[0]  # the status line went out before the failure
    assert errors(url, "RuntimeError") - before == 1


def test_a_failing_step_writes_its_traceback_once_and_names_every_request(live, logs, monkeypatch):
    """One step fails under two requests: each request's line names its id; the traceback is written once."""
    url, sv = live
    engine, real = sv.runner.engine, sv.runner.engine.step

    def failing_step():
        if engine.stats().running == 2:
            raise RuntimeError("boom-step")
        return real()

    monkeypatch.setattr(engine, "step", failing_step)
    slow_decode(monkeypatch, sv, 0.02)
    before = errors(url, "RuntimeError")

    def post(rid: str) -> httpx.Response:
        return httpx.post(f"{url}/v1/completions", json=BODY, headers={"X-Request-Id": rid}, timeout=60)

    with ThreadPoolExecutor(2) as pool:
        answers = list(pool.map(post, ["step-1", "step-2"]))
    assert [a.status_code for a in answers] == [500, 500]
    assert wait_until(lambda: access(logs, "step-1") and access(logs, "step-2"), 5)
    lines = messages(logs, "cause=RuntimeError", "boom-step")
    assert len(lines) == 2 and sum("Traceback (most recent call last)" in x for x in lines) == 1
    assert {x.split()[0] for x in lines} == {"request_id=step-1", "request_id=step-2"}
    repeat = next(x for x in lines if "Traceback" not in x)
    written = next(x for x in lines if "Traceback" in x).split()[0]
    assert f'traceback="as written with {written}"' in repeat
    assert len(messages(logs, "engine step failed in lane main (RuntimeError: boom-step)")) == 1
    assert not [rec for rec in logs.records if rec.exc_info]
    assert errors(url, "RuntimeError") - before == 2


def requests_499(url: str) -> float:
    return sample(url, "logitfuse_requests_total", path="/v1/completions", status="499")


def test_a_stream_the_client_cuts_is_logged_and_counted_as_499_and_aborted(live, logs, monkeypatch):
    url, sv = live
    slow_decode(monkeypatch, sv, 0.05)  # 200 tokens would take 10 s
    before = requests_499(url)
    with httpx.stream("POST", f"{url}/v1/completions", json={**BODY, "max_tokens": 200, "stream": True},
                      headers={"X-Request-Id": "cut-stream"}, timeout=60) as r:
        chunks = []
        for line in r.iter_lines():
            if line.startswith("data: "):
                chunks.append(line)
            if len(chunks) == 4:
                break
    cut = time.monotonic()
    assert wait_until(lambda: access(logs, "cut-stream"), 5)
    line = access(logs, "cut-stream")[0]
    assert " status=499 " in line and float(line.split("latency_ms=")[1].split()[0]) > 0
    assert wait_until(lambda: sv.pending() == 0 and sv.runner.stats().running == 0, 5)
    assert time.monotonic() - cut < 3  # aborted: its 200 tokens would have run for 10 s
    assert requests_499(url) - before == 1
    assert not messages(logs, "cut-stream", logger="logitfuse.service")  # a client leaving is no failure
    assert httpx.get(f"{url}/health", timeout=5).status_code == 200


def test_a_json_request_the_client_cuts_is_logged_and_counted_as_499_and_aborted(live, logs, monkeypatch):
    url, sv = live
    slow_decode(monkeypatch, sv, 0.05)
    before = requests_499(url)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{url}/v1/completions", json={**BODY, "max_tokens": 200}, headers={"X-Request-Id": "cut-json"},
                   timeout=0.5)
    cut = time.monotonic()
    assert wait_until(lambda: access(logs, "cut-json"), 5)
    assert " status=499 " in access(logs, "cut-json")[0]
    assert wait_until(lambda: sv.pending() == 0, 5) and time.monotonic() - cut < 3
    assert requests_499(url) - before == 1
    assert httpx.post(f"{url}/v1/completions", json={**BODY, "max_tokens": 2}, timeout=60).status_code == 200


def test_a_client_that_leaves_while_sending_its_body_is_a_499_and_no_failure(live, logs):
    url, _ = live
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 100\r\nX-Request-Id: cut-body\r\n\r\n{\"model\": ")
        time.sleep(0.2)
    assert wait_until(lambda: access(logs, "cut-body"), 5)
    assert " status=499 " in access(logs, "cut-body")[0]
    assert not [rec for rec in logs.records if rec.levelno >= logging.WARNING]


def test_an_exception_of_the_serving_layer_is_answered_and_logged_once(live, logs, monkeypatch):
    """No handler takes an unknown exception: the guard answers the 500 and logs it, and uvicorn logs nothing."""
    url, sv = live

    def failing_decode(*args):  # named as the frame the traceback must show
        raise RuntimeError("boom-build")

    monkeypatch.setattr(sv, "build", failing_decode)
    before = errors(url, "RuntimeError")
    r = httpx.post(f"{url}/v1/completions", json=BODY, headers={"X-Request-Id": "fail-build"}, timeout=60)
    assert r.status_code == 500 and r.headers["x-request-id"] == "fail-build"
    assert r.json()["error"]["message"] == "internal server error (request id fail-build): RuntimeError"
    check_logged_once(logs, "fail-build", "boom-build")
    assert not messages(logs, "Exception in ASGI application")
    assert errors(url, "RuntimeError") - before == 1


def test_a_503_is_a_warning_with_its_cause_and_counted(client, caplog, monkeypatch):
    """A model that failed to load: the 503 keeps its Retry-After, and is logged once and counted by cause."""
    sv = client.app.state.serving

    def refuse(*args):
        raise ModelUnavailable("model 'base-large' could not be loaded from /x: boom-load", retry_after=7)

    monkeypatch.setattr(sv, "build", refuse)
    with caplog.at_level(logging.INFO, logger="logitfuse"):
        r = client.post("/v1/completions", json=BODY, headers={"X-Request-Id": "fail-503"})
    assert r.status_code == 503 and r.headers["retry-after"] == "7"
    lines = [rec for rec in caplog.records if "boom-load" in rec.getMessage()]
    assert len(lines) == 1 and lines[0].levelno == logging.WARNING
    assert lines[0].getMessage().startswith("request_id=fail-503 status=503 cause=ModelUnavailable ")
    assert "in refuse" in lines[0].getMessage()
    text = client.get("/metrics").text
    assert 'logitfuse_request_errors_total{cause="ModelUnavailable",path="/v1/completions",status="503"} 1.0' in text

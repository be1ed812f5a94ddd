"""Operations under faults and bursts: disconnects, queue bounds, body limits, corrupt checkpoints, fairness
beside heavy rows, log lines, keys, request ids and connection timeouts."""

import logging
import shutil
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from fastapi.testclient import TestClient

from logitfuse import LogitFuse, SamplingParams
from logitfuse.errors import Overloaded
from logitfuse.runner import EngineRunner
from logitfuse.service import middleware
from logitfuse.service.app import api_keys, create_app, start_in_thread

LIGHT = {"model": "proxy-a", "prompt": "the red city", "max_tokens": 8, "temperature": 0, "ignore_eos": True}
HEAVY = {"model": "tq", "prompt": "the", "max_tokens": 200, "ignore_eos": True,
         "fusion": {"top_k": 16, "rollouts": 4, "rollout_tokens": 64}}  # 4096: the server's max_tqstar_work


def config(config_file, tmp_path, server: str, name: str = "c.yaml"):
    cfg = tmp_path / name
    cfg.write_text(config_file.read_text().replace("server: {", "server: {" + server + ", "))
    return cfg


@pytest.fixture(scope="module")
def live(config_file, tmp_path_factory):
    """A real uvicorn server with short connection timeouts and a small connection limit."""
    cfg = config(config_file, tmp_path_factory.mktemp("live"),
                 "header_timeout: 0.5, body_timeout: 0.5, max_connections: 6")
    url, server = start_in_thread(cfg)
    yield url, server.config.app.state.serving
    server.should_exit = True


def wait_until(cond, timeout: float) -> float:
    t0 = time.monotonic()
    while not cond() and time.monotonic() - t0 < timeout:
        time.sleep(0.01)
    return time.monotonic() - t0


def test_a_json_client_that_leaves_is_aborted_at_once(live):
    url, sv = live
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{url}/v1/completions", json=HEAVY, timeout=0.5)
    left = time.monotonic()
    assert wait_until(lambda: sv.pending() == 0, 10) < 2.0
    # the heavy request alone runs for far longer than that: one token of it takes a visible fraction
    t0 = time.monotonic()
    httpx.post(f"{url}/v1/completions", json={**HEAVY, "max_tokens": 2}, timeout=60)
    assert (time.monotonic() - t0) / 2 * 200 > 4 * (time.monotonic() - left - (time.monotonic() - t0))


def test_a_burst_admits_at_most_max_queue_waiting(config_file, tmp_path):
    lf = LogitFuse(config(config_file, tmp_path, "max_queue: 8"))
    runner = EngineRunner(lf)  # not started: nothing leaves the queue, every admitted sequence waits
    sp = SamplingParams(max_tokens=2)
    reqs = [lf.requests("base-large", "one", sp, rid=f"r{i}")[0] for i in range(40)]
    barrier = threading.Barrier(40)

    def submit(r):
        barrier.wait()
        try:
            runner.submit([r], lambda ev: None)
            return True
        except Overloaded:
            return False

    with ThreadPoolExecutor(40) as pool:
        admitted = sum(pool.map(submit, reqs))
    assert admitted == 8 and runner.waiting() == 8


def test_running_sequences_do_not_count_against_max_queue(config_file, tmp_path):
    lf = LogitFuse(config(config_file, tmp_path, "max_queue: 4"))
    runner = EngineRunner(lf).start()
    done = threading.Event()
    ends = []

    def sink(ev):
        if ev.finish_reason:
            ends.append(ev)
            if len(ends) == 8:
                done.set()
    try:
        sp = SamplingParams(max_tokens=120, ignore_eos=True)
        runner.submit([lf.requests("proxy-a", "one", sp, rid=f"a{i}")[0] for i in range(4)], sink)
        assert wait_until(lambda: runner.waiting() == 0, 10) < 10 and runner.pending() == 4
        runner.submit([lf.requests("proxy-a", "two", sp, rid=f"b{i}")[0] for i in range(4)], sink)  # no 429
        with pytest.raises(Overloaded, match=r"server\.max_queue"):
            runner.submit([lf.requests("proxy-a", "x", sp, rid=f"c{i}")[0] for i in range(5)], sink)
        assert done.wait(60) and {e.finish_reason for e in ends} == {"length"}
    finally:
        runner.stop()


def test_http_burst_gets_only_200_and_429_with_retry_after(config_file, tmp_path):
    url, server = start_in_thread(config(config_file, tmp_path, "max_queue: 3, max_batch: 2"))
    try:
        with ThreadPoolExecutor(24) as pool:
            rs = list(pool.map(lambda _: httpx.post(f"{url}/v1/completions", json=LIGHT, timeout=60), range(24)))
        assert {r.status_code for r in rs} <= {200, 429} and any(r.status_code == 429 for r in rs)
        assert all(r.headers["retry-after"] == "1" for r in rs if r.status_code == 429)
        assert server.config.app.state.serving.pending() == 0
    finally:
        server.should_exit = True


def test_a_large_body_gets_413_before_it_is_read_and_others_keep_their_latency(live, monkeypatch):
    url, _ = live
    t0 = time.monotonic()
    r = httpx.post(f"{url}/v1/completions", json={**LIGHT, "prompt": "x" * 1_000_000}, timeout=30)
    assert r.status_code == 413 and r.json()["error"]["param"] == "body" and time.monotonic() - t0 < 2

    def chunks():  # no Content-Length: the limit is counted while reading
        for _ in range(20):
            yield b" " * 100_000
    r = httpx.post(f"{url}/v1/completions", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413
    alone = min(_timed(url) for _ in range(3))
    with ThreadPoolExecutor(4) as pool:  # 4 + the timed one stay under max_connections 6 (over it uvicorn says 503)
        big = [pool.submit(httpx.post, f"{url}/v1/completions", json={**LIGHT, "prompt": "y" * 1_000_000},
                           timeout=60) for _ in range(4)]
        beside = _timed(url)
        assert all(f.result().status_code == 413 for f in big)
    assert beside < 5 * alone + 0.5


def _timed(url, body=LIGHT) -> float:
    t0 = time.monotonic()
    assert httpx.post(f"{url}/v1/completions", json=body, timeout=60).status_code == 200
    return time.monotonic() - t0


def test_a_prompt_longer_than_any_context_is_refused_without_tokenizing(client, monkeypatch):
    from logitfuse.engine import prompts

    calls = []
    monkeypatch.setattr(prompts, "encode_text", lambda *a: calls.append(a))
    r = client.post("/v1/completions", json={**LIGHT, "prompt": "the " * 60_000})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt" and "context" in r.text
    r = client.post("/v1/chat/completions", json={"model": "proxy-a", "messages": [
        {"role": "user", "content": "the " * 60_000}]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages" and not calls


def test_a_corrupt_checkpoint_is_named_and_not_reloaded_per_request(family, config_file, tmp_path, monkeypatch):
    broken = tmp_path / "broken"
    shutil.copytree(family["tuned-b"], broken)
    weights = broken / "model.safetensors"
    good_bytes = weights.read_bytes()
    weights.write_bytes(b"\x00garbage" * 100)
    text = config_file.read_text().replace("tuned-b: {path: " + str(family["tuned-b"]),
                                           "tuned-b: {path: " + str(broken))
    cfg = tmp_path / "broken.yaml"
    cfg.write_text(text.replace("server: {", "server: {preload: false, "))
    with TestClient(create_app(cfg)) as c:
        pool = c.app.state.serving.lf.pool
        loads = []
        real = pool._loader
        pool._loader = lambda reg, name: (loads.append(name), real(reg, name))[1]
        body = {**LIGHT, "model": "eft-ab"}
        for _ in range(3):
            r = c.post("/v1/completions", json=body)
            assert r.status_code == 503, r.text
            msg = r.json()["error"]["message"]
            assert "'tuned-b'" in msg and str(weights) in msg and r.headers["retry-after"]
        assert loads.count("tuned-b") == 1 and "tuned-b" in c.get("/health").json()["failed"]
        assert c.post("/v1/completions", json=LIGHT).status_code == 200  # other models are unaffected
        weights.write_bytes(good_bytes)  # the files change: the next request loads again
        assert c.post("/v1/completions", json=body).status_code == 200 and loads.count("tuned-b") == 2


def test_a_heavy_tqstar_request_leaves_a_light_one_its_latency(config_file, tmp_path):
    """Stated factor (docs/operations.md): a light request beside a Transfer Q* request at max_tqstar_work
    takes at most 4x its time alone (+0.3 s slack for a loaded machine). In one lane it would wait for
    every one of the heavy request's steps (~60x here)."""
    url, server = start_in_thread(config(config_file, tmp_path, "rollout_lane: true"))
    try:
        alone = sorted(_timed(url) for _ in range(3))[1]
        with ThreadPoolExecutor(1) as pool:
            heavy = pool.submit(httpx.post, f"{url}/v1/completions", json={**HEAVY, "max_tokens": 16}, timeout=300)
            time.sleep(0.5)
            beside = sorted(_timed(url) for _ in range(3))[1]
            assert not heavy.done(), heavy.result().text[:300]  # the heavy one was running throughout
            assert heavy.result().status_code == 200
        assert beside < 4 * alone + 0.3, (alone, beside)
    finally:
        server.should_exit = True


def test_the_user_field_cannot_forge_a_log_line(client, caplog):
    with caplog.at_level(logging.INFO, logger="logitfuse.access"):
        r = client.post("/v1/completions", json={**LIGHT, "user": "eve\r\nrequest_id=x status=200 forged\n"},
                        headers={"X-Request-Id": "trace-42"})
    assert r.status_code == 200 and r.headers["x-request-id"] == "trace-42"
    lines = [rec.getMessage() for rec in caplog.records if rec.name == "logitfuse.access"]
    mine = [x for x in lines if "request_id=trace-42" in x]
    assert len(mine) == 1 and "\n" not in mine[0] and "\r" not in mine[0]
    assert 'user="eve\\r\\nrequest_id=x status=200 forged\\n"' in mine[0]
    assert "status=200" in mine[0] and "prompt_tokens=" in mine[0] and "completion_tokens=8" in mine[0]


def test_request_ids_are_echoed_generated_and_named_in_500s(client, monkeypatch):
    assert client.get("/health", headers={"X-Request-Id": "abc-1"}).headers["x-request-id"] == "abc-1"
    made = client.get("/health", headers={"X-Request-Id": "bad id\x7f" + "z" * 200}).headers["x-request-id"]
    assert len(made) == 32 and made.isalnum()
    sv = client.app.state.serving
    monkeypatch.setattr(sv, "build", lambda *a: (_ for _ in ()).throw(RuntimeError("boom")))
    plain = TestClient(client.app, raise_server_exceptions=False)  # the same app, answering as a server does
    r = plain.post("/v1/completions", json=LIGHT, headers={"X-Request-Id": "req-500"})
    assert r.status_code == 500 and "req-500" in r.json()["error"]["message"]
    assert r.headers["x-request-id"] == "req-500"


def test_models_retrieve(client):
    m = client.get("/v1/models/proxy-a").json()
    assert m["id"] == "proxy-a" and m["object"] == "model" and m["method"] == "proxy"
    r = client.get("/v1/models/nope")
    assert r.status_code == 404 and r.json()["error"]["param"] == "model" and "proxy-a" in r.text


def test_keys_are_checked_first_in_constant_time_with_public_paths(config_file, tmp_path, monkeypatch):
    compared = []
    real = middleware.hmac.compare_digest
    monkeypatch.setattr(middleware.hmac, "compare_digest", lambda a, b: compared.append(b) or real(a, b))
    cfg = config(config_file, tmp_path, "api_keys: [k1, k2], preload: false, public_paths: [/health, /metrics]")
    with TestClient(create_app(cfg, ["k3"])) as c:
        r = c.post("/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"  # not a 400
        assert c.get("/docs").status_code == 401 and c.get("/openapi.json").status_code == 401
        assert c.get("/metrics").status_code == 200 and c.get("/health").status_code == 200
        compared.clear()
        assert c.get("/v1/models", headers={"Authorization": "Bearer k1"}).status_code == 200
        assert compared == [b"k1", b"k2", b"k3"]  # every key compared, no early exit
        assert c.get("/v1/models/tq", headers={"Authorization": "Bearer k3"}).status_code == 200
    assert api_keys(["a"], {"LOGITFUSE_API_KEY": "b, c,"}) == ["a", "b", "c"]


def test_half_sent_requests_and_connection_limit(live):
    url, _ = live
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as s:  # headers never finished
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")
        s.settimeout(5)
        t0 = time.monotonic()
        assert s.recv(100) == b"" and time.monotonic() - t0 < 3  # closed by the server
    with socket.create_connection((host, int(port))) as s:  # body never finished
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 100\r\n\r\n{\"model\"")
        s.settimeout(5)
        assert b" 408 " in s.recv(1000).split(b"\r\n")[0]
    idle = [socket.create_connection((host, int(port))) for _ in range(6)]
    try:
        assert httpx.get(f"{url}/health", timeout=5).status_code == 503
    finally:
        for s in idle:
            s.close()
    time.sleep(0.2)
    assert httpx.get(f"{url}/health", timeout=5).status_code == 200


def test_models_retrieve_through_the_sdk(live):
    import openai

    client = openai.OpenAI(base_url=f"{live[0]}/v1", api_key="unused")
    assert client.models.retrieve("eft-ab").id == "eft-ab"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")

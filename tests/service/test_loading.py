"""Loads freeze no one: a model loading for one request leaves every running stream streaming, requests for
it share one load, and a load longer than server.load_timeout is a 503 naming the model."""

import threading
import time

import httpx
import pytest

from logitfuse.api import LogitFuse
from logitfuse.config.registry import Registry
from logitfuse.pool import ModelPool, default_loader
from logitfuse.service.app import start_in_thread

SLOW = "tuned-b"


def slow_server(config_file, tmp_path, seconds: float, settings: str = ""):
    """A server whose pool takes `seconds` to load SLOW (sleeping, as a checkpoint read would wait on disk)."""
    cfg = tmp_path / "slow.yaml"
    cfg.write_text(config_file.read_text().replace("server: {memory_budget_mb: 512, max_batch: 16}",
                                                   f"server: {{memory_budget_mb: 512, max_batch: 16{settings}}}"))
    reg, loads = Registry.load(cfg), []

    def loader(registry, name):
        loads.append(name)
        if name == SLOW:
            time.sleep(seconds)
        return default_loader(registry, name)

    lf = LogitFuse(reg, ModelPool(reg, loader=loader))
    url, server = start_in_thread(lf)
    return url, server, loads


def stream_gaps(url: str, stop: threading.Event, gaps: list[float], chunks: list[int]) -> None:
    """Stream completions one after another until `stop`; the largest gap between chunks of each stream."""
    body = {"model": "proxy-a", "prompt": "the red city", "max_tokens": 200, "ignore_eos": True, "stream": True}
    with httpx.Client(timeout=60) as c:
        while not stop.is_set():
            last, worst, n = None, 0.0, 0
            with c.stream("POST", f"{url}/v1/completions", json=body) as r:
                for line in r.iter_lines():
                    if not line.startswith("data: {"):
                        continue
                    now = time.perf_counter()
                    worst, last, n = max(worst, now - last) if last else worst, now, n + 1
            gaps.append(worst)
            chunks.append(n)


def test_a_load_leaves_running_streams_streaming_and_concurrent_requests_share_it(config_file, tmp_path):
    url, server, loads = slow_server(config_file, tmp_path, 3.0, ", preload: false")
    try:
        assert httpx.post(f"{url}/v1/completions", json={"model": "proxy-a", "prompt": "x", "max_tokens": 1},
                          timeout=60).status_code == 200  # proxy-a's models loaded: the stream needs no load
        stop, gaps, chunks = threading.Event(), [], []
        streamer = threading.Thread(target=stream_gaps, args=(url, stop, gaps, chunks))
        streamer.start()
        time.sleep(0.3)
        answers = []

        def ask():
            answers.append(httpx.post(f"{url}/v1/completions", json={"model": SLOW, "prompt": "one", "max_tokens": 2},
                                      timeout=60))

        t0 = time.perf_counter()
        askers = [threading.Thread(target=ask) for _ in range(2)]
        for a in askers:
            a.start()
        for a in askers:
            a.join()
        waited = time.perf_counter() - t0
        stop.set()
        streamer.join()
    finally:
        server.should_exit = True
    assert [a.status_code for a in answers] == [200, 200] and waited >= 3.0
    assert loads.count(SLOW) == 1  # two requests, one load
    assert sum(chunks) >= 100 and len(gaps) >= 1
    assert max(gaps) < 0.5, gaps  # every stream kept streaming through the load


def test_a_load_past_load_timeout_is_a_503_naming_the_model_and_goes_on(config_file, tmp_path):
    url, server, loads = slow_server(config_file, tmp_path, 2.0, ", preload: false, load_timeout: 0.5")
    try:
        t0 = time.perf_counter()
        r = httpx.post(f"{url}/v1/completions", json={"model": SLOW, "prompt": "one", "max_tokens": 2}, timeout=60)
        assert time.perf_counter() - t0 < 1.5
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        err = r.json()["error"]
        assert f"model {SLOW!r} is still loading" in err["message"] and "server.load_timeout" in err["message"]
        assert err["param"] == "model"
        time.sleep(2.0)  # the load finished meanwhile
        r = httpx.post(f"{url}/v1/completions", json={"model": SLOW, "prompt": "one", "max_tokens": 2}, timeout=60)
        assert r.status_code == 200 and loads.count(SLOW) == 1
    finally:
        server.should_exit = True


def test_a_request_whose_models_cannot_fit_the_budget_together_is_refused(config_file, tmp_path):
    from logitfuse.errors import InvalidRequest

    reg = Registry.load(config_file)
    lf = LogitFuse(reg, ModelPool(reg, budget_bytes=1))
    with pytest.raises(InvalidRequest, match=r"over this server's memory budget .*server\.memory_budget_mb") as err:
        lf.generate("proxy-a", ["one"])
    assert err.value.param == "model" and "base-large" in str(err.value)
    assert lf.pool.loaded() == []  # nothing left pinned: the budget holds again


def test_requests_for_loaded_models_never_queue_behind_a_load(config_file, tmp_path):
    from logitfuse.service.serving import LOADER_THREADS

    url, server, loads = slow_server(config_file, tmp_path, 2.5, ", preload: false")
    try:
        body = {"model": "proxy-a", "prompt": "one", "max_tokens": 2}
        assert httpx.post(f"{url}/v1/completions", json=body, timeout=60).status_code == 200
        answers = []

        def ask():
            answers.append(httpx.post(f"{url}/v1/completions", json={**body, "model": SLOW}, timeout=60).status_code)

        askers = [threading.Thread(target=ask) for _ in range(LOADER_THREADS + 2)]  # every loader thread waits
        for a in askers:
            a.start()
        time.sleep(0.5)
        t0 = time.perf_counter()
        fast = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
        took = time.perf_counter() - t0
        for a in askers:
            a.join()
    finally:
        server.should_exit = True
    assert fast.status_code == 200 and took < 1.0, took
    assert answers == [200] * (LOADER_THREADS + 2) and loads.count(SLOW) == 1

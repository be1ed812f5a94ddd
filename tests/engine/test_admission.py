"""Admission by KV-cache budget: requests wait until the worst case of what is running plus them fits, none
is lost or changed by waiting, one that can never fit is refused with a clear 400, and the bound is the
cache the backend really allocates."""

import pytest
from fastapi.testclient import TestClient

from logitfuse import LogitFuse, SamplingParams
from logitfuse.errors import InvalidRequest
from logitfuse.service.app import create_app

PROMPTS = ["the red city of the north", "one two", "king queen river", "blue green"]
SP = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)


def with_server(config_file, tmp_path, extra: str):
    cfg = tmp_path / "admission.yaml"
    cfg.write_text(config_file.read_text().replace("server: {", "server: {" + extra + ", "))
    return cfg


def test_kv_bytes_per_token_is_what_the_cache_holds(lf):
    backend = lf.pool.get("base-large")
    state, _ = backend.prefill([[5, 6, 7, 8, 9], [5, 6]])  # two rows, left-padded to 5 positions
    held = sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in state.layers)
    assert held == backend.kv_bytes_per_token() * 2 * 5


def test_the_bound_counts_rows_times_the_longest_row_per_model(lf):
    short = lf.requests("base-large", [5, 6], SamplingParams(max_tokens=3))[0]
    long = lf.requests("base-large", [5, 6, 7, 8], SamplingParams(max_tokens=10))[0]
    per = lf.pool.get("base-large").kv_bytes_per_token()
    assert lf.engine.kv_need([short]) == per * 5
    assert lf.engine.kv_need([short, long]) == per * 2 * 14  # the short row is padded to the long one
    proxy = lf.requests("proxy-a", [5, 6], SamplingParams(max_tokens=3))[0]
    small = lf.pool.get("base-small").kv_bytes_per_token() + lf.pool.get("tuned-a").kv_bytes_per_token()
    assert lf.engine.kv_need([proxy]) == (per + small) * 5
    spec = lf.requests("proxy-a", [5, 6], SamplingParams(max_tokens=3), {"speculative": {"k": 2}})[0]
    assert lf.engine.kv_need([spec]) == (per + small) * (2 * 5 + 2 + 1)  # forgotten drafts until compaction


def test_requests_wait_for_the_budget_and_come_out_as_without_it(config_file, tmp_path, lf):
    reqs = [r for p in PROMPTS for r in lf.requests("proxy-a", p, SP)]
    one = max(lf.engine.kv_need([r]) for r in reqs)
    budget_mb = 2.5 * one / 2**20  # two sequences at a time, never three
    limited = LogitFuse(with_server(config_file, tmp_path, f"kv_budget_mb: {budget_mb}"))
    expected = [o.token_ids for o in lf.generate("proxy-a", PROMPTS, SP)]
    engine = limited.engine
    reqs = [r for p in PROMPTS for r in limited.requests("proxy-a", p, SP)]
    for r in reqs:
        engine.add(r)
    running, tokens = [], {r.rid: [] for r in reqs}
    while engine.has_work():
        for ev in engine.step():
            if ev.token_id is not None:
                tokens[ev.rid].append(ev.token_id)
        running.append(engine.stats().running)
        assert engine.stats().kv_reserved <= engine.kv_budget
    assert max(running) == 2
    assert [tokens[r.rid] for r in reqs] == expected
    assert engine.stats().kv_reserved == 0


def test_a_request_that_can_never_fit_is_refused(config_file, tmp_path, lf):
    need = lf.engine.kv_need(lf.requests("proxy-a", PROMPTS[0], SamplingParams(max_tokens=100)))
    cfg = with_server(config_file, tmp_path, f"kv_budget_mb: {need / 2 / 2**20}")
    limited = LogitFuse(cfg)
    with pytest.raises(InvalidRequest, match="KV cache") as err:
        limited.generate("proxy-a", PROMPTS[:1], SamplingParams(max_tokens=100))
    assert err.value.param == "max_tokens"
    with TestClient(create_app(cfg)) as c:
        r = c.post("/v1/completions", json={"model": "proxy-a", "prompt": PROMPTS[0], "max_tokens": 100})
        assert r.status_code == 400
        e = r.json()["error"]
        assert e["param"] == "max_tokens" and "MiB of KV cache" in e["message"] and "kv_budget_mb" in e["message"]
        ok = c.post("/v1/completions", json={"model": "proxy-a", "prompt": PROMPTS[0], "max_tokens": 4})
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] >= 1
        assert c.get("/health").status_code == 200
        gauge = next(x for x in c.get("/metrics").text.splitlines() if x.startswith("logitfuse_kv_reserved_bytes"))
        assert float(gauge.rsplit(" ", 1)[1]) == 0

"""/metrics parses as Prometheus text, types counters as counters, covers every lane, and times sequences."""

from prometheus_client.parser import text_string_to_metric_families

from .test_service import post, stream

COUNTERS = ("logitfuse_requests", "logitfuse_request_errors", "logitfuse_generated_tokens", "logitfuse_prompt_tokens",
            "logitfuse_spec_draft_tokens", "logitfuse_spec_accepted_tokens")
HISTOGRAMS = ("logitfuse_time_to_first_token_seconds", "logitfuse_inter_token_latency_seconds",
              "logitfuse_request_queue_time_seconds", "logitfuse_e2e_request_latency_seconds",
              "logitfuse_request_seconds")


def scrape(client) -> dict:
    r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(r.text)}
    assert len(families) == len(r.text.split("# TYPE ")) - 1  # every TYPE line is one parsed family
    return families


def sample(families, name: str, suffix: str = "", **labels) -> float:
    fam = families[name]
    return sum(s.value for s in fam.samples if s.name == name + suffix and all(s.labels.get(k) == v
                                                                               for k, v in labels.items()))


def test_counters_are_counters_and_every_lane_is_read(client):
    post(client, "/v1/completions", {"model": "proxy-a", "prompt": "one", "max_tokens": 2})
    fams = scrape(client)
    assert {n: fams[n].type for n in COUNTERS} == dict.fromkeys(COUNTERS, "counter")
    assert {n: fams[n].type for n in HISTOGRAMS} == dict.fromkeys(HISTOGRAMS, "histogram")
    for gauge in ("logitfuse_num_requests_running", "logitfuse_num_requests_waiting", "logitfuse_kv_reserved_bytes",
                  "logitfuse_sequences", "logitfuse_loaded_models"):
        assert fams[gauge].type == "gauge"
    lanes = {s.labels["lane"] for s in fams["logitfuse_num_requests_running"].samples}
    assert lanes == {"main", "rollouts"}
    assert {s.labels["lane"] for s in fams["logitfuse_spec_draft_tokens"].samples} == {"main", "rollouts"}
    assert sample(fams, "logitfuse_loaded_models") >= 1 and sample(fams, "logitfuse_sequences") == 0


def test_sequences_are_timed_in_their_own_lane(client):
    before = scrape(client)
    n_tokens = 5
    chunks = stream(client, "/v1/completions", {"model": "proxy-a", "prompt": "the red city", "max_tokens": n_tokens,
                                                "ignore_eos": True, "n": 2})
    assert chunks
    post(client, "/v1/completions", {"model": "tq", "prompt": "one", "max_tokens": 2, "ignore_eos": True})
    after = scrape(client)

    def grew(name, lane):
        return sample(after, name, "_count", lane=lane) - sample(before, name, "_count", lane=lane)

    assert grew("logitfuse_time_to_first_token_seconds", "main") == 2  # one per sequence
    assert grew("logitfuse_inter_token_latency_seconds", "main") == 2 * (n_tokens - 1)
    assert grew("logitfuse_request_queue_time_seconds", "main") == 2
    assert grew("logitfuse_e2e_request_latency_seconds", "main") == 2
    assert grew("logitfuse_time_to_first_token_seconds", "rollouts") == 1
    assert grew("logitfuse_inter_token_latency_seconds", "rollouts") == 1
    ttft = sample(after, "logitfuse_time_to_first_token_seconds", "_sum", lane="main")
    e2e = sample(after, "logitfuse_e2e_request_latency_seconds", "_sum", lane="main")
    assert 0 < ttft <= e2e
    generated = sample(after, "logitfuse_generated_tokens", "_total", model="proxy-a") - \
        sample(before, "logitfuse_generated_tokens", "_total", model="proxy-a")
    assert generated == 2 * n_tokens


def test_the_prefix_cache_hit_rate_is_exported(client):
    """Two requests sharing a long prompt: the second's prefix comes from the cache, and /metrics counts it."""
    prompt = " ".join(["the red city of the north and the blue river of the south"] * 4)
    for _ in range(2):
        body = {"model": "proxy-a", "prompt": prompt, "max_tokens": 2}
        assert client.post("/v1/completions", json=body).status_code == 200
    families = {f.name: f for f in text_string_to_metric_families(client.get("/metrics").text)}
    queries = families["logitfuse_prefix_cache_queries"].samples[0].value
    hits = families["logitfuse_prefix_cache_hits"].samples[0].value
    assert families["logitfuse_prefix_cache_hits"].type == "counter" and 0 < hits < queries

"""Prometheus metrics, named as vLLM names its own (with the `logitfuse_` prefix) where they mean the same.

Counted here as things happen: HTTP requests by path and status with their latency, and 5xx answers by
cause (middleware.Guard), prompt and generated tokens by model (routes), and per sequence (EngineRunner,
through RequestTimes) the time to first token, the inter-token latency, the queue time and the end-to-end
latency, as histograms.
Read from the engines at scrape time (EngineCollector): every lane's running and waiting sequences, KV cache
reserved and its share of server.kv_budget_mb, speculative tokens drafted and accepted (counters: the
engines' own monotonic totals), and the checkpoints loaded.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from fastapi import FastAPI, Request, Response
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

KNOWN_PATHS = frozenset({"/v1/completions", "/v1/chat/completions", "/v1/models", "/tokenize", "/detokenize",
                         "/health", "/metrics"})
# vLLM's buckets for the same histograms (seconds)
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
               20.0, 40.0, 80.0)
LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
                   240.0, 480.0, 960.0, 1920.0, 7680.0)


class RequestTimes:
    """Per-sequence timings, observed by an engine runner as its events are delivered (any thread)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.ttft = Histogram("logitfuse_time_to_first_token_seconds", "Time from submission to a sequence's "
                              "first token", ["lane"], buckets=TTFT_BUCKETS, registry=r)
        self.itl = Histogram("logitfuse_inter_token_latency_seconds", "Time between a sequence's successive "
                             "token deliveries", ["lane"], buckets=ITL_BUCKETS, registry=r)
        self.queue = Histogram("logitfuse_request_queue_time_seconds", "Time a sequence waited before the "
                               "engine step that admitted it began", ["lane"], buckets=LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("logitfuse_e2e_request_latency_seconds", "Time from submission to a sequence's "
                             "last event", ["lane"], buckets=LATENCY_BUCKETS, registry=r)

    def first_token(self, lane: str, queued: float, ttft: float) -> None:
        self.queue.labels(lane).observe(max(0.0, queued))
        self.ttft.labels(lane).observe(ttft)

    def next_token(self, lane: str, gap: float) -> None:
        self.itl.labels(lane).observe(gap)

    def finished(self, lane: str, seconds: float) -> None:
        self.e2e.labels(lane).observe(seconds)


class EngineCollector(Collector):
    """The engines' own numbers, read when /metrics is scraped (no copy to keep in step). `source` gives the
    serving layer, or None before the lifespan has started it."""

    def __init__(self, source: Callable[[], object | None]) -> None:
        self.source = source

    def collect(self) -> Iterator:
        serving = self.source()
        running = GaugeMetricFamily("logitfuse_num_requests_running", "Sequences being decoded", labels=["lane"])
        waiting = GaugeMetricFamily("logitfuse_num_requests_waiting", "Sequences submitted and not yet "
                                    "decoding", labels=["lane"])
        kv = GaugeMetricFamily("logitfuse_kv_reserved_bytes", "KV cache the running sequences may need at worst "
                               "(what admission under server.kv_budget_mb counts)", labels=["lane"])
        usage = GaugeMetricFamily("logitfuse_kv_cache_usage_perc", "KV cache reserved as a fraction of "
                                  "server.kv_budget_mb (1 = full; absent without a budget)", labels=["lane"])
        drafted = CounterMetricFamily("logitfuse_spec_draft_tokens", "Speculative draft tokens proposed",
                                      labels=["lane"])
        accepted = CounterMetricFamily("logitfuse_spec_accepted_tokens", "Speculative draft tokens accepted",
                                       labels=["lane"])
        vllm_kv = GaugeMetricFamily("logitfuse_vllm_kv_cache_usage_perc", "Share of an in-process vLLM engine's "
                                    "KV cache blocks in use (engine: vllm lanes; vLLM's scheduler's number)",
                                    labels=["lane"])
        sequences = GaugeMetricFamily("logitfuse_sequences", "Sequences waiting or running, every lane")
        loaded = GaugeMetricFamily("logitfuse_loaded_models", "Checkpoints loaded in memory")
        # one prefix cache serves every lane: counted once (vLLM's prefix_cache_queries / _hits, in tokens)
        queries = CounterMetricFamily("logitfuse_prefix_cache_queries", "Prompt tokens looked up in the prefix cache")
        hits = CounterMetricFamily("logitfuse_prefix_cache_hits", "Prompt tokens whose KV came from the prefix cache")
        held = GaugeMetricFamily("logitfuse_prefix_cache_bytes", "Bytes of KV the prefix cache holds")
        if serving is not None:
            for lane, runner in serving.lanes().items():
                st = runner.stats()
                running.add_metric([lane], st.running)
                waiting.add_metric([lane], runner.waiting())
                kv.add_metric([lane], st.kv_reserved)
                if st.kv_budget:
                    usage.add_metric([lane], st.kv_reserved / st.kv_budget)
                if hasattr(runner, "kv_usage"):
                    vllm_kv.add_metric([lane], runner.kv_usage())
                drafted.add_metric([lane], st.speculative.drafted)
                accepted.add_metric([lane], st.speculative.accepted)
            cache = serving.lf.stats()
            queries.add_metric([], cache.prefix_queried)
            hits.add_metric([], cache.prefix_hit)
            held.add_metric([], cache.prefix_bytes)
            sequences.add_metric([], serving.pending())
            loaded.add_metric([], len(serving.lf.health()["loaded"]))
        yield from (running, waiting, kv, usage, vllm_kv, drafted, accepted, sequences, loaded, queries, hits, held)


class Metrics:
    def __init__(self, serving: Callable[[], object | None] = lambda: None) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("logitfuse_requests", "HTTP requests (status 499: the client left before its "
                                "answer ended)", ["path", "status"], registry=r)
        self.errors = Counter("logitfuse_request_errors", "5xx answers, a stream's in-band error event included, by "
                              "cause: an exception's type name, or an engine fault's name", ["path", "status", "cause"],
                              registry=r)
        self.latency = Histogram("logitfuse_request_seconds", "HTTP request latency (to the last byte of the "
                                 "response, of a stream too)", ["path"], registry=r)
        self.tokens = Counter("logitfuse_generated_tokens", "Tokens generated", ["model"], registry=r)
        self.prompt_tokens = Counter("logitfuse_prompt_tokens", "Prompt tokens processed", ["model"], registry=r)
        self.times = RequestTimes(r)
        r.register(EngineCollector(serving))


def install(app: FastAPI, metrics: Metrics) -> None:
    """The /metrics route (requests are counted by middleware.Guard, in front of every route)."""

    @app.get("/metrics", include_in_schema=False)
    async def _metrics(request: Request) -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

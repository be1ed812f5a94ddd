"""Prometheus metrics: requests by endpoint and status, generated tokens, latency, engine occupancy,
speculative drafts proposed and accepted, KV cache reserved by admission."""

from __future__ import annotations

from fastapi import FastAPI, Request, Response
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

KNOWN_PATHS = frozenset({"/v1/completions", "/v1/chat/completions", "/v1/models", "/tokenize", "/detokenize",
                         "/health", "/metrics"})


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("logitfuse_requests", "HTTP requests", ["path", "status"], registry=r)
        self.latency = Histogram("logitfuse_request_seconds", "HTTP request latency (to the last byte of the "
                                 "response, of a stream too)", ["path"], registry=r)
        self.tokens = Counter("logitfuse_generated_tokens", "Tokens generated", ["model"], registry=r)
        self.prompt_tokens = Counter("logitfuse_prompt_tokens", "Prompt tokens processed", ["model"], registry=r)
        self.sequences = Gauge("logitfuse_sequences", "Sequences waiting or running in the engine", registry=r)
        self.loaded = Gauge("logitfuse_loaded_models", "Checkpoints loaded in memory", registry=r)
        self.drafted = Gauge("logitfuse_spec_draft_tokens", "Speculative draft tokens proposed since start",
                             registry=r)
        self.accepted = Gauge("logitfuse_spec_accepted_tokens", "Speculative draft tokens accepted since start",
                              registry=r)
        self.kv_reserved = Gauge("logitfuse_kv_reserved_bytes", "KV cache the running sequences may need at "
                                 "worst (what admission under server.kv_budget_mb counts)", registry=r)


def install(app: FastAPI, metrics: Metrics) -> None:
    """The /metrics route (requests are counted by middleware.Guard, in front of every route)."""

    @app.get("/metrics", include_in_schema=False)
    async def _metrics(request: Request) -> Response:
        serving = request.app.state.serving
        metrics.sequences.set(serving.pending())
        metrics.loaded.set(len(serving.lf.health()["loaded"]))
        stats = serving.lf.stats()  # read without the engine's lock: a snapshot suffices
        metrics.drafted.set(stats.speculative.drafted)
        metrics.accepted.set(stats.speculative.accepted)
        metrics.kv_reserved.set(stats.kv_reserved)
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

"""Prometheus metrics: requests by endpoint and status, generated tokens, latency, engine occupancy,
speculative drafts proposed and accepted, KV cache reserved by admission."""

from __future__ import annotations

import time

from fastapi import FastAPI, Request, Response
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

KNOWN_PATHS = frozenset({"/v1/completions", "/v1/chat/completions", "/v1/models", "/tokenize", "/detokenize"})


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("logitfuse_requests", "HTTP requests", ["path", "status"], registry=r)
        self.latency = Histogram("logitfuse_request_seconds", "HTTP request latency (to the last byte of a "
                                 "JSON response, to the headers of a stream)", ["path"], registry=r)
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
    @app.middleware("http")
    async def _count(request: Request, call_next):
        t0 = time.perf_counter()
        response = await call_next(request)
        path = request.url.path if request.url.path in KNOWN_PATHS else "other"  # bounded label values
        metrics.requests.labels(path, str(response.status_code)).inc()
        metrics.latency.labels(path).observe(time.perf_counter() - t0)
        return response

    @app.get("/metrics", include_in_schema=False)
    async def _metrics(request: Request) -> Response:
        serving = request.app.state.serving
        metrics.sequences.set(serving.runner.pending())
        metrics.loaded.set(len(serving.lf.pool.loaded()))
        stats = serving.lf.engine.stats()  # read without the engine's lock: a snapshot suffices
        metrics.drafted.set(stats.speculative.drafted)
        metrics.accepted.set(stats.speculative.accepted)
        metrics.kv_reserved.set(stats.kv_reserved)
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

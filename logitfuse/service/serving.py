"""Translate API requests into engine requests, and engine events into OpenAI responses and SSE chunks.

A request's models are loaded and pinned first, on the loader threads, while the event loop and the
engine threads go on serving everyone else; the request waits at most server.load_timeout for them, then gets
a 503 naming the model (the load goes on, and the next request for the model finds it loaded; concurrent
requests for one model share one load: ModelPool). Requests are then built and submitted in a worker thread;
events arrive from the engine thread on an asyncio queue. A client that goes away aborts its sequences: a
JSON client is watched for `http.disconnect` while it waits, a stream when it stops reading. Requests of a
method with rollouts (Transfer Q*) go to their own lane (a second engine thread) when server.rollout_lane is
set, so their rollouts never lengthen the steps of other requests; requests over a remote model go to a lane
of that model's own (server.remote_lane), so its server's latency and retries hold up no one else.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from fastapi import Request

from logitfuse import methods
from logitfuse.api import LogitFuse
from logitfuse.engine.request import GenerationRequest, PromptScores, SamplingParams, TokenEvent
from logitfuse.methods.plan import FusionPlan
from logitfuse.runner import EngineRunner
from logitfuse.service.error_handlers import (
    APIError,
    as_api_error,
    envelope,
    generation_failed,
    note_failure,
    request_id_of,
)
from logitfuse.service.formats import Choice

DONE = "data: [DONE]\n\n"
LOADER_THREADS = 8  # requests waiting for loads at once (each waits on its models' load, sharing it)


@dataclass
class Job:
    """The engine requests of one API call, and the buffer their events arrive in. The engine thread
    appends and wakes the event loop at most once until the loop has drained the buffer: one wake-up per
    engine step for a stream, one per finished sequence for a JSON answer (the loop has nothing to send
    before that)."""

    requests: list[GenerationRequest]
    ready: asyncio.Event
    runner: EngineRunner
    streaming: bool = True
    open: set[str] = field(default_factory=set)
    buffer: deque = field(default_factory=deque)
    signalled: bool = False


class Serving:
    def __init__(self, lf: LogitFuse, runner: EngineRunner, rollout_lane: EngineRunner | None = None,
                 hosted: dict | None = None) -> None:
        self.lf = lf
        self.runner = runner
        self.rollout_lane = rollout_lane
        self.hosted = dict(hosted or {})  # model with engine: vllm -> its lane (vllm/engine.py: VLLMLane)
        self.remote_lanes: dict[str, EngineRunner] = {}  # remote model -> its lane, started at its first request
        self.server = lf.settings
        self.created = int(time.time())
        # loads wait here, never in the event loop's default executor (which builds and submits requests)
        self.loader = ThreadPoolExecutor(max_workers=LOADER_THREADS, thread_name_prefix="logitfuse-load")

    def runners(self) -> list[EngineRunner]:
        return ([self.runner] + ([self.rollout_lane] if self.rollout_lane else []) + list(self.remote_lanes.values())
                + list(self.hosted.values()))

    def lane_for(self, plan: FusionPlan) -> EngineRunner:
        """The engine thread a request of this plan decodes in (event loop only: lanes start here)."""
        if (hosted := self.lf.hosted_by(plan)) is not None:
            if hosted not in self.hosted:
                raise APIError(503, f"model {hosted!r} runs in vLLM (engine: vllm), whose engine is not running "
                                    "in this server", "model")
            return self.hosted[hosted]
        if self.rollout_lane is not None and methods.get(plan.method).work(plan) > 0:
            return self.rollout_lane
        remote = next((n for n in plan.models() if self.lf.is_remote(n)), None) if self.server.remote_lane else None
        if remote is None:
            return self.runner
        if remote not in self.remote_lanes:
            main = self.runner
            self.remote_lanes[remote] = EngineRunner(self.lf, self.lf.make_engine(), main.bound, None,
                                                     f"logitfuse-remote-{remote}", f"remote:{remote}",
                                                     main.timings).start()
        return self.remote_lanes[remote]

    def close(self) -> None:
        """Stop the lanes this object started (the main and rollout lanes belong to the app)."""
        for lane in self.remote_lanes.values():
            lane.stop()

    def lanes(self) -> dict[str, EngineRunner]:
        """Every engine thread by its lane name (the label of its metrics)."""
        return {r.lane: r for r in self.runners()}

    def pending(self) -> int:
        """Sequences waiting or running, in every lane."""
        return sum(r.pending() for r in self.runners())

    def model(self, name: str) -> dict:
        names = self.lf.names()
        if name not in names:
            raise APIError(404, f"model {name!r} not found; available: {', '.join(names)}", "model")
        return {"id": name, "object": "model", "created": self.created, "owned_by": "logitfuse",
                "method": self.lf.method_of(name)}

    def models(self) -> dict:
        return {"object": "list", "data": [self.model(n) for n in self.lf.names()]}

    @asynccontextmanager
    async def models_ready(self, model: str, fusion) -> AsyncIterator[None]:
        """Hold the request's models loaded and pinned (the engine then never loads them) until the block
        ends; loading, when needed, happens on the loader threads and is awaited for server.load_timeout."""
        plan = self.lf.plan(model, fusion)
        if self.lf.hosted_by(plan):  # vLLM's process holds its models; here only tokenizers (LogitFuse.shell)
            yield
            return
        names = list(dict.fromkeys(plan.models() + plan.rewards()))
        if not self.lf.try_pin(names):  # all loaded: pinned at once, no thread (never behind a load)
            await self._load(names)
        try:
            yield
        finally:
            await asyncio.to_thread(self.lf.unpin, names)  # may evict (and unload) what no one pins now

    async def _load(self, names: list[str]) -> None:
        """Load and pin names on the loader threads, waiting at most server.load_timeout."""
        pinning = asyncio.get_running_loop().run_in_executor(self.loader, self.lf.pin, names)
        try:
            await asyncio.wait_for(asyncio.shield(pinning), self.server.load_timeout)
        except BaseException as err:
            # the load goes on; its pins are dropped when it ends
            pinning.add_done_callback(lambda f: f.cancelled() or f.exception() or self.lf.unpin(names))
            if not isinstance(err, asyncio.TimeoutError):
                raise
            waiting = [n for n in names if not self.lf.is_loaded(n)] or names
            raise APIError(503, f"model {waiting[0]!r} is still loading after {self.server.load_timeout:g} s "
                                "(server.load_timeout); retry shortly", "model",
                           {"Retry-After": str(max(1, round(self.server.load_timeout)))}, "TimeoutError") from None

    def build(self, model: str, prompts: list, sampling: SamplingParams, fusion, n: int, chat: bool,
              messages: list | None = None) -> list[GenerationRequest]:
        """Engine requests for every prompt x n, validated (runs in a worker thread)."""
        base_id = uuid.uuid4().hex[:16]
        reqs: list[GenerationRequest] = []
        for i, p in enumerate(prompts):
            reqs += self.lf.requests(model, None if chat else p, sampling, fusion, messages=messages, n=n,
                                     rid=f"{base_id}-{i}")
        if self.server.request_timeout is not None:
            deadline = time.monotonic() + self.server.request_timeout
            for r in reqs:
                r.deadline = deadline
        plan = reqs[0].plan
        if (work := methods.get(plan.method).work(plan)) > self.server.max_tqstar_work:
            raise APIError(400, f"{plan.method} work top_k * rollouts * rollout_tokens = {work} is over this "
                                f"server's limit of {self.server.max_tqstar_work}", "fusion.rollout_tokens")
        return reqs

    async def submit(self, reqs: list[GenerationRequest], streaming: bool = True) -> Job:
        """Queue the requests (the runner checks max_queue atomically: Overloaded becomes a 429)."""
        if len(reqs) > self.server.max_queue:  # waiting would not help: say so instead of "retry later"
            raise APIError(400, f"this request makes {len(reqs)} sequences (prompts x n); the server queues at "
                                f"most {self.server.max_queue} (server.max_queue)", "prompt")
        loop = asyncio.get_running_loop()
        lane = self.lane_for(reqs[0].plan)
        job = Job(reqs, asyncio.Event(), lane, streaming, {r.rid for r in reqs})

        def sink(ev: TokenEvent | PromptScores) -> None:
            job.buffer.append(ev)
            if not job.signalled and (job.streaming or (isinstance(ev, TokenEvent) and ev.finish_reason)):
                job.signalled = True
                loop.call_soon_threadsafe(job.ready.set)

        await asyncio.to_thread(lane.submit, reqs, sink)
        return job

    def abort(self, job: Job) -> None:
        for rid in list(job.open):
            job.runner.abort(rid)

    async def events(self, job: Job, request: Request | None = None, watch: bool = False
                     ) -> AsyncIterator[TokenEvent | PromptScores]:
        """The job's events until every sequence has finished; aborts the job if the client goes away
        (watch: listen for http.disconnect, for a client that sends nothing more while it waits)."""
        gone = asyncio.ensure_future(disconnected(request)) if watch and request is not None else None
        try:
            while job.open:
                if not job.buffer:
                    if gone is not None:
                        if await wait_or_gone(job.ready, gone):
                            return
                        continue
                    try:
                        await asyncio.wait_for(job.ready.wait(), timeout=0.5)
                    except asyncio.TimeoutError:
                        if request is not None and await request.is_disconnected():
                            return
                        continue
                job.ready.clear()
                job.signalled = False
                while job.buffer:
                    ev = job.buffer.popleft()
                    if isinstance(ev, TokenEvent) and ev.finish_reason:
                        job.open.discard(ev.rid)
                    yield ev
        finally:
            if gone is not None:
                gone.cancel()
            if job.open:
                self.abort(job)

    async def collect(self, job: Job, request: Request, make: Callable[[int, GenerationRequest], Choice]) -> list:
        """Run a job to the end; one Choice per engine request, in order. Engine errors become a 500."""
        choices = {r.rid: make(i, r) for i, r in enumerate(job.requests)}
        failed = None
        async for ev in self.events(job, request, watch=True):
            choices[ev.rid].add(ev)
            if failed is None and choices[ev.rid].error:
                failed = ev  # its error detail goes with the 500, to the log (service/failures.py)
        if failed is not None:
            raise generation_failed(request_id_of(request), failed)
        return list(choices.values())

    async def stream(self, job: Job, request: Request, make: Callable, chunk: Callable, usage_chunk: Callable | None,
                     on_done: Callable[[list], None] | None = None) -> AsyncIterator[str]:
        """SSE: one chunk per event delta; an error event then [DONE] if something fails mid-stream."""
        choices = {r.rid: make(i, r) for i, r in enumerate(job.requests)}
        try:
            for c in choices.values():
                first = c.opening()
                if first is not None:
                    yield sse(chunk(c, first))
            async for ev in self.events(job, request):
                c = choices[ev.rid]
                delta = c.add(ev)
                if c.error:
                    err = generation_failed(request_id_of(request), ev)
                    note_failure(request.scope, err.status, err)
                    yield sse(envelope(err.status, err.message, err.param))
                    break
                if delta is not None:
                    yield sse(chunk(c, delta))
            else:
                if on_done is not None:
                    on_done(list(choices.values()))
                if usage_chunk is not None:
                    yield sse(usage_chunk(list(choices.values())))
        except Exception as err:  # the stream has started: report in-band
            api = as_api_error(err, request_id_of(request))
            note_failure(request.scope, api.status, err)
            yield sse(envelope(api.status, api.message, api.param))
        yield DONE


async def disconnected(request: Request) -> None:
    """Returns once the client has gone (the server's receive channel says http.disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def wait_or_gone(ready: asyncio.Event, gone: asyncio.Future) -> bool:
    """Wait for events or for the client to leave; True if it left."""
    waiter = asyncio.ensure_future(ready.wait())
    try:
        await asyncio.wait({waiter, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiter.cancel()
    return gone.done() and not ready.is_set()


def json_safe(obj):
    """obj with floats JSON can carry: -inf (a banned token's logprob) as -9999.0, OpenAI's floor; NaN/+inf
    as null. Strict JSON has no NaN or Infinity."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return -9999.0 if obj == float("-inf") else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def sse(obj: dict) -> str:
    return f"data: {json.dumps(json_safe(obj))}\n\n"


def usage(choices: list) -> dict:
    prompt = sum(c.prompt_tokens for c in choices if c.first_of_prompt)
    completion = sum(c.completion_tokens for c in choices)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def diagnostics(choices: list, plan: FusionPlan) -> dict | None:
    """The method's summary of the per-step diagnostics of every choice (None when it reports none)."""
    return methods.summarise(plan, [d for c in choices for d in c.diagnostics])

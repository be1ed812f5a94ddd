"""logitfuse serve's engine mode: a registry model with `engine: vllm` runs in an in-process vLLM engine
(vLLM's AsyncLLM, with logitfuse's logits processor inside it), behind the same API as the Hugging Face engine.

The service builds every request as it does for its own engine (each role's prompt ids, the sampling
parameters, the fusion plan); `VLLMLane` takes the place of an engine thread (runner.py's EngineRunner): it
hands each request to vLLM with the base's prompt ids, and, for a fused request, the plan and every other
role's prompt ids in `extra_args` (the processor prefills each expert from its own ids and feeds every role
the same generated tokens), and turns vLLM's outputs back into the engine's TokenEvents. A base-only request
is vLLM's own decoding. Sampling, stop strings, penalties, structured outputs and seeds are vLLM's; the
reported log-probabilities are those of the fused distribution (`logprobs_mode: processed_logprobs`).

vLLM runs its engine core in a process of its own; the processor there reads the registry from a copy the
lane writes ($LOGITFUSE_CONFIG) and serves the ensembles over the hosted model ($LOGITFUSE_HOST_MODEL).
Importing this module needs no vLLM; starting a lane does (the `vllm` extra). What requests and outputs are in
vLLM's terms (engine arguments, sampling parameters, finish reasons, log-probabilities) is translate.py's.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import threading
import time
from collections.abc import Callable

from logitfuse.api import LogitFuse
from logitfuse.engine.core import EngineStats
from logitfuse.engine.request import ErrorDetail, GenerationRequest, PromptScores, TokenEvent
from logitfuse.engine.speculative import SpecStats
from logitfuse.errors import InvalidRequest
from logitfuse.runner import QueueBound, Timings, report_times
from logitfuse.vllm import requests, translate

log = logging.getLogger("logitfuse.vllm.engine")
Sink = Callable[[TokenEvent | PromptScores], None]


class VLLMRequestError(RuntimeError):
    """vLLM finished a request with its `error` reason (a 500: the server's fault, not the request's)."""


@dataclasses.dataclass
class Open:
    """A request in vLLM: where its events go, its task, its clock [submitted, last token] and tokens so far."""

    sink: Sink
    task: asyncio.Future | None = None
    clock: list[float] = dataclasses.field(default_factory=lambda: [time.monotonic(), 0.0])
    tokens: int = 0


class VLLMLane:
    """An engine lane (runner.py's interface) over an in-process vLLM engine hosting one registry model."""

    def __init__(self, lf: LogitFuse, model: str, bound: QueueBound, timings: Timings | None = None) -> None:
        self.lf, self.model = lf, model
        self.lane, self.timings = f"vllm:{model}", timings
        self.bound = bound
        bound.runners.append(self)
        self.llm = None
        self.numbers: dict[str, float] = {"running": 0, "waiting": 0, "kv_usage": 0.0}  # vLLM's scheduler's
        self._open: dict[str, Open] = {}
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=f"logitfuse-{self.lane}", daemon=True)
        self._registry_file: str | None = None
        self.grammar_problem: str | None = None  # why vLLM's grammar backend cannot read the model's tokenizer
        self._stops: dict[tuple, frozenset[int]] = {}

    # -- life ---------------------------------------------------------------------------------------------
    def start(self) -> VLLMLane:
        """Start vLLM's engine (blocks until it is ready: loading, and vLLM's warm-up)."""
        args = translate.engine_args(self.lf, self.model)
        self._registry_file = translate.registry_copy(self.lf)
        # read by the engine core process it starts (inherited as it starts; this process's values come back)
        env = {requests.ENV: self._registry_file, requests.ENV_HOST: self.model}
        before = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        self._thread.start()
        began = time.monotonic()
        try:
            self.llm = asyncio.run_coroutine_threadsafe(self._make(args), self._loop).result()
        finally:
            for k, v in before.items():
                os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
        self.grammar_problem = translate.grammar_problem(args, self.lf.shell(self.model))
        if self.grammar_problem:
            log.warning("structured outputs are refused for %r: %s", self.model, self.grammar_problem)
        log.info("vLLM engine for %r ready in %.1f s", self.model, time.monotonic() - began)
        return self

    async def _make(self, args):
        from vllm.v1.engine.async_llm import AsyncLLM

        return AsyncLLM.from_engine_args(args, stat_loggers=[stat_logger(self.numbers)])

    def stop(self) -> None:
        """End every open request and vLLM's engine (its output task is cancelled on its own loop first)."""
        if self.llm is not None and self._thread.is_alive():
            asyncio.run_coroutine_threadsafe(self._close(), self._loop).result(timeout=60)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        if self._registry_file:
            os.unlink(self._registry_file)
            self._registry_file = None

    async def _close(self) -> None:
        for o in list(self._open.values()):
            if o.task is not None:
                o.task.cancel()
        handler = getattr(self.llm, "output_handler", None)
        if handler is not None:
            handler.cancel()
        llm, self.llm = self.llm, None
        llm.shutdown()

    # -- what the service asks of a lane ------------------------------------------------------------------
    def pending(self) -> int:
        with self._lock:
            return len(self._open)

    def waiting(self) -> int:
        """Sequences submitted that have no token yet."""
        with self._lock:
            return sum(1 for o in self._open.values() if o.tokens == 0)

    def stats(self) -> EngineStats:
        """vLLM's scheduler counts (its own KV cache: `kv_usage`, not logitfuse's KV budget)."""
        n = self.numbers
        return EngineStats(int(n["running"]), int(n["waiting"]), 0, None, SpecStats(), 0)

    def kv_usage(self) -> float:
        """The share of vLLM's KV cache blocks in use (0..1), as its scheduler last reported it."""
        return float(self.numbers["kv_usage"])

    def check(self, r: GenerationRequest) -> None:
        """Refuse (InvalidRequest, naming the field) what this engine cannot run, before anything is queued."""
        sp, plan = r.sampling, r.plan
        shell = self.lf.shell(self.model)
        prompt = r.prompt_ids
        if not prompt:
            raise InvalidRequest("prompt must contain at least one token", "prompt")
        for name in plan.models():
            n, context = len(r.prompts[name]), self.lf.shell(name).max_context
            if n + sp.max_tokens > context:
                raise InvalidRequest(f"this model's maximum context length is {context} tokens; the prompt has {n} "
                                     f"tokens and max_tokens is {sp.max_tokens} ({n + sp.max_tokens} in all)",
                                     "max_tokens")
        width = shell.logits_width
        for field, ids in (("logit_bias", [t for t, _ in sp.logit_bias]), ("allowed_token_ids", sp.allowed_token_ids)):
            if ids and max(ids) >= width:
                raise InvalidRequest(f"{field} names token {max(ids)}, outside this model's vocabulary of {width} "
                                     "tokens", field)
        if sp.structured is not None:
            self._check_grammar(r)
        if not plan.experts and plan.tqstar is None:
            if plan.speculative is not None:
                raise InvalidRequest("speculative decoding needs an expert to draft", "fusion.speculative")
            return
        reason = requests.unsupported(None, plan, own_prompts=True)  # every role's prompt goes with the request
        if reason:
            raise InvalidRequest(f"model {plan.ensemble or plan.base!r}: {reason}", "model")
        if sp.prompt_logprobs:
            raise InvalidRequest("echo with logprobs (prompt scoring) of a fused model is not available in engine "
                                 "mode (vLLM's processors see only the next token's logits); the base alone "
                                 f"({self.model!r}) scores prompts", "echo")
        problem = self.lf.files_problem(plan.models()[1:] + plan.rewards())
        if problem:
            raise InvalidRequest(f"model {r.plan.ensemble!r}: {problem}", "model")

    def _check_grammar(self, r: GenerationRequest) -> None:
        """A grammar no token of the base can start is refused as the Hugging Face engine refuses it (vLLM
        would answer an empty text), where llguidance is installed to tell; otherwise vLLM's own check runs."""
        import importlib.util

        field = r.sampling.structured.field
        if self.grammar_problem is not None:
            raise InvalidRequest(f"{field}: vLLM's grammar backend cannot run structured outputs for "
                                 f"{self.model!r}: {self.grammar_problem}", field)
        if importlib.util.find_spec("llguidance") is None:
            return
        from logitfuse.engine import grammar

        shell = self.lf.shell(self.model)
        grammar.check_start(r.sampling.structured, shell.tokenizer, shell.logits_width, self.model)

    def extra_args(self, r: GenerationRequest) -> dict | None:
        """What the processor reads of a fused request: its plan and every other role's prompt ids."""
        plan = r.plan
        if not plan.experts and plan.tqstar is None:
            return None
        return {requests.KEY: plan.ensemble or plan.base, requests.PLAN: requests.plan_dict(plan),
                requests.PROMPTS: {n: list(r.prompts[n]) for n in plan.models()[1:]}}

    def submit(self, reqs: list[GenerationRequest], sink: Sink) -> None:
        """Check, count against the shared queue bound, and hand the requests to vLLM (any thread)."""
        for r in reqs:
            self.check(r)
        with self.bound.lock:
            self.bound.refuse_beyond(len(reqs))
            with self._lock:
                for r in reqs:
                    self._open[r.rid] = Open(sink)
        for r in reqs:
            self._loop.call_soon_threadsafe(self._spawn, r)

    def abort(self, rid: str) -> None:
        def cancel() -> None:
            o = self._open.get(rid)
            if o is not None and o.task is not None:
                o.task.cancel()

        self._loop.call_soon_threadsafe(cancel)

    # -- the engine's side (the lane's event loop) ----------------------------------------------------------
    def _spawn(self, r: GenerationRequest) -> None:
        with self._lock:
            o = self._open.get(r.rid)
        if o is not None:
            o.task = asyncio.ensure_future(self._run(r, o))
            if r.deadline is not None:  # server.request_timeout: the sequence ends with finish_reason "abort"
                self._loop.call_later(max(0.0, r.deadline - time.monotonic()), o.task.cancel)

    async def _run(self, r: GenerationRequest, o: Open) -> None:
        prompt = r.prompt_ids
        try:
            params = self.sampling(r)
            async for out in self.llm.generate({"prompt_token_ids": list(prompt)}, params, r.rid):
                if out.prompt_logprobs is not None and r.sampling.prompt_logprobs and o.tokens == 0:
                    scores = translate.prompt_scores(r.rid, prompt, out.prompt_logprobs, self.lf.shell(self.model))
                    self._emit(o, r.rid, scores)
                c = out.outputs[0]
                ids = list(c.token_ids)
                if out.finished and translate.finish(c) == "error":
                    raise VLLMRequestError(f"vLLM ended the request with an internal error after {o.tokens} "
                                           "tokens (its engine's log above names the cause)")
                for k, tid in enumerate(ids):
                    last = k == len(ids) - 1
                    lp = c.logprobs[k] if c.logprobs is not None and k < len(c.logprobs) else None
                    o.tokens += 1
                    self._emit(o, r.rid, TokenEvent(
                        r.rid, tid, c.text if last else "", lp[tid].logprob if lp and tid in lp else None,
                        translate.top_of(lp, r.sampling.logprobs),
                        finish_reason=translate.finish(c) if last and out.finished else None,
                        prompt_tokens=len(prompt), completion_tokens=o.tokens))
                if out.finished and not ids:
                    self._emit(o, r.rid, TokenEvent(r.rid, None, c.text, finish_reason=translate.finish(c),
                                                    prompt_tokens=len(prompt), completion_tokens=o.tokens))
        except asyncio.CancelledError:
            self._emit(o, r.rid, TokenEvent(r.rid, None, "", finish_reason="abort", prompt_tokens=len(prompt),
                                            completion_tokens=o.tokens))
        except Exception as err:  # vLLM refused the request (a ValueError: the request's fault) or failed
            detail = ErrorDetail.of(err)
            if isinstance(err, ValueError) and not isinstance(err, VLLMRequestError) and o.tokens == 0:
                detail = dataclasses.replace(detail, param="prompt")
            self._emit(o, r.rid, TokenEvent(r.rid, None, "", finish_reason="error", error=str(err),
                                            error_detail=detail, prompt_tokens=len(prompt)))
        finally:
            with self._lock:
                self._open.pop(r.rid, None)

    def _emit(self, o: Open, rid: str, ev: TokenEvent | PromptScores) -> None:
        if self.timings is not None:  # vLLM's own queue time is inside the time to first token: 0 here
            done = isinstance(ev, TokenEvent) and ev.finish_reason is not None
            report_times(self.timings, self.lane, ev, o.clock, 0.0, done)
        try:
            o.sink(ev)
        except Exception:
            log.exception("event sink failed for %s", rid)

    def sampling(self, r: GenerationRequest):
        """vLLM's SamplingParams for an engine request (the plan's end ids added to its stop ids)."""
        stops = sorted(set(r.sampling.stop_token_ids) | self.plan_stops(r)) if not r.sampling.ignore_eos \
            else list(r.sampling.stop_token_ids)
        return translate.sampling_params(r.sampling, stops, self.extra_args(r))

    def plan_stops(self, r: GenerationRequest) -> set[int]:
        """The ids that end a fused sequence beside the base's own: every tuned expert's (as the engine adds)."""
        from logitfuse.engine.stopping import plan_stop_ids

        key = (r.plan.base, r.plan.experts)
        if key not in self._stops:
            self._stops[key] = plan_stop_ids(r.plan, self.lf.shell, self.lf.own_stop_ids)
        return set(self._stops[key])


def stat_logger(numbers: dict[str, float]):
    """A vLLM stat logger that keeps the scheduler's latest counts in `numbers` (read by /metrics)."""
    from vllm.v1.metrics.loggers import StatLoggerBase

    class Latest(StatLoggerBase):
        def __init__(self, vllm_config, engine_index: int = 0) -> None:
            pass

        def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx: int = 0) -> None:
            if scheduler_stats is not None:
                numbers["running"] = scheduler_stats.num_running_reqs
                numbers["waiting"] = scheduler_stats.num_waiting_reqs
                numbers["kv_usage"] = scheduler_stats.kv_cache_usage

        def log_engine_initialized(self) -> None:
            pass

    return Latest

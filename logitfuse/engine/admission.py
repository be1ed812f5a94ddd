"""Admission: which waiting requests join the running batch at a step boundary (Admission), and by
KV-cache budget what a set of requests may need at worst when decoded together (kv_need).

A model's batched cache holds rows x its longest row (rows are left-padded to one length), a row being at most
prompt + max_tokens positions. Speculative rows keep their group's own caches, where forgotten drafts stay
until they outnumber the visible positions (then the cache is compacted): up to twice that plus a block. A
cross-tokenizer expert's re-tokenized text is counted as max_tokens positions (an estimate there). Not
counted: the moment a joining batch's prefill is copied into a cache, and caches held elsewhere (a remote
model reports 0 bytes per position).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable

from logitfuse import methods
from logitfuse.backends.base import CausalLM
from logitfuse.engine import grammar
from logitfuse.engine.request import GenerationRequest
from logitfuse.errors import InvalidRequest
from logitfuse.methods.base import FusionMethod


def kv_need(reqs: Iterable[GenerationRequest], bytes_per_position: Callable[[str], int]) -> int:
    """Bytes of KV cache these requests may need at worst, decoded together; bytes_per_position(model name)
    is one position of one row in that model's cache."""
    pools: dict[tuple, list[int]] = {}  # (model, shared slots or a speculative group) -> row lengths
    for r in reqs:
        spec = r.plan.speculative
        for name in r.plan.models():
            n = len(r.prompts[name]) + r.sampling.max_tokens
            pools.setdefault((name, r.plan.group_key() if spec else None), []).append(
                2 * n + spec.k + 1 if spec else n)
    return sum(bytes_per_position(name) * len(ns) * max(ns) for (name, _), ns in pools.items())


class Admission:
    """The engine's admission policy, in one place: first come, first served, at most max_batch sequences
    decoded together, and (with a KV budget) a new sequence only while everything admitted still fits at
    worst; the head of the queue waits for memory to free up rather than being overtaken."""

    def __init__(self, max_batch: int, kv_budget: int | None, bytes_per_position: Callable[[str], int]) -> None:
        self.max_batch = max_batch
        self.kv_budget = kv_budget  # bytes (None: no limit)
        self.bytes_per_position = bytes_per_position

    def need(self, reqs: Iterable[GenerationRequest]) -> int:
        return kv_need(reqs, self.bytes_per_position)

    def never_fits(self, req: GenerationRequest) -> int | None:
        """The request's worst-case need when it is over the whole budget on its own (None: it can run)."""
        if self.kv_budget is None:
            return None
        need = self.need([req])
        return need if need > self.kv_budget else None

    def check(self, req: GenerationRequest, width: int, get_backend: Callable[[str], CausalLM]) -> None:
        """Raise InvalidRequest, naming the field, for a request that can never run: a token outside the
        shared vocabulary of `width` tokens, a context overflow, prompt scoring where a model or the method
        cannot, or a KV need over the whole budget."""
        plan, sp = req.plan, req.sampling
        if any(t >= width for t, _ in sp.logit_bias):
            raise InvalidRequest(f"logit_bias names token {max(t for t, _ in sp.logit_bias)}, outside this "
                                 f"model's vocabulary of {width} tokens", "logit_bias")
        for name in plan.models():
            backend = get_backend(name)
            n = len(req.prompts[name])
            if n == 0:
                raise InvalidRequest("prompt must contain at least one token", "prompt")
            if n + sp.max_tokens > backend.max_context:
                raise InvalidRequest(
                    f"this model's maximum context length is {backend.max_context} tokens; the prompt has {n} "
                    f"tokens and max_tokens is {sp.max_tokens} ({n + sp.max_tokens} in all)", "max_tokens")
        method = methods.get(plan.method)
        if not method.remote_base and get_backend(plan.base).remote:
            raise InvalidRequest(f"method {method.name} needs a local base model", "model")
        if plan.speculative and (slow := [n for n in plan.models() if not get_backend(n).can_verify_blocks]):
            raise InvalidRequest(f"speculative decoding is not available with {slow[0]!r}: its server does not "
                                 "echo prompt distributions exactly, so a block cannot be verified in one call "
                                 "(set fusion.speculative.k to 0)", "fusion.speculative")
        if sp.prompt_logprobs:
            self._check_scoring(req, method, get_backend)
        if sp.controlled():
            self._check_controls(req, width, get_backend)
        if (need := self.never_fits(req)) is not None:
            raise InvalidRequest(
                f"this request may need {need / 2**20:.1f} MiB of KV cache (prompt + max_tokens positions in "
                f"{', '.join(plan.models())}); the server allows {self.kv_budget / 2**20:.1f} MiB in all "
                "(server.kv_budget_mb): lower max_tokens or shorten the prompt", "max_tokens")

    @staticmethod
    def _check_controls(req: GenerationRequest, width: int, get_backend: Callable[[str], CausalLM]) -> None:
        """Penalties and token controls act on the sampled rows of the engine's step: a speculative plan's
        drafts and verification do not apply them, so such a request is refused there; a grammar must
        compile for the base's tokenizer (once per schema, cached: engine/grammar.py) and some token of its
        vocabulary must start text that the grammar admits."""
        sp = req.sampling
        if req.plan.speculative:
            name = "structured output" if sp.structured else "penalties and token controls"
            raise InvalidRequest(f"{name} cannot be combined with speculative decoding (drafts and their "
                                 "verification do not apply them): set fusion.speculative.k to 0 or use an "
                                 "ensemble without speculation", sp.structured.field if sp.structured else "fusion")
        if sp.allowed_token_ids is not None and max(sp.allowed_token_ids) >= width:
            raise InvalidRequest(f"allowed_token_ids names token {max(sp.allowed_token_ids)}, outside this "
                                 f"model's vocabulary of {width} tokens", "allowed_token_ids")
        if sp.structured is not None:
            tokenizer = get_backend(req.plan.base).tokenizer
            if not hasattr(tokenizer, "convert_ids_to_tokens"):
                raise InvalidRequest(f"{sp.structured.field}: structured output needs the base model's own "
                                     "tokenizer; this base has none the grammar engine can read", sp.structured.field)
            grammar.check_start(sp.structured, tokenizer, width, req.plan.base)

    @staticmethod
    def _check_scoring(req: GenerationRequest, method: FusionMethod, get_backend: Callable[[str], CausalLM]) -> None:
        if not all(get_backend(n).can_score_prompt for n in req.plan.models()):
            raise InvalidRequest("echo with logprobs (prompt scoring) is not available with a remote model", "echo")
        if not method.prompt_scoring:
            raise InvalidRequest(f"echo with logprobs (prompt scoring) is not available for method {method.name}",
                                 "echo")
        if len({tuple(p) for p in req.prompts.values()}) > 1:
            raise InvalidRequest("prompt scoring needs the same prompt tokens for every role", "echo")

    def take(self, waiting: deque[GenerationRequest], running: list[GenerationRequest]) -> list[GenerationRequest]:
        """Pop from the head of waiting what may join the running sequences at this step boundary (the first
        one always may when nothing runs, so a request the budget admits alone is never starved)."""
        new: list[GenerationRequest] = []
        while waiting and len(running) + len(new) < self.max_batch:
            if (running or new) and not self._fits(running + new + [waiting[0]]):
                break
            new.append(waiting.popleft())
        return new

    def _fits(self, reqs: list[GenerationRequest]) -> bool:
        return self.kv_budget is None or self.need(reqs) <= self.kv_budget

    @staticmethod
    def batches(new: list[GenerationRequest]) -> dict[object, list[GenerationRequest]]:
        """New requests grouped for their prefill: plain rows together (key None, they join the shared
        slots), speculative rows by their plan group (each group keeps its own states)."""
        out: dict[object, list[GenerationRequest]] = {}
        for r in new:
            out.setdefault(r.plan.group_key() if r.plan.speculative else None, []).append(r)
        return out

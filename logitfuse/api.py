"""The library entry point: a registry, its model pool and an engine behind three calls.

    lf = LogitFuse("configs/default.yaml")
    out = lf.generate("large-qa", ["Q: ..."], SamplingParams(max_tokens=8, temperature=0))
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path

import torch

from logitfuse.config.registry import FusionParams, Registry
from logitfuse.engine.core import Engine
from logitfuse.engine.output import Completion
from logitfuse.engine.prompts import Prompt, role_prompts
from logitfuse.engine.request import GenerationRequest, PromptScores, SamplingParams, TokenEvent
from logitfuse.engine.speculative import SpecStats, check_plan
from logitfuse.methods.plan import SpecPlan
from logitfuse.pool import ModelPool

__all__ = ["Completion", "LogitFuse", "SpeculativeEFT"]


class LogitFuse:
    def __init__(self, registry: Registry | str | Path, pool: ModelPool | None = None) -> None:
        self.registry = registry if isinstance(registry, Registry) else Registry.load(registry)
        self.apply_threads()
        self.pool = pool or ModelPool(self.registry)
        self.engine = self.make_engine()
        self._ids = itertools.count()

    def make_engine(self) -> Engine:
        """An engine over this pool with the registry's server settings (the server's second lane uses one)."""
        server = self.registry.server
        kv_budget = int(server.kv_budget_mb * 2**20) if server.kv_budget_mb else None
        return Engine(self.pool.get, self.pool.get, max_batch=server.max_batch, solver_threads=server.solver_threads,
                      kv_budget=kv_budget)

    def apply_threads(self) -> None:
        """Set torch's intra-op threads for the calling thread (the setting is per thread)."""
        if self.registry.server.cpu_threads:
            torch.set_num_threads(self.registry.server.cpu_threads)

    def requests(self, model: str, prompt: Prompt | None = None, sampling: SamplingParams | None = None,
                 fusion: FusionParams | dict | None = None, messages: Sequence[dict] | None = None,
                 n: int = 1, rid: str | None = None) -> list[GenerationRequest]:
        """The engine requests for one prompt (or chat) and n samples (seed + i for sample i)."""
        if isinstance(fusion, dict):
            fusion = FusionParams.model_validate(fusion)
        plan = self.registry.plan(model, fusion)
        sampling = (sampling or SamplingParams()).check(self.registry.server.max_logprobs)
        prompts = role_prompts({m: self.pool.get(m) for m in plan.models()}, prompt, messages, plan.base,
                               plan.cross_models())
        rid = rid or f"req-{next(self._ids)}"
        out = []
        for i in range(n):
            sp = sampling if sampling.seed is None or i == 0 else _with_seed(sampling, (sampling.seed + i) % 2**63)
            out.append(GenerationRequest(f"{rid}-{i}" if n > 1 else rid, plan, prompts, sp))
        return out

    def stream(self, requests: list[GenerationRequest]) -> Iterator[TokenEvent | PromptScores]:
        """Events of the given requests, batched together, as they are produced."""
        return self.engine.run(requests)

    def generate(self, model: str, prompts: Sequence[Prompt], sampling: SamplingParams | None = None,
                 fusion: FusionParams | dict | None = None) -> list[Completion]:
        """Complete every prompt (decoded together in one batch); results in prompt order."""
        reqs = [r for p in prompts for r in self.requests(model, p, sampling, fusion)]
        done = {r.rid: Completion(r.rid) for r in reqs}
        for ev in self.stream(reqs):
            done[ev.rid].add(ev)
        return [done[r.rid] for r in reqs]


class SpeculativeEFT:
    """Library convenience: run one-expert proxy/EFT requests speculatively through the engine and keep
    the draft statistics of its calls. (Ensembles and requests can ask for it too: `fusion.speculative`.)"""

    def __init__(self, lf: LogitFuse, k: int = 4, min_draft_prob: float = 0.0, max_batch: int | None = None) -> None:
        if k < 1:
            raise ValueError("k (draft tokens per round) must be at least 1")
        self.lf, self.spec, self.stats = lf, SpecPlan(k, min_draft_prob, max_batch), SpecStats()

    def generate(self, reqs: list[GenerationRequest]) -> list[Completion]:
        for r in reqs:
            check_plan(r.plan)
        reqs = [replace(r, plan=replace(r.plan, speculative=self.spec)) for r in reqs]
        before = self.lf.engine.stats().speculative
        done = {r.rid: Completion(r.rid) for r in reqs}
        for ev in self.lf.engine.run(reqs):
            done[ev.rid].add(ev)
        self.stats = self.stats + (self.lf.engine.stats().speculative - before)
        return [done[r.rid] for r in reqs]


def _with_seed(sp: SamplingParams, seed: int) -> SamplingParams:
    return replace(sp, seed=seed)

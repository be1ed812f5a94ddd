"""The library facade: a registry, its model pool and an engine behind one object, `LogitFuse`.

    lf = LogitFuse("configs/default.yaml")
    out = lf.generate("large-qa", ["Q: ..."], SamplingParams(max_tokens=8, temperature=0))

Front ends (the HTTP service, batch jobs, Ray Serve, the benchmarks) use the public methods below and never
reach into the pool, the engine or the registry: what they need of them is a method here.
"""

from __future__ import annotations

import itertools
import logging
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import torch

from logitfuse import methods
from logitfuse.backends.base import CausalLM, RewardModel, end_ids
from logitfuse.backends.prefix_cache import PrefixCache
from logitfuse.config.registry import Registry
from logitfuse.config.specs import ModelSpec, ServerSpec
from logitfuse.engine.core import Engine, EngineStats
from logitfuse.engine.output import CompletionOutput
from logitfuse.engine.prompts import Prompt, role_prompts
from logitfuse.engine.request import GenerationRequest, PromptScores, SamplingParams, TokenEvent
from logitfuse.engine.speculative import SpecStats, check_plan
from logitfuse.methods.params import FusionParams
from logitfuse.methods.plan import FusionPlan, SpecPlan
from logitfuse.ops.vocab import Alignment
from logitfuse.pool import ModelPool, files_problem

__all__ = ["CompletionOutput", "LogitFuse", "SpeculativeEFT"]

log = logging.getLogger("logitfuse")


class LogitFuse:
    def __init__(self, registry: Registry | str | Path, pool: ModelPool | None = None) -> None:
        self._registry = registry if isinstance(registry, Registry) else Registry.load(registry)
        self.apply_threads()
        self._pool = pool or ModelPool(self._registry)
        server = self._registry.server
        # one prefix cache for every engine lane over this pool (the KV of a prefix is the same in each)
        self._prefix_cache = PrefixCache(int(server.prefix_cache_mb * 2**20)) if server.prefix_cache else None
        if self._prefix_cache is not None:  # a name's entries go when its weights are unloaded or reloaded
            self._pool.on_weights_change(self._prefix_cache.forget)
        self._engine = self.make_engine()
        self._ids = itertools.count()

    # The parts, read-only, for tests and library users who need them; front ends use the methods below.
    @property
    def registry(self) -> Registry:
        return self._registry

    @property
    def pool(self) -> ModelPool:
        return self._pool

    @property
    def engine(self) -> Engine:
        return self._engine

    def make_engine(self) -> Engine:
        """An engine over this pool with the registry's server settings (the server's second lane uses one)."""
        server = self._registry.server
        kv_budget = int(server.kv_budget_mb * 2**20) if server.kv_budget_mb else None
        return Engine(self._pool.get, self._pool.get, max_batch=server.max_batch,
                      solver_threads=server.solver_threads, kv_budget=kv_budget,
                      stop_override=lambda name: self._registry.model_spec(name).stop_token_ids,
                      prefix_cache=self._prefix_cache)

    def apply_threads(self) -> None:
        """Set torch's intra-op threads for the calling thread (the setting is per thread)."""
        if self._registry.server.cpu_threads:
            torch.set_num_threads(self._registry.server.cpu_threads)

    # --- what the registry serves
    @property
    def settings(self) -> ServerSpec:
        """The registry's `server:` section."""
        return self._registry.server

    def names(self) -> list[str]:
        """Every name a request may use as `model`: ensembles, then bare models."""
        return self._registry.names()

    def method_of(self, name: str) -> str:
        """The fusion method a served name runs by default."""
        ensemble = self._registry.ensembles.get(name)
        return ensemble.method if ensemble is not None else methods.PLAIN

    def plan(self, model: str, fusion: FusionParams | dict | None = None) -> FusionPlan:
        """The fusion plan of a served name with a request's overrides (UnknownName, InvalidRequest)."""
        if isinstance(fusion, dict):
            fusion = FusionParams.model_validate(fusion)
        return self._registry.plan(model, fusion)

    # --- models
    def model(self, name: str) -> CausalLM | RewardModel:
        """The loaded backend of a registry model (loads it on first use)."""
        return self._pool.get(name)

    def prepare(self, model: str, fusion: FusionParams | dict | None = None) -> FusionPlan:
        """Load every model a served name needs and check their shared vocabulary; returns its plan."""
        plan = self.plan(model, fusion)
        for name in plan.models() + plan.rewards():
            self._pool.get(name)
        for note in self._engine.alignment(plan).notes:
            log.info("%s: %s", model, note)
        return plan

    def alignment(self, plan: FusionPlan) -> Alignment:
        """The shared vocabulary of a plan's models (raises InvalidRequest on a mismatch)."""
        return self._engine.alignment(plan)

    def read_tokenizers(self) -> dict[str, str]:
        """Read the tokenizer of every local model (and of every remote one) now, and keep them: a model loaded
        later then parses nothing while other requests decode (backends/tokenizers.py). Returns the folders
        whose tokenizer failed to read, with the reason (their loads report it in full)."""
        places = []
        for spec in self._registry.models.values():
            path = spec.tokenizer if spec.remote is not None else spec.path
            if path is not None and os.path.isdir(folder := self._registry.resolve_path(path)):
                places.append((folder, spec.gguf_file))
        return self._pool.tokenizers.read_all(list(dict.fromkeys(places)))

    def preload(self) -> dict[str, str]:
        """Prepare every ensemble at start-up. Returns the ones that failed, each with its reason (all of
        them, not the first); mismatched vocabularies are found from tokenizer files before any weight loads."""
        from logitfuse.config.startup import vocab_problems

        failed = vocab_problems(self._registry, self._pool.tokenizers)  # the loads then reuse what it read
        if failed and self._registry.server.on_bad_entry == "refuse":
            return failed
        for name in self._registry.ensembles:
            if f"ensembles.{name}" in failed or self.hosted_by(self.plan(name)):
                continue  # an ensemble over a vLLM-hosted model is checked by vLLM's processor as it starts
            try:
                self.prepare(name)
            except Exception as err:  # every failure is reported, with its entry
                failed[f"ensembles.{name}"] = f"ensembles.{name}: {err}"
        return failed

    def skip(self, failed: dict[str, str]) -> None:
        """Serve without the ensembles that failed (`ensembles.NAME` -> reason); they are listed in health()."""
        reg = self._registry
        keep = {n: e for n, e in reg.ensembles.items() if f"ensembles.{n}" not in failed}
        self._registry = reg.model_copy(update={"ensembles": keep, "skipped": reg.skipped | failed})
        self._pool.registry = self._registry

    @contextmanager
    def pinned(self, names: Sequence[str]) -> Iterator[dict[str, CausalLM | RewardModel]]:
        """Load and pin models (never evicted while pinned) for the duration of the block."""
        with self._pool.pinned(list(names)) as backends:
            yield backends

    def pin(self, names: Sequence[str]) -> None:
        """Load and pin models until unpin(names); pins count."""
        self._pool.acquire(list(names))

    def unpin(self, names: Sequence[str]) -> None:
        self._pool.release(list(names))

    def try_pin(self, names: Sequence[str]) -> bool:
        """Pin models only if all are loaded now (True); never loads or waits on a load (False: none pinned)."""
        return self._pool.try_acquire(list(names))

    def hosted_by(self, plan: FusionPlan) -> str | None:
        """The registry model whose in-process vLLM engine decodes this plan (its base has `engine: vllm`),
        or None: logitfuse's own engine decodes it."""
        return plan.base if self._registry.model_spec(plan.base).engine == "vllm" else None

    def hosted_models(self) -> list[str]:
        """Registry models that run in an in-process vLLM engine (engine: vllm)."""
        return [n for n, s in self._registry.models.items() if s.engine == "vllm"]

    def shell(self, name: str) -> CausalLM:
        """A model's tokenizer, context and vocabulary without its weights (backends/shell.py): what builds the
        requests that another engine decodes. The hosted model's own backend is one already."""
        return self._pool.shell(name)

    def model_entry(self, name: str) -> ModelSpec:
        """A registry model's entry (an adapter model's is its untuned model's)."""
        return self._registry.model_spec(name)

    def resolve_path(self, path: str) -> str:
        """A path of the registry file as a path on disk (relative to the file), or a hub id unchanged."""
        return self._registry.resolve_path(path)

    def registry_json(self) -> str:
        """The registry as JSON (paths resolved against the same folder): for a process that runs a copy of it,
        as vLLM's engine process does in engine mode."""
        return self._registry.model_dump_json()

    def files_problem(self, names: Sequence[str]) -> str | None:
        """What can be seen of models without loading them (a folder missing, a weights file unreadable)."""
        return files_problem(self._registry, names)

    def own_stop_ids(self, name: str) -> frozenset[int]:
        """The ids that end a model's own sequences: the registry's stop_token_ids, else its files'."""
        override = self._registry.model_spec(name).stop_token_ids
        return frozenset(override) if override is not None else end_ids(self._pool.shell(name))

    def is_remote(self, name: str) -> bool:
        """Whether a registry model is served by a remote endpoint (read from the registry: nothing loads)."""
        return self._registry.model_spec(name).remote is not None

    def is_loaded(self, name: str) -> bool:
        return self._pool.is_loaded(name)

    def room_for(self, names: Sequence[str]) -> bool:
        """Whether models fit beside the pinned ones within server.memory_budget_mb (sizes estimated from
        their files until loaded)."""
        return self._pool.room_for(list(names))

    # --- state, for operators
    def health(self) -> dict:
        """Loaded models, entries left out at start-up and models that failed to load, with reasons."""
        return {"loaded": self._pool.loaded(), "skipped": dict(self._registry.skipped),
                "failed": self._pool.failed()}

    def stats(self) -> EngineStats:
        """The main engine's counts (running, waiting, KV reserved, speculative totals)."""
        return self._engine.stats()

    def kv_states(self) -> list:
        """The KV states the main engine's running sequences hold (for memory measurements)."""
        return self._engine.kv_states()

    # --- requests and decoding
    def requests(self, model: str, prompt: Prompt | None = None, sampling: SamplingParams | None = None,
                 fusion: FusionParams | dict | None = None, messages: Sequence[dict] | None = None,
                 n: int = 1, rid: str | None = None) -> list[GenerationRequest]:
        """The engine requests for one prompt (or chat) and n samples (seed + i for sample i)."""
        plan = self.plan(model, fusion)
        sampling = (sampling or SamplingParams()).check(self._registry.server.max_logprobs)
        # a plan that vLLM decodes needs only the roles' tokenizers here (its experts load in vLLM's process)
        get = self._pool.shell if self.hosted_by(plan) else self._pool.get
        prompts = role_prompts({m: get(m) for m in plan.models()}, prompt, messages, plan.base, plan.cross_models())
        if sampling.max_tokens is None:
            sampling = replace(sampling, max_tokens=self._rest_of_window(plan, prompts, get))
        rid = rid or f"req-{next(self._ids)}"
        out = []
        for i in range(n):
            sp = sampling if sampling.seed is None or i == 0 else replace(sampling, seed=(sampling.seed + i) % 2**63)
            out.append(GenerationRequest(f"{rid}-{i}" if n > 1 else rid, plan, prompts, sp))
        return out

    def _rest_of_window(self, plan: FusionPlan, prompts: dict[str, list[int]], get) -> int:
        """What a request without max_tokens may generate: the rest of the smallest context window among
        its models (each counted in its own tokens), capped by server.max_tokens_default."""
        room = min(get(m).max_context - len(prompts[m]) for m in plan.models())
        cap = self._registry.server.max_tokens_default
        return max(1, min(room, cap) if cap else room)

    def check(self, request: GenerationRequest) -> None:
        """Refuse (InvalidRequest) a request the engine could never run, before it is queued."""
        self._engine.check(request)

    def submit(self, request: GenerationRequest) -> None:
        """Queue a request on the main engine; step() advances it (for callers that drive the loop)."""
        self._engine.add(request)

    def step(self) -> list[TokenEvent | PromptScores]:
        """One engine step: admit, prefill, fuse, sample; the events it produced."""
        return self._engine.step()

    def has_work(self) -> bool:
        return self._engine.has_work()

    def stream(self, requests: list[GenerationRequest]) -> Iterator[TokenEvent | PromptScores]:
        """Events of the given requests, batched together, as they are produced."""
        return self._engine.run(requests)

    def generate(self, model: str, prompts: Sequence[Prompt], sampling: SamplingParams | None = None,
                 fusion: FusionParams | dict | None = None) -> list[CompletionOutput]:
        """Complete every prompt (decoded together in one batch); results in prompt order."""
        reqs = [r for p in prompts for r in self.requests(model, p, sampling, fusion)]
        names = sorted({m for r in reqs for m in r.plan.models() + r.plan.rewards()})
        done = {r.rid: CompletionOutput(r.rid) for r in reqs}
        with self.pinned(names):
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

    def generate(self, reqs: list[GenerationRequest]) -> list[CompletionOutput]:
        for r in reqs:
            check_plan(r.plan)
        reqs = [replace(r, plan=replace(r.plan, speculative=self.spec)) for r in reqs]
        before = self.lf.stats().speculative
        done = {r.rid: CompletionOutput(r.rid) for r in reqs}
        for ev in self.lf.stream(reqs):
            done[ev.rid].add(ev)
        self.stats = self.stats + (self.lf.stats().speculative - before)
        return [done[r.rid] for r in reqs]

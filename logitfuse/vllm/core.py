"""The fusion core both vLLM adapters share (processor.py for vLLM's first model runner, runner_v2.py for its
second): requests keyed by the adapter's own handle (a persistent-batch index, a request slot), their rows
in ExpertRows, and one `apply` over a batch of logits. No vLLM import: the adapters translate vLLM's batch
updates into `add`, `drop` and `move`, and tell `apply` which logits row belongs to which handle.

Overlap: an expert's step needs only the tokens so far, not the base's logits. With `overlap` on, an adapter calls
`start` once the batch is known and before the base's forward: the experts' catch-up runs on one worker thread (on
CUDA under a side stream; on a CPU on the cores vLLM's forward is not bound to, `overlap_cpus`), beside vLLM's
forward, and `apply` waits for it, then combines. Anything that reads or changes the rows (`add`, `drop`, `move`,
`apply`, another `start`) first waits for the catch-up in flight.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
from collections.abc import Hashable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from logitfuse.api import LogitFuse
from logitfuse.backends.base import tokenizer_vocab_info
from logitfuse.backends.hf import probe_vocab
from logitfuse.config.registry import Registry
from logitfuse.errors import InvalidRequest
from logitfuse.ops.vocab import VocabInfo, align
from logitfuse.vllm import requests
from logitfuse.vllm.rows import ExpertRows

Handle = Hashable
ENV_OVERLAP = "LOGITFUSE_VLLM_OVERLAP"
ENV_OVERLAP_CPUS = "LOGITFUSE_VLLM_OVERLAP_CPUS"


def overlap_setting(device: torch.device | str) -> bool:
    """Whether the experts' catch-up overlaps the base's forward: $LOGITFUSE_VLLM_OVERLAP, 1 or 0; unset, on
    where the device is CUDA (a side stream) and off on a CPU (the thread takes cores vLLM's forward uses)."""
    value = os.environ.get(ENV_OVERLAP, "").strip().lower()
    if value in ("", "auto"):
        return torch.device(device).type == "cuda"
    if value in ("1", "on", "true", "yes"):
        return True
    if value in ("0", "off", "false", "no"):
        return False
    raise ValueError(f"logitfuse: {ENV_OVERLAP}={value!r}: use 1 (overlap on) or 0 (off)")


def overlap_cpus(bound: set[int]) -> set[int]:
    """The CPUs the experts' thread runs on when the device is a CPU: $LOGITFUSE_VLLM_OVERLAP_CPUS (ids and
    ranges, "1" or "2-3,6"), else every CPU but those the thread that starts it is bound to (`bound`: vLLM's CPU
    worker binds its OpenMP threads to its cores and leaves one core per worker to its engine process, which
    waits while the worker runs the forward); empty: stay where it is (nothing is bound)."""
    value = os.environ.get(ENV_OVERLAP_CPUS, "").strip()
    if not value:
        return set(range(os.cpu_count() or 1)) - bound
    cpus: set[int] = set()
    try:
        for part in value.split(","):
            first, _, last = part.strip().partition("-")
            cpus.update(range(int(first), int(last or first) + 1))
    except ValueError:
        raise ValueError(f"logitfuse: {ENV_OVERLAP_CPUS}={value!r}: CPU ids and ranges, e.g. 1 or 2-3,6") from None
    return cpus


class FusionCore:
    """What a fused request needs between vLLM's steps, for any adapter: its plan, prompts and experts.
    overlap: run the experts' catch-up ahead of `apply` when an adapter calls `start` (module docstring)."""

    def __init__(self, tokenizer, width: int, device: torch.device, log: logging.Logger | None = None,
                 overlap: bool = False) -> None:
        self.log = log or logging.getLogger("logitfuse.vllm")
        self.device = torch.device(device)
        self.overlap = overlap
        self.early = 0  # rows handed to the overlapped catch-up (counted over the core's life)
        self._job: Future | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._side = None  # the CUDA side stream of the catch-up, made at the first start on CUDA
        self.registry = local_registry(requests.load_registry(), device)
        self.lf = LogitFuse(self.registry)
        base = host_vocab(self.registry, tokenizer, width)
        self.eos = base.vocab.get(base.special.get("eos_token") or "", None)
        self.refused = refusals(self.registry, base, self.lf, self.log)
        self.rows = ExpertRows(self.lf.model, base, self.registry.server.solver_threads, tokenizer, self.lf.model)
        self.handles: dict[Handle, str] = {}  # adapter handle -> row id (fused rows, and failed ones)
        self.ids = itertools.count()

    @staticmethod
    def validate(extra: dict | None, prompt_logprobs) -> None:
        """vLLM's front end, as each request arrives: ValueError (a 400 there) for a bad ensemble or override."""
        if not requests.wanted(extra) or requests.PLAN in extra:
            return  # a plan comes from logitfuse serve's engine mode, which checked it before handing it over
        registry = requests.load_registry()
        try:
            plan = requests.request_plan(registry, extra)
        except InvalidRequest as err:
            raise ValueError(f"logitfuse: {err}") from None
        if prompt_logprobs:
            raise ValueError("logitfuse: prompt_logprobs are the base model's own under vLLM (processors see "
                             "only the next-token logits); ask logitfuse serve for fused prompt scores")
        problem = files_problem(registry, plan.models()[1:] + plan.rewards())
        if problem:
            raise ValueError(f"logitfuse: ensemble {extra[requests.KEY]!r}: {problem}")

    def add(self, handle: Handle, extra: dict | None, prompt: Sequence[int] | None, outputs: Sequence[int],
            seed: int | None = None) -> bool:
        """A request joins under handle (whatever held the handle leaves); False when it asks for no fusion.
        A request that cannot be fused stays, marked, and ends at its next step. seed: the request's sampling
        seed (Transfer Q*'s rollouts draw from seed + 1, as in logitfuse's engine)."""
        self.drop(handle)
        if not requests.wanted(extra):
            return False
        rid = f"row-{next(self.ids)}"
        self.handles[handle] = rid
        try:
            if prompt is None:
                raise InvalidRequest("prompt embeddings carry no token ids for the experts", "prompt")
            plan = requests.request_plan(self.registry, extra)
            name = extra[requests.KEY]
            if name in self.refused:
                raise InvalidRequest(self.refused[name], requests.KEY)
            self.rows.add(rid, plan, prompt, outputs, requests.role_prompts(extra, plan), seed)
        except Exception as err:  # the front end validated it; a failure here ends this request alone
            self.log.error("logitfuse: request at %s cannot be fused: %s", handle, err)
            self.rows.rows.pop(rid, None)
            self.handles[handle] = f"failed: {err}"
        return True

    def drop(self, handle: Handle) -> None:
        self.join()
        rid = self.handles.pop(handle, None)
        if rid is not None:
            self.rows.remove(rid)

    def move(self, a: Handle, b: Handle, swap: bool) -> None:
        """The request at a goes to b; with swap, b's goes to a, else what was at b leaves."""
        self.join()
        ra, rb = self.handles.pop(a, None), self.handles.pop(b, None)
        if ra is not None:
            self.handles[b] = ra
        if swap and rb is not None:
            self.handles[a] = rb
        elif rb is not None:
            self.rows.remove(rb)

    def apply(self, logits: torch.Tensor, where: Sequence[tuple[int, Handle]]) -> torch.Tensor:
        """Fuse the rows of logits whose handle is a fused request (where: (logits row, handle) pairs, one per
        request); a request that cannot be fused gets only its end-of-sequence token."""
        self.join()
        mine = [(i, self.handles[h]) for i, h in where if h in self.handles]
        if not mine:
            return logits
        ok = [(i, rid) for i, rid in mine if rid in self.rows.rows and self.rows.rows[rid].error is None]
        if ok:
            idx = [i for i, _ in ok]
            if self.overlap and self.device.type == "cuda":  # rows not started ahead: on the side stream too,
                self._side_after_current()  # so that every expert tensor belongs to that stream's memory pool
                self._catch_up([rid for _, rid in ok], torch.is_inference_mode_enabled(), torch.is_grad_enabled())
                self._wait_side()
            fused, failed = self.rows.fuse([rid for _, rid in ok], logits[idx])
            logits[idx] = fused.to(logits.dtype)
            for reason in failed.values():
                self.log.error("logitfuse: fusion failed for a request, which ends now: %s", reason)
        for i, rid in mine:
            row = self.rows.rows.get(rid)
            if row is None or row.error is not None:
                self.end(logits, i)
        return logits

    # -- overlap ---------------------------------------------------------------------------------------------
    def start(self, handles: Iterable[Handle]) -> None:
        """With overlap on, start the experts' catch-up of the rows at these handles (the rows of the coming
        `apply`, in its order) on the worker thread, and return at once; `apply` joins it. Off: nothing."""
        if not self.overlap:
            return
        self.join()
        rids = [self.handles[h] for h in handles if h in self.handles]
        rids = [r for r in rids if r in self.rows.rows and self.rows.rows[r].error is None]
        if not rids:
            return
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="logitfuse-experts",
                                            initializer=self._place_thread)
        if self.device.type == "cuda":
            self._side_after_current()  # the side stream starts after what vLLM queued so far
        self._job = self._pool.submit(self._catch_up, rids, torch.is_inference_mode_enabled(),
                                      torch.is_grad_enabled())

    def join(self) -> None:
        """Wait for the catch-up in flight, if any; on CUDA the current stream then waits for the side stream.
        An error that escaped the rows' own per-row handling is raised here, as `apply` would raise it."""
        job, self._job = self._job, None
        if job is None:
            return
        self.early += job.result()
        self._wait_side()

    def _catch_up(self, rids: list[str], inference: bool, grad: bool) -> int:
        """The rows' catch-up under the caller's autograd mode (thread-local: vLLM samples in inference mode),
        on the side stream where there is one."""
        with contextlib.ExitStack() as on:
            if self._side is not None:  # this thread's device and its current stream there
                on.enter_context(torch.cuda.device(self.device))
                on.enter_context(torch.cuda.stream(self._side))
            on.enter_context(torch.inference_mode(inference))
            on.enter_context(torch.set_grad_enabled(grad))
            self.rows.start(rids)
        return len(rids)

    def _place_thread(self) -> None:
        """On a CPU, the experts' thread leaves the cores vLLM's forward runs on (`overlap_cpus`), so that
        the two run side by side instead of taking turns."""
        if self.device.type != "cpu" or not hasattr(os, "sched_setaffinity"):
            return
        cpus = overlap_cpus(os.sched_getaffinity(0))  # 0: this thread, bound as the thread that made it
        if cpus:
            try:
                os.sched_setaffinity(0, cpus)
            except OSError as err:
                self.log.warning("logitfuse: the experts' thread stays on CPUs %s (%s)",
                                 sorted(os.sched_getaffinity(0)), err)
        self.log.info("logitfuse: the experts' thread runs on CPUs %s", sorted(os.sched_getaffinity(0)))

    def _side_after_current(self) -> None:
        if self._side is None:
            self._side = torch.cuda.Stream(self.device)
        self._side.wait_stream(torch.cuda.current_stream(self.device))

    def _wait_side(self) -> None:
        if self._side is not None:
            torch.cuda.current_stream(self.device).wait_stream(self._side)

    def close(self) -> None:
        """Wait for the catch-up in flight and stop the worker thread."""
        self.join()
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None

    def end(self, logits: torch.Tensor, i: int) -> None:
        """A row that cannot be fused ends at once: its only possible token is the end of sequence."""
        logits[i] = float("-inf")
        logits[i, self.eos if self.eos is not None else 0] = 0.0


def local_registry(registry: Registry, device: torch.device) -> Registry:
    """The registry as this worker runs it: models (reward models too) on device `auto` go to vLLM's device for
    this worker, and torch's threads stay as vLLM set them (cpu_threads and solver_threads are for logitfuse's
    own server)."""
    models = {n: s.model_copy(update={"device": str(device)}) if s.device == "auto" else s
              for n, s in registry.models.items()}
    rewards = {n: s.model_copy(update={"device": str(device)}) if s.device == "auto" else s
               for n, s in registry.rewards.items()}
    server = registry.server.model_copy(update={"cpu_threads": None, "solver_threads": None})
    return registry.model_copy(update={"models": models, "rewards": rewards, "server": server})


def host_vocab(registry: Registry, tokenizer, width: int) -> VocabInfo:
    """vLLM's vocabulary as fusion reads it: with every token's text where an expert of the registry uses
    another tokenizer (its scores are mapped by text), without where none does (the texts cost a decode per id)."""
    return tokenizer_vocab_info("vllm", tokenizer, width, any(e.cross_tokenizer for e in registry.experts.values()))


def refusals(registry: Registry, base: VocabInfo, lf: LogitFuse, log: logging.Logger | None = None) -> dict[str, str]:
    """Check every ensemble to serve at start-up and load its experts: name -> why it cannot be fused.
    Raises ValueError when an ensemble named in $LOGITFUSE_ENSEMBLES cannot, or when none can (unless the
    engine hosts one model for logitfuse serve, $LOGITFUSE_HOST_MODEL: then only ensembles over it count)."""
    log = log or logging.getLogger("logitfuse.vllm")
    named, host = requests.served_names(), os.environ.get(requests.ENV_HOST) or None
    unknown = [n for n in named or () if n not in registry.ensembles]
    if unknown:
        raise ValueError(f"logitfuse: {requests.ENV_ENSEMBLES} names unknown ensembles {unknown}; "
                         f"available: {', '.join(registry.ensembles)}")
    out, elsewhere = {}, set()
    for name in registry.ensembles:
        if named is not None and name not in named:
            out[name] = f"not served here (not in {requests.ENV_ENSEMBLES})"
            continue
        if host is not None and registry.ensembles[name].base != host:
            out[name] = f"its base is not {host!r}, the model this engine hosts"
            elsewhere.add(name)
            continue
        reason = refusal(registry, name, base, lf)
        if reason:
            out[name] = reason
            log.warning("logitfuse: ensemble %r is not served: %s", name, reason)
    bad = {n: r for n, r in out.items() if (named is None or n in named) and n not in elsewhere}
    # a hosted model (logitfuse serve's engine mode) may serve no ensemble: its requests pick experts themselves
    if (named and bad) or (host is None and len(out) == len(registry.ensembles)):
        listing = "; ".join(f"{n}: {r}" for n, r in bad.items()) or "the registry has no ensembles"
        raise ValueError(f"logitfuse: no ensemble can be fused with vLLM's model ({listing})"
                         if not named else f"logitfuse: these ensembles cannot be served: {listing}")
    return out


def refusal(registry: Registry, name: str, base: VocabInfo, lf: LogitFuse) -> str | None:
    """Why one ensemble cannot be fused into vLLM's model, or None (its experts are then loaded). Whether
    its roles can read vLLM's prompt ids is per request (a request may carry each role's own prompt)."""
    plan = registry.plan(name)
    reason = requests.unsupported(registry, plan, own_prompts=True)
    if reason:
        return reason
    theirs = registry_base_vocab(registry, plan.base)
    if theirs.vocab != base.vocab or dict(theirs.special) != dict(base.special):
        try:
            align([base, theirs])
            detail = f"{len(theirs.vocab)} tokens against vLLM's {len(base.vocab)}"
        except ValueError as err:
            detail = str(err)
        return f"its base {plan.base!r} does not share vLLM's vocabulary: {detail}"
    try:
        lf.pin(plan.models()[1:] + plan.rewards())
        ExpertRows(lf.model, base).alignment(plan)
    except Exception as err:
        return f"{type(err).__name__}: {err}"
    return None


def registry_base_vocab(registry: Registry, name: str) -> VocabInfo:
    spec = registry.models[name]
    folder = spec.tokenizer if spec.remote is not None else spec.path
    return probe_vocab(name, registry.resolve_path(folder))


def files_problem(registry: Registry, names: tuple[str, ...]) -> str | None:
    """What the front end can see without loading: an expert's (or a reward model's) folder missing or a
    weights file unreadable (pool.py's check, the one logitfuse serve's engine mode makes too)."""
    from logitfuse.pool import files_problem as problem

    return problem(registry, names)

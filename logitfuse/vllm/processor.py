"""FusionLogitsProcessor: a vLLM V1 logits processor that fuses the experts of a logitfuse ensemble into the
base model vLLM runs.

    LOGITFUSE_CONFIG=configs/default.yaml python -m vllm.entrypoints.openai.api_server --model models/base-large \
        --logits-processors logitfuse.vllm:FusionLogitsProcessor --logprobs-mode processed_logprobs

vLLM builds one instance per sampling worker. `update_state` follows the persistent batch (rows added,
removed, moved or swapped); `apply` brings each fused row's experts up to date with the tokens vLLM has fed
the base and replaces that row's logits by the fused scores. Rows without `ensemble` are left untouched.
"""

from __future__ import annotations

import itertools
import os

import torch
from transformers import AutoTokenizer
from vllm.logger import init_logger
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor, MoveDirectionality

from logitfuse.api import LogitFuse
from logitfuse.backends.base import tokenizer_vocab_info
from logitfuse.backends.hf import probe_vocab
from logitfuse.config.registry import Registry
from logitfuse.errors import InvalidRequest
from logitfuse.ops.vocab import VocabInfo, align
from logitfuse.vllm import requests
from logitfuse.vllm.rows import ExpertRows

log = init_logger(__name__)


class FusionLogitsProcessor(LogitsProcessor):
    @classmethod
    def validate_params(cls, sampling_params) -> None:
        """Runs in vLLM's front end as each request arrives: a bad ensemble or override is a 400 there."""
        extra = sampling_params.extra_args
        if not requests.wanted(extra):
            return
        registry = requests.load_registry()
        try:
            plan = requests.request_plan(registry, extra)
        except InvalidRequest as err:
            raise ValueError(f"logitfuse: {err}") from None
        if sampling_params.prompt_logprobs:
            raise ValueError("logitfuse: prompt_logprobs are the base model's own under vLLM (processors see "
                             "only the next-token logits); ask logitfuse serve for fused prompt scores")
        problem = files_problem(registry, plan.models()[1:])
        if problem:
            raise ValueError(f"logitfuse: ensemble {extra[requests.KEY]!r}: {problem}")

    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool) -> None:
        model = vllm_config.model_config
        self.registry = local_registry(requests.load_registry(), device)
        self.lf = LogitFuse(self.registry)
        tokenizer = AutoTokenizer.from_pretrained(model.tokenizer)
        base = host_vocab(self.registry, tokenizer, model.get_vocab_size())
        self.eos = base.vocab.get(base.special.get("eos_token") or "", None)
        self.refused = refusals(self.registry, base, self.lf)
        self.core = ExpertRows(self.lf.model, base, self.registry.server.solver_threads, tokenizer)
        self.by_index: dict[int, str] = {}  # persistent batch index -> row id (fused rows only)
        self.ids = itertools.count()

    def is_argmax_invariant(self) -> bool:
        return False  # fusion changes which token is most likely

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        """Follow the batch: removed, then added, then moved (vLLM's order). Token ids are read in apply."""
        if batch_update is None:
            return
        for index in batch_update.removed:
            self._drop(index)
        for index, params, prompt, outputs in batch_update.added:
            self._drop(index)
            if requests.wanted(params.extra_args):
                self._add(index, params.extra_args, prompt, outputs)
        for a, b, how in batch_update.moved:
            ra, rb = self.by_index.pop(a, None), self.by_index.pop(b, None)
            if ra is not None:
                self.by_index[b] = ra
            if how == MoveDirectionality.SWAP and rb is not None:
                self.by_index[a] = rb
            elif rb is not None:  # a one-way move replaces what was at b
                self.core.remove(rb)

    def _add(self, index: int, extra: dict, prompt: list[int] | None, outputs: list[int]) -> None:
        rid = f"row-{next(self.ids)}"
        self.by_index[index] = rid
        try:
            if prompt is None:
                raise InvalidRequest("prompt embeddings carry no token ids for the experts", "prompt")
            plan = requests.request_plan(self.registry, extra)
            name = extra[requests.KEY]
            if name in self.refused:
                raise InvalidRequest(self.refused[name], requests.KEY)
            self.core.add(rid, plan, prompt, outputs)
        except Exception as err:  # the front end validated it; a failure here ends this request alone
            log.error("logitfuse: request at batch index %d cannot be fused: %s", index, err)
            self.core.rows.pop(rid, None)
            self.by_index[index] = f"failed: {err}"

    def _drop(self, index: int) -> None:
        rid = self.by_index.pop(index, None)
        if rid is not None:
            self.core.remove(rid)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        if not self.by_index:
            return logits
        batch = logits.shape[0]
        idx = sorted(i for i in self.by_index if i < batch)
        ok = [i for i in idx if self.by_index[i] in self.core.rows and self.core.rows[self.by_index[i]].error is None]
        if ok:
            rids = [self.by_index[i] for i in ok]
            fused, failed = self.core.fuse(rids, logits[ok])
            logits[ok] = fused.to(logits.dtype)
            for reason in failed.values():
                log.error("logitfuse: fusion failed for a request, which ends now: %s", reason)
        for i in idx:
            rid = self.by_index[i]
            row = self.core.rows.get(rid)
            if row is None or row.error is not None:
                self._end(logits, i)
        return logits

    def _end(self, logits: torch.Tensor, i: int) -> None:
        """A row that cannot be fused ends at once: its only possible token is the end of sequence."""
        logits[i] = float("-inf")
        logits[i, self.eos if self.eos is not None else 0] = 0.0


def local_registry(registry: Registry, device: torch.device) -> Registry:
    """The registry as this worker runs it: models on device `auto` go to vLLM's device for this worker, and
    torch's threads stay as vLLM set them (cpu_threads and solver_threads are for logitfuse's own server)."""
    models = {n: s.model_copy(update={"device": str(device)}) if s.device == "auto" else s
              for n, s in registry.models.items()}
    server = registry.server.model_copy(update={"cpu_threads": None, "solver_threads": None})
    return registry.model_copy(update={"models": models, "server": server})


def host_vocab(registry: Registry, tokenizer, width: int) -> VocabInfo:
    """vLLM's vocabulary as fusion reads it: with every token's text where an expert of the registry uses
    another tokenizer (its scores are mapped by text), without where none does (the texts cost a decode per id)."""
    return tokenizer_vocab_info("vllm", tokenizer, width, any(e.cross_tokenizer for e in registry.experts.values()))


def refusals(registry: Registry, base: VocabInfo, lf: LogitFuse) -> dict[str, str]:
    """Check every ensemble to serve at start-up and load its experts: name -> why it cannot be fused.
    Raises ValueError when an ensemble named in $LOGITFUSE_ENSEMBLES cannot, or when none can."""
    named = requests.served_names()
    unknown = [n for n in named or () if n not in registry.ensembles]
    if unknown:
        raise ValueError(f"logitfuse: {requests.ENV_ENSEMBLES} names unknown ensembles {unknown}; "
                         f"available: {', '.join(registry.ensembles)}")
    out = {}
    for name in registry.ensembles:
        if named is not None and name not in named:
            out[name] = f"not served here (not in {requests.ENV_ENSEMBLES})"
            continue
        reason = refusal(registry, name, base, lf)
        if reason:
            out[name] = reason
            log.warning("logitfuse: ensemble %r is not served: %s", name, reason)
    bad = {n: r for n, r in out.items() if named is None or n in named}
    if (named and bad) or len(out) == len(registry.ensembles):
        listing = "; ".join(f"{n}: {r}" for n, r in bad.items()) or "the registry has no ensembles"
        raise ValueError(f"logitfuse: no ensemble can be fused with vLLM's model ({listing})"
                         if not named else f"logitfuse: these ensembles cannot be served: {listing}")
    return out


def refusal(registry: Registry, name: str, base: VocabInfo, lf: LogitFuse) -> str | None:
    """Why one ensemble cannot be fused into vLLM's model, or None (its experts are then loaded)."""
    plan = registry.plan(name)
    reason = requests.unsupported(registry, plan)
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
        lf.pin(plan.models()[1:])
        ExpertRows(lf.model, base).alignment(plan)
    except Exception as err:
        return f"{type(err).__name__}: {err}"
    return None


def registry_base_vocab(registry: Registry, name: str) -> VocabInfo:
    spec = registry.models[name]
    folder = spec.tokenizer if spec.remote is not None else spec.path
    return probe_vocab(name, registry.resolve_path(folder))


def files_problem(registry: Registry, names: tuple[str, ...]) -> str | None:
    """What the front end can see without loading: an expert's folder missing or a weights file unreadable."""
    from logitfuse.pool import broken_file, local_folder

    for name in names:
        view = registry.adapter_views().get(name)
        if view is not None:
            folder = view[2]
            if not os.path.isfile(os.path.join(folder, "adapter_config.json")):
                return f"expert {view[0]!r}: adapter folder {folder} has no adapter_config.json"
            continue
        spec = registry.models[name]
        if spec.remote is not None:
            continue
        folder = local_folder(registry, name)
        if folder is None:
            return f"model {name!r}: no such folder {registry.resolve_path(spec.path)}"
        broken = broken_file(folder)
        if broken:
            return f"model {name!r}: {broken} is unreadable"
    return None

"""Continuous batching over fused decoding.

Every model keeps one batched KV state (a Slot) holding the rows of all sequences that use it, so a model
shared by several roles or requests runs once per step. New sequences are prefilled and join at step
boundaries; finished ones leave. Each step fuses rows in groups that share a method and roles (per-row
coefficients), samples every row with its own generator, and then advances every model by one token.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from logitfuse import methods
from logitfuse.admission import kv_need
from logitfuse.fuser import Fuser, score_prompt
from logitfuse.request import GenerationRequest, InvalidRequest, PromptScores, TokenEvent
from logitfuse.retokenize import advance_ragged, retokenized_update
from logitfuse.sampling import SamplingTensors, make_generator, sample, token_logprobs, top_logprobs
from logitfuse.sequence import Sequence
from logitfuse.speculative import SpecGroup, SpecStats
from logitfuse.stopping import StopChecker


@dataclass
class Slot:
    """One model's batched state: rows[i] is the sequence id of row i; logits (B_m, V) at each row's end."""

    backend: object
    state: object
    rows: list[str]
    logits: torch.Tensor

    def index(self) -> dict[str, int]:
        return {rid: i for i, rid in enumerate(self.rows)}


class Engine:
    def __init__(self, get_backend: Callable[[str], object], get_reward: Callable[[str], object] | None = None,
                 max_batch: int = 64, solver_threads: int | None = None, kv_budget: int | None = None) -> None:
        self.fuser = Fuser(get_backend, get_reward, solver_threads)
        self.get_backend = get_backend
        self.max_batch = max_batch
        self.waiting: deque[GenerationRequest] = deque()
        self.seqs: dict[str, Sequence] = {}
        self.slots: dict[str, Slot] = {}
        self.spec_groups: dict[tuple, SpecGroup] = {}  # speculative rows keep their own KV states
        self.spec_stats = SpecStats()
        self.kv_budget = kv_budget  # bytes of KV cache the running sequences may need at worst (None: no limit)
        self.kv_reserved = 0  # what the running sequences may need at worst (kv_need), kept current
        self._kv_per_token: dict[str, int] = {}

    # -- requests in and out -------------------------------------------------------------------------
    def check(self, req: GenerationRequest) -> None:
        """Raise InvalidRequest for a request this engine cannot run (context overflow, vocab mismatch...)."""
        plan, sp = req.plan, req.sampling
        width = self.fuser.alignment(plan).width
        if any(t >= width for t, _ in sp.logit_bias):
            raise InvalidRequest(f"logit_bias names token {max(t for t, _ in sp.logit_bias)}, outside this "
                                 f"model's vocabulary of {width} tokens", "logit_bias")
        for name in plan.models():
            backend = self.get_backend(name)
            n = len(req.prompts[name])
            if n == 0:
                raise InvalidRequest("prompt must contain at least one token", "prompt")
            if n + sp.max_tokens > backend.max_context:
                raise InvalidRequest(
                    f"this model's maximum context length is {backend.max_context} tokens; the prompt has {n} "
                    f"tokens and max_tokens is {sp.max_tokens} ({n + sp.max_tokens} in all)", "max_tokens")
        if sp.prompt_logprobs and not all(getattr(self.get_backend(n), "can_score_prompt", True)
                                          for n in plan.models()):
            raise InvalidRequest("echo with logprobs (prompt scoring) is not available with a remote model", "echo")
        if plan.speculative and (slow := [n for n in plan.models()
                                          if not getattr(self.get_backend(n), "can_verify_blocks", True)]):
            raise InvalidRequest(f"speculative decoding is not available with {slow[0]!r}: its server does not "
                                 "echo prompt distributions exactly, so a block cannot be verified in one call "
                                 "(set fusion.speculative.k to 0)", "fusion.speculative")
        method = methods.get(plan.method)
        if sp.prompt_logprobs and not method.prompt_scoring:
            raise InvalidRequest(f"echo with logprobs (prompt scoring) is not available for method {method.name}",
                                 "echo")
        if sp.prompt_logprobs and len({tuple(p) for p in req.prompts.values()}) > 1:
            raise InvalidRequest("prompt scoring needs the same prompt tokens for every role", "echo")
        if self.kv_budget is not None and (need := self.kv_need([req])) > self.kv_budget:
            raise InvalidRequest(
                f"this request may need {need / 2**20:.1f} MiB of KV cache (prompt + max_tokens positions in "
                f"{', '.join(plan.models())}); the server allows {self.kv_budget / 2**20:.1f} MiB in all "
                "(server.kv_budget_mb): lower max_tokens or shorten the prompt", "max_tokens")

    def kv_need(self, reqs: list[GenerationRequest]) -> int:
        """Bytes of KV cache these requests may need at worst, decoded together (see admission.py)."""
        return kv_need(reqs, self._kv_bytes)

    def _kv_bytes(self, name: str) -> int:
        if name not in self._kv_per_token:
            self._kv_per_token[name] = self.get_backend(name).kv_bytes_per_token()
        return self._kv_per_token[name]

    def _fits(self, new: list[GenerationRequest]) -> bool:
        if self.kv_budget is None:
            return True
        return self.kv_need([s.req for s in self.seqs.values()] + new) <= self.kv_budget

    def add(self, req: GenerationRequest) -> None:
        if req.rid in self.seqs or any(r.rid == req.rid for r in self.waiting):
            raise ValueError(f"duplicate request id {req.rid!r}")
        self.check(req)
        self.waiting.append(req)

    def abort(self, rid: str, reason: str = "abort") -> None:
        """Stop a sequence at the next step boundary (a disconnected client, a deadline)."""
        if rid in self.seqs:
            self.seqs[rid].aborted = reason
        else:
            self.waiting = deque(r for r in self.waiting if r.rid != rid)

    def has_work(self) -> bool:
        return bool(self.waiting or self.seqs)

    def run(self, requests: list[GenerationRequest]) -> Iterator[TokenEvent | PromptScores]:
        """Decode the given requests to the end, yielding events as they come (the library's generator)."""
        for r in requests:
            self.add(r)
        while self.has_work():
            yield from self.step()

    # -- one step --------------------------------------------------------------------------------------
    def step(self) -> list[TokenEvent | PromptScores]:
        events: list[TokenEvent | PromptScores] = []
        self._admit(events)
        self._reap_aborted(events)
        if self.seqs:
            finished = self._fuse_and_sample(events)
            self._drop(finished)
            self._advance(events)
        return events

    def _admit(self, events: list) -> None:
        new: list[GenerationRequest] = []
        while self.waiting and len(self.seqs) + len(new) < self.max_batch:
            if (self.seqs or new) and not self._fits(new + [self.waiting[0]]):
                break  # first come, first served: the head of the queue waits for KV cache to free up
            new.append(self.waiting.popleft())
        if new:
            self.kv_reserved = self.kv_need([s.req for s in self.seqs.values()] + new)
        batches: dict[tuple | None, list[GenerationRequest]] = {}
        for r in new:  # plain rows join the shared slots; speculative ones their group
            batches.setdefault(r.plan.group_key() if r.plan.speculative else None, []).append(r)
        for key, reqs in batches.items():
            try:
                prefilled, full = self._prefill(reqs)
            except Exception as err:  # a failing prefill fails only the requests it was for
                events += [_failed(r, err) for r in reqs]
                continue
            if key is None:
                for name, backend, state, rids, logits in prefilled:
                    self._join(name, backend, state, rids, logits)
            for r in reqs:
                self.seqs[r.rid] = self._sequence(r)
                if r.sampling.prompt_logprobs:
                    try:
                        events.append(score_prompt(self.fuser, r, {n: full[(r.rid, n)] for n in r.plan.models()}))
                    except Exception as err:  # fails this request alone; its rows leave at the next reap
                        events.append(_failed(r, err))
                        self.seqs[r.rid].aborted = "done"
                        continue
                if r.sampling.max_tokens == 0:
                    self.seqs[r.rid].aborted = "length"
            if key is not None:
                self._join_speculative(key, reqs, prefilled, events)

    def _join_speculative(self, key: tuple, reqs: list[GenerationRequest], prefilled: list, events: list) -> None:
        """Speculative rows take their first token from the prefill now and join their group's states."""
        going = [i for i, r in enumerate(reqs) if r.sampling.max_tokens > 0 and not self.seqs[r.rid].aborted]
        if not going:
            return
        by_model = {name: (backend.select(state, going), logits[going])
                    for name, backend, state, _, logits in prefilled}
        try:
            group = self.spec_groups.get(key) or SpecGroup(self, reqs[0].plan)
            self.spec_groups[key] = group
            finished = group.join([self.seqs[reqs[i].rid] for i in going], by_model, events)
        except Exception as err:
            finished = [reqs[i].rid for i in going]
            events += [_failed(reqs[i], err) for i in going]
        for rid in finished:
            self.seqs[rid].aborted = "done"

    def _prefill(self, new: list[GenerationRequest]) -> tuple[list, dict]:
        """Every model's prefill of the new requests, before any of them joins the running slots."""
        scoring = any(r.sampling.prompt_logprobs for r in new)
        full: dict[tuple[str, str], torch.Tensor] = {}
        out = []
        for name in dict.fromkeys(n for r in new for n in r.plan.models()):
            users = [r for r in new if name in r.plan.models()]
            backend = self.get_backend(name)
            prompts = [r.prompts[name] for r in users]
            state, logits = backend.prefill(prompts, all_logits=scoring)
            if scoring:
                for i, r in enumerate(users):
                    full[(r.rid, name)] = logits[i, logits.shape[1] - len(prompts[i]):]  # (L_i, V)
                logits = logits[:, -1]
            out.append((name, backend, state, [r.rid for r in users], logits))
        return out, full

    def _sequence(self, r: GenerationRequest) -> Sequence:
        context = min(self.get_backend(n).max_context for n in r.plan.models())
        stopper = StopChecker.for_request(r, self.get_backend(r.plan.base).tokenizer, context)
        seed = r.sampling.seed
        seq = Sequence(r, stopper, make_generator(seed), make_generator(None if seed is None else seed + 1))
        seq.cross_ids = {name: [] for name in r.plan.cross_models()}
        return seq

    def _join(self, name: str, backend, state, rids: list[str], logits: torch.Tensor) -> None:
        slot = self.slots.get(name)
        if slot is None:
            self.slots[name] = Slot(backend, state, rids, logits)
            return
        slot.state = backend.concat([slot.state, state])
        slot.rows += rids
        slot.logits = torch.cat([slot.logits, logits.to(slot.logits.device)], dim=0)

    def _reap_aborted(self, events: list) -> None:
        now = time.monotonic()
        for s in self.seqs.values():
            if s.req.deadline is not None and now > s.req.deadline and not s.aborted:
                s.aborted = "abort"
        gone = [rid for rid, s in self.seqs.items() if s.aborted]
        for rid in gone:
            s = self.seqs[rid]
            if s.aborted == "done":
                continue
            events.append(TokenEvent(rid, None, s.stopper.flush(), finish_reason=s.aborted,
                                     prompt_tokens=len(s.req.prompt_ids), completion_tokens=s.stopper.generated))
        self._drop(gone)

    def _fuse_and_sample(self, events: list) -> list[str]:
        groups: dict[tuple, list[Sequence]] = {}
        for s in self.seqs.values():
            if not s.req.plan.speculative:
                groups.setdefault(s.req.plan.group_key(), []).append(s)
        finished = []
        for group in self.spec_groups.values():
            if not group.rows:
                continue
            try:
                finished += group.round(events, self.spec_stats)
            except Exception as err:  # a failing round ends this group's sequences only
                events += [_failed(s.req, err, s.stopper.generated) for s in group.rows]
                finished += [s.req.rid for s in group.rows]
        for seqs in groups.values():
            try:
                scores, diags = self.fuser.fuse(seqs, self.slots)  # (b, V)
            except Exception as err:  # e.g. a reward model failing: only this group's sequences end
                events += [_failed(s.req, err, s.stopper.generated) for s in seqs]
                finished += [s.req.rid for s in seqs]
                continue
            finished += self._sample_group(seqs, scores, diags, events)
        return finished

    def _sample_group(self, seqs: list[Sequence], scores: torch.Tensor, diags: list | None, events: list):
        sp = [s.req.sampling for s in seqs]
        params = SamplingTensors.build([(p.temperature, p.top_k, p.top_p, p.min_p) for p in sp], scores.device,
                                       [p.logit_bias for p in sp], scores.shape[-1])
        tokens = sample(scores, params, [s.generator for s in seqs])
        # the tokens and their logprobs reach the host in one copy: the stop checks need them, nothing else waits
        host = torch.stack([tokens.double(), token_logprobs(scores, tokens).double()]).tolist()
        token_ids, chosen = [int(t) for t in host[0]], host[1]
        n_top = max((p.logprobs or 0) for p in sp)
        top_ids, top_lp = top_logprobs(scores, n_top) if n_top else (None, None)
        tok = self.get_backend(seqs[0].req.plan.base).tokenizer
        ids, lps = (top_ids.tolist(), top_lp.tolist()) if n_top else (None, None)
        finished = []
        for i, (s, t) in enumerate(zip(seqs, token_ids)):
            ev = s.emit(t, chosen[i], ids and ids[i], lps and lps[i], tok, diags[i] if diags else None)
            events.append(ev)
            if ev.finish_reason:
                finished.append(s.req.rid)
        return finished

    def _drop(self, rids: list[str]) -> None:
        if not rids:
            return
        gone = set(rids)
        for rid in rids:
            self.seqs.pop(rid, None)
        self.kv_reserved = self.kv_need([s.req for s in self.seqs.values()])
        for key in list(self.spec_groups):
            group = self.spec_groups[key]
            group.drop(gone)
            if not group.rows:
                del self.spec_groups[key]
        for name in list(self.slots):
            slot = self.slots[name]
            keep = [i for i, r in enumerate(slot.rows) if r not in gone]
            if len(keep) == len(slot.rows):
                continue
            if not keep:
                del self.slots[name]
                continue
            slot.state = slot.backend.select(slot.state, keep)
            slot.rows = [slot.rows[i] for i in keep]
            slot.logits = slot.logits[keep]

    def _advance(self, events: list) -> None:
        """Every model takes its rows' newly sampled tokens: one forward per model per step. A model whose
        step fails (a remote endpoint down, out of memory) ends the sequences that use it, and only those."""
        failed: list[str] = []
        for names in self._forward_groups():
            slots = [self.slots[n] for n in names]
            try:
                if any(names[0] in self.seqs[r].cross_ids for r in slots[0].rows):
                    self._advance_retokenized(names[0], slots[0])
                    continue
                tokens = [torch.tensor([self.seqs[r].last_token for r in s.rows], dtype=torch.long).view(-1, 1)
                          for s in slots]
                if len(slots) == 1:
                    slots[0].logits = slots[0].backend.decode(slots[0].state, tokens[0])[:, 0]
                    continue
                parts = [(s.backend, s.state, t) for s, t in zip(slots, tokens)]
                for s, logits in zip(slots, slots[0].backend.decode_group(parts)):
                    s.logits = logits[:, 0]
            except Exception as err:
                for name, slot in zip(names, slots):
                    del self.slots[name]  # its state is now unusable; every row in it ends here
                    for rid in slot.rows:
                        s = self.seqs[rid]
                        if not s.aborted:
                            events.append(_failed(s.req, err, s.stopper.generated))
                            s.aborted = "done"
                    failed += slot.rows
        self._drop(failed)

    def _forward_groups(self) -> list[list[str]]:
        """Slot names in groups that advance in one forward: backends sharing weights (`shared_forward`, e.g.
        LoRA adapters over one untuned model) go together unless rows of theirs follow another tokenizer."""
        groups: dict[object, list[str]] = {}
        for name, slot in self.slots.items():
            key = getattr(slot.backend, "shared_forward", None)
            if key is None or any(name in self.seqs[r].cross_ids for r in slot.rows):
                key = ("alone", name)
            groups.setdefault(key, []).append(name)
        return list(groups.values())


    def _advance_retokenized(self, name: str, slot: Slot) -> None:
        """A slot with rows of a cross-tokenizer model (see retokenize.py); other rows take their token."""
        forget, new = [], []
        for rid in slot.rows:
            s = self.seqs[rid]
            f, add = (retokenized_update(slot.backend.tokenizer, self.get_backend(s.req.plan.base).tokenizer, s, name)
                      if name in s.cross_ids else (0, [s.last_token]))
            forget.append(f)
            new.append(add)
        slot.logits = advance_ragged(slot.backend, slot.state, slot.logits, forget, new)


def _failed(req: GenerationRequest, err: Exception, generated: int = 0) -> TokenEvent:
    return TokenEvent(req.rid, None, "", finish_reason="error", error=f"{type(err).__name__}: {err}",
                      prompt_tokens=len(req.prompt_ids), completion_tokens=generated)

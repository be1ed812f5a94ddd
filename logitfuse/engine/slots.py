"""Every model's batched KV state in the running batch: one Slot per model, holding the rows of all the
sequences that use it, so that a model shared by several roles or requests runs once per step.

Rows join after their prefill and leave when their sequence ends; each step every model takes its rows'
new tokens in one forward, models sharing weights (LoRA adapters over one untuned model) in one forward
together, and cross-tokenizer models their re-tokenized text (retokenize.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from logitfuse.backends.base import CausalLM
from logitfuse.backends.remote.retry import RetryLater
from logitfuse.engine.retokenize import advance_ragged_group, retokenized_update
from logitfuse.engine.sequence import Sequence


def shared_forward_groups(models: list[tuple[str, CausalLM]]) -> list[list[str]]:
    """Model names in groups that run in one forward: backends with equal `shared_forward` keys (views of
    one adapter host) together, every other model alone."""
    groups: dict[object, list[str]] = {}
    for name, backend in models:
        key = getattr(backend, "shared_forward", None)
        groups.setdefault(("alone", name) if key is None else key, []).append(name)
    return list(groups.values())


def prefill_all(new: list, get_backend: Callable[[str], CausalLM], prefix_cache=None) -> tuple[list, dict]:
    """Every model's prefill of new requests: (name, backend, state, request ids, last logits) per model,
    and, where a request scores its prompt, (request id, model) -> its prompt's logits (L, V). Views of one
    adapter host prefill in one forward (scoring keeps every position: one model at a time)."""
    scoring = any(r.sampling.prompt_logprobs for r in new)
    full: dict[tuple[str, str], torch.Tensor] = {}
    out = []
    names = list(dict.fromkeys(n for r in new for n in r.plan.models()))
    users = {name: [r for r in new if name in r.plan.models()] for name in names}
    backends = {name: get_backend(name) for name in names}
    for backend in backends.values():
        if prefix_cache is not None and getattr(backend, "prefix_cache", False) is None:
            backend.prefix_cache = prefix_cache
    for group in [[n] for n in names] if scoring else shared_forward_groups(list(backends.items())):
        prompts = [[r.prompts[name] for r in users[name]] for name in group]
        if len(group) > 1:
            results = backends[group[0]].prefill_group([(backends[n], p) for n, p in zip(group, prompts)])
        else:
            results = [backends[group[0]].prefill(prompts[0], all_logits=scoring)]
        for name, ps, (state, logits) in zip(group, prompts, results):
            if scoring:
                for i, r in enumerate(users[name]):
                    full[(r.rid, name)] = logits[i, logits.shape[1] - len(ps[i]):]  # (L_i, V)
                logits = logits[:, -1]
            out.append((name, backends[name], state, [r.rid for r in users[name]], logits))
    return out, full


@dataclass
class Slot:
    """One model's batched state: rows[i] is the sequence id of row i; logits (B_m, V) at each row's end."""

    backend: CausalLM
    state: Any
    rows: list[str]
    logits: torch.Tensor

    def index(self) -> dict[str, int]:
        return {rid: i for i, rid in enumerate(self.rows)}


class ModelSlots(dict[str, Slot]):
    """Model name -> its Slot."""

    def join(self, name: str, backend: CausalLM, state: Any, rids: list[str], logits: torch.Tensor) -> None:
        """Rows prefilled together join the model's batched state (or start it)."""
        slot = self.get(name)
        if slot is None:
            self[name] = Slot(backend, state, rids, logits)
            return
        slot.state = backend.concat([slot.state, state])
        slot.rows += rids
        slot.logits = torch.cat([slot.logits, logits.to(slot.logits.device)], dim=0)

    def drop(self, gone: set[str]) -> None:
        """Rows of ended sequences leave every model's state."""
        for name in list(self):
            slot = self[name]
            keep = [i for i, r in enumerate(slot.rows) if r not in gone]
            if len(keep) == len(slot.rows):
                continue
            if not keep:
                del self[name]
                continue
            slot.state = slot.backend.select(slot.state, keep)
            slot.rows = [slot.rows[i] for i in keep]
            slot.logits = slot.logits[keep]

    def advance(self, seqs: dict[str, Sequence], get_backend: Callable[[str], CausalLM]
                ) -> list[tuple[str, Exception]]:
        """Every model takes its rows' last tokens: one forward per model (or per group of models sharing
        weights). A model whose forward fails loses its state; its rows come back with the error (a remote
        one's RetryLater keeps it: the rows hold their tokens, their logits are read again when due)."""
        failed: list[tuple[str, Exception]] = []
        for names in self._forward_groups(seqs):
            slots = [self[n] for n in names]
            try:
                if any(n in seqs[r].cross_ids for n, s in zip(names, slots) for r in s.rows):
                    self._advance_retokenized(names, slots, seqs, get_backend)
                    continue
                tokens = [torch.tensor([seqs[r].last_token for r in s.rows], dtype=torch.long).view(-1, 1)
                          for s in slots]
                if len(slots) == 1:
                    slots[0].logits = slots[0].backend.decode(slots[0].state, tokens[0])[:, 0]
                    continue
                parts = [(s.backend, s.state, t) for s, t in zip(slots, tokens)]
                for s, logits in zip(slots, slots[0].backend.decode_group(parts)):
                    s.logits = logits[:, 0]
            except RetryLater as err:  # a remote server asks to be called later: its rows are set aside whole
                failed += [(rid, err) for slot in slots for rid in slot.rows]  # (deferral.py)
            except Exception as err:
                for name, slot in zip(names, slots):
                    del self[name]  # its state is now unusable; every row in it ends here
                    failed += [(rid, err) for rid in slot.rows]
        return failed

    def _forward_groups(self, seqs: dict[str, Sequence]) -> list[list[str]]:
        """Slot names in groups that advance in one forward: backends sharing weights (`shared_forward`, e.g.
        LoRA adapters over one untuned model) go together, also when their rows follow another tokenizer
        (a cross-tokenizer adapter expert's tuned and untuned rows read the same re-tokenized text)."""
        return shared_forward_groups([(name, slot.backend) for name, slot in self.items()])

    @staticmethod
    def _advance_retokenized(names: list[str], slots: list[Slot], seqs: dict[str, Sequence],
                             get_backend: Callable[[str], CausalLM]) -> None:
        """Slots with rows of a cross-tokenizer model (see retokenize.py), in one forward where their
        backends share weights; rows of the base's tokenizer take their token."""
        parts = []
        for name, slot in zip(names, slots):
            forget, new = [], []
            for rid in slot.rows:
                s = seqs[rid]
                f, add = (retokenized_update(slot.backend.tokenizer, get_backend(s.req.plan.base).tokenizer, s,
                                             name) if name in s.cross_ids else (0, [s.last_token]))
                forget.append(f)
                new.append(add)
            parts.append((slot.backend, slot.state, slot.logits, forget, new))
        for slot, logits in zip(slots, advance_ragged_group(parts)):
            slot.logits = logits

"""Rollouts for methods that look ahead (Transfer Q*): the engine continues a decode step's rows in a model.

A method never sees the engine's sequences or model slots: it gets a `RowRollouts` for the rows of one step
(methods/base.py's `Rollouts` protocol) and asks for continuations and their texts by model name.
"""

from __future__ import annotations

import torch

from logitfuse.engine.sequence import Sequence
from logitfuse.ops.sampling import SamplingTensors, sample


class RowRollouts:
    """The rows of one decode step, as a method with rollouts sees them."""

    def __init__(self, seqs: list[Sequence], slots: dict) -> None:
        self._seqs, self._slots = seqs, slots

    def continue_rows(self, model: str, first: torch.Tensor, copies: int, steps: int) -> torch.Tensor:
        """Each row's KV prefix in `model`, repeated `copies` times (row-major), continued from first
        (b * copies,) for `steps` more tokens sampled at temperature 1, each row with its own rollout
        generator. Returns (b * copies, 1 + steps) token ids."""
        slot = self._slots[model]
        where = slot.index()
        state = slot.backend.select(slot.state, [where[s.req.rid] for s in self._seqs for _ in range(copies)])
        gens = [s.rollout_generator for s in self._seqs for _ in range(copies)]
        out = [first]
        logits = slot.backend.decode(state, first.view(-1, 1))[:, 0]
        params = SamplingTensors.build([(1.0, -1, 1.0, 0.0)] * first.numel(), logits.device)
        for i in range(steps):
            nxt = sample(logits, params, gens).cpu()
            out.append(nxt)
            if i + 1 < steps:
                logits = slot.backend.decode(state, nxt.view(-1, 1))[:, 0]
        return torch.stack(out, dim=1)

    def texts(self, model: str, branches: torch.Tensor, copies: int) -> list[str]:
        """Each row's text so far in `model` (its prompt there, then the tokens generated) followed by each of
        its `copies` branches (b * copies, m), a branch cut after the model's eos token."""
        tok = self._slots[model].backend.tokenizer
        eos = tok.eos_token_id
        prefixes = [s.req.prompts[model] + s.stopper.ids_generated() for s in self._seqs for _ in range(copies)]
        texts = []
        for prefix, branch in zip(prefixes, branches.tolist()):
            if eos is not None and eos in branch:
                branch = branch[: branch.index(eos) + 1]
            texts.append(tok.decode(prefix + branch, skip_special_tokens=True))
        return texts

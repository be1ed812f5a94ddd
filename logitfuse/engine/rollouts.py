"""Rollouts for methods that look ahead (Transfer Q*): the engine continues a decode step's rows in a model.

A method never sees the engine's sequences or model slots: it gets a `RowRollouts` for the rows of one step
(methods/base.py's `Rollouts` protocol) and asks for continuations and their texts by model name. The same
rollouts serve a host engine (vLLM's logits processor, logitfuse/vllm/rows.py): `SlotRollouts` takes the rows
by id, with their generators and text prefixes, from whoever keeps them.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from logitfuse.engine.sequence import Sequence
from logitfuse.ops.sampling import SamplingTensors, sample

SKIP_CHUNK = 1 << 22  # tokens' worth of draws skipped per call (bounds the memory of skip_draws)


class SlotRollouts:
    """The rows of one decode step (ids into the model slots), as a method with rollouts sees them.

    generators: each row's rollout generator; prefixes(model): each row's ids so far in that model (its prompt
    there, then the tokens generated)."""

    def __init__(self, slots, rids: list[str], generators: list[torch.Generator],
                 prefixes: Callable[[str], list[list[int]]]) -> None:
        self._slots, self._rids, self._gens, self._prefixes = slots, rids, generators, prefixes

    def continue_rows(self, model: str, first: torch.Tensor, copies: int, steps: int) -> torch.Tensor:
        """Each row's KV prefix in `model`, repeated `copies` times (row-major), continued from first
        (b * copies,) for `steps` more tokens sampled at temperature 1, each row with its own rollout
        generator. Returns (b * copies, 1 + steps) token ids."""
        slot = self._slots[model]
        where = slot.index()
        state = slot.backend.select(slot.state, [where[r] for r in self._rids for _ in range(copies)])
        gens = [g for g in self._gens for _ in range(copies)]
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
        prefixes = [p for p in self._prefixes(model) for _ in range(copies)]
        texts = []
        for prefix, branch in zip(prefixes, branches.tolist()):
            if eos is not None and eos in branch:
                branch = branch[: branch.index(eos) + 1]
            texts.append(tok.decode(prefix + branch, skip_special_tokens=True))
        return texts


class RowRollouts(SlotRollouts):
    """The engine's sequences of one decode step: each row's own rollout generator and its text so far."""

    def __init__(self, seqs: list[Sequence], slots: dict) -> None:
        super().__init__(slots, [s.req.rid for s in seqs], [s.rollout_generator for s in seqs],
                         lambda model: [s.req.prompts[model] + s.stopper.ids_generated() for s in seqs])


def skip_draws(generator: torch.Generator, draws: int, width: int) -> None:
    """Advance a rollout generator past `draws` draws of `sample` over `width` tokens, as if they had been
    made: a draw at temperature 1 is torch.multinomial of one row, whose use of the generator depends on the
    row's width only, not on its probabilities (a row that rejoins a host engine mid-way, vLLM's processor)."""
    rows = max(1, SKIP_CHUNK // max(width, 1))
    while draws > 0:
        n = min(draws, rows)
        torch.multinomial(torch.ones(n, width), 1, generator=generator)
        draws -= n

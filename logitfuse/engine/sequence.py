"""One running sequence of the engine, and how a chosen token becomes its event."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from logitfuse.engine.request import GenerationRequest, TokenEvent, TopLogprob
from logitfuse.engine.stopping import StopChecker, token_piece


@dataclass
class Sequence:
    req: GenerationRequest
    stopper: StopChecker
    generator: torch.Generator
    rollout_generator: torch.Generator
    last_token: int = -1
    aborted: str | None = None
    diagnostics: list = field(default_factory=list)
    generated: list[int] = field(default_factory=list)  # base token ids emitted so far
    cross_ids: dict[str, list[int]] = field(default_factory=dict)  # cross-tokenizer model -> its ids of them
    controls: Any = None  # token_controls.RowControls, built at the first sampled token when the row has any

    def emit(self, token: int, logprob: float, top_ids: list[int] | None, top_lps: list[float] | None,
             tokenizer, diagnostics: dict | None = None, influence: dict | None = None) -> TokenEvent:
        """Take the chosen token: stop checks, text delta, and the event with the top-N the request asked for
        (top_ids/top_lps: the row's most likely tokens, at least as many as asked) and its influence entry."""
        self.last_token = token
        self.generated.append(token)
        delta, reason = self.stopper.add(token)
        top = None
        k = self.req.sampling.logprobs
        if k is not None:
            top = [TopLogprob(j, token_piece(tokenizer, j), v) for j, v in zip(top_ids[:k], top_lps[:k])] if k else []
        return TokenEvent(self.req.rid, token, delta, logprob, top, diagnostics, reason,
                          prompt_tokens=len(self.req.prompt_ids), completion_tokens=self.stopper.generated,
                          influence=influence)

"""One accumulator of engine events: a sequence's text, tokens, logprobs, counts, diagnostics and error.

The library (`LogitFuse.generate`), the batch command and the HTTP service's response shapes all read
finished sequences from a `CompletionOutput`, so a sequence means the same thing everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from logitfuse.engine.request import PromptScores, TokenEvent, TopLogprob


@dataclass
class CompletionOutput:
    rid: str
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[list[TopLogprob] | None] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    prompt_scores: PromptScores | None = None
    diagnostics: list[dict] = field(default_factory=list)  # per generated token, when the method reports any
    error: str | None = None  # set when the sequence ended with finish_reason "error"
    influence: list[dict] | None = None  # per generated token, when the request asked (docs/influence.md)

    def add(self, ev: TokenEvent | PromptScores) -> None:
        if isinstance(ev, PromptScores):
            self.prompt_scores = ev
            return
        self.text += ev.text
        if ev.token_id is not None:
            self.token_ids.append(ev.token_id)
            self.logprobs.append(ev.logprob)
            self.top_logprobs.append(ev.top)
            if ev.diagnostics:
                self.diagnostics.append(ev.diagnostics)
            if ev.influence is not None:
                self.influence = self.influence if self.influence is not None else []
                self.influence.append(ev.influence)
        self.prompt_tokens, self.completion_tokens = ev.prompt_tokens, ev.completion_tokens
        self.finish_reason = ev.finish_reason or self.finish_reason
        if ev.finish_reason == "error":
            self.error = ev.error or "engine error"

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    @property
    def reported_finish_reason(self) -> str | None:
        """OpenAI's reading: an aborted sequence (a deadline, a shutdown) ended at a length; an error is
        no finish."""
        reason = self.finish_reason
        return None if reason == "error" else "length" if reason == "abort" else reason


"""What the engine takes in and gives out: sampling parameters, requests, events.

Plain data, validated once at the boundary (`SamplingParams.check`) with messages naming the field.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from logitfuse.errors import InvalidRequest
from logitfuse.methods.plan import FusionPlan


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int | None = 16  # None: up to the rest of the context window (LogitFuse.requests resolves it)
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = -1  # -1 or 0 = off
    min_p: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None  # top-N fused logprobs per generated token (0 = only the chosen token's)
    prompt_logprobs: bool = False  # score the prompt (echo + logprobs)
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias in [-100, 100]) added before sampling

    def check(self, max_logprobs: int = 20) -> SamplingParams:
        """Raise InvalidRequest naming the first out-of-range field; return self."""
        checks = [
            (self.max_tokens is None or self.max_tokens >= 0, "max_tokens", "must be >= 0", self.max_tokens),
            (self.temperature >= 0 and self.temperature <= 100, "temperature", "must be in [0, 100]",
             self.temperature),
            (0 < self.top_p <= 1, "top_p", "must be in (0, 1]", self.top_p),
            (self.top_k >= -1, "top_k", "must be -1, 0 (off) or a positive integer", self.top_k),
            (0 <= self.min_p <= 1, "min_p", "must be in [0, 1]", self.min_p),
            (self.logprobs is None or 0 <= self.logprobs <= max_logprobs, "logprobs",
             f"must be in [0, {max_logprobs}]", self.logprobs),
            (all(isinstance(s, str) and s for s in self.stop), "stop", "must be non-empty strings", self.stop),
            (all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids), "stop_token_ids",
             "must be non-negative token ids", self.stop_token_ids),
            (self.seed is None or -(2**63) <= self.seed < 2**63, "seed", "must fit in 64 bits", self.seed),
            (all(isinstance(t, int) and t >= 0 and -100 <= b <= 100 for t, b in self.logit_bias), "logit_bias",
             "must map token ids to biases in [-100, 100]", dict(self.logit_bias)),
        ]
        for ok, name, rule, value in checks:
            if not ok:
                raise InvalidRequest(f"{name} {rule}, got {value!r}", param=name)
        return self


def logit_bias_pairs(mapping: dict | None) -> tuple[tuple[int, float], ...]:
    """OpenAI's {"token id": bias} as (id, bias) pairs sorted by id; a key that is not a token id or a bias
    that is not a finite number is bad input."""
    out = []
    for key, value in (mapping or {}).items():
        try:
            tok = int(key)
        except (TypeError, ValueError):
            raise InvalidRequest(f"logit_bias keys must be token ids, got {key!r}", "logit_bias") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise InvalidRequest(f"logit_bias values must be numbers in [-100, 100], got {value!r}", "logit_bias")
        out.append((tok, float(value)))
    return tuple(sorted(out))


@dataclass
class GenerationRequest:
    """One sequence to decode. prompts maps each model name of the plan to its own prompt token ids
    (roles may format the prompt differently, e.g. a chat template for the tuned expert); `prompt_ids`
    is the base's, used for scoring, echo and usage."""

    rid: str
    plan: FusionPlan
    prompts: dict[str, list[int]]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    deadline: float | None = None  # time.monotonic() after which the sequence ends with finish_reason "abort"

    @property
    def prompt_ids(self) -> list[int]:
        return self.prompts[self.plan.base]


@dataclass(frozen=True)
class TopLogprob:
    token_id: int
    token: str
    logprob: float


@dataclass(frozen=True)
class PromptScores:
    """Fused log-probability of every prompt token (the first is None), for echo + logprobs."""

    rid: str
    token_ids: list[int]
    tokens: list[str]
    logprobs: list[float | None]
    top: list[list[TopLogprob] | None]


@dataclass(frozen=True)
class TokenEvent:
    """One generated token, or the end of a sequence (finish_reason set; token_id may be None when the
    sequence ends without a new token, e.g. max_tokens = 0)."""

    rid: str
    token_id: int | None
    text: str  # detokenised text delta; stop strings are never included
    logprob: float | None = None
    top: list[TopLogprob] | None = None
    diagnostics: dict | None = None
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None

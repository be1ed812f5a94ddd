"""What the engine takes in and gives out: sampling parameters, requests, events.

Plain data, validated once at the boundary (`SamplingParams.check`) with messages naming the field.
"""

from __future__ import annotations

import math
import traceback
from dataclasses import dataclass, field

from logitfuse.errors import InvalidRequest
from logitfuse.methods.plan import FusionPlan

MAX_REPETITION_PENALTY = 100  # beyond it every seen token is as good as banned; vLLM asks only > 0


STRUCTURED_KINDS = ("json", "json_object", "regex", "choice", "grammar")


@dataclass(frozen=True)
class StructuredSpec:
    """A constraint on the generated text: a JSON schema (json; json_object is any JSON object), a regular
    expression, one of a list of strings (choice), or a Lark / GBNF grammar. `spec` is the schema (JSON text,
    keys sorted: one cache entry per schema), the pattern, the choices (a JSON list) or the grammar; `field`
    is the request field it came from, named in errors."""

    kind: str
    spec: str
    field: str = "structured_outputs"


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
    # -- penalties and token controls (vLLM's semantics; ops/penalties.py) --
    presence_penalty: float = 0.0  # in [-2, 2]: minus p for every token already in the output
    frequency_penalty: float = 0.0  # in [-2, 2]: minus f times the token's count in the output
    repetition_penalty: float = 1.0  # > 0: seen (prompt or output) tokens' scores divided (> 0) or multiplied
    min_tokens: int = 0  # stop tokens (eos, stop_token_ids) and stop strings wait until this many tokens
    bad_words: tuple[str, ...] = ()  # words never generated (each word's last token banned after the rest)
    allowed_token_ids: tuple[int, ...] | None = None  # only these tokens (None: all)
    include_stop_str_in_output: bool = False  # keep the stop string that ended the text
    skip_special_tokens: bool = True  # leave special tokens out of the text
    structured: StructuredSpec | None = None  # a grammar the output must follow (engine/grammar.py)

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
            (-2 <= self.presence_penalty <= 2, "presence_penalty", "must be in [-2, 2]", self.presence_penalty),
            (-2 <= self.frequency_penalty <= 2, "frequency_penalty", "must be in [-2, 2]", self.frequency_penalty),
            (0 < self.repetition_penalty <= MAX_REPETITION_PENALTY, "repetition_penalty",
             f"must be in (0, {MAX_REPETITION_PENALTY}]", self.repetition_penalty),
            (isinstance(self.min_tokens, int) and self.min_tokens >= 0 and (
                self.max_tokens is None or self.min_tokens <= self.max_tokens), "min_tokens",
             "must be >= 0 and at most max_tokens", self.min_tokens),
            (all(isinstance(w, str) and w.strip() for w in self.bad_words), "bad_words",
             "must be non-empty strings", self.bad_words),
            (self.allowed_token_ids is None or (len(self.allowed_token_ids) > 0 and all(
                isinstance(t, int) and t >= 0 for t in self.allowed_token_ids)), "allowed_token_ids",
             "must be a non-empty list of token ids", self.allowed_token_ids),
            (self.structured is None or self.structured.kind in STRUCTURED_KINDS, "structured_outputs",
             f"kind must be one of {', '.join(STRUCTURED_KINDS)}", self.structured and self.structured.kind),
        ]
        for ok, name, rule, value in checks:
            if not ok:
                raise InvalidRequest(f"{name} {rule}, got {value!r}", param=name)
        if self.structured is not None and self.ignore_eos:
            raise InvalidRequest("ignore_eos cannot be combined with structured outputs: the text ends with the "
                                 "end-of-sequence token once the grammar is complete", "ignore_eos")
        return self

    def controlled(self) -> bool:
        """Whether anything beyond logit_bias changes the scores before sampling (penalties, token controls, a
        grammar): such rows are processed by engine/token_controls.py."""
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0
                    or self.min_tokens or self.bad_words or self.allowed_token_ids is not None
                    or self.structured is not None)


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
class ErrorDetail:
    """What ended a sequence with an error, for the log line of the answer that reports it: the exception's
    type name (or a fault's name, for a fault that raised nothing) and its formatted traceback; `param` where
    the request itself was at fault (an InvalidRequest met while decoding, as a grammar at a dead end): the
    field it names, answered as a 400, not a 500."""

    cause: str
    trace: str | None = None
    param: str | None = None

    @classmethod
    def of(cls, err: BaseException) -> ErrorDetail:
        """Taken where the exception is caught, while its traceback is at hand."""
        return cls(type(err).__name__, "".join(traceback.format_exception(type(err), err, err.__traceback__)),
                   err.param if isinstance(err, InvalidRequest) else None)


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
    error_detail: ErrorDetail | None = None  # with finish_reason "error"
    influence: dict | None = None  # what fusion changed at this token, when the request asks (engine/influence.py)

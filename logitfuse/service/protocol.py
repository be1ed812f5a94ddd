"""Request schemas of the OpenAI-compatible API: fields in OpenAI's documented order, extensions marked.

Each request converts itself into the engine's SamplingParams; range checks live there, once.
Unknown top-level fields are ignored, as the OpenAI API does, and listed in the `X-Ignored-Fields` response
header, except near-misses of a field of the endpoint (`fusoin`, `max_token`), which are a 400 naming both,
and known fields that would change the output without being implemented (REFUSED), a 400 naming them.
"""

from __future__ import annotations

import json
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, model_validator
from pydantic_core import PydanticCustomError

from logitfuse.engine.output_format import GUIDED, structured_spec
from logitfuse.engine.request import SamplingParams, logit_bias_pairs
from logitfuse.errors import InvalidRequest
from logitfuse.methods.params import FusionParams
from logitfuse.ops.field_names import ignored_fields

# Every field of the OpenAI and vLLM request schemas is implemented (a field of the request classes below),
# refused when it would change the output (REFUSED: a 400 naming it unless its value is one of the neutral
# ones listed), or output-neutral (TOLERATED: read by nobody, listed in X-Ignored-Fields). Fields of the other
# endpoint count as refused (a completion's `messages`, a chat's `suffix`). tests/service/test_field_lists.py
# pins the three lists.
TOLERATED = frozenset("""
    metadata store safety_identifier prompt_cache_key service_tier parallel_tool_calls
    request_id priority cache_salt kv_transfer_params
""".split())
_OFF: tuple = (None,)
REFUSED: dict[str, tuple] = {
    # OpenAI
    "audio": _OFF, "function_call": (None, "none"), "functions": (None, []), "modalities": (None, ["text"]),
    "prediction": _OFF, "reasoning_effort": _OFF, "verbosity": _OFF, "web_search_options": _OFF,
    # vLLM
    "use_beam_search": (None, False), "length_penalty": (None, 1, 1.0), "spaces_between_special_tokens": (None, True),
    "truncate_prompt_tokens": _OFF, "prompt_logprobs": _OFF, "logits_processors": (None, []),
    "add_generation_prompt": (None, True), "continue_final_message": (None, False), "add_special_tokens": _OFF,
    "chat_template": _OFF, "chat_template_kwargs": (None, {}), "documents": (None, []),
    "mm_processor_kwargs": (None, {}), "structural_tag": _OFF, "guided_whitespace_pattern": _OFF,
    "vllm_xargs": (None, {}), "return_token_ids": (None, False),
}
# fields of one endpoint refused on the other (any value but null, or the neutral ones)
CHAT_ONLY: dict[str, tuple] = {"messages": _OFF, "tools": (None, []), "tool_choice": (None, "none"),
                               "max_completion_tokens": _OFF, "top_logprobs": _OFF}
COMPLETIONS_ONLY: dict[str, tuple] = {"prompt": _OFF, "suffix": (None, ""), "best_of": (None, 1),
                                      "echo": (None, False)}


def refused_field(data: Any, refused: dict[str, tuple]) -> tuple[str, Any] | None:
    """The first field of the body that is refused with a value other than its neutral ones."""
    if not isinstance(data, dict):
        return None
    for key, value in data.items():
        if key in refused and not any((value == ok and type(value) is type(ok)) or value is ok
                                      for ok in refused[key]):
            return key, value
    return None


def lone_surrogate(value: Any, path: str = "body") -> tuple[str, str] | None:
    """(field path, code point) of the first string in a JSON value holding a lone UTF-16 surrogate."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as err:
            return path, f"U+{ord(value[err.start]):04X}"
    elif isinstance(value, dict):
        for k, v in value.items():
            key = str(k).encode("utf-8", "backslashreplace").decode("utf-8")  # a key may hold one itself
            field = key if path == "body" else f"{path}.{key}"
            if found := (lone_surrogate(k, field) if isinstance(k, str) else None) or lone_surrogate(v, field):
                return found
    elif isinstance(value, list):
        for i, v in enumerate(value):
            if found := lone_surrogate(v, f"{path}[{i}]"):
                return found
    return None


class _Body(BaseModel):
    """A request body: every string must be valid Unicode (a lone surrogate escape such as JSON's backslash-u
    D800 is not, and no tokenizer or response encoder takes it)."""

    @model_validator(mode="before")
    @classmethod
    def _valid_unicode(cls, data: Any) -> Any:
        if (found := lone_surrogate(data)) is not None:
            raise PydanticCustomError("lone_surrogate", "{field}: holds a lone UTF-16 surrogate ({code}), which is "
                                      "not valid Unicode", {"field": found[0], "code": found[1]})
        return data


STRUCTURED_FIELDS = ("response_format", "structured_outputs", *GUIDED, "guided_decoding_backend")


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Sampling(_Body):
    model_config = ConfigDict(extra="ignore")

    model: str
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    max_tokens: int | None = None
    n: int = Field(default=1, ge=1, le=64)
    presence_penalty: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = None
    top_p: float | None = None
    user: str | None = None
    # -- extensions (vLLM) --
    top_k: int | None = None
    min_p: float | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    return_tokens_as_token_ids: bool = False  # logprobs name tokens "token_id:N" (exact where strings collide)
    repetition_penalty: float | None = None
    min_tokens: int = 0
    bad_words: list[str] | None = None
    allowed_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    response_format: dict[str, Any] | None = None  # OpenAI's on chat; vLLM takes it on completions too
    structured_outputs: dict[str, Any] | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    guided_decoding_backend: str | None = None  # its options (":disable-any-whitespace") change JSON output
    # -- extensions (logitfuse) --
    fusion: FusionParams | None = None
    _ignored: list[str] = PrivateAttr(default_factory=list)
    _refused: tuple[str, Any] | None = PrivateAttr(default=None)
    _other_endpoint: ClassVar[dict[str, tuple]] = {}

    @model_validator(mode="wrap")
    @classmethod
    def _unknown_fields(cls, data: Any, handler: Any) -> _Sampling:
        """A near-miss of one of our fields is a 400 naming it; other unknown fields are kept to be reported."""
        refused = REFUSED | cls._other_endpoint
        ignored = ignored_fields(data, list(cls.model_fields), TOLERATED | set(refused))
        out = handler(data)
        out._ignored = ignored
        out._refused = refused_field(data, refused)
        return out

    def ignored_fields(self) -> list[str]:
        """The top-level fields of the request body that the server did not read."""
        return self._ignored

    def ignored_header(self) -> dict[str, str] | None:
        """`X-Ignored-Fields: a, b` when fields were ignored (names escaped to ASCII, at most 1000 characters)."""
        if not self._ignored:
            return None
        names = ", ".join(json.dumps(n)[1:-1] for n in self._ignored)
        return {"X-Ignored-Fields": names[:1000]}

    def _sampling(self, logprobs: int | None, prompt_logprobs: bool, max_logprobs: int) -> SamplingParams:
        if self._refused is not None:
            name, value = self._refused
            if name in self._other_endpoint:
                raise InvalidRequest(f"{name} is not a field of this endpoint (it belongs to the other of "
                                     "/v1/completions and /v1/chat/completions)", name)
            raise InvalidRequest(f"{name} is not supported (got {json.dumps(value)[:100]}): it would change the "
                                 "output and this server does not implement it", name)
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        return SamplingParams(
            max_tokens=self.max_tokens,  # None: the rest of the context window, as vLLM
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=-1 if self.top_k is None else self.top_k,
            min_p=0.0 if self.min_p is None else self.min_p,
            seed=self.seed, stop=stop, stop_token_ids=tuple(self.stop_token_ids or ()), ignore_eos=self.ignore_eos,
            logprobs=logprobs, prompt_logprobs=prompt_logprobs, logit_bias=logit_bias_pairs(self.logit_bias),
            presence_penalty=self.presence_penalty or 0.0, frequency_penalty=self.frequency_penalty or 0.0,
            repetition_penalty=1.0 if self.repetition_penalty is None else self.repetition_penalty,
            min_tokens=self.min_tokens, bad_words=tuple(self.bad_words or ()),
            allowed_token_ids=None if self.allowed_token_ids is None else tuple(self.allowed_token_ids),
            include_stop_str_in_output=self.include_stop_str_in_output, skip_special_tokens=self.skip_special_tokens,
            structured=structured_spec({k: getattr(self, k) for k in STRUCTURED_FIELDS}),
        ).check(max_logprobs)


class CompletionRequest(_Sampling):
    _other_endpoint: ClassVar[dict[str, tuple]] = CHAT_ONLY
    prompt: str | list[str] | list[int] | list[list[int]]
    best_of: int | None = None
    echo: bool = False
    logprobs: int | None = None
    suffix: str | None = None

    def prompts(self) -> list[str | list[int]]:
        """One entry per prompt: text or token ids."""
        p = self.prompt
        if isinstance(p, str) or (p and all(isinstance(x, int) for x in p)):
            out = [p]
        else:
            out = list(p)
        if not out or any(len(x) == 0 for x in out):
            raise InvalidRequest("prompt must be a non-empty string or token list", "prompt")
        return out

    def to_sampling_params(self, max_logprobs: int) -> SamplingParams:
        if self.best_of not in (None, 1, self.n):
            raise InvalidRequest("best_of is not supported (only null or equal to n)", "best_of")
        if self.suffix:
            raise InvalidRequest("suffix is not supported", "suffix")
        if self.max_tokens == 0 and not self.echo:
            raise InvalidRequest("max_tokens must be >= 1 unless echo is true", "max_tokens")
        return self._sampling(self.logprobs, self.echo and self.logprobs is not None, max_logprobs)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str:
        """The message's text; content parts must be text (the models here read nothing else)."""
        if isinstance(self.content, list):
            for part in self.content:
                if part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise InvalidRequest(f"content part of type {part.get('type')!r} is not supported: the models "
                                         "served here read text only ({\"type\": \"text\", \"text\": ...})",
                                         "messages")
            return "".join(part["text"] for part in self.content)
        return self.content or ""


def message_dicts(messages: list[ChatMessage]) -> list[dict[str, str]]:
    """Messages as the chat template reads them: role and text."""
    return [{"role": m.role, "content": m.text()} for m in messages]


class ChatCompletionRequest(_Sampling):
    _other_endpoint: ClassVar[dict[str, tuple]] = COMPLETIONS_ONLY
    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: bool = False
    top_logprobs: int | None = None
    max_completion_tokens: int | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None

    def to_sampling_params(self, max_logprobs: int) -> SamplingParams:
        if self.tools and self.tool_choice != "none":
            raise InvalidRequest("tools are not supported (no function calling); omit them or set tool_choice "
                                 "to \"none\"", "tools")
        if self.max_tokens is None and self.max_completion_tokens is not None:
            self.max_tokens = self.max_completion_tokens
        if self.max_tokens == 0:
            raise InvalidRequest("max_tokens must be >= 1", "max_tokens")
        if self.top_logprobs is not None and not self.logprobs:
            raise InvalidRequest("top_logprobs needs logprobs: true", "top_logprobs")
        if self.top_logprobs is not None and not 0 <= self.top_logprobs <= max_logprobs:
            raise InvalidRequest(f"top_logprobs must be in [0, {max_logprobs}], got {self.top_logprobs}",
                                 "top_logprobs")
        n_top = (self.top_logprobs or 0) if self.logprobs else None
        return self._sampling(n_top, False, max_logprobs)

    def message_dicts(self) -> list[dict[str, str]]:
        return message_dicts(self.messages)


class TokenizeRequest(_Body):
    """vLLM's /tokenize: a prompt, or chat messages, as the base model of `model` would read them."""

    model_config = ConfigDict(extra="ignore")

    model: str
    prompt: str | None = None
    messages: list[ChatMessage] | None = None

    def source(self) -> tuple[str | None, list[dict[str, str]] | None]:
        if (self.prompt is None) == (self.messages is None):
            raise InvalidRequest("give exactly one of prompt or messages", "prompt")
        if self.prompt is not None and not self.prompt:
            raise InvalidRequest("prompt must be a non-empty string", "prompt")
        if self.messages is not None and not self.messages:
            raise InvalidRequest("messages must not be empty", "messages")
        return self.prompt, message_dicts(self.messages) if self.messages else None


class DetokenizeRequest(_Body):
    model_config = ConfigDict(extra="ignore")

    model: str
    tokens: list[int]

"""Incremental detokenisation and stop conditions for one sequence.

Text is produced with prefix offsets (decode a short window, emit what is new) so each token costs
O(window), and text that could be the start of a stop string is held back until it is known not to be.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from logitfuse.backends.base import CausalLM, Tokenizer
    from logitfuse.engine.request import GenerationRequest
    from logitfuse.methods.plan import FusionPlan


class StopChecker:
    include_stop = False  # include_stop_str_in_output: keep the stop string that ended the text
    skip_special = True  # skip_special_tokens: leave special tokens out of the text
    min_tokens = 0  # stop strings are looked for once more tokens than this are generated (stop ids: masked)

    def __init__(self, tokenizer: Tokenizer, stop: tuple[str, ...] = (), stop_token_ids: tuple[int, ...] = (),
                 eos_ids: frozenset[int] = frozenset(), max_tokens: int = 16, max_total: int | None = None,
                 prompt_ids: list[int] | None = None) -> None:
        self.tokenizer = tokenizer
        self.stop = stop
        self.stop_ids = set(stop_token_ids) | set(eos_ids)  # the request's ids and the plan's end ids
        self.max_tokens = max_tokens
        prompt_ids = prompt_ids or []
        self.room = None if max_total is None else max_total - len(prompt_ids)  # tokens the context has left
        # The window starts a few prompt tokens back so the first token keeps its leading space.
        self.ids: list[int] = list(prompt_ids[-4:])
        self.generated = 0
        self.text = ""  # all text decoded so far (stop strings cut off once found)
        self.sent = 0  # characters of self.text already emitted
        self._prefix = 0  # token offsets of the decode window
        self._read = len(self.ids)
        self._hold = max((len(s) for s in stop), default=1) - 1

    def _decode_new(self) -> str:
        """Text that the newest token completes (empty while it is an unfinished multi-byte character)."""
        dec = self.tokenizer.decode
        before = dec(self.ids[self._prefix:self._read], skip_special_tokens=self.skip_special)
        after = dec(self.ids[self._prefix:], skip_special_tokens=self.skip_special)
        if after.endswith("\ufffd") or len(after) <= len(before):
            return ""
        self._prefix, self._read = self._read, len(self.ids)
        return after[len(before):]

    def add(self, token_id: int) -> tuple[str, str | None]:
        """Account for one generated token; return (text delta to emit, finish reason or None)."""
        self.ids.append(token_id)
        self.generated += 1
        if token_id in self.stop_ids:
            return self.flush(), "stop"
        self.text += self._decode_new()
        for s in self.stop if self.generated > self.min_tokens else ():  # vLLM: stop strings after min_tokens
            cut = self.text.find(s, max(0, self.sent - len(s)))
            if cut != -1:
                self.text = self.text[:cut + (len(s) if self.include_stop else 0)]
                return self.flush(), "stop"
        if self.generated >= self.max_tokens or (self.room is not None and self.generated >= self.room):
            return self.flush(), "length"
        safe = len(self.text) - self._hold if self.stop else len(self.text)
        delta = self.text[self.sent:max(safe, self.sent)]
        self.sent += len(delta)
        return delta, None

    @classmethod
    def for_request(cls, req: GenerationRequest, tokenizer: Tokenizer, max_context: int,
                    eos_ids: frozenset[int] = frozenset()) -> StopChecker:
        """The stop conditions of a GenerationRequest, detokenising with the base model's tokenizer; eos_ids
        are the plan's end ids (plan_stop_ids), left out under ignore_eos."""
        sp = req.sampling
        checker = cls(tokenizer, sp.stop, sp.stop_token_ids, frozenset() if sp.ignore_eos else eos_ids,
                      sp.max_tokens, max_context, req.prompt_ids)
        checker.include_stop, checker.skip_special = sp.include_stop_str_in_output, sp.skip_special_tokens
        checker.min_tokens = sp.min_tokens
        return checker

    def ids_generated(self) -> list[int]:
        return self.ids[len(self.ids) - self.generated:] if self.generated else []

    def flush(self) -> str:
        """Everything not yet emitted (the sequence is ending)."""
        delta = self.text[self.sent:]
        self.sent = len(self.text)
        return delta


def plan_stop_ids(plan: FusionPlan, get_backend: Callable[[str], CausalLM],
                  own: Callable[[str], frozenset[int]]) -> frozenset[int]:
    """The ids that end a fused sequence, in the base's vocabulary: the base's own end ids and those of every
    tuned expert (a base and its instruct sibling name different ones: `<|endoftext|>` vs `<|im_end|>`).
    An expert sharing the base's vocabulary keeps its ids; a cross-tokenizer expert's are mapped by token
    text, and skipped where the base has no such token. own(model) -> that model's end ids."""
    base = get_backend(plan.base).tokenizer
    ids = set(own(plan.base))
    for e in plan.experts:
        theirs = own(e.tuned)
        if not e.cross:
            ids |= {i for i in theirs if i < len(base)}
            continue
        texts = get_backend(e.tuned).tokenizer.convert_ids_to_tokens(sorted(theirs))
        for text in texts:
            i = base.convert_tokens_to_ids(text) if text is not None else None
            if i is not None and i != base.unk_token_id and base.convert_ids_to_tokens(i) == text:
                ids.add(i)
    return frozenset(ids)


def token_piece(tokenizer: Tokenizer, token_id: int) -> str:
    """The text a token adds after other text, its leading space kept (how OpenAI's logprobs name tokens,
    so that a completion's tokens join into its text). A lone decode drops that space for tokenizers that
    mark word starts (SentencePiece's "▁"), so the token is decoded after an anchor token and the anchor's
    text removed."""
    anchor = _anchor(tokenizer)
    return tokenizer.decode([anchor, token_id])[len(tokenizer.decode([anchor])):]


def _anchor(tokenizer: Tokenizer) -> int:
    anchor = getattr(tokenizer, "_logitfuse_anchor", None)
    if anchor is None:
        anchor = tokenizer.encode("a", add_special_tokens=False)[-1]
        with contextlib.suppress(AttributeError):  # remembered on the tokenizer where it takes attributes
            tokenizer._logitfuse_anchor = anchor
    return anchor


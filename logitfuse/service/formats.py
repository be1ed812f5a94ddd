"""Per-choice accumulation of engine events into the OpenAI response shapes (completions and chat).

`add(event)` returns the choice part of a streaming chunk (or None) and keeps what the final response needs.
"""

from __future__ import annotations

from logitfuse.engine.output import CompletionOutput
from logitfuse.engine.request import PromptScores, TokenEvent
from logitfuse.engine.stopping import token_piece


class Choice:
    def __init__(self, index: int, tokenizer, first_of_prompt: bool, ids_as_tokens: bool = False,
                 influence: bool = False) -> None:
        self.index = index
        self.influence = influence  # the request asked for per-token influence (docs/influence.md)
        self.ids_as_tokens = ids_as_tokens  # vLLM's return_tokens_as_token_ids: tokens named "token_id:N"
        self.tok = tokenizer
        self.first_of_prompt = first_of_prompt
        self.text = ""  # what the response shows: the echoed prompt, then the generated text
        self.seq = CompletionOutput(str(index))  # the sequence itself, accumulated as everywhere else

    @property
    def finish_reason(self) -> str | None:
        return self.seq.reported_finish_reason

    @property
    def prompt_tokens(self) -> int:
        return self.seq.prompt_tokens

    @property
    def completion_tokens(self) -> int:
        return self.seq.completion_tokens

    @property
    def error(self) -> str | None:
        return self.seq.error

    @property
    def diagnostics(self) -> list[dict]:
        return self.seq.diagnostics

    def opening(self) -> dict | None:
        return None

    def _account(self, ev: TokenEvent) -> None:
        self.seq.add(ev)

    def with_influence(self, out: dict, ev: TokenEvent | None = None) -> dict:
        """out with the choice's influence entries: the event's in a chunk, all of them in the final answer;
        nothing unless the request asked."""
        if ev is not None:
            return out | {"influence": [ev.influence]} if ev.influence is not None else out
        return out | {"influence": self.seq.influence or []} if self.influence else out

    def token_str(self, token_id: int, text: str | None = None) -> str:
        if self.ids_as_tokens:
            return f"token_id:{token_id}"
        return token_piece(self.tok, token_id) if text is None else text


class CompletionChoice(Choice):
    """Legacy completions: text, and logprobs as {tokens, token_logprobs, top_logprobs, text_offset}."""

    def __init__(self, index: int, tokenizer, first_of_prompt: bool, echo_text: str | None, want_logprobs: bool,
                 scoring: bool, ids_as_tokens: bool = False, influence: bool = False) -> None:
        super().__init__(index, tokenizer, first_of_prompt, ids_as_tokens, influence)
        self.echo_text, self.scoring = echo_text, scoring
        self.logprobs = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []} \
            if want_logprobs else None

    def opening(self) -> dict | None:
        if self.echo_text is None or self.scoring:
            return None
        self.text += self.echo_text
        return self._delta(self.echo_text, None)

    def _delta(self, text: str, logprobs: dict | None) -> dict:
        return {"index": self.index, "text": text, "logprobs": logprobs, "finish_reason": self.finish_reason}

    def _append(self, tokens: list[str], lps: list, tops: list) -> dict:
        part = {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": []}
        offset = len(self.text)
        for t in tokens:
            part["text_offset"].append(offset)
            offset += len(t)
        for k in part:
            self.logprobs[k] += part[k]
        return part

    def add(self, ev: TokenEvent | PromptScores) -> dict | None:
        if isinstance(ev, PromptScores):
            names = [self.token_str(i, t) for i, t in zip(ev.token_ids, ev.tokens)]
            tops = [None if top is None else {self.token_str(t.token_id, t.token): t.logprob for t in top} | {tok: lp}
                    for top, tok, lp in zip(ev.top, names, ev.logprobs)]
            part = self._append(names, ev.logprobs, tops) if self.logprobs is not None else None
            self.text += self.echo_text or ""
            return self._delta(self.echo_text or "", part)
        self._account(ev)
        part = None
        if ev.token_id is not None and self.logprobs is not None:
            tok = self.token_str(ev.token_id)
            top = {self.token_str(t.token_id, t.token): t.logprob for t in (ev.top or [])} | {tok: ev.logprob}
            part = self._append([tok], [ev.logprob], [top])
        self.text += ev.text
        if not ev.text and part is None and not ev.finish_reason and ev.influence is None:
            return None
        return self.with_influence(self._delta(ev.text, part), ev)

    def final(self) -> dict:
        return self.with_influence({"index": self.index, "text": self.text, "logprobs": self.logprobs,
                                    "finish_reason": self.finish_reason})


class ChatChoice(Choice):
    """Chat: message {role, content}; logprobs {content: [{token, logprob, bytes, top_logprobs}]}."""

    def __init__(self, index: int, tokenizer, first_of_prompt: bool, want_logprobs: bool,
                 ids_as_tokens: bool = False, influence: bool = False) -> None:
        super().__init__(index, tokenizer, first_of_prompt, ids_as_tokens, influence)
        self.content: list[dict] | None = [] if want_logprobs else None

    def opening(self) -> dict:
        return {"index": self.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                "finish_reason": None}

    def add(self, ev: TokenEvent | PromptScores) -> dict | None:
        if isinstance(ev, PromptScores):
            return None
        self._account(ev)
        entry = None
        if ev.token_id is not None and self.content is not None:
            tok = self.token_str(ev.token_id)
            entry = {"token": tok, "logprob": ev.logprob, "bytes": list(tok.encode()),
                     "top_logprobs": [{"token": self.token_str(t.token_id, t.token), "logprob": t.logprob,
                                       "bytes": list(t.token.encode())} for t in (ev.top or [])]}
            self.content.append(entry)
        self.text += ev.text
        if not ev.text and entry is None and not ev.finish_reason and ev.influence is None:
            return None
        delta = {"content": ev.text} if ev.text else {}
        return self.with_influence({"index": self.index, "delta": delta,
                                    "logprobs": {"content": [entry]} if entry else None,
                                    "finish_reason": self.finish_reason}, ev)

    def final(self) -> dict:
        return self.with_influence({"index": self.index, "message": {"role": "assistant", "content": self.text},
                                    "logprobs": {"content": self.content} if self.content is not None else None,
                                    "finish_reason": self.finish_reason})


"""A causal LM behind an OpenAI-compatible completions endpoint: a large base served by vLLM, by another
logitfuse server, or by llama.cpp's llama-server or llama-cpp-python (docs/remote-servers.md), fused with
local experts.

The endpoint returns only the top-N log-probabilities of each next token, so this backend's logits hold
those N values (the server's own numbers) and -inf everywhere else. Prompts go out as token ids
from a local copy of the model's tokenizer (which also checks that the experts share its vocabulary). What
the server can do is probed at load (backends/remote_probe.py): a server without token-id prompts gets the
text, checked to re-tokenize to the same ids; one whose logprobs name no ids has its token texts mapped back
through the tokenizer; one without exact echo verifies k-token blocks one position per call.

A row's state is its token ids: the remote server owns the KV cache (vLLM's prefix caching makes each
step's resend of the sequence cheap). Rows of a step go in one call where the server takes a list of prompts,
else concurrently. A refused call is retried after a wait on the calling thread, or, within the engine's
steps (retries_deferred), not waited for: it raises RetryLater, and `refresh` reads the rows' logits again
when they are due.

Fusion widens the top-N restriction to the union of supports (ops/candidates.py): the fuser asks
`score_tokens` for the base's log-probability of the candidates outside the top N, in one more round of
calls per step and only when there are such candidates.
"""

from __future__ import annotations

import logging
import os
import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from logitfuse.backends.base import token_texts, tokenizer_vocab_info
from logitfuse.backends.remote.retry import RETRY_STATUS, RetryLater, deferring, retries_deferred, retry_wait
from logitfuse.backends.remote.wire import PROMPTS_PER_CALL, Capabilities, Top, first_difference, positions
from logitfuse.errors import RemoteError
from logitfuse.ops.vocab import VocabInfo

log = logging.getLogger(__name__)
# a 5xx that says the request itself cannot be served (llama-cpp-python answers a token-id prompt with a 500
# carrying a validation error, llama-server an echo with "Only no echo is supported"): retrying cannot help
_REFUSAL = re.compile(r"supported|validation error|input should be|must be", re.IGNORECASE)


@dataclass
class RemoteState:
    rows: list[list[int]]  # every row's visible token ids


class RemoteCausalLM:
    """The backend protocol (backends/base.py) over HTTP. No prompt scoring (echo of a whole prompt's
    distributions is not needed by decoding and is refused by the engine's request checks)."""

    can_score_prompt = False  # an endpoint returns top-N logprobs of the next token only
    remote = True

    def __init__(self, name: str, spec, tokenizer, chat_template: bool = False, client=None) -> None:
        import httpx

        self.name, self.tokenizer, self.chat_template = name, tokenizer, chat_template
        self.model, self.top_n, self.retries = spec.model, spec.top_logprobs, spec.retries
        self.max_wait = spec.retry_max_wait  # seconds: the cap on any wait before a retry
        self.max_context = spec.max_context
        self.candidates = spec.candidates  # the union of supports (engine/fused_scores.py)
        self.logits_width = len(tokenizer)
        self.device = torch.device("cpu")
        headers = {}
        if spec.api_key_env:
            key = os.environ.get(spec.api_key_env)
            if not key:
                raise ValueError(f"models.{name}.remote.api_key_env: environment variable {spec.api_key_env} "
                                 "is not set")
            headers["Authorization"] = f"Bearer {key}"
        self.url = spec.url.rstrip("/")
        self.root = self.url[:-3] if self.url.endswith("/v1") else self.url  # where /tokenize lives
        self.client = client or httpx.Client(base_url=self.url, timeout=spec.timeout, headers=headers)
        self.pool = ThreadPoolExecutor(max_workers=spec.max_concurrency, thread_name_prefix=f"remote-{name}")
        self.caps = Capabilities()
        self._by_text: dict[str, int] | None = None
        self._lead: list[int] = self.encode("")  # what the tokenizer adds to any text itself (a BOS)

    @classmethod
    def load(cls, name: str, spec, tokenizer_path: str, chat_template: bool = False,
             tokenizers=None) -> RemoteCausalLM:
        """Load the local tokenizer, check that the endpoint serves `spec.model` and probe what it can do (a
        clear error at start-up rather than at the first request)."""
        from logitfuse.backends.tokenizers import TokenizerStore

        try:
            tok = (tokenizers or TokenizerStore()).get(tokenizer_path)
            lm = cls(name, spec, tok, chat_template)
            with retries_deferred(False):  # a load waits for its server, wherever it happens
                lm.check_served()
                lm.probe()
        except RemoteError:
            raise
        except Exception as err:  # a failed load inside a request is this model unavailable, not a crash
            raise RemoteError(f"model {name!r}: cannot load: {type(err).__name__}: {err}") from err
        return lm

    def check_served(self) -> None:
        try:
            r = self.client.get("/models")
        except Exception as err:
            raise RemoteError(f"model {self.name!r}: cannot reach {self.url}/models: {err}") from None
        if r.status_code != 200:
            raise RemoteError(f"model {self.name!r}: {self.url}/models answered {r.status_code}: {r.text[:200]}",
                              r.status_code)
        served = [m.get("id") for m in r.json().get("data", [])]
        if self.model not in served:
            raise RemoteError(f"model {self.name!r}: {self.url} does not serve {self.model!r}; it serves "
                              f"{', '.join(map(str, served)) or '(nothing)'}")

    def probe(self) -> Capabilities:
        from logitfuse.backends.remote.probe import probe

        caps = probe(self)
        log.info("model %s: %s serves %s (%s)", self.name, self.url, self.model, caps.summary())
        return caps

    @property
    def can_verify_blocks(self) -> bool:
        """Whether a k-token block costs one call (speculative verification needs exact echo)."""
        return self.caps.exact_echo

    # -- protocol ----------------------------------------------------------------------------------------
    def vocab_info(self, with_texts: bool = False) -> VocabInfo:
        return tokenizer_vocab_info(self.name, self.tokenizer, self.logits_width, with_texts)

    def param_bytes(self) -> int:
        return 0  # the weights live on the remote server

    def kv_bytes_per_token(self) -> int:
        return 0  # so does the cache

    def rows(self, state: RemoteState) -> int:
        return len(state.rows)

    def prefill(self, prompts: list[list[int]], all_logits: bool = False) -> tuple[RemoteState, torch.Tensor]:
        if all_logits:
            raise RemoteError(f"model {self.name!r} is remote: prompt scoring is not available")
        state = RemoteState([list(p) for p in prompts])
        return state, self._next(state.rows, 1)[:, 0]

    def decode(self, state: RemoteState, tokens: torch.Tensor) -> torch.Tensor:
        tokens = tokens.view(len(state.rows), -1)
        for row, new in zip(state.rows, tokens.tolist()):
            row.extend(new)
        return self._next(state.rows, tokens.shape[1])

    def select(self, state: RemoteState, rows: list[int]) -> RemoteState:
        return RemoteState([list(state.rows[i]) for i in rows])

    def concat(self, states: list[RemoteState]) -> RemoteState:
        return RemoteState([list(r) for s in states for r in s.rows])

    def refresh(self, state: RemoteState) -> torch.Tensor:
        """(B, V): every row's logits after its last token, read again (after a prefill or decode that raised
        RetryLater: the rows already hold their tokens)."""
        return self._next(state.rows, 1)[:, 0]

    def map(self, fn, items: list) -> list:
        """fn over items on the request threads, concurrently, each in the calling thread's retry mode."""
        defer = deferring()

        def call(item):
            with retries_deferred(defer):
                return fn(item)

        return list(self.pool.map(call, items))

    def forget_last(self, state: RemoteState, counts: list[int]) -> None:
        for row, n in zip(state.rows, counts):
            if n > 0:
                del row[len(row) - n:]

    # -- steps ---------------------------------------------------------------------------------------------
    def _next(self, rows: list[list[int]], k: int) -> torch.Tensor:
        """(B, k, V): the top-N log-probabilities after each of every row's last k tokens, -inf elsewhere."""
        if k == 1 and len(rows) > 1 and self.caps.multi_prompt:
            return torch.stack([self._row(tops[-1:]) for tops in self._batched(rows)])
        return torch.stack(self.map(lambda ids: self._one(ids, k), rows))

    def _batched(self, rows: list[list[int]]) -> list[list[Top]]:
        """Each row's top entries after its last token, the rows in calls of several prompts each."""
        out: list[list[Top]] = []
        for start in range(0, len(rows), PROMPTS_PER_CALL):
            chunk = rows[start:start + PROMPTS_PER_CALL]
            for ids, choice in zip(chunk, self.ask_many(chunk)):
                tops = positions(choice.get("logprobs"))
                if not tops or tops[-1] is None:  # e.g. an empty answer at a greedy EOS: read it alone
                    tops = self._tops(ids, 1, echo=False)
                out.append(tops)
        return out

    def score_tokens(self, state: RemoteState, rows: list[int], tokens: list[list[int]]) -> list[list[float]] | None:
        """The base's own log-probability of each tokens[j][i] after row rows[j]'s sequence (one more round of
        calls), or None where the server cannot give it (the probe found no way: the caller estimates)."""
        from logitfuse.backends.remote.scoring import score

        return score(self, [state.rows[r] for r in rows], tokens) if self.caps.scoring else None

    def _row(self, tops: list[Top]) -> torch.Tensor:
        out = torch.full((len(tops), self.logits_width), float("-inf"))
        for i, top in enumerate(tops):
            for key, lp in top[: self.top_n]:
                tid = self.token_id(key)
                if tid is not None and tid < self.logits_width:
                    out[i, tid] = lp
        return out

    def _one(self, ids: list[int], k: int) -> torch.Tensor:
        if k > 1 and not self.caps.exact_echo:  # one position per call, oldest first
            return torch.cat([self._one(ids[:len(ids) - k + 1 + j], 1) for j in range(k)])
        # the distributions after the earlier new tokens are prompt positions of an echo; an entry may also
        # hold the position's actual token: _row keeps the top N, so a block verified in one call sees exactly
        # what one-token steps would
        return self._row(self._tops(ids, k, echo=k > 1))

    def _tops(self, ids: list[int], k: int, echo: bool) -> list[Top]:
        choice = self.ask(ids, echo=echo)["choices"][0]
        tops = positions(choice.get("logprobs"))
        if len(tops) >= k and all(t is not None for t in tops[-k:]):
            return tops[-k:]
        if not echo and self.caps.exact_echo:  # e.g. llama-cpp-python's answer when its greedy token is EOS
            return self._tops(ids, k, echo=True)
        why = " (its answer when the greedy token is EOS, and its echo is not exact)" if self.caps.eos_empty else ""
        raise RemoteError(f"model {self.name!r}: {self.url} returned no top_logprobs for the last {k} "
                          f"positions{why}")

    def token_id(self, key: int | str) -> int | None:
        if isinstance(key, int):
            return key
        if self._by_text is None:  # a server that names no ids: map decoded strings back
            texts = token_texts(self.tokenizer)
            self._by_text = {texts[i]: i for i in range(len(texts) - 1, -1, -1)}  # lowest id wins on a tie
            if self.tokenizer.eos_token_id is not None:
                # llama-cpp-python names special tokens "" (its detokenizer drops them): EOS is the one that
                # matters to decoding, the others share the one dict key and cannot be told apart
                self._by_text[""] = self.tokenizer.eos_token_id
        return self._by_text.get(key)

    # -- HTTP ----------------------------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text).input_ids)

    def _body(self, prompt: list[int] | str | list[list[int]], echo: bool, extra: dict) -> dict:
        """A completion request for one token with the top-N logprobs and neutral sampling."""
        body = {"model": self.model, "prompt": prompt, "max_tokens": 1, "logprobs": self.top_n,
                "return_tokens_as_token_ids": True, "n": 1, **self.caps.neutral, **extra}
        if echo:
            body["echo"] = True
        return body

    def ask(self, ids: list[int], echo: bool = False, retry: bool = True, **extra) -> dict:
        """One completion call of one token after `ids`."""
        return self.post(self._body(ids if self.caps.token_prompts else self._as_text(ids), echo, extra), retry)

    def ask_many(self, prompts: list[list[int]], echo: bool = False, retry: bool = True, **extra) -> list[dict]:
        """One call with several token-id prompts (servers that take a list): their choices in prompt order."""
        if echo:  # only the prompt tokens' own logprobs are read
            extra = {"logprobs": min(self.top_n, 1), **extra}
        choices = self.post(self._body(prompts, echo, extra), retry).get("choices") or []
        if len(choices) != len(prompts):
            raise RemoteError(f"model {self.name!r}: {self.url} answered {len(prompts)} prompts with "
                              f"{len(choices)} choices")
        return sorted(choices, key=lambda c: c.get("index", 0))

    def _as_text(self, ids: list[int]) -> str:
        """The text whose tokenization is exactly `ids` (for servers that take no token-id prompts)."""
        lead = self._lead
        text = self.tokenizer.decode(ids[len(lead):] if ids[:len(lead)] == lead else ids,
                                     clean_up_tokenization_spaces=False)
        if (back := self.encode(text)) != ids:
            raise RemoteError(f"model {self.name!r}: {self.url} takes no token-id prompts, and this sequence's "
                              f"text re-tokenizes differently ({first_difference(ids, back)})")
        return text

    def get_json(self, path: str, body: dict) -> dict | None:
        """POST to a path under the server root ('/...') or the API root; the JSON answer, or None on any
        failure (for optional endpoints such as /tokenize; never retried)."""
        import httpx

        try:
            r = self.client.post(self.root + path if path.startswith("/") else f"{self.url}/{path}", json=body)
            return r.json() if r.status_code == 200 else None
        except (httpx.HTTPError, ValueError):
            return None

    def post(self, body: dict, retry: bool = True) -> dict:
        import httpx

        last, status = "", None
        for attempt in range(self.retries + 1 if retry else 1):
            asked = None
            try:
                r = self.client.post("/completions", json=body)
            except httpx.TransportError as err:
                last, status = f"{type(err).__name__}: {err}", None
            else:
                if r.status_code == 200:
                    return r.json()
                last, status = f"{r.status_code}: {r.text[:300]}", r.status_code
                if r.status_code not in RETRY_STATUS or _REFUSAL.search(r.text[:2000]):
                    break  # the request itself is wrong or refused: retrying cannot help
                asked = r.headers.get("retry-after")
            if retry and attempt < self.retries:
                if deferring():  # the caller retries when it likes: waiting here would hold up its other work
                    raise RetryLater(f"model {self.name!r}: {self.url}/completions answered {last}", status,
                                     self.name, asked)
                delay = retry_wait(attempt, asked, self.max_wait, base=0.5)
                log.warning("model %s: %s/completions failed (%s), retrying in %.1f s", self.name, self.url, last,
                            delay)
                time.sleep(delay)  # never within the engine's steps (retries_deferred: see above)
        raise RemoteError(f"model {self.name!r}: {self.url}/completions answered {last}", status)

"""A causal LM behind an OpenAI-compatible completions endpoint: a large base served by vLLM (or by another
logitfuse server), fused with local experts.

The endpoint returns only the top-N log-probabilities of each next token, so this backend's logits hold
those N values and -inf everywhere else: fused decoding over a remote base is restricted, at every step,
to the base's top-N tokens (the usual setting of proxy-tuning through an API). Prompts go out as token ids
from a local copy of the model's tokenizer (which also checks that the experts share its vocabulary), and
`return_tokens_as_token_ids` (a vLLM extension, also spoken by logitfuse) brings ids back; from a server
without it, returned token strings are mapped back through the tokenizer.

A row's state is its token ids: the remote server owns the KV cache (vLLM's prefix caching makes each
step's resend of the sequence cheap). Rows of a step are requested concurrently.
"""

from __future__ import annotations

import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from logitfuse.backends.base import token_texts, tokenizer_vocab_info
from logitfuse.vocab import VocabInfo

log = logging.getLogger(__name__)


class RemoteError(RuntimeError):
    """The remote endpoint failed or answered something this backend cannot use."""


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
        self.max_context = spec.max_context
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
        self.client = client or httpx.Client(base_url=self.url, timeout=spec.timeout, headers=headers)
        self.pool = ThreadPoolExecutor(max_workers=spec.max_concurrency, thread_name_prefix=f"remote-{name}")
        self._by_text: dict[str, int] | None = None

    @classmethod
    def load(cls, name: str, spec, tokenizer_path: str, chat_template: bool = False) -> RemoteCausalLM:
        """Load the local tokenizer and check that the endpoint serves `spec.model` (a clear error at start-up
        rather than at the first request)."""
        from transformers import AutoTokenizer

        lm = cls(name, spec, AutoTokenizer.from_pretrained(tokenizer_path), chat_template)
        try:
            r = lm.client.get("/models")
        except Exception as err:
            raise RemoteError(f"model {name!r}: cannot reach {lm.url}/models: {err}") from None
        if r.status_code != 200:
            raise RemoteError(f"model {name!r}: {lm.url}/models answered {r.status_code}: {r.text[:200]}")
        served = [m.get("id") for m in r.json().get("data", [])]
        if spec.model not in served:
            raise RemoteError(f"model {name!r}: {lm.url} does not serve {spec.model!r}; it serves "
                              f"{', '.join(map(str, served)) or '(nothing)'}")
        lm.check_tokenizer()
        return lm

    PROBE = "The quick brown fox, 12 + 30 = 42; naïve café!"

    def check_tokenizer(self) -> None:
        """The server's tokenization of a probe text (echoed with logprobs) must be the local tokenizer's."""
        local = list(self.tokenizer(self.PROBE).input_ids)
        body = {"model": self.model, "prompt": self.PROBE, "max_tokens": 1, "echo": True, "logprobs": 0,
                "temperature": 0, "return_tokens_as_token_ids": True}
        tokens = ((self._post(body)["choices"][0].get("logprobs") or {}).get("tokens") or [])[:-1]
        ids = [self._token_id(t) for t in tokens]
        if ids != local:
            raise RemoteError(f"model {self.name!r}: the local tokenizer does not match {self.url}'s "
                              f"{self.model!r}: a probe text is {local[:12]} locally but {ids[:12]} there")

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

    def forget_last(self, state: RemoteState, counts: list[int]) -> None:
        for row, n in zip(state.rows, counts):
            if n > 0:
                del row[len(row) - n:]

    # -- HTTP ----------------------------------------------------------------------------------------------
    def _next(self, rows: list[list[int]], k: int) -> torch.Tensor:
        """(B, k, V): the top-N log-probabilities after each of every row's last k tokens, -inf elsewhere."""
        return torch.stack(list(self.pool.map(lambda ids: self._one(ids, k), rows)))

    def _one(self, ids: list[int], k: int) -> torch.Tensor:
        body = {"model": self.model, "prompt": ids, "max_tokens": 1, "temperature": 0, "logprobs": self.top_n,
                "return_tokens_as_token_ids": True}
        if k > 1:
            body["echo"] = True  # the distributions after the earlier new tokens are prompt positions
        choice = self._post(body)["choices"][0]
        tops = (choice.get("logprobs") or {}).get("top_logprobs") or []
        if len(tops) < k or any(t is None for t in tops[-k:]):
            raise RemoteError(f"model {self.name!r}: {self.url} returned no top_logprobs for the last {k} "
                              "positions")
        out = torch.full((k, self.logits_width), float("-inf"))
        for i, top in enumerate(tops[-k:]):
            # the entry may also hold the position's actual token; keep the top N so a block verified in one
            # call sees exactly what one-token steps would
            for key, lp in sorted(top.items(), key=lambda kv: -kv[1])[: self.top_n]:
                tid = self._token_id(key)
                if tid is not None and tid < self.logits_width:
                    out[i, tid] = lp
        return out

    def _token_id(self, key: str) -> int | None:
        if key.startswith("token_id:"):
            return int(key[len("token_id:"):])
        if self._by_text is None:  # a server without return_tokens_as_token_ids: map decoded strings back
            texts = token_texts(self.tokenizer)
            self._by_text = {texts[i]: i for i in range(len(texts) - 1, -1, -1)}  # lowest id wins on a tie
        return self._by_text.get(key)

    def _post(self, body: dict) -> dict:
        import httpx

        delay, last = 0.5, ""
        for attempt in range(self.retries + 1):
            try:
                r = self.client.post("/completions", json=body)
            except httpx.TransportError as err:
                last = f"{type(err).__name__}: {err}"
            else:
                if r.status_code == 200:
                    return r.json()
                last = f"{r.status_code}: {r.text[:300]}"
                if r.status_code != 429 and r.status_code < 500:
                    break  # the request itself is wrong: retrying cannot help
                delay = float(r.headers.get("retry-after", delay))
            if attempt < self.retries:
                log.warning("model %s: %s/completions failed (%s), retrying in %.1f s", self.name, self.url, last,
                            delay)
                time.sleep(delay)
                delay *= 2
        raise RemoteError(f"model {self.name!r}: {self.url}/completions answered {last}")

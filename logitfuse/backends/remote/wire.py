"""What OpenAI-compatible servers send back, read into one form: the top log-probabilities at each position
of a completion answer, keyed by token id where the server names ids and by token text where it does not.

Shapes read (`choice["logprobs"]` of a /completions answer):
- OpenAI's legacy form (vLLM, logitfuse, llama-cpp-python): `{"tokens": [...], "top_logprobs": [{key: lp} |
  None, ...]}`, keys being token texts or, with vLLM's `return_tokens_as_token_ids`, `"token_id:N"`;
- the chat form that llama.cpp's llama-server uses for completions too: `{"content": [{"id", "token",
  "bytes", "logprob", "top_logprobs": [{"id", "token", "bytes", "logprob"}, ...]}, ...]}`, ids exact.
And the token-id answers of the /tokenize endpoints (vLLM, logitfuse and llama-server at the server root;
llama-cpp-python at /extras/tokenize, also at the root).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

PROMPTS_PER_CALL = 64  # prompts in one call of several (a step's rows, or its candidates to score)
Top = list[tuple[int | str, float]]  # one position: (token id or token text, log-probability), best first


@dataclass(frozen=True)
class Capabilities:
    """What a server was found to do by the probe at load (backends/remote_probe.py)."""

    dialect: str = "openai"  # "openai" (vLLM, logitfuse), "llama-server", "llama-cpp-python"
    token_prompts: bool = True  # accepts prompts as token-id lists (else the text is sent, checked to re-tokenize)
    ids_exact: bool = True  # its logprobs name token ids (chat form or token_id:N), not only texts
    exact_echo: bool = True  # echo's prompt-position distributions equal one-position answers
    eos_empty: bool = False  # answers whose greedy token is EOS carry no logprobs
    scoring: str = ""  # how the base's log-probability of a chosen token is read: "allowed" (allowed_token_ids,
    # the answer's own raw logprob: vLLM, logitfuse), "echo" (the prompt logprob of the sequence extended by the
    # token), "" (it cannot be: an estimate is used, docs/algorithms.md)
    multi_prompt: bool = False  # a list of prompts in one call gets one choice each (a step's rows in one call)
    neutral: dict = field(default_factory=dict)  # sampling fields sent with every request

    def summary(self) -> str:
        no = [n for n, v in (("token-id prompts", self.token_prompts), ("token ids in logprobs", self.ids_exact),
                             ("exact echo", self.exact_echo)) if not v]
        eos = "; no logprobs when its greedy token is EOS" if self.eos_empty else ""
        how = {"allowed": "allowed_token_ids", "echo": "echo"}.get(self.scoring)
        score = f"; scores chosen tokens by {how}" if how else "; cannot score chosen tokens"
        many = "; several prompts per call" if self.multi_prompt else ""
        return f"{self.dialect}: " + (f"without {', '.join(no)}" if no else "every capability") + eos + score + many


def positions(logprobs: dict | None) -> list[Top | None]:
    """Every position's top entries, in order (None where the server gives none, e.g. a first prompt token)."""
    if not logprobs:
        return []
    if isinstance(logprobs.get("content"), list):  # llama-server's chat form
        return [_sorted((e["id"], e["logprob"]) for e in (c.get("top_logprobs") or []))
                if c.get("top_logprobs") is not None else None for c in logprobs["content"]]
    out: list[Top | None] = []
    for top in logprobs.get("top_logprobs") or []:
        out.append(None if top is None else _sorted((_key(k), v) for k, v in top.items()))
    return out


def prompt_logprob(choice: dict, position: int) -> float | None:
    """The log-probability an echo answer gives the prompt token at `position` (None where it gives none)."""
    lp = choice.get("logprobs") or {}
    if isinstance(lp.get("content"), list):
        entries = lp["content"]
        value = entries[position].get("logprob") if position < len(entries) else None
    else:
        values = lp.get("token_logprobs") or []
        value = values[position] if position < len(values) else None
    if value is None:
        return None
    return -math.inf if value < -1e30 else float(value)


def generated(choice: dict) -> tuple[list[int | str], str | None]:
    """The tokens an answer generated (ids in the chat form, texts otherwise) and its finish_reason."""
    lp = choice.get("logprobs") or {}
    if isinstance(lp.get("content"), list):
        return [c["id"] for c in lp["content"]], choice.get("finish_reason")
    return [_key(t) if isinstance(t, str) else t for t in lp.get("tokens") or []], choice.get("finish_reason")


def _key(key: str) -> int | str:
    return int(key[len("token_id:"):]) if key.startswith("token_id:") else key


def _sorted(pairs) -> Top:
    # llama-server writes a zero probability as the lowest float (JSON has no -inf)
    clean = [(k, -math.inf if v is None or v < -1e30 else float(v)) for k, v in pairs]
    return sorted(clean, key=lambda kv: -kv[1])


def tokenize_requests(model: str, text: str) -> list[tuple[str, str, dict]]:
    """(dialect, path relative to the server root or API root, body) of each known /tokenize, tried in order;
    paths starting with '/' are under the server root, others under the API root."""
    return [("openai", "/tokenize", {"model": model, "prompt": text}),
            ("llama-server", "/tokenize", {"content": text, "add_special": True, "parse_special": True}),
            ("llama-cpp-python", "/extras/tokenize", {"model": model, "input": text})]


def tokenize_ids(answer: dict) -> list[int] | None:
    """The ids of a /tokenize answer (`tokens` as ints; llama-server's with_pieces form as objects)."""
    tokens = answer.get("tokens") if isinstance(answer, dict) else None
    if not isinstance(tokens, list):
        return None
    ids = [t["id"] if isinstance(t, dict) else t for t in tokens]
    return ids if all(isinstance(i, int) for i in ids) else None


def first_difference(local: list[int], remote: list[int]) -> str:
    """Where two id lists part, with a few ids of context on each side."""
    i = next((j for j, (a, b) in enumerate(zip(local, remote)) if a != b), min(len(local), len(remote)))
    lo = max(0, i - 2)
    return (f"{len(local)} tokens locally, {len(remote)} there; they differ from position {i}: "
            f"...{local[lo:i + 3]} locally, ...{remote[lo:i + 3]} there")

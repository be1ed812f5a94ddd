"""The backend protocol: what the engine needs of a causal LM, local or remote.

A backend owns its KV state. The engine only asks for prefills of token-id prompts, one- or k-token
decode steps on a state, and batch surgery on states (select rows, concatenate, drop positions), so a
remote model or another runtime can implement the same calls.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any, Protocol

import torch

from logitfuse.ops.vocab import VocabInfo


class Tokenizer(Protocol):
    """The tokenizer calls the library makes (a `transformers` tokenizer has them all)."""

    eos_token_id: int | None
    chat_template: str | None  # None: the tokenizer has no chat template
    bos_token: str | None  # special-token texts, for vocabulary alignment
    eos_token: str | None
    unk_token: str | None

    def __call__(self, text: str) -> Any:
        """Text with the tokenizer's special tokens; `.input_ids` holds the ids."""
        ...

    def __len__(self) -> int: ...

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str: ...

    def apply_chat_template(self, conversation: list[dict], add_generation_prompt: bool, tokenize: bool) -> Any:
        """Token ids of a chat (a list, or a mapping holding `input_ids`)."""
        ...

    def get_vocab(self) -> dict[str, int]: ...


class CausalLM(Protocol):
    name: str
    tokenizer: Tokenizer
    device: torch.device
    max_context: int  # prompt + generated tokens the model accepts
    logits_width: int  # size of the last dimension of the logits it returns
    chat_template: bool  # this role formats chat prompts with its tokenizer's template
    # capabilities
    can_score_prompt: bool  # prefill(all_logits=True) gives the scores of every prompt position
    remote: bool  # scores come from another server (top-N log-probabilities; no KV cache held here)
    can_verify_blocks: bool  # decode(state, k tokens) costs one call (speculative verification relies on it)

    def vocab_info(self, with_texts: bool = False) -> VocabInfo: ...

    def param_bytes(self) -> int: ...

    def kv_bytes_per_token(self) -> int:
        """Bytes of cache one position of one row holds here (0 where the cache lives elsewhere)."""
        ...

    def prefill(self, prompts: list[list[int]], all_logits: bool = False) -> tuple[Any, torch.Tensor]:
        """Run ragged prompts; return (state, logits): (B, V) at the last token, or (B, L, V) for every
        position of the left-padded batch when all_logits (row i's tokens are its last len_i positions)."""
        ...

    def decode(self, state: Any, tokens: torch.Tensor) -> torch.Tensor:
        """Append tokens (B, k) to every row of the state; return float32 logits (B, k, V)."""
        ...

    def select(self, state: Any, rows: list[int]) -> Any:
        """The state of the given rows only, in that order (rows may repeat)."""
        ...

    def concat(self, states: list[Any]) -> Any:
        """One state holding the rows of all the given states, in order."""
        ...

    def forget_last(self, state: Any, counts: list[int]) -> None:
        """Make the last counts[i] visible positions of row i invisible (rejected speculative tokens, a
        cross-tokenizer model's re-tokenized suffix); positions hidden before do not count."""
        ...

    def rows(self, state: Any) -> int: ...


def end_ids(backend: CausalLM) -> frozenset[int]:
    """The ids that end a model's own sequences: its tokenizer's eos, and every `eos_token_id` of its
    generation config (an int or a list: instruct models list their end-of-turn token there), read from the
    loaded model or, for a model without weights here (a remote one), from generation_config.json beside its
    tokenizer."""
    tok = backend.tokenizer
    ids = {tok.eos_token_id} if getattr(tok, "eos_token_id", None) is not None else set()
    config = getattr(getattr(backend, "model", None), "generation_config", None)
    if config is not None:
        eos = getattr(config, "eos_token_id", None)
    else:
        eos = _generation_config_eos(getattr(tok, "name_or_path", None))
    ids |= {eos} if isinstance(eos, int) else {i for i in eos or () if isinstance(i, int)}
    return frozenset(i for i in ids if i >= 0)


def _generation_config_eos(folder: str | None) -> int | list | None:
    path = Path(folder) / "generation_config.json" if folder else None
    if path is None or not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8")).get("eos_token_id")
    except (OSError, ValueError, AttributeError):
        return None


def tokenizer_vocab_info(name: str, tokenizer: Tokenizer, logits_width: int, with_texts: bool = False) -> VocabInfo:
    """What vocabulary alignment needs of a model with a `transformers` tokenizer (texts: decoded ids)."""
    special = {k: getattr(tokenizer, k, None) for k in ("bos_token", "eos_token", "unk_token")}
    added = {i for i, t in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items() if getattr(t, "special", 0)}
    added |= set(getattr(tokenizer, "all_special_ids", ()) or ())
    return VocabInfo(name, vocab_of(tokenizer), special, logits_width, token_texts(tokenizer) if with_texts else None,
                     frozenset(added))


def vocab_of(tokenizer: Tokenizer) -> dict[str, int]:
    """The tokenizer's token -> id map, built once per tokenizer (kept on it where it takes attributes): for a
    262k vocabulary, building it is a C call of a large fraction of a second that holds the interpreter lock,
    stalling every engine thread (backends/tokenizers.py builds it when it reads the tokenizer). Read-only."""
    vocab = getattr(tokenizer, "_logitfuse_vocab", None)
    if vocab is None:
        vocab = tokenizer.get_vocab()
        with contextlib.suppress(AttributeError):
            tokenizer._logitfuse_vocab = vocab
    return vocab


def token_texts(tokenizer: Tokenizer) -> list[str]:
    """Every id's decoded text, computed once per tokenizer (kept on it where it takes attributes)."""
    texts = getattr(tokenizer, "_logitfuse_texts", None)
    if texts is None:
        texts = [tokenizer.decode([i]) for i in range(len(tokenizer))]
        with contextlib.suppress(AttributeError):
            tokenizer._logitfuse_texts = texts
    return texts


class RewardModel(Protocol):
    name: str

    def score(self, texts: list[str]) -> torch.Tensor:
        """One scalar reward per text, float32 (N,)."""
        ...

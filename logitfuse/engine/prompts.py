"""Prompts per role: token ids as given, text through the role's tokenizer, chat through its template.

A role whose registry entry sets `chat_template: true` formats chat messages with its tokenizer's chat
template; other roles get the messages' contents as plain text (the proxy-tuning setting: the tuned expert
sees its chat format, the base sees plain text).
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence

from logitfuse.backends.base import CausalLM, Tokenizer, vocab_of
from logitfuse.errors import InvalidRequest

Prompt = str | list[int]


def encode_text(backend: CausalLM, prompt: Prompt) -> list[int]:
    """Token ids of a completion prompt (ids pass through; text gets the tokenizer's special tokens)."""
    if isinstance(prompt, str):
        return list(backend.tokenizer(prompt).input_ids)
    width = backend.logits_width
    bad = [t for t in prompt if not isinstance(t, int) or t < 0 or t >= width]
    if bad:
        raise InvalidRequest(f"prompt token ids must be integers in [0, {width}), got {bad[0]!r}", "prompt")
    return list(prompt)


def render_plain(messages: Sequence[dict]) -> str:
    """Chat messages as plain text for roles without a chat template."""
    return "\n\n".join(str(m.get("content") or "") for m in messages)


def encode_chat(backend: CausalLM, messages: Sequence[dict]) -> list[int]:
    tok = backend.tokenizer
    if backend.chat_template:
        if not tok.chat_template:
            raise InvalidRequest(f"model {backend.name!r} is configured to use a chat template but its "
                                 "tokenizer has none", "messages")
        out = tok.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=True)
        ids = out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out
        return list(ids)
    return list(tok(render_plain(messages)).input_ids)


_longest: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # tokenizer -> its longest token's length


def longest_token(tokenizer: Tokenizer) -> int:
    """The most characters one token of this tokenizer spells (added tokens included). Remembered only while
    the tokenizer lives: a model unloaded and loaded again brings a new one, and the old one (hundreds of MB
    for a 262k vocabulary) must go with its model."""
    try:
        if (n := _longest.get(tokenizer)) is not None:
            return n
    except TypeError:  # a tokenizer that takes no weak reference: computed every time
        return max((len(t) for t in vocab_of(tokenizer)), default=1)
    n = _longest[tokenizer] = max((len(t) for t in vocab_of(tokenizer)), default=1)
    return n


def check_length(backends: dict[str, CausalLM], prompt: Prompt | None, messages: Sequence[dict] | None) -> None:
    """Refuse text that cannot fit a model's context before tokenizing it: a token spells at most
    longest_token characters, so a text of more than 2 * longest_token * max_context characters (the 2 leaves
    room for normalisation) has more tokens than the context holds. Cheap: no tokenization."""
    if isinstance(prompt, list):
        return
    chars = len(prompt) if prompt is not None else sum(len(str(m.get("content") or "")) for m in messages or ())
    for name, b in backends.items():
        limit = 2 * longest_token(b.tokenizer) * b.max_context
        if chars > limit:
            raise InvalidRequest(f"the prompt has {chars} characters, more than model {name!r} can hold in its "
                                 f"context of {b.max_context} tokens (at most {limit} characters)",
                                 "messages" if prompt is None else "prompt")


def role_prompts(backends: dict[str, CausalLM], prompt: Prompt | None = None, messages: Sequence[dict] | None = None,
                 base: str | None = None, cross: Sequence[str] = ()) -> dict:
    """Each model's own prompt ids for a completion prompt or a chat conversation. Token ids are the base's:
    a cross-tokenizer model gets their text in its own tokens."""
    check_length(backends, prompt, messages)
    if messages is not None:
        return {name: encode_chat(b, messages) for name, b in backends.items()}
    if isinstance(prompt, list) and cross:
        text = backends[base].tokenizer.decode(encode_text(backends[base], prompt), skip_special_tokens=True)
        return {name: encode_text(b, text if name in cross else prompt) for name, b in backends.items()}
    return {name: encode_text(b, prompt) for name, b in backends.items()}

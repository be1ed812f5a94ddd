"""Prompts per role: token ids as given, text through the role's tokenizer, chat through its template.

A role whose registry entry sets `chat_template: true` formats chat messages with its tokenizer's chat
template; other roles get the messages' contents as plain text (the proxy-tuning setting: the tuned expert
sees its chat format, the base sees plain text).
"""

from __future__ import annotations

from collections.abc import Sequence

from logitfuse.backends.base import CausalLM
from logitfuse.request import InvalidRequest

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


def role_prompts(backends: dict[str, CausalLM], prompt: Prompt | None = None, messages: Sequence[dict] | None = None,
                 base: str | None = None, cross: Sequence[str] = ()) -> dict:
    """Each model's own prompt ids for a completion prompt or a chat conversation. Token ids are the base's:
    a cross-tokenizer model gets their text in its own tokens."""
    if messages is not None:
        return {name: encode_chat(b, messages) for name, b in backends.items()}
    if isinstance(prompt, list) and cross:
        text = backends[base].tokenizer.decode(encode_text(backends[base], prompt), skip_special_tokens=True)
        return {name: encode_text(b, text if name in cross else prompt) for name, b in backends.items()}
    return {name: encode_text(b, prompt) for name, b in backends.items()}

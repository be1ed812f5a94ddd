"""Cross-tokenizer experts in the engine: a model whose tokenizer differs from the base's follows the
generated text, re-tokenized with its own tokenizer at every step.

Where its tokenization of the text so far changes (a merge across the newest base token), the positions
that changed are forgotten and the new tokens fed, several at once when needed; a base token that adds no
text (half a multi-byte character) feeds nothing. Vocabulary mapping of its scores is in vocab.py.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from logitfuse.backends.base import CausalLM, Tokenizer
    from logitfuse.engine.sequence import Sequence


def generated_text(base_tokenizer: Tokenizer, seq: Sequence) -> str:
    """The text a sequence has generated so far, decoded with a few prompt tokens before it so the first
    token keeps its leading space: what a cross-tokenizer model re-tokenizes."""
    tail = seq.req.prompts[seq.req.plan.base][-4:]
    return base_tokenizer.decode(tail + seq.generated)[len(base_tokenizer.decode(tail)):]


def retokenized_update(tokenizer: Tokenizer, base_tokenizer: Tokenizer, seq: Sequence, name: str
                       ) -> tuple[int, list[int]]:
    """For one row of model `name`: (positions to forget, tokens to feed); records the new tokenization."""
    ids = tokenizer.encode(generated_text(base_tokenizer, seq), add_special_tokens=False)
    old = seq.cross_ids[name]
    common = 0
    while common < min(len(old), len(ids)) and old[common] == ids[common]:
        common += 1
    forget, add = len(old) - common, ids[common:]
    if not add and forget:  # the text shrank to a prefix: take its last token again for fresh logits
        seen = seq.req.prompts[name] + ids
        forget, add = forget + 1, [seen[-1]]
    seq.cross_ids[name] = ids
    return forget, add


def advance_ragged(backend: CausalLM, state: Any, logits: torch.Tensor, forget: list[int], new: list[list[int]]
                   ) -> torch.Tensor:
    """Forget forget[i] positions of row i, then feed row i its tokens new[i] (any number, 0 included) in
    one forward; returns each row's logits after its last token (rows fed nothing keep theirs)."""
    width = max(len(a) for a in new)
    if any(forget):
        backend.forget_last(state, forget)
    if width == 0:
        return logits
    block = torch.tensor([a + [a[-1] if a else 0] * (width - len(a)) for a in new], dtype=torch.long)
    out = backend.decode(state, block)  # (B, width, V)
    backend.forget_last(state, [width - len(a) for a in new])  # the padding
    keep = torch.tensor([len(a) > 0 for a in new], device=logits.device)
    last = out[torch.arange(len(new)), torch.tensor([max(len(a), 1) - 1 for a in new])]
    return torch.where(keep.unsqueeze(-1), last.to(logits.device), logits)

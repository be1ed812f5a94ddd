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
    """The text a sequence has generated so far (text_after on its base prompt and generated tokens)."""
    return text_after(base_tokenizer, seq.req.prompts[seq.req.plan.base], seq.generated)


def text_after(base_tokenizer: Tokenizer, prompt: list[int], generated: list[int]) -> str:
    """The text of the base's tokens `generated`, decoded with a few prompt tokens before them so the first
    token keeps its leading space: what a cross-tokenizer model re-tokenizes. The base's special tokens add
    no text (an end token generated past with ignore_eos or min_tokens is not spelled out as "<eos>" to a
    model whose tokenizer has no such token)."""
    tail = list(prompt[-4:])
    text = base_tokenizer.decode(tail + list(generated), skip_special_tokens=True)
    return text[len(base_tokenizer.decode(tail, skip_special_tokens=True)):]


def retokenized_ids(tokenizer: Tokenizer, base_tokenizer: Tokenizer, prompt: list[int], generated: list[int]
                    ) -> list[int]:
    """A cross-tokenizer model's own ids of the text the base's tokens `generated` spell after `prompt`."""
    return tokenizer.encode(text_after(base_tokenizer, prompt, generated), add_special_tokens=False)


def retokenized_update(tokenizer: Tokenizer, base_tokenizer: Tokenizer, seq: Sequence, name: str
                       ) -> tuple[int, list[int]]:
    """For one row of model `name`: (positions to forget, tokens to feed); records the new tokenization."""
    ids = retokenized_ids(tokenizer, base_tokenizer, seq.req.prompts[seq.req.plan.base], seq.generated)
    forget, add = retokenized_change(seq.cross_ids[name], ids, seq.req.prompts[name])
    seq.cross_ids[name] = ids
    return forget, add


def retokenized_change(old: list[int], ids: list[int], own_prompt: list[int]) -> tuple[int, list[int]]:
    """(positions to forget, tokens to feed) that take a model holding own_prompt + old to own_prompt + ids,
    with fresh logits after the last of them."""
    common = 0
    while common < min(len(old), len(ids)) and old[common] == ids[common]:
        common += 1
    forget, add = len(old) - common, ids[common:]
    if not add and forget:  # the text shrank to a prefix: take its last token again for fresh logits
        seen = list(own_prompt) + ids
        forget, add = forget + 1, [seen[-1]]
    return forget, add


def advance_ragged(backend: CausalLM, state: Any, logits: torch.Tensor, forget: list[int], new: list[list[int]]
                   ) -> torch.Tensor:
    """Forget forget[i] positions of row i, then feed row i its tokens new[i] (any number, 0 included) in
    one forward; returns each row's logits after its last token (rows fed nothing keep theirs)."""
    return advance_ragged_group([(backend, state, logits, forget, new)])[0]


def advance_ragged_group(parts: list[tuple[CausalLM, Any, torch.Tensor, list[int], list[list[int]]]]
                         ) -> list[torch.Tensor]:
    """advance_ragged for several states at once: (backend, state, logits, forget, new) each. States of
    backends sharing weights (adapter views of one model: `decode_group`) run in one forward, so the tuned
    and untuned rows of a cross-tokenizer adapter expert, which follow the same text, cost one pass."""
    width = max((len(a) for *_, new in parts for a in new), default=0)
    for backend, state, _, forget, _ in parts:
        if any(forget):
            backend.forget_last(state, forget)
    if width == 0:
        return [logits for _, _, logits, _, _ in parts]
    if all(getattr(backend, "decodes_masked", False) for backend, *_ in parts):
        return _advance_masked(parts, width)
    blocks = [torch.tensor([a + [a[-1] if a else 0] * (width - len(a)) for a in new], dtype=torch.long)
              for *_, new in parts]  # (B_i, width) each, padded with a row's own last token
    if len(parts) == 1:
        outs = [parts[0][0].decode(parts[0][1], blocks[0])]  # (B, width, V)
    else:
        outs = parts[0][0].decode_group([(b, s, blk) for (b, s, *_), blk in zip(parts, blocks)])
    result = []
    for (backend, state, logits, _, new), out in zip(parts, outs):
        backend.forget_last(state, [width - len(a) for a in new])  # the padding
        last = out[torch.arange(len(new)), torch.tensor([max(len(a), 1) - 1 for a in new])]
        result.append(_kept(new, last, logits))
    return result


def _advance_masked(parts: list, width: int) -> list[torch.Tensor]:
    """The ragged rows right-aligned, their padding masked out (hidden from every later position and not
    counted in positions), so each row's last token is the block's last and only that position's logits
    are computed: the output layer runs once per row, not once per row and padded position."""
    blocks, masks = [], []
    for *_, new in parts:
        blocks.append(torch.tensor([[0] * (width - len(a)) + a for a in new], dtype=torch.long))
        masks.append(torch.tensor([[0] * (width - len(a)) + [1] * len(a) for a in new], dtype=torch.long))
    if len(parts) == 1:
        outs = [parts[0][0].decode(parts[0][1], blocks[0], new_mask=masks[0], last_only=True)]
    else:
        outs = parts[0][0].decode_group([(b, s, blk) for (b, s, *_), blk in zip(parts, blocks)], masks, True)
    return [_kept(new, out[:, -1], logits) for (_, _, logits, _, new), out in zip(parts, outs)]


def _kept(new: list[list[int]], last: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Each row's new logits, or its previous ones where it was fed nothing."""
    keep = torch.tensor([len(a) > 0 for a in new], device=logits.device)
    return torch.where(keep.unsqueeze(-1), last.to(logits.device), logits)

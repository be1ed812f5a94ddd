"""Pure: vLLM's penalties and token controls on fused scores (B, V), before temperature and truncation.

- repetition_penalty r (vLLM's, from the CTRL paper): a token seen in the prompt or the output has its
  positive score divided by r and its negative score multiplied by r (r > 1 discourages repeats).
- frequency_penalty f and presence_penalty p (OpenAI's): score - f * count - p * [count > 0], over the
  tokens of the output only.
- token masks (allowed_token_ids, bad_words, min_tokens, a grammar's mask): a banned token's score is -inf.

Every function takes per-row parameters as (B,) tensors so one batch can mix requests; a row with neutral
parameters (r = 1, f = p = 0) keeps its scores exactly.
"""

from __future__ import annotations

import torch

NEG_INF = float("-inf")


def token_counts(rows: list[list[int]], width: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """How often each token id occurs in each row's list: (B, width) float32. Ids outside [0, width) are not
    counted (a token the shared vocabulary does not have cannot be scored anyway)."""
    out = torch.zeros(len(rows), width, dtype=torch.float32)
    for i, ids in enumerate(rows):
        t = torch.tensor([x for x in ids if 0 <= x < width], dtype=torch.long)
        if t.numel():
            out[i].scatter_add_(0, t, torch.ones_like(t, dtype=torch.float32))
    return out.to(device)


def apply_penalties(scores: torch.Tensor, prompt_counts: torch.Tensor, output_counts: torch.Tensor,
                    repetition: torch.Tensor, frequency: torch.Tensor, presence: torch.Tensor) -> torch.Tensor:
    """vLLM's penalties. scores, prompt_counts, output_counts (B, V); repetition, frequency, presence (B,)."""
    seen = (prompt_counts > 0) | (output_counts > 0)
    r = torch.where(seen, repetition.to(scores.dtype).unsqueeze(-1), torch.ones_like(scores))
    out = torch.where(scores > 0, scores / r, scores * r)
    out = out - frequency.to(scores.dtype).unsqueeze(-1) * output_counts.to(scores.dtype)
    return out - presence.to(scores.dtype).unsqueeze(-1) * (output_counts > 0).to(scores.dtype)


def ban(scores: torch.Tensor, banned: torch.Tensor) -> torch.Tensor:
    """-inf where banned (B, V) is True."""
    return scores.masked_fill(banned, NEG_INF)


def id_mask(rows: list[tuple[int, ...] | list[int] | set[int]], width: int,
            device: torch.device | str = "cpu") -> torch.Tensor:
    """(B, width) bool: True at each row's ids (ids outside the vocabulary are left out)."""
    out = torch.zeros(len(rows), width, dtype=torch.bool)
    for i, ids in enumerate(rows):
        keep = [x for x in ids if 0 <= x < width]
        if keep:
            out[i, keep] = True
    return out.to(device)


def bitmask_to_bool(words: torch.Tensor, width: int) -> torch.Tensor:
    """A packed token bitmask (B, W) int32, bit j of word w = token 32 w + j allowed, as (B, width) bool.
    Tokens past 32 W are not allowed."""
    bits = torch.arange(32, dtype=torch.int32, device=words.device)
    allowed = ((words.unsqueeze(-1) >> bits) & 1).bool().flatten(1)  # (B, 32 W)
    if allowed.shape[1] >= width:
        return allowed[:, :width]
    pad = torch.zeros(allowed.shape[0], width - allowed.shape[1], dtype=torch.bool, device=words.device)
    return torch.cat([allowed, pad], dim=1)


def bad_word_bans(generated: list[int], words: list[list[int]]) -> list[int]:
    """The tokens a row may not take next under vLLM's bad_words: a word's last token wherever the tokens
    generated so far end with the rest of the word (a one-token word is always banned)."""
    out = []
    for w in words:
        if not w:
            continue
        prefix = w[:-1]
        if not prefix or (len(generated) >= len(prefix) and generated[len(generated) - len(prefix):] == prefix):
            out.append(w[-1])
    return out

"""Sliding windows counted in a row's tokens, not in cache slots.

transformers draws a sliding window over cache slots: a query in slot q sees the slots q - window < kv <= q
(masking_utils.sliding_window_overlay). A row of the backend's state also holds slots it does not see
(hf_state.py: rejected speculative tokens, a re-tokenized suffix forgotten, the padding of a ragged call, the
gap between a resumed prefix and its rest), and every hidden slot inside a window leaves the row fewer than
`window` tokens to attend to: Gemma's sliding layers would then read less than a clean prefill of the row's
visible tokens does, once the row is longer than its window.

Here the window is drawn over positions instead: a query at position p sees the visible tokens at positions
p - window < position <= p. Positions count visible tokens, so the mask comes from the visibility mask's
running sum. Models take such prepared masks as they are: a 4D mask, or one per layer type in a dict (the
form transformers' own `create_masks_for_generate` hands to models with `layer_types`).

This needs every cached slot still there, which GrowingCache gives (kv_cache.py: every layer keeps all its
positions, sliding layers too). Rows padded on the left only see their windows right already, so a call
whose rows have no hidden slot after a visible one keeps the 2D mask (and transformers' own masks, exact
then). Attention kernels that apply the window themselves (flash attention) are left as they are.
"""

from __future__ import annotations

import torch

SLIDING, FULL = "sliding_attention", "full_attention"
MASKED = ("sdpa", "eager")  # the attention implementations that read a prepared 4D mask as the window


def window_of(model) -> int | None:
    """The model's sliding window in tokens, where this module masks it; None without one (or where the
    window is the attention kernel's own, or layers of other kinds need masks of their own)."""
    cfg = model.config.get_text_config()
    window = getattr(cfg, "sliding_window", None)
    types = getattr(cfg, "layer_types", None)
    if not window or getattr(cfg, "use_bidirectional_attention", False):
        return None
    if types is not None and (SLIDING not in types or not set(types) <= {SLIDING, FULL}):
        return None
    return int(window) if getattr(cfg, "_attn_implementation", None) in MASKED else None


def has_gaps(mask: torch.Tensor) -> bool:
    """Whether some row of the (B, S) visibility mask hides a slot after one it sees."""
    return bool((mask.cummax(-1).values != mask).any())


def visible_masks(mask: torch.Tensor, new: int, window: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(full, sliding) attention of the last `new` slots, each (B, 1, new, S) bool: full sees every visible
    slot up to its own, sliding those whose position is within `window` of its own. Every query also sees
    its own slot, so a hidden one (padding) still attends to something and its row stays finite."""
    slots = torch.arange(mask.shape[1], device=mask.device)
    own = slots[None, :] == slots[-new:, None]  # (new, S)
    full = mask.bool()[:, None, :] & (slots[None, :] <= slots[-new:, None])  # (B, new, S)
    seen = mask.cumsum(-1)  # (B, S): a visible slot's position + 1
    near = seen[:, -new:, None] - seen[:, None, :] < window  # (B, new, S)
    return (full | own)[:, None], (full & near | own)[:, None]


def _as_input(allowed: torch.Tensor, model) -> torch.Tensor:
    """sdpa reads a bool mask; eager adds the mask to its scores."""
    if model.config.get_text_config()._attn_implementation == "sdpa":
        return allowed
    blocked = torch.zeros(allowed.shape, dtype=model.dtype, device=allowed.device)
    return blocked.masked_fill_(~allowed, torch.finfo(model.dtype).min)


def window_mask(model, mask: torch.Tensor, new: int) -> torch.Tensor | dict[str, torch.Tensor]:
    """The attention mask to hand the model for a call whose last `new` slots of `mask` (B, S) are its
    tokens: `mask` itself, unless the model has a sliding window and some row hides slots (see above)."""
    window = window_of(model)
    if window is None or not has_gaps(mask):
        return mask
    full, sliding = (_as_input(m, model) for m in visible_masks(mask, new, window))
    if getattr(model.config.get_text_config(), "layer_types", None) is None:  # every layer windowed (Mistral)
        return sliding
    return {FULL: full, SLIDING: sliding}

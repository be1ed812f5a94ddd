"""Ragged decoding without padding's cost: rows fed different numbers of tokens in one forward whose
projections and MLPs run on the tokens alone.

A cross-tokenizer expert reads each generated base token re-tokenized, one to several of its own tokens per
row and step. Padded to the widest row, a batch of 16 rows where two rows read three tokens computes 48
positions for 20 tokens; on a CPU the cost of a forward grows with its positions. Here the rows' new
tokens are packed, one sequence per batch row of the call (one per adapter where rows run different
adapters), and only attention, which reads each row's own cache, sees the rows apart:

- the cache wrapper (`_PackedCache`) takes the packed keys and values of a layer, spreads them over the
  rows right-aligned (the padding a padded call would have computed is zeros there and masked out) and
  hands them to the row cache, which returns each row's keys as in the padded call;
- the attention function (`packed_attention`) gathers the packed queries into the same (rows, width)
  layout, attends with the padded call's mask (a 4D mask transformers passes through untouched), and
  packs the outputs back.

So the cache, the mask and the positions after the call are exactly those of the masked padded call
(`HFCausalLM.decode(new_mask=...)`), and the logits equal it to float rounding. Only architectures whose
attention is plain scaled dot-product over the cache (no sliding window, no soft-capping) take this path
(`PACKED_MODEL_TYPES`: Llama, Mistral without a window, Qwen2, Qwen3); others (Gemma's) run the masked
padded call.

The attention is registered once, under its own name, and a model that may run packed holds that name from
its load on (`use_packed`): a call without a packed layout on its thread is plain sdpa, mask and all, so no
call ever switches a model's configuration (engine lanes on other threads may be forwarding the same model).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch

try:
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask
except ImportError:  # a transformers without attention registration: every ragged call runs padded
    AttentionInterface = None

NAME = "logitfuse_packed"
# attention as packed_attention computes it (scaled dot product over the cache, grouped-query heads allowed),
# each tested against the padded call on a small random model of its type
PACKED_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3"})


@dataclass
class Layout:
    """Where each row's new tokens sit packed. rows R, width W (the widest row), calls P, packed length S."""

    unpack: torch.Tensor  # (R * W,) index into the packed tokens (P * S) + 1 zero slot, per right-aligned slot
    pack: torch.Tensor  # (P * S,) index into the right-aligned slots (R * W) + 1 zero slot, per packed token
    last: torch.Tensor  # (R,) each row's last token in the packed tokens (P * S)
    calls: int
    length: int


def layout(new_mask: torch.Tensor, groups: list[int]) -> Layout:
    """new_mask (R, W) right-aligned, 1 on real tokens; groups[r]: the call row of row r (rows of one call
    are consecutive). A row may have none: its last position is then meaningless, and the caller keeps
    that row's earlier logits."""
    rows, width = new_mask.shape
    calls = max(groups) + 1
    counts = new_mask.sum(-1).tolist()
    per_call = [0] * calls
    for r, n in enumerate(counts):
        per_call[groups[r]] += n
    length = max(per_call)
    zero_packed, zero_slot = calls * length, rows * width
    unpack = torch.full((rows * width,), zero_packed, dtype=torch.long)
    pack = torch.full((calls * length,), zero_slot, dtype=torch.long)
    last = torch.empty(rows, dtype=torch.long)
    filled = [0] * calls
    for r, n in enumerate(counts):
        g = groups[r]
        start = g * length + filled[g]
        slots = torch.arange(r * width + width - n, (r + 1) * width)
        unpack[slots] = torch.arange(start, start + n)
        pack[start:start + n] = slots
        last[r] = max(start + n - 1, 0)  # a row fed nothing keeps its logits (the caller's): any position
        filled[g] += n
    return Layout(unpack.to(new_mask.device), pack.to(new_mask.device), last.to(new_mask.device), calls, length)


def _spread(x: torch.Tensor, lay: Layout, rows: int) -> torch.Tensor:
    """(P, H, S, D) packed -> (R, H, W, D) right-aligned, zeros where a row has padding."""
    p, h, s, d = x.shape
    flat = torch.cat([x.transpose(1, 2).reshape(p * s, h, d), x.new_zeros(1, h, d)])
    return flat[lay.unpack].view(rows, -1, h, d).transpose(1, 2)


class _PackedCache:
    """The row cache, seen by the model as the cache of its packed call (see the module docstring)."""

    def __init__(self, inner, lay: Layout, rows: int) -> None:
        self.inner, self.lay, self.rows = inner, lay, rows

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        return self.inner.update(_spread(key_states, self.lay, self.rows), _spread(value_states, self.lay, self.rows),
                                 layer_idx, *args, **kwargs)

    def __getattr__(self, name: str):
        return getattr(self.inner, name)


_CALL = threading.local()  # .layout: the layout of the packed call running on this thread


def packed_attention(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0, **kw):
    """Attention of a packed call: query (P, heads, S, D); key, value (R, kv heads, T + W, D) per row;
    attention_mask (R, 1, W, T + W). Returns (P, S, heads, D) as transformers' attention functions do.
    Outside a packed call (no layout on this thread) it is transformers' sdpa."""
    lay = getattr(_CALL, "layout", None)
    if lay is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kw)
    rows, width = attention_mask.shape[0], attention_mask.shape[2]
    p, heads, s, d = query.shape
    q = _spread(query, lay, rows)  # (R, heads, W, D), as the keys and values were spread
    out = torch.nn.functional.scaled_dot_product_attention(
        q, key, value, attn_mask=attention_mask, scale=scaling, enable_gqa=key.shape[1] != heads)
    out = torch.cat([out.transpose(1, 2).reshape(rows * width, heads, d), out.new_zeros(1, heads, d)])
    return out[lay.pack].view(p, s, heads, d), None


if AttentionInterface is not None:
    AttentionInterface.register(NAME, packed_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)  # its masks are sdpa's (a 4D mask passes untouched)


def supports_packing(model) -> bool:
    """Whether the model's attention is what packed_attention computes: a listed type, every layer full
    attention (no sliding window: Qwen's layer_types, Mistral's sliding_window), sdpa or eager."""
    cfg = model.config.get_text_config()
    layer_types = getattr(cfg, "layer_types", None)
    windowed = (any(t != "full_attention" for t in layer_types) if layer_types is not None
                else getattr(cfg, "sliding_window", None) is not None)
    return (AttentionInterface is not None and cfg.model_type in PACKED_MODEL_TYPES and not windowed
            and getattr(cfg, "_attn_implementation", None) in ("sdpa", NAME))


def use_packed(model) -> bool:
    """Give a freshly loaded model the packed attention (plain sdpa outside packed calls) when its
    architecture allows it; called once, before any thread forwards the model. Returns whether it packs."""
    if not supports_packing(model):
        return False
    model.config.get_text_config()._attn_implementation = NAME
    return True


def unuse_packed(model) -> None:
    """Back to transformers' own sdpa (a compiled forward has no packed calls)."""
    cfg = model.config.get_text_config()
    if getattr(cfg, "_attn_implementation", None) == NAME:
        cfg._attn_implementation = "sdpa"


def packed_call(call, ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor, new_mask: torch.Tensor,
                cache, cache_arg: str, groups: list[int], **extra) -> torch.Tensor:
    """One packed forward through `call` (the model or an adapter host): ids, positions and new_mask (R, W)
    right-aligned, mask (R, T + W) the rows' visibility after it; extra: the call's own arguments (an
    adapter per call row). Updates `cache` as the padded call would; returns each row's last logits (R, V)."""
    rows = ids.shape[0]
    lay = layout(new_mask, groups)
    zero = ids.new_zeros(1)
    packed_ids = torch.cat([ids.reshape(-1), zero])[lay.pack].view(lay.calls, lay.length)
    packed_pos = torch.cat([positions.reshape(-1), zero])[lay.pack].view(lay.calls, lay.length)
    past = mask.shape[1] - new_mask.shape[1]
    causal = torch.ones(new_mask.shape[1], mask.shape[1], dtype=torch.bool, device=mask.device).tril(past)
    attn = (mask.bool()[:, None, None, :] & causal).to(ids.device)  # (R, 1, W, T + W)
    at = lay.last % lay.length  # each row's last token in its call row
    keep = at.unique()  # sorted: the positions whose logits are computed, shared by the call rows
    _CALL.layout = lay
    try:
        out = call(input_ids=packed_ids, attention_mask=attn, position_ids=packed_pos, use_cache=True,
                   logits_to_keep=keep, **{cache_arg: _PackedCache(cache, lay, rows)}, **extra)
    finally:
        _CALL.layout = None
    where = torch.searchsorted(keep, at)
    logits = out.logits.float()  # (P, len(keep), V)
    return logits[torch.tensor(groups, device=logits.device), where]

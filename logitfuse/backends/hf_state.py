"""The KV state of the Hugging Face backend and its batch surgery: selecting, joining and forgetting rows'
positions, and compacting the hidden ones away.

A state is the transformers cache plus a (B, T) mask of the positions each row sees: rows are left-padded,
forgotten positions (rejected speculative tokens, a re-tokenized suffix, masked padding) are hidden in
place, and positions count visible tokens only, so none of this shifts a row's positions. Sliding windows
count visible tokens too (window.py), so hidden slots never shrink a windowed layer's view; that needs every
slot kept, sliding layers' too (kv_cache.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from logitfuse.backends.kv_cache import GrowingCache


@dataclass
class HFState:
    """KV cache plus the attention mask over its positions, both (B, ...) with T cached positions.
    The cache grows in place during decoding (kv_cache.py); batch surgery builds a new one."""

    cache: GrowingCache
    mask: torch.Tensor  # (B, T) long, 1 = visible
    # a part of a state several states were joined into for one forward (adapter.py: decode_group): (that
    # state, this part's index, this part's cache as it was cut from it); the next group forward reuses it
    joined: tuple | None = field(default=None, repr=False, compare=False)

    @property
    def layers(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer (keys, values), each (B, H, T, D)."""
        return [(layer.keys, layer.values) for layer in self.cache.layers]

    @staticmethod
    def of(layers: list[tuple[torch.Tensor, torch.Tensor]], mask: torch.Tensor) -> HFState:
        """A state around these tensors, not copied (the cache copies them when it first grows)."""
        return HFState(GrowingCache.wrap(layers), mask)


def _left_pad(x: torch.Tensor, n: int, dim: int) -> torch.Tensor:
    if n == 0:
        return x
    shape = list(x.shape)
    shape[dim] = n
    return torch.cat([x.new_zeros(shape), x], dim=dim)


class StateSurgery:
    """The state operations of the backend protocol (backends/base.py) on HFState."""

    def select(self, state: HFState, rows: list[int]) -> HFState:
        """The given rows, without leading positions none of them can see; the cache comes out contiguous."""
        idx = torch.tensor(rows, dtype=torch.long, device=state.mask.device)
        mask = state.mask.index_select(0, idx)
        visible = mask.any(dim=0).nonzero()
        start = int(visible[0]) if visible.numel() else mask.shape[1]
        layers = [(k[:, :, start:].index_select(0, idx), v[:, :, start:].index_select(0, idx))
                  for k, v in state.layers]
        return HFState.of(layers, mask[:, start:])

    def concat(self, states: list[HFState]) -> HFState:
        length = max(s.mask.shape[1] for s in states)
        pads = [length - s.mask.shape[1] for s in states]
        mask = torch.cat([_left_pad(s.mask, n, 1) for s, n in zip(states, pads)], dim=0)
        layers = []
        for i in range(len(states[0].layers)):
            keys = torch.cat([_left_pad(s.layers[i][0], n, 2) for s, n in zip(states, pads)], dim=0)
            values = torch.cat([_left_pad(s.layers[i][1], n, 2) for s, n in zip(states, pads)], dim=0)
            layers.append((keys, values))
        return HFState.of(layers, mask)

    def forget_last(self, state: HFState, counts: list[int]) -> None:
        """Hide each row's last counts[i] visible positions (positions hidden before do not count). When
        hidden positions make up more than half of the cache, it is compacted."""
        mask = state.mask.clone()
        for row, n in enumerate(counts):
            if n > 0:
                visible = mask[row].nonzero()[:, 0]
                mask[row, visible[len(visible) - n:]] = 0
        state.mask = mask
        self.compact_sparse(state)

    def compact_sparse(self, state: HFState) -> None:
        """Compact the state in place once hidden positions (forgotten, padding) make up too much of it."""
        longest = int(state.mask.sum(dim=1).max())
        if self.compact_when(state.mask.shape[1] - longest, longest):
            compacted = self.compact(state)
            state.cache, state.mask = compacted.cache, compacted.mask

    @staticmethod
    def compact_when(hidden: int, visible: int) -> bool:
        """Compact once hidden positions outnumber the longest row's visible ones (and at least 16)."""
        return hidden > max(16, visible)

    def compact(self, state: HFState) -> HFState:
        """The same rows with only their visible positions, right-aligned (left padding as after a prefill).
        Cached keys keep the rotary positions they were computed with, and new positions count visible
        tokens only, so decoding goes on exactly as before."""
        mask = state.mask
        counts = mask.sum(dim=1)
        length = int(counts.max())
        # visible positions first in each row's order, then right-aligned by a per-row shift
        order = torch.argsort(mask * torch.arange(1, mask.shape[1] + 1, device=mask.device), dim=1, stable=True)
        idx = order[:, mask.shape[1] - length:]  # (B, length): the last `length` of the sort are the visible
        new_mask = mask.gather(1, idx)
        layers = []
        for k, v in state.layers:
            g = idx[:, None, :, None].expand(k.shape[0], k.shape[1], length, k.shape[3])
            layers.append((k.gather(2, g), v.gather(2, g)))
        return HFState.of(layers, new_mask)

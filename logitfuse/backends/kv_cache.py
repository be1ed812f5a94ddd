"""A transformers KV cache whose layers grow in place.

transformers' DynamicCache appends each step's keys and values by concatenation: every decoding step copies
the whole cache of every layer (at 16 rows of 900 tokens, some 700 MB for a 135M-parameter model), and the
allocator hands the memory back and forth. Here each layer keeps its keys and values in buffers with room to
spare: a step writes its positions in place, and only a layer that runs out of room is copied, into a buffer
an eighth larger than it needs (at least HEADROOM positions more), so the copies cost a few positions per step
on average instead of the whole length.

`keys` / `values` stay what transformers and the rest of the backend read: (B, H, T, D) tensors, here views
of the first T positions of the buffers. Code that replaces them (batch surgery, a crop, a copy handed in
from elsewhere) needs nothing special: a layer only writes in place into a buffer it allocated itself and
whose leading positions `keys` still is; anything else is copied into a fresh buffer at the next update. So a
cache built around views of another cache's tensors (`wrap`) never writes into them.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.cache_utils import Cache, DynamicLayer

HEADROOM = 64  # positions of spare room at least, whenever a layer's buffer is (re)allocated
GROWTH = 8  # ... and at least 1/GROWTH of the positions it holds


class GrowingLayer(DynamicLayer):
    """A DynamicLayer that writes new positions into spare room instead of concatenating."""

    def __init__(self, keys: torch.Tensor | None = None, values: torch.Tensor | None = None) -> None:
        super().__init__()
        self._k: torch.Tensor | None = None  # the buffers this layer owns: (B, H, capacity, D)
        self._v: torch.Tensor | None = None
        if keys is not None and values is not None:
            self.keys, self.values = keys, values  # someone else's tensors: copied before the first write
            self.device, self.is_initialized = keys.device, True

    def _owns(self, more: int) -> bool:
        """Whether keys/values are the leading positions of this layer's own buffers, with room for `more`."""
        k, buf = self.keys, self._k
        if buf is None or k is None or self._v is None or k.dim() != 4:
            return False
        return (k.data_ptr() == buf.data_ptr() and k.shape[:2] == buf.shape[:2] and k.shape[3] == buf.shape[3]
                and k.stride() == buf.stride() and self.values.data_ptr() == self._v.data_ptr()
                and k.shape[2] + more <= buf.shape[2])

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
               ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized or self.keys is None or self.keys.numel() == 0:
            self.lazy_initialization(key_states, value_states)
            self.keys = self.values = None
        new = key_states.shape[-2]
        held = 0 if self.keys is None else self.keys.shape[-2]
        if not self._owns(new):
            need = held + new
            capacity = need + max(HEADROOM, need // GROWTH)
            b, h, _, d = key_states.shape
            k = key_states.new_empty((b, h, capacity, d))
            v = value_states.new_empty((b, h, capacity, value_states.shape[-1]))
            if held:
                k[:, :, :held] = self.keys
                v[:, :, :held] = self.values
            self._k, self._v = k, v
        self._k[:, :, held:held + new] = key_states
        self._v[:, :, held:held + new] = value_states
        self.keys, self.values = self._k[:, :, :held + new], self._v[:, :, :held + new]
        return self.keys, self.values


class GrowingCache(DynamicCache):
    """A DynamicCache of GrowingLayers (layers added as the model's forward reaches them)."""

    def __init__(self, layers: list[GrowingLayer] | None = None) -> None:
        if layers:
            Cache.__init__(self, layers=layers)
        else:
            Cache.__init__(self, layer_class_to_replicate=GrowingLayer)

    @classmethod
    def wrap(cls, layers: list[tuple[torch.Tensor, torch.Tensor]]) -> GrowingCache:
        """A cache around the given (keys, values) per layer, without copying them (the first update does)."""
        return cls([GrowingLayer(k, v) for k, v in layers])

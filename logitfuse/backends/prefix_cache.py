"""A prefix cache: the KV of prompt prefixes, reused by later prefills that start with the same tokens.

Prompts are cut into blocks of `block` token ids; a block is keyed by the hash chain of the blocks before it
and itself (as vLLM's automatic prefix caching does), and each entry keeps its parent key and its own ids, so
a lookup compares ids and never trusts a hash alone. Entries hold one row's keys and values for the block,
(1, H, block, D) per layer, and are evicted least recently used under a byte budget shared by every model.
A lookup leaves at least one token of the prompt to compute, so the prefill still yields its logits.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

import torch

Layers = list[tuple[torch.Tensor, torch.Tensor]]  # per layer (keys, values), (1, H, T, D) each


@dataclass
class _Block:
    parent: int | None
    ids: tuple[int, ...]
    layers: Layers
    nbytes: int


class PrefixCache:
    def __init__(self, budget_bytes: int, block: int = 16) -> None:
        self.budget, self.block = budget_bytes, block
        self._entries: OrderedDict[tuple[str, int], _Block] = OrderedDict()
        self._lock = threading.Lock()  # two engine lanes may share a backend
        self.bytes = 0
        self.queried = 0  # prompt tokens looked up
        self.hit = 0  # of which served from the cache

    def _keys(self, ids: list[int], blocks: int) -> list[tuple[int | None, int, tuple[int, ...]]]:
        out, parent = [], None
        for b in range(blocks):
            chunk = tuple(ids[b * self.block:(b + 1) * self.block])
            key = hash((parent, chunk))
            out.append((parent, key, chunk))
            parent = key
        return out

    def longest(self, model: str, ids: list[int]) -> tuple[int, Layers | None]:
        """(n, layers): the longest cached prefix of ids, n a multiple of the block below len(ids), and its
        keys and values (1, H, n, D) per layer; (0, None) on a miss."""
        found: list[_Block] = []
        with self._lock:
            for parent, key, chunk in self._keys(ids, (len(ids) - 1) // self.block):
                entry = self._entries.get((model, key))
                if entry is None or entry.parent != parent or entry.ids != chunk:
                    break
                self._entries.move_to_end((model, key))
                found.append(entry)
            n = len(found) * self.block
            self.queried += len(ids)
            self.hit += n
        if not found:
            return 0, None
        layers = [(torch.cat([e.layers[i][0] for e in found], dim=2), torch.cat([e.layers[i][1] for e in found], dim=2))
                  for i in range(len(found[0].layers))]
        return n, layers

    def store(self, model: str, ids: list[int], layers: Layers) -> None:
        """Keep the full blocks of one row's prompt: layers (1, H, len(ids), D) per layer, its visible positions."""
        with self._lock:
            for b, (parent, key, chunk) in enumerate(self._keys(ids, len(ids) // self.block)):
                if (model, key) in self._entries:
                    self._entries.move_to_end((model, key))
                    continue
                part = slice(b * self.block, (b + 1) * self.block)
                kept = [(k[:, :, part].clone(), v[:, :, part].clone()) for k, v in layers]
                nbytes = sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in kept)
                self._entries[(model, key)] = _Block(parent, chunk, kept, nbytes)
                self.bytes += nbytes
            while self.bytes > self.budget and self._entries:
                _, old = self._entries.popitem(last=False)
                self.bytes -= old.nbytes

    def forget(self, model: str) -> None:
        """Drop a model's entries (its weights changed, or it was unloaded for good)."""
        with self._lock:
            for key in [k for k in self._entries if k[0] == model]:
                self.bytes -= self._entries.pop(key).nbytes

    def hit_rate(self) -> float:
        return self.hit / self.queried if self.queried else 0.0

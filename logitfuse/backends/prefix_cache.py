"""A prefix cache: the KV of prompt prefixes, reused by later prefills that start with the same tokens.

Prompts are cut into blocks of `block` token ids; a block is keyed by a digest of its parent's digest and
its own ids (blake2b, as vLLM's automatic prefix caching chains sha256), so a key names the whole chain of
blocks before it. Each entry also keeps its own ids and a link to its parent entry: a lookup follows the
links and compares ids, and a store keeps nothing past a key that holds other ids, so a hit is the KV of
exactly the prompt's tokens even if two digests collided. Entries
hold one row's keys and values for the block, (1, H, block, D) per layer, and are evicted least recently
used under a byte budget shared by every model, leaves first: a lookup or store touches a chain from its
last block back to its first, so an entry is always more recent than its descendants and the oldest entry
never has a cached child (an evicted entry takes any descendant with it all the same). Entries are keyed by
the model's name: the pool drops a name's entries when its weights are unloaded or loaded again (forget).
A lookup leaves at least one token of the prompt to compute, so the prefill still yields its logits.
"""

from __future__ import annotations

import hashlib
import threading
from array import array
from collections import OrderedDict
from dataclasses import dataclass, field

import torch

Layers = list[tuple[torch.Tensor, torch.Tensor]]  # per layer (keys, values), (1, H, T, D) each
Key = tuple[str, bytes]  # (model name, digest of the block chain)


def block_digest(parent: bytes | None, ids: tuple[int, ...]) -> bytes:
    """The key of a block: blake2b over the parent block's digest (none for a first block) and the ids."""
    h = hashlib.blake2b(digest_size=16)
    h.update(b"\x00" if parent is None else b"\x01" + parent)
    h.update(array("q", ids).tobytes())
    return h.digest()


@dataclass(eq=False)
class _Block:
    parent: bytes | None  # the parent's digest (None: a first block)
    up: _Block | None  # the parent entry itself
    ids: tuple[int, ...]
    layers: Layers
    nbytes: int
    children: set[bytes] = field(default_factory=set)


class PrefixCache:
    def __init__(self, budget_bytes: int, block: int = 16) -> None:
        self.budget, self.block = budget_bytes, block
        self._entries: OrderedDict[Key, _Block] = OrderedDict()  # least recently used first
        self._lock = threading.Lock()  # two engine lanes may share a backend
        self.bytes = 0
        self.queried = 0  # prompt tokens looked up
        self.hit = 0  # of which served from the cache

    def _keys(self, ids: list[int], blocks: int) -> list[tuple[bytes | None, bytes, tuple[int, ...]]]:
        out, parent = [], None
        for b in range(blocks):
            chunk = tuple(ids[b * self.block:(b + 1) * self.block])
            key = block_digest(parent, chunk)
            out.append((parent, key, chunk))
            parent = key
        return out

    def _touch(self, model: str, chain: list[bytes]) -> None:
        """Mark a chain used, its last block first: each block ends up more recent than its descendants."""
        for key in reversed(chain):
            self._entries.move_to_end((model, key))

    def longest(self, model: str, ids: list[int]) -> tuple[int, Layers | None]:
        """(n, layers): the longest cached prefix of ids, n a multiple of the block below len(ids), and its
        keys and values (1, H, n, D) per layer; (0, None) on a miss."""
        found: list[_Block] = []
        with self._lock:
            chain = []
            for _, key, chunk in self._keys(ids, (len(ids) - 1) // self.block):
                entry = self._entries.get((model, key))
                if entry is None or entry.ids != chunk or entry.up is not (found[-1] if found else None):
                    break
                chain.append(key)
                found.append(entry)
            self._touch(model, chain)
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
            chain, up = [], None
            for b, (parent, key, chunk) in enumerate(self._keys(ids, len(ids) // self.block)):
                entry = self._entries.get((model, key))
                if entry is None:
                    part = slice(b * self.block, (b + 1) * self.block)
                    kept = [(k[:, :, part].clone(), v[:, :, part].clone()) for k, v in layers]
                    nbytes = sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in kept)
                    entry = self._entries[(model, key)] = _Block(parent, up, chunk, kept, nbytes)
                    self.bytes += nbytes
                    if up is not None:
                        up.children.add(key)
                elif entry.ids != chunk or entry.up is not up:
                    break  # another chain's block under this digest: nothing after it can be linked
                chain.append(key)
                up = entry
            self._touch(model, chain)
            while self.bytes > self.budget and self._entries:
                self._drop(next(iter(self._entries)))

    def _drop(self, key: Key) -> None:
        """Remove an entry and whatever it leaves unreachable (its descendants; none when it is a leaf)."""
        entry = self._entries.pop(key)
        self.bytes -= entry.nbytes
        for child in list(entry.children):
            if (key[0], child) in self._entries:
                self._drop((key[0], child))
        if entry.up is not None:
            entry.up.children.discard(key[1])

    def forget(self, model: str) -> None:
        """Drop a model's entries (its weights were unloaded, or loaded again and may differ)."""
        with self._lock:
            for key in [k for k in self._entries if k[0] == model]:
                self.bytes -= self._entries.pop(key).nbytes

    def hit_rate(self) -> float:
        return self.hit / self.queried if self.queried else 0.0

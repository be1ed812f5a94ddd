"""Loaded checkpoints by name: load on first use, keep under a memory budget, evict least recently used.

A model in use by a running request is pinned and never evicted. Loading one model holds only that
model's lock, so requests for models already loaded are never blocked by a load.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from logitfuse.backends.base import CausalLM, RewardModel
from logitfuse.backends.sources import load_model, load_reward
from logitfuse.registry import Registry
from logitfuse.request import UnknownName


def default_loader(reg: Registry, name: str) -> CausalLM | RewardModel:
    """Build the backend for a registry name (a causal LM from its source, or a reward model)."""
    if name in reg.models:
        return load_model(name, reg.models[name], reg.resolve_path)
    if name in reg.rewards:
        return load_reward(name, reg.rewards[name], reg.resolve_path)
    raise UnknownName(f"model {name!r} not found; available: {', '.join(list(reg.models) + list(reg.rewards))}")


Loader = Callable[[Registry, str], CausalLM | RewardModel]


class ModelPool:
    def __init__(self, registry: Registry, loader: Loader | None = None, budget_bytes: int | None = None) -> None:
        self.registry = registry
        self._loader = loader or default_loader
        self.budget = budget_bytes if budget_bytes is not None else registry.server.memory_budget_mb * 2**20
        self._loaded: OrderedDict[str, CausalLM | RewardModel] = OrderedDict()  # LRU order, oldest first
        self._pins: dict[str, int] = {}
        self._lock = threading.Lock()
        self._name_locks: dict[str, threading.Lock] = {}

    def loaded(self) -> list[str]:
        with self._lock:
            return list(self._loaded)

    def get(self, name: str) -> CausalLM | RewardModel:
        """The backend for name, loading it if needed (blocking only callers that need this model)."""
        with self._lock:
            if name in self._loaded:
                self._loaded.move_to_end(name)
                return self._loaded[name]
            name_lock = self._name_locks.setdefault(name, threading.Lock())
        with name_lock:
            with self._lock:
                if name in self._loaded:
                    return self._loaded[name]
            backend = self._loader(self.registry, name)
            with self._lock:
                self._loaded[name] = backend
                self._evict(keep=name)
            return backend

    @contextmanager
    def pinned(self, names: list[str]) -> Iterator[dict]:
        """Load and pin the named models for the duration of a request."""
        backends = self.acquire(names)
        try:
            yield backends
        finally:
            self.release(names)

    def acquire(self, names: list[str]) -> dict[str, CausalLM | RewardModel]:
        """Pin names (so they are not evicted) and return their backends; pair with release."""
        with self._lock:
            for n in names:
                self._pins[n] = self._pins.get(n, 0) + 1
        try:
            return {n: self.get(n) for n in names}
        except BaseException:
            self.release(names)
            raise

    def release(self, names: list[str]) -> None:
        with self._lock:
            for n in names:
                self._pins[n] -= 1
                if self._pins[n] == 0:
                    del self._pins[n]
            self._evict()

    def _evict(self, keep: str | None = None) -> None:
        """Drop least recently used unpinned models until the loaded ones fit the budget."""
        total = sum(b.param_bytes() for b in self._loaded.values())
        for name in list(self._loaded):
            if total <= self.budget:
                return
            if name == keep or self._pins.get(name):
                continue
            total -= self._loaded.pop(name).param_bytes()

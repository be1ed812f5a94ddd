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
from logitfuse.registry import Registry
from logitfuse.request import UnknownName


def default_loader(reg: Registry, name: str):
    """Build the backend for a registry name (a causal LM or a reward model)."""
    from logitfuse.backends.hf import HFCausalLM, HFReward

    if name in reg.models:
        spec = reg.models[name]
        if spec.remote is not None:
            from logitfuse.backends.remote import RemoteCausalLM

            return RemoteCausalLM.load(name, spec.remote, reg.resolve_path(spec.tokenizer), spec.chat_template)
        if name in reg.adapter_hosts():
            from logitfuse.backends.adapter import load_host

            return load_host(name, reg.resolve_path(spec.path), spec.dtype, spec.device, spec.chat_template,
                             spec.gguf_file)
        return HFCausalLM.load(name, reg.resolve_path(spec.path), spec.dtype, spec.device, spec.chat_template,
                               spec.gguf_file, compile=spec.compile)
    if name in reg.rewards:
        spec = reg.rewards[name]
        return HFReward.load(name, reg.resolve_path(spec.path), spec.dtype, spec.device)
    raise UnknownName(f"model {name!r} not found; available: {', '.join(list(reg.models) + list(reg.rewards))}")


class ModelPool:
    def __init__(self, registry: Registry, loader: Callable | None = None, budget_bytes: int | None = None) -> None:
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

    def get(self, name: str):
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
            backend = self._load(name)
            with self._lock:
                self._loaded[name] = backend
                self._evict(keep=name)
            return backend

    def _load(self, name: str):
        view = self.registry.adapter_views().get(name)
        if view is None:
            return self._loader(self.registry, name)
        from logitfuse.backends.adapter import load_view

        expert, untuned, folder = view
        return load_view(self.get(untuned), name, expert, folder)  # the adapter joins its untuned model

    @contextmanager
    def pinned(self, names: list[str]) -> Iterator[dict]:
        """Load and pin the named models for the duration of a request."""
        backends = self.acquire(names)
        try:
            yield backends
        finally:
            self.release(names)

    def acquire(self, names: list[str]) -> dict:
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
        """Drop least recently used unpinned models until the loaded ones fit the budget. A model goes with
        the adapters over it (`requires`), and stays while one of them is pinned or just loaded."""
        total = sum(b.param_bytes() for b in self._loaded.values())
        for name in list(self._loaded):
            if total <= self.budget:
                return
            group = [name] + [n for n, b in self._loaded.items() if getattr(b, "requires", None) == name]
            if name not in self._loaded or any(n == keep or self._pins.get(n) for n in group):
                continue
            for n in group:
                backend = self._loaded.pop(n)
                total -= backend.param_bytes()
                if hasattr(backend, "unload"):
                    backend.unload()

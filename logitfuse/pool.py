"""Loaded checkpoints by name: load on first use, keep under a memory budget, evict least recently used.

A model in use by a running request is pinned and never evicted. Loading one model holds only that
model's lock, so requests for models already loaded are never blocked by a load. A model that fails to load
(a corrupt or missing checkpoint, an unreachable remote) is marked failed: requests get ModelUnavailable naming
the model and the file at once, and the load is tried again only when the model's local files change (or,
for a hub id or a remote, after server.load_retry_seconds).
"""

from __future__ import annotations

import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch

from logitfuse.backends.base import CausalLM, RewardModel
from logitfuse.backends.sources import load_model, load_reward
from logitfuse.backends.tokenizers import TokenizerStore
from logitfuse.config.registry import Registry
from logitfuse.errors import InvalidRequest, ModelUnavailable, Unavailable, UnknownName

WEIGHT_FILES = (".safetensors", ".bin", ".gguf", ".pt", ".pth")  # what estimate() counts in a checkpoint folder


def local_folder(reg: Registry, name: str) -> str | None:
    """The local checkpoint folder (or file) behind a registry name, if it is one."""
    spec = reg.models.get(name) or reg.rewards.get(name)
    path = getattr(spec, "path", None)
    if path is None:
        return None
    resolved = reg.resolve_path(path)
    return resolved if os.path.exists(resolved) else None


def files_signature(path: str) -> tuple:
    """(file, size, mtime) of every file under path: a changed checkpoint has another signature."""
    if os.path.isfile(path):
        st = os.stat(path)
        return ((path, st.st_size, st.st_mtime_ns),)
    out = []
    for root, _, files in os.walk(path):
        for f in files:
            st = os.stat(os.path.join(root, f))
            out.append((os.path.join(root, f), st.st_size, st.st_mtime_ns))
    return tuple(sorted(out))


def broken_file(path: str | None) -> str | None:
    """The first safetensors file under path whose header cannot be read (cheap: headers only)."""
    if path is None or not os.path.isdir(path):
        return None
    from safetensors import safe_open

    for root, _, files in sorted(os.walk(path)):
        for f in sorted(files):
            if f.endswith(".safetensors"):
                try:
                    with safe_open(os.path.join(root, f), "pt"):
                        pass
                except Exception:
                    return os.path.join(root, f)
    return None


def files_problem(reg: Registry, names: Sequence[str]) -> str | None:
    """What can be seen of models without loading them: a local folder missing, a weights file unreadable, an
    adapter folder without its config (a reward model's too); None when nothing is."""
    for name in names:
        view = reg.adapter_views().get(name)
        if view is not None:
            folder = view[2]
            if not os.path.isfile(os.path.join(folder, "adapter_config.json")):
                return f"expert {view[0]!r}: adapter folder {folder} has no adapter_config.json"
            continue
        spec = reg.models.get(name) or reg.rewards[name]
        if getattr(spec, "remote", None) is not None:
            continue
        folder = local_folder(reg, name)
        if folder is None:
            return f"model {name!r}: no such folder {reg.resolve_path(spec.path)}"
        broken = broken_file(folder)
        if broken:
            return f"model {name!r}: {broken} is unreadable"
    return None


def default_loader(reg: Registry, name: str, tokenizers: TokenizerStore | None = None) -> CausalLM | RewardModel:
    """Build the backend for a registry name (a causal LM from its source, or a reward model); tokenizers: where
    models take their tokenizers from (read once, kept across loads)."""
    if name in reg.models:
        if name in reg.adapter_hosts():  # loaded once, shared by the adapters over it
            from logitfuse.backends.adapter import load_host

            spec = reg.models[name]
            return load_host(name, reg.resolve_path(spec.path), spec.dtype, spec.device, spec.chat_template,
                             spec.gguf_file, tokenizers)
        return load_model(name, reg.models[name], reg.resolve_path, tokenizers)
    if name in reg.rewards:
        return load_reward(name, reg.rewards[name], reg.resolve_path)
    raise UnknownName(f"model {name!r} not found; available: {', '.join(list(reg.models) + list(reg.rewards))}")


Loader = Callable[[Registry, str], CausalLM | RewardModel]


class ModelPool:
    def __init__(self, registry: Registry, loader: Loader | None = None, budget_bytes: int | None = None,
                 tokenizers: TokenizerStore | None = None) -> None:
        self.registry = registry
        self.tokenizers = tokenizers or TokenizerStore()
        self._loader = loader or (lambda reg, name: default_loader(reg, name, self.tokenizers))
        self.budget = budget_bytes if budget_bytes is not None else registry.server.memory_budget_mb * 2**20
        self._loaded: OrderedDict[str, CausalLM | RewardModel] = OrderedDict()  # LRU order, oldest first
        self._pins: dict[str, int] = {}
        self._lock = threading.Lock()
        self._name_locks: dict[str, threading.Lock] = {}
        self._failed: dict[str, tuple[Unavailable, tuple | None, float]] = {}  # error, files, when
        self._listeners: list[Callable[[str], None]] = []
        self._shells: dict[str, object] = {}  # name -> ShellLM (what builds requests another engine decodes)

    def shell(self, name: str):
        """A model's tokenizer, context and vocabulary, no weights (backends/shell.py), kept per name; a model
        with `engine: vllm` is one as its own backend. An adapter model's is its untuned model's."""
        spec = self.registry.model_spec(name)
        if spec.engine == "vllm" and name in self.registry.models:
            return self.get(name)
        with self._lock:
            if name in self._shells:
                return self._shells[name]
        from logitfuse.backends.shell import ShellLM

        path = spec.tokenizer if spec.remote is not None else spec.path
        max_context = spec.remote.max_context if spec.remote is not None else None
        shell = ShellLM.load(name, self.registry.resolve_path(path), spec.chat_template, spec.gguf_file,
                             max_context, self.tokenizers)
        with self._lock:
            return self._shells.setdefault(name, shell)

    def on_weights_change(self, listener: Callable[[str], None]) -> None:
        """Call listener(name) whenever the weights behind a name are unloaded or (re)loaded, for each name
        whose outputs they make: the model and every adapter view over it (a cache of its KV must go)."""
        self._listeners.append(listener)

    def _changed(self, name: str) -> None:
        views = [v for v, (_, untuned, _) in self.registry.adapter_views().items() if untuned == name]
        for n in [name, *views]:
            for listener in self._listeners:
                listener(n)

    def failed(self) -> dict[str, str]:
        """Models that failed to load, with the reason."""
        with self._lock:
            return {n: str(f[0]) for n, f in self._failed.items()}

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
            backend = self._load(name)
            self._changed(name)  # what was kept from earlier weights of this name (retrained in place) goes
            with self._lock:
                self._loaded[name] = backend
                self._evict(keep=name)
            return backend

    def _load(self, name: str):
        """The loader's backend, or ModelUnavailable: recorded, and raised again without loading while the
        model's files are unchanged (local) or for load_retry_seconds (hub ids, remotes)."""
        view = self.registry.adapter_views().get(name)
        if view is not None:  # an adapter joins its untuned model (bad adapters: AdapterError, a 400)
            from logitfuse.backends.adapter import load_view

            expert, untuned, folder = view
            return load_view(self.get(untuned), name, expert, folder)
        folder = local_folder(self.registry, name)
        retry = self.registry.server.load_retry_seconds
        failure = self._failed.get(name)
        if failure is not None:
            err, signature, when = failure
            unchanged = signature is not None and signature == files_signature(folder) if folder else False
            if unchanged or (signature is None and time.monotonic() - when < retry):
                raise err
        try:
            backend = self._loader(self.registry, name)
            if hasattr(backend, "warm"):  # the first forward's one-off costs here, not in a decoding step
                backend.warm()
        except UnknownName:
            raise
        except Exception as exc:
            if isinstance(exc, Unavailable):  # already names the model (a remote's own error): kept as it is
                err = exc
                err.retry_after = retry
            else:
                where = broken_file(folder) or getattr(exc, "filename", None) or folder or name
                detail = " ".join(f"{type(exc).__name__}: {exc}".split())[:400]
                err = ModelUnavailable(f"model {name!r} could not be loaded from {where}: {detail}", retry)
            # a broken checkpoint stays broken until its files change; running out of memory is the moment's
            # (other models were loaded), so it is retried after load_retry_seconds like a remote's failure
            lasting = folder and not isinstance(exc, (MemoryError, torch.OutOfMemoryError))
            with self._lock:
                self._failed[name] = (err, files_signature(folder) if lasting else None, time.monotonic())
            raise err from None
        with self._lock:
            self._failed.pop(name, None)
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
        """Pin names (so they are not evicted) and return their backends; pair with release. Models that
        one user needs together and that cannot fit the budget together are refused (InvalidRequest) as
        soon as that is known, rather than loaded over it (or evicted under it) on every request."""
        with self._lock:
            for n in names:
                self._pins[n] = self._pins.get(n, 0) + 1
        try:
            backends = {}
            for n in names:
                backends[n] = self.get(n)
                self._check_fits(backends)
            return backends
        except BaseException:
            self.release(names)
            raise

    def try_acquire(self, names: list[str]) -> bool:
        """Pin names only if every one is loaded now (True), without loading or waiting on a load (False:
        nothing pinned). Lets a caller that must not block take the fast path."""
        with self._lock:
            if any(n not in self._loaded for n in names):
                return False
            self._check_fits({n: self._loaded[n] for n in names})
            for n in names:
                self._pins[n] = self._pins.get(n, 0) + 1
                self._loaded.move_to_end(n)
            return True

    def _check_fits(self, backends: dict[str, CausalLM | RewardModel]) -> None:
        sizes = {n: b.param_bytes() for n, b in backends.items()}
        if (need := sum(sizes.values())) > self.budget:
            mib = ", ".join(f"{n} {v / 2**20:.1f} MiB" for n, v in sizes.items() if v)
            raise InvalidRequest(f"the models this request needs together ({mib}) take {need / 2**20:.1f} MiB, "
                                 f"over this server's memory budget of {self.budget / 2**20:.1f} MiB "
                                 "(server.memory_budget_mb)", "model")

    def is_loaded(self, name: str) -> bool:
        with self._lock:
            return name in self._loaded

    def estimate(self, name: str) -> int:
        """Bytes a model will take once loaded: its loaded size, else its weight files' size (0 when unknown:
        a hub id, a remote model, an adapter view)."""
        with self._lock:
            if name in self._loaded:
                return self._loaded[name].param_bytes()
        folder = local_folder(self.registry, name)
        if folder is None:
            return 0
        return sum(size for path, size, _ in files_signature(folder) if path.endswith(WEIGHT_FILES))

    def room_for(self, names: list[str]) -> bool:
        """Whether `names` fit beside the pinned models (what other users hold) without going over the budget:
        unpinned models are evicted as needed, pinned ones stay."""
        with self._lock:
            held = {n: b.param_bytes() for n, b in self._loaded.items() if self._pins.get(n)}
        need = sum(self.estimate(n) for n in dict.fromkeys(names) if n not in held)
        return sum(held.values()) + need <= self.budget

    def release(self, names: list[str]) -> None:
        with self._lock:
            for n in names:
                self._pins[n] -= 1
                if self._pins[n] == 0:
                    del self._pins[n]
            self._evict()

    def _evict(self, keep: str | None = None) -> None:
        """Drop least recently used unpinned models until the loaded ones fit the budget. A model goes with
        the adapters over it (`requires`), and stays while one of them is pinned or just loaded. Unloading
        happens under the lock: an adapter view leaving its host must not race the view's next load."""
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
                self._changed(n)

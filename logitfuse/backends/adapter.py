"""LoRA-adapter experts: the tuned model is the untuned model plus a PEFT adapter, on one copy of the weights.

An untuned model that some expert names with `adapter:` is loaded once as an AdapterHost; each adapter over
it is a view (AdapterLM) whose rows run through PEFT's mixed-adapter batches (`adapter_names` per row,
"__base__" for the untuned model itself). The views are ordinary backends with their own KV states, so the
engine treats them like any model, and `decode_group` runs the rows of several views of one host in one
forward. Adapters are checked before PEFT touches the host (folder, config, file, every weight's shape
against the layer it targets), so a bad adapter fails with its expert's name and leaves the host as it was.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import torch

from logitfuse.backends.hf import HFCausalLM
from logitfuse.backends.hf_state import HFState
from logitfuse.errors import AdapterError, require

BASE = "__base__"  # PEFT's name for rows without an adapter
WEIGHTS = "adapter_model.safetensors"


class AdapterHost:
    """The untuned model's module, wrapped in a PeftModel once the first adapter is added."""

    def __init__(self, module) -> None:
        self.module = module
        self.peft = None
        self.lock = threading.Lock()  # forwards and adapter surgery never overlap

    def call(self, adapter_names: list[str], **kwargs):
        with self.lock:
            if self.peft is None:
                return self.module(**kwargs)
            return self.peft(adapter_names=adapter_names, **kwargs)

    def adapters(self) -> list[str]:
        return [] if self.peft is None else list(self.peft.peft_config)

    def add(self, expert: str, folder: Path) -> None:
        require("adapters", "LoRA-adapter experts", "peft")
        from peft import PeftModel

        with self.lock:
            try:
                if self.peft is None:
                    self.peft = PeftModel.from_pretrained(self.module, str(folder), adapter_name=expert).eval()
                else:
                    self.peft.load_adapter(str(folder), adapter_name=expert)
            except Exception as err:
                raise AdapterError(expert, f"PEFT could not load {folder}: {type(err).__name__}: {err}") from None

    def remove(self, expert: str) -> None:
        with self.lock:
            if self.peft is not None and expert in self.peft.peft_config:
                self.peft.delete_adapter(expert)

    def adapter_bytes(self, expert: str) -> int:
        tag = f".{expert}."
        return sum(p.numel() * p.element_size() for n, p in self.module.named_parameters()
                   if ".lora_" in n and tag in n)

    def base_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for n, p in self.module.named_parameters() if ".lora_" not in n)


class AdapterLM(HFCausalLM):
    """One role over a shared host: the untuned model (adapter None) or the untuned model plus an adapter."""

    def __init__(self, name: str, host: AdapterHost, tokenizer, chat_template: bool = False,
                 adapter: str | None = None, requires: str | None = None) -> None:
        super().__init__(name, host.module, tokenizer, chat_template)
        self.host = host
        self.lock = host.lock  # one owner for the shared module: the host's
        self.adapter = adapter
        self.requires = requires  # the pool name of the host this view needs loaded
        self.shared_forward = id(host)  # views with equal keys can run in one forward (decode_group)

    def _key(self) -> str:
        if self.adapter is None:
            return BASE
        if self.adapter not in self.host.adapters():  # PEFT would silently run such rows as the base
            raise AdapterError(self.adapter, "its adapter was unloaded from the untuned model")
        return self.adapter

    def _call(self, adapter_names: list[str] | None = None, **kwargs):
        rows = kwargs["input_ids"].shape[0]
        return self.host.call(adapter_names or [self._key()] * rows, **kwargs)

    def param_bytes(self) -> int:
        return self.host.base_bytes() if self.adapter is None else self.host.adapter_bytes(self.adapter)

    def unload(self) -> None:
        """Called when the pool evicts this view: the adapter's weights leave the host."""
        if self.adapter is not None:
            self.host.remove(self.adapter)

    def decode_group(self, parts: list[tuple[AdapterLM, HFState, torch.Tensor]],
                     masks: list[torch.Tensor] | None = None, last_only: bool = False) -> list[torch.Tensor]:
        """decode() of several views of this host in one forward: the states are joined along the batch,
        each row runs with its view's adapter, and each state gets its rows back (views, not copies). The
        joined state is kept for the next step: while no part's rows change, the parts are not copied
        together again (their caches grow in place, kv_cache.py); only their masks are joined anew. masks
        and last_only as in decode(), one mask per part."""
        states = [s for _, s, _ in parts]
        counts = [view.rows(s) for view, s, _ in parts]
        tokens = torch.cat([t.to(self.device).view(n, -1) for (_, _, t), n in zip(parts, counts)])
        names = [view._key() for (view, _, _), n in zip(parts, counts) for _ in range(n)]
        merged = _rejoined(states) or self.concat(states)
        mask = torch.ones_like(tokens) if masks is None else torch.cat(masks).to(self.device)
        new, logits = self._forward(tokens, merged, mask, 1 if last_only else 0, adapter_names=names)
        for state, piece in zip(states, _cut(new, counts)):
            state.cache, state.mask, state.joined = piece.cache, piece.mask, piece.joined
            if masks is not None:
                self.compact_sparse(state)
        return list(logits.split(counts))

    def prefill_group(self, parts: list[tuple[AdapterLM, list[list[int]]]]) -> list[tuple[HFState, torch.Tensor]]:
        """prefill() of several views of this host in one forward (and one more for prompts resumed from the
        prefix cache, whose entries stay per view): each view gets its rows as a part of the joined state,
        which its first group decode then reuses without copying. Returns (state, last logits) per part."""
        views = [view for view, prompts in parts for _ in prompts]
        prompts = [p for _, ps in parts for p in ps]
        if any(len(p) == 0 for p in prompts):
            raise ValueError(f"{self.name}: empty prompt")
        if self.prefix_cache is None:
            whole, logits = self._prefill(prompts, adapter_names=[v._key() for v in views])
        else:
            whole, logits = self._prefill_cached(prompts, views)
        counts = [len(ps) for _, ps in parts]
        return list(zip(_cut(whole, counts), logits.split(counts)))


def _cut(whole: HFState, counts: list[int]) -> list[HFState]:
    """The consecutive parts of a joined state, counts[i] rows each: views of its tensors, each marked as cut
    from it, so that the next group forward over the same parts can reuse it (_rejoined)."""
    pieces, start = [], 0
    for i, n in enumerate(counts):
        part = slice(start, start + n)
        piece = HFState.of([(k[part], v[part]) for k, v in whole.layers], whole.mask[part])
        piece.joined = (whole, i, piece.cache)
        pieces.append(piece)
        start += n
    return pieces


def _rejoined(states: list[HFState]) -> HFState | None:
    """The state these parts were cut from at the last group forward, with their current masks, when every
    part is still what was cut (same cache, in the same place) and no other part belongs to it; else None."""
    first = states[0].joined
    if first is None:
        return None
    whole = first[0]
    for i, s in enumerate(states):
        if s.joined is None or s.joined[0] is not whole or s.joined[1] != i or s.cache is not s.joined[2]:
            return None
    length = whole.cache.get_seq_length()  # a part decoded on its own since then has grown apart from it
    if (sum(s.mask.shape[0] for s in states) != whole.mask.shape[0]
            or any(s.cache.get_seq_length() != length or s.mask.shape[1] != whole.mask.shape[1] for s in states)):
        return None
    whole.mask = torch.cat([s.mask for s in states])
    return whole


def load_host(name: str, path: str, dtype: str | None = None, device: str | None = None,
              chat_template: bool = False, gguf_file: str | None = None, tokenizers=None) -> AdapterLM:
    """The untuned model of adapter experts, loaded once; its own rows run without an adapter."""
    lm = HFCausalLM.load(name, path, dtype, device, chat_template, gguf_file, tokenizers=tokenizers)
    return AdapterLM(name, AdapterHost(lm.model), lm.tokenizer, chat_template)


def load_view(host_lm: AdapterLM, name: str, expert: str, folder: str) -> AdapterLM:
    """The tuned model of an adapter expert: its adapter added to the host (checked first)."""
    if not isinstance(host_lm, AdapterLM):
        raise AdapterError(expert, f"its untuned model {host_lm.name!r} was not loaded as an adapter host")
    path = Path(folder)
    check_adapter(expert, path, host_lm.host.module, host_lm.name)
    if expert not in host_lm.host.adapters():
        host_lm.host.add(expert, path)
    return AdapterLM(name, host_lm.host, host_lm.tokenizer, host_lm.chat_template, adapter=expert,
                     requires=host_lm.name)


def check_adapter(expert: str, path: Path, module, untuned: str) -> None:
    """Raise AdapterError unless path holds a readable LoRA adapter whose weights fit module's layers."""
    if not path.is_dir():
        raise AdapterError(expert, f"adapter folder {path} does not exist")
    config_file = path / "adapter_config.json"
    if not config_file.is_file():
        raise AdapterError(expert, f"{path} has no adapter_config.json (not a PEFT adapter folder)")
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError) as err:
        raise AdapterError(expert, f"{config_file} is not valid JSON: {err}") from None
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        raise AdapterError(expert, f"{config_file}: peft_type must be 'LORA', got {config.get('peft_type')!r}"
                           if isinstance(config, dict) else f"{config_file} is not a JSON object")
    shapes = _weight_shapes(expert, path / WEIGHTS)
    modules = dict(module.named_modules())
    for key, shape in shapes.items():
        _check_weight(expert, key, shape, modules, untuned)


def _weight_shapes(expert: str, weights: Path) -> dict[str, list[int]]:
    from safetensors import safe_open

    if not weights.is_file():
        raise AdapterError(expert, f"{weights} is missing")
    try:
        with safe_open(str(weights), "pt") as f:
            shapes = {k: list(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
            for k in shapes:  # reading every tensor finds a truncated or overwritten data region
                f.get_tensor(k)
    except Exception as err:
        raise AdapterError(expert, f"{weights} is corrupt or unreadable: {type(err).__name__}: {err}") from None
    if not shapes:
        raise AdapterError(expert, f"{weights} holds no weights")
    return shapes


def _check_weight(expert: str, key: str, shape: list[int], modules: dict, untuned: str) -> None:
    """lora_A of a linear layer is (r, in_features), lora_B (out_features, r)."""
    for part in (".lora_A.", ".lora_B."):
        if part in key:
            target = key.split(part)[0].removeprefix("base_model.model.")
            break
    else:
        return  # other adapter tensors (biases, saved embeddings) are PEFT's to check
    layer = modules.get(target)
    if layer is None:
        raise AdapterError(expert, f"adapter weight {key} targets {target}, which the untuned model {untuned!r} "
                           "does not have")
    base = layer.get_base_layer() if hasattr(layer, "get_base_layer") else layer
    weight = getattr(base, "weight", None)
    if weight is None or weight.dim() != 2 or len(shape) != 2:
        return
    dim = 1 if part == ".lora_A." else 0
    want = weight.shape[1] if dim == 1 else weight.shape[0]
    if shape[dim] != want:
        side = "in" if dim == 1 else "out"
        raise AdapterError(expert, f"adapter weight {key} has shape {tuple(shape)}, but {target} of the untuned "
                           f"model {untuned!r} has {side}_features {want} (was the adapter trained on another model?)")

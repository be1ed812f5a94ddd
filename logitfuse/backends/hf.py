"""Hugging Face backend: a causal LM from `transformers`, owning its KV cache.

Rows are left-padded; positions come from the attention mask (`cumsum - 1`), so padding, rows joining a
running batch and forgotten speculative positions never shift a row's positions.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field

import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
from transformers.utils import logging as hf_logging

from logitfuse.backends.base import tokenizer_vocab_info
from logitfuse.backends.kv_cache import GrowingCache
from logitfuse.backends.prefix_cache import PrefixCache
from logitfuse.errors import require
from logitfuse.ops.vocab import VocabInfo

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_device(device: str | None) -> torch.device:
    """`auto` (or None) picks CUDA when present, else CPU."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str | None, device: torch.device) -> torch.dtype:
    """`auto`: bfloat16 on CUDA, float32 on CPU."""
    if dtype in (None, "auto"):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {sorted(_DTYPES)} or 'auto'")
    return _DTYPES[dtype]


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


class HFCausalLM:
    """A `transformers` causal LM behind the backend protocol (see backends/base.py)."""

    can_score_prompt = True
    remote = False
    can_verify_blocks = True
    prefix_cache: PrefixCache | None = None  # set by the engine that uses it (server.prefix_cache)

    def __init__(self, name: str, model, tokenizer, chat_template: bool = False) -> None:
        self.name = name
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        self.device = next(model.parameters()).device
        cfg = model.config.get_text_config()
        self.max_context = int(getattr(cfg, "max_position_embeddings", 2048))
        self.logits_width = int(model.get_output_embeddings().weight.shape[0])
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        # transformers renamed `past_key_values` to `cache` (argument and output) within 5.x
        params = inspect.signature(self.model.forward).parameters
        self._cache_arg = "cache" if "cache" in params else "past_key_values"

    @classmethod
    def load(cls, name: str, path: str, dtype: str | None = None, device: str | None = None,
             chat_template: bool = False, gguf_file: str | None = None, compile: bool = False) -> HFCausalLM:
        """`from_pretrained` on a local folder or hub id (or a GGUF file in it), on the configured device/dtype."""
        dev = resolve_device(device)
        hf_logging.disable_progress_bar()
        if gguf_file:  # transformers reads GGUF through these two
            require("gguf", f"model {name!r} (a GGUF checkpoint)", "gguf", "accelerate")
        extra = {"gguf_file": gguf_file} if gguf_file else {}
        model = AutoModelForCausalLM.from_pretrained(path, dtype=resolve_dtype(dtype, dev), **extra).to(dev)
        lm = cls(name, model, AutoTokenizer.from_pretrained(path, **extra), chat_template=chat_template)
        if compile:
            lm.compile()
        return lm

    def compile(self) -> None:
        """torch.compile the forward pass with dynamic shapes. Batch size 1, prefill and decode, and one
        versus several new tokens each compile once; continuous batching then reuses those graphs."""
        import torch._dynamo

        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 32)
        self.model.forward = torch.compile(self.model.forward, dynamic=True)

    def warm(self) -> None:
        """One forward of one token, on the loading thread: the first call's one-off work (allocations,
        kernel choices) then never lands in a decoding step that other sequences wait on."""
        self._forward(torch.tensor([[self.pad_id]], device=self.device), None,
                      torch.ones((1, 1), dtype=torch.long, device=self.device), 1)

    def vocab_info(self, with_texts: bool = False) -> VocabInfo:
        return tokenizer_vocab_info(self.name, self.tokenizer, self.logits_width, with_texts)

    def param_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.model.parameters())

    def kv_bytes_per_token(self) -> int:
        """Keys and values of every layer for one position, from the model's config and dtype."""
        cfg = self.model.config.get_text_config()
        heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        width = next(self.model.parameters()).element_size()
        return 2 * cfg.num_hidden_layers * heads * head_dim * width

    def rows(self, state: HFState) -> int:
        return state.mask.shape[0]

    @torch.inference_mode()
    def _forward(self, ids: torch.Tensor, state: HFState | None, new_mask: torch.Tensor, keep: int, **extra):
        past = state.mask if state is not None else new_mask[:, :0]
        mask = torch.cat([past, new_mask], dim=-1)  # (B, T + k)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, past.shape[1]:]  # (B, k)
        cache = state.cache if state is not None else GrowingCache()
        out = self._call(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                         logits_to_keep=keep, **{self._cache_arg: cache}, **extra)
        return HFState(getattr(out, self._cache_arg), mask), out.logits.float()

    def _call(self, **kwargs):
        """One forward of the model (a backend sharing its weights with others overrides this)."""
        return self.model(**kwargs)

    def prefill(self, prompts: list[list[int]], all_logits: bool = False) -> tuple[HFState, torch.Tensor]:
        if any(len(p) == 0 for p in prompts):
            raise ValueError(f"{self.name}: empty prompt")
        if self.prefix_cache is None or all_logits:  # scoring needs every position's logits: no reuse
            return self._prefill(prompts, all_logits)
        return self._prefill_cached(prompts)

    def _prefill_cached(self, prompts: list[list[int]]) -> tuple[HFState, torch.Tensor]:
        """Prefill each distinct prompt once (n samples of one prompt share it), from its longest cached
        prefix where there is one (one forward per such row over the rest), the others batched from
        scratch; then keep every prompt's full blocks and put the rows back in the prompts' order."""
        cache = self.prefix_cache
        unique = list(dict.fromkeys(tuple(p) for p in prompts))
        found = [cache.longest(self.name, list(p)) for p in unique]
        parts = []  # (indices into unique, state, last logits (b, V))
        misses = [i for i, (n, _) in enumerate(found) if n == 0]
        if misses:
            parts.append((misses, *self._prefill([list(unique[i]) for i in misses])))
        for i, (n, layers) in enumerate(found):
            if n:
                past = HFState.of(layers, torch.ones((1, n), dtype=torch.long, device=self.device))
                rest = torch.tensor([unique[i][n:]], dtype=torch.long, device=self.device)
                state, logits = self._forward(rest, past, torch.ones_like(rest), 1)
                parts.append(([i], state, logits[:, -1]))
        for idx, state, _ in parts:
            for row, i in enumerate(idx):
                # a fresh prefill's row holds its prompt in its last positions (left padding): views, and the
                # cache copies only the blocks it does not hold yet
                start = state.mask.shape[1] - len(unique[i])
                cache.store(self.name, list(unique[i]), [(k[row:row + 1, :, start:], v[row:row + 1, :, start:])
                                                          for k, v in state.layers])
        state = parts[0][1] if len(parts) == 1 else self.concat([s for _, s, _ in parts])
        logits = torch.cat([lg for _, _, lg in parts])
        where = {unique[i]: r for r, i in enumerate(i for idx, _, _ in parts for i in idx)}
        rows = [where[tuple(p)] for p in prompts]
        if rows != list(range(len(where))):
            state, logits = self.select(state, rows), logits[rows]
        return state, logits

    def _prefill(self, prompts: list[list[int]], all_logits: bool = False) -> tuple[HFState, torch.Tensor]:
        """Left-padded prompts in one forward from an empty cache."""
        length = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), length), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), length), dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, length - len(p):] = torch.tensor(p, dtype=torch.long)
            mask[i, length - len(p):] = 1
        state, logits = self._forward(ids.to(self.device), None, mask.to(self.device), 0 if all_logits else 1)
        return state, (logits if all_logits else logits[:, -1])

    def decode(self, state: HFState, tokens: torch.Tensor) -> torch.Tensor:
        tokens = tokens.to(self.device).view(state.mask.shape[0], -1)  # (B, k)
        new_state, logits = self._forward(tokens, state, torch.ones_like(tokens), 0)
        state.cache, state.mask = new_state.cache, new_state.mask
        return logits

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
        longest = int(mask.sum(dim=1).max())
        if self.compact_when(mask.shape[1] - longest, longest):
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


class HFReward:
    """A sequence classifier whose first logit is the reward (Transfer Q*'s reward model)."""

    def __init__(self, name: str, model, tokenizer) -> None:
        self.name = name
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.device = next(model.parameters()).device
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token

    @classmethod
    def load(cls, name: str, path: str, dtype: str | None = None, device: str | None = None) -> HFReward:
        dev = resolve_device(device)
        hf_logging.disable_progress_bar()
        model = AutoModelForSequenceClassification.from_pretrained(path, dtype=resolve_dtype(dtype, dev)).to(dev)
        return cls(name, model, AutoTokenizer.from_pretrained(path))

    def param_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.model.parameters())

    @torch.inference_mode()
    def score(self, texts: list[str]) -> torch.Tensor:
        self.tokenizer.padding_side = "right"
        enc = self.tokenizer(texts, return_tensors="pt", padding=True, truncation=True).to(self.device)
        return self.model(**enc).logits[:, 0].float()


def probe_vocab(name: str, path: str) -> VocabInfo:
    """A checkpoint folder's vocabulary from its tokenizer and config files alone, without the weights
    (start-up checks; the logits width is the config's vocab_size, as the output embeddings have it)."""
    from transformers import AutoConfig

    width = int(AutoConfig.from_pretrained(path).get_text_config().vocab_size)
    return tokenizer_vocab_info(name, AutoTokenizer.from_pretrained(path), width)

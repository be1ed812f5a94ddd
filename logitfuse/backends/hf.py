"""Hugging Face backend: a causal LM from `transformers`, owning its KV cache.

Rows are left-padded; positions come from the attention mask (`cumsum - 1`), so padding, rows joining a
running batch and forgotten speculative positions never shift a row's positions (hf_state.py). Rows fed
different numbers of tokens in one call run packed where the architecture allows (packed.py).
"""

from __future__ import annotations

import inspect
import threading

import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
from transformers.utils import logging as hf_logging

from logitfuse.backends.base import tokenizer_vocab_info
from logitfuse.backends.hf_state import HFState, StateSurgery
from logitfuse.backends.kv_cache import GrowingCache
from logitfuse.backends.packed import packed_call, unuse_packed, use_packed
from logitfuse.backends.prefix_cache import PrefixCache
from logitfuse.backends.tokenizers import TokenizerStore
from logitfuse.backends.window import window_mask
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


def _contiguous_head(model) -> None:
    """Hand the output layer a contiguous input. transformers computes the last position's logits on the
    slice hidden[:, -1:], strided when there are several rows; with frozen weights (an adapter host's, which
    peft freezes) a strided input takes a batched matmul that reads the whole output matrix once per row:
    39 ms instead of a few for SmolLM2's at 16 rows, in every such prefill and masked ragged decode."""
    head = model.get_output_embeddings()
    if head is not None and not getattr(head, "_logitfuse_contiguous", False):
        head.register_forward_pre_hook(lambda _, args: (args[0].contiguous(), *args[1:]))
        head._logitfuse_contiguous = True


def _call_rows(extra: dict, rows: int) -> tuple[list[int], dict]:
    """For a packed call: each row's call row (rows running one adapter share one) and the call's arguments
    (one adapter name per call row)."""
    names = extra.get("adapter_names")
    if names is None:
        return [0] * rows, extra
    groups, firsts = [], []
    for i, name in enumerate(names):
        if not firsts or names[firsts[-1]] != name:
            firsts.append(i)
        groups.append(len(firsts) - 1)
    return groups, {**extra, "adapter_names": [names[i] for i in firsts]}


class HFCausalLM(StateSurgery):
    """A `transformers` causal LM behind the backend protocol (see backends/base.py)."""

    can_score_prompt = True
    remote = False
    can_verify_blocks = True
    decodes_masked = True  # decode(new_mask=, last_only=): ragged rows right-aligned, padding masked out
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
        _contiguous_head(model)
        # transformers renamed `past_key_values` to `cache` (argument and output) within 5.x
        params = inspect.signature(self.model.forward).parameters
        self._cache_arg = "cache" if "cache" in params else "past_key_values"
        self._packs = use_packed(self.model)  # ragged rows run packed (packed.py)
        # the model's owner: every forward of these weights runs under it, whichever engine lane (thread) asks;
        # views sharing one module (adapter.py) share their host's
        self.lock = threading.Lock()

    @classmethod
    def load(cls, name: str, path: str, dtype: str | None = None, device: str | None = None,
             chat_template: bool = False, gguf_file: str | None = None, compile: bool = False,
             tokenizers: TokenizerStore | None = None) -> HFCausalLM:
        """`from_pretrained` on a local folder or hub id (or a GGUF file in it), on the configured device/dtype;
        the tokenizer from `tokenizers` where given (read once, kept: backends/tokenizers.py)."""
        dev = resolve_device(device)
        hf_logging.disable_progress_bar()
        if gguf_file:  # transformers reads GGUF through these two
            require("gguf", f"model {name!r} (a GGUF checkpoint)", "gguf", "accelerate")
        extra = {"gguf_file": gguf_file} if gguf_file else {}
        model = AutoModelForCausalLM.from_pretrained(path, dtype=resolve_dtype(dtype, dev), **extra).to(dev)
        tok = (tokenizers or TokenizerStore()).get(path, gguf_file)
        lm = cls(name, model, tok, chat_template=chat_template)
        if compile:
            lm.compile()
        return lm

    def compile(self) -> None:
        """torch.compile the forward pass with dynamic shapes. Batch size 1, prefill and decode, and one
        versus several new tokens each compile once; continuous batching then reuses those graphs."""
        import torch._dynamo

        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 32)
        self.model.forward = torch.compile(self.model.forward, dynamic=True)
        self._packs = False  # compiled graphs run ragged rows padded
        unuse_packed(self.model)

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
        if keep == 1 and state is not None and self._packs and ids.shape[1] > 1 and not bool(new_mask.all()):
            groups, extra = _call_rows(extra, ids.shape[0])
            logits = packed_call(self._call, ids, positions, mask, new_mask, cache, self._cache_arg,
                                 groups, **extra)
            return HFState(cache, mask), logits[:, None]
        out = self._call(input_ids=ids, attention_mask=window_mask(self.model, mask, ids.shape[1]),
                         position_ids=positions, use_cache=True,
                         logits_to_keep=keep, **{self._cache_arg: cache}, **extra)
        return HFState(getattr(out, self._cache_arg), mask), out.logits.float()

    def _call(self, **kwargs):
        """One forward of the model, under its owner's lock (a backend sharing its weights with others
        overrides this)."""
        with self.lock:
            return self.model(**kwargs)

    def prefill(self, prompts: list[list[int]], all_logits: bool = False) -> tuple[HFState, torch.Tensor]:
        if any(len(p) == 0 for p in prompts):
            raise ValueError(f"{self.name}: empty prompt")
        if self.prefix_cache is None or all_logits:  # scoring needs every position's logits: no reuse
            return self._prefill(prompts, all_logits)
        return self._prefill_cached(prompts)

    def _prefill_cached(self, prompts: list[list[int]], views: list | None = None) -> tuple[HFState, torch.Tensor]:
        """Prefill each distinct prompt once (n samples of one prompt share it): those with a cached prefix
        from it, their rests in one forward; the others batched from scratch. Then keep every prompt's full
        blocks and put the rows back in the prompts' order. views[i]: the backend row i runs as (a view of
        this model's weights with its own adapter and cache entries; default: this one)."""
        cache = self.prefix_cache
        views = views or [self] * len(prompts)
        by_name = {v.name: v for v in views}
        unique = list(dict.fromkeys((v.name, tuple(p)) for v, p in zip(views, prompts)))
        found = [cache.longest(name, list(p)) for name, p in unique]

        def args(idx: list[int]) -> dict:  # each row's adapter, where the rows run as other views
            if all(by_name[unique[i][0]] is self for i in idx):
                return {}
            return {"adapter_names": [by_name[unique[i][0]]._key() for i in idx]}

        parts = []  # (indices into unique, state, last logits (b, V))
        misses = [i for i, (n, _) in enumerate(found) if n == 0]
        if misses:
            parts.append((misses, *self._prefill([list(unique[i][1]) for i in misses], **args(misses))))
        hits = [i for i, (n, _) in enumerate(found) if n]
        if hits:
            parts.append((hits, *self._resume([found[i] for i in hits], [unique[i][1] for i in hits], **args(hits))))
        for idx, state, _ in parts:
            for row, i in enumerate(idx):
                # a fresh prefill's row holds its prompt in its last positions (left padding): views, and the
                # cache copies only the blocks it does not hold yet
                name, prompt = unique[i]
                start = state.mask.shape[1] - len(prompt)
                cache.store(name, list(prompt), [(k[row:row + 1, :, start:], v[row:row + 1, :, start:])
                                                 for k, v in state.layers])
        state = parts[0][1] if len(parts) == 1 else self.concat([s for _, s, _ in parts])
        logits = torch.cat([lg for _, _, lg in parts])
        where = {unique[i]: r for r, i in enumerate(i for idx, _, _ in parts for i in idx)}
        rows = [where[(v.name, tuple(p))] for v, p in zip(views, prompts)]
        if rows != list(range(len(where))):
            state, logits = self.select(state, rows), logits[rows]
        return state, logits

    def _resume(self, found: list, prompts: list, **extra) -> tuple[HFState, torch.Tensor]:
        """Rows resumed from their cached prefixes (n, layers): their ragged rests in one forward, right-
        aligned with the padding masked out, then compacted, so each row holds its prompt in its last
        positions as after a fresh prefill. Returns (state, last logits (b, V))."""
        past = self.concat([HFState.of(layers, torch.ones((1, n), dtype=torch.long, device=self.device))
                            for n, layers in found])
        width = max(len(p) - n for (n, _), p in zip(found, prompts))
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, ((n, _), p) in enumerate(zip(found, prompts)):
            ids[row, width - len(p) + n:] = torch.tensor(p[n:], dtype=torch.long)
            mask[row, width - len(p) + n:] = 1
        state, logits = self._forward(ids.to(self.device), past, mask.to(self.device), 1, **extra)
        return (self.compact(state) if len(prompts) > 1 else state), logits[:, -1]

    def _prefill(self, prompts: list[list[int]], all_logits: bool = False, **extra) -> tuple[HFState, torch.Tensor]:
        """Left-padded prompts in one forward from an empty cache."""
        length = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), length), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), length), dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, length - len(p):] = torch.tensor(p, dtype=torch.long)
            mask[i, length - len(p):] = 1
        state, logits = self._forward(ids.to(self.device), None, mask.to(self.device), 0 if all_logits else 1,
                                      **extra)
        return state, (logits if all_logits else logits[:, -1])

    def decode(self, state: HFState, tokens: torch.Tensor, new_mask: torch.Tensor | None = None,
               last_only: bool = False) -> torch.Tensor:
        """Append tokens (B, k); new_mask (B, k), 0 where a token is padding that no later position sees
        (ragged rows right-aligned: every row's last token is then at k - 1). last_only: logits of that
        last position only, (B, 1, V)."""
        tokens = tokens.to(self.device).view(state.mask.shape[0], -1)  # (B, k)
        mask = torch.ones_like(tokens) if new_mask is None else new_mask.to(self.device)
        new_state, logits = self._forward(tokens, state, mask, 1 if last_only else 0)
        state.cache, state.mask = new_state.cache, new_state.mask
        if new_mask is not None:
            self.compact_sparse(state)
        return logits

class HFReward:
    """A sequence classifier whose first logit is the reward (Transfer Q*'s reward model)."""

    def __init__(self, name: str, model, tokenizer) -> None:
        self.name = name
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.device = next(model.parameters()).device
        self.lock = threading.Lock()
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
        with self.lock:  # the tokenizer's padding settings and the forward: one caller at a time
            self.tokenizer.padding_side = "right"
            enc = self.tokenizer(texts, return_tensors="pt", padding=True, truncation=True).to(self.device)
            return self.model(**enc).logits[:, 0].float()


def probe_vocab(name: str, path: str, tokenizers: TokenizerStore | None = None) -> VocabInfo:
    """A checkpoint folder's vocabulary from its tokenizer and config files alone, without the weights
    (start-up checks; the logits width is the config's vocab_size, as the output embeddings have it)."""
    from transformers import AutoConfig

    width = int(AutoConfig.from_pretrained(path).get_text_config().vocab_size)
    return tokenizer_vocab_info(name, (tokenizers or TokenizerStore()).get(path), width)

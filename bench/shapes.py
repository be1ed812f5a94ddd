"""Realistic shapes with random weights (speed does not depend on weight values): a 1B-class Llama base
and 100M-class expert pairs sharing a 32k vocabulary, built in memory on the best device."""

from __future__ import annotations

import zlib
from types import SimpleNamespace

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from logitfuse import LogitFuse
from logitfuse.backends.hf import HFCausalLM, resolve_device, resolve_dtype
from logitfuse.config.registry import Registry
from logitfuse.pool import ModelPool

VOCAB = 32000
SHAPES = {
    "large": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                  num_key_value_heads=4),  # ~1.1B
    "small": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
                  num_key_value_heads=4),  # ~110M
}
ROLES = {"base-large": "large", "base-small": "small", "tuned-small-qa": "small", "tuned-small-arith": "small"}


class WordTokenizer:
    """Words hashed to ids: enough of a tokenizer to drive the engine on random-weight models."""

    eos_token_id, pad_token_id, bos_token, eos_token, unk_token, chat_template = 2, 0, "<s>", "</s>", "<unk>", None

    def __len__(self) -> int:
        return VOCAB

    def get_vocab(self) -> dict[str, int]:
        return {f"t{i}": i for i in range(VOCAB)}

    def __call__(self, text: str):
        return SimpleNamespace(input_ids=[3 + zlib.crc32(w.encode()) % (VOCAB - 3) for w in text.split()] or [3])

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return "".join(f" t{i}" for i in ids)


def gpu_family(device: str | None = None) -> LogitFuse:
    dev = resolve_device(device)
    dtype = resolve_dtype("auto", dev)
    reg = Registry.model_validate({
        "models": {n: {"path": n} for n in ROLES},
        "experts": {"qa": {"tuned": "tuned-small-qa", "untuned": "base-small"},
                    "arith": {"tuned": "tuned-small-arith", "untuned": "base-small"}},
        "ensembles": {"large-qa": {"base": "base-large", "method": "proxy", "experts": ["qa"]},
                      "large-eft": {"base": "base-large", "method": "eft", "experts": ["qa"]},
                      "large-mix": {"base": "base-large", "method": "eft", "experts": ["qa", "arith"]},
                      "large-dlf": {"base": "base-large", "method": "dlf", "experts": ["qa", "arith"]}},
        "server": {"memory_budget_mb": 1 << 20, "max_batch": 64},
    })

    def loader(_reg, name: str) -> HFCausalLM:
        torch.manual_seed(zlib.crc32(name.encode()))
        cfg = LlamaConfig(vocab_size=VOCAB, max_position_embeddings=4096, **SHAPES[ROLES[name]])
        model = LlamaForCausalLM(cfg).to(dev, dtype)
        return HFCausalLM(name, model, WordTokenizer())

    return LogitFuse(reg, ModelPool(reg, loader=loader))

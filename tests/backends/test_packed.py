"""Packed ragged decoding (backends/packed.py): rows fed different numbers of tokens run packed, and the
logits, the cache and every later step equal the masked padded call's."""

import pytest
import torch
from transformers import (
    AutoTokenizer,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from logitfuse.backends import hf
from logitfuse.backends.hf import HFCausalLM
from logitfuse.backends.packed import layout, supports_packing

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [20, 21, 22, 23], [30, 31, 32]]


@pytest.fixture(scope="module")
def model(family):
    return HFCausalLM.load("base-large", str(family["base-large"]), dtype="float32")


def test_layout_places_each_rows_tokens_packed_and_right_aligned():
    new_mask = torch.tensor([[0, 0, 1], [1, 1, 1], [0, 1, 1], [0, 0, 0]])
    lay = layout(new_mask, [0, 0, 1, 1])  # two call rows: rows 0-1 and rows 2-3
    assert (lay.calls, lay.length) == (2, 4)  # call 0 packs 1 + 3 tokens, call 1 packs 2 + 0
    # right-aligned slot r * 3 + j -> packed position; 8 is the zero slot of the packed side
    assert lay.unpack.tolist() == [8, 8, 0, 1, 2, 3, 8, 4, 5, 8, 8, 8]
    # packed position -> right-aligned slot; 12 is the zero slot (call 1's unused tail)
    assert lay.pack.tolist() == [2, 3, 4, 5, 7, 8, 12, 12]
    assert lay.last.tolist()[:3] == [0, 3, 5]


def _run(model, packs: bool, steps: list[list[list[int]]], monkeypatch) -> list[torch.Tensor]:
    monkeypatch.setattr(model, "_packs", packs)
    state, _ = model.prefill(PROMPTS)
    outs = []
    for new in steps:
        width = max(map(len, new))
        ids = torch.tensor([[0] * (width - len(a)) + a for a in new])
        mask = torch.tensor([[0] * (width - len(a)) + [1] * len(a) for a in new])
        outs.append(model.decode(state, ids, new_mask=mask, last_only=True)[:, 0])
    outs.append(model.decode(state, torch.tensor([[90]] * len(PROMPTS)))[:, 0])  # a plain step after them
    return outs + [state.mask]


def test_packed_decode_equals_the_masked_padded_call(model, monkeypatch):
    assert model._packs  # a llama model: packed
    calls = []
    original = hf.packed_call
    monkeypatch.setattr(hf, "packed_call", lambda *a, **k: calls.append(1) or original(*a, **k))
    steps = [[[40], [41, 42, 43], [44, 45], [46]], [[50, 51], [52], [53], [54, 55, 56]],
             [[60], [61], [62], [63]], [[70, 71, 72], [], [73], [74, 75]]]
    packed = _run(model, True, steps, monkeypatch)
    padded = _run(model, False, steps, monkeypatch)
    assert len(calls) == 3  # the ragged steps; a step of one token per row runs as a plain call
    for i, (p, q) in enumerate(zip(packed[:-1], padded[:-1])):
        rows = [r for r in range(len(PROMPTS)) if i >= len(steps) or steps[i][r]]  # a row fed nothing: no logits
        torch.testing.assert_close(p[rows], q[rows], rtol=0, atol=1e-4)
    assert torch.equal(packed[-1], padded[-1])  # the same visible positions


SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             head_dim=8)


def _small(family, kind: str) -> HFCausalLM:
    """A random model of another architecture over the family's tokenizer."""
    tok = AutoTokenizer.from_pretrained(str(family["base-large"]))
    torch.manual_seed(3)
    config, cls = {"qwen2": (Qwen2Config, Qwen2ForCausalLM), "qwen3": (Qwen3Config, Qwen3ForCausalLM),
                   "mistral": (MistralConfig, MistralForCausalLM)}[kind]
    extra = {"sliding_window": None} if kind == "mistral" else {}
    model = cls(config(vocab_size=len(tok), **SMALL, **extra)).eval()
    model.config._attn_implementation = "sdpa"
    return HFCausalLM(kind, model, tok)


@pytest.mark.parametrize("kind", ["qwen2", "qwen3", "mistral"])
def test_other_listed_architectures_pack_exactly(family, kind, monkeypatch):
    model = _small(family, kind)
    assert model._packs
    steps = [[[40], [41, 42, 43], [44, 45], [46]], [[50, 51], [52], [53], [54, 55, 56]]]
    packed, padded = _run(model, True, steps, monkeypatch), _run(model, False, steps, monkeypatch)
    for p, q in zip(packed[:-1], padded[:-1]):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-4)
    assert torch.equal(packed[-1], padded[-1])


def test_windowed_or_unlisted_attention_runs_padded():
    windowed = MistralForCausalLM(MistralConfig(vocab_size=64, sliding_window=16, **SMALL))
    layered = Qwen2ForCausalLM(Qwen2Config(vocab_size=64, use_sliding_window=True, sliding_window=16,
                                           max_window_layers=1, **SMALL))
    gemma = Gemma3ForCausalLM(Gemma3TextConfig(vocab_size=64, **SMALL))
    assert not any(supports_packing(m) for m in (windowed, layered, gemma))
    assert supports_packing(MistralForCausalLM(MistralConfig(vocab_size=64, sliding_window=None, **SMALL)))

"""The KV cache that grows in place: the same keys, values and logits as transformers' own DynamicCache, a
step that writes into spare room instead of copying, and tensors handed in from elsewhere never written."""

import pytest
import torch
from transformers import DynamicCache

from logitfuse.backends.hf import HFCausalLM
from logitfuse.backends.kv_cache import HEADROOM, GrowingCache, GrowingLayer


def test_updates_equal_concatenation_and_reuse_the_buffer():
    g = torch.Generator().manual_seed(0)
    layer, ref_k, ref_v = GrowingLayer(), [], []
    ptrs = set()
    for new in [7, 1, 1, 3, 1] + [1] * 80:
        k, v = torch.randn(2, 3, new, 4, generator=g), torch.randn(2, 3, new, 5, generator=g)
        ref_k.append(k)
        ref_v.append(v)
        keys, values = layer.update(k, v)
        assert torch.equal(keys, torch.cat(ref_k, 2)) and torch.equal(values, torch.cat(ref_v, 2))
        assert layer.get_seq_length() == keys.shape[2]
        ptrs.add(keys.data_ptr())
    # 7 + 1 + 1 + 3 + 1 + 80 = 93 positions: one buffer of 7 + HEADROOM, then one regrowth, not 85 copies
    assert len(ptrs) == 2 and 93 <= layer._k.shape[2] <= 93 + HEADROOM + 93 // 8


def test_tensors_handed_in_are_copied_before_the_first_write():
    base = torch.randn(4, 2, 6, 3)
    before = base.clone()
    rows = base[1:3]  # a view of someone else's cache
    layer = GrowingLayer(rows, rows.clone())
    keys, _ = layer.update(torch.ones(2, 2, 1, 3), torch.ones(2, 2, 1, 3))
    assert torch.equal(base, before)  # the view's neighbours and the tensor itself are untouched
    assert torch.equal(keys[:, :, :6], before[1:3]) and torch.equal(keys[:, :, 6], torch.ones(2, 2, 3))
    # a layer whose keys someone replaced (batch surgery) copies them into a buffer of its own too
    layer.keys, layer.values = layer.keys[[1]], layer.values[[1]]
    keys, _ = layer.update(torch.zeros(1, 2, 1, 3), torch.zeros(1, 2, 1, 3))
    assert keys.shape == (1, 2, 8, 3) and torch.equal(keys[0, :, :6], before[2])


@pytest.fixture(scope="module")
def model(family):
    return HFCausalLM.load("base-large", str(family["base-large"]), dtype="float32")


def test_model_logits_equal_transformers_dynamic_cache(model):
    ids = torch.tensor([[5, 6, 7, 8, 9], [12, 13, 14, 15, 16]])
    caches = {"ours": GrowingCache(), "transformers": DynamicCache()}
    out = {}
    with torch.inference_mode():
        for name, cache in caches.items():
            logits = [model.model(input_ids=ids, use_cache=True, **{model._cache_arg: cache}).logits[:, -1]]
            for step in range(20):
                nxt = torch.tensor([[30 + step], [40 + step]])
                logits.append(model.model(input_ids=nxt, use_cache=True, **{model._cache_arg: cache}).logits[:, -1])
            out[name] = torch.stack(logits)
    assert isinstance(caches["ours"].layers[0], GrowingLayer)
    torch.testing.assert_close(out["ours"], out["transformers"], rtol=0, atol=1e-5)
    for (k, v), layer in zip([(c.keys, c.values) for c in caches["transformers"].layers], caches["ours"].layers):
        assert torch.equal(k, layer.keys) and torch.equal(v, layer.values)

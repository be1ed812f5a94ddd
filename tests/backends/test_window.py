"""Sliding windows over a row's visible tokens (backends/window.py): with hidden slots in its cache (forgotten
speculative tokens, the padding of a ragged call, rows of different lengths joined) a windowed model's
logits equal a clean prefill of exactly the tokens the row sees, past its window; and speculative and
cross-tokenizer decoding with windowed models equal their references."""

import pytest
import torch
from transformers import (
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from logitfuse import LogitFuse, SamplingParams
from logitfuse.api import SpeculativeEFT
from logitfuse.backends import hf
from logitfuse.backends.hf import HFCausalLM
from logitfuse.backends.packed import supports_packing
from logitfuse.backends.prefix_cache import PrefixCache
from logitfuse.backends.window import FULL, SLIDING, has_gaps, visible_masks, window_mask, window_of
from logitfuse.training.tiny import build_tokenizer, save
from tests.engine.test_cross_tokenizer import PROMPTS as CROSS_PROMPTS
from tests.engine.test_cross_tokenizer import _reference

WINDOW = 4
SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
             head_dim=8, max_position_embeddings=256)


def gemma(vocab: int, seed: int, attn: str = "sdpa", scale: float = 1.0, window: int = WINDOW):
    """A random Gemma 3 with sliding, full and sliding layers, its output layer scaled for sharp choices."""
    torch.manual_seed(seed)
    cfg = Gemma3TextConfig(vocab_size=vocab, sliding_window=window, layer_types=[SLIDING, FULL, SLIDING],
                           tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2, **SMALL)
    model = Gemma3ForCausalLM(cfg).eval()
    model.config._attn_implementation = attn
    with torch.no_grad():
        model.lm_head.weight.mul_(scale)
    return model


def windowed(kind: str, vocab: int):
    if kind.startswith("gemma3"):
        return gemma(vocab, 11, attn=kind.split("-")[1])
    torch.manual_seed(12)
    if kind == "mistral":  # every layer windowed: one 4D mask
        model = MistralForCausalLM(MistralConfig(vocab_size=vocab, sliding_window=WINDOW, **SMALL))
    else:  # full, sliding, sliding
        model = Qwen2ForCausalLM(Qwen2Config(vocab_size=vocab, use_sliding_window=True, sliding_window=WINDOW,
                                             max_window_layers=1, **SMALL))
    model.config._attn_implementation = "sdpa"
    return model.eval()


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def test_the_sliding_mask_counts_visible_tokens():
    mask = torch.tensor([[1, 1, 1, 0, 0, 1, 1], [0, 0, 1, 1, 1, 1, 1]])  # row 0: two slots hidden in place
    full, sliding = visible_masks(mask, 2, 3)
    assert full.shape == sliding.shape == (2, 1, 2, 7)
    assert sliding[0, 0].int().tolist() == [[0, 1, 1, 0, 0, 1, 0], [0, 0, 1, 0, 0, 1, 1]]  # 3 tokens each
    assert sliding[1, 0].int().tolist() == [[0, 0, 0, 1, 1, 1, 0], [0, 0, 0, 0, 1, 1, 1]]
    assert full[0, 0, 1].int().tolist() == [1, 1, 1, 0, 0, 1, 1]
    hidden = visible_masks(torch.tensor([[0, 1, 1]]), 3, 2)  # a padding query sees its own slot only
    assert [m[0, 0, 0].int().tolist() for m in hidden] == [[1, 0, 0], [1, 0, 0]]
    assert has_gaps(mask) and not has_gaps(mask[1:]) and not has_gaps(torch.tensor([[0, 0, 1, 1]]))


def test_which_models_get_window_masks(tok):
    vocab = len(tok)
    for kind in ("gemma3-sdpa", "gemma3-eager", "mistral", "qwen2"):
        model = windowed(kind, vocab)
        assert window_of(model) == WINDOW and not supports_packing(model)  # windows never run packed
    flash = gemma(vocab, 1, attn="flash_attention_2")  # a kernel that draws its own window: left alone
    plain = Qwen2ForCausalLM(Qwen2Config(vocab_size=vocab, **SMALL))
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, **SMALL))
    assert [window_of(m) for m in (flash, plain, llama)] == [None, None, None]
    gaps, left_padded = torch.tensor([[1, 0, 1, 1], [0, 1, 1, 1]]), torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])
    g, m = windowed("gemma3-sdpa", vocab), windowed("mistral", vocab)
    assert window_mask(g, left_padded, 1) is left_padded and window_mask(m, left_padded, 1) is left_padded
    assert sorted(window_mask(g, gaps, 2)) == [FULL, SLIDING]  # one mask per layer type
    assert window_mask(m, gaps, 2).shape == (2, 1, 2, 4)  # every layer windowed: one mask
    eager = window_mask(windowed("gemma3-eager", vocab), gaps, 1)[SLIDING]  # added to the scores
    assert eager.dtype == torch.float32 and eager[0, 0, 0].tolist() == [0.0, torch.finfo(torch.float32).min, 0, 0]


def _clean(lm: HFCausalLM, seqs: list[list[int]]) -> torch.Tensor:
    """Each row's next-token logits from a prefill of exactly its visible tokens, alone (every position's
    logits: a prefill the prefix cache stays out of). (B, V)"""
    return torch.cat([lm.prefill([s], all_logits=True)[1][:, -1] for s in seqs])


def _scenarios(lm: HFCausalLM) -> list[tuple[torch.Tensor, torch.Tensor, list[list[int]]]]:
    """Calls on states with hidden slots inside the window: (mask before the call, last logits, visible tokens)."""
    seqs = [list(range(10, 22)), [5, 6, 7, 8, 9], list(range(30, 39))]
    state, _ = lm.prefill(seqs)
    drafts = [[40, 41, 42], [43, 44, 45], [46, 47, 48]]
    lm.decode(state, torch.tensor(drafts))
    lm.forget_last(state, [3, 1, 2])  # speculative drafts rejected
    seqs = [s + d[:3 - n] for s, d, n in zip(seqs, drafts, [3, 1, 2])]
    out = []
    before = state.mask.clone()
    logits = lm.decode(state, torch.tensor([[50], [51], [52]]))[:, -1]
    seqs = [s + [t] for s, t in zip(seqs, [50, 51, 52])]
    out.append((before, logits, [list(s) for s in seqs]))
    new = [[60, 61, 62], [63], [64, 65]]  # ragged, right-aligned: the padding is hidden
    ids = torch.tensor([[0] * (3 - len(n)) + n for n in new])
    new_mask = torch.tensor([[0] * (3 - len(n)) + [1] * len(n) for n in new])
    before = torch.cat([state.mask, new_mask], dim=1)
    logits = lm.decode(state, ids, new_mask=new_mask, last_only=True)[:, 0]
    seqs = [s + n for s, n in zip(seqs, new)]
    out.append((before, logits, [list(s) for s in seqs]))
    other, _ = lm.prefill([[70, 71]])  # a short row joins, the others reordered
    joined = lm.concat([lm.select(state, [2, 0, 1]), other])
    seqs = [seqs[2], seqs[0], seqs[1], [70, 71]]
    before = joined.mask.clone()
    logits = lm.decode(joined, torch.tensor([[80], [81], [82], [83]]))[:, -1]
    out.append((before, logits, [s + [t] for s, t in zip(seqs, [80, 81, 82, 83])]))
    return out


@pytest.mark.parametrize("kind", ["gemma3-sdpa", "gemma3-eager", "mistral", "qwen2"])
def test_hidden_slots_leave_the_window_whole(tok, kind, monkeypatch):
    lm = HFCausalLM(kind, windowed(kind, len(tok)), tok)
    state, _ = lm.prefill([list(range(10, 30))])
    assert [k.shape[2] for k, _ in state.layers] == [20, 20, 20]  # sliding layers keep every position too
    for before, logits, seqs in _scenarios(lm):
        assert has_gaps(before) and max(map(len, seqs)) > 2 * WINDOW  # slots hidden, rows past the window
        torch.testing.assert_close(logits, _clean(lm, seqs), rtol=0, atol=1e-4)
    if kind == "gemma3-sdpa":  # the same calls with windows over slots, as transformers draws them: wrong
        monkeypatch.setattr(hf, "window_mask", lambda model, mask, new: mask)
        worst = max(float((logits - _clean(lm, seqs)).abs().max()) for _, logits, seqs in _scenarios(lm))
        assert worst > 1e-2


def test_resumed_prefixes_leave_the_window_whole(tok):
    """Rows resumed from cached prefixes run their rests right-aligned: the padding between a short rest and
    its prefix is hidden inside the window."""
    lm = HFCausalLM("g", gemma(len(tok), 13), tok)
    lm.prefix_cache = PrefixCache(budget_bytes=10**7, block=4)
    shared = list(range(10, 22))
    lm.prefill([shared + [5]])  # caches the shared blocks
    prompts = [shared + [30, 31, 32, 33, 34, 35], shared + [40], list(range(50, 59))]
    state, logits = lm.prefill(prompts)
    assert lm.prefix_cache.longest("g", prompts[1])[0] == len(shared)
    torch.testing.assert_close(logits, _clean(lm, prompts), rtol=0, atol=1e-4)
    step = lm.decode(state, torch.tensor([[60], [61], [62]]))[:, -1]
    torch.testing.assert_close(step, _clean(lm, [p + [t] for p, t in zip(prompts, [60, 61, 62])]), rtol=0, atol=1e-4)


@pytest.fixture(scope="module")
def windowed_lf(family, tok, tmp_path_factory):
    """A registry of Gemma models: a base and an expert pair on the family's tokenizer, and a cross-tokenizer
    pair (the names the cross-tokenizer reference reads) under the family's Llama base."""
    root = tmp_path_factory.mktemp("windowed")
    other = build_tokenizer(vocab_size=280, extra=["<extra>"])
    paths = {"g-base": save(gemma(len(tok), 21, scale=8.0), tok, root / "g-base"),
             "g-tuned": save(gemma(len(tok), 22, scale=8.0), tok, root / "g-tuned"),
             "g-untuned": save(gemma(len(tok), 23, scale=8.0), tok, root / "g-untuned"),
             "foreign": save(gemma(len(other), 24, scale=8.0), other, root / "foreign"),
             "foreign-small": save(gemma(len(other), 25, scale=8.0), other, root / "foreign-small"),
             "base-large": family["base-large"]}
    models = "\n".join(f"  {n}: {{path: {p}, dtype: float32}}" for n, p in paths.items())
    (root / "windowed.yaml").write_text(
        f"models:\n{models}\nexperts:\n  ga: {{tuned: g-tuned, untuned: g-untuned}}\n"
        "  xa: {tuned: foreign, untuned: foreign-small, cross_tokenizer: true}\n"
        "ensembles:\n  proxy-g: {base: g-base, method: proxy, experts: [ga], alpha: 1.0}\n"
        "  proxy-x: {base: base-large, method: proxy, experts: [xa], alpha: 0.7}\n"
        "server: {memory_budget_mb: 512, max_batch: 16}\n")
    return LogitFuse(root / "windowed.yaml")


def test_speculative_eft_with_windowed_models_equals_plain_greedy(windowed_lf):
    lf = windowed_lf
    prompts = ["the red city of the north and the south", "one", "king queen river blue green city"]
    sp = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    for fusion_params in ({"method": "eft"}, {"method": "proxy", "alpha": 0.7}):
        plain = lf.generate("proxy-g", prompts, sp, fusion_params)
        for k in (2, 4):
            spec = SpeculativeEFT(lf, k=k)
            out = spec.generate([r for p in prompts for r in lf.requests("proxy-g", p, sp, fusion_params)])
            assert [o.token_ids for o in out] == [o.token_ids for o in plain]
            assert 0 < spec.stats.accepted < spec.stats.drafted  # drafts were rejected: slots were hidden


@pytest.mark.parametrize("method,param,temperature", [("proxy", "alpha", 0.0), ("eft", "beta", 1.0)])
def test_a_windowed_cross_tokenizer_expert_equals_recomputation(windowed_lf, method, param, temperature):
    lf = windowed_lf
    fusion_params = {"method": method, "experts": ["xa"], param: 0.7}
    sps = [SamplingParams(max_tokens=16, temperature=temperature, seed=i + 1, ignore_eos=True)
           for i in range(len(CROSS_PROMPTS))]
    reqs = [r for p, sp in zip(CROSS_PROMPTS, sps) for r in lf.requests("proxy-x", p, sp, fusion_params)]
    got = {r.rid: [] for r in reqs}
    for ev in lf.stream(reqs):
        if ev.token_id is not None:
            got[ev.rid].append(ev.token_id)
    for r, p, sp in zip(reqs, CROSS_PROMPTS, sps):
        assert len(lf.pool.get("foreign").tokenizer(p).input_ids) + len(got[r.rid]) > 2 * WINDOW
        assert got[r.rid] == _reference(lf, p, method, sp), p

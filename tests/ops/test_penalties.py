"""Penalties and token masks equal float64 references of vLLM's formulas, written out per token."""

import math

import torch

from logitfuse.ops.penalties import (
    apply_penalties,
    bad_word_bans,
    ban,
    bitmask_to_bool,
    id_mask,
    token_counts,
)


def reference(scores, prompt, output, r, f, p):
    """vLLM, token by token in float64: repetition over prompt + output, frequency and presence over output."""
    out = []
    for row, pr, ou, ri, fi, pi in zip(scores.tolist(), prompt, output, r, f, p):
        new = []
        for tok, x in enumerate(row):
            seen = tok in pr or tok in ou
            if seen:
                x = x / ri if x > 0 else x * ri
            count = ou.count(tok)
            x = x - fi * count - pi * (1.0 if count else 0.0)
            new.append(x)
        out.append(new)
    return torch.tensor(out, dtype=torch.float64)


def test_penalties_equal_the_float64_reference():
    g = torch.Generator().manual_seed(0)
    V = 40
    scores = torch.randn(4, V, generator=g, dtype=torch.float64) * 3
    prompt = [[1, 2, 3, 3], [5], [], [7, 8, 39]]
    output = [[3, 4, 4, 4], [], [0, 0, 11], [8, 8, 9]]
    r, f, p = [1.3, 0.7, 2.0, 1.0], [0.5, -0.4, 0.0, 2.0], [0.25, 1.5, -2.0, 0.0]
    got = apply_penalties(scores, token_counts(prompt, V).double(), token_counts(output, V).double(),
                          torch.tensor(r, dtype=torch.float64), torch.tensor(f, dtype=torch.float64),
                          torch.tensor(p, dtype=torch.float64))
    want = reference(scores, prompt, output, r, f, p)
    assert torch.allclose(got, want, rtol=0, atol=1e-12)
    # the prompt alone never draws frequency or presence penalties: token 1 of row 0 only gets repetition
    assert math.isclose(got[0, 1].item(), scores[0, 1].item() / 1.3 if scores[0, 1] > 0 else scores[0, 1].item() * 1.3)


def test_neutral_penalties_keep_the_scores_exactly_and_masks_stay_masked():
    scores = torch.tensor([[1.5, -2.0, float("-inf"), 0.0]])
    counts = torch.tensor([[1.0, 2.0, 3.0, 1.0]])
    same = apply_penalties(scores, counts, counts, torch.ones(1), torch.zeros(1), torch.zeros(1))
    assert torch.equal(same, scores)
    hard = apply_penalties(scores, counts, counts, torch.tensor([3.0]), torch.tensor([2.0]), torch.tensor([1.0]))
    assert hard[0, 2] == float("-inf") and hard[0, 0].item() == 1.5 / 3 - 2 * 1 - 1
    assert hard[0, 1].item() == -2.0 * 3 - 2 * 2 - 1 and hard[0, 3].item() == 0.0 * 3 - 2 - 1


def test_token_counts_and_id_masks_ignore_ids_outside_the_vocabulary():
    c = token_counts([[0, 0, 2, 9, -1], []], 3)
    assert c.tolist() == [[2.0, 0.0, 1.0], [0.0, 0.0, 0.0]]
    m = id_mask([(1, 5), ()], 3)
    assert m.tolist() == [[False, True, False], [False, False, False]]
    assert ban(torch.zeros(2, 3), m)[0].tolist() == [0.0, float("-inf"), 0.0]


def test_bitmask_unpacks_bit_j_of_word_w_as_token_32w_plus_j():
    allowed = [0, 5, 31, 32, 63, 64, 70]
    words = torch.zeros(3, dtype=torch.int64)
    for t in allowed:
        words[t // 32] |= 1 << (t % 32)
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)  # bit 31 is the sign bit
    got = bitmask_to_bool(words[None], 80)[0]
    assert got.nonzero().flatten().tolist() == allowed
    assert bitmask_to_bool(words[None], 40)[0].nonzero().flatten().tolist() == [0, 5, 31, 32]


def test_bad_words_ban_a_last_token_only_after_the_rest_of_the_word():
    words = [[7], [3, 4, 5]]
    assert bad_word_bans([], words) == [7]
    assert bad_word_bans([1, 3], words) == [7]
    assert bad_word_bans([1, 3, 4], words) == [7, 5]
    assert bad_word_bans([4], words) == [7]

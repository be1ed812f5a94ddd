"""Sampling warps and per-row seeded draws."""

import torch

from logitfuse.ops.sampling import SamplingTensors, apply_min_p, apply_top_k, apply_top_p, make_generator, sample, warp

NEG = float("-inf")


def test_top_k_keeps_k_best_per_row_and_zero_is_off():
    s = torch.tensor([[1.0, 4.0, 3.0, 2.0], [1.0, 4.0, 3.0, 2.0]])
    out = apply_top_k(s, torch.tensor([2, 0]))
    assert out[0].tolist() == [NEG, 4.0, 3.0, NEG]
    assert out[1].tolist() == s[1].tolist()


def test_top_p_keeps_the_smallest_nucleus_reaching_p():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    out = apply_top_p(probs.log(), torch.tensor([0.8]))
    assert torch.isfinite(out[0]).tolist() == [True, True, False, False]
    out = apply_top_p(probs.log(), torch.tensor([0.81]))
    assert torch.isfinite(out[0]).tolist() == [True, True, True, False]
    out = apply_top_p(probs.log(), torch.tensor([0.01]))
    assert torch.isfinite(out[0]).tolist() == [True, False, False, False]


def test_min_p_drops_tokens_below_fraction_of_best():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    out = apply_min_p(probs.log(), torch.tensor([0.2]))  # threshold 0.1
    assert torch.isfinite(out[0]).tolist() == [True, True, True, False]


def test_greedy_rows_take_argmax_and_sampled_rows_follow_the_distribution():
    scores = torch.log(torch.tensor([[0.1, 0.6, 0.3]] * 2))
    params = SamplingTensors.build([(0.0, -1, 1.0, 0.0), (1.0, -1, 1.0, 0.0)])
    counts = torch.zeros(3)
    g = make_generator(0)
    for _ in range(3000):
        t = sample(scores, params, [None, g])
        assert t[0].item() == 1
        counts[t[1]] += 1
    freq = counts / counts.sum()
    assert torch.allclose(freq, torch.tensor([0.1, 0.6, 0.3]), atol=0.03)


def test_seeded_rows_do_not_depend_on_neighbours():
    scores = torch.randn(3, 20, generator=torch.Generator().manual_seed(0))
    params = SamplingTensors.build([(1.0, -1, 1.0, 0.0)] * 3)
    a = [sample(scores, params, [make_generator(1), make_generator(2), make_generator(3)])[1] for _ in range(1)]
    b = sample(scores[1:2], SamplingTensors.build([(1.0, -1, 1.0, 0.0)]), [make_generator(2)])[0]
    assert a[0] == b


def test_logit_bias_is_added_before_temperature_and_argmax():
    scores = torch.tensor([[2.0, 1.0, 0.0], [0.0, 0.5, 1.0]])
    params = SamplingTensors.build([(0.0, -1, 1.0, 0.0), (2.0, -1, 1.0, 0.0)], biases=[((0, -100.0),), ()], width=3)
    assert sample(scores, params, [None, None]).tolist()[0] == 1  # the ban moves greedy to the runner-up
    warped = warp(scores, params)
    assert torch.allclose(warped[0], torch.tensor([-98.0, 1.0, 0.0]))
    assert torch.allclose(warped[1], scores[1] / 2)  # a row without bias is untouched
    assert SamplingTensors.build([(0.0, -1, 1.0, 0.0)], biases=[()], width=3).bias is None


def test_long_logit_bias_equals_its_entries_and_a_repeated_token_keeps_its_last_value():
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 5000, (3000,), generator=gen).tolist()
    values = (torch.rand(3000, generator=gen) * 200 - 100).tolist()
    pairs = tuple(zip(ids, values))
    expected = torch.zeros(2, 5000)
    for t, v in pairs:  # the definition, one entry at a time: a later entry overwrites an earlier one
        expected[1, t] = v
    for _ in range(2):  # the second build reads the request's cached index
        bias = SamplingTensors.build([(0.0, -1, 1.0, 0.0)] * 2, biases=[(), pairs], width=5000).bias
        assert torch.equal(bias, expected)
    other = tuple((t, -1.0) for t in ids[:10])  # another request's list is its own
    assert torch.equal(SamplingTensors.build([(0.0, -1, 1.0, 0.0)], biases=[other], width=5000).bias[0, ids[:10]],
                       torch.full((10,), -1.0))

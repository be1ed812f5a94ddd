"""Every fusion method against an independent float64 reference, and the identities of ALGORITHMS.md."""

import ast
from pathlib import Path

import numpy as np
import pytest
import torch

from logitfuse.ops import fusion

B, T, V = 4, 3, 50


def rand(*shape, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * 3).to(dtype)


def np_log_softmax(x):
    x = np.asarray(x, dtype=np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def ref_proxy(zl, zt, zs, alpha):
    """z_L + sum_t alpha_t (z_S+_t - z_S), row by row in float64."""
    out = np.array(zl, dtype=np.float64)
    for b in range(out.shape[0]):
        for t in range(zt.shape[1]):
            out[b] += alpha[b][t] * (np.float64(zt[b, t]) - np.float64(zs[b]))
    return np_log_softmax(out)


def ref_eft(zl, zt, zs, beta, w):
    ll, ls = np_log_softmax(zl), np_log_softmax(zs)
    lt = np_log_softmax(zt)
    out = ll.copy()
    for b in range(out.shape[0]):
        for t in range(zt.shape[1]):
            out[b] += beta[b] * w[b][t] * (lt[b, t] - ls[b])
    return np_log_softmax(out)


def dist(scores):
    return torch.log_softmax(scores.double(), dim=-1).numpy()


@pytest.fixture
def logits():
    return rand(B, V, seed=1), rand(B, T, V, seed=2), rand(B, V, seed=3)


def test_proxy_matches_float64_reference_with_per_row_alphas(logits):
    zl, zt, zs = logits
    alpha = rand(B, T, seed=4).abs()
    got = dist(fusion.proxy_tune(zl, zt, zs, alpha))
    want = ref_proxy(zl.numpy(), zt.numpy(), zs.numpy(), alpha.numpy())
    np.testing.assert_allclose(np.exp(got), np.exp(want), rtol=1e-5, atol=1e-7)


def test_eft_matches_float64_reference_with_interpolation_weights(logits):
    zl, zt, zs = logits
    beta, w = torch.tensor([1.0, 0.5, 2.0, 0.0]), torch.softmax(rand(B, T, seed=5), dim=-1)
    got = dist(fusion.eft(zl, zt, zs, beta, w))
    want = ref_eft(zl.numpy(), zt.numpy(), zs.numpy(), beta.numpy(), w.numpy())
    np.testing.assert_allclose(np.exp(got), np.exp(want), rtol=1e-5, atol=1e-7)


def test_eft_downscaling_is_the_same_function_with_roles_swapped(logits):
    zl, zt, zs = logits  # small base zs steered by a large pair (zt[:,0] tuned, zl untuned)
    got = dist(fusion.eft(zs, zt[:, :1], zl, torch.ones(B), torch.ones(B, 1)))
    want = ref_eft(zs.numpy(), zt[:, :1].numpy(), zl.numpy(), np.ones(B), np.ones((B, 1)))
    np.testing.assert_allclose(np.exp(got), np.exp(want), rtol=1e-5, atol=1e-7)


def test_zero_coefficients_give_the_base_distribution_exactly(logits):
    zl, zt, zs = logits
    base = torch.log_softmax(zl, dim=-1)
    zero = torch.zeros(B, T)
    assert torch.equal(torch.log_softmax(fusion.proxy_tune(zl, zt, zs, zero), -1), base)
    assert torch.equal(torch.log_softmax(fusion.eft(zl, zt, zs, torch.zeros(B), torch.ones(B, T)), -1), base)
    assert torch.equal(torch.log_softmax(fusion.dlf_combine(zl, zt, zs, zero), -1), base)


def test_tuned_equal_to_untuned_gives_the_base(logits):
    zl, _, zs = logits
    same = zs.unsqueeze(1).repeat(1, T, 1)
    base = torch.log_softmax(zl, dim=-1)
    for out in (fusion.proxy_tune(zl, same, zs, torch.ones(B, T)),
                fusion.eft(zl, same, zs, torch.ones(B), torch.ones(B, T)),
                fusion.dlf_combine(zl, same, zs, torch.rand(B, T))):
        torch.testing.assert_close(torch.log_softmax(out, -1), base, rtol=0, atol=1e-6)


@pytest.mark.parametrize("which", ["base", "tuned", "untuned"])
def test_per_row_constant_shift_changes_nothing(logits, which):
    zl, zt, zs = logits
    c = torch.tensor([5.0, -3.0, 100.0, 0.25])
    shifted = {"base": (zl + c[:, None], zt, zs), "tuned": (zl, zt + c[:, None, None], zs),
               "untuned": (zl, zt, zs + c[:, None])}[which]
    alpha = torch.full((B, T), 0.7)
    for f in (lambda a, b, u: fusion.proxy_tune(a, b, u, alpha),
              lambda a, b, u: fusion.eft(a, b, u, torch.ones(B), torch.full((B, T), 1 / T))):
        torch.testing.assert_close(torch.softmax(f(*shifted), -1), torch.softmax(f(zl, zt, zs), -1),
                                   rtol=1e-5, atol=1e-6)


def test_proxy_with_alpha_equals_eft_with_beta_alpha(logits):
    zl, zt, zs = logits
    for a in (0.3, 1.0, 1.7):
        p = fusion.proxy_tune(zl, zt[:, :1], zs, torch.full((B, 1), a))
        e = fusion.eft(zl, zt[:, :1], zs, torch.full((B,), a), torch.ones(B, 1))
        torch.testing.assert_close(torch.softmax(p, -1), torch.softmax(e, -1), rtol=1e-5, atol=1e-6)


def test_interpolation_with_one_hot_weights_equals_upscaling_with_that_expert(logits):
    zl, zt, zs = logits
    w = torch.tensor([[1.0, 0.0, 0.0]] * B)
    inter = fusion.eft(zl, zt, zs, torch.ones(B), w)
    single = fusion.eft(zl, zt[:, :1], zs, torch.ones(B), torch.ones(B, 1))
    torch.testing.assert_close(torch.softmax(inter, -1), torch.softmax(single, -1), rtol=1e-6, atol=1e-7)


def test_masked_tokens_stay_masked_and_never_nan(logits):
    zl, zt, zs = logits
    zl, zt, zs = zl.clone(), zt.clone(), zs.clone()
    zl[:, -5:] = float("-inf")
    zt[:, :, -5:] = float("-inf")
    zs[:, -5:] = float("-inf")
    zt[0, 1, 3] = float("-inf")  # one expert masks one token
    for out in (fusion.proxy_tune(zl, zt, zs, torch.ones(B, T)),
                fusion.eft(zl, zt, zs, torch.ones(B), torch.ones(B, T)),
                fusion.dlf_combine(zl, zt, zs, torch.ones(B, T))):
        assert not torch.isnan(out).any()
        assert torch.isinf(out[:, -5:]).all() and (out[:, -5:] < 0).all()
        assert out[0, 3] == float("-inf")
        assert torch.isfinite(out[1:, :-5]).all()


def test_base_only_is_the_base():
    z = rand(B, V)
    assert torch.equal(fusion.base_only(z), z)


def ref_tqstar(z, cand, q, alpha):
    lp = np_log_softmax(z)
    out = np.full_like(lp, -np.inf)
    for b in range(lp.shape[0]):
        for j, tok in enumerate(cand[b]):
            out[b, tok] = lp[b, tok] + q[b, j] / alpha[b]
    return np_log_softmax(out)


def test_tqstar_matches_reference_and_is_zero_outside_candidates():
    z = rand(B, V, seed=7)
    cand = fusion.top_k_candidates(z, 5)
    q, alpha = rand(B, 5, seed=8), torch.tensor([1.0, 0.5, 2.0, 10.0])
    got = dist(fusion.tqstar_scores(z, cand, q, alpha))
    want = ref_tqstar(z.numpy(), cand.numpy(), q.numpy(), alpha.numpy())
    np.testing.assert_allclose(np.exp(got), np.exp(want), rtol=1e-5, atol=1e-7)
    outside = torch.ones(B, V, dtype=torch.bool).scatter(-1, cand, False)
    assert torch.isinf(torch.from_numpy(got)[outside]).all()


def test_tqstar_infinite_alpha_or_constant_q_is_pi_sft_restricted_to_top_k():
    z = rand(B, V, seed=9)
    cand = fusion.top_k_candidates(z, 6)
    restricted = torch.full_like(z, float("-inf")).scatter(-1, cand, z.gather(-1, cand))
    want = torch.softmax(restricted, -1)
    inf = fusion.tqstar_scores(z, cand, rand(B, 6, seed=10), torch.full((B,), float("inf")))
    const = fusion.tqstar_scores(z, cand, torch.full((B, 6), 3.0), torch.ones(B))
    torch.testing.assert_close(torch.softmax(inf, -1), want)
    torch.testing.assert_close(torch.softmax(const, -1), want)


def test_tqstar_k1_is_greedy_and_indirect_with_equal_rewards_is_direct():
    z = rand(B, V, seed=11)
    cand = fusion.top_k_candidates(z, 1)
    out = fusion.tqstar_scores(z, cand, rand(B, 1, seed=12) * 100, torch.ones(B))
    assert torch.equal(out.argmax(-1), z.argmax(-1))
    r = rand(B, 4, 3, seed=13)
    torch.testing.assert_close(fusion.tqstar_q_indirect(r, r, beta=2.0), fusion.tqstar_q_direct(r))


def test_indirect_q_matches_reference():
    r, rbl = rand(2, 3, 4, seed=14, dtype=torch.float64), rand(2, 3, 4, seed=15, dtype=torch.float64)
    want = (np.exp((r.numpy() - rbl.numpy()) / 2.0) * r.numpy()).mean(-1)
    np.testing.assert_allclose(fusion.tqstar_q_indirect(r, rbl, 2.0).numpy(), want, rtol=1e-12)


@pytest.mark.parametrize("module", ["fusion.py", "weights.py", "sampling.py", "vocab.py"])
def test_pure_modules_import_nothing_but_torch(module):
    tree = ast.parse((Path(__file__).parents[2] / "logitfuse" / "ops" / module).read_text())
    imported = {(n.module or "") if isinstance(n, ast.ImportFrom) else a.name
                for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))
                for a in (n.names if isinstance(n, ast.Import) else [None])}
    allowed = {"__future__", "torch", "dataclasses", "collections.abc", "logitfuse.ops.fusion", "logitfuse.errors"}
    assert imported <= allowed, imported - allowed

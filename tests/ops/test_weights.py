"""The DLF weight solver against a brute-force float64 loop over the grid, and its identities."""

import numpy as np
import pytest
import torch

from logitfuse.methods.dlf import GRID
from logitfuse.ops.weights import make_grid, solve_dlf


def lsm(x):
    x = np.asarray(x, np.float64)
    m = x.max()
    return x - m - np.log(np.exp(x - m).sum())


def kl(a, b):
    pa = np.exp(a)
    return float((pa * (a - b)).sum())


def ref_loss(zl, zs, zt, a):
    """loss(a) of ALGORITHMS.md for one row, a (T,), in float64 with plain loops."""
    p, q = lsm(zl), lsm(zs)
    fused = np.array(zl, np.float64)
    for t in range(len(a)):
        fused = fused + a[t] * (np.float64(zt[t]) - np.float64(zs))
    pt = lsm(fused)
    total = 0.0
    for t in range(len(zt)):
        qt = lsm(zt[t])
        total += (kl(pt, p) - kl(qt, q)) ** 2 + (kl(p, pt) - kl(q, qt)) ** 2
    return total


def ref_one_expert(zl, zs, zt, grid):
    best, best_a = None, None
    for t in range(len(zt)):
        for g in grid:
            a = np.zeros(len(zt))
            a[t] = g
            loss = ref_loss(zl, zs, zt, a)
            if best is None or loss < best:
                best, best_a = loss, a
    return best_a, best


def test_grid_is_exact_tenths():
    g = make_grid(*GRID)
    assert g.numel() == 21
    assert g.tolist() == [k / 10 for k in range(21)]


@pytest.mark.parametrize("experts", [1, 3])
def test_one_expert_matches_brute_force(experts):
    gen = torch.Generator().manual_seed(experts)
    b, v = 5, 40
    zl, zs = torch.randn(b, v, generator=gen) * 2, torch.randn(b, v, generator=gen) * 2
    zt = zs.unsqueeze(1) + torch.randn(b, experts, v, generator=gen)
    res = solve_dlf(zl.double(), zs.double(), zt.double(), make_grid(*GRID), "one_expert")
    grid = make_grid(*GRID).tolist()
    for row in range(b):
        want_a, want_loss = ref_one_expert(zl[row].numpy(), zs[row].numpy(), zt[row].numpy(), grid)
        np.testing.assert_allclose(res.weights[row].numpy(), want_a, atol=1e-12)
        assert res.loss[row].item() == pytest.approx(want_loss, rel=1e-9, abs=1e-12)
        assert (res.weights[row] != 0).sum() <= 1


def test_equal_large_and_small_picks_one():
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(3, 30, generator=gen)
    zt = (z + torch.randn(3, 30, generator=gen)).unsqueeze(1)
    res = solve_dlf(z, z.clone(), zt, make_grid(*GRID), "one_expert")
    assert res.weights.flatten().tolist() == [1.0, 1.0, 1.0]


def test_expert_equal_to_untuned_picks_zero():
    gen = torch.Generator().manual_seed(1)
    zl, zs = torch.randn(2, 30, generator=gen), torch.randn(2, 30, generator=gen)
    res = solve_dlf(zl, zs, zs.unsqueeze(1).repeat(1, 2, 1), make_grid(*GRID), "one_expert")
    assert res.weights.abs().sum().item() == 0.0


def test_loss_is_finite_and_nonnegative_with_masked_tail():
    gen = torch.Generator().manual_seed(2)
    zl, zs = torch.randn(2, 30, generator=gen), torch.randn(2, 30, generator=gen)
    zt = torch.randn(2, 2, 30, generator=gen)
    for z in (zl, zs, zt):
        z[..., -4:] = float("-inf")
    res = solve_dlf(zl, zs, zt, make_grid(*GRID), "one_expert")
    assert torch.isfinite(res.loss).all() and (res.loss >= 0).all()
    assert torch.isfinite(res.weights).all()


def test_joint_mode_is_no_worse_than_one_expert():
    gen = torch.Generator().manual_seed(3)
    zl, zs = torch.randn(4, 30, generator=gen).double(), torch.randn(4, 30, generator=gen).double()
    zt = zs.unsqueeze(1) + torch.randn(4, 2, 30, generator=gen).double()
    grid = make_grid(*GRID)
    one, joint = solve_dlf(zl, zs, zt, grid, "one_expert"), solve_dlf(zl, zs, zt, grid, "joint")
    for row in range(4):
        joint_loss = ref_loss(zl[row].numpy(), zs[row].numpy(), zt[row].numpy(), joint.weights[row].numpy())
        assert joint_loss == pytest.approx(joint.loss[row].item(), rel=1e-9)
        assert joint.loss[row] <= one.loss[row] + 1e-12


def test_unknown_mode_is_refused():
    z = torch.zeros(1, 5)
    with pytest.raises(ValueError, match="unknown DLF mode"):
        solve_dlf(z, z, z.unsqueeze(1), make_grid(*GRID), "nope")

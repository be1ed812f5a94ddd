"""Pure: the per-step weight problem of dynamic logit fusion ("On Giant's Shoulders", 2024).

At every step and row, choose expert weights `a` minimising
    sum_t [ (KL(P~(a) || P) - KL(Q_t || Q))^2 + (KL(P || P~(a)) - KL(Q || Q_t))^2 ]
with P = softmax(z_L), Q = softmax(z_S), Q_t = softmax(z_S+_t), P~(a) = softmax(z_L + sum_t a_t (z_S+_t - z_S)).
The sum runs over all T experts. The search is on a grid, vectorised over (B, G, V) per expert.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from logitfuse.ops.fusion import steer


def make_grid(start: float, stop: float, step: float) -> torch.Tensor:
    """Grid points start, start+step, ..., stop built as start + k*step (no accumulated float drift)."""
    n = int(round((stop - start) / step))
    return torch.tensor([round(start + k * step, 10) for k in range(n + 1)], dtype=torch.float64)


def kl(p_log: torch.Tensor, q_log: torch.Tensor) -> torch.Tensor:
    """KL(P || Q) over the last dimension from log-probs; terms with P = 0 contribute 0 (no NaN)."""
    p = p_log.exp()
    diff = torch.where(p > 0, p_log - q_log, torch.zeros_like(p_log))
    return (p * diff).sum(dim=-1)


@dataclass(frozen=True)
class DLFResult:
    weights: torch.Tensor  # (B, T) chosen weight per expert (one nonzero column per row in one_expert mode)
    loss: torch.Tensor  # (B,) loss at the chosen weights


def expert_targets(z_small: torch.Tensor, z_tuned: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The KL targets from raw logits z_small (B, V_e), z_tuned (B, T, V_e) in the experts' own vocabulary:
    (KL(Q_t || Q), KL(Q || Q_t)), each (B, T). For cross-tokenizer experts these are exact where the
    experts' logits mapped onto the base's vocabulary would lose mass (DLF across tokenizers)."""
    return _targets(torch.log_softmax(z_small, dim=-1), torch.log_softmax(z_tuned, dim=-1))


def _targets(l_small: torch.Tensor, l_tuned: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """KL(Q_t || Q) and KL(Q || Q_t), each (B, T)."""
    l_small_t = l_small.unsqueeze(1).expand_as(l_tuned)
    return kl(l_tuned, l_small_t), kl(l_small_t, l_tuned)


def _loss(l_large: torch.Tensor, fused: torch.Tensor, fwd_t: torch.Tensor, rev_t: torch.Tensor) -> torch.Tensor:
    """Loss for candidates fused (B, C, V) against targets (B, T) -> (B, C).

    Both KLs are written as sums a matrix product can do: KL(P~||P) = sum p~ log p~ - p~ . log P and
    KL(P||P~) = sum P log P - P . log p~ (masked tokens, where every model has probability 0, count 0)."""
    zero = torch.zeros((), dtype=fused.dtype, device=fused.device)
    l_fused = torch.log_softmax(fused, dim=-1)  # (B, C, V)
    p_fused = l_fused.exp()
    l_large0 = torch.where(torch.isfinite(l_large), l_large, zero)  # (B, V)
    p_large = l_large.exp()
    fwd = torch.special.xlogy(p_fused, p_fused).sum(-1) - torch.einsum("bcv,bv->bc", p_fused, l_large0)
    l_fused0 = torch.where(torch.isfinite(l_fused), l_fused, zero)
    rev = (p_large * l_large0).sum(-1, keepdim=True) - torch.einsum("bcv,bv->bc", l_fused0, p_large)
    fwd, rev = fwd.unsqueeze(-1), rev.unsqueeze(-1)  # (B, C, 1)
    return ((fwd - fwd_t.unsqueeze(1)) ** 2 + (rev - rev_t.unsqueeze(1)) ** 2).sum(dim=-1)


def _one_expert_loss(z_large: torch.Tensor, z_small: torch.Tensor, z_tuned: torch.Tensor, grid: torch.Tensor,
                     fwd_t: torch.Tensor, rev_t: torch.Tensor) -> torch.Tensor:
    """The loss of every expert t alone at every grid point a -> (B, T*G), in closed form.

    With d = z_S+_t - z_S and fused logits z_L + a d, log-normalisers A(a) = logsumexp(z_L + a d), A_L = A(0):
    KL(P~||P) = a (P~ . d) - A(a) + A_L and KL(P||P~) = A(a) - A_L - a (P . d), so each candidate costs one
    logsumexp, one softmax and one dot product over V. Masked (-inf) tokens have probability 0 everywhere
    and their differences count as 0 (never NaN)."""
    diff = z_tuned - z_small.unsqueeze(1)  # (B, T, V)
    finite = torch.isfinite(diff)
    diff = torch.where(finite, diff, torch.zeros((), dtype=diff.dtype, device=diff.device))
    base = torch.where(finite.all(dim=1), z_large, torch.full_like(z_large, float("-inf")))  # masked anywhere
    a = grid.view(1, 1, -1)  # (1, 1, G)
    cand = torch.addcmul(base[:, None, None, :], a.unsqueeze(-1), diff.unsqueeze(2))  # (B, T, G, V)
    top = cand.amax(dim=-1, keepdim=True)  # one exp pass serves both the normaliser and P~ . d
    e = cand.sub_(top).exp_()  # in place: a (B, T, G, V) allocation costs as much as the pass itself
    total = e.sum(dim=-1)
    lse = torch.log(total) + top[..., 0]  # (B, T, G)
    lse_base = torch.logsumexp(base, dim=-1)[:, None, None]  # (B, 1, 1)
    p_fused_d = torch.matmul(e, diff.unsqueeze(-1))[..., 0] / total  # (B, T, G)
    p_base_d = torch.einsum("bv,btv->bt", torch.softmax(base, dim=-1), diff).unsqueeze(-1)  # (B, T, 1)
    fwd = a * p_fused_d - lse + lse_base  # KL(P~ || P)
    rev = lse - lse_base - a * p_base_d  # KL(P || P~)
    loss = ((fwd.unsqueeze(-1) - fwd_t[:, None, None, :]) ** 2
            + (rev.unsqueeze(-1) - rev_t[:, None, None, :]) ** 2).sum(-1)  # (B, T, G)
    return loss.flatten(1, 2)


def reduce_support(z_large: torch.Tensor, z_small: torch.Tensor, z_tuned: torch.Tensor, k: int):
    """The scores on S = the union of every model's top-k tokens per row, plus one "rest" pseudo-token
    holding each model's logsumexp over the tokens outside S: (B, S+1), (B, S+1), (B, T, S+1).

    Every model's distribution keeps its exact mass on each token of S and outside S (a coarse-graining,
    so the KLs of P, Q and Q_t can only shrink). The fused candidates are approximate outside S only: their
    rest mass becomes exp(A_L,rest + a (A_t,rest - A_S,rest)) instead of the sum over the rest of
    exp(z_L + a d). Tokens chosen by several models appear once (duplicates masked)."""
    k = min(k, z_tuned.shape[-1])
    models = [z_large, z_small, *z_tuned.unbind(1)]
    idx = torch.cat([torch.topk(z, k, dim=-1, sorted=False).indices for z in models], -1).sort(dim=-1).values
    dup = torch.zeros_like(idx, dtype=torch.bool)
    dup[:, 1:] = idx[:, 1:] == idx[:, :-1]
    out = []
    for z in models:
        picked = z.gather(-1, idx).masked_fill(dup, float("-inf"))  # (B, K)
        total, inside = torch.logsumexp(z, dim=-1, keepdim=True), torch.logsumexp(picked, dim=-1, keepdim=True)
        share = (inside - total).clamp(max=0.0)  # log of the mass on S; the rest is log(1 - exp(share))
        rest = total + torch.log(-torch.expm1(share)).clamp(min=-1e4)  # finite even when S holds it all
        out.append(torch.cat([picked, rest], dim=-1))
    return out[0], out[1], torch.stack(out[2:], 1)


def _candidates(z_large: torch.Tensor, z_small: torch.Tensor, z_tuned: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """Fused logits for every candidate weight matrix a (B, C, T) -> (B, C, V)."""
    b, c, t = a.shape
    v = z_large.shape[-1]
    base = z_large.unsqueeze(1).expand(b, c, v).reshape(b * c, v)
    tuned = z_tuned.unsqueeze(1).expand(b, c, t, v).reshape(b * c, t, v)
    small = z_small.unsqueeze(1).expand(b, c, v).reshape(b * c, v)
    return steer(base, tuned, small, a.reshape(b * c, t)).reshape(b, c, v)


def solve_dlf(
    z_large: torch.Tensor,
    z_small: torch.Tensor,
    z_tuned: torch.Tensor,
    grid: torch.Tensor,
    mode: str,
    support: int | None = None,
    targets: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> DLFResult:
    """DLF weights per row. z_large (B, V), z_small (B, V), z_tuned (B, T, V); grid (G,).

    one_expert: each expert alone on the grid, one (expert, a) kept per row (the paper's default).
    joint: coordinate search from the one_expert solution, each expert in turn on the grid with the others
    at their current values (so it never ends worse than one_expert).
    Ties keep the first grid point (strict <), so equal losses return the smallest weight.
    support: solve on the union of the models' top-`support` tokens plus one rest token (reduce_support),
    O(V) once plus O(G * support) per row instead of O(G * V); tests/ops/test_weights.py states the error.
    targets: the KL targets (expert_targets) when they come from elsewhere than z_small/z_tuned: for
    cross-tokenizer experts, from their own vocabulary, while z_small/z_tuned are mapped onto the base's.
    """
    grid = grid.to(z_large.device, z_large.dtype)
    b, t, _ = z_tuned.shape
    g = grid.numel()
    if mode not in ("one_expert", "joint"):
        raise ValueError(f"unknown DLF mode {mode!r}; expected 'one_expert' or 'joint'")
    if support is not None and support < z_large.shape[-1]:
        z_large, z_small, z_tuned = reduce_support(z_large, z_small, z_tuned, support)
    l_large = torch.log_softmax(z_large, dim=-1)
    fwd_t, rev_t = targets if targets is not None else expert_targets(z_small, z_tuned)
    eye = torch.eye(t, dtype=z_large.dtype, device=z_large.device)  # (T, T)
    a = (eye.unsqueeze(1) * grid.view(1, g, 1)).reshape(1, t * g, t).expand(b, t * g, t)  # (B, T*G, T)
    loss = _one_expert_loss(z_large, z_small, z_tuned, grid, fwd_t, rev_t)  # (B, T*G)
    best = torch.argmin(loss, dim=-1)  # first minimum
    result = DLFResult(a[torch.arange(b), best], loss.gather(-1, best.unsqueeze(-1)).squeeze(-1))
    if mode == "joint" and t > 1:
        return _solve_joint(z_large, z_small, z_tuned, grid, l_large, fwd_t, rev_t, result)
    return result


def _solve_joint(z_large, z_small, z_tuned, grid, l_large, fwd_t, rev_t, start: DLFResult,
                 sweeps: int = 2) -> DLFResult:
    t, g = z_tuned.shape[1], grid.numel()
    current, loss = start.weights.clone(), start.loss
    for _ in range(sweeps):
        for e in range(t):
            a = current.unsqueeze(1).repeat(1, g, 1)  # (B, G, T)
            a[:, :, e] = grid
            cand = _loss(l_large, _candidates(z_large, z_small, z_tuned, a), fwd_t, rev_t)  # (B, G)
            best = torch.argmin(cand, dim=-1)
            better = cand.gather(-1, best.unsqueeze(-1)).squeeze(-1) < loss  # keep ties at the current value
            current[:, e] = torch.where(better, grid[best], current[:, e])
            loss = torch.where(better, cand.gather(-1, best.unsqueeze(-1)).squeeze(-1), loss)
    return DLFResult(current, loss)

"""Pure fusion math: one function per method, tensors in, tensors out, no I/O.

Shapes: B rows, T experts, V vocabulary, K candidates. Every function works in the dtype it is given
(float32 in the engine, float64 in reference tests). Masked tokens (-inf in any model) stay -inf in the
fused scores and never produce NaN (`-inf - -inf` is avoided by masking before subtracting).
"""

from __future__ import annotations

import torch

NEG_INF = float("-inf")

# coefficients (alpha, beta, weights, the DLF grid) stay within +-COEF_LIMIT: scores stay finite in float16/32
COEF_LIMIT = 100.0


def log_probs(logits: torch.Tensor) -> torch.Tensor:
    """Normalised log-probabilities over the last dimension; rows of all -inf stay -inf."""
    return torch.log_softmax(logits, dim=-1)


def steering(tuned: torch.Tensor, untuned: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
    """The experts' push `sum_t coef[:, t] * (tuned_t - untuned_t)`, (B, V): not finite wherever a tuned or
    untuned score is not (whatever its coefficient), so `push_onto` masks those tokens.

    tuned (B, T, V); untuned (B, V) or (B, T, V) (one untuned model per expert); coef (B, T).
    """
    if untuned.dim() == 2:
        untuned = untuned.unsqueeze(1)
    diff = tuned - untuned  # (B, T, V): inf or NaN where either is not finite
    coef = coef.to(diff.dtype)
    if diff.shape[1] == 1:
        return diff[:, 0] * coef  # (B, V): one expert, one pass
    return (coef.unsqueeze(-1) * diff).sum(dim=1)


def push_onto(base: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """`base + delta`, with -inf wherever the sum is not finite (a token masked in any model, never NaN)."""
    out = base + delta
    return torch.nan_to_num_(out, nan=NEG_INF, posinf=NEG_INF, neginf=NEG_INF)  # one pass over (B, V)


def steer(base: torch.Tensor, tuned: torch.Tensor, untuned: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
    """`base + sum_t coef[:, t] * (tuned_t - untuned_t)`: the shared arithmetic of proxy-tuning, EFT and DLF.

    base (B, V); tuned (B, T, V); untuned (B, V) or (B, T, V) (one untuned model per expert); coef (B, T).
    A token any model masks (-inf, or not finite) is -inf in the result.
    """
    return push_onto(base, steering(tuned, untuned, coef))


def base_only(base_logits: torch.Tensor) -> torch.Tensor:
    """No experts: the base model's own scores, so every method can be compared with doing nothing."""
    return base_logits


def proxy_tune(
    base_logits: torch.Tensor, tuned_logits: torch.Tensor, untuned_logits: torch.Tensor, alpha: torch.Tensor
) -> torch.Tensor:
    """Proxy-tuning ("Tuning Language Models by Proxy", 2024): `z_L + alpha * (z_S+ - z_S)` on raw logits.

    tuned_logits (B, T, V) allows several experts, each with its own alpha column in alpha (B, T).
    """
    return steer(base_logits, tuned_logits, untuned_logits, alpha)


def eft(
    base_logits: torch.Tensor,
    tuned_logits: torch.Tensor,
    untuned_logits: torch.Tensor,
    beta: torch.Tensor,
    weights: torch.Tensor,
) -> torch.Tensor:
    """Emulated fine-tuning ("An Emulator for Fine-Tuning Large Language Models using Small Language Models",
    2023): `l_N + beta * sum_i w_i (l_M+_i - l_M)` on log-probs.

    Up-scaling (large N, small M), down-scaling (the reverse) and behaviour interpolation (several tuned
    models, weights w) are the same formula with other models in the roles. beta (B,), weights (B, T).
    """
    coef = beta.unsqueeze(-1).to(weights.dtype) * weights  # (B, T)
    return steer(log_probs(base_logits), log_probs(tuned_logits), log_probs(untuned_logits), coef)


def dlf_combine(
    base_logits: torch.Tensor, tuned_logits: torch.Tensor, untuned_logits: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """Dynamic logit fusion ("On Giant's Shoulders", 2024): `l_L + sum_i alpha_i(t) (l_S+_i - l_S)`, weights
    from weights.py."""
    return steer(log_probs(base_logits), log_probs(tuned_logits), log_probs(untuned_logits), weights)


def top_k_candidates(sft_logits: torch.Tensor, k: int) -> torch.Tensor:
    """Transfer Q* candidate set Z_k: the target policy's k most likely tokens. (B, V) -> (B, K) ids."""
    return torch.topk(sft_logits, k, dim=-1).indices


def tqstar_q_direct(rewards: torch.Tensor) -> torch.Tensor:
    """Direct transfer ("Transfer Q Star", 2024): `Q(s, z) = mean_i r(tau_i)`. rewards (B, K, N) -> (B, K)."""
    return rewards.mean(dim=-1)


def tqstar_q_indirect(rewards: torch.Tensor, baseline_rewards: torch.Tensor, beta: float = 2.0) -> torch.Tensor:
    """Indirect transfer: `Q(s, z) = mean_i exp((r - r_BL) / beta) * r`, importance-weighted rollouts. (B, K, N)."""
    return (torch.exp((rewards - baseline_rewards) / beta) * rewards).mean(dim=-1)


def tqstar_scores(
    sft_logits: torch.Tensor, candidates: torch.Tensor, q: torch.Tensor, alpha: torch.Tensor
) -> torch.Tensor:
    """Transfer Q*: `pi_sft(z|s) * exp(Q(s, z) / alpha)` restricted to the candidates, as scores.

    sft_logits (B, V), candidates (B, K) token ids, q (B, K), alpha (B,). Tokens outside the candidates get
    -inf; alpha = inf leaves pi_sft restricted to its top-k.
    """
    base = log_probs(sft_logits).gather(-1, candidates)  # (B, K)
    bonus = q.to(base.dtype) / alpha.to(base.dtype).unsqueeze(-1)
    bonus = torch.where(torch.isfinite(alpha).unsqueeze(-1), bonus, torch.zeros_like(bonus))
    out = torch.full_like(sft_logits, NEG_INF)
    return out.scatter(-1, candidates, base + bonus)

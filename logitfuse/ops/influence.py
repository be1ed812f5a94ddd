"""Pure: what fusion changed at each generated token, the numbers behind a response's `influence` field.

For B generated tokens (one per row): the chosen token's log-probability and rank under the fused and under
the base's own distribution, both distributions' top k, and each expert's push on the chosen token (tuned minus
untuned, in the units the method adds: raw logits for proxy-tuning, log-probabilities for EFT and DLF) with the
coefficient it got. Shapes: B rows, T experts, V vocabulary. Nothing here runs a model: the inputs are the
scores the fusion step already had.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

TOP = 3  # tokens in `top` and `base_top`
RANK_FROM_TOP = 32  # ranks within this many are read off a top-k pass instead of a pass counting the whole row


@dataclass(frozen=True)
class Influence:
    """Per row: the chosen token under both distributions, both top k, and the experts' pushes."""

    logprob: torch.Tensor  # (B,) log p_fused(chosen)
    rank: torch.Tensor  # (B,) 1 + the number of tokens the fused distribution prefers strictly
    base_logprob: torch.Tensor  # (B,) log p_base(chosen)
    base_rank: torch.Tensor  # (B,)
    top_ids: torch.Tensor  # (B, k) the fused distribution's most likely tokens
    top_logprobs: torch.Tensor  # (B, k)
    base_top_ids: torch.Tensor  # (B, k)
    base_top_logprobs: torch.Tensor  # (B, k)
    push: torch.Tensor  # (B, T) tuned minus untuned on the chosen token (not finite where a model masks it)
    weight: torch.Tensor  # (B, T) the coefficient each expert got at this step


def rank_of(logp: torch.Tensor, chosen: torch.Tensor, top: torch.Tensor | None = None) -> torch.Tensor:
    """1 + the number of tokens strictly more likely than the chosen one (ties share the better rank). (B,).
    top (B, m): the m largest values of each row, descending, when known: a chosen token at least as likely as
    the m-th has every token more likely than itself among them, so only the other rows count the whole row."""
    at = logp.gather(-1, chosen.unsqueeze(-1))  # (B, 1)
    if top is None:
        return (logp > at).sum(-1, dtype=torch.int32) + 1  # an int32 sum: half the time of the default int64 one
    rank = (top > at).sum(-1, dtype=torch.int32) + 1
    rest = (at[:, 0] < top[:, -1]).nonzero()[:, 0]  # (r,) rows whose token is below the m-th
    if rest.numel():
        rank[rest] = rank_of(logp.index_select(0, rest), chosen.index_select(0, rest))
    return rank


def pushes(tuned: torch.Tensor, untuned: torch.Tensor, chosen: torch.Tensor, log_probs: torch.Tensor
           ) -> torch.Tensor:
    """Each expert's `tuned - untuned` on the chosen token, (B, T): of log_softmax(scores) for the experts whose
    log_probs (T,) is set (EFT, DLF), else of the scores as they are (proxy-tuning's raw logits; a
    cross-tokenizer expert's mapped scores, already its own log-probabilities). tuned (B, T, V); untuned (B, V)
    or (B, T, V)."""
    if untuned.dim() == 2:
        untuned = untuned.unsqueeze(1)
    b = tuned.shape[0]
    normalise = bool(log_probs.any())  # decided on the host: log_probs stays where it was made (the CPU)
    norm = log_probs.to(tuned.device)

    def at(scores: torch.Tensor) -> torch.Tensor:  # (B, T) the chosen token's score, normalised where asked
        idx = chosen.view(b, 1, 1).expand(b, scores.shape[1], 1)
        value = scores.gather(-1, idx)[..., 0]
        if not normalise:
            return value
        # log_softmax then one gather: cheaper on CPU than logsumexp's separate passes
        return torch.where(norm, torch.log_softmax(scores, -1).gather(-1, idx)[..., 0], value)

    return at(tuned) - at(untuned)  # an untuned shared by every expert broadcasts over T


def influence(base_logp: torch.Tensor, fused_logp: torch.Tensor, tuned: torch.Tensor | None,
              untuned: torch.Tensor | None, coef: torch.Tensor, chosen: torch.Tensor, log_probs: torch.Tensor,
              k: int = TOP) -> Influence:
    """The influence numbers of B chosen tokens. base_logp, fused_logp (B, V) log-probabilities; tuned,
    untuned: the experts' scores as the method took them (None: no experts); coef (B, T); chosen (B,);
    log_probs (T,) bool: which experts' pushes are read on log-probabilities (`pushes`)."""
    b, k = fused_logp.shape[0], min(k, fused_logp.shape[-1])
    base_logp = base_logp.to(fused_logp.dtype)  # each read as it is: joining the two would copy (2B, V) first
    lp, base_lp = (x.gather(-1, chosen.unsqueeze(-1))[:, 0] for x in (fused_logp, base_logp))
    m = min(max(k, RANK_FROM_TOP), fused_logp.shape[-1])
    top, base_top = torch.topk(fused_logp, m, dim=-1), torch.topk(base_logp, m, dim=-1)
    if tuned is None or untuned is None or coef.shape[-1] == 0:
        push = fused_logp.new_zeros((b, 0))
    else:
        push = pushes(tuned, untuned, chosen, log_probs)
    return Influence(lp, rank_of(fused_logp, chosen, top.values), base_lp, rank_of(base_logp, chosen, base_top.values),
                     top.indices[:, :k], top.values[:, :k], base_top.indices[:, :k], base_top.values[:, :k], push,
                     coef.to(push.dtype))

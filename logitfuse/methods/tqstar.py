"""Transfer Q* at decoding time ("Transfer Q Star", 2024): rollouts of a baseline model, scored by a reward.

For every row: the base's top-k candidates z; from [s, z] N continuations of m tokens by the baseline
model, all rows and branches in one batch that reuses the baseline's prefix KV state (the engine's
`Rollouts`: the method sees no engine or backend object); one batched reward
pass; Q(s, z) from the rewards (direct, or importance-weighted indirect); then fusion.tqstar_scores.
"""

from __future__ import annotations

import torch

from logitfuse.errors import InvalidRequest
from logitfuse.methods.base import FusionMethod, PlanInput, Scores, Step
from logitfuse.methods.plan import FusionPlan, TQStarPlan
from logitfuse.ops import fusion
from logitfuse.ops.fusion import COEF_LIMIT

# defaults of the request's fusion fields (the paper's settings scaled to a CPU)
TOP_K, ALPHA, ROLLOUTS = 10, 1.0, 1
ROLLOUT_TOKENS, ROLLOUT_TOKENS_INDIRECT = 20, 5
BETA = 2.0  # temperature of the indirect importance weight (not a request field)
MAX_ALPHA = 1e9  # beyond it the bonus Q / alpha is nothing already


class TransferQStar(FusionMethod):
    name = "tqstar"
    summary = "Transfer Q*: the base's top-k tokens reweighted by rewards of a baseline model's rollouts"
    params = ("baseline", "reward", "baseline_reward", "top_k", "alpha", "rollouts", "rollout_tokens")
    needs_experts = False
    prompt_scoring = False  # a prompt position has no rollouts to score

    def plan(self, given: PlanInput) -> FusionPlan:
        p, names = given.params, given.names
        if not p.baseline or not p.reward:
            raise InvalidRequest("fusion: tqstar needs 'baseline' (a model) and 'reward' (a reward model)", "fusion")
        names.check_model(p.baseline, "fusion.baseline")
        names.check_reward(p.reward, "fusion.reward")
        if p.baseline_reward:
            names.check_reward(p.baseline_reward, "fusion.baseline_reward")
        alpha = p.alpha if p.alpha is not None else ALPHA
        if not 1 / COEF_LIMIT <= alpha <= MAX_ALPHA:  # Q / alpha finite, and alpha itself a float32
            raise InvalidRequest(f"fusion.alpha must be in [{1 / COEF_LIMIT:g}, {MAX_ALPHA:g}] for tqstar, got {alpha}",
                                 "fusion.alpha")
        tq = TQStarPlan(
            baseline=p.baseline, reward=p.reward, baseline_reward=p.baseline_reward, top_k=p.top_k or TOP_K,
            alpha=alpha, rollouts=p.rollouts or ROLLOUTS,
            rollout_tokens=p.rollout_tokens or (ROLLOUT_TOKENS_INDIRECT if p.baseline_reward else ROLLOUT_TOKENS),
            beta=BETA)
        return FusionPlan(self.name, given.base, tqstar=tq, ensemble=given.ensemble)

    def work(self, plan: FusionPlan) -> int:
        return plan.tqstar.work

    def combine(self, step: Step) -> Scores:
        if step.rollouts is None:
            raise InvalidRequest("tqstar fuses decode steps only (no prompt scoring, no speculative blocks)", "fusion")
        return tqstar_step(step, step.base)

    def influence_extra(self, diag: dict | None, token: int) -> dict:
        """The chosen candidate's Q."""
        q = (diag or {}).get("tqstar_q", {}).get(token)
        return {} if q is None else {"q": q}


def tqstar_step(step: Step, base_logits: torch.Tensor) -> Scores:
    """Fused scores (b, V) for Transfer Q* rows and per-row diagnostics (the candidates' Q values)."""
    tq, b = step.plan.tqstar, base_logits.shape[0]
    k, n, m = tq.top_k, tq.rollouts, tq.rollout_tokens
    cand = fusion.top_k_candidates(base_logits, min(k, base_logits.shape[-1]))  # (b, K)
    k = cand.shape[1]
    first = cand.repeat_interleave(n, dim=1).reshape(-1).cpu()  # (b*K*N,)
    branches = step.rollouts.continue_rows(tq.baseline, first, k * n, m - 1)  # (b*K*N, m)
    texts = step.rollouts.texts(tq.baseline, branches, k * n)
    rewards = step.get_reward(tq.reward).score(texts).view(b, k, n).to(base_logits.device)
    if tq.baseline_reward:
        r_bl = step.get_reward(tq.baseline_reward).score(texts).view(b, k, n).to(base_logits.device)
        q = fusion.tqstar_q_indirect(rewards, r_bl, tq.beta)
    else:
        q = fusion.tqstar_q_direct(rewards)
    alpha = torch.full((b,), tq.alpha, dtype=torch.float32, device=base_logits.device)
    diags = [{"tqstar_q": dict(zip(c, v))} for c, v in zip(cand.tolist(), q.tolist())]
    return fusion.tqstar_scores(base_logits, cand, q, alpha), diags


METHOD = TransferQStar()

"""Transfer Q* at decoding time ("Transfer Q Star", 2024): rollouts of a baseline model, scored by a reward.

For every row: the base's top-k candidates z; from [s, z] N continuations of m tokens by the baseline
model, all rows and branches in one batch that reuses the baseline's prefix KV state; one batched reward
pass; Q(s, z) from the rewards (direct, or importance-weighted indirect); then fusion.tqstar_scores.
"""

from __future__ import annotations

import torch

from logitfuse.errors import InvalidRequest
from logitfuse.methods.base import COEF_LIMIT, FusionMethod, PlanInput, Scores, Step
from logitfuse.methods.plan import FusionPlan, TQStarPlan
from logitfuse.ops import fusion
from logitfuse.ops.sampling import SamplingTensors, sample

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
        if step.seqs is None:
            raise InvalidRequest("tqstar fuses decode steps only (no prompt scoring, no speculative blocks)", "fusion")
        return tqstar_step(step, step.base)


def _rollouts(baseline, state, first: torch.Tensor, steps: int, generators: list) -> torch.Tensor:
    """Continue every branch of state from its first token for `steps` more tokens, sampled at temperature 1
    from the baseline. first (R,) -> tokens (R, 1 + steps)."""
    out = [first]
    logits = baseline.decode(state, first.view(-1, 1))[:, 0]
    params = SamplingTensors.build([(1.0, -1, 1.0, 0.0)] * first.numel(), logits.device)
    for i in range(steps):
        nxt = sample(logits, params, generators).cpu()
        out.append(nxt)
        if i + 1 < steps:
            logits = baseline.decode(state, nxt.view(-1, 1))[:, 0]
    return torch.stack(out, dim=1)


def _texts(tokenizer, prefixes: list[list[int]], branches: torch.Tensor, eos: int | None) -> list[str]:
    texts = []
    for prefix, branch in zip(prefixes, branches.tolist()):
        if eos is not None and eos in branch:
            branch = branch[: branch.index(eos) + 1]
        texts.append(tokenizer.decode(prefix + branch, skip_special_tokens=True))
    return texts


def tqstar_step(step: Step, base_logits: torch.Tensor) -> Scores:
    """Fused scores (b, V) for Transfer Q* rows and per-row diagnostics (the candidates' Q values)."""
    seqs = step.seqs
    tq = seqs[0].req.plan.tqstar
    k, n, m = tq.top_k, tq.rollouts, tq.rollout_tokens
    cand = fusion.top_k_candidates(base_logits, min(k, base_logits.shape[-1]))  # (b, K)
    k = cand.shape[1]
    slot = step.slots[tq.baseline]
    where = slot.index()
    branch_rows = [where[s.req.rid] for s in seqs for _ in range(k * n)]
    state = slot.backend.select(slot.state, branch_rows)  # (b*K*N) rows sharing each row's prefix
    first = cand.repeat_interleave(n, dim=1).reshape(-1).cpu()  # (b*K*N,)
    gens = [s.rollout_generator for s in seqs for _ in range(k * n)]
    branches = _rollouts(slot.backend, state, first, m - 1, gens)  # (b*K*N, m)
    tok = slot.backend.tokenizer
    prefixes = [s.req.prompts[tq.baseline] + s.stopper.ids_generated() for s in seqs for _ in range(k * n)]
    texts = _texts(tok, prefixes, branches, tok.eos_token_id)
    rewards = step.get_reward(tq.reward).score(texts).view(len(seqs), k, n).to(base_logits.device)
    if tq.baseline_reward:
        r_bl = step.get_reward(tq.baseline_reward).score(texts).view(len(seqs), k, n).to(base_logits.device)
        q = fusion.tqstar_q_indirect(rewards, r_bl, tq.beta)
    else:
        q = fusion.tqstar_q_direct(rewards)
    alpha = torch.full((len(seqs),), tq.alpha, dtype=torch.float32, device=base_logits.device)
    diags = [{"tqstar_q": dict(zip(c, v))} for c, v in zip(cand.tolist(), q.tolist())]
    return fusion.tqstar_scores(base_logits, cand, q, alpha), diags


METHOD = TransferQStar()

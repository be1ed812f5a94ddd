"""A resolved fusion plan: which models fill which role, and the method's parameters, for one request.

Built by a method of the method table (logitfuse/methods/) from an ensemble and a request's overrides;
frozen, hashable, and free of I/O. `group_key` says which rows can be fused in one call (per-row numbers
such as alpha may differ).
"""

from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class ExpertRef:
    name: str
    tuned: str
    untuned: str
    cross: bool = False  # its tokenizer differs from the base's (vocab.py maps it by token text)


@dataclass(frozen=True)
class TQStarPlan:
    """Transfer Q*'s resolved parameters (their defaults live in methods/tqstar.py)."""

    baseline: str
    reward: str
    baseline_reward: str | None  # set: indirect transfer
    top_k: int
    alpha: float
    rollouts: int
    rollout_tokens: int
    beta: float  # temperature of the indirect importance weight

    @property
    def work(self) -> int:
        """Rollout tokens per generated token: k * N * m."""
        return self.top_k * self.rollouts * self.rollout_tokens


@dataclass(frozen=True)
class SpecPlan:
    """Speculative decoding of a one-expert proxy/EFT plan: the tuned expert drafts up to k tokens per round,
    and stops early where its own top probability is below min_draft_prob; above max_batch rows it pauses."""

    k: int
    min_draft_prob: float
    max_batch: int | None  # draft only while the group has at most this many rows (else plain steps)


@dataclass(frozen=True)
class FusionPlan:
    method: str  # a name in the method table
    base: str
    experts: tuple[ExpertRef, ...] = ()
    coef: tuple[float, ...] = ()  # per expert: alpha * w_i (proxy) or beta * w_i (eft)
    grid: tuple[float, float, float] | None = None  # dlf: start, stop, step (its default: methods/dlf.py)
    mode: str | None = None  # dlf: "one_expert" or "joint"
    support: int | None = None  # dlf: weights searched on the union of the models' top-k tokens (None: all)
    tqstar: TQStarPlan | None = None
    speculative: SpecPlan | None = None
    ensemble: str | None = None  # the registry name the request used
    influence: bool = False  # report per token what fusion changed (ops/influence.py)

    def models(self) -> tuple[str, ...]:
        """Every causal LM the plan runs, each once (a shared untuned model appears once)."""
        names = [self.base]
        for e in self.experts:
            names += [e.tuned, e.untuned]
        if self.tqstar is not None:
            names.append(self.tqstar.baseline)
        return tuple(dict.fromkeys(names))

    def cross_models(self) -> tuple[str, ...]:
        """Models whose tokenizer differs from the base's: they follow the generated text, re-tokenized."""
        return tuple(dict.fromkeys(n for e in self.experts if e.cross for n in (e.tuned, e.untuned)))

    def rewards(self) -> tuple[str, ...]:
        if self.tqstar is None:
            return ()
        return tuple(n for n in (self.tqstar.reward, self.tqstar.baseline_reward) if n)

    def group_key(self) -> FusionPlan:
        """Rows with equal keys are fused together: the same plan up to the per-row coefficients (and the
        ensemble name the request used, and whether it asks for influence)."""
        return replace(self, coef=(), ensemble=None, influence=False)

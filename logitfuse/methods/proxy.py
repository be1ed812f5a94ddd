"""Proxy-tuning ("Tuning Language Models by Proxy", 2024): `z_L + alpha * sum_i w_i (z_S+_i - z_S_i)` on raw
logits (fusion.proxy_tune)."""

from __future__ import annotations

from logitfuse.methods.base import FusionMethod, PlanInput, Scores, Step, expert_coefficients
from logitfuse.methods.plan import FusionPlan
from logitfuse.ops import fusion


class ProxyTuning(FusionMethod):
    name = "proxy"
    summary = "proxy-tuning: base logits plus alpha times each expert's tuned-minus-untuned logits"
    params = ("experts", "alpha", "weights", "speculative")
    speculative = True
    cross_tokenizer = True

    def plan(self, given: PlanInput) -> FusionPlan:
        coef = expert_coefficients(given, self.name, "alpha")  # alpha (default 1) * w_i (default 1/T)
        return FusionPlan(self.name, given.base, given.experts, coef=coef, speculative=given.speculative,
                          ensemble=given.ensemble)

    def combine(self, step: Step) -> Scores:
        # fusion.proxy_tune's equation, the push taken the cheapest way the step offers (Step.steering)
        return fusion.push_onto(step.base, step.steering(step.coef())), None


METHOD = ProxyTuning()

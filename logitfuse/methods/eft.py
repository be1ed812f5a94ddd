"""Emulated fine-tuning ("An Emulator for Fine-Tuning Large Language Models using Small Language Models",
2023): `l_N + beta * sum_i w_i (l_M+_i - l_M)` on log-probs (fusion.eft). Up-scaling, down-scaling and
behaviour interpolation (several experts, weights w) are the same plan with other models in the roles."""

from __future__ import annotations

from logitfuse.methods.base import FusionMethod, PlanInput, Scores, Step, expert_coefficients
from logitfuse.methods.plan import FusionPlan
from logitfuse.ops import fusion


class EmulatedFineTuning(FusionMethod):
    name = "eft"
    summary = "emulated fine-tuning: base log-probs plus beta times each expert's tuned-minus-untuned log-probs"
    params = ("experts", "beta", "weights", "speculative")
    speculative = True
    cross_tokenizer = True
    push_on_log_probs = True

    def plan(self, given: PlanInput) -> FusionPlan:
        coef = expert_coefficients(given, self.name, "beta")  # beta (default 1) * w_i (default 1/T)
        return FusionPlan(self.name, given.base, given.experts, coef=coef, speculative=given.speculative,
                          ensemble=given.ensemble)

    def combine(self, step: Step) -> Scores:
        # fusion.eft's equation with the experts' push on raw logits: log_softmax(z) - z is one constant per
        # row and model, so the push differs from the one on log-probs by a constant per row, and the fused
        # distribution is the same (docs/algorithms.md); beta is folded into the coefficients
        return fusion.push_onto(fusion.log_probs(step.base), step.steering(step.coef())), None


METHOD = EmulatedFineTuning()

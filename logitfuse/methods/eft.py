"""Emulated fine-tuning ("An Emulator for Fine-Tuning Large Language Models using Small Language Models",
2023): `l_N + beta * sum_i w_i (l_M+_i - l_M)` on log-probs (fusion.eft). Up-scaling, down-scaling and
behaviour interpolation (several experts, weights w) are the same plan with other models in the roles."""

from __future__ import annotations

import torch

from logitfuse.methods.base import FusionMethod, PlanInput, Scores, Step, expert_coefficients
from logitfuse.methods.plan import FusionPlan
from logitfuse.ops import fusion


class EmulatedFineTuning(FusionMethod):
    name = "eft"
    summary = "emulated fine-tuning: base log-probs plus beta times each expert's tuned-minus-untuned log-probs"
    params = ("experts", "beta", "weights", "speculative")
    speculative = True
    cross_tokenizer = True

    def plan(self, given: PlanInput) -> FusionPlan:
        coef = expert_coefficients(given, self.name, "beta")  # beta (default 1) * w_i (default 1/T)
        return FusionPlan(self.name, given.base, given.experts, coef=coef, speculative=given.speculative,
                          ensemble=given.ensemble)

    def combine(self, step: Step) -> Scores:
        tuned, untuned = step.experts()  # (b, T, V) each
        beta = torch.ones(len(step.plans), device=step.base.device)  # folded into the coefficients
        return fusion.eft(step.base, tuned, untuned, beta, step.coef()), None


METHOD = EmulatedFineTuning()

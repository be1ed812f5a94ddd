"""No fusion: the base model's own scores, so every method can be compared with doing nothing."""

from __future__ import annotations

from logitfuse.methods.base import FusionMethod, PlanInput, Scores, Step
from logitfuse.methods.plan import FusionPlan
from logitfuse.ops import fusion


class BaseOnly(FusionMethod):
    name = "none"
    summary = "the base model alone (a bare model name, or an ensemble switched off)"
    params = ()
    needs_experts = False
    base_as_is = True

    def plan(self, given: PlanInput) -> FusionPlan:
        return FusionPlan(self.name, given.base, ensemble=given.ensemble)

    def combine(self, step: Step) -> Scores:
        return fusion.base_only(step.base), None


METHOD = BaseOnly()

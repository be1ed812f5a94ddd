"""Dynamic logit fusion ("On Giant's Shoulders", 2024): per step, the expert weights that best match the
tuned experts' distributions (weights.solve_dlf), then `l_L + sum_i alpha_i(t) (l_S+_i - l_S)`
(fusion.dlf_combine). Diagnostics: each step's weights; the response reports their means."""

from __future__ import annotations

import torch

from logitfuse.errors import InvalidRequest
from logitfuse.methods.base import FusionMethod, PlanInput, Scores, Step, intra_op_threads
from logitfuse.methods.plan import FusionPlan
from logitfuse.ops import fusion
from logitfuse.ops.fusion import COEF_LIMIT
from logitfuse.ops.weights import expert_targets, make_grid, solve_dlf

GRID = (0.0, 2.0, 0.1)  # start, stop, step of the weight search
MODE = "one_expert"
# Above this vocabulary the exact search (G x V per row and expert) costs about a base forward or more (at 262k
# tokens and 8 rows it matched Gemma-3-270M's), so an unset `support` searches the top-AUTO_SUPPORT tokens
# plus one rest token instead (ops/weights.reduce_support; its error bound: tests/ops/test_dlf_support.py).
AUTO_SUPPORT_VOCAB, AUTO_SUPPORT = 65536, 1024
MAX_POINTS = 200


class DynamicLogitFusion(FusionMethod):
    name = "dlf"
    summary = "dynamic logit fusion: expert weights solved at every step from the experts' own distributions"
    params = ("experts", "grid", "mode", "support")
    cross_tokenizer = True  # KL targets in the experts' own vocabulary, steering on the mapped logits
    push_on_log_probs = True

    def plan(self, given: PlanInput) -> FusionPlan:
        if len({e.untuned for e in given.experts}) != 1:
            raise InvalidRequest("fusion.experts: dlf needs experts tuned from one untuned model", "fusion.experts")
        grid, lim = tuple(given.params.grid or GRID), COEF_LIMIT
        if not (grid[2] > 0 and -lim <= grid[0] <= grid[1] <= lim and (grid[1] - grid[0]) / grid[2] <= MAX_POINTS):
            raise InvalidRequest(f"fusion.grid must be [start, stop, step] with -{lim:g} <= start <= stop <= "
                                 f"{lim:g}, step > 0 and at most {MAX_POINTS} points, got {list(grid)}", "fusion.grid")
        return FusionPlan(self.name, given.base, given.experts, grid=grid, mode=given.params.mode or MODE,
                          ensemble=given.ensemble, support=given.params.support)

    def combine(self, step: Step) -> Scores:
        plan = step.plan
        tuned, untuned = step.experts()  # (b, T, V) each; every expert shares untuned[:, 0]
        targets = None
        if step.native is not None:  # cross-tokenizer experts: targets from their own distributions
            own_tuned, own_untuned = step.native()
            targets = expert_targets(own_untuned[:, 0], own_tuned)
        with intra_op_threads(step.solver_threads):
            result = solve_dlf(step.base, untuned[:, 0], tuned, make_grid(*plan.grid), plan.mode,
                               search_support(plan.support, step.base.shape[-1]), targets)
        w = result.weights.float()  # (b, T)
        names = [e.name for e in plan.experts]
        diags = [{"dlf_weights": dict(zip(names, row))} for row in w.tolist()]
        return fusion.dlf_combine(step.base, tuned, untuned, w), diags

    def applied(self, step: Step, diags: list[dict] | None) -> torch.Tensor:
        """The weights a(t) solved at this step, (b, T), as the diagnostics carry them."""
        names = [e.name for e in step.plan.experts]
        return torch.tensor([[d["dlf_weights"][n] for n in names] for d in diags], dtype=torch.float32,
                            device=step.base.device)

    def summarise(self, steps: list[dict]) -> dict | None:
        """Mean weight per expert over the request's steps."""
        weights = [d["dlf_weights"] for d in steps if "dlf_weights" in d]
        if not weights:
            return None
        return {"method": self.name, "steps": len(weights),
                "mean_weights": {n: sum(w[n] for w in weights) / len(weights) for n in weights[0]}}


def search_support(asked: int | None, vocab: int) -> int | None:
    """The support of the weight search: as asked (0: exact), else exact up to AUTO_SUPPORT_VOCAB tokens and
    the reduced search above it. None means the whole vocabulary."""
    if asked is None:
        return AUTO_SUPPORT if vocab > AUTO_SUPPORT_VOCAB else None
    return asked or None


METHOD = DynamicLogitFusion()

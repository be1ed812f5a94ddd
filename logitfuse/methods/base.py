"""What a fusion method is: its parameters, its plan, its combine step, its capabilities, its diagnostics.

A method file (none.py, proxy.py, ...) defines one FusionMethod and nothing else; the table in
methods/__init__.py lists them. The registry builds plans through `plan`, the fuser calls `combine`, the
engine and the service read the capability flags and `summarise`. The arithmetic itself stays in the pure
modules (fusion.py, weights.py): a method only gathers its inputs and calls them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Protocol

import torch

from logitfuse.errors import InvalidRequest
from logitfuse.methods.plan import ExpertRef, FusionPlan, SpecPlan
from logitfuse.ops import fusion
from logitfuse.ops.fusion import COEF_LIMIT

if TYPE_CHECKING:
    from logitfuse.methods.params import FusionParams



class Names(Protocol):
    """The registry's name lookups a method needs while building a plan (unknown names raise UnknownName)."""

    def expert_ref(self, name: str) -> ExpertRef: ...

    def check_model(self, name: str, param: str) -> None: ...

    def check_reward(self, name: str, param: str) -> None: ...


@dataclass(frozen=True)
class PlanInput:
    """Everything a method's `plan` reads: merged parameters, the base, the resolved experts."""

    params: FusionParams
    base: str
    experts: tuple[ExpertRef, ...]
    names: Names
    speculative: SpecPlan | None = None  # already checked against the method's capabilities
    ensemble: str | None = None


class Scorer(Protocol):
    """A reward model as a method sees it: texts in, one score each."""

    def score(self, texts: list[str]) -> torch.Tensor: ...


class Rollouts(Protocol):
    """What the engine lends a method that looks ahead, for the rows of one decode step (b rows)."""

    def continue_rows(self, model: str, first: torch.Tensor, copies: int, steps: int) -> torch.Tensor:
        """Each row repeated `copies` times in `model`, continued from first (b * copies,) by `steps` tokens
        sampled at temperature 1 with the row's own generator: (b * copies, 1 + steps)."""
        ...

    def texts(self, model: str, branches: torch.Tensor, copies: int) -> list[str]:
        """Each row's text so far in `model` followed by each of its branches (cut after eos)."""
        ...


@dataclass
class Step:
    """One fusion call for b rows of one plan group, as the fuser hands it to a method.

    base is the base model's logits mapped to the shared vocabulary, (b, V) float32; `experts()` gives the
    tuned and untuned logits (b, T, V) on the same vocabulary. `rollouts` continues the rows in any model
    on a decode step, and is None when scoring a prompt or fusing a speculative block.
    """

    plans: list[FusionPlan]
    base: torch.Tensor
    experts: Callable[[], tuple[torch.Tensor, torch.Tensor]]
    solver_threads: int | None = None
    get_reward: Callable[[str], Scorer] | None = None
    rollouts: Rollouts | None = None
    native: Callable[[], tuple[torch.Tensor, torch.Tensor]] | None = None  # cross-tokenizer plans: the experts'
    # tuned and untuned log-probabilities in their own vocabulary, (b, T, V_e) each (one tokenizer for all)
    push: Callable[[torch.Tensor], torch.Tensor] | None = None  # the experts' push for coefficients (b, T), where
    # the fuser has a cheaper way to it than `experts()` (a cross-tokenizer expert: in its own vocabulary, then
    # mapped once)

    @property
    def plan(self) -> FusionPlan:
        return self.plans[0]

    def steering(self, coef: torch.Tensor) -> torch.Tensor:
        """The experts' push on the base's vocabulary, `sum_t coef[:, t] (tuned_t - untuned_t)` on raw logits,
        (b, V) (fusion.steering: not finite where a model masks the token)."""
        if self.push is not None:
            return self.push(coef)
        tuned, untuned = self.experts()
        return fusion.steering(tuned, untuned, coef)

    def coef(self) -> torch.Tensor:
        """Each row's per-expert coefficients (b, T) (requests of one group may differ in them)."""
        return torch.tensor([p.coef for p in self.plans], dtype=torch.float32, device=self.base.device)


Scores = tuple[torch.Tensor, list[dict] | None]  # fused scores (b, V), per-row diagnostics or None


class FusionMethod:
    """One decoding-time fusion method. Subclasses set the class attributes and override what differs."""

    name: ClassVar[str]
    summary: ClassVar[str]  # one line for listings and docs
    params: ClassVar[tuple[str, ...]]  # the FusionParams fields this method reads
    # capabilities
    needs_experts: ClassVar[bool] = True  # at least one tuned/untuned expert pair
    speculative: ClassVar[bool] = False  # the tuned expert may draft (one expert sharing the base's tokenizer)
    prompt_scoring: ClassVar[bool] = True  # echo + logprobs: fused scores of every prompt position
    cross_tokenizer: ClassVar[bool] = False  # experts whose tokenizer differs from the base's
    remote_base: ClassVar[bool] = True  # the base may be a remote model (top-N logprobs, no local KV)
    base_as_is: ClassVar[bool] = False  # the fused scores are the base's own: a remote base's log-probabilities
    # are reported as the server gives them, not renormalised over its top N
    push_on_log_probs: ClassVar[bool] = False  # influence reports the experts' push on log-probabilities (else on
    # the scores as the method adds them: raw logits)

    def plan(self, given: PlanInput) -> FusionPlan:
        """The frozen plan for one request; raise InvalidRequest naming the field for bad parameters."""
        raise NotImplementedError

    def combine(self, step: Step) -> Scores:
        """Fused scores for the rows of one group, by calling the pure functions."""
        raise NotImplementedError

    def work(self, plan: FusionPlan) -> int:
        """Extra model tokens run per generated token (a server caps it); 0 for methods without rollouts."""
        return 0

    def summarise(self, steps: list[dict]) -> dict | None:
        """One request's per-step diagnostics summarised for the response (None: nothing to report)."""
        return None

    def applied(self, step: Step, diags: list[dict] | None) -> torch.Tensor:
        """The coefficient each expert got at this step, (b, T) (influence's `weight`); diags: combine's."""
        return step.coef()

    def influence_extra(self, diag: dict | None, token: int) -> dict:
        """Method-specific fields of the chosen token's influence entry (diag: this row's diagnostics)."""
        return {}


def expert_coefficients(given: PlanInput, method: str, scale_field: str) -> tuple[float, ...]:
    """`scale * w_i` per expert: scale from the named field (default 1), weights default to 1/T each."""
    p, n = given.params, len(given.experts)
    weights = p.weights if p.weights is not None else [1.0 / n] * n
    if len(weights) != n:
        raise InvalidRequest(f"fusion.weights needs one weight per expert ({n}), got {len(weights)}",
                             "fusion.weights")
    scale = getattr(p, scale_field)
    scale = 1.0 if scale is None else scale
    if abs(scale) > (lim := COEF_LIMIT):
        raise InvalidRequest(f"fusion.{scale_field} must be in [-{lim:g}, {lim:g}] for {method}, got {scale}",
                             f"fusion.{scale_field}")
    return tuple(scale * w for w in weights)


@contextmanager
def intra_op_threads(n: int | None) -> Iterator[None]:
    """torch's intra-op threads set to n for the block (the setting is per thread and cheap to change)."""
    if n is None or n == torch.get_num_threads():
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)

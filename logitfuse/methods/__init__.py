"""The method table: every fusion method by name, one file each, and the rules they share.

Adding a method is its pure function (fusion.py), one file here defining a FusionMethod, its line in TABLE,
and a test. The registry, the fuser, the engine and the service read this table; no other module names a
method.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

from logitfuse.errors import InvalidRequest
from logitfuse.methods import dlf, eft, none, proxy, tqstar
from logitfuse.methods.base import FusionMethod, Names, PlanInput, Step
from logitfuse.methods.plan import ExpertRef, FusionPlan, SpecPlan

if TYPE_CHECKING:
    from logitfuse.methods.params import FusionParams

__all__ = ["DEFAULT", "NAMES", "PLAIN", "TABLE", "FusionMethod", "Step", "build_plan", "get",
           "speculation_fits", "speculation_rule", "summarise"]

TABLE: dict[str, FusionMethod] = {m.name: m for m in (none.METHOD, proxy.METHOD, eft.METHOD, dlf.METHOD,
                                                      tqstar.METHOD)}
NAMES: tuple[str, ...] = tuple(TABLE)
PLAIN = none.METHOD.name  # what a bare model name runs
DEFAULT = proxy.METHOD.name  # an ensemble that names no method


def get(name: str) -> FusionMethod:
    if name not in TABLE:
        raise InvalidRequest(f"fusion.method must be one of {NAMES}, got {name!r}", "fusion.method")
    return TABLE[name]


def _with(flag: str) -> list[str]:
    return [n for n, m in TABLE.items() if getattr(m, flag)]


def speculation_fits(method: str, experts: tuple[ExpertRef, ...]) -> bool:
    """The tuned expert drafts base tokens: a method that allows it, exactly one expert, and that expert
    sharing the base's tokenizer."""
    return get(method).speculative and len(experts) == 1 and not experts[0].cross


def speculation_rule() -> str:
    allowed = " or ".join(repr(n) for n in _with("speculative"))
    return f"speculative decoding needs method {allowed} with exactly one expert sharing the base's tokenizer"


def build_plan(names: Names, params: FusionParams, base: str, ensemble: str, speculative_asked: bool = True
               ) -> FusionPlan:
    """The plan for merged parameters: the shared rules (experts, cross-tokenizer, speculation), then the
    method's own. An ensemble's speculative setting that a request's overrides make inapplicable (another
    method, several experts, a cross-tokenizer expert) is dropped; a request asking for it gets the error."""
    method = get(params.method or DEFAULT)
    experts: tuple[ExpertRef, ...] = ()
    if method.needs_experts:
        if not params.experts:
            raise InvalidRequest(f"fusion.experts: method {method.name!r} needs at least one expert",
                                 "fusion.experts")
        experts = tuple(names.expert_ref(n) for n in params.experts)
    sp = params.speculative
    spec = SpecPlan(sp.k, sp.min_draft_prob, sp.max_batch) if sp and sp.k else None
    if spec is not None and not speculation_fits(method.name, experts):
        if not speculative_asked:
            spec = None
        elif any(e.cross for e in experts):
            raise InvalidRequest(f"fusion.experts: {_cross_rule()}, without speculative decoding", "fusion.experts")
        else:
            raise InvalidRequest(f"fusion.speculative: {speculation_rule()} (got {method.name!r} with "
                                 f"{len(experts)} experts)", "fusion.speculative")
    if any(e.cross for e in experts) and not method.cross_tokenizer:
        raise InvalidRequest(f"fusion.experts: {_cross_rule()}, without speculative decoding (got "
                             f"{method.name!r})", "fusion.experts")
    plan = method.plan(PlanInput(params, base, experts, names, spec, ensemble))
    return replace(plan, influence=True) if params.influence else plan


def _cross_rule() -> str:
    return f"cross-tokenizer experts work with {', '.join(_with('cross_tokenizer'))}"


def summarise(plan: FusionPlan, steps: list[dict]) -> dict | None:
    """One request's diagnostics summary, by its method (None when it has none)."""
    return get(plan.method).summarise(steps)

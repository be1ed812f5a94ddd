"""The parameters of fusion: the same fields in a registry ensemble and in a request's `fusion` object.

What each method does with them, and its defaults, live in the method's own file; unset fields stay None here
so that a request's overrides merge over an ensemble's settings.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from logitfuse.methods import NAMES
from logitfuse.ops.field_names import ClosedModel
from logitfuse.ops.fusion import COEF_LIMIT

Method = Literal[NAMES]  # type: ignore[valid-type]  # the method table's names, in its order


class SpeculativeParams(ClosedModel):
    k: int = Field(default=4, ge=0, le=16)  # draft tokens per round; 0 turns speculation off
    min_draft_prob: float = Field(default=0.0, ge=0.0, le=1.0)
    max_batch: int | None = Field(default=None, ge=1)  # draft only while this many rows or fewer share a step


Coef = Annotated[float, Field(ge=-COEF_LIMIT, le=COEF_LIMIT, allow_inf_nan=False)]
Finite = Annotated[float, Field(allow_inf_nan=False)]


class FusionParams(ClosedModel):
    """Method parameters: the same fields in an ensemble entry and in a request's `fusion` object."""

    method: Method | None = None
    experts: list[str] | None = None
    alpha: Finite | None = None  # proxy's coefficient (checked against COEF_LIMIT there) or tqstar's temperature
    beta: Coef | None = None
    weights: list[Coef] | None = None
    grid: tuple[Finite, Finite, Finite] | None = None
    mode: Literal["one_expert", "joint"] | None = None
    support: int | None = Field(default=None, ge=0)  # dlf: search on the models' top-`support` tokens + the rest
    # (0: the exact search over the whole vocabulary; unset: methods/dlf.py decides by the vocabulary's size)
    baseline: str | None = None
    reward: str | None = None
    baseline_reward: str | None = None
    top_k: int | None = Field(default=None, ge=1, le=100)
    rollouts: int | None = Field(default=None, ge=1, le=16)
    rollout_tokens: int | None = Field(default=None, ge=1, le=256)
    speculative: SpeculativeParams | None = None
    influence: bool | None = None  # per generated token, what the experts changed (a response field; any method)

    def merged(self, override: FusionParams | None) -> FusionParams:
        """Fields set in override replace ours; new experts without new weights get the default weights."""
        if override is None:
            return self
        update = override.model_dump(exclude_unset=True, exclude_none=True)
        if "experts" in update and "weights" not in update:
            update["weights"] = None
        return FusionParams.model_validate(self.model_dump(exclude_unset=True) | update)

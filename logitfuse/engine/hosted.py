"""The engine's fusion for a host engine that runs the base model itself (vLLM's logits processor,
logitfuse/vllm): the host hands over the base's logits and token ids, this side runs the experts.

What the host side needs of the engine, and nothing copied from it: the Fuser's method dispatch (cross-
tokenizer pushes and DLF's targets in the expert's own vocabulary included) with the vocabulary alignment
given per plan, since the host's base is not a model loaded here; and the re-tokenization a cross-tokenizer
expert follows (retokenize.py): its prompt, its ids of the generated text, what to forget and feed per step;
and Transfer Q*'s rollouts (rollouts.py) in the models kept here, scored by the reward models given.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from logitfuse.backends.base import CausalLM, RewardModel, Tokenizer
from logitfuse.engine.fused_scores import Fuser
from logitfuse.engine.prompts import encode_text
from logitfuse.engine.retokenize import advance_ragged_group, retokenized_change, retokenized_ids
from logitfuse.engine.rollouts import SlotRollouts, skip_draws
from logitfuse.methods.plan import FusionPlan
from logitfuse.ops.vocab import Alignment

__all__ = ["HostFuser", "SlotRollouts", "advance_ragged_group", "cross_prompt", "retokenized_change",
           "retokenized_ids", "skip_draws"]


class HostFuser(Fuser):
    """The engine's Fuser where each plan's alignment comes from the caller (built on the host's vocabulary)."""

    def __init__(self, get_backend: Callable[[str], CausalLM], plan_alignment: Callable[[FusionPlan], Alignment],
                 solver_threads: int | None = None, get_reward: Callable[[str], RewardModel] | None = None) -> None:
        super().__init__(get_backend, get_reward, solver_threads)
        self.plan_alignment = plan_alignment

    def alignment(self, plan: FusionPlan) -> Alignment:
        return self.plan_alignment(plan)

    def scores(self, plans: list[FusionPlan], rows_of: Callable[[str], torch.Tensor],
               rollouts: SlotRollouts | None = None) -> torch.Tensor:
        """Fused scores (b, V) of one plan group's rows; rows_of(model) -> that model's logits (b, V_model),
        the base's included; rollouts: the rows' look-ahead (Transfer Q*) in the models kept here. What the
        engine computes from the same logits."""
        return self.combine(plans, rows_of, rollouts)[0]


def cross_prompt(base_tokenizer: Tokenizer, backend: CausalLM, prompt: list[int]) -> list[int]:
    """A cross-tokenizer model's prompt for the base's prompt ids, as role_prompts makes it for a prompt of
    token ids: their text (the base's special tokens dropped) in the model's own tokens."""
    return encode_text(backend, base_tokenizer.decode(list(prompt), skip_special_tokens=True))

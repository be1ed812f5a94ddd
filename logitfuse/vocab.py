"""Pure: shared-vocabulary alignment between the models of an ensemble.

Roles must share token ids. A tail of extra ids (padded embeddings, one added token) is benign: the
ensemble works on the shared range and masks everything past it with -inf. Any other difference is refused
with an error naming both models and the first differing id.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch


class VocabMismatchError(ValueError):
    """Two models of one ensemble do not share their token ids."""


@dataclass(frozen=True)
class VocabInfo:
    """What alignment needs to know of one model: its token map, special tokens and logits width."""

    name: str
    vocab: Mapping[str, int]
    special: Mapping[str, str | None]  # e.g. {"eos_token": "</s>", ...}
    logits_width: int


@dataclass(frozen=True)
class Alignment:
    """Every model's logits are cut to `shared` ids and padded with -inf to `width` (the base's width)."""

    shared: int
    width: int

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """(..., V_model) -> (..., width): ids >= shared get -inf."""
        cut = logits[..., : self.shared]
        if self.width == self.shared:
            return cut
        pad = cut.new_full((*cut.shape[:-1], self.width - self.shared), float("-inf"))
        return torch.cat([cut, pad], dim=-1)


def _id_to_token(vocab: Mapping[str, int]) -> dict[int, str]:
    return {i: t for t, i in vocab.items()}


def _first_difference(a: VocabInfo, b: VocabInfo, shared: int) -> int | None:
    ia, ib = _id_to_token(a.vocab), _id_to_token(b.vocab)
    for i in range(shared):
        if ia.get(i) != ib.get(i):
            return i
    return None


def align(models: list[VocabInfo]) -> Alignment:
    """Check that all models share token ids and special tokens; return the shared range.

    The first model is the base; its logits width is the ensemble's width.
    """
    if not models:
        raise ValueError("align needs at least one model")
    base = models[0]
    shared = min(min(len(m.vocab), m.logits_width) for m in models)
    for other in models[1:]:
        diff = _first_difference(base, other, shared)
        if diff is not None:
            ta, tb = _id_to_token(base.vocab).get(diff), _id_to_token(other.vocab).get(diff)
            raise VocabMismatchError(
                f"vocabulary mismatch between {base.name!r} and {other.name!r}: token id {diff} is {ta!r} in "
                f"{base.name!r} but {tb!r} in {other.name!r}; fused models must share one tokenizer"
            )
        for key in sorted(set(base.special) | set(other.special)):
            if base.special.get(key) != other.special.get(key):
                raise VocabMismatchError(
                    f"special token mismatch between {base.name!r} and {other.name!r}: {key} is "
                    f"{base.special.get(key)!r} vs {other.special.get(key)!r}"
                )
    return Alignment(shared=shared, width=base.logits_width)

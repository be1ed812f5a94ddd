"""Pure: vocabulary alignment between the models of an ensemble.

Roles share token ids by default. A tail of extra ids (padded embeddings, one added token) is benign: the
ensemble works on the shared range and masks everything past it with -inf. Any other difference is refused
with an error naming both models and the first differing id.

An expert pair marked `cross_tokenizer` may use another tokenizer (the same one for its tuned and untuned
model): its scores reach the base's vocabulary through a token map, base id -> the expert id whose decoded
text is the same, or else the expert id whose text is the longest prefix of it (the pair's opinion on how
that text begins); special tokens map by role only. What is mapped is the expert's log-probabilities in its
own vocabulary, so a base token left without a counterpart (0 in both models) gets a log-ratio of 0 from the
pair, the same footing as a mapped token the tuning did not move.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from logitfuse.errors import VocabMismatchError


@dataclass(frozen=True)
class VocabInfo:
    """What alignment needs to know of one model: its token map, special tokens and logits width."""

    name: str
    vocab: Mapping[str, int]
    special: Mapping[str, str | None]  # e.g. {"eos_token": "</s>", ...}
    logits_width: int
    texts: Sequence[str] | None = None  # decoded text of every id (cross-tokenizer maps only)
    special_ids: frozenset[int] = frozenset()  # added/control tokens: their text is a name, not text


@dataclass(frozen=True)
class Alignment:
    """Every model's logits are cut to `shared` ids and padded with -inf to `width` (the base's width);
    a cross-tokenizer model's logits are gathered through its map instead."""

    shared: int
    width: int
    maps: Mapping[str, torch.Tensor] = field(default_factory=dict)  # model -> (width,) its ids, -1: none
    notes: tuple[str, ...] = ()  # differences that do not stop fusion (special-token roles), for the logs

    def apply(self, logits: torch.Tensor, model: str | None = None) -> torch.Tensor:
        """(..., V_model) -> (..., width): ids >= shared get -inf; a mapped model's log-probabilities (normalised
        in its own vocabulary) go through its map, unmapped ids getting 0."""
        if model is not None and model in self.maps:
            return self.gather(torch.log_softmax(logits.float(), -1), model)
        cut = logits[..., : self.shared]
        if self.width == self.shared:
            return cut
        pad = cut.new_full((*cut.shape[:-1], self.width - self.shared), float("-inf"))
        return torch.cat([cut, pad], dim=-1)

    def gather(self, values: torch.Tensor, model: str) -> torch.Tensor:
        """(..., V_model) -> (..., width) through `model`'s map, as they are (e.g. a push of log-ratios), 0 where
        a base id has no counterpart."""
        m = self.maps[model].to(values.device)
        m = torch.where(m >= 0, m, values.shape[-1])  # no counterpart: the zero column appended below
        zero = values.new_zeros((*values.shape[:-1], 1))
        return torch.cat([values, zero], dim=-1).index_select(-1, m)


def _id_to_token(vocab: Mapping[str, int]) -> dict[int, str]:
    return {i: t for t, i in vocab.items()}


def _first_difference(a: VocabInfo, b: VocabInfo, shared: int) -> int | None:
    ia, ib = _id_to_token(a.vocab), _id_to_token(b.vocab)
    for i in range(shared):
        if ia.get(i) != ib.get(i):
            return i
    return None


def cross_map(base: VocabInfo, expert: VocabInfo) -> torch.Tensor:
    """(base.logits_width,) long: for each base id, the expert id with the same decoded text, else the expert id
    whose text is the longest proper prefix of it (texts that several expert ids decode to, empty texts and
    texts holding U+FFFD, a partial character, take no part); special tokens map by role, other added tokens
    of the base get -1 (their text is a name, not text)."""
    if base.texts is None or expert.texts is None:
        raise ValueError("cross_map needs the decoded texts of both vocabularies")
    seen: dict[str, int] = {}
    for i, t in enumerate(expert.texts[: expert.logits_width]):
        seen[t] = -1 if t in seen else i
    theirs = {t: i for t, i in seen.items() if i >= 0 and t and "\ufffd" not in t}
    longest = max(map(len, theirs), default=0)
    out = torch.full((base.logits_width,), -1, dtype=torch.long)
    for i, text in enumerate(base.texts[: base.logits_width]):
        if not text or i in base.special_ids:
            continue
        hit = theirs.get(text)
        for end in range(min(len(text) - 1, longest), 0, -1):
            if hit is not None:
                break
            hit = theirs.get(text[:end])
        if hit is not None:
            out[i] = hit
    for role, token in base.special.items():
        other = expert.special.get(role)
        if token is not None and other is not None and token in base.vocab and other in expert.vocab:
            out[base.vocab[token]] = expert.vocab[other]
    return out


def align(models: list[VocabInfo], cross: Sequence[tuple[VocabInfo, VocabInfo]] = ()) -> Alignment:
    """Check that all models share token ids (the same token at every id); return the shared range, with
    differing special-token roles as notes.

    The first model is the base; its logits width is the ensemble's width. `cross` holds the (tuned,
    untuned) pairs of cross-tokenizer experts: each pair must share its own vocabulary, and both get a map
    into the base's (the same map for both).
    """
    if not models:
        raise ValueError("align needs at least one model")
    base = models[0]
    maps: dict[str, torch.Tensor] = {}
    for tuned, untuned in cross:
        maps[tuned.name], maps[untuned.name] = cross_map(base, tuned), cross_map(base, untuned)
        if not torch.equal(maps[tuned.name], maps[untuned.name]):
            raise VocabMismatchError(f"a cross-tokenizer expert pair must share one tokenizer: {tuned.name!r} and "
                                     f"{untuned.name!r} map to {base.name!r}'s vocabulary differently")
    shared = min(min(len(m.vocab), m.logits_width) for m in models)
    notes: list[str] = []
    for other in models[1:]:
        diff = _first_difference(base, other, shared)
        if diff is not None:
            ta, tb = _id_to_token(base.vocab).get(diff), _id_to_token(other.vocab).get(diff)
            raise VocabMismatchError(
                f"vocabulary mismatch between {base.name!r} and {other.name!r}: token id {diff} is {ta!r} in "
                f"{base.name!r} but {tb!r} in {other.name!r}; fused models must share one tokenizer (or mark the "
                f"expert `cross_tokenizer: true` to map its vocabulary by token text)"
            )
        # A base and its instruct sibling share every id but name different eos tokens: the same ids mean a
        # shared vocabulary, and the roles only tell which ids end a sequence (engine/stopping.py).
        notes += [f"{other.name!r} names {key} {other.special.get(key)!r} where {base.name!r} names "
                  f"{base.special.get(key)!r} (same token ids; both end sequences where they are end tokens)"
                  for key in sorted(set(base.special) | set(other.special))
                  if base.special.get(key) != other.special.get(key)]
    return Alignment(shared=shared, width=base.logits_width, maps=maps, notes=tuple(notes))

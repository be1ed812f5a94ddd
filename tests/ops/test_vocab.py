"""Shared-vocabulary alignment."""

import pytest
import torch

from logitfuse.errors import VocabMismatchError
from logitfuse.ops.vocab import VocabInfo, align

SPECIAL = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}


def info(name, tokens, width=None, special=SPECIAL):
    return VocabInfo(name, {t: i for i, t in enumerate(tokens)}, special, width or len(tokens))


def test_padded_tail_is_masked_and_width_is_the_base():
    base = info("big", ["<s>", "a", "b", "c"], width=6)
    small = info("small", ["<s>", "a", "b", "c", "<extra>"])
    al = align([base, small])
    assert (al.shared, al.width) == (4, 6)
    out = al.apply(torch.zeros(2, 5))
    assert out.shape == (2, 6) and torch.isinf(out[:, 4:]).all() and (out[:, :4] == 0).all()


def test_real_mismatch_names_both_models_and_the_id():
    with pytest.raises(VocabMismatchError, match=r"'big' and 'other': token id 2 is 'b' in 'big' but 'x'"):
        align([info("big", ["<s>", "a", "b"]), info("other", ["<s>", "a", "x"])])


def test_siblings_naming_another_eos_share_the_vocabulary():
    """A base and its instruct sibling: every id the same token, another token called eos. Fused, with the
    difference kept as a note for the start-up log."""
    tokens = ["<s>", "</s>", "<|end|>", "a", "b"]
    al = align([info("base", tokens), info("instruct", tokens, special={**SPECIAL, "eos_token": "<|end|>"})])
    assert al.shared == len(tokens) and al.maps == {}
    assert len(al.notes) == 1 and "'instruct' names eos_token '<|end|>' where 'base' names '</s>'" in al.notes[0]
    assert align([info("base", tokens), info("twin", tokens)]).notes == ()

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


def test_special_token_mismatch_is_refused():
    with pytest.raises(VocabMismatchError, match="eos_token"):
        align([info("big", ["a"]), info("other", ["a"], special={**SPECIAL, "eos_token": "<|end|>"})])

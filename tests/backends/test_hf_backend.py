"""The HF backend's KV state: ragged prefill, decode, batch surgery and forgotten positions are all
exactly recomputation from scratch."""

import pytest
import torch

from logitfuse.backends.hf import HFCausalLM

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [20, 21, 22, 23]]
TOL = dict(rtol=0, atol=1e-4)


@pytest.fixture(scope="module")
def model(family):
    return HFCausalLM.load("base-large", str(family["base-large"]), dtype="float32")


def alone(model, ids):
    return model.prefill([ids])[1][0]


def test_ragged_prefill_matches_single_prompts(model):
    _, last = model.prefill(PROMPTS)
    _, full = model.prefill(PROMPTS, all_logits=True)
    for i, p in enumerate(PROMPTS):
        ref = model.prefill([p], all_logits=True)[1][0]
        torch.testing.assert_close(full[i, -len(p):], ref, **TOL)
        torch.testing.assert_close(last[i], ref[-1], **TOL)


def test_decode_select_concat_and_forget_equal_recomputation(model):
    state, _ = model.prefill(PROMPTS)
    seqs = [list(p) for p in PROMPTS]
    for step in range(3):
        toks = torch.tensor([[30 + step]] * 3)
        out = model.decode(state, toks)[:, 0]
        for i in range(3):
            seqs[i].append(30 + step)
            torch.testing.assert_close(out[i], alone(model, seqs[i]), **TOL)
    joined = model.concat([model.select(state, [2, 0]), model.prefill([list(range(40, 50))])[0]])
    seqs = [seqs[2], seqs[0], list(range(40, 50))]
    out = model.decode(joined, torch.tensor([[50], [50], [50]]))[:, 0]
    for i in range(3):
        seqs[i].append(50)
        torch.testing.assert_close(out[i], alone(model, seqs[i]), **TOL)
    model.decode(joined, torch.tensor([[60, 61]] * 3))  # a two-token block, then reject some of it per row
    model.forget_last(joined, [2, 1, 0])
    kept = [[], [60], [60, 61]]
    out = model.decode(joined, torch.tensor([[70], [70], [70]]))[:, 0]
    for i in range(3):
        torch.testing.assert_close(out[i], alone(model, seqs[i] + kept[i] + [70]), **TOL)
    assert model.rows(joined) == 3


def test_select_trims_padding_no_row_needs(model):
    state, _ = model.prefill([[1, 2, 3, 4, 5, 6, 7, 8], [9, 10]])
    short = model.select(state, [1])
    assert short.mask.shape[1] == 2 and all(k.shape[2] == 2 for k, _ in short.layers)


def test_empty_prompt_is_refused(model):
    with pytest.raises(ValueError, match="empty prompt"):
        model.prefill([[1, 2], []])


def test_compacting_forgotten_positions_changes_nothing(model):
    state, _ = model.prefill(PROMPTS)
    seqs = [list(p) for p in PROMPTS]
    for step in range(12):  # rounds of three drafts of which rows keep 0 or 1, or all 3 now and then
        model.decode(state, torch.tensor([[80 + step, 81, 82]] * 3))
        keep = [3 if (step + i) % 5 == 0 else (step + i) % 2 for i in range(3)]
        model.forget_last(state, [3 - k for k in keep])
        for i in range(3):
            seqs[i] += [80 + step, 81, 82][:keep[i]]
    assert state.mask.shape[1] < max(map(len, PROMPTS)) + 3 * 12  # compacted on the way
    compact = model.compact(state)
    assert compact.mask.shape[1] == max(map(len, seqs)) and compact.mask.sum().item() == sum(map(len, seqs))
    for s in (state, compact):
        out = model.decode(s, torch.tensor([[90]] * 3))[:, 0]
        for i in range(3):
            torch.testing.assert_close(out[i], alone(model, seqs[i] + [90]), **TOL)


def test_masked_ragged_decode_equals_recomputation_and_compacts_its_padding(model):
    """Ragged rows right-aligned with their padding masked out: each row's last logits are its own sequence's,
    padding leaves no trace (positions, keys), and hidden padding is compacted away as it accumulates."""
    state, _ = model.prefill(PROMPTS)
    seqs = [list(p) for p in PROMPTS]
    for step in range(14):
        new = [[40 + step, 41, 42][: (step + i) % 4] for i in range(3)]  # 0 to 3 tokens per row
        width = max(map(len, new)) or 1
        ids = torch.tensor([[0] * (width - len(a)) + a for a in new])
        mask = torch.tensor([[0] * (width - len(a)) + [1] * len(a) for a in new])
        out = model.decode(state, ids, new_mask=mask, last_only=True)
        assert out.shape == (3, 1, model.logits_width)
        for i, a in enumerate(new):
            seqs[i] += a
            if a:
                torch.testing.assert_close(out[i, 0], alone(model, seqs[i]), **TOL)
    assert state.mask.sum().item() == sum(map(len, seqs))
    assert state.mask.shape[1] < max(map(len, PROMPTS)) + 3 * 14  # the padding was compacted on the way
    out = model.decode(state, torch.tensor([[90]] * 3))[:, 0]
    for i in range(3):
        torch.testing.assert_close(out[i], alone(model, seqs[i] + [90]), **TOL)

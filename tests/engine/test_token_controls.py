"""Penalties and token controls in the engine: the scores a row samples from equal a float64 reference of
vLLM's formulas over the fused scores, min_tokens holds, bad words and tokens outside allowed_token_ids never
appear, and the text keeps the stop string or special tokens when asked."""

import pytest
import torch

from logitfuse import SamplingParams
from logitfuse.engine import token_controls
from logitfuse.engine.output import CompletionOutput
from logitfuse.errors import InvalidRequest
from logitfuse.ops.sampling import SamplingTensors

PROMPT = "the red city of the north"


def run(lf, model, sp, prompt=PROMPT, n=1, fusion=None):
    reqs = lf.requests(model, prompt, sp, fusion, n=n)
    done = {r.rid: CompletionOutput(r.rid) for r in reqs}
    for ev in lf.stream(reqs):
        done[ev.rid].add(ev)
    return [done[r.rid] for r in reqs]


def reference(fused, prompt, generated, bias, sp):
    """vLLM's order in float64, token by token: masks, logit_bias, then the penalties."""
    out = fused.double().clone()
    for tok, b in bias:
        out[tok] += b
    for tok in range(out.shape[0]):
        if tok in prompt or tok in generated:
            out[tok] = out[tok] / sp.repetition_penalty if out[tok] > 0 else out[tok] * sp.repetition_penalty
        count = generated.count(tok)
        out[tok] -= sp.frequency_penalty * count + sp.presence_penalty * (count > 0)
    return out


def test_the_scores_sampled_from_equal_the_reference_of_vllms_penalties(lf):
    sps = [SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, repetition_penalty=1.7,
                          frequency_penalty=0.6, presence_penalty=-0.3, logit_bias=((9, 2.5),)),
           SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)]
    engine = lf.engine
    reqs = [lf.requests("eft-ab", p, sp, rid=f"pen-{i}")[0] for i, (p, sp) in enumerate(zip([PROMPT, "one two"], sps))]
    for r in reqs:
        engine.add(r)
    for _ in range(3):  # a few tokens in, so the output counts are not empty
        engine.step()
    seqs = [engine._seqs[r.rid] for r in reqs]
    assert all(len(s.generated) == 3 for s in seqs)
    fused, _ = engine._fuser.fuse(seqs, engine._slots)
    params = SamplingTensors.build([(0.0, -1, 1.0, 0.0)] * 2, "cpu", [sp.logit_bias for sp in sps], fused.shape[-1])
    shaped, rest = token_controls.shape(seqs, fused, params, lf.pool.get("base-large").tokenizer)
    assert rest.bias is None  # folded in here, before the penalties, as vLLM does
    for i, s in enumerate(seqs):
        want = reference(fused[i], s.req.prompt_ids, s.generated, sps[i].logit_bias, sps[i])
        assert torch.allclose(shaped[i].double(), want, rtol=1e-6, atol=1e-5)
    assert not torch.equal(shaped[0], fused[0])
    for r in reqs:
        engine.abort(r.rid)
    list(lf.stream([]))


def test_a_repetition_penalty_changes_greedy_output_and_one_is_neutral(lf):
    plain = run(lf, "proxy-a", SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))[0]
    same = run(lf, "proxy-a", SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, repetition_penalty=1.0,
                                             presence_penalty=0.0))[0]
    hard = run(lf, "proxy-a", SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, repetition_penalty=50.0,
                                             presence_penalty=2.0, frequency_penalty=2.0))[0]
    assert same.token_ids == plain.token_ids
    assert hard.token_ids != plain.token_ids
    assert len(set(hard.token_ids)) > len(set(plain.token_ids)) or len(set(hard.token_ids)) == 12


def test_min_tokens_masks_stop_ids_and_stop_strings_until_reached(lf):
    free = run(lf, "proxy-a", SamplingParams(max_tokens=10, temperature=0, ignore_eos=True))[0]
    first = free.token_ids[0]
    stopped = run(lf, "proxy-a", SamplingParams(max_tokens=10, temperature=0, stop_token_ids=(first,)))[0]
    assert stopped.token_ids == [first] and stopped.finish_reason == "stop"
    held = run(lf, "proxy-a", SamplingParams(max_tokens=10, temperature=0, stop_token_ids=(first,), min_tokens=5))[0]
    assert len(held.token_ids) >= 5 and first not in held.token_ids[:5]
    word = free.text.split()[0]
    by_text = run(lf, "proxy-a", SamplingParams(max_tokens=10, temperature=0, ignore_eos=True, stop=(word,),
                                                min_tokens=4))[0]
    assert by_text.completion_tokens > 4  # vLLM looks for stop strings once more than min_tokens are out
    eos = lf.pool.get("base-large").tokenizer.eos_token_id
    for o in run(lf, "proxy-a", SamplingParams(max_tokens=8, temperature=1.0, seed=4, min_tokens=8,
                                                logit_bias=((eos, 30.0),)), n=4):
        assert len(o.token_ids) == 8 and eos not in o.token_ids and o.finish_reason == "length"


def test_bad_words_and_allowed_token_ids_hold_for_sampled_rows(lf):
    tok = lf.pool.get("base-large").tokenizer
    free = run(lf, "eft-ab", SamplingParams(max_tokens=12, temperature=1.0, seed=1, ignore_eos=True), n=6)
    words = sorted({w for o in free for w in o.text.split()}, key=len)[-2:]
    banned = run(lf, "eft-ab", SamplingParams(max_tokens=12, temperature=1.0, seed=1, ignore_eos=True,
                                              bad_words=tuple(words)), n=6)
    for o in banned:
        for w in words:
            ids = tok.encode(w, add_special_tokens=False)
            assert not any(o.token_ids[i:i + len(ids)] == ids for i in range(len(o.token_ids))), (w, o.text)
    allowed = (10, 20, 30, 40, 50)
    for o in run(lf, "dlf-ab", SamplingParams(max_tokens=6, temperature=1.0, seed=2, ignore_eos=True,
                                              allowed_token_ids=allowed), n=4):
        assert set(o.token_ids) <= set(allowed)


def test_include_stop_str_and_skip_special_tokens_shape_the_text(lf):
    free = run(lf, "proxy-a", SamplingParams(max_tokens=10, temperature=0, ignore_eos=True))[0]
    stop = free.text.strip().split()[1]
    cut = run(lf, "proxy-a", SamplingParams(max_tokens=10, temperature=0, ignore_eos=True, stop=(stop,)))[0]
    kept = run(lf, "proxy-a", SamplingParams(max_tokens=10, temperature=0, ignore_eos=True, stop=(stop,),
                                             include_stop_str_in_output=True))[0]
    assert kept.text == cut.text + stop and not cut.text.endswith(stop)
    user = lf.pool.get("base-large").tokenizer.convert_tokens_to_ids("<|user|>")
    sp = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True, logit_bias=((user, 100.0),))
    assert "<|user|>" not in run(lf, "proxy-a", sp)[0].text
    shown = run(lf, "proxy-a", SamplingParams(**{**sp.__dict__, "skip_special_tokens": False}))[0]
    assert shown.text.count("<|user|>") == 3


def test_out_of_range_and_speculative_requests_are_refused_naming_the_field(lf):
    for kw, field in [({"repetition_penalty": 0.0}, "repetition_penalty"), ({"presence_penalty": 2.5},
                      "presence_penalty"), ({"frequency_penalty": float("nan")}, "frequency_penalty"),
                      ({"min_tokens": 9, "max_tokens": 4}, "min_tokens"), ({"allowed_token_ids": ()},
                      "allowed_token_ids"), ({"bad_words": (" ",)}, "bad_words")]:
        with pytest.raises(InvalidRequest) as err:
            SamplingParams(**kw).check()
        assert err.value.param == field
    req = lf.requests("proxy-a", PROMPT, SamplingParams(allowed_token_ids=(5, 10_000)))[0]
    with pytest.raises(InvalidRequest, match="outside") as err:
        lf.check(req)
    assert err.value.param == "allowed_token_ids"
    req = lf.requests("proxy-a", PROMPT, SamplingParams(repetition_penalty=1.2), {"speculative": {"k": 2}})[0]
    with pytest.raises(InvalidRequest, match="speculative"):
        lf.check(req)

"""The engine end to end on tiny models: KV-cached fused decoding equals recomputation from scratch,
seeds, stops, prompt scoring, vocabulary checks."""

from dataclasses import replace

import pytest
import torch

from logitfuse import SamplingParams
from logitfuse.errors import InvalidRequest
from logitfuse.methods import dlf
from logitfuse.ops import fusion
from logitfuse.ops.weights import make_grid, solve_dlf

PROMPTS = ["the red city of the north", "one", "king queen river blue green"]  # ragged: left padding


def recomputed_fused(lf, model, fusion_params, prefix_by_model):
    """Fused log-probs of the next token, every model run from scratch on its whole prefix (no cache)."""
    plan = lf.registry.plan(model, fusion_params)
    z = {n: lf.pool.get(n).prefill([prefix_by_model[n]])[1].double() for n in plan.models()}
    base = z[plan.base]
    if plan.method == "none":
        return torch.log_softmax(base, -1)[0]
    tuned = torch.stack([z[e.tuned] for e in plan.experts], 1)
    untuned = torch.stack([z[e.untuned] for e in plan.experts], 1)
    coef = torch.tensor([plan.coef], dtype=torch.float64)
    if plan.method == "proxy":
        out = fusion.proxy_tune(base, tuned, untuned, coef)
    elif plan.method == "eft":
        out = fusion.eft(base, tuned, untuned, torch.ones(1, dtype=torch.float64), coef)
    else:
        w = solve_dlf(base, untuned[:, 0], tuned, make_grid(*plan.grid), plan.mode).weights
        out = fusion.dlf_combine(base, tuned, untuned, w)
    return torch.log_softmax(out, -1)[0]


@pytest.mark.parametrize("model,fusion_params", [
    ("base-large", None), ("proxy-a", None), ("proxy-a", {"alpha": 0.6}), ("eft-ab", None),
    ("dlf-ab", None), ("dlf-ab", {"mode": "joint"}), ("proxy-a", {"experts": ["a", "b"], "weights": [1.0, -0.5]}),
])
def test_cached_batched_decoding_equals_recomputation(lf, model, fusion_params):
    sp = SamplingParams(max_tokens=6, temperature=0, logprobs=5, ignore_eos=True)
    reqs = [r for p in PROMPTS for r in lf.requests(model, p, sp, fusion_params)]
    outs = {r.rid: [] for r in reqs}
    for ev in lf.stream(reqs):
        if ev.token_id is not None:
            outs[ev.rid].append(ev)
    for r in reqs:
        assert len(outs[r.rid]) == 6
        generated = []
        for ev in outs[r.rid]:
            ref = recomputed_fused(lf, model, fusion_params, {n: p + generated for n, p in r.prompts.items()})
            assert ev.token_id == int(ref.argmax())
            assert ev.logprob == pytest.approx(ref[ev.token_id].item(), abs=1e-5)
            top_ref = torch.topk(ref, 5)
            assert [t.token_id for t in ev.top] == top_ref.indices.tolist()
            assert [t.logprob for t in ev.top] == pytest.approx(top_ref.values.tolist(), abs=1e-5)
            generated.append(ev.token_id)


def test_greedy_is_deterministic(lf):
    sp = SamplingParams(max_tokens=8, temperature=0)
    a = lf.generate("eft-ab", PROMPTS, sp)
    b = lf.generate("eft-ab", PROMPTS, sp)
    assert [o.token_ids for o in a] == [o.token_ids for o in b]


def test_seeded_sampling_is_reproducible_and_independent_of_the_batch(lf):
    sp = SamplingParams(max_tokens=10, temperature=1.0, top_p=0.9, seed=1234, ignore_eos=True)
    alone = lf.generate("proxy-a", [PROMPTS[0]], sp)[0]
    others = SamplingParams(max_tokens=4, temperature=0.7, seed=7)
    reqs = (lf.requests("proxy-a", PROMPTS[1], others) + lf.requests("proxy-a", PROMPTS[0], sp)
            + lf.requests("proxy-a", PROMPTS[2], others, {"alpha": 0.3}))
    tokens = {r.rid: [] for r in reqs}
    for ev in lf.stream(reqs):
        if ev.token_id is not None:
            tokens[ev.rid].append(ev.token_id)
    assert tokens[reqs[1].rid] == alone.token_ids
    again = lf.generate("proxy-a", [PROMPTS[0]], sp)[0]
    assert again.token_ids == alone.token_ids
    different = lf.generate("proxy-a", [PROMPTS[0]], SamplingParams(**{**sp.__dict__, "seed": 99}))[0]
    assert different.token_ids != alone.token_ids


def test_stop_token_ids_stop_strings_and_length(lf):
    free = lf.generate("base-large", [PROMPTS[0]], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))[0]
    assert free.finish_reason == "length" and len(free.token_ids) == 8
    stop_id = free.token_ids[3]
    by_id = lf.generate("base-large", [PROMPTS[0]], SamplingParams(
        max_tokens=8, temperature=0, ignore_eos=True, stop_token_ids=(stop_id,)))[0]
    first = free.token_ids.index(stop_id)
    assert by_id.finish_reason == "stop" and by_id.token_ids == free.token_ids[: first + 1]
    word = free.text.strip().split()[1] if len(free.text.split()) > 1 else free.text.strip()[-2:]
    by_text = lf.generate("base-large", [PROMPTS[0]], SamplingParams(
        max_tokens=8, temperature=0, ignore_eos=True, stop=(word,)))[0]
    assert by_text.finish_reason == "stop"
    assert by_text.text == free.text[: free.text.index(word)]
    assert word not in by_text.text


def test_prompt_scores_equal_recomputation(lf):
    sp = SamplingParams(max_tokens=1, temperature=0, logprobs=3, prompt_logprobs=True)
    req = lf.requests("proxy-a", PROMPTS[0], sp)[0]
    scores = next(ev for ev in lf.stream([req]) if not hasattr(ev, "token_id"))
    ids = req.prompt_ids
    assert scores.token_ids == ids and scores.logprobs[0] is None
    for j in range(1, len(ids)):
        ref = recomputed_fused(lf, "proxy-a", None, dict.fromkeys(req.prompts, ids[:j]))
        assert scores.logprobs[j] == pytest.approx(ref[ids[j]].item(), abs=1e-5)
        assert scores.top[j][0].token_id == int(ref.argmax())


def test_max_tokens_zero_scores_only(lf):
    req = lf.requests("eft-ab", PROMPTS[2], SamplingParams(max_tokens=0, logprobs=1, prompt_logprobs=True))[0]
    events = list(lf.stream([req]))
    assert events[-1].finish_reason == "length" and events[-1].completion_tokens == 0
    assert all(getattr(ev, "token_id", None) is None for ev in events)


def test_context_overflow_names_both_numbers(lf):
    with pytest.raises(InvalidRequest, match=r"256 tokens.*prompt has 3 tokens and max_tokens is 300") as err:
        lf.engine.add(lf.requests("proxy-a", [5, 6, 7], SamplingParams(max_tokens=300))[0])
    assert err.value.param == "max_tokens"


def test_vocabulary_mismatch_is_refused_naming_both_models(lf):
    req = lf.requests("proxy-a", [5, 6, 7], SamplingParams(max_tokens=2), {"experts": ["alien"]})[0]
    with pytest.raises(InvalidRequest, match=r"'base-large' and 'foreign'.*token id \d+"):
        lf.engine.add(req)


def test_padded_vocabulary_tail_is_aligned_and_masked(lf):
    out = lf.generate("proxy-a", PROMPTS, SamplingParams(max_tokens=5, temperature=1.5, seed=3, logprobs=20),
                      {"experts": ["pad"]})
    shared = len(lf.pool.get("base-large").tokenizer)
    assert all(t < shared for o in out for t in o.token_ids)
    assert all(lp > float("-inf") for o in out for lp in o.logprobs)


def test_dlf_reports_weights_per_step(lf):
    out = lf.generate("dlf-ab", [PROMPTS[0]], SamplingParams(max_tokens=4, temperature=0))[0]
    assert len(out.diagnostics) == 4
    grid = set(make_grid(*dlf.GRID).tolist())
    for d in out.diagnostics:
        w = d["dlf_weights"]
        assert set(w) == {"a", "b"} and sum(v != 0 for v in w.values()) <= 1
        assert all(round(v, 6) in grid for v in w.values())


def test_requests_joining_mid_decode_match_running_alone(lf):
    sp = SamplingParams(max_tokens=6, temperature=0.8, seed=5, ignore_eos=True, logprobs=0)
    alone = lf.generate("proxy-a", [PROMPTS[2]], sp)[0]
    first = lf.requests("proxy-a", PROMPTS[0], SamplingParams(max_tokens=10, temperature=0))
    late = lf.requests("proxy-a", PROMPTS[2], sp)[0]
    engine, got = lf.engine, []
    engine.add(first[0])
    for _ in range(3):
        engine.step()
    engine.add(late)
    while engine.has_work():
        got += [ev for ev in engine.step() if ev.rid == late.rid and ev.token_id is not None]
    assert [ev.token_id for ev in got] == alone.token_ids
    assert [ev.logprob for ev in got] == pytest.approx(alone.logprobs, abs=1e-5)


def test_abort_and_deadline_end_sequences_at_a_step_boundary(lf):
    import time

    sp = SamplingParams(max_tokens=50, temperature=0, ignore_eos=True)
    a, b = lf.requests("proxy-a", PROMPTS[0], sp) + lf.requests("proxy-a", PROMPTS[1], sp)
    b.deadline = time.monotonic() - 1
    engine = lf.engine
    engine.add(a)
    engine.add(b)
    first = engine.step()
    assert any(ev.rid == b.rid and ev.finish_reason == "abort" for ev in first)
    engine.abort(a.rid)
    rest = [ev for ev in engine.step() if ev.rid == a.rid]
    assert rest[-1].finish_reason == "abort" and not engine.has_work() and not engine.kv_states()


def test_a_mixed_batch_equals_each_request_alone(lf):
    specs = [("proxy-a", PROMPTS[0], SamplingParams(max_tokens=7, temperature=0.9, seed=1, ignore_eos=True), None),
             ("proxy-a", PROMPTS[1], SamplingParams(max_tokens=5, temperature=0, ignore_eos=True), {"alpha": 0.4}),
             ("eft-ab", PROMPTS[2], SamplingParams(max_tokens=6, temperature=1.2, top_k=5, seed=2), None),
             ("dlf-ab", PROMPTS[0], SamplingParams(max_tokens=6, temperature=0.5, top_p=0.8, seed=3), None),
             ("base-small", PROMPTS[2], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True), None)]
    alone = [lf.generate(m, [p], sp, f)[0] for m, p, sp, f in specs]
    reqs = [lf.requests(m, p, sp, f, rid=f"mix-{i}")[0] for i, (m, p, sp, f) in enumerate(specs)]
    got = {r.rid: ([], []) for r in reqs}
    for ev in lf.stream(reqs):
        if ev.token_id is not None:
            got[ev.rid][0].append(ev.token_id)
            got[ev.rid][1].append(ev.logprob)
    for r, ref in zip(reqs, alone):
        assert got[r.rid][0] == ref.token_ids
        assert got[r.rid][1] == pytest.approx(ref.logprobs, abs=1e-5)


def test_a_failing_request_ends_alone_and_the_others_finish(lf, monkeypatch):
    sp = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    good = lf.requests("proxy-a", PROMPTS[0], sp, rid="good")[0]
    bad_tq = lf.requests("tq", PROMPTS[1], sp, rid="bad-tq")[0]
    reward = lf.pool.get("rm")
    monkeypatch.setattr(reward, "score", lambda texts: (_ for _ in ()).throw(RuntimeError("reward model down")))
    events = list(lf.stream([good, bad_tq]))
    ends = {ev.rid: ev for ev in events if ev.finish_reason}
    assert ends["bad-tq"].finish_reason == "error" and "reward model down" in ends["bad-tq"].error
    assert ends["good"].finish_reason == "length" and ends["good"].completion_tokens == 6
    late = lf.requests("proxy-a", PROMPTS[2], sp, rid="late")[0]
    base = lf.pool.get("base-large")
    monkeypatch.setattr(base, "prefill", lambda *a, **k: (_ for _ in ()).throw(MemoryError("no room")))
    engine = lf.engine
    running = lf.requests("eft-ab", PROMPTS[0], sp, rid="running")[0]
    monkeypatch.undo()
    engine.add(running)
    engine.step()
    monkeypatch.setattr(base, "prefill", lambda *a, **k: (_ for _ in ()).throw(MemoryError("no room")))
    engine.add(late)
    out = engine.step()
    assert any(ev.rid == "late" and ev.finish_reason == "error" and "no room" in ev.error for ev in out)
    monkeypatch.undo()
    rest = [ev for ev in lf.stream([]) if ev.rid == "running"]
    assert rest[-1].finish_reason == "length" and rest[-1].completion_tokens == 6


def test_a_model_failing_its_decode_step_ends_only_the_sequences_using_it(lf, monkeypatch):
    sp = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    uses_b = lf.requests("eft-ab", PROMPTS[0], sp, rid="uses-b")[0]
    other = lf.requests("proxy-a", PROMPTS[1], sp, rid="other")[0]
    tuned_b = lf.pool.get("tuned-b")
    engine = lf.engine
    engine.add(uses_b)
    engine.add(other)
    engine.step()
    monkeypatch.setattr(tuned_b, "decode", lambda *a, **k: (_ for _ in ()).throw(ConnectionError("endpoint down")))
    events = engine.step()
    monkeypatch.undo()
    events += list(lf.stream([]))
    ends = {ev.rid: ev for ev in events if ev.finish_reason}
    assert ends["uses-b"].finish_reason == "error" and "endpoint down" in ends["uses-b"].error
    assert ends["other"].finish_reason == "length" and ends["other"].completion_tokens == 6
    assert not engine.has_work() and not engine.kv_states()
    alone = lf.generate("proxy-a", [PROMPTS[1]], sp)[0]
    assert [ev.token_id for ev in events if ev.rid == "other" and ev.token_id is not None][-4:] == alone.token_ids[-4:]


def test_solver_threads_change_nothing_but_the_search_threads(lf, monkeypatch):
    sp = SamplingParams(max_tokens=5, temperature=0, ignore_eos=True)
    want = lf.generate("dlf-ab", PROMPTS, sp)
    seen = []
    import logitfuse.methods.dlf as fuser_module

    solve = fuser_module.solve_dlf
    monkeypatch.setattr(fuser_module, "solve_dlf", lambda *a: seen.append(torch.get_num_threads()) or solve(*a))
    before = torch.get_num_threads()
    monkeypatch.setattr(lf.engine._fuser, "solver_threads", before + 1)
    got = lf.generate("dlf-ab", PROMPTS, sp)
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    assert seen and set(seen) == {before + 1} and torch.get_num_threads() == before


def test_logit_bias_steers_sampling_and_leaves_logprobs_the_fused_ones(lf):
    sp = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True, logprobs=3)
    plain = lf.generate("proxy-a", PROMPTS[:1], sp)[0]
    first = plain.token_ids[0]
    banned = lf.generate("proxy-a", PROMPTS[:1], replace(sp, logit_bias=((first, -100.0),)))[0]
    assert banned.token_ids[0] != first and first not in banned.token_ids
    # the runner-up of the fused distribution takes the banned token's place; logprobs stay unbiased
    assert banned.token_ids[0] == plain.top_logprobs[0][1].token_id
    assert [t.token_id for t in banned.top_logprobs[0]] == [t.token_id for t in plain.top_logprobs[0]]
    assert banned.logprobs[0] == pytest.approx(plain.top_logprobs[0][1].logprob, abs=1e-5)
    forced = lf.generate("proxy-a", PROMPTS[:1], replace(sp, logit_bias=((7, 100.0),), temperature=1.0, seed=1))[0]
    assert forced.token_ids == [7] * 4
    with pytest.raises(InvalidRequest, match="outside this model's vocabulary"):
        lf.generate("proxy-a", PROMPTS[:1], replace(sp, logit_bias=((10**6, 1.0),)))
    with pytest.raises(InvalidRequest, match="logit_bias"):
        lf.generate("proxy-a", PROMPTS[:1], replace(sp, logit_bias=((7, 101.0),)))

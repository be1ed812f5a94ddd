"""Speculative EFT: greedy output is plain fused greedy token for token; sampled output has exactly the
fused distribution (checked on the acceptance rule itself, by simulation against the known p)."""

import math

import pytest
import torch

from logitfuse import SamplingParams
from logitfuse.api import SpeculativeEFT
from logitfuse.engine import speculative
from logitfuse.engine.speculative import accept_row
from logitfuse.errors import InvalidRequest
from logitfuse.ops.sampling import SamplingTensors, make_generator, warp

PROMPTS = ["the red city of the north", "one", "king queen river blue green"]


def test_greedy_speculative_equals_plain_greedy(lf):
    sp = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
    for fusion_params in ({"method": "eft"}, {"method": "proxy", "alpha": 0.7}):
        plain = lf.generate("proxy-a", PROMPTS, sp, fusion_params)
        for k in (1, 3):
            spec = SpeculativeEFT(lf, k=k)
            out = spec.generate([r for p in PROMPTS for r in lf.requests("proxy-a", p, sp, fusion_params)])
            assert [o.token_ids for o in out] == [o.token_ids for o in plain]
            assert [o.text for o in out] == [o.text for o in plain]
            for a, b in zip(out, plain):
                assert torch.allclose(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-4)
            assert spec.stats.drafted > 0


def test_a_draft_that_is_the_fused_model_is_always_accepted():
    p = torch.softmax(torch.randn(4, 7, generator=torch.Generator().manual_seed(0)), -1)
    gen = make_generator(1)
    for _ in range(50):
        drafts = [int(torch.multinomial(p[i], 1, generator=gen)) for i in range(3)]
        n, nxt = accept_row(p, p[:3], drafts, gen)
        assert nxt is not None  # the bonus, from p[3]
        assert n == 3


def test_emitted_tokens_follow_the_fused_distribution():
    g = torch.Generator().manual_seed(3)
    p = torch.softmax(torch.randn(3, 5, generator=g) * 1.5, -1)  # fused, k = 2
    q = torch.softmax(torch.randn(2, 5, generator=g) * 1.5, -1)  # draft
    q[0, 4] = 0.0  # the draft never proposes a token the fused model likes
    q = q / q.sum(-1, keepdim=True)
    gen, n = make_generator(7), 20000
    first = torch.zeros(5)
    second = torch.zeros(5)
    for _ in range(n):
        d0 = int(torch.multinomial(q[0], 1, generator=gen))
        d1 = int(torch.multinomial(q[1], 1, generator=gen))
        acc, nxt = accept_row(p, q, [d0, d1], gen)
        first[d0 if acc >= 1 else nxt] += 1
        if acc >= 1:
            second[d1 if acc == 2 else nxt] += 1
    assert torch.allclose(first / n, p[0], atol=0.012), (first / n, p[0])
    assert torch.allclose(second / second.sum(), p[1], atol=0.015), (second / second.sum(), p[1])


def test_greedy_acceptance_takes_the_leading_argmax_matches_of_raw_scores():
    scores = torch.tensor([[-5.0, -1.0, -9.0], [2.0, -3.0, 0.0], [-1.0, -2.0, 4.0]])  # argmax 1, 0, 2
    assert accept_row(scores, None, [1, 0], None) == (2, 2)  # both accepted, the bonus is position 2's argmax
    assert accept_row(scores, None, [1, 2], None) == (1, 0)  # the second rejected: its argmax instead
    assert accept_row(scores, None, [0, 0], None) == (0, 1)
    assert accept_row(scores[:2], None, [1, 0], None) == (2, None)  # the bonus position is not scored yet
    assert accept_row(scores[:1], None, [], None) == (0, 1) and accept_row(None, None, [], None) == (0, None)


def test_the_engine_decides_every_row_with_the_tested_rule(lf, monkeypatch):
    """The rule above is the one the engine runs: every row of every round, greedy and sampled, goes through
    accept_row, and the engine emits exactly what it returned."""
    calls = []

    def spy(p, q, drafts, gen):
        out = accept_row(p, q, drafts, gen)
        calls.append((gen is None, len(drafts), out))
        return out

    monkeypatch.setattr(speculative, "accept_row", spy)
    sps = [SamplingParams(max_tokens=12, temperature=0, ignore_eos=True),
           SamplingParams(max_tokens=12, temperature=0.8, seed=5, ignore_eos=True)]
    spec = SpeculativeEFT(lf, k=3)
    out = spec.generate([lf.requests("proxy-a", PROMPTS[0], sp)[0] for sp in sps])
    assert {greedy for greedy, _, _ in calls} == {True, False}
    assert len(calls) == spec.stats.row_rounds and sum(c[1] for c in calls) == spec.stats.drafted
    assert sum(c[2][0] for c in calls) == spec.stats.accepted > 0
    assert [len(o.token_ids) for o in out] == [12, 12]


def test_adaptive_draft_length_keeps_greedy_output(lf):
    sp = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    plain = lf.generate("proxy-a", PROMPTS, sp)
    for threshold in (0.05, 0.2, 0.9):
        spec = SpeculativeEFT(lf, k=4, min_draft_prob=threshold)
        out = spec.generate([r for p in PROMPTS for r in lf.requests("proxy-a", p, sp)])
        assert [o.token_ids for o in out] == [o.token_ids for o in plain]
        assert spec.stats.drafted < 4 * spec.stats.rounds * len(PROMPTS)  # some rows stopped drafting early


def _fused_top3(lf, ids: list[int], temperature: float) -> dict[int, float]:
    """The fused sampling distribution under top_k 3, from the plain engine's (unwarped) logprobs."""
    out = lf.generate("proxy-a", [ids], SamplingParams(max_tokens=1, temperature=0, logprobs=3))[0]
    top = {t.token_id: math.exp(t.logprob / temperature) for t in out.top_logprobs[0]}
    total = sum(top.values())
    return {t: v / total for t, v in top.items()}


def test_sampled_speculative_tokens_follow_the_fused_distribution(lf):
    """Joint law of the first three tokens (t1 from the prompt, t2 and t3 from one speculative round with
    a draft length that varies by row) against the exact fused distribution computed by the plain engine."""
    prompt = lf.pool.get("base-large").tokenizer("the red city").input_ids
    T = 0.5
    exact: dict[tuple[int, ...], float] = {}
    for t1, p1 in _fused_top3(lf, prompt, T).items():
        for t2, p2 in _fused_top3(lf, [*prompt, t1], T).items():
            for t3, p3 in _fused_top3(lf, [*prompt, t1, t2], T).items():
                exact[(t1, t2, t3)] = p1 * p2 * p3
    # a threshold between the draft's confidences after the possible first tokens: some rows draft, some not
    tuned = lf.pool.get("tuned-a")
    warped = SamplingTensors.build([(T, 3, 1.0, 0.0)])
    conf = sorted(float(torch.softmax(warp(tuned.prefill([[*prompt, t1]])[1], warped), -1).max())
                  for t1 in {k[0] for k in exact})
    assert conf[0] < conf[-1]
    n = 3000
    reqs = [r for i in range(n) for r in lf.requests(
        "proxy-a", prompt, SamplingParams(max_tokens=3, temperature=T, top_k=3, seed=i, ignore_eos=True))]
    spec = SpeculativeEFT(lf, k=2, min_draft_prob=(conf[0] + conf[-1]) / 2)
    seen: dict[tuple[int, ...], int] = {}
    for o in spec.generate(reqs):
        seen[tuple(o.token_ids)] = seen.get(tuple(o.token_ids), 0) + 1
    assert set(seen) <= set(exact)
    assert 0 < spec.stats.drafted < 2 * n  # rows drafted different lengths
    assert spec.stats.accepted > 0
    for key, p in exact.items():
        assert abs(seen.get(key, 0) / n - p) < 4 * math.sqrt(p * (1 - p) / n) + 1e-3, (key, seen.get(key), p)


def test_speculative_rows_share_the_engine_with_plain_rows_and_join_mid_decode(lf):
    """Plain and speculative requests in one engine, a speculative one joining after three steps: each
    gets what it gets alone (greedy tokens, logprobs, top logprobs), and max_tokens is exact."""
    spec = {"speculative": {"k": 3}}
    sps = [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True, logprobs=2) for n in (14, 5, 9)]
    alone = [lf.generate("proxy-a", [p], sp)[0] for p, sp in zip(PROMPTS, sps)]
    first = lf.requests("proxy-a", PROMPTS[0], sps[0])[0]  # plain
    second = lf.requests("proxy-a", PROMPTS[1], sps[1], spec)[0]
    late = lf.requests("proxy-a", PROMPTS[2], sps[2], spec)[0]
    assert second.plan.speculative.k == 3 and first.plan.speculative is None
    engine, got = lf.engine, {r.rid: [] for r in (first, second, late)}
    engine.add(first)
    engine.add(second)
    for _ in range(3):
        for ev in engine.step():
            got[ev.rid].append(ev)
    engine.add(late)
    while engine.has_work():
        for ev in engine.step():
            got[ev.rid].append(ev)
    assert not engine.kv_states()
    for req, want in zip((first, second, late), alone):
        evs = [ev for ev in got[req.rid] if ev.token_id is not None]
        assert [ev.token_id for ev in evs] == want.token_ids
        assert len(evs) == req.sampling.max_tokens and evs[-1].finish_reason == "length"
        assert [ev.logprob for ev in evs] == pytest.approx(want.logprobs, abs=1e-4)
        assert [[t.token_id for t in ev.top] for ev in evs] == [[t.token_id for t in top] for top in want.top_logprobs]


def test_speculative_needs_one_proxy_or_eft_expert(lf):
    with pytest.raises(InvalidRequest, match="exactly one expert"):
        lf.requests("eft-ab", "one", None, {"speculative": {"k": 2}})
    with pytest.raises(InvalidRequest, match="exactly one expert"):
        SpeculativeEFT(lf, k=2).generate(lf.requests("dlf-ab", "one"))
    assert lf.requests("proxy-a", "one", None, {"speculative": {"k": 0}})[0].plan.speculative is None


def test_drafting_pauses_while_the_group_is_larger_than_max_batch(lf):
    same = [SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)] * 3
    mixed = [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True) for n in (3, 3, 16)]
    for sps, drafts in ((same, False), (mixed, True)):
        plain = [lf.generate("proxy-a", [p], sp)[0] for p, sp in zip(PROMPTS, sps)]
        spec = SpeculativeEFT(lf, k=3, max_batch=1)
        out = spec.generate([r for p, sp in zip(PROMPTS, sps) for r in lf.requests("proxy-a", p, sp)])
        assert [o.token_ids for o in out] == [o.token_ids for o in plain]
        assert (spec.stats.drafted > 0) == drafts  # only once the two short requests have left


def test_an_ensembles_speculative_setting_gives_way_to_overrides_it_cannot_serve(config_file, tmp_path):
    from logitfuse import LogitFuse

    cfg = tmp_path / "spec.yaml"
    cfg.write_text(config_file.read_text().replace(
        "ensembles:\n", "ensembles:\n  spec-a: {base: base-large, method: eft, experts: [a], speculative: {k: 3}}\n"))
    lf = LogitFuse(cfg)
    assert lf.registry.plan("spec-a").speculative.k == 3
    assert lf.registry.plan("spec-a", {"experts": ["a", "b"]}).speculative is None  # two experts: plain EFT
    assert lf.registry.plan("spec-a", {"method": "dlf", "experts": ["a", "b"]}).speculative is None
    assert lf.registry.plan("spec-a", {"experts": ["xa"]}).speculative is None  # cross-tokenizer: plain
    with pytest.raises(InvalidRequest, match="exactly one expert"):  # asked for in the request itself
        lf.registry.plan("spec-a", {"experts": ["a", "b"], "speculative": {"k": 2}})
    bad = tmp_path / "bad.yaml"
    bad.write_text(config_file.read_text().replace(
        "ensembles:\n", "ensembles:\n  bad: {base: base-large, method: dlf, experts: [a, b], speculative: {k: 3}}\n"))
    with pytest.raises(ValueError, match=r"ensembles\.bad: .*exactly one expert"):
        LogitFuse(bad)


def test_the_tuned_pass_over_the_last_draft_waits_for_a_fully_accepted_block(lf, monkeypatch):
    """The tuned expert scores the position after d_k only for rows that accepted all k drafts (the bonus
    token needs it); a round where every row rejected one skips that pass, and output stays plain greedy."""
    sp = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    plain = lf.generate("proxy-a", PROMPTS[:1], sp)
    tuned = lf.pool.get(lf.registry.plan("proxy-a").experts[0].tuned)
    calls = []
    real = tuned.decode
    monkeypatch.setattr(tuned, "decode", lambda state, tokens: calls.append(tokens.shape) or real(state, tokens))
    k, spec = 3, SpeculativeEFT(lf, k=3)
    out = spec.generate(lf.requests("proxy-a", PROMPTS[0], sp))
    assert [o.token_ids for o in out] == [o.token_ids for o in plain]
    st = spec.stats
    full_blocks = st.accepted // k  # at most this many rounds accepted all k drafts
    assert st.rounds > full_blocks  # some rounds rejected a draft (random tiny models)
    assert len(calls) <= st.rounds * k + full_blocks < st.rounds * (k + 1)


def test_speculative_greedy_with_logit_bias_equals_plain_greedy_with_it(lf):
    sp = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    first = lf.generate("proxy-a", PROMPTS, sp)
    biased = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True,
                            logit_bias=tuple((t, -100.0) for t in sorted({o.token_ids[1] for o in first})))
    plain = lf.generate("proxy-a", PROMPTS, biased)
    spec = SpeculativeEFT(lf, k=3)
    out = spec.generate([r for p in PROMPTS for r in lf.requests("proxy-a", p, biased)])
    assert [o.token_ids for o in out] == [o.token_ids for o in plain]
    assert [o.token_ids for o in plain] != [o.token_ids for o in first]

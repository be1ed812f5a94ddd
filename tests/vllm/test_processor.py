"""vLLM + FusionLogitsProcessor against logitfuse's own engine on the same registry: greedy tokens equal and
fused log-probabilities within 1e-3, for proxy, EFT, DLF, a LoRA-adapter expert, an expert pair with another
tokenizer and Transfer Q* (seeded rollouts); plain rows untouched; mixed batches whose rows finish at
different steps; bad requests refused while the engine keeps serving."""

import math

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed (.ci/vllm makes a venv with it)")

from logitfuse.engine.request import SamplingParams as LFParams

TOL = 1e-3


def vllm_params(ensemble: str | None, max_tokens: int, **extra):
    from vllm import SamplingParams

    args = {"ensemble": ensemble, **extra} if ensemble else None
    return SamplingParams(temperature=0, max_tokens=max_tokens, logprobs=0, extra_args=args)


def run_vllm(llm, prompts, params):
    out = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [(list(o.outputs[0].token_ids), [lp[t].logprob for lp, t in zip(o.outputs[0].logprobs,
                                                                               o.outputs[0].token_ids)])
            for o in out]


def run_ref(ref, model, prompts, max_tokens, fusion=None):
    outs = ref.generate(model, prompts, LFParams(max_tokens=max_tokens, temperature=0, logprobs=0), fusion)
    return [(o.token_ids, o.logprobs) for o in outs]


def assert_same(got, want):
    assert len(got) == len(want)
    for i, ((gt, gl), (wt, wl)) in enumerate(zip(got, want)):
        assert gt == wt, f"prompt {i}: vLLM {gt} != logitfuse {wt}"
        worst = max((abs(a - b) for a, b in zip(gl, wl)), default=0.0)
        assert worst < TOL, f"prompt {i}: logprobs differ by {worst}"
        assert all(math.isfinite(x) for x in gl)


@pytest.mark.parametrize(("ensemble", "overrides"), [
    ("proxy", {}), ("eft", {}), ("dlf", {}), ("adapter", {}), ("proxy", {"alpha": 0.5}),
    ("eft", {"beta": 1.5, "weights": [0.2, 0.8]}),
    ("cross-proxy", {}), ("cross-eft", {}), ("cross-dlf", {}), ("cross-proxy", {"alpha": 0.5}),
])
def test_fused_greedy_equals_logitfuse(llm, ref, prompts, ensemble, overrides):
    got = run_vllm(llm, prompts, vllm_params(ensemble, 12, **overrides))
    want = run_ref(ref, ensemble, prompts, 12, overrides or None)
    assert_same(got, want)
    plain = run_ref(ref, "base-large", prompts, 12)
    assert sum(g[0] != p[0] for g, p in zip(got, plain)) >= 3, "fusion should change some outputs"


def test_plain_rows_are_the_base(llm, ref, prompts):
    """A request without `ensemble` is vLLM's base alone: the same tokens and log-probabilities as the base
    model decoded by logitfuse."""
    assert_same(run_vllm(llm, prompts, vllm_params(None, 12)), run_ref(ref, "base-large", prompts, 12))


def test_mixed_batch_stays_exact(llm, ref, prompts):
    """Fused (three ensembles) and plain requests in one batch, each with its own length, so rows finish at
    different steps and vLLM moves the remaining ones; each equals its own reference."""
    names = [None, "proxy", "dlf", "eft", "adapter"]
    cases = [(names[i % len(names)], 3 + (5 * i) % 14) for i in range(len(prompts))]
    params = [vllm_params(n, k) for n, k in cases]
    got = run_vllm(llm, prompts, params)
    for i, ((name, k), g) in enumerate(zip(cases, got)):
        want = run_ref(ref, name or "base-large", [prompts[i]], k)
        assert_same([g], want)


def test_cross_tokenizer_rows_in_a_mixed_batch(llm, ref, prompts):
    """Rows whose expert pair re-tokenizes the text (three methods) beside same-tokenizer and plain rows in one
    batch, each with its own length: every row equals its own reference."""
    names = ["cross-proxy", None, "cross-dlf", "proxy", "cross-eft"]
    cases = [(names[i % len(names)], 2 + (7 * i) % 15) for i in range(len(prompts))]
    got = run_vllm(llm, prompts, [vllm_params(n, k) for n, k in cases])
    for i, ((name, k), g) in enumerate(zip(cases, got)):
        assert_same([g], run_ref(ref, name or "base-large", [prompts[i]], k))


@pytest.mark.parametrize("ensemble", ["cross-proxy", "cross-eft"])
def test_cross_tokenizer_steps_that_re_tokenize(llm, ref, prompts, ensemble):
    """allowed_token_ids keeps vLLM's base to word pieces (' cap' 'ital', ' c' 'ity', ' r' 'i' 'v' 'e' 'r'), so
    the pair's own tokenization merges across them and steps forget positions. The greedy tokens equal
    logitfuse's (a mask before or after proxy/EFT fusion ranks alike), and every step's fused log-probability
    equals a recomputation from scratch: the pair prefilling its ids of the text so far, the base masked alike."""
    from itertools import pairwise

    import torch

    from logitfuse.engine.hosted import retokenized_change, retokenized_ids
    from logitfuse.vllm.requests import request_plan
    from logitfuse.vllm.rows import ExpertRows

    base = ref.model("base-large")
    allowed = base.tokenizer.convert_tokens_to_ids(["▁cap", "ital", "▁c", "ity", "▁r", "i", "v", "e", "r"])
    chosen = prompts[:8]
    sp = vllm_params(ensemble, 12)
    sp.allowed_token_ids = allowed
    got = run_vllm(llm, chosen, sp)
    want = ref.generate(ensemble, chosen, LFParams(max_tokens=12, temperature=0, allowed_token_ids=tuple(allowed)))
    assert [g[0] for g in got] == [w.token_ids for w in want]
    theirs = ref.model("foreign").tokenizer
    forgets = 0
    for p, (ids, _) in zip(chosen, got):
        seen = [retokenized_ids(theirs, base.tokenizer, p, ids[:k]) for k in range(len(ids) + 1)]
        forgets += sum(retokenized_change(a, b, [0])[0] > 0 for a, b in pairwise(seen))
    assert forgets >= 2, "the pieces should make the pair's tokenization change"
    core = ExpertRows(ref.model, base.vocab_info(with_texts=True), base_tokenizer=base.tokenizer)
    plan = request_plan(ref.registry, {"ensemble": ensemble})
    steps = [(p, ids[:k], lps[k], ids[k]) for p, (ids, lps) in zip(chosen, got) for k in range(len(ids))]
    for i, (p, done, _, _) in enumerate(steps):
        core.add(f"s{i}", plan, p, done)
    _, logits = base.prefill([p + done for p, done, _, _ in steps])
    mask = torch.full_like(logits, float("-inf"))
    mask[:, allowed] = 0.0
    fused, failed = core.fuse([f"s{i}" for i in range(len(steps))], logits + mask)
    assert not failed, failed
    again = torch.log_softmax(fused.float(), -1)[torch.arange(len(steps)), [t for *_, t in steps]]
    worst = max(abs(float(a) - lp) for a, (_, _, lp, _) in zip(again, steps))
    assert worst < TOL, f"fused log-probabilities differ by {worst}"


def test_unknown_ensemble_is_refused_and_the_engine_serves_on(llm, ref, prompts):
    from vllm.exceptions import VLLMValidationError

    with pytest.raises(VLLMValidationError, match="unknown ensemble 'nope'; available: proxy"):
        llm.generate([{"prompt_token_ids": prompts[0]}], vllm_params("nope", 4))
    assert_same(run_vllm(llm, prompts[:4], vllm_params("proxy", 8)), run_ref(ref, "proxy", prompts[:4], 8))


@pytest.mark.parametrize(("extra", "message"), [
    ({"alph": 0.5}, "extra_args.alph: not a fusion parameter; did you mean 'alpha'"),
    ({"alpha": 1000.0}, "alpha must be in"),
    ({"beta": "high"}, "extra_args.beta"),
    ({"experts": ["missing"]}, "expert 'missing' not found"),
])
def test_bad_overrides_are_refused(llm, prompts, extra, message):
    from vllm.exceptions import VLLMValidationError

    with pytest.raises(VLLMValidationError, match=message):
        llm.generate([{"prompt_token_ids": prompts[0]}], vllm_params("proxy", 4, **extra))


@pytest.mark.parametrize(("ensemble", "message"), [
    ("spec", "speculative"), ("formats", "format chat prompts differently"),
    ("unloadable", r"model 'broken-small': .*model.safetensors is unreadable"),
])
def test_ensembles_that_cannot_run_in_vllm_are_refused(llm, prompts, ensemble, message):
    from vllm.exceptions import VLLMValidationError

    with pytest.raises(VLLMValidationError, match=message):
        llm.generate([{"prompt_token_ids": prompts[0]}], vllm_params(ensemble, 4))


@pytest.mark.parametrize("overrides", [{}, {"alpha": 0.1}, {"baseline_reward": "rm", "alpha": 0.1}])
def test_transfer_q_star_equals_logitfuse(llm, ref, prompts, overrides):
    """Transfer Q* inside vLLM: the base's top-k from vLLM's logits, the baseline's rollouts beside vLLM's
    forward (drawn from the request's seed + 1, as logitfuse's engine draws them), scored by the reward model
    (indirect transfer too, with the same model as baseline reward). Greedy with a seed: the engine's tokens,
    fused log-probabilities within 1e-3."""
    from vllm import SamplingParams

    sp = SamplingParams(temperature=0, max_tokens=8, logprobs=0, seed=7, extra_args={"ensemble": "tq", **overrides})
    got = run_vllm(llm, prompts[:12], sp)
    lf_params = LFParams(max_tokens=8, temperature=0, seed=7, logprobs=0)
    outs = ref.generate("tq", prompts[:12], lf_params, overrides or None)
    assert_same(got, [(o.token_ids, o.logprobs) for o in outs])
    plain = run_ref(ref, "base-large", prompts[:12], 8)
    assert sum(g[0] != p[0] for g, p in zip(got, plain)) >= 2, "Transfer Q* should change some outputs"


def test_transfer_q_star_over_vllms_own_base_is_refused(llm, prompts):
    """The rollouts continue each row in the baseline's KV state, which vLLM keeps for its own model."""
    from vllm.exceptions import VLLMValidationError

    with pytest.raises(VLLMValidationError, match="baseline 'base-large' is the base model vLLM runs"):
        llm.generate([{"prompt_token_ids": prompts[0]}], vllm_params("tq", 4, baseline="base-large"))


def test_n_and_seeded_sampling_follow_vllm(llm, prompts):
    """n samples of a fused request with a seed: each a sequence of its own, reproducible by the seed."""
    from vllm import SamplingParams

    sp = SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=10, extra_args={"ensemble": "proxy"})
    first = [list(c.token_ids) for c in llm.generate([{"prompt_token_ids": prompts[1]}], sp, use_tqdm=False)[0].outputs]
    again = [list(c.token_ids) for c in llm.generate([{"prompt_token_ids": prompts[1]}], sp, use_tqdm=False)[0].outputs]
    assert len(first) == 3 and first == again


def test_an_end_of_turn_id_ends_a_fused_sequence(llm, ref, prompts):
    """A tuned expert's end-of-turn token that the base does not stop on ends fused sequences through the
    request's stop_token_ids (docs/vllm.md): here, a token the fused output emits mid-way."""
    from vllm import SamplingParams

    refs = [(p, o[0]) for p, o in zip(prompts, run_ref(ref, "proxy", prompts, 12))]
    prompt, want = max(refs, key=lambda r: len(r[1]))
    assert len(want) >= 3
    stop = want[-2]  # the last token before the end of sequence
    end = want.index(stop)
    sp = SamplingParams(temperature=0, max_tokens=12, stop_token_ids=[stop], extra_args={"ensemble": "proxy"})
    out = llm.generate([{"prompt_token_ids": prompt}], sp, use_tqdm=False)[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert list(out.token_ids) == want[: end + 1]


def test_roles_with_their_own_prompt_format_run_where_the_request_carries_them(llm, ref):
    """The `formats` ensemble's untuned model reads plain text where the others read the chat template: refused
    without each role's prompt ids (above), it runs with them (`prompts` offline, flat `prompt:MODEL` keys as
    vllm_xargs sends them) and equals logitfuse's engine on the same chat."""
    from vllm import SamplingParams

    chats = [[{"role": "user", "content": q}] for q in ("what is the capital of ludu ?", "what colour is the flag "
                                                        "of mikur ?", "how many legs does a zorp have ?")]
    reqs = [r for i, m in enumerate(chats)
            for r in ref.requests("formats", messages=m, rid=f"f{i}",
                                  sampling=LFParams(max_tokens=10, temperature=0, logprobs=0))]
    assert all(r.prompts["plain-small"] != r.prompts["base-large"] for r in reqs)
    want = {}
    for ev in ref.stream(reqs):
        if ev.token_id is not None:
            want.setdefault(ev.rid, []).append((ev.token_id, ev.logprob))
    for flat in (False, True):
        params = []
        for r in reqs:
            others = {n: ids for n, ids in r.prompts.items() if n != "base-large"}
            extra = {"ensemble": "formats", **({f"prompt:{n}": v for n, v in others.items()} if flat
                                              else {"prompts": others})}
            params.append(SamplingParams(temperature=0, max_tokens=10, logprobs=0, extra_args=extra))
        outs = llm.generate([{"prompt_token_ids": r.prompts["base-large"]} for r in reqs], params, use_tqdm=False)
        for r, o in zip(reqs, outs):
            got = list(zip(o.outputs[0].token_ids, [lp[t].logprob for lp, t in zip(o.outputs[0].logprobs,
                                                                                    o.outputs[0].token_ids)]))
            assert [t for t, _ in got] == [t for t, _ in want[r.rid]], (flat, r.rid)
            assert max(abs(a - b) for (_, a), (_, b) in zip(got, want[r.rid])) < TOL

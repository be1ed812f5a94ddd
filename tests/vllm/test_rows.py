"""The experts' side of the vLLM processor (logitfuse/vllm/rows.py), driven by a host loop written here: the
base decoded by its HF backend, rows joining, waiting a step, preempted and resumed, leaving. Greedy outputs
equal logitfuse's own engine on the same ensembles, cross-tokenizer experts included. Needs no vLLM."""

import itertools

import pytest
import torch

from logitfuse.engine.hosted import retokenized_change, retokenized_ids
from logitfuse.engine.request import SamplingParams
from logitfuse.methods.params import FusionParams
from logitfuse.ops.vocab import VocabInfo
from logitfuse.vllm.requests import request_plan, unsupported
from logitfuse.vllm.rows import ExpertRows

EOS = 2


@pytest.fixture(scope="module")
def core(ref):
    base = ref.model("base-large")
    info: VocabInfo = base.vocab_info(with_texts=True)  # the texts map cross-tokenizer experts
    return ExpertRows(ref.model, info, base_tokenizer=base.tokenizer)


def base_logits(ref, seqs: list[list[int]]) -> torch.Tensor:
    """The base's next-token logits for whole sequences (no cache: the host's side, kept simple)."""
    _, logits = ref.model("base-large").prefill(seqs)
    return logits.clone()


def reference(ref, jobs, max_tokens):
    out = {}
    for rid, name, p in jobs:
        o = ref.generate(name or "base-large", [p], SamplingParams(max_tokens=max_tokens, temperature=0))[0]
        out[rid] = o.token_ids
    return out


def test_rows_join_wait_resume_and_leave(ref, core, prompts):
    jobs = [(f"r{i}", ["proxy", "eft", "dlf", "adapter", None][i % 5], p) for i, p in enumerate(prompts[:10])]
    late = ("late", "proxy", prompts[10])

    def join(core, outputs):  # a row joins mid-way and its first sample is discarded once
        jobs.append(late)
        outputs["late"] = []
        core.add("late", request_plan(ref.registry, {"ensemble": "proxy"}), late[2], outputs["late"])
        return {"late"}

    max_tokens = 10
    want = reference(ref, [*jobs, late], max_tokens)
    long = next(rid for rid, name, _ in jobs if name and len(want[rid]) > 5)  # still running at step 4
    plan = request_plan(ref.registry, {"ensemble": {r: n for r, n, _ in jobs}[long]})

    def preempt(core, outputs):  # a row leaves the batch and comes back with the tokens it has
        core.remove(long)
        core.add(long, plan, {r: p for r, _, p in jobs}[long], outputs[long])

    got = host(ref, core, jobs, late, max_tokens, {2: join, 4: preempt})
    assert got == want
    assert not core.rows and not core.slots, "every row and cache is gone when the rows end"


def test_cross_tokenizer_rows_equal_the_engine(ref, core, prompts):
    """Experts with another tokenizer (proxy: the push mapped once; EFT beside a same-tokenizer expert; DLF:
    targets in the pair's own vocabulary) beside plain and same-tokenizer rows; a cross row joins late and
    another is preempted and resumed (it prefills its own ids of the prompt's and the generated text)."""
    names = ["cross-proxy", "cross-eft", "cross-dlf", "proxy", None]
    jobs = [(f"x{i}", names[i % len(names)], p) for i, p in enumerate(prompts[12:22])]
    late = ("late", "cross-proxy", prompts[22])
    max_tokens = 10
    want = reference(ref, [*jobs, late], max_tokens)
    plain = reference(ref, [(r, None, p) for r, _, p in jobs], max_tokens)
    assert sum(want[r] != plain[r] for r, n, _ in jobs if n and n.startswith("cross")) >= 3
    long = next(rid for rid, name, _ in jobs if name == "cross-dlf" and len(want[rid]) > 5)

    def join(core, outputs):
        jobs.append(late)
        outputs["late"] = []
        core.add("late", request_plan(ref.registry, {"ensemble": "cross-proxy"}), late[2], outputs["late"])
        return {"late"}

    def preempt(core, outputs):
        core.remove(long)
        core.add(long, request_plan(ref.registry, {"ensemble": "cross-dlf"}), {r: p for r, _, p in jobs}[long],
                 outputs[long])

    assert host(ref, core, jobs, late, max_tokens, {2: join, 4: preempt}) == want
    assert not core.rows and not core.slots


@pytest.mark.parametrize("ensemble", ["cross-proxy", "cross-eft"])
def test_a_cross_row_that_re_tokenizes_equals_a_fresh_prefill(ref, core, prompts, ensemble):
    """Base tokens spelling ' capital city river' in pieces (' cap' 'ital', ' c' 'ity', ' r' 'i' 'v' 'e' 'r'):
    the pair's own tokenization merges across them, so steps forget positions and feed the merged ids. At every
    step the row's fused scores equal those of a row that prefills the same tokens from scratch."""
    tok, theirs = ref.model("base-large").tokenizer, ref.model("foreign").tokenizer
    forced = tok.convert_tokens_to_ids(["▁cap", "ital", "▁c", "ity", "▁r", "i", "v", "e", "r"])
    assert tok.decode(forced) == "capital city river"
    prompt = prompts[0]
    seen = [retokenized_ids(theirs, tok, prompt, forced[:k]) for k in range(len(forced) + 1)]
    forgets = [retokenized_change(a, b, [0])[0] for a, b in itertools.pairwise(seen)]
    assert sum(f > 0 for f in forgets) >= 3 and max(forgets) >= 2, forgets
    plan = request_plan(ref.registry, {"ensemble": ensemble})
    outputs: list[int] = []
    core.add("run", plan, prompt, outputs)
    for k in range(len(forced) + 1):
        logits = base_logits(ref, [prompt + outputs])
        core.add("fresh", plan, prompt, list(outputs))
        fused, failed = core.fuse(["run", "fresh"], logits.repeat(2, 1))
        assert not failed, failed
        assert torch.allclose(fused[0], fused[1], atol=1e-4), (k, float((fused[0] - fused[1]).abs().max()))
        assert core.rows["run"].cross["foreign"] == seen[k]
        core.remove("fresh")
        if k < len(forced):
            outputs.append(forced[k])
    core.remove("run")


def host(ref, core, jobs, late, max_tokens, events, seeds=None, logprobs=None):
    """Greedy decoding of jobs (rid, ensemble or extra_args or None, prompt) in one batch, as a host engine runs it.
    events: step -> fn(core, outputs) run before that step's fusion (joins, preemptions); the rows it returns
    have their sample discarded that step (as a host does for a chunk of a long prompt); `late` enters the
    batch when an event returns it. seeds: rid -> the request's seed; logprobs: a dict that gets rid -> the
    chosen tokens' log-probabilities."""
    ev = events
    outputs = {rid: [] for rid, _, _ in jobs}
    prompts = {rid: p for rid, _, p in jobs}
    prompts[late[0]] = late[2]
    active = [rid for rid, _, _ in jobs]
    for rid, name, p in jobs:
        if name:
            args = name if isinstance(name, dict) else {"ensemble": name}  # an ensemble, or extra_args
            core.add(rid, request_plan(ref.registry, args), p, outputs[rid], seed=(seeds or {}).get(rid))
    for step in range(3 * max_tokens):
        held = set()
        if step in ev:
            held = ev[step](core, outputs) or set()
            if late[0] in outputs and late[0] not in active and late[0] in held:
                active.append(late[0])
        if not active:
            break
        logits = base_logits(ref, [prompts[r] + outputs[r] for r in active])
        fused_rows = [r for r in active if r in core.rows]
        if fused_rows:
            pick = [active.index(r) for r in fused_rows]
            fused, failed = core.fuse(fused_rows, logits[pick])
            assert not failed, failed
            logits[pick] = fused
        for i, rid in enumerate(list(active)):
            if rid in held:
                continue
            tok = int(logits[i].argmax())
            outputs[rid].append(tok)
            if logprobs is not None:
                logprobs.setdefault(rid, []).append(float(torch.log_softmax(logits[i].float(), -1)[tok]))
            if tok == EOS or len(outputs[rid]) >= max_tokens:
                active.remove(rid)
                core.remove(rid)
    return outputs


def test_transfer_q_star_rows_equal_the_engine(ref, core, prompts):
    """Transfer Q* (`tq`: the baseline's rollouts run beside the host from its KV state kept here, scored by the
    reward model) with a seed per row, at two alphas (two plan groups), beside plain and proxy rows. A row joins
    late (its first step runs twice, the first sample discarded: the rollouts draw again from the same state)
    and another is preempted and resumed (its rollout generator skips the draws of the steps it had made).
    Greedy tokens equal logitfuse's engine with the same seeds (its rollouts draw from seed + 1),
    log-probabilities within 1e-4; other seeds give other tokens, so the rollouts' draws matter."""
    tq, sharp = {"ensemble": "tq"}, {"ensemble": "tq", "alpha": 0.1}  # a small alpha: Q weighs more
    names = [sharp, sharp, None, tq, "proxy", sharp, sharp, None, tq, sharp]
    jobs = [(f"t{i}", name, p) for i, (name, p) in enumerate(zip(names, prompts))]
    late = ("late", sharp, prompts[10])
    seeds = {rid: 10 + i for i, (rid, _, _) in enumerate([*jobs, late])}
    max_tokens = 8

    def engine(shift=0, rollouts_only=False):
        out = {}
        for rid, name, p in [*jobs, late]:
            if rollouts_only and not isinstance(name, dict):
                continue
            sp = SamplingParams(max_tokens=max_tokens, temperature=0, seed=seeds[rid] + shift, logprobs=0)
            args = name if isinstance(name, dict) else {"ensemble": name or "base-large"}
            extra = {k: v for k, v in args.items() if k != "ensemble"} or None
            out[rid] = ref.generate(args["ensemble"], [p], sp, extra)[0]
        return out

    want, other = engine(), engine(100, rollouts_only=True)
    rollouts = [rid for rid, name, _ in [*jobs, late] if isinstance(name, dict)]
    moved = [r for r in rollouts if want[r].token_ids != other[r].token_ids]
    assert len(moved) >= 3 and "late" in moved, f"the seed should change some outputs: {moved}"
    long = "t0"  # preempted at step 4: still running then, and its later tokens depend on its seed
    assert len(want[long].token_ids) > 5 and want[long].token_ids[4:] != other[long].token_ids[4:]
    plan = request_plan(ref.registry, sharp)
    assert core.experts(plan) == ("tuned-small-qa",), "the baseline's rows are kept here, like an expert's"

    def join(core, outputs):
        outputs["late"] = []
        core.add("late", plan, late[2], outputs["late"], seed=seeds["late"])
        return {"late"}

    def preempt(core, outputs):
        core.remove(long)
        core.add(long, plan, prompts[0], outputs[long], seed=seeds[long])

    lps: dict[str, list[float]] = {}
    got = host(ref, core, jobs, late, max_tokens, {2: join, 4: preempt}, seeds, lps)
    assert got == {r: w.token_ids for r, w in want.items()}
    for rid, w in want.items():
        assert max(abs(a - b) for a, b in zip(lps[rid], w.logprobs)) < 1e-4, rid
    assert not core.rows and not core.slots


def test_a_failing_row_ends_alone(ref, core, prompts):
    """A row whose expert cannot run is reported failed; the other rows of its step are fused as usual."""
    plan = request_plan(ref.registry, {"ensemble": "proxy"})
    core.add("ok", plan, prompts[0], [])
    core.add("bad", plan, [*prompts[1][:-1], 10**6], [])  # an id past every vocabulary: its prefill fails
    logits = base_logits(ref, [prompts[0], prompts[1]])
    fused, failed = core.fuse(["ok", "bad"], logits)
    assert set(failed) == {"bad"} and any(m in failed["bad"] for m in ("tuned-small-qa", "base-small"))
    want = ref.generate("proxy", [prompts[0]], SamplingParams(max_tokens=1, temperature=0, logprobs=0))[0]
    assert int(fused[0].argmax()) == want.token_ids[0]
    assert torch.equal(fused[1], logits[1]), "a failed row keeps the base's scores (the processor ends it)"
    core.remove("ok")
    core.remove("bad")


def test_plans_that_cannot_run_in_a_logits_processor(ref):
    reg = ref.registry
    assert "speculative" in unsupported(reg, reg.plan("spec"))
    assert unsupported(reg, reg.plan("tq")) is None, "Transfer Q*'s baseline runs here, beside the host"
    on_base = reg.plan("tq", FusionParams(baseline="base-large"))
    assert "baseline 'base-large' is the base model vLLM runs" in unsupported(reg, on_base)
    heavy = reg.plan("tq", FusionParams(top_k=64, rollouts=8, rollout_tokens=16))
    assert "server.max_tqstar_work (4096)" in unsupported(reg, heavy)
    assert "chat_template" in unsupported(reg, reg.plan("formats"))
    assert unsupported(reg, reg.plan("dlf")) is None
    # the pair reads the text of the base's prompt ids: its models' chat_template setting plays no part
    assert all(unsupported(reg, reg.plan(n)) is None for n in ("cross-proxy", "cross-eft", "cross-dlf"))


@pytest.mark.parametrize("ensemble", ["over-self", "lora-self"])
def test_a_role_the_base_fills_reads_the_hosts_logits(ref, prompts, ensemble):
    """The base is also the untuned model (an expert pair, or a LoRA adapter, over the base itself): that role
    is the host's own base logits, and the fused scores equal logitfuse's engine."""
    core = ExpertRows(ref.model, ref.model("base-small").vocab_info())
    core.add("r", request_plan(ref.registry, {"ensemble": ensemble}), prompts[0], [])
    _, logits = ref.model("base-small").prefill([prompts[0]])
    fused, failed = core.fuse(["r"], logits.clone())
    assert not failed, failed
    want = ref.generate(ensemble, [prompts[0]], SamplingParams(max_tokens=1, temperature=0, logprobs=0))[0]
    assert int(fused[0].argmax()) == want.token_ids[0]
    assert float(torch.log_softmax(fused[0], -1)[want.token_ids[0]]) == pytest.approx(want.logprobs[0], abs=1e-4)
    core.remove("r")

"""The experts' side of the vLLM processor (logitfuse/vllm/rows.py), driven by a host loop written here: the
base decoded by its HF backend, rows joining, waiting a step, preempted and resumed, leaving. Greedy outputs
equal logitfuse's own engine on the same ensembles, cross-tokenizer experts included. Needs no vLLM."""

import itertools

import pytest
import torch

from logitfuse.engine.hosted import retokenized_change, retokenized_ids
from logitfuse.engine.request import SamplingParams
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


def host(ref, core, jobs, late, max_tokens, events):
    """Greedy decoding of jobs (rid, ensemble or None, prompt) in one batch, as a host engine runs it.
    events: step -> fn(core, outputs) run before that step's fusion (joins, preemptions); the rows it returns
    have their sample discarded that step (as a host does for a chunk of a long prompt); `late` enters the
    batch when an event returns it."""
    ev = events
    outputs = {rid: [] for rid, _, _ in jobs}
    prompts = {rid: p for rid, _, p in jobs}
    prompts[late[0]] = late[2]
    active = [rid for rid, _, _ in jobs]
    for rid, name, p in jobs:
        if name:
            core.add(rid, request_plan(ref.registry, {"ensemble": name}), p, outputs[rid])
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
            if tok == EOS or len(outputs[rid]) >= max_tokens:
                active.remove(rid)
                core.remove(rid)
    return outputs


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
    assert "rollouts" in unsupported(reg, reg.plan("tq"))
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

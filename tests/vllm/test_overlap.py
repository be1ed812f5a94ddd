"""The experts' catch-up overlapping the base's forward (LOGITFUSE_VLLM_OVERLAP, logitfuse/vllm/core.py): started
once the batch is known, before the base's forward, on a worker thread; joined in apply.

A host loop written here plays vLLM's V1 persistent batch over the fusion core (rows added at the lowest free
index, removed, the last rows moved into the holes, two rows swapped; a prompt in chunks whose sample is discarded,
a request preempted and resumed, one unscheduled for a step, a step that ends before sampling) with the base
decoded by its HF backend while the catch-up runs: overlap on and off give identical tokens, the same fused
scores (within 1e-6 relative) and the engine's tokens. Then vLLM itself, started with LOGITFUSE_VLLM_OVERLAP=1:
fused greedy tokens equal logitfuse's engine for proxy, EFT, DLF and a cross-tokenizer pair, and in a mixed
batch whose rows finish at different steps.
"""

import os
import threading
import time

import pytest
import torch

from logitfuse.engine.request import SamplingParams as LFParams
from logitfuse.vllm.core import ENV_OVERLAP, ENV_OVERLAP_CPUS, overlap_cpus, overlap_setting
from logitfuse.vllm.requests import request_plan
from logitfuse.vllm.rows import ExpertRows
from tests.vllm.conftest import MODELS


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal fused scores, up to float32 rounding. The overlapped catch-up runs on another thread, placed on
    other cores, whose matrix products split their sums over another number of OpenMP threads: the last bits
    differ, and over the layers of two models that grows to a few 1e-6 on logits of tens (measured up to 7.6e-6
    on a loaded 2-core machine). A row fed twice or a token missed moves scores by far more than 1e-4."""
    return torch.allclose(a, b, rtol=1e-5, atol=1e-4)


@pytest.fixture(scope="module")
def core(registry_file):
    from transformers import AutoTokenizer

    from logitfuse.backends.hf import probe_vocab
    from logitfuse.vllm.core import FusionCore
    from logitfuse.vllm.requests import load_registry

    load_registry.cache_clear()  # $LOGITFUSE_CONFIG is this module's registry
    width = probe_vocab("vllm", str(MODELS / "base-large")).logits_width
    fc = FusionCore(AutoTokenizer.from_pretrained(MODELS / "base-large"), width, torch.device("cpu"))
    yield fc
    fc.close()


def test_the_switch(monkeypatch):
    monkeypatch.delenv(ENV_OVERLAP, raising=False)
    assert overlap_setting(torch.device("cuda", 0)) and not overlap_setting("cpu"), "default: on CUDA only"
    monkeypatch.setenv(ENV_OVERLAP, "1")
    assert overlap_setting("cpu")
    monkeypatch.setenv(ENV_OVERLAP, "0")
    assert not overlap_setting("cuda")
    monkeypatch.setenv(ENV_OVERLAP, "yes please")
    with pytest.raises(ValueError, match=ENV_OVERLAP):
        overlap_setting("cpu")


def test_the_cpus_of_the_experts_thread(monkeypatch):
    """On a CPU the thread goes where vLLM's forward is not bound (vLLM's CPU worker leaves a core per worker to
    its engine process), or where LOGITFUSE_VLLM_OVERLAP_CPUS says; nowhere new when nothing is bound."""
    every = set(range(os.cpu_count() or 1))
    monkeypatch.delenv(ENV_OVERLAP_CPUS, raising=False)
    assert overlap_cpus({0}) == every - {0}
    assert overlap_cpus(every) == set()
    monkeypatch.setenv(ENV_OVERLAP_CPUS, "2-3, 6")
    assert overlap_cpus({0}) == {2, 3, 6}
    monkeypatch.setenv(ENV_OVERLAP_CPUS, "one")
    with pytest.raises(ValueError, match=ENV_OVERLAP_CPUS):
        overlap_cpus({0})


def test_a_row_started_ahead_is_not_fed_again(ref, prompts):
    """start brings rows up to date (a new row prefills, a running one decodes its newest token); a second start
    and fuse's own catch-up run no forward for them, and the fused scores are those of fuse alone."""
    base = ref.model("base-large")
    ahead = ExpertRows(ref.model, base.vocab_info(with_texts=True), base_tokenizer=base.tokenizer)
    plain = ExpertRows(ref.model, base.vocab_info(with_texts=True), base_tokenizer=base.tokenizer)
    forwards = []
    for name in ("_prefill_model", "_forward", "_forward_retokenized"):
        inner = getattr(ahead, name)
        setattr(ahead, name, lambda *a, inner=inner, name=name: forwards.append(name) or inner(*a))
    names = ["proxy", "cross-proxy", "eft"]
    outputs = {f"r{i}": [] for i in range(3)}
    for rows in (ahead, plain):
        for i, name in enumerate(names):
            rows.add(f"r{i}", request_plan(ref.registry, {"ensemble": name}), prompts[i], outputs[f"r{i}"])
    rids = list(outputs)
    for step in range(3):
        _, logits = base.prefill([prompts[i] + outputs[r] for i, r in enumerate(rids)])
        forwards.clear()
        ahead.start(rids)
        assert forwards, "start runs the experts"
        forwards.clear()
        ahead.start(rids)
        got, failed = ahead.fuse(rids, logits.clone())
        assert not failed and not forwards, f"step {step}: a row brought up to date was fed again: {forwards}"
        assert [ahead.rows[r].fed for r in rids] == [len(outputs[r]) for r in rids]
        want, _ = plain.fuse(rids, logits.clone())
        assert same(got, want), float((got - want).abs().max())
        for r, row in zip(rids, got):
            outputs[r].append(int(row.argmax()))
    for r in rids:
        ahead.remove(r)
        plain.remove(r)


def test_a_placeholder_waits_for_fuse(ref, prompts):
    """A row whose newest token is still the host's placeholder (asynchronous scheduling) is left alone by start:
    the host resolves it before apply, and fuse catches the row up then."""
    base = ref.model("base-large")
    rows = ExpertRows(ref.model, base.vocab_info())
    outputs = [-1]
    rows.add("p", request_plan(ref.registry, {"ensemble": "proxy"}), prompts[0], outputs)
    rows.start(["p"])
    assert not rows.rows["p"].started and not rows.slots and not rows._early
    _, logits = base.prefill([prompts[0]])
    outputs[0] = int(logits[0].argmax())  # the host resolved it
    _, logits = base.prefill([prompts[0] + outputs])
    _, failed = rows.fuse(["p"], logits.clone())
    assert not failed and rows.rows["p"].fed == 1
    rows.remove("p")


def persistent_batch(ref, core, jobs, max_tokens, events, seeds, record):
    """Greedy decoding of jobs {rid: (extra_args or None, prompt)} as vLLM's V1 runner drives its persistent batch,
    with the V1 adapter's calls into the core: the update (drop, add at the lowest free index, move the last rows
    into the holes, swap), then start, the base's forward, apply. events: step -> {"late": rids that join,
    "chunk": rids whose sample is discarded, "preempt": rids, "resume": rids, "unschedule": rids out for this
    step, "swap": (a, b), "no_sample": True (the step ends before sampling)}. record: (rid, k) -> the fused row
    the k-th token was sampled from. Returns the tokens and the events that happened."""
    outputs = {r: [] for r in jobs}
    late = {x for e in events.values() for x in e.get("late", ())}
    waiting = [r for r in jobs if r not in late]
    batch: list[str | None] = []  # rid at each persistent index
    done, finished, back, happened, sampled_once = set(), set(), [], [], False
    for step in range(4 * max(max_tokens.values())):
        ev = events.get(step, {})
        out = {r for r in batch if r in ev.get("preempt", ()) or r in ev.get("unschedule", ())} - done
        happened += [k for k in ("preempt", "unschedule") if set(ev.get(k, ())) & out]
        resumed = [r for r in ev.get("resume", ()) if r not in batch and r not in finished | done]
        happened += ["resume"] * bool(resumed)
        waiting += list(ev.get("late", ())) + resumed + back
        back = [r for r in out if r in ev.get("unschedule", ())]  # scheduled again at the next step
        for i, r in enumerate(batch):
            if r in done or r in out:
                core.drop(i)
                batch[i] = None
        finished |= done
        done = set()
        for r in waiting:
            i = batch.index(None) if None in batch else len(batch)
            batch[i:i + 1] = [r]
            extra, prompt = jobs[r]
            core.add(i, extra, prompt, outputs[r], seed=seeds.get(r))
        waiting = []
        while None in batch:  # condense: the last row moves into the first hole
            hole, last = batch.index(None), max((i for i, r in enumerate(batch) if r is not None), default=-1)
            if last < hole:
                del batch[hole:]
                continue
            core.move(last, hole, False)
            batch[hole], batch[last] = batch[last], None
            happened.append("move")
        if "swap" in ev and all(r in batch for r in ev["swap"]):
            a, b = (batch.index(r) for r in ev["swap"])
            core.move(a, b, True)
            batch[a], batch[b] = batch[b], batch[a]
            happened.append("swap")
        if not batch:
            if finished >= set(jobs):
                break
            continue
        if sampled_once:  # the V1 adapter starts nothing before its first apply
            core.start([i for i in sorted(core.handles) if i < len(batch)])
        if ev.get("no_sample"):
            happened.append("no_sample")
            continue  # the catch-up stays in flight until the next update joins it
        _, logits = ref.model("base-large").prefill([jobs[r][1] + outputs[r] for r in batch])  # beside the catch-up
        logits = core.apply(logits.clone(), [(i, i) for i in sorted(core.handles) if i < len(batch)])
        sampled_once = True
        for i, r in enumerate(batch):
            if r in ev.get("chunk", ()):
                happened.append("chunk")
                continue  # a prompt chunk: the sample is discarded
            token = int(logits[i].argmax())
            record[r, len(outputs[r])] = logits[i].clone()
            outputs[r].append(token)
            if len(outputs[r]) >= max_tokens[r]:  # past the end of sequence too (fused answers are short)
                done.add(r)
    assert finished >= set(jobs), (finished, batch)
    return outputs, happened


def test_overlap_on_equals_off_through_the_core(ref, core, prompts, monkeypatch):
    """The same persistent batch with overlap on and off: identical tokens and the same fused scores at every step,
    and the engine's tokens. With overlap on the catch-up runs on the worker thread; an add, drop or move waits for
    a catch-up still in flight (the step that ends before sampling leaves one to the next update)."""
    tq = {"ensemble": "tq", "alpha": 0.1}
    names = ["proxy", "eft", "dlf", "adapter", "cross-proxy", tq, None, "cross-dlf", "proxy", "eft"]
    jobs = {f"r{i}": (({"ensemble": n} if isinstance(n, str) else n), p)
            for i, (n, p) in enumerate(zip(names, prompts))}
    jobs["late"] = ({"ensemble": "proxy"}, prompts[10])
    jobs["late-x"] = ({"ensemble": "cross-eft"}, prompts[11])
    seeds = {r: 20 + i for i, r in enumerate(jobs)}
    max_tokens = {r: 5 + (3 * i) % 7 for i, r in enumerate(jobs)}
    want = {}
    for r, (extra, p) in jobs.items():
        args = extra or {"ensemble": "base-large"}
        over = {k: v for k, v in args.items() if k != "ensemble"} or None
        sp = LFParams(max_tokens=max_tokens[r], temperature=0, seed=seeds[r], ignore_eos=True)
        want[r] = ref.generate(args["ensemble"], [p], sp, over)[0].token_ids
    long = [r for r in jobs if r.startswith("r") and jobs[r][0] and max_tokens[r] >= 7]
    events = {
        1: {"late": ["late"], "chunk": ["late"]},  # joins with a prompt chunk: its first sample is discarded
        2: {"preempt": [long[0]], "late": ["late-x"]},
        3: {"no_sample": True},  # the catch-up started here is still in flight at the swap of the next update
        4: {"swap": (long[1], long[2])},
        5: {"unschedule": [long[3]]},  # out for one step: removed, added again with its tokens next step
        6: {"resume": [long[0]]},
    }
    threads: set[str] = set()
    inner = core.rows.start
    monkeypatch.setattr(core.rows, "start", lambda rids: threads.add(threading.current_thread().name) or inner(rids))
    runs = {}
    for overlap in (False, True):
        core.overlap, core.early = overlap, 0
        record: dict = {}
        tokens, happened = persistent_batch(ref, core, jobs, max_tokens, events, seeds, record)
        runs[overlap] = tokens, record
        core.join()
        assert not core.handles and not core.rows.rows and not core.rows.slots, "every row and cache is gone"
        assert (core.early > 0) == overlap
        assert {"preempt", "resume", "unschedule", "swap", "move", "chunk", "no_sample"} <= set(happened), happened
    assert any(t.startswith("logitfuse-experts") for t in threads), threads
    (off, off_scores), (on, on_scores) = runs[False], runs[True]
    assert on == off
    assert off_scores.keys() == on_scores.keys()
    # the experts run the same batches either way (the step without sampling changes no row before the next
    # apply): the same scores (a batch of other rows would pad the cross-tokenizer pair's ragged forward
    # differently, a float32 rounding apart)
    differ = {k: float((off_scores[k] - on_scores[k]).abs().max()) for k in off_scores
              if not same(off_scores[k], on_scores[k])}
    assert not differ, f"fused scores differ: {differ}"
    for r in jobs:
        assert off[r] == want[r], f"{r}: {off[r]} != logitfuse {want[r]}"


def test_changes_wait_for_the_catch_up_in_flight(ref, core, prompts, monkeypatch):
    """While a catch-up runs on the worker thread, add, drop, move and apply wait for it (no two threads touch
    the rows at once)."""
    core.overlap = True
    gate, entered = threading.Event(), threading.Event()
    inner = core.rows.start

    def slow(rids):
        entered.set()
        assert gate.wait(10)
        inner(rids)

    monkeypatch.setattr(core.rows, "start", slow)
    outputs: list[int] = []
    core.add(0, {"ensemble": "proxy"}, prompts[0], outputs)
    core.add(1, {"ensemble": "eft"}, prompts[1], [])
    for change in (lambda: core.drop(1), lambda: core.move(0, 1, True), lambda: core.add(2, None, prompts[2], [])):
        gate.clear()
        entered.clear()
        core.start([0, 1])
        assert entered.wait(10)
        t = threading.Thread(target=change)
        t.start()
        time.sleep(0.3)
        assert t.is_alive(), "the change went ahead of the catch-up in flight"
        gate.set()
        t.join(10)
        assert not t.is_alive()
    core.drop(0)
    core.drop(1)
    assert not core.rows.rows and not core.rows.slots


# -- vLLM, started with the overlap on -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def overlap_llm(registry_file):
    pytest.importorskip("vllm", reason="vLLM is not installed (.ci/vllm makes a venv with it)")
    from tests.vllm.conftest import make_llm

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(ENV_OVERLAP, "1")  # read by the processor in vLLM's engine process, which inherits it
        mp.setenv("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # collective_rpc with a function (the probe below)
        engine = make_llm()
        try:
            yield engine
        finally:
            engine.llm_engine.engine_core.shutdown()


def overlapped(llm) -> list[tuple[bool, int, list[int], list[int] | None]]:
    """(overlap on, rows started ahead so far, the CPUs of the worker's thread, those of the experts' thread) of
    the processor in each worker."""

    def probe(worker):
        import os
        import threading

        mine = [p for p in worker.model_runner.input_batch.logitsprocs.all
                if type(p).__name__ == "FusionLogitsProcessor"]
        experts = [t for t in threading.enumerate() if t.name.startswith("logitfuse-experts")]
        theirs = sorted(os.sched_getaffinity(experts[0].native_id)) if experts else None
        return mine[0].core.overlap, mine[0].core.early, sorted(os.sched_getaffinity(0)), theirs

    return [tuple(r) for r in llm.collective_rpc(probe)]


@pytest.mark.parametrize("ensemble", ["proxy", "eft", "dlf", "cross-proxy"])
def test_vllm_with_overlap_equals_logitfuse(overlap_llm, ref, prompts, ensemble):
    from tests.vllm.test_processor import assert_same, run_ref, run_vllm, vllm_params

    before = overlapped(overlap_llm)
    got = run_vllm(overlap_llm, prompts, vllm_params(ensemble, 12))
    assert_same(got, run_ref(ref, ensemble, prompts, 12))
    after = overlapped(overlap_llm)
    assert all(on for on, *_ in after) and after[0][1] > before[0][1], (before, after)
    _, _, worker, experts = after[0]
    if len(worker) < (os.cpu_count() or 1):  # vLLM bound its forward to some cores: the experts run beside it
        assert experts and not set(experts) & set(worker), (worker, experts)


def test_vllm_with_overlap_mixed_batch(overlap_llm, ref, prompts):
    """Fused rows of five ensembles (a cross-tokenizer pair among them) and plain rows in one batch, each of its
    own length, so rows finish at different steps and vLLM moves the others: each equals its own reference."""
    from tests.vllm.test_processor import assert_same, run_ref, run_vllm, vllm_params

    names = [None, "proxy", "cross-proxy", "dlf", "eft", "adapter"]
    cases = [(names[i % len(names)], 2 + (5 * i) % 15) for i in range(len(prompts))]
    got = run_vllm(overlap_llm, prompts, [vllm_params(n, k) for n, k in cases])
    for i, ((name, k), g) in enumerate(zip(cases, got)):
        assert_same([g], run_ref(ref, name or "base-large", [prompts[i]], k))

"""The Model Runner V2 adapter (logitfuse/vllm/runner_v2.py) driven through vLLM's V2 interface on CPU: real
LogitsProcRequestState / LogitsContext instances over small stand-ins for vLLM's StagedWriteTensor and
UvaBackedTensor (the attributes the adapter reads: `.gpu`, `.np`), and a host loop written here that plays the
model runner (slots from a free list, staged writes flushed before apply_staged_writes, sampled tokens committed
to all_token_ids after each step) with the base decoded by its HF backend. Greedy tokens equal logitfuse's own
engine and fused log-probabilities are within 1e-3: rows reordered every step, slots recycled, a declined request
left untouched, a request waiting a step, one preempted and resumed, a prompt in chunks."""

import random
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("vllm", reason="vLLM is not installed (.ci/vllm makes a venv with it)")

from vllm import SamplingParams
from vllm.v1.worker.gpu.sample.logits_processor import LogitsContext, LogitsProcRequestState

from logitfuse.backends.hf import probe_vocab
from logitfuse.engine.request import SamplingParams as LFParams
from tests.vllm.conftest import MODELS

TOL = 1e-3
SLOTS, MAX_LEN = 16, 256


class Staged:
    """vLLM's StagedWriteTensor: writes are staged on the host and land in `.gpu` at apply_write."""

    def __init__(self, *size: int) -> None:
        self.gpu = torch.zeros(size, dtype=torch.int32)
        self.staged: list[tuple[int, int, list[int]]] = []

    def stage_write(self, index: int, start: int, x) -> None:
        self.staged.append((index, start, list(x)))

    def stage_write_elem(self, index: int, x: int) -> None:
        self.staged.append((index, 0, [x]))

    def apply_write(self) -> None:
        for index, start, x in self.staged:
            if self.gpu.dim() == 1:
                self.gpu[index] = x[0]
            else:
                self.gpu[index, start:start + len(x)] = torch.tensor(x, dtype=torch.int32)
        self.staged.clear()


class Uva:
    """vLLM's UvaBackedTensor: the host's copy (`.cpu`, `.np`) is the truth, `.gpu` follows at copy_to_uva."""

    def __init__(self, n: int) -> None:
        self.cpu = torch.zeros(n, dtype=torch.int32)
        self.np = self.cpu.numpy()
        self.gpu = self.cpu.clone()

    def copy_to_uva(self, n: int | None = None) -> torch.Tensor:
        self.gpu = self.cpu[:n].clone()
        return self.gpu


class Runner:
    """Model Runner V2 as the processor sees it, on the base's HF backend (whole sequences, no cache)."""

    def __init__(self, ref, width: int) -> None:
        self.ref = ref
        self.state = LogitsProcRequestState(
            device=torch.device("cpu"), max_num_reqs=SLOTS, vocab_size=width, all_token_ids=Staged(SLOTS, MAX_LEN),
            prompt_len=Uva(SLOTS), prefill_len=Uva(SLOTS), total_len=Staged(SLOTS))
        self.free = list(range(SLOTS))  # vLLM's free list: the last slot freed is the next one taken
        self.slot: dict[str, int] = {}
        self.eos = ref.model("base-large").tokenizer.eos_token_id

    def add(self, proc, rid: str, prompt: list[int], ensemble: str | None, outputs: list[int] = ()) -> bool:
        """A request enters (outputs: what a resumed request has generated before it was preempted)."""
        s = self.slot[rid] = self.free.pop()
        st, tokens = self.state, [*prompt, *outputs]
        st.prompt_len.np[s], st.prefill_len.np[s] = len(prompt), len(tokens)
        st.total_len.stage_write_elem(s, len(tokens))
        st.all_token_ids.stage_write(s, 0, tokens)
        extra = {"ensemble": ensemble} if ensemble else None
        return proc.add_request(s, SamplingParams(temperature=0, extra_args=extra))

    def remove(self, rid: str) -> None:
        """A request finishes or is preempted: its slot is freed, the processor is not told."""
        self.free.append(self.slot.pop(rid))

    def tokens(self, rid: str) -> list[int]:
        s = self.slot[rid]
        return self.state.all_token_ids.gpu[s, :int(self.state.total_len.gpu[s])].tolist()

    def step(self, proc, rids: list[str], chunked: dict[str, int] | None = None):
        """One step over rids in this order: staged writes flushed, the base's logits (a row in `chunked` has
        seen that many tokens of its prompt), the processor's apply. Returns the logits before and after."""
        st = self.state
        st.prompt_len.copy_to_uva()
        st.prefill_len.copy_to_uva()
        st.total_len.apply_write()
        st.all_token_ids.apply_write()
        proc.apply_staged_writes()
        chunked = chunked or {}
        seqs = [self.tokens(r)[:chunked.get(r)] for r in rids]
        _, logits = self.ref.model("base-large").prefill(seqs)
        slots = [self.slot[r] for r in rids]
        idx = torch.tensor(slots, dtype=torch.int32)
        ctx = LogitsContext(
            expanded_idx_mapping=idx, idx_mapping=idx, idx_mapping_np=idx.numpy().copy(),
            expanded_local_pos=torch.zeros(len(rids), dtype=torch.int32),
            input_ids=torch.tensor([q[-1] for q in seqs]), pos=torch.tensor([len(q) - 1 for q in seqs]),
            seq_lens_upper_bound_np=torch.tensor([len(q) for q in seqs]).numpy())
        before = logits.float().clone()
        after = proc.apply(logits.float().clone(), ctx)
        for s in slots:  # the view the core reads is the slot's generated tokens
            if s in proc.views and s in proc.core.handles:
                p, t = int(st.prompt_len.np[s]), int(st.total_len.gpu[s])
                assert len(proc.views[s]) == t - p and list(proc.views[s]) == st.all_token_ids.gpu[s, p:t].tolist()
        return before, after

    def commit(self, rid: str, row: torch.Tensor) -> tuple[int, float]:
        """The greedy token, written to the device after sampling (vLLM's post_update)."""
        s, token = self.slot[rid], int(row.argmax())
        total = int(self.state.total_len.gpu[s])
        self.state.all_token_ids.gpu[s, total] = token
        self.state.total_len.gpu[s] = total + 1
        return token, float(torch.log_softmax(row, -1)[token])


@pytest.fixture(scope="module")
def runner(ref, registry_file):
    return Runner(ref, probe_vocab("vllm", str(MODELS / "base-large")).logits_width)


def config(width: int, speculative=None):
    model = SimpleNamespace(tokenizer=str(MODELS / "base-large"), get_vocab_size=lambda: width)
    return SimpleNamespace(model_config=model, speculative_config=speculative)


@pytest.fixture(scope="module")
def proc(runner):
    from logitfuse.vllm import FusionLogitsProcessorV2
    from logitfuse.vllm.requests import load_registry

    load_registry.cache_clear()  # $LOGITFUSE_CONFIG is this module's registry
    return FusionLogitsProcessorV2(config(runner.state.vocab_size), runner.state)


def reference(ref, name: str | None, prompt: list[int], max_tokens: int):
    """logitfuse's engine, greedy; past the end of sequence too (the fused answers are short), as the loop here."""
    params = LFParams(max_tokens=max_tokens, temperature=0, logprobs=0, ignore_eos=True)
    out = ref.generate(name or "base-large", [prompt], params)
    return out[0].token_ids, out[0].logprobs


def assert_same(got, want, rid):
    assert got[0] == want[0], f"{rid}: {got[0]} != logitfuse {want[0]}"
    worst = max(abs(a - b) for a, b in zip(got[1], want[1]))
    assert worst < TOL, f"{rid}: logprobs differ by {worst}"


def test_fused_rows_equal_the_engine(ref, runner, proc, prompts):
    jobs = {"proxy": ("proxy", 0, 8), "eft": ("eft", 1, 8), "adapter": ("adapter", 2, 8), "plain": (None, 3, 8),
            "short": ("proxy", 4, 2), "eft2": ("eft", 5, 8), "late": ("adapter", 6, 8), "late-plain": (None, 7, 8)}
    want = {r: reference(ref, n, prompts[i], m) for r, (n, i, m) in jobs.items()}
    changed = [r for r, (n, i, m) in jobs.items() if n and want[r][0] != reference(ref, None, prompts[i], m)[0]]
    assert len(changed) >= 4, f"fusion should change most outputs: {changed}"
    got: dict[str, tuple[list[int], list[float]]] = {r: ([], []) for r in jobs}
    active: list[str] = []

    def join(rid: str, resumed: bool = False) -> None:
        name, i, _ = jobs[rid]
        assert runner.add(proc, rid, prompts[i], name, got[rid][0] if resumed else ()) == (name is not None)
        active.append(rid)

    for rid in ("proxy", "eft", "adapter", "plain", "short", "eft2"):
        join(rid)
    fused_slots, recycled = {runner.slot[r] for r in active if jobs[r][0]}, set()
    for step in range(12):
        chunked = {}
        if step == 2:  # preempted: its slot is freed (vLLM tells no processor), it comes back at step 4
            runner.remove("eft2")
            active.remove("eft2")
        if step == 3:  # two requests join in slots fused requests held: one declined, one fed its prompt in chunks
            join("late-plain")
            assert runner.slot["late-plain"] not in proc.core.handles, "the old occupant's row left with add_request"
            join("late")
            recycled = {runner.slot["late"], runner.slot["late-plain"]}
            chunked["late"] = len(prompts[jobs["late"][1]]) - 3
        if step == 4:
            join("eft2", resumed=True)
        rids = [r for r in active if not (step == 5 and r == "proxy")]  # proxy waits a step, unscheduled
        random.Random(step).shuffle(rids)
        if not rids:
            break
        before, after = runner.step(proc, rids, chunked)
        for i, rid in enumerate(rids):
            if jobs[rid][0] is None:
                assert torch.equal(after[i], before[i]), f"{rid} was declined: its row is vLLM's own"
            if rid in chunked:
                continue  # a prompt chunk's sample is discarded
            token, logprob = runner.commit(rid, after[i])
            got[rid][0].append(token)
            got[rid][1].append(logprob)
            if len(got[rid][0]) >= jobs[rid][2]:
                runner.remove(rid)
                active.remove(rid)
    assert not active, active
    assert recycled <= fused_slots, "both late requests took slots that fused requests held"
    for rid in jobs:
        assert_same(got[rid], want[rid], rid)


def test_a_slot_that_sits_out_gives_back_its_caches(ref, runner, proc, prompts, monkeypatch):
    """A fused slot absent past park_after steps leaves the core (its experts' caches go); when it comes back
    without add_request (it only waited), it prefills again and its tokens are the engine's."""
    monkeypatch.setattr(proc, "park_after", 1)
    want = reference(ref, "eft", prompts[8], 6)
    runner.add(proc, "waits", prompts[8], "eft")
    runner.add(proc, "other", prompts[9], None)
    s, tokens, logprobs = runner.slot["waits"], [], []
    for step in range(9):
        rids = ["other"] if 1 <= step < 4 else ["waits", "other"]
        _, after = runner.step(proc, rids)
        if step == 3:
            assert s not in proc.core.handles, "parked: the core holds nothing for the slot"
        if "waits" in rids:
            token, lp = runner.commit("waits", after[0])
            tokens.append(token)
            logprobs.append(lp)
        runner.commit("other", after[-1])
    assert_same((tokens, logprobs), want, "waits")
    runner.remove("waits")
    runner.remove("other")


def test_several_rows_for_one_request_end_it(ref, runner, proc, prompts):
    """Speculative decoding is refused at start-up; a request that still has several logits rows in a step ends
    (every one of its rows can only end the sequence) while the batch's other fused request goes on."""
    with pytest.raises(ValueError, match="speculative decoding"):
        type(proc)(config(runner.state.vocab_size, speculative=object()), runner.state)
    assert runner.add(proc, "multi", prompts[10], "proxy") and runner.add(proc, "one", prompts[11], "proxy")
    runner.step(proc, ["multi", "one"])  # a first step as usual
    a, b = runner.slot["multi"], runner.slot["one"]
    seqs = [runner.tokens("multi"), runner.tokens("multi"), runner.tokens("one")]
    _, logits = ref.model("base-large").prefill(seqs)
    expanded = torch.tensor([a, a, b], dtype=torch.int32)
    ctx = LogitsContext(
        expanded_idx_mapping=expanded, idx_mapping=torch.tensor([a, b], dtype=torch.int32),
        idx_mapping_np=torch.tensor([a, b]).numpy(), expanded_local_pos=torch.tensor([0, 1, 0], dtype=torch.int32),
        input_ids=torch.tensor([q[-1] for q in seqs]), pos=torch.tensor([len(q) - 1 for q in seqs]),
        seq_lens_upper_bound_np=torch.tensor([len(seqs[0]), len(seqs[2])]).numpy())
    out = proc.apply(logits.float().clone(), ctx)
    for row in out[:2]:
        assert int(row.argmax()) == runner.eos and torch.isinf(row).sum() == row.numel() - 1
    assert int(out[2].argmax()) == reference(ref, "proxy", prompts[11], 1)[0][0]
    _, after = runner.step(proc, ["multi"])  # one row again: the request stays ended
    assert int(after[0].argmax()) == runner.eos and torch.isinf(after[0]).sum() == after.shape[1] - 1
    runner.remove("multi")
    runner.remove("one")

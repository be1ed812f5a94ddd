"""FusionLogitsProcessor under vLLM's tensor and pipeline parallelism (the CPU build, two worker processes, one
core each): fused greedy tokens equal logitfuse's own engine (which is what one process gives, see
test_processor.py) and fused log-probabilities are within 1e-3; plain rows are the base's. The workers are
asked (collective_rpc) where the processor was built, which experts it loaded and whether it fused, which is
what docs/vllm.md states about where the experts live."""

import gc
import os
import time

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed (.ci/vllm makes a venv with it)")

from tests.vllm.conftest import make_llm
from tests.vllm.test_processor import assert_same, run_ref, run_vllm, vllm_params

LAYOUTS = {"tp2": {"tensor_parallel_size": 2}, "pp2": {"pipeline_parallel_size": 2}}


def two_cores() -> str:
    """VLLM_CPU_OMP_THREADS_BIND for two CPU workers: one allowed core each."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        pytest.skip(f"two vLLM CPU workers need a core each: os.cpu_count() = {os.cpu_count()}, "
                    f"{len(cpus)} allowed to this process")
    return f"{cpus[0]}|{cpus[1]}"


@pytest.fixture(scope="module", params=list(LAYOUTS))
def parallel_llm(request, registry_file):
    """One offline LLM of two workers per layout; pytest finishes one layout's tests (and shuts its engine
    down, so the next one has the cores) before it starts the next."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VLLM_CPU_OMP_THREADS_BIND", two_cores())
        mp.setenv("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # collective_rpc with a function (the probes below)
        start = time.monotonic()
        engine = make_llm(distributed_executor_backend="mp", **LAYOUTS[request.param])
        if request.param == "pp2":
            engine.collective_rpc(later_stage_buffer)
        print(f"\n{request.param}: LLM started in {time.monotonic() - start:.1f} s")
        try:
            yield request.param, engine
        finally:
            engine.llm_engine.engine_core.shutdown()
            del engine
            gc.collect()


def later_stage_buffer(worker) -> None:
    """vLLM 0.32's CPU runner skips its warm-up dummy run under enforce_eager (CPUModelRunner.warming_up_model
    returns at CompilationMode.NONE), and that run is where a pipeline stage after the first allocates the
    buffer it receives the previous stage's hidden states in (GPUModelRunner._dummy_run); without it the
    first step fails with `assert self.intermediate_tensors is not None`, processor or not. Allocate it as
    the dummy run would. (The GPU worker always runs the dummy run: it profiles memory with it.)"""
    from vllm.distributed import get_pp_group

    runner = worker.model_runner
    if not get_pp_group().is_first_rank and getattr(runner, "intermediate_tensors", ()) is None:
        runner.intermediate_tensors = runner.model.make_empty_intermediate_tensors(
            batch_size=runner.max_num_tokens, dtype=runner.model_config.dtype, device=runner.device)


def workers(llm, probe):
    """probe(processor) in every worker, with where it runs: [(tp rank, pp rank, pid, result)]."""

    def run(worker):
        import os

        from vllm.distributed import get_pp_group, get_tp_group

        mine = [p for p in worker.model_runner.input_batch.logitsprocs.all
                if type(p).__name__ == "FusionLogitsProcessor"]
        assert len(mine) == 1, mine
        return get_tp_group().rank_in_group, get_pp_group().rank_in_group, os.getpid(), probe(mine[0])

    return sorted(tuple(r) for r in llm.collective_rpc(run))


@pytest.mark.parametrize("ensemble", ["proxy", "eft", "dlf", "cross-proxy"])
def test_fused_greedy_equals_one_process(parallel_llm, ref, prompts, ensemble):
    _, llm = parallel_llm
    got = run_vllm(llm, prompts, vllm_params(ensemble, 12))
    assert_same(got, run_ref(ref, ensemble, prompts, 12))
    plain = run_ref(ref, "base-large", prompts, 12)
    assert sum(g[0] != p[0] for g, p in zip(got, plain)) >= 3, "fusion should change some outputs"


def test_plain_rows_are_the_base(parallel_llm, ref, prompts):
    _, llm = parallel_llm
    assert_same(run_vllm(llm, prompts, vllm_params(None, 12)), run_ref(ref, "base-large", prompts, 12))


def test_where_the_experts_live(parallel_llm, prompts):
    """Every worker builds the processor and loads its own copy of every expert at start-up (param bytes
    alike); the workers that sample (every tensor-parallel rank; the last pipeline stage only) fuse."""
    layout, llm = parallel_llm

    def loaded(p):
        pool = p.core.lf.pool
        return {name: pool.estimate(name) for name in pool.loaded()}

    def count(p):
        p.fused_steps = 0
        inner = type(p).apply

        def apply(logits):
            p.fused_steps += bool(p.core.handles)
            return inner(p, logits)

        p.apply = apply

    copies = workers(llm, loaded)
    assert len(copies) == 2 and len({pid for *_, pid, _ in copies}) == 2
    experts = copies[0][3]
    assert {"base-small", "tuned-small-qa", "tuned-small-arith", "foreign", "foreign-small"} <= set(experts)
    assert all(c[3] == experts for c in copies), copies
    print(f"\n{layout}: each worker holds {sum(experts.values()) / 2**20:.1f} MiB of experts: {experts}")

    workers(llm, count)
    run_vllm(llm, prompts[:4], vllm_params("proxy", 6))
    steps = {(tp, pp): n for tp, pp, _, n in workers(llm, lambda p: p.fused_steps)}
    if layout == "tp2":
        assert steps[0, 0] > 0 and steps[1, 0] == steps[0, 0], steps
    else:
        assert steps[0, 1] > 0 and steps[0, 0] == 0, steps

"""CUDA against CPU on the tiny family (marked `gpu`, skipped without CUDA; bench/gpu.sh runs them).

Tolerances: float32 on CUDA gives the CPU's greedy tokens, and fused log-probs within 1e-3 (kernels sum in
other orders). bfloat16 keeps 8 bits of mantissa, so it is checked teacher-forced: on the CPU's float32
tokens, each fused log-prob within 0.15 of the CPU's, and the greedy choice the same at >= 90% of positions.
"""

import pytest
import torch

from logitfuse import LogitFuse, SamplingParams
from tests.backends.test_adapter import adapters, configs  # noqa: F401 (fixtures)

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

PROMPTS = ["the red city of the north", "one", "king queen river blue green"]
ENSEMBLES = ["proxy-a", "eft-ab", "dlf-ab"]
SPEC = "  spec-a: {base: base-large, method: eft, experts: [a], speculative: {k: 3}}\n"


def placed(config, folder, device: str, dtype: str, extra: str = "") -> LogitFuse:
    """The registry with every model on device/dtype (and extra ensembles)."""
    folder.mkdir(parents=True, exist_ok=True)
    text = config.read_text().replace("dtype: float32", f"dtype: {dtype}, device: {device}")
    text = text.replace("ensembles:\n", "ensembles:\n" + extra, 1)
    path = folder / f"{device}-{dtype}.yaml"
    path.write_text(text)
    return LogitFuse(path)


@pytest.fixture(scope="module")
def cpu(config_file, tmp_path_factory):
    return placed(config_file, tmp_path_factory.mktemp("cpu"), "cpu", "float32", SPEC)


@pytest.fixture(scope="module")
def cuda32(config_file, tmp_path_factory):
    return placed(config_file, tmp_path_factory.mktemp("cuda32"), "cuda", "float32", SPEC)


@pytest.fixture(scope="module")
def cuda16(config_file, tmp_path_factory):
    return placed(config_file, tmp_path_factory.mktemp("cuda16"), "cuda", "bfloat16", SPEC)


@pytest.mark.parametrize("model", ENSEMBLES)
def test_cuda_float32_decodes_like_cpu(cpu, cuda32, model):
    sp = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    for a, b in zip(cpu.generate(model, PROMPTS, sp), cuda32.generate(model, PROMPTS, sp)):
        assert a.token_ids == b.token_ids
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-3)


def scores(lf: LogitFuse, model: str, ids: list[int]):
    req = lf.requests(model, ids, SamplingParams(max_tokens=0, logprobs=1, prompt_logprobs=True))[0]
    return next(ev for ev in lf.stream([req]) if not hasattr(ev, "token_id"))


@pytest.mark.parametrize("model", ENSEMBLES)
def test_cuda_bfloat16_scores_the_cpu_tokens_closely(cpu, cuda16, model):
    sp = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    agree = total = 0
    for prompt, out in zip(PROMPTS, cpu.generate(model, PROMPTS, sp)):
        ids = cpu.requests(model, prompt, sp)[0].prompt_ids + out.token_ids
        a, b = scores(cpu, model, ids), scores(cuda16, model, ids)
        n = len(out.token_ids)
        assert b.logprobs[-n:] == pytest.approx(a.logprobs[-n:], abs=0.15)
        agree += sum(x[0].token_id == y[0].token_id for x, y in zip(a.top[-n:], b.top[-n:]))
        total += n
    assert agree >= 0.9 * total


def test_cuda_speculative_greedy_equals_plain_greedy(cuda32):
    sp = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    plain = cuda32.generate("spec-a", PROMPTS, sp, {"speculative": {"k": 0}})
    spec = cuda32.generate("spec-a", PROMPTS, sp)
    assert [o.token_ids for o in spec] == [o.token_ids for o in plain]
    for a, b in zip(spec, plain):
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-4)
    assert cuda32.engine.spec_stats.drafted > 0


@pytest.mark.parametrize("model", ENSEMBLES)
def test_cuda_adapter_expert_fuses_like_the_merged_model(configs, tmp_path, model):  # noqa: F811
    with_adapter = placed(configs["adapter"], tmp_path / "adapter", "cuda", "float32")
    merged = placed(configs["merged"], tmp_path / "merged", "cuda", "float32")
    assert with_adapter.pool.get("base-small").device.type == "cuda"
    sp = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    for a, b in zip(with_adapter.generate(model, PROMPTS, sp), merged.generate(model, PROMPTS, sp)):
        assert a.token_ids == b.token_ids
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-3)


def test_cuda_packed_ragged_decode_equals_the_padded_call(family, monkeypatch):
    """backends/packed.py on CUDA: rows fed different numbers of tokens, packed and padded, same logits."""
    from logitfuse.backends.hf import HFCausalLM
    from tests.backends.test_packed import _run

    model = HFCausalLM.load("base-large", str(family["base-large"]), dtype="float32", device="cuda")
    steps = [[[40], [41, 42, 43], [44, 45], [46]], [[50, 51], [52], [53], [54, 55, 56]]]
    packed, padded = _run(model, True, steps, monkeypatch), _run(model, False, steps, monkeypatch)
    for p, q in zip(packed[:-1], padded[:-1]):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-3)
    assert torch.equal(packed[-1], padded[-1])

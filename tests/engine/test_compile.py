"""`compile: true` in the registry: the torch.compile'd forward gives the eager engine's tokens and logprobs,
also while rows join and leave the running batch (the cache is rebuilt and shrinks)."""

import torch
import torch._dynamo.utils

from logitfuse import LogitFuse, SamplingParams
from logitfuse.training.tiny import TINY_CONFIG

PROMPTS = ["the red city of the north", "one", "king queen river blue green", "two three"]


def _compiled_config(family, tmp_path) -> str:
    text = TINY_CONFIG.format(**{k: str(v) for k, v in family.items()})
    for name in ("base-large",):  # one model keeps the compile time of the test down
        text = text.replace(f"  {name}: {{path: {family[name]}, dtype: float32",
                            f"  {name}: {{path: {family[name]}, dtype: float32, compile: true")
    path = tmp_path / "compiled.yaml"
    path.write_text(text)
    return str(path)


def test_compiled_models_decode_like_eager_ones(family, tmp_path, lf):
    compiled = LogitFuse(_compiled_config(family, tmp_path))
    assert compiled.registry.models["base-large"].compile and not lf.registry.models["base-large"].compile
    assert not compiled.registry.models["tuned-a"].compile
    # rows of different lengths: they leave the batch at different steps
    sps = [SamplingParams(max_tokens=n, temperature=0.8, seed=i, ignore_eos=True) for i, n in enumerate((9, 3, 6, 1))]

    def run(engine_owner: LogitFuse) -> list:
        reqs = [r for p, sp in zip(PROMPTS, sps) for r in engine_owner.requests("proxy-a", p, sp)]
        out = {r.rid: [] for r in reqs}
        for ev in engine_owner.stream(reqs):
            if getattr(ev, "token_id", None) is not None:
                out[ev.rid].append((ev.token_id, ev.logprob))
        return list(out.values())

    want, got = run(lf), run(compiled)
    assert hasattr(compiled.pool.get("base-large").model.forward, "_torchdynamo_orig_callable")
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0  # it did compile
    assert [[t for t, _ in row] for row in got] == [[t for t, _ in row] for row in want]
    for a, b in zip(got, want):
        assert torch.allclose(torch.tensor([lp for _, lp in a]), torch.tensor([lp for _, lp in b]), atol=1e-4)
    assert [len(row) for row in got] == [9, 3, 6, 1]

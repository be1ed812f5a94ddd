"""ops/influence.py against a float64 recomputation written out token by token."""

import math

import pytest
import torch

from logitfuse.ops import fusion
from logitfuse.ops.influence import influence, pushes, rank_of

B, T, V = 4, 2, 11


def _inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    base, tuned, untuned = (torch.randn(*s, generator=g) * 2 for s in ((B, V), (B, T, V), (B, T, V)))
    coef = torch.rand(B, T, generator=g) * 2 - 0.5
    return base, tuned, untuned, coef


def _ref_lp(row: list[float]) -> list[float]:
    m = max(row)
    z = m + math.log(sum(math.exp(x - m) for x in row))
    return [x - z for x in row]


@pytest.mark.parametrize("log_probs", [False, True])
def test_every_number_equals_the_float64_recomputation(log_probs):
    base, tuned, untuned, coef = _inputs()
    fused = (fusion.steer(fusion.log_probs(base), fusion.log_probs(tuned), fusion.log_probs(untuned), coef)
             if log_probs else fusion.proxy_tune(base, tuned, untuned, coef))
    chosen = torch.tensor([3, 0, 10, 5])
    got = influence(torch.log_softmax(base, -1), torch.log_softmax(fused, -1), tuned, untuned, coef, chosen,
                    torch.tensor([log_probs] * T))
    for i in range(B):
        c = int(chosen[i])
        b = _ref_lp(base[i].double().tolist())
        t = [tuned[i, k].double().tolist() for k in range(T)]
        u = [untuned[i, k].double().tolist() for k in range(T)]
        if log_probs:
            t, u = [_ref_lp(x) for x in t], [_ref_lp(x) for x in u]
        push = [t[k][c] - u[k][c] for k in range(T)]
        w = coef[i].double().tolist()
        f = _ref_lp([(b[v] if log_probs else float(base[i, v])) + sum(w[k] * (t[k][v] - u[k][v]) for k in range(T))
                     for v in range(V)])
        assert float(got.logprob[i]) == pytest.approx(f[c], abs=1e-5)
        assert float(got.base_logprob[i]) == pytest.approx(b[c], abs=1e-5)
        assert int(got.rank[i]) == 1 + sum(x > f[c] for x in f)
        assert int(got.base_rank[i]) == 1 + sum(x > b[c] for x in b)
        assert got.top_ids[i].tolist() == sorted(range(V), key=lambda v: -f[v])[:3]
        assert got.base_top_ids[i].tolist() == sorted(range(V), key=lambda v: -b[v])[:3]
        assert got.top_logprobs[i].tolist() == pytest.approx(sorted(f, reverse=True)[:3], abs=1e-5)
        assert got.push[i].tolist() == pytest.approx(push, abs=1e-5)
        assert got.weight[i].tolist() == pytest.approx(w, abs=1e-7)


def test_a_shared_untuned_model_and_mixed_units_per_expert():
    _, tuned, untuned, _ = _inputs(1)
    shared = untuned[:, 0]  # (B, V): one untuned model for every expert (DLF)
    chosen = torch.tensor([1, 2, 3, 4])
    mixed = pushes(tuned, shared, chosen, torch.tensor([True, False]))
    lt, lu = torch.log_softmax(tuned.double(), -1), torch.log_softmax(shared.double(), -1)
    for i, c in enumerate(chosen.tolist()):
        assert float(mixed[i, 0]) == pytest.approx(float(lt[i, 0, c] - lu[i, c]), abs=1e-5)  # on log-probs
        assert float(mixed[i, 1]) == pytest.approx(float(tuned[i, 1, c] - shared[i, c]), abs=1e-5)  # as they are


def test_ranks_count_strictly_better_tokens_and_masked_tokens():
    logp = torch.tensor([[-1.0, -0.5, -1.0, float("-inf")]])
    assert rank_of(logp, torch.tensor([0])).tolist() == [2]  # ties share the better rank
    assert rank_of(logp, torch.tensor([1])).tolist() == [1]
    assert rank_of(logp, torch.tensor([3])).tolist() == [4]


def test_no_experts_gives_empty_pushes_and_a_masked_push_is_not_finite():
    base, tuned, untuned, coef = _inputs(2)
    lp = torch.log_softmax(base, -1)
    got = influence(lp, lp, None, None, coef[:, :0], torch.tensor([0, 1, 2, 3]), torch.zeros(0, dtype=torch.bool))
    assert got.push.shape == (B, 0) and torch.equal(got.logprob, got.base_logprob)
    tuned[0, 0, 5] = float("-inf")
    masked = pushes(tuned, untuned, torch.tensor([5, 5, 5, 5]), torch.tensor([True, True]))
    assert not math.isfinite(float(masked[0, 0])) and torch.isfinite(masked[1:]).all()


def test_the_module_is_pure():
    import logitfuse.ops.influence as mod

    src = open(mod.__file__).read()
    assert "import torch" in src and not any(w in src for w in ("transformers", "logitfuse.engine", "httpx"))


def test_ranks_read_off_the_top_values_equal_the_full_count():
    """The shortcut (a chosen token at least as likely as the m-th largest) gives the full count's rank, for
    tokens inside and outside the top m, ties at the boundary and masked tokens included."""
    torch.manual_seed(0)
    logp = torch.randn(64, 5000).round(decimals=1).log_softmax(-1)  # rounded: many ties
    logp[::5, :100] = float("-inf")
    order = logp.argsort(-1, descending=True)
    chosen = order[torch.arange(64), torch.tensor([i % 40 for i in range(64)])]  # ranks 0..39 in sorted order
    chosen[::7] = torch.randint(0, 5000, (len(chosen[::7]),))  # anywhere
    for m in (1, 3, 32):
        top = torch.topk(logp, m, dim=-1).values
        assert rank_of(logp, chosen, top).tolist() == rank_of(logp, chosen).tolist()

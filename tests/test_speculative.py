"""Speculative EFT: greedy output is plain fused greedy token for token; sampled output has exactly the
fused distribution (checked on the acceptance rule itself, by simulation against the known p)."""

import torch

from logitfuse import SamplingParams
from logitfuse.sampling import make_generator
from logitfuse.speculative import SpeculativeEFT, accept_block

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
        n, _ = accept_block(p, p[:3], drafts, gen)
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
        acc, nxt = accept_block(p, q, [d0, d1], gen)
        first[d0 if acc >= 1 else nxt] += 1
        if acc >= 1:
            second[d1 if acc == 2 else nxt] += 1
    assert torch.allclose(first / n, p[0], atol=0.012), (first / n, p[0])
    assert torch.allclose(second / second.sum(), p[1], atol=0.015), (second / second.sum(), p[1])

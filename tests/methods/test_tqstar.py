"""Transfer Q* through the engine: identities that hold whatever the rewards."""

from logitfuse import SamplingParams

PROMPTS = ["the red city of the north", "king queen river"]


def test_top_1_is_greedy_base_whatever_the_rewards(lf):
    sp = SamplingParams(max_tokens=5, temperature=0.9, seed=1, ignore_eos=True)
    tq = lf.generate("tq", PROMPTS, sp, {"top_k": 1})
    greedy = lf.generate("base-large", PROMPTS, SamplingParams(max_tokens=5, temperature=0, ignore_eos=True))
    assert [o.token_ids for o in tq] == [o.token_ids for o in greedy]


def test_huge_alpha_samples_only_from_the_base_top_k(lf):
    out = lf.generate("tq", PROMPTS, SamplingParams(max_tokens=4, temperature=0, logprobs=5, ignore_eos=True),
                      {"alpha": 1e9, "top_k": 3})
    greedy = lf.generate("base-large", PROMPTS, SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
    assert [o.token_ids for o in out] == [o.token_ids for o in greedy]
    for o in out:
        for top in o.top_logprobs:
            assert [t.logprob for t in top][3:] == [float("-inf")] * 2  # only 3 candidates have mass


def test_indirect_with_the_same_reward_equals_direct(lf):
    sp = SamplingParams(max_tokens=4, temperature=0.8, seed=3, ignore_eos=True)
    direct = lf.generate("tq", PROMPTS, sp, {"rollout_tokens": 3})
    indirect = lf.generate("tq", PROMPTS, sp, {"baseline_reward": "rm", "rollout_tokens": 3})
    # Q differs (importance weights) only through r - r_BL = 0, so the weights are 1 and Q is the mean reward.
    assert [o.token_ids for o in direct] == [o.token_ids for o in indirect]
    assert [o.diagnostics for o in direct] == [o.diagnostics for o in indirect]

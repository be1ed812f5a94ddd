"""The prefix cache: prompts that share a prefix reuse its KV, exactly (the same tokens and logprobs as
without the cache, for every method), the n samples of one prompt prefill once, and the cache stays
within its byte budget, least recently used blocks first and leaves before their parents, its blocks keyed
by digests of their whole chain."""

import pytest
import torch

from logitfuse import LogitFuse, SamplingParams
from logitfuse.backends.prefix_cache import PrefixCache
from logitfuse.training.tiny import TINY_CONFIG

SYSTEM = ("the king of the north is the old queen of the river city and the first capital of the east "
          "is a small blue city with two rivers and three kings who ruled it from the west")
QUESTIONS = ["who was the first king ?", "how many rivers are there ?", "what colour is the city ?",
             "where is the capital ?"]
METHODS = ["base-large", "proxy-a", "eft-ab", "dlf-ab", "tq"]


def registry(family, tmp_path, cache: bool):
    text = TINY_CONFIG.format(**{k: str(v) for k, v in family.items()})
    path = tmp_path / f"cache-{cache}.yaml"
    path.write_text(text.replace("server: {", f"server: {{prefix_cache: {str(cache).lower()}, "))
    return path


@pytest.fixture(scope="module")
def pair(family, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("prefix")
    return LogitFuse(registry(family, tmp, True)), LogitFuse(registry(family, tmp, False))


def run(lf, model, prompts, n=1):
    sp = SamplingParams(max_tokens=6, temperature=0.8, seed=7, logprobs=3, ignore_eos=True)
    reqs = [r for p in prompts for r in lf.requests(model, p, sp, n=n)]
    out = {r.rid: [] for r in reqs}
    for ev in lf.stream(reqs):
        if ev.token_id is not None:
            out[ev.rid].append((ev.token_id, ev.logprob, [t.logprob for t in ev.top]))
    return [out[r.rid] for r in reqs]


@pytest.mark.parametrize("model", METHODS)
def test_cached_prefixes_give_the_uncached_tokens_and_logprobs(pair, model):
    cached, plain = pair
    prompts = [f"{SYSTEM} {q}" for q in QUESTIONS]
    run(cached, model, prompts[:1])  # warms the cache with the shared prefix
    before = cached.stats().prefix_hit
    got, want = run(cached, model, prompts), run(plain, model, prompts)
    assert cached.stats().prefix_hit - before >= 3 * 48  # the other prompts reused at least 3 blocks each
    for g, w in zip(got, want):
        assert [t for t, _, _ in g] == [t for t, _, _ in w]
        for (_, lg, top_g), (_, lw, top_w) in zip(g, w):
            assert lg == pytest.approx(lw, abs=1e-5)
            assert top_g == pytest.approx(top_w, abs=1e-5)
    assert plain.stats().prefix_queried == 0  # the switch turns it off


def test_the_samples_of_one_prompt_prefill_once(pair, monkeypatch):
    cached, plain = pair
    backend = cached.model("base-large")
    rows = []
    original = backend._forward
    monkeypatch.setattr(backend, "_forward", lambda ids, state, mask, keep, **kw: rows.append(ids.shape[0])
                        or original(ids, state, mask, keep, **kw))
    prompt = "a prompt seen here for the first time , long enough to fill more than one block of tokens ."
    got = run(cached, "base-large", [prompt], n=4)
    assert rows[0] == 1  # the prefill: one row for the four samples
    want = run(plain, "base-large", [prompt], n=4)
    assert [[t for t, _, _ in row] for row in got] == [[t for t, _, _ in row] for row in want]
    assert [lp for row in got for _, lp, _ in row] == pytest.approx([lp for row in want for _, lp, _ in row], abs=1e-5)


def test_prompts_resumed_from_the_cache_prefill_together(pair, monkeypatch):
    """Rows whose prompts hit the cache, with rests of different lengths, run their rests in one forward
    (right-aligned, padding masked) and decode exactly as without the cache."""
    cached, plain = pair
    backend = cached.model("base-large")
    prompts = [f"{SYSTEM} and then {q}" for q in QUESTIONS]
    run(cached, "base-large", prompts[:1])  # the shared prefix, cached
    calls = []
    original = backend._forward
    monkeypatch.setattr(backend, "_forward", lambda ids, state, mask, keep, **kw: calls.append(tuple(ids.shape))
                        or original(ids, state, mask, keep, **kw))
    got, want = run(cached, "base-large", prompts), run(plain, "base-large", prompts)
    rests = [c for c in calls if c[1] > 1]  # the prefill forwards (decoding feeds one token per row)
    assert len(rests) == 1 and rests[0][0] == len(QUESTIONS)
    assert [[t for t, _, _ in row] for row in got] == [[t for t, _, _ in row] for row in want]
    for g, w in zip(got, want):
        assert [lp for _, lp, _ in g] == pytest.approx([lp for _, lp, _ in w], abs=1e-5)


def test_the_cache_keeps_to_its_budget_and_checks_ids():
    cache = PrefixCache(budget_bytes=3 * 2 * 4 * 4 * 4, block=4)  # three blocks of 1 layer, (1, 1, 4, 4) k and v
    layers = [(torch.arange(48.0).view(1, 1, 12, 4), -torch.arange(48.0).view(1, 1, 12, 4))]
    ids = list(range(12))
    cache.store("m", ids, layers)
    n, got = cache.longest("m", [*ids, 99])
    assert n == 12 and torch.equal(got[0][0], layers[0][0]) and torch.equal(got[0][1], layers[0][1])
    assert cache.longest("m", ids)[0] == 8  # at least one token is left to compute
    assert cache.longest("m", [0, 1, 2, 3, 4, 5, 6, 0, 8])[0] == 4  # the second block differs
    assert cache.longest("other", [*ids, 99]) == (0, None)  # per model
    cache.store("m", [50, 51, 52, 53, 54], [(k[:, :, :5], v[:, :, :5]) for k, v in layers])
    # over budget: the least recently used block went (the third: the lookups since touched the first two)
    assert cache.bytes <= cache.budget and cache.longest("m", [*ids, 99])[0] == 8
    assert cache.longest("m", [50, 51, 52, 53, 54])[0] == 4


def blocks(ids: list[int], start: float = 0.0):
    """One layer of keys and values for ids, (1, 1, len(ids), 2): each position's values name it."""
    k = torch.tensor([[start + i, float(t)] for i, t in enumerate(ids)]).view(1, 1, len(ids), 2)
    return [(k, -k)]


def check_tree(cache: PrefixCache) -> None:
    """Every entry's parent is cached (nothing unreachable is kept), and bytes is the sum of the entries."""
    entries = cache._entries
    assert all(e.parent is None or (model, e.parent) in entries for (model, _), e in entries.items())
    assert cache.bytes == sum(e.nbytes for e in entries.values()) <= cache.budget


def test_eviction_takes_leaves_before_their_parents():
    """A chain of three blocks over a budget of two: its last block goes, the first two still serve."""
    size = 2 * 4 * 2 * 4  # one block of 4 positions: keys and values (1, 1, 4, 2) in float32
    cache = PrefixCache(budget_bytes=2 * size, block=4)
    ids = list(range(12))
    cache.store("m", ids, blocks(ids))
    check_tree(cache)
    n, got = cache.longest("m", [*ids, 99])
    assert n == 8 and torch.equal(got[0][0], blocks(ids)[0][0][:, :, :8])


def test_a_budget_that_forces_eviction_never_strands_a_block():
    """Prompts sharing prefixes in a random order under a small budget: after every store the cache is a
    tree (no entry whose parent is gone) whose bytes are its entries', and every hit is the exact prefix."""
    size = 2 * 4 * 2 * 4
    cache = PrefixCache(budget_bytes=7 * size, block=4)
    gen = torch.Generator().manual_seed(0)
    stems = [torch.randint(0, 5, (16,), generator=gen).tolist() for _ in range(4)]
    for _ in range(200):
        stem = stems[int(torch.randint(0, 4, (1,), generator=gen))]
        cut = int(torch.randint(1, 17, (1,), generator=gen))
        ids = stem[:cut] + torch.randint(0, 5, (int(torch.randint(0, 9, (1,), generator=gen)),), generator=gen).tolist()
        n, got = cache.longest("m", ids)
        if n:
            assert torch.equal(got[0][0], blocks(ids)[0][0][:, :, :n])  # the KV of exactly these ids
        cache.store("m", ids, blocks(ids))
        check_tree(cache)
    assert cache.hit > 0 and len(cache._entries) > 1


def test_a_block_is_keyed_by_its_whole_chain_not_the_builtin_hash(monkeypatch):
    """Two prompts whose first blocks differ but collide under Python's hash: the second block cached after
    one is never served after the other (its keys and values were computed after other tokens)."""
    from logitfuse.backends import prefix_cache

    builtin = hash
    monkeypatch.setattr(prefix_cache, "hash", lambda t: 0 if t[0] is None else builtin(t), raising=False)
    cache = PrefixCache(budget_bytes=2**20, block=4)
    cache.store("m", [1, 2, 3, 4], blocks([1, 2, 3, 4]))
    cache.store("m", [5, 6, 7, 8, 9, 9, 9, 9], blocks([5, 6, 7, 8, 9, 9, 9, 9], start=100.0))
    n, got = cache.longest("m", [1, 2, 3, 4, 9, 9, 9, 9, 0])
    assert n == 4 and torch.equal(got[0][0], blocks([1, 2, 3, 4])[0][0])
    assert prefix_cache.block_digest(None, (1, 2, 3, 4)) != prefix_cache.block_digest(None, (5, 6, 7, 8))
    first = prefix_cache.block_digest(None, (1, 2, 3, 4))
    assert len(first) == 16 and prefix_cache.block_digest(first, (9,) * 4) != prefix_cache.block_digest(None, (9,) * 4)


def test_even_colliding_digests_never_serve_another_prompts_keys_and_values(monkeypatch):
    """Two first blocks made to share a digest: the one cached first keeps the key, the other prompt stores
    nothing past it and reads nothing under it, and a block cached after one is never served after the other."""
    from logitfuse.backends import prefix_cache

    real = prefix_cache.block_digest
    monkeypatch.setattr(prefix_cache, "block_digest",
                        lambda parent, ids: b"same" if ids in {(1, 2, 3, 4), (5, 6, 7, 8)} else real(parent, ids))
    cache = PrefixCache(budget_bytes=2**20, block=4)
    cache.store("m", [1, 2, 3, 4], blocks([1, 2, 3, 4]))
    cache.store("m", [5, 6, 7, 8, 9, 9, 9, 9], blocks([5, 6, 7, 8, 9, 9, 9, 9], start=100.0))
    assert len(cache._entries) == 1  # the second prompt kept nothing
    assert cache.longest("m", [5, 6, 7, 8, 9, 9, 9, 9, 0]) == (0, None)
    n, got = cache.longest("m", [1, 2, 3, 4, 9, 9, 9, 9, 0])
    assert n == 4 and torch.equal(got[0][0], blocks([1, 2, 3, 4])[0][0])
    cache.store("m", [1, 2, 3, 4, 9, 9, 9, 9], blocks([1, 2, 3, 4, 9, 9, 9, 9]))
    n, got = cache.longest("m", [1, 2, 3, 4, 9, 9, 9, 9, 0])
    assert n == 8 and torch.equal(got[0][0], blocks([1, 2, 3, 4, 9, 9, 9, 9])[0][0])
    check_tree(cache)


def test_forget_drops_every_entry_of_a_name_and_only_those():
    cache = PrefixCache(budget_bytes=2**20, block=4)
    for name in ("host", "host+a"):
        cache.store(name, list(range(9)), blocks(list(range(9))))
    cache.forget("host+a")
    assert cache.longest("host+a", list(range(9)))[0] == 0 and cache.longest("host", list(range(9)))[0] == 8
    check_tree(cache)

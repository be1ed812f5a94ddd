"""Model pool: load on first use, LRU eviction under a byte budget, pins, loads that block no one else."""

import threading
import time

import pytest

from logitfuse.config.registry import Registry
from logitfuse.pool import ModelPool


class Fake:
    def __init__(self, name, size):
        self.name, self.size = name, size

    def param_bytes(self):
        return self.size


def make_pool(budget, delay=None, loads=None):
    reg = Registry.model_validate({"models": {n: {"path": n} for n in "abcd"}})

    def loader(_reg, name):
        if loads is not None:
            loads.append(name)
        if delay and name in delay:
            delay[name].wait(5)
        return Fake(name, 100)

    return ModelPool(reg, loader=loader, budget_bytes=budget)


def test_least_recently_used_is_evicted_first():
    pool = make_pool(250)
    pool.get("a"), pool.get("b"), pool.get("a"), pool.get("c")
    assert pool.loaded() == ["a", "c"]


def test_pinned_models_are_never_evicted():
    pool = make_pool(150)
    pool.acquire(["a"])
    pool.get("b")
    pool.get("c")
    assert "a" in pool.loaded()
    pool.release(["a"])
    pool.get("d")
    assert "a" not in pool.loaded()


def test_a_slow_load_blocks_only_its_own_callers():
    gate, loads = threading.Event(), []
    pool = make_pool(10_000, delay={"b": gate}, loads=loads)
    pool.get("a")
    slow = threading.Thread(target=pool.get, args=("b",))
    slow.start()
    time.sleep(0.05)
    t0 = time.perf_counter()
    assert pool.get("a").name == "a" and pool.get("c").name == "c"
    assert time.perf_counter() - t0 < 1.0
    waiter = threading.Thread(target=pool.get, args=("b",))
    waiter.start()
    gate.set()
    slow.join(), waiter.join()
    assert loads.count("b") == 1


def test_try_acquire_pins_only_what_is_loaded_and_never_loads():
    loads = []
    pool = make_pool(250, loads=loads)
    assert not pool.try_acquire(["a"]) and loads == []
    pool.get("a")
    assert pool.try_acquire(["a"])
    pool.get("b"), pool.get("c")  # over the budget: b goes, the pinned a stays
    assert pool.loaded() == ["a", "c"]
    pool.release(["a"])


def test_room_for_counts_what_others_pin_and_a_request_over_the_budget_is_refused():
    import pytest

    from logitfuse.errors import InvalidRequest

    pool = make_pool(250)
    pool.acquire(["a", "b"])
    assert pool.room_for(["a", "b"])  # already held: no more bytes
    assert pool.estimate("c") == 0  # no files behind the fake models: unknown size
    pool.get("c")
    assert not pool.room_for(["c"])  # 200 pinned + 100 > 250
    pool.release(["a", "b"])
    assert pool.room_for(["c"])
    with pytest.raises(InvalidRequest, match=r"over this server's memory budget .*server\.memory_budget_mb"):
        pool.acquire(["a", "b", "c"])
    assert pool._pins == {}  # the refused request left no pin behind


def test_a_model_evicted_leaves_nothing_of_itself_alive(family, tmp_path):
    """Eviction frees a model's memory: nothing (a cache keyed by tokenizer, a batch state, a closure)
    keeps the evicted backend or its tokenizer alive, so swapping models under a budget does not grow the
    process (a 262k-vocabulary tokenizer alone is hundreds of MB)."""
    import gc
    import weakref

    from logitfuse import LogitFuse, SamplingParams
    from logitfuse.training.tiny import TINY_CONFIG

    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(TINY_CONFIG.format(**{k: str(v) for k, v in family.items()}))
    lf = LogitFuse(cfg)
    sp = SamplingParams(max_tokens=2, temperature=0)
    lf.generate("proxy-a", ["the red city"], sp)  # text prompts, a chat template, fusion: every cache is used
    for _ in lf.stream(lf.requests("proxy-a", messages=[{"role": "user", "content": "the red city"}], sampling=sp)):
        pass
    old = lf.model("base-large")
    refs = [weakref.ref(old), weakref.ref(old.tokenizer), weakref.ref(old.model)]
    del old
    lf.pool.budget = lf.model("foreign").param_bytes() + 1  # room for one model: base-large must go
    lf.generate("foreign", ["the red city"], sp)
    assert not lf.pool.is_loaded("base-large")
    gc.collect()
    assert [r() is None for r in refs] == [True, True, True]


def test_running_out_of_memory_while_loading_is_retried_a_broken_file_is_not(tmp_path):
    """A load that fails for want of memory is the moment's (other models were loaded): it is retried after
    load_retry_seconds. A load that fails on the checkpoint itself fails again without loading, until the
    checkpoint's files change."""
    from logitfuse.errors import ModelUnavailable

    for name in "ab":
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.safetensors").write_bytes(b"x")
    reg = Registry.model_validate({"models": {n: {"path": str(tmp_path / n)} for n in "ab"},
                                   "server": {"load_retry_seconds": 0}})
    calls = []

    def loader(_reg, name):
        calls.append(name)
        if len(calls) <= 2:
            raise MemoryError() if name == "a" else ValueError("not a checkpoint")
        return Fake(name, 100)

    pool = ModelPool(reg, loader=loader, budget_bytes=10**6)
    for name in "ab":
        with pytest.raises(ModelUnavailable):
            pool.get(name)
    assert pool.get("a").name == "a"  # retried: loads now
    with pytest.raises(ModelUnavailable, match="not a checkpoint"):  # not loaded again
        pool.get("b")
    assert calls == ["a", "b", "a"]


def test_listeners_hear_of_every_unload_and_load_with_the_views_over_a_model():
    """A model's weights changing (unloaded, or loaded again) is told for its name and the adapter views over
    it, once per change, so that what was computed with the old weights can go."""
    reg = Registry.model_validate({"models": {n: {"path": n} for n in "abc"},
                                   "experts": {"x": {"untuned": "a", "adapter": "x"}}})
    pool = ModelPool(reg, loader=lambda _reg, name: Fake(name, 100), budget_bytes=150)
    heard = []
    pool.on_weights_change(heard.append)
    pool.get("a")
    assert heard == ["a", "a+x"]
    heard.clear()
    pool.get("b")  # over the budget: a goes
    assert heard == ["b", "a", "a+x"]
    assert pool.loaded() == ["b"]


LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def write_adapter(model, folder, seed: int) -> None:
    """A LoRA adapter with random, sizeable weights (PEFT initialises B to zero) saved into folder."""
    import copy

    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    peft = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGETS,
                                                           init_lora_weights=False))
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.mul_(3.0)
    peft.save_pretrained(folder)


@pytest.mark.parametrize("evicted", ["host", "view"])
def test_an_adapter_retrained_in_place_is_served_with_its_new_weights(tmp_path, evicted):
    """An adapter rewritten into the same folder, its model evicted (with its untuned host, or alone) and
    loaded again: a prompt seen before gives the new adapter's scores, not those of keys and values the
    prefix cache kept from the old weights (a fresh server without the cache is the reference)."""
    pytest.importorskip("peft")
    from logitfuse import LogitFuse, SamplingParams
    from logitfuse.training.tiny import build_model, build_tokenizer, save

    tok = build_tokenizer()
    small = build_model(tok, 2, scale=8.0)
    paths = {"small": save(small, tok, tmp_path / "small"),
             "other": save(build_model(tok, 3, scale=8.0), tok, tmp_path / "other")}
    folder = tmp_path / "adapter"
    write_adapter(small, folder, 11)
    text = ("models:\n  small: {{path: {small}, dtype: float32}}\n  other: {{path: {other}, dtype: float32}}\n"
            "experts:\n  a: {{untuned: small, adapter: {folder}}}\n"
            "ensembles:\n  proxy-a: {{base: small, method: proxy, experts: [a], alpha: 1.0}}\n"
            "server: {{preload: false, prefix_cache: {cache}}}\n")
    for cache in ("true", "false"):
        (tmp_path / f"{cache}.yaml").write_text(text.format(**paths, folder=folder, cache=cache))
    prompt = " ".join(["the red city of the north and the blue river of the south"] * 3)
    sp = SamplingParams(max_tokens=3, temperature=0, logprobs=5, ignore_eos=True)

    def scores(lf):
        return [(e.token_id, [t.logprob for t in e.top]) for e in lf.stream(lf.requests("proxy-a", prompt, sp))
                if e.token_id is not None]

    lf = LogitFuse(tmp_path / "true.yaml")
    old = scores(lf)
    assert lf.stats().prefix_bytes > 0  # the prompt's blocks, kept for each view
    write_adapter(small, folder, 12)  # retrained, written over the old one
    if evicted == "view":  # the view is the least recently used: it goes alone, its host stays
        lf.pool.get("small")
        lf.pool.budget = lf.pool.get("small").param_bytes() + lf.pool.estimate("other") + 1
    else:
        lf.pool.budget = 1
    lf.pool.get("other")
    assert "small+a" not in lf.pool.loaded() and ("small" in lf.pool.loaded()) == (evicted == "view")
    lf.pool.budget = 2**40
    got = scores(lf)
    want = scores(LogitFuse(tmp_path / "false.yaml"))
    assert [t for t, _ in got] == [t for t, _ in want]
    for (_, g), (_, w) in zip(got, want):
        assert g == pytest.approx(w, abs=1e-5)
    assert max(abs(a - b) for (_, o), (_, w) in zip(old, want) for a, b in zip(o, w)) > 0.05  # it did change

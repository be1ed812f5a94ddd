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

"""LoRA-adapter experts on tiny random models: the same fused scores as the adapter merged into a full copy,
one weight copy in the pool, one forward per step for the untuned model and its adapters, and a clear error
for each bad adapter while the server keeps answering."""

import copy
import re
from pathlib import Path

import pytest
import torch

pytest.importorskip("peft")
from peft import LoraConfig, get_peft_model

from logitfuse import LogitFuse, SamplingParams
from logitfuse.backends import adapter
from logitfuse.backends.adapter import BASE, AdapterHost
from logitfuse.training.tiny import build_model, build_tokenizer, save

PROMPTS = ["the red city of the north", "one", "king queen river blue green"]  # ragged rows
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def random_lora(model, seed: int, scale: float = 3.0):
    """A LoRA over a copy of model with random, sizeable A and B (B is zero at PEFT's default init)."""
    torch.manual_seed(seed)
    peft = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS,
                                                           init_lora_weights=False))
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.mul_(scale)
    return peft.eval()


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    tok = build_tokenizer()
    small = build_model(tok, 2, scale=8.0)
    out = {"base-large": save(build_model(tok, 1, hidden=48, layers=3, scale=8.0), tok, root / "base-large"),
           "base-small": save(small, tok, root / "base-small")}
    for name, seed in (("a", 11), ("b", 12)):
        peft = random_lora(small, seed)
        peft.save_pretrained(root / f"adapter-{name}")
        out[f"adapter-{name}"] = root / f"adapter-{name}"
        out[f"merged-{name}"] = save(copy.deepcopy(peft).merge_and_unload(), tok, root / f"merged-{name}")
    wide = random_lora(build_model(tok, 3, hidden=48, scale=8.0), 13)  # trained on another model: shapes differ
    wide.save_pretrained(root / "adapter-wide")
    out["adapter-wide"] = root / "adapter-wide"
    corrupt = root / "adapter-corrupt"
    corrupt.mkdir()
    for f in out["adapter-a"].iterdir():
        (corrupt / f.name).write_bytes(f.read_bytes())
    weights = corrupt / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # cut off mid-tensor
    out["adapter-corrupt"] = corrupt
    return out


ENSEMBLES = """ensembles:
  proxy-a: {{base: base-large, method: proxy, experts: [a], alpha: 1.0}}
  eft-ab: {{base: base-large, method: eft, experts: [a, b], weights: [0.7, 0.3], beta: 1.0}}
  dlf-ab: {{base: base-large, method: dlf, experts: [a, b]}}
server: {{memory_budget_mb: 512, preload: {preload}}}
"""
MODELS = """models:
  base-large: {{path: {base-large}, dtype: float32}}
  base-small: {{path: {base-small}, dtype: float32}}
"""


def write(root: Path, name: str, text: str) -> Path:
    path = root / f"{name}.yaml"
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def configs(adapters, tmp_path_factory):
    paths = {k: str(v) for k, v in adapters.items()}
    root = tmp_path_factory.mktemp("cfg")
    adapter = (MODELS + "experts:\n  a: {{untuned: base-small, adapter: {adapter-a}}}\n"
               "  b: {{untuned: base-small, adapter: {adapter-b}}}\n"
               "  missing: {{untuned: base-small, adapter: {base-small}/nowhere}}\n"
               "  wide: {{untuned: base-small, adapter: {adapter-wide}}}\n"
               "  corrupt: {{untuned: base-small, adapter: {adapter-corrupt}}}\n" + ENSEMBLES)
    merged = (MODELS + "  merged-a: {{path: {merged-a}, dtype: float32}}\n"
              "  merged-b: {{path: {merged-b}, dtype: float32}}\n"
              "experts:\n  a: {{tuned: merged-a, untuned: base-small}}\n  b: {{tuned: merged-b, untuned: base-small}}\n"
              + ENSEMBLES)
    return {"adapter": write(root, "adapter", adapter.format(**paths, preload="false")),
            "merged": write(root, "merged", merged.format(**paths, preload="false"))}


@pytest.fixture(scope="module")
def pair(configs):
    return LogitFuse(configs["adapter"]), LogitFuse(configs["merged"])


def run(lf, model, sp):
    reqs = [r for p in PROMPTS for r in lf.requests(model, p, sp)]
    events = {r.rid: [] for r in reqs}
    for ev in lf.stream(reqs):
        if ev.token_id is not None:
            events[ev.rid].append(ev)
    return [events[r.rid] for r in reqs]


@pytest.mark.parametrize("model", ["proxy-a", "eft-ab", "dlf-ab"])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_adapter_expert_fuses_like_the_merged_full_model(pair, model, temperature):
    sp = SamplingParams(max_tokens=8, temperature=temperature, seed=5, logprobs=5, ignore_eos=True)
    with_adapter, merged = (run(lf, model, sp) for lf in pair)
    for rows_a, rows_m in zip(with_adapter, merged):
        assert [e.token_id for e in rows_a] == [e.token_id for e in rows_m]
        for ea, em in zip(rows_a, rows_m):
            assert ea.logprob == pytest.approx(em.logprob, abs=1e-4)
            assert [t.token_id for t in ea.top] == [t.token_id for t in em.top]
            assert [t.logprob for t in ea.top] == pytest.approx([t.logprob for t in em.top], abs=1e-4)
            if model == "dlf-ab":
                got, want = ea.diagnostics["dlf_weights"], em.diagnostics["dlf_weights"]
                assert got == pytest.approx(want, abs=1e-6)


def test_views_resumed_from_the_prefix_cache_prefill_together_like_the_merged_models(pair):
    """Prompts sharing a long prefix: the second batch resumes every view (untuned, adapter a, adapter b)
    from its own cache entries in one forward, and still decodes like the merged models."""
    lf, merged = pair
    long = " ".join(["the red city of the north and the blue river of the south"] * 4)
    prompts = [f"{long} {p}" for p in PROMPTS]
    sp = SamplingParams(max_tokens=6, temperature=0, logprobs=3, ignore_eos=True)
    calls = []

    def go(engine):
        reqs = [r for p in prompts for r in engine.requests("eft-ab", p, sp)]
        out = {r.rid: [] for r in reqs}
        for ev in engine.stream(reqs):
            if ev.token_id is not None:
                out[ev.rid].append((ev.token_id, ev.logprob))
        return [out[r.rid] for r in reqs]

    go(lf)  # caches the long prefix for each view
    host = lf.pool.get("base-small").host
    original = host.call
    host.call = lambda names, **kw: calls.append((list(names), kw["input_ids"].shape[1])) or original(names, **kw)
    before = lf.stats().prefix_hit
    try:
        got = go(lf)
    finally:
        host.call = original
    want = go(merged)
    assert lf.stats().prefix_hit - before >= 3 * 3 * 32  # 3 views x 3 prompts, each a long cached prefix
    prefill = [names for names, width in calls if width > 1]
    assert len(prefill) == 1 and sorted(set(prefill[0])) == [BASE, "a", "b"]  # one forward, packed per view
    for g, w in zip(got, want):
        assert [t for t, _ in g] == [t for t, _ in w]
        assert [lp for _, lp in g] == pytest.approx([lp for _, lp in w], abs=1e-4)


def test_the_adapter_changes_the_scores(pair):
    """The comparison above is not vacuous: the adapter moves the fused distribution away from the base's."""
    lf = pair[0]
    sp = SamplingParams(max_tokens=1, temperature=0, logprobs=5)
    fused = run(lf, "proxy-a", sp)[0][0]
    plain = run(lf, "base-large", sp)[0][0]
    assert max(abs(a.logprob - b.logprob) for a, b in zip(fused.top, plain.top)) > 0.05


def test_untuned_model_and_adapters_share_one_weight_copy_and_one_forward(configs):
    lf = LogitFuse(configs["adapter"])
    calls = []
    sp = SamplingParams(max_tokens=5, temperature=0, ignore_eos=True)
    reqs = [r for p in PROMPTS for r in lf.requests("eft-ab", p, sp)]
    host = lf.pool.get("base-small").host
    assert isinstance(host, AdapterHost)
    original = host.call
    host.call = lambda names, **kw: calls.append(list(names)) or original(names, **kw)
    for _ in lf.stream(reqs):
        pass
    views = [lf.pool.get(n) for n in ("base-small", "base-small+a", "base-small+b")]
    assert len({id(v.host.module) for v in views}) == 1 and sorted(host.adapters()) == ["a", "b"]
    small = sum(p.numel() * 4 for n, p in host.module.named_parameters() if "lora_" not in n)
    lora = sum(p.numel() * 4 for n, p in host.module.named_parameters() if "lora_" in n)
    assert views[0].param_bytes() == small and views[1].param_bytes() + views[2].param_bytes() == lora
    assert lora < small / 4  # an adapter expert costs a fraction of a second model
    # the prefill and every step are one forward over the untuned rows and both adapters' rows
    assert len(calls) == 5 and all(sorted(set(c)) == [BASE, "a", "b"] and len(c) == 9 for c in calls)


def test_a_group_forward_reuses_the_joined_state_while_its_rows_stay(configs, monkeypatch):
    """The untuned and tuned rows are joined into one state once; later steps grow it in place (no copy of
    the caches together each step), and a row leaving makes the next step join the parts anew."""
    lf = LogitFuse(configs["adapter"])
    found, original = [], adapter._rejoined

    def rejoined(states):
        whole = original(states)
        found.append(whole is not None)
        return whole

    monkeypatch.setattr(adapter, "_rejoined", rejoined)
    short = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)
    long = SamplingParams(max_tokens=7, temperature=0, ignore_eos=True)
    reqs = lf.requests("eft-ab", PROMPTS[0], short) + lf.requests("eft-ab", PROMPTS[1], long)
    for _ in lf.stream(reqs):
        pass
    # 6 group steps: the first reuses the state the group prefill joined, so does the next, joined again
    # after the short row left (its third token ends it before the step's forward), then reused for 3 more
    assert found == [True, True, False, True, True, True]


def test_eviction_unloads_the_adapter_and_reload_uses_the_same_host(configs):
    lf = LogitFuse(configs["adapter"])
    view = lf.pool.get("base-small+a")
    host = view.host
    lf.pool.budget = view.param_bytes() + lf.pool.get("base-small").param_bytes() - 1
    lf.pool.get("base-large")  # over budget: the least recently used go, the adapter with its untuned model
    assert "base-small+a" not in lf.pool.loaded() and "a" not in host.adapters()
    lf.pool.budget = 2**40
    again = lf.pool.get("base-small+a")
    assert again.host is lf.pool.get("base-small").host and again.host.adapters() == ["a"]


@pytest.mark.parametrize("expert,message", [
    ("missing", "adapter folder .*nowhere does not exist"),
    ("wide", r"shape \(4, 48\), but .* has in_features 32"),
    ("corrupt", "is corrupt or unreadable"),
])
def test_bad_adapter_is_a_400_naming_the_expert_and_the_server_goes_on(configs, expert, message):
    from fastapi.testclient import TestClient

    from logitfuse.service.app import create_app

    with TestClient(create_app(configs["adapter"])) as client:
        body = {"model": "base-large", "prompt": "one", "max_tokens": 3,
                "fusion": {"method": "proxy", "experts": [expert]}}
        bad = client.post("/v1/completions", json=body)
        assert bad.status_code == 400, bad.text
        assert f"expert {expert!r}" in bad.json()["error"]["message"]
        assert re.search(message, bad.json()["error"]["message"])
        good = client.post("/v1/completions", json={"model": "proxy-a", "prompt": "one", "max_tokens": 3})
        assert good.status_code == 200 and good.json()["choices"][0]["text"] is not None
        # the failed load left the shared untuned model as it was: the good adapter still fuses
        assert client.post("/v1/completions", json=body).status_code == 400


def test_preloaded_bad_adapter_stops_start_up_naming_it(configs, tmp_path):
    text = configs["adapter"].read_text().replace("preload: false", "preload: true")
    text = text.replace("experts: [a], alpha", "experts: [corrupt], alpha")
    lf = LogitFuse(write(tmp_path, "bad", text))
    failed = lf.preload()  # the server refuses to start with these (server.on_bad_entry: refuse)
    assert "expert 'corrupt'" in failed["ensembles.proxy-a"]
    assert "is corrupt or unreadable" in failed["ensembles.proxy-a"]


def test_registry_needs_exactly_one_of_tuned_or_adapter(configs, tmp_path):
    text = configs["adapter"].read_text()
    both = text.replace("a: {untuned: base-small, adapter:", "a: {tuned: base-small, untuned: base-small, adapter:")
    with pytest.raises(ValueError, match="exactly one of 'tuned'"):
        LogitFuse(write(tmp_path, "both", both))
    small = next(line for line in text.splitlines() if line.startswith("  base-small:"))
    taken = text.replace("models:\n", "models:\n" + small.replace("base-small:", "base-small+a:") + "\n")
    with pytest.raises(ValueError, match="'base-small\\+a' of its adapter model is taken"):
        LogitFuse(write(tmp_path, "taken", taken))

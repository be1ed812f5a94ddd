"""`engine: vllm` entries, checked before anything starts: the `vllm` mapping only with it, no remote source,
and, where vLLM is not installed (the core install), a start-up error naming the extra. The service's side of a
hosted model needs only its tokenizer and config (backends/shell.py): no weights load for it or its experts."""

import importlib.util
from pathlib import Path

import pytest

from logitfuse import LogitFuse
from logitfuse.config.registry import Registry
from logitfuse.engine.request import SamplingParams

MODELS = Path(__file__).resolve().parent.parent.parent / "models"

REGISTRY = f"""
models:
  large: {{path: {MODELS}/base-large, engine: vllm, vllm: {{max_model_len: 256}}}}
  small: {{path: {MODELS}/base-small}}
  qa: {{path: {MODELS}/tuned-small-qa, chat_template: true}}
experts:
  e: {{tuned: qa, untuned: small}}
ensembles:
  hosted: {{base: large, method: proxy, experts: [e]}}
"""


def test_vllm_arguments_need_engine_vllm(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(f"models:\n  m: {{path: {MODELS}/base-small, vllm: {{max_model_len: 8}}}}\n")
    with pytest.raises(ValueError, match=r"models.m: 'vllm' engine arguments need 'engine: vllm'"):
        Registry.load(path)
    path.write_text("models:\n  m: {remote: {url: 'http://x/v1', model: m}, tokenizer: t, engine: vllm}\n")
    with pytest.raises(ValueError, match="engine: vllm runs a local checkpoint"):
        Registry.load(path)
    path.write_text(f"models:\n  m: {{path: {MODELS}/base-small, engine: vllm2}}\n")
    with pytest.raises(ValueError, match=r"models.m.engine"):
        Registry.load(path)


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed here")
def test_without_vllm_the_start_up_names_the_extra(tmp_path, caplog):
    from logitfuse.service.app import run_server

    path = tmp_path / "r.yaml"
    path.write_text(REGISTRY)
    assert run_server(str(path), "127.0.0.1", 1, "warning") == 2
    assert "engine: vllm needs vLLM installed" in caplog.text and "logitfuse[vllm]" in caplog.text


def test_a_hosted_model_loads_no_weights_here(tmp_path):
    """Requests over the hosted model are built from tokenizers and configs alone: each role's own prompt (the
    chat template for the expert, plain text for the base), the window of the engine's max_model_len."""
    path = tmp_path / "r.yaml"
    path.write_text(REGISTRY)
    lf = LogitFuse(path)
    messages = [{"role": "user", "content": "what is the capital of ludu ?"}]
    [req] = lf.requests("hosted", messages=messages, sampling=SamplingParams(max_tokens=None, temperature=0))
    assert lf.health()["loaded"] == ["large"] and lf.model("large").param_bytes() == 0
    tok = lf.shell("qa").tokenizer
    assert req.prompts["qa"] == list(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
                                     ["input_ids"])
    assert req.prompts["large"] == list(lf.shell("large").tokenizer("what is the capital of ludu ?").input_ids)
    assert req.prompts["large"] != req.prompts["qa"]
    assert lf.shell("large").max_context == 256
    assert req.sampling.max_tokens == min(256 - len(req.prompts["large"]),
                                          lf.shell("qa").max_context - len(req.prompts["qa"]),
                                          lf.settings.max_tokens_default or 1 << 30)
    with pytest.raises(RuntimeError, match="runs in another engine"):
        lf.model("large").prefill([[1, 2]])


def test_a_plan_travels_to_vllms_process_as_plain_data():
    """Engine mode hands vLLM's processor each request's resolved plan in extra_args: plain data that comes back
    as the same plan, for every ensemble of the default registry (experts, DLF's grid, Transfer Q*, speculative)
    and a per-request override; anything else is a 400 naming the key."""
    import json

    from logitfuse.errors import InvalidRequest
    from logitfuse.vllm.requests import plan_dict, plan_of

    lf = LogitFuse(Path(__file__).resolve().parent.parent.parent / "configs" / "default.yaml")
    plans = [lf.plan(n) for n in lf.names()] + [lf.plan(lf.names()[0], {"alpha": 0.3, "influence": True})]
    for plan in plans:
        assert plan_of(json.loads(json.dumps(plan_dict(plan)))) == plan
    assert {p.method for p in plans} >= {"proxy", "eft", "dlf", "tqstar"}
    with pytest.raises(InvalidRequest, match="extra_args.plan: not a fusion plan"):
        plan_of({"method": "proxy"})

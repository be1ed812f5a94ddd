"""logitfuse inside vLLM, on the embedded family (models/). test_rows.py drives the experts' side without
vLLM; test_processor.py (skipped where vLLM does not import: see .ci/vllm) runs one offline LLM per module,
whose engine subprocess reads LOGITFUSE_CONFIG. The base is models/base-large in float32, eager; logitfuse's
own engine on the same registry is the reference. The cross-tokenizer pair is the tiny family's `foreign` and
`foreign-small` (logitfuse/training/tiny.py), whose tokenizer splits the base's text its own way.
"""

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent.parent
MODELS = ROOT / "models"

REGISTRY = """
models:
  base-large: {{path: {m}/base-large, dtype: float32, chat_template: true}}
  base-small: {{path: {m}/base-small, dtype: float32, chat_template: true}}
  tuned-small-qa: {{path: {m}/tuned-small-qa, dtype: float32, chat_template: true}}
  tuned-small-arith: {{path: {m}/tuned-small-arith, dtype: float32, chat_template: true}}
  plain-small: {{path: {m}/base-small, dtype: float32}}
  broken-small: {{path: {broken}, dtype: float32, chat_template: true}}
  foreign: {{path: {foreign}, dtype: float32}}
  foreign-small: {{path: {foreign_small}, dtype: float32}}
rewards:
  rm: {{path: {m}/reward, dtype: float32}}
experts:
  qa: {{tuned: tuned-small-qa, untuned: base-small}}
  arith: {{tuned: tuned-small-arith, untuned: base-small}}
  lora: {{adapter: {adapter}, untuned: base-small}}
  other-format: {{tuned: tuned-small-qa, untuned: plain-small}}
  broken: {{tuned: broken-small, untuned: base-small}}
  xa: {{tuned: foreign, untuned: foreign-small, cross_tokenizer: true}}
ensembles:
  proxy: {{base: base-large, method: proxy, experts: [qa], alpha: 1.0}}
  eft: {{base: base-large, method: eft, experts: [qa, arith], weights: [0.7, 0.3], beta: 1.0}}
  dlf: {{base: base-large, method: dlf, experts: [qa, arith]}}
  adapter: {{base: base-large, method: proxy, experts: [lora], alpha: 1.5}}
  spec: {{base: base-large, method: eft, experts: [qa], speculative: {{k: 2}}}}
  tq: {{base: base-large, method: tqstar, baseline: tuned-small-qa, reward: rm, top_k: 3, rollout_tokens: 2}}
  formats: {{base: base-large, method: proxy, experts: [other-format]}}
  unloadable: {{base: base-large, method: proxy, experts: [broken]}}
  over-self: {{base: base-small, method: proxy, experts: [qa], alpha: 1.0}}
  lora-self: {{base: base-small, method: proxy, experts: [lora], alpha: 1.0}}
  cross-proxy: {{base: base-large, method: proxy, experts: [xa], alpha: 1.0}}
  cross-eft: {{base: base-large, method: eft, experts: [qa, xa], weights: [0.6, 0.4], beta: 1.0}}
  cross-dlf: {{base: base-large, method: dlf, experts: [xa]}}
server: {{memory_budget_mb: 1024, max_batch: 64}}
"""


def build_adapter(folder: Path) -> Path:
    """A random LoRA adapter over base-small (non-zero B, so it changes the model)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(MODELS / "base-small", dtype=torch.float32)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(model, cfg).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def registry_file(tmp_path_factory) -> Iterator[Path]:
    pytest.importorskip("peft")
    root = tmp_path_factory.mktemp("vllm-registry")
    adapter = build_adapter(root / "lora")
    broken = root / "broken-small"  # a checkpoint whose weights file is overwritten: it cannot load
    shutil.copytree(MODELS / "tuned-small-qa", broken)
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    from logitfuse.training.tiny import build_family

    tiny = build_family(root / "tiny")
    path = root / "registry.yaml"
    path.write_text(REGISTRY.format(m=MODELS, adapter=adapter, broken=broken, foreign=tiny["foreign"],
                                    foreign_small=tiny["foreign-small"]))
    before = os.environ.get("LOGITFUSE_CONFIG")
    os.environ["LOGITFUSE_CONFIG"] = str(path)  # the engine subprocess inherits it
    yield path
    if before is None:  # the rest of the session reads its own registries
        os.environ.pop("LOGITFUSE_CONFIG", None)
    else:
        os.environ["LOGITFUSE_CONFIG"] = before


@pytest.fixture(scope="session")
def ref(registry_file):
    from logitfuse import LogitFuse

    return LogitFuse(registry_file)


@pytest.fixture(scope="session")
def prompts(ref) -> list[list[int]]:
    """24 chat-formatted questions of the family's evaluation sets, as the base's token ids."""
    tok = ref.model("base-large").tokenizer
    lines = []
    for name in ("eval_qa.jsonl", "eval_arith.jsonl"):
        lines += [json.loads(x)["prompt"] for x in (MODELS / "data" / name).read_text().splitlines()[:12]]
    return [list(tok(p).input_ids) for p in lines]


def make_llm(**extra):
    from vllm import LLM

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    return LLM(str(MODELS / "base-large"), dtype="float32", enforce_eager=True, max_model_len=512, seed=0,
               logits_processors=["logitfuse.vllm:FusionLogitsProcessor"], logprobs_mode="processed_logprobs",
               max_num_seqs=32, **extra)


@pytest.fixture(scope="module")
def llm(registry_file):
    engine = make_llm()
    yield engine
    engine.llm_engine.engine_core.shutdown()

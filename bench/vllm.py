"""Fusion inside vLLM against logitfuse's own engine, side by side in one run on the same models: vLLM's base
alone, vLLM + FusionLogitsProcessor fused, logitfuse's engine base alone and fused, at 1, 8 and 16 concurrent
requests. Both engines are driven offline (vLLM's `LLM`, `LogitFuse.generate`): no HTTP on either side.

    .venv-vllm/bin/python bench/vllm.py [--config configs/default.yaml] [--base models/base-large]
        [--ensemble large-qa] [--tokens 32] [--concurrency 1 8 16] [--repeats 3] [--out bench/results/vllm.json]
        [--overlap] [--skip-engine] [--shapes gpu] [--dtype float32] [--no-async-scheduling] [--cuda-graphs]

    # the Gemma-3-270M base with the SmolLM2 LoRA pair (another tokenizer), overlap off and on:
    .venv-vllm/bin/python bench/vllm.py --config configs/real.yaml --base models/real/gemma-3-270m \
        --ensemble gemma-qa-proxy --overlap --skip-engine --out bench/results/vllm-gemma-overlap.json

Columns: tok/s = generated tokens per second over all requests (ignore_eos: every request generates --tokens);
fused/base = fused tok/s over base-alone tok/s of the same engine in the same round; each as the median (min-max)
over the rounds; /floor = that median over floor = P_base / (P_base + P_experts), the ratio expected when
decoding is bound by reading the weights. --overlap starts one vLLM per setting of LOGITFUSE_VLLM_OVERLAP (0, then
1; each engine reads it at start), one after the other, and checks that both give the same fused tokens.
--shapes gpu writes random-weight checkpoints of GPU shapes (bench/shapes.py: a 1.1B Llama base, 110M experts,
with the embedded family's tokenizer) to a temporary folder and runs on them (`check`: the same at toy sizes).
vLLM runs eager (--enforce-eager) unless --cuda-graphs; its "base alone" requests pass through the processor
untouched.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from statistics import median

# run as a script, this file's folder comes first on the path and its name would shadow the vllm package
sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
ROOT = Path(__file__).resolve().parent.parent
QUESTIONS = ROOT / "models" / "data" / "eval_qa.jsonl"
ENV_OVERLAP = "LOGITFUSE_VLLM_OVERLAP"
TOY = {"large": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                     num_key_value_heads=2),
       "small": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2)}


def questions(n: int) -> list[str]:
    lines = QUESTIONS.read_text().splitlines()
    return [json.loads(lines[i % len(lines)])["prompt"] for i in range(n)]


def run_vllm(llm, ids: list[list[int]], ensemble: str | None, tokens: int) -> tuple[float, int, list]:
    from vllm import SamplingParams

    sp = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True,
                        extra_args={"ensemble": ensemble} if ensemble else None)
    t0 = time.perf_counter()
    out = llm.generate([{"prompt_token_ids": p} for p in ids], sp, use_tqdm=False)
    seconds = time.perf_counter() - t0
    return seconds, sum(len(o.outputs[0].token_ids) for o in out), [list(o.outputs[0].token_ids) for o in out]


def run_ours(lf, ids: list[list[int]], model: str, tokens: int) -> tuple[float, int, list]:
    from logitfuse import SamplingParams

    t0 = time.perf_counter()
    out = lf.generate(model, ids, SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True))
    return time.perf_counter() - t0, sum(len(o.token_ids) for o in out), [o.token_ids for o in out]


def write_shapes(folder: Path, shapes: str, dtype: str) -> tuple[Path, Path, str]:
    """Random-weight Llama checkpoints (base-large; base-small and tuned-small-qa, the expert pair) with the
    embedded family's tokenizer, and a registry over them: (registry, base folder, ensemble)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    sys.path.insert(0, str(ROOT))
    from bench.shapes import SHAPES

    sizes = SHAPES if shapes == "gpu" else TOY
    source = ROOT / "models" / "base-large"
    vocab = json.loads((source / "config.json").read_text())["vocab_size"]
    roles = {"base-large": "large", "base-small": "small", "tuned-small-qa": "small"}
    device = "cuda" if torch.cuda.is_available() else "cpu"
    for i, (name, shape) in enumerate(roles.items()):
        torch.manual_seed(i)
        cfg = LlamaConfig(vocab_size=vocab, max_position_embeddings=4096, bos_token_id=1, eos_token_id=2,
                          pad_token_id=0, tie_word_embeddings=False, **sizes[shape])
        with torch.device(device):
            model = LlamaForCausalLM(cfg)
        model.to(getattr(torch, dtype)).save_pretrained(folder / name)
        del model
        free_cuda()
        for f in source.iterdir():
            if f.name not in ("config.json", "model.safetensors"):
                shutil.copy(f, folder / name / f.name)
    registry = folder / "registry.yaml"
    registry.write_text("models:\n" + "".join(
        f"  {n}: {{path: {folder / n}, dtype: {dtype}, chat_template: true}}\n" for n in roles)
        + "experts:\n  qa: {tuned: tuned-small-qa, untuned: base-small}\n"
        + "ensembles:\n  large-qa: {base: base-large, method: proxy, experts: [qa], alpha: 1.0}\n"
        + "server: {memory_budget_mb: 65536, max_batch: 64}\n")
    return registry, folder / "base-large", "large-qa"


def free_cuda() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def start_llm(args, overlap: str | None):
    """One vLLM engine; LOGITFUSE_VLLM_OVERLAP as given (None: the environment's), read by its processor at start."""
    from vllm import LLM

    before = os.environ.get(ENV_OVERLAP)
    if overlap is not None:
        os.environ[ENV_OVERLAP] = overlap
    try:
        extra = {} if args.async_scheduling else {"async_scheduling": False}
        return LLM(args.base, dtype=args.dtype, enforce_eager=not args.cuda_graphs, max_model_len=args.max_model_len,
                   seed=0, max_num_seqs=32, logits_processors=["logitfuse.vllm:FusionLogitsProcessor"], **extra)
    finally:
        if before is None:
            os.environ.pop(ENV_OVERLAP, None)
        else:
            os.environ[ENV_OVERLAP] = before


def stop_llm(llm) -> None:
    """Stop an offline LLM's engine process (vLLM's client of it), so that the next LLM has the cores."""
    front = llm.llm_engine  # vLLM's own engine front end (not logitfuse's engine)
    front.engine_core.shutdown()
    del llm, front
    gc.collect()


def spread(xs: list[float], digits: int) -> str:
    return f"{median(xs):.{digits}f} ({min(xs):.{digits}f}-{max(xs):.{digits}f})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(ROOT / "configs" / "default.yaml"))
    ap.add_argument("--base", default=str(ROOT / "models" / "base-large"), help="the folder vLLM serves")
    ap.add_argument("--ensemble", default="large-qa")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 16])
    ap.add_argument("--repeats", type=int, default=3, help="rounds of the runs; median (min-max) reported")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "vllm.json"))
    ap.add_argument("--overlap", action="store_true",
                    help=f"two vLLM engines, {ENV_OVERLAP}=0 then =1, one after the other")
    ap.add_argument("--skip-engine", action="store_true", help="vLLM only (no logitfuse engine rows)")
    ap.add_argument("--shapes", choices=["gpu", "check"], help="random-weight checkpoints of these shapes")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--max-model-len", type=int, default=512)
    ap.add_argument("--no-async-scheduling", dest="async_scheduling", action="store_false",
                    help="vLLM's synchronous scheduling (the overlap needs it on a GPU; the CPU build has only it)")
    ap.add_argument("--cuda-graphs", action="store_true", help="let vLLM capture CUDA graphs (default: eager)")
    args = ap.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")  # the V1 processor (the V2 one has no overlap)
    scratch = None
    if args.shapes:
        scratch = tempfile.TemporaryDirectory(prefix="vllm-shapes-")
        registry, base, args.ensemble = write_shapes(Path(scratch.name), args.shapes, args.dtype)
        args.config, args.base = str(registry), str(base)
    os.environ["LOGITFUSE_CONFIG"] = args.config
    os.environ.setdefault("LOGITFUSE_ENSEMBLES", args.ensemble)  # the processor loads only this one's models

    from logitfuse import LogitFuse

    lf = LogitFuse(args.config)
    plan = lf.plan(args.ensemble)
    params = {m: lf.model(m).param_bytes() for m in plan.models()}
    floor = params[plan.base] / sum(params.values())
    tok = lf.model(plan.base).tokenizer
    ids = {n: [list(tok(q).input_ids) for q in questions(n)] for n in args.concurrency}
    if args.skip_engine:  # its models leave this process (and the GPU) before vLLM's engine starts
        del lf
        gc.collect()
        lf = None
        free_cuda()
    settings = ["0", "1"] if args.overlap else [None]
    rates: dict[tuple[str, str, str, int], list[float]] = {}
    ratios: dict[tuple[str, str, int], list[float]] = {}
    tokens_of: dict[tuple[str, int], list] = {}
    for setting in settings:
        llm = start_llm(args, setting)
        label = {"0": "off", "1": "on", None: os.environ.get(ENV_OVERLAP, "default")}[setting]
        for n in args.concurrency:
            batch = ids[n]
            run_vllm(llm, batch[:2], args.ensemble, 2)  # warm-up
            runs = [("vllm", "base", lambda b=batch, e=llm: run_vllm(e, b, None, args.tokens)),
                    ("vllm", "fused", lambda b=batch, e=llm: run_vllm(e, b, args.ensemble, args.tokens))]
            if lf is not None and setting == settings[0]:
                run_ours(lf, batch[:2], args.ensemble, 2)
                runs += [("logitfuse", "base", lambda b=batch: run_ours(lf, b, plan.base, args.tokens)),
                         ("logitfuse", "fused", lambda b=batch: run_ours(lf, b, args.ensemble, args.tokens))]
            for _ in range(args.repeats):  # rounds close in time, so that load from elsewhere hits the runs alike
                got = {}
                for engine, mode, fn in runs:
                    seconds, total, out = fn()
                    lab = label if engine == "vllm" else "-"
                    rates.setdefault((engine, lab, mode, n), []).append(total / seconds)
                    got[engine, mode] = total / seconds
                    if engine == "vllm" and mode == "fused":
                        tokens_of[label, n] = out
                for engine in {e for e, _ in got}:
                    lab = label if engine == "vllm" else "-"
                    ratios.setdefault((engine, lab, n), []).append(got[engine, "fused"] / got[engine, "base"])
        stop_llm(llm)
    rows = []
    for (engine, lab, n), r in ratios.items():
        base, fused = rates[engine, lab, "base", n], rates[engine, lab, "fused", n]
        rows.append({"engine": engine, "overlap": lab, "concurrency": n, "base_tok_s": median(base),
                     "fused_tok_s": median(fused), "fused_over_base": median(r), "of_floor": median(r) / floor,
                     "rounds": {"base": base, "fused": fused, "fused_over_base": r}})
    rows.sort(key=lambda r: (r["engine"] != "vllm", r["overlap"], r["concurrency"]))
    same = None
    if args.overlap:
        same = {n: tokens_of["off", n] == tokens_of["on", n] for n in args.concurrency}
    print(f"ensemble {args.ensemble} ({plan.method}), {args.tokens} tokens per request, {args.repeats} rounds, "
          f"floor {floor:.2f}; median (min-max)")
    print(f"{'engine':<10} {'overlap':<8} {'conc':>4} {'base tok/s':>22} {'fused tok/s':>22} {'fused/base':>19} "
          f"{'/floor':>6}")
    for r in rows:
        rd = r["rounds"]
        print(f"{r['engine']:<10} {r['overlap']:<8} {r['concurrency']:>4} {spread(rd['base'], 1):>22} "
              f"{spread(rd['fused'], 1):>22} {spread(rd['fused_over_base'], 2):>19} {r['of_floor']:>6.2f}")
    if same is not None:
        print(f"fused tokens, overlap on = off: {same}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"ensemble": args.ensemble, "method": plan.method, "tokens": args.tokens,
                               "repeats": args.repeats, "shapes": args.shapes, "dtype": args.dtype,
                               "async_scheduling": args.async_scheduling, "cuda_graphs": args.cuda_graphs,
                               "floor": floor, "params": params, "same_tokens": same, "rows": rows}, indent=2))
    print(f"wrote {out}")
    if scratch is not None:
        scratch.cleanup()


if __name__ == "__main__":
    main()

"""Fusion inside vLLM against logitfuse's own engine, side by side in one run on the same models: vLLM's base
alone, vLLM + FusionLogitsProcessor fused, logitfuse's engine base alone and fused, at 1, 8 and 16 concurrent
requests. Both engines are driven offline (vLLM's `LLM`, `LogitFuse.generate`): no HTTP on either side.

    .venv-vllm/bin/python bench/vllm.py [--config configs/default.yaml] [--base models/base-large]
        [--ensemble large-qa] [--tokens 32] [--concurrency 1 8 16] [--repeats 3] [--out bench/results/vllm.json]

Columns: tok/s = generated tokens per second over all requests, the median over rounds (ignore_eos: every
request generates --tokens); x base = fused tok/s over base-alone tok/s of the same engine at the same
concurrency; floor = P_base / (P_base + P_experts), the ratio expected when decoding is memory-bound. vLLM
runs in float32 and eager (--enforce-eager) here; its "base alone" requests pass through the processor
untouched.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from statistics import median

# run as a script, this file's folder comes first on the path and its name would shadow the vllm package
sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
ROOT = Path(__file__).resolve().parent.parent
QUESTIONS = ROOT / "models" / "data" / "eval_qa.jsonl"


def questions(n: int) -> list[str]:
    lines = QUESTIONS.read_text().splitlines()
    return [json.loads(lines[i % len(lines)])["prompt"] for i in range(n)]


def run_vllm(llm, ids: list[list[int]], ensemble: str | None, tokens: int) -> tuple[float, int]:
    from vllm import SamplingParams

    sp = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True,
                        extra_args={"ensemble": ensemble} if ensemble else None)
    t0 = time.perf_counter()
    out = llm.generate([{"prompt_token_ids": p} for p in ids], sp, use_tqdm=False)
    return time.perf_counter() - t0, sum(len(o.outputs[0].token_ids) for o in out)


def run_ours(lf, ids: list[list[int]], model: str, tokens: int) -> tuple[float, int]:
    from logitfuse import SamplingParams

    t0 = time.perf_counter()
    out = lf.generate(model, ids, SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True))
    return time.perf_counter() - t0, sum(len(o.token_ids) for o in out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(ROOT / "configs" / "default.yaml"))
    ap.add_argument("--base", default=str(ROOT / "models" / "base-large"), help="the folder vLLM serves")
    ap.add_argument("--ensemble", default="large-qa")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 16])
    ap.add_argument("--repeats", type=int, default=3, help="rounds of the four runs; the median is reported")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "vllm.json"))
    args = ap.parse_args()
    os.environ["LOGITFUSE_CONFIG"] = args.config
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

    from vllm import LLM

    from logitfuse import LogitFuse

    lf = LogitFuse(args.config)
    plan = lf.plan(args.ensemble)
    params = {m: lf.model(m).param_bytes() for m in plan.models()}
    floor = params[plan.base] / sum(params.values())
    tok = lf.model(plan.base).tokenizer
    llm = LLM(args.base, dtype="float32", enforce_eager=True, max_model_len=512, seed=0, max_num_seqs=32,
              logits_processors=["logitfuse.vllm:FusionLogitsProcessor"])
    rows = []
    for n in args.concurrency:
        ids = [list(tok(q).input_ids) for q in questions(n)]
        run_vllm(llm, ids[:2], args.ensemble, 2)  # warm-up
        run_ours(lf, ids[:2], args.ensemble, 2)
        runs = [
            ("vllm", "base", lambda ids=ids: run_vllm(llm, ids, None, args.tokens)),
            ("vllm", "fused", lambda ids=ids: run_vllm(llm, ids, args.ensemble, args.tokens)),
            ("logitfuse", "base", lambda ids=ids: run_ours(lf, ids, plan.base, args.tokens)),
            ("logitfuse", "fused", lambda ids=ids: run_ours(lf, ids, args.ensemble, args.tokens)),
        ]
        rates: dict[tuple[str, str], list[float]] = {}
        for _ in range(args.repeats):  # rounds close in time, so that load from elsewhere hits all four alike
            for engine, mode, fn in runs:
                seconds, total = fn()
                rates.setdefault((engine, mode), []).append(total / seconds)
        for (engine, mode), r in rates.items():
            rows.append({"engine": engine, "mode": mode, "concurrency": n, "tok_s": median(r), "rounds": r})
    by = {(r["engine"], r["mode"], r["concurrency"]): r["tok_s"] for r in rows}
    for r in rows:
        r["x_base"] = r["tok_s"] / by[(r["engine"], "base", r["concurrency"])]
    print(f"ensemble {args.ensemble} ({plan.method}), {args.tokens} tokens per request, floor {floor:.2f}")
    print(f"{'engine':<10} {'mode':<6} {'conc':>4} {'tok/s':>8} {'x base':>7}")
    for r in rows:
        print(f"{r['engine']:<10} {r['mode']:<6} {r['concurrency']:>4} {r['tok_s']:>8.1f} {r['x_base']:>7.2f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"ensemble": args.ensemble, "method": plan.method, "tokens": args.tokens,
                               "repeats": args.repeats,
                               "floor": floor, "params": params, "rows": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

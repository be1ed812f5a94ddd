"""Throughput of fused decoding: ours (continuous batching) vs a naive per-request loop vs base-only,
and speculative EFT vs plain EFT. All numbers of one table come from one run, side by side.

    .venv/bin/python bench/throughput.py [--config configs/default.yaml] [--tokens 32] [--concurrency 1 8 16 32]
    .venv/bin/python bench/throughput.py --shapes gpu    # 1B-class base, 100M-class experts, random weights

Columns: tok/s = generated tokens per second over all requests; ms/tok = per-token latency of one request
(wall time / tokens per request); x naive = ours / the naive loop at the same method; x base = fused
time per step / base-only time per step at the same concurrency; floor = (P_base + sum P_experts) / P_base,
the ratio expected when decoding is memory-bound.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script: import bench.* siblings
import argparse
import json
import time

import torch

from logitfuse import LogitFuse, SamplingParams

ROOT = Path(__file__).resolve().parent.parent
METHODS = [("base-only", "base-large", None), ("proxy", "large-qa", None), ("eft", "large-eft", None),
           ("eft-2experts", "large-mix", None), ("dlf-2experts", "large-dlf", None)]
PROMPTS = ["<|user|> what is the capital of {} ? <|assistant|>", "tell me about {} .", "the founder of {} was"]
NAMES = ["bavomir", "kelun", "sodaraz", "timapo", "verunak", "zolipan", "gurasen", "mekovi"]


def prompts(n: int) -> list[str]:
    return [PROMPTS[i % 3].format(NAMES[i % len(NAMES)]) for i in range(n)]


def timed(fn) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def ours(lf: LogitFuse, model: str, fusion, n: int, tokens: int) -> dict:
    sp = SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True)
    lf.generate(model, prompts(min(n, 2)), SamplingParams(max_tokens=2, temperature=0))  # warm-up
    dt, outs = timed(lambda: lf.generate(model, prompts(n), sp, fusion))
    total = sum(len(o.token_ids) for o in outs)
    return {"tok_s": total / dt, "ms_tok": 1000 * dt / tokens, "seconds": dt}


def naive(lf: LogitFuse, model: str, fusion, n: int, tokens: int) -> dict:
    from bench.naive import naive_generate

    plan = lf.registry.plan(model, fusion)
    hf = {name: lf.pool.get(name).model for name in plan.models()}
    tok = lf.pool.get(plan.base).tokenizer
    ids = [tok(p).input_ids for p in prompts(n)]
    dt, outs = timed(lambda: [naive_generate(hf, plan, p, tokens) for p in ids])
    return {"tok_s": sum(map(len, outs)) / dt, "ms_tok": 1000 * dt / (tokens * n), "seconds": dt}


def param_floor(lf: LogitFuse, model: str) -> float:
    plan = lf.registry.plan(model)
    size = {n: sum(p.numel() for p in lf.pool.get(n).model.parameters()) for n in plan.models()}
    return sum(size.values()) / size[plan.base]


def table(lf: LogitFuse, concurrency: list[int], tokens: int, naive_n: int) -> list[dict]:
    rows = []
    for c in concurrency:
        base = None
        for label, model, fusion in METHODS:
            if model not in lf.registry.names():
                continue
            r = ours(lf, model, fusion, c, tokens) | {"method": label, "concurrency": c}
            base = base or r
            r["x_base"] = r["seconds"] / base["seconds"]
            r["floor"] = param_floor(lf, model)
            r["x_naive"] = r["tok_s"] / naive(lf, model, fusion, naive_n, tokens)["tok_s"]
            rows.append(r)
            print(f"{label:14s} {c:4d} {r['tok_s']:9.1f} {r['ms_tok']:8.2f} {r['x_naive']:8.2f} "
                  f"{r['x_base']:7.2f} {r['floor']:6.2f}", flush=True)
    return rows


def speculative(lf: LogitFuse, tokens: int, ks: list[int], batch: int) -> list[dict]:
    from logitfuse.speculative import SpeculativeEFT

    sp = SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True)
    ps = prompts(batch)
    reqs = lambda: [r for p in ps for r in lf.requests("large-eft", p, sp)]  # noqa: E731
    plain_t, plain = timed(lambda: lf.generate("large-eft", ps, sp))
    out = []
    for k in ks:
        spec = SpeculativeEFT(lf, k=k)
        dt, res = timed(lambda spec=spec: spec.generate(reqs()))
        same = [o.token_ids for o in res] == [o.token_ids for o in plain]
        out.append({"k": k, "batch": batch, "speedup": plain_t / dt, "acceptance": spec.stats.acceptance,
                    "same_tokens": same})
        print(f"k={k} batch={batch}: speed-up {plain_t / dt:5.2f}x  acceptance {spec.stats.acceptance:.2f}  "
              f"greedy tokens identical: {same}", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(ROOT / "configs" / "default.yaml"))
    ap.add_argument("--shapes", choices=["family", "gpu"], default="family")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 16, 32])
    ap.add_argument("--naive-requests", type=int, default=4, help="requests the naive loop runs (sequentially)")
    ap.add_argument("--spec-k", type=int, nargs="+", default=[2, 4, 6])
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "throughput.json"))
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    if args.shapes == "gpu":
        from bench.shapes import gpu_family

        lf = gpu_family()
    else:
        lf = LogitFuse(args.config)
    print(f"{'method':14s} {'conc':>4s} {'tok/s':>9s} {'ms/tok':>8s} {'x naive':>8s} {'x base':>7s} {'floor':>6s}")
    report = {"device": str(lf.pool.get(lf.registry.plan("large-qa").base).device), "tokens": args.tokens,
              "table": table(lf, args.concurrency, args.tokens, args.naive_requests)}
    report["speculative"] = [r for b in (1, 8) for r in speculative(lf, args.tokens * 2, args.spec_k, b)]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

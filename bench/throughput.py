"""Throughput of fused decoding: ours (continuous batching) vs a naive per-request loop vs base-only,
speculative EFT vs plain EFT, and (--compile) torch.compile'd vs eager forward passes. All numbers of one
table come from one run, side by side: ratios within a round of runs close in time, medians over rounds.

    .venv/bin/python bench/throughput.py [--config configs/default.yaml] [--tokens 32] [--concurrency 1 8 16 32]
        [--repeats 3] [--spec-k 2 4] [--spec-min-prob 0 0.6 0.9] [--compile] [--skip table|speculative]
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
from statistics import median

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

    plan = lf.plan(model, fusion)
    hf = {name: lf.model(name).model for name in plan.models()}
    tok = lf.model(plan.base).tokenizer
    ids = [tok(p).input_ids for p in prompts(n)]
    dt, outs = timed(lambda: [naive_generate(hf, plan, p, tokens) for p in ids])
    return {"tok_s": sum(map(len, outs)) / dt, "ms_tok": 1000 * dt / (tokens * n), "seconds": dt}


def param_floor(lf: LogitFuse, model: str) -> float:
    plan = lf.plan(model)
    size = {n: sum(p.numel() for p in lf.model(n).model.parameters()) for n in plan.models()}
    return sum(size.values()) / size[plan.base]


def table(lf: LogitFuse, concurrency: list[int], tokens: int, naive_n: int, repeats: int = 3) -> list[dict]:
    """Every method at each concurrency, `repeats` rounds over all methods (ours, then the naive loop, per
    method): ratios are taken within a round, between runs close in time, and the median over rounds is
    reported (single runs on a shared machine drift by tens of percent)."""
    rows = []
    methods = [(label, model, fusion) for label, model, fusion in METHODS if model in lf.names()]
    for c in concurrency:
        runs: dict[str, list[tuple[dict, dict]]] = {label: [] for label, _, _ in methods}
        for _ in range(repeats):
            for label, model, fusion in methods:
                runs[label].append((ours(lf, model, fusion, c, tokens), naive(lf, model, fusion, naive_n, tokens)))
        base = runs[methods[0][0]]
        for label, model, _ in methods:
            mine = runs[label]
            r = {"method": label, "concurrency": c, "repeats": repeats,
                 "tok_s": median(o["tok_s"] for o, _ in mine), "ms_tok": median(o["ms_tok"] for o, _ in mine),
                 "seconds": median(o["seconds"] for o, _ in mine),
                 "x_naive": median(o["tok_s"] / n["tok_s"] for o, n in mine),
                 "x_base": median(o["seconds"] / b["seconds"] for (o, _), (b, _) in zip(mine, base)),
                 "floor": param_floor(lf, model)}
            rows.append(r)
            print(f"{label:14s} {c:4d} {r['tok_s']:9.1f} {r['ms_tok']:8.2f} {r['x_naive']:8.2f} "
                  f"{r['x_base']:7.2f} {r['floor']:6.2f}", flush=True)
    return rows


def alpha_for(tokens_per_round: float, k: int) -> float | None:
    """The per-position acceptance rate a with E(a) = (1 - a^(k+1)) / (1 - a) tokens per k-draft round
    (the i.i.d. model of speculative decoding); None when beyond reach (E > k + 1)."""
    if tokens_per_round > k + 1:
        return None
    lo, hi = 0.0, 1.0
    for _ in range(50):
        a = (lo + hi) / 2
        lo, hi = (a, hi) if (1 - a ** (k + 1)) / (1 - a) < tokens_per_round else (lo, a)
    return hi


def spec_workloads(lf: LogitFuse, tokens: int) -> list[tuple[str, str, list[str], SamplingParams]]:
    """(label, ensemble, 8 prompts, sampling) for the speculative comparison: the family's describe skill
    (five-sentence answers about held-out entities, ending where the model ends them: the long answers
    speculation is for) and the qa expert forced past its one-word answers (ignore_eos, 2 x --tokens)."""
    out = []
    data = ROOT / "models" / "data" / "eval_describe.jsonl"
    if "large-desc" in lf.names() and data.exists():
        from bench.quality import load_set

        rows = load_set(data, 8)
        sp = SamplingParams(max_tokens=64, temperature=0)
        out.append(("describe", "large-desc", [r["prompt"] for r in rows], sp))
    out.append(("qa, continued", "large-eft", prompts(8),
                SamplingParams(max_tokens=2 * tokens, temperature=0, ignore_eos=True)))
    return out


def speculative(lf: LogitFuse, label: str, model: str, ps: list[str], sp: SamplingParams, ks: list[int],
                min_probs: list[float], batch: int, repeats: int = 3) -> list[dict]:
    """Speculative vs plain decoding of a one-expert EFT ensemble (the engine), greedy, the prompts in batches
    of `batch`; plain and speculative runs alternate and the speed-up is the median over the pairs. With
    min_draft_prob 0 every round drafts k tokens, which prices a round in plain steps and gives the acceptance
    rate a pair of models would need for 1.5x (acceptance is the models' property, not the code's)."""
    from logitfuse.api import SpeculativeEFT

    chunks = [ps[i:i + batch] for i in range(0, len(ps), batch)]
    plain_run = lambda: [lf.generate(model, c, sp) for c in chunks]  # noqa: E731
    plain = plain_run()  # warm-up, and the reference tokens
    steps = sum(max(len(o.token_ids) for o in c) for c in plain)  # plain decoding steps (first: prefill)
    out = []
    for k in ks:
        for min_prob in min_probs:
            spec = SpeculativeEFT(lf, k=k, min_draft_prob=min_prob)
            run = lambda spec=spec: [spec.generate([r for p in c for r in lf.requests(model, p, sp)])  # noqa: E731
                                     for c in chunks]
            pairs = [(timed(plain_run)[0], timed(run)) for _ in range(repeats)]
            ratios = sorted(p / s for p, (s, _) in pairs)
            same = all([o.token_ids for c in res for o in c] == [o.token_ids for c in plain for o in c]
                       for _, (_, res) in pairs)
            st = spec.stats
            row = {"workload": label, "k": k, "min_draft_prob": min_prob, "batch": batch,
                   "speedup": median(ratios), "speedups": ratios, "acceptance": st.acceptance,
                   "drafts_per_round": st.drafted / st.row_rounds, "tokens_per_round": st.tokens_per_row_round,
                   "tokens_per_request": sum(len(o.token_ids) for c in plain for o in c) / len(ps),
                   "same_tokens": same}
            line = (f"speculative, {label}: k={k} min_p={min_prob:.1f} batch={batch}: {row['speedup']:5.2f}x plain "
                    f"(pairs {', '.join(f'{r:.2f}' for r in ratios)})  acceptance {st.acceptance:.2f}  "
                    f"tokens/round {row['tokens_per_round']:.2f}  greedy identical: {same}")
            if min_prob == 0:  # every round drafts k: price a round, and the acceptance 1.5x would need
                plain_step = median(p for p, _ in pairs) / steps
                cost = (median(s for _, (s, _) in pairs) / (st.rounds / repeats)) / plain_step
                row |= {"round_cost_plain_steps": cost, "alpha": alpha_for(row["tokens_per_round"], k),
                        "alpha_for_1.5x": alpha_for(1.5 * cost, k)}
                need = row["alpha_for_1.5x"]
                line += (f"\n    a round costs {cost:.2f} plain steps; per-position acceptance {row['alpha']:.2f}, "
                         "1.5x needs " + (f"{need:.2f}" if need is not None else "more than k + 1 tokens a round"))
            out.append(row)
            print(line, flush=True)
    return out


def compiled(lf: LogitFuse, tokens: int, concurrency: list[int]) -> list[dict]:
    """Eager vs torch.compile'd forward passes (the registry's `compile: true`), same requests, one run.
    Each timing follows an identical untimed run, so compilation itself is not counted."""
    sp = SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True)
    cases = [(label, model) for label, model, _ in METHODS if label in ("base-only", "eft")]

    def measure() -> dict:
        out = {}
        for c in concurrency:
            for label, model in cases:
                lf.generate(model, prompts(c), sp)
                out[(label, c)] = timed(lambda m=model, c=c: lf.generate(m, prompts(c), sp))[0]
        return out

    eager = measure()
    for name in dict.fromkeys(n for _, m in cases for n in lf.plan(m).models()):
        lf.model(name).compile()
    t0 = time.perf_counter()
    comp = measure()
    rows = []
    for (label, c), t in eager.items():
        rows.append({"method": label, "concurrency": c, "eager_ms_step": 1000 * t / tokens,
                     "compiled_ms_step": 1000 * comp[(label, c)] / tokens, "speedup": t / comp[(label, c)]})
        print(f"compile {label:10s} {c:4d}  eager {rows[-1]['eager_ms_step']:6.2f} ms/step  compiled "
              f"{rows[-1]['compiled_ms_step']:6.2f} ms/step  {rows[-1]['speedup']:5.2f}x", flush=True)
    print(f"(compiling and the compiled runs took {time.perf_counter() - t0:.0f} s)")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(ROOT / "configs" / "default.yaml"))
    ap.add_argument("--shapes", choices=["family", "gpu"], default="family")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 16, 32])
    ap.add_argument("--naive-requests", type=int, default=4, help="requests the naive loop runs (sequentially)")
    ap.add_argument("--repeats", type=int, default=3, help="rounds of the table (medians of in-round ratios)")
    ap.add_argument("--spec-k", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--spec-min-prob", type=float, nargs="+", default=[0.0, 0.6, 0.9],
                    help="speculative: stop drafting below this draft-model top probability (0 = always k)")
    ap.add_argument("--compile", action="store_true", help="also time torch.compile'd models against eager ones")
    ap.add_argument("--skip", nargs="+", choices=["table", "speculative"], default=[],
                    help="leave sections out (e.g. --skip table: only the speculative comparison)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "throughput.json"))
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    if args.shapes == "gpu":
        from bench.shapes import gpu_family

        lf = gpu_family()
    else:
        lf = LogitFuse(args.config)
    report: dict = {"device": str(lf.model(lf.plan("large-qa").base).device), "tokens": args.tokens}
    if "table" not in args.skip:
        print(f"{'method':14s} {'conc':>4s} {'tok/s':>9s} {'ms/tok':>8s} {'x naive':>8s} {'x base':>7s} {'floor':>6s}")
        report["table"] = table(lf, args.concurrency, args.tokens, args.naive_requests, args.repeats)
    if "speculative" not in args.skip:
        report["speculative"] = [r for w in spec_workloads(lf, args.tokens) for b in (1, 8)
                                 for r in speculative(lf, *w, args.spec_k, args.spec_min_prob, b)]
    if args.compile:
        report["compile"] = compiled(lf, args.tokens, [1, 8])
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

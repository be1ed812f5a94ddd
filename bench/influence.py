"""What per-token influence (`fusion.influence`) costs: the same 16 concurrent requests decoded with it off and
on, alternating within each round (library facade, one process), for every method of the default family.

    .venv/bin/python bench/influence.py [--config configs/default.yaml] [--concurrency 16] [--tokens 32]
        [--rounds 5] [--models large-qa large-eft large-dlf large-eft-spec] [--out bench/results/influence.json]

Columns: ms/step = time / tokens per request (one step of the 16 rows), as wall time and as this process's
CPU time (the registry runs torch on one thread: CPU time is the work done, and other jobs on a shared
machine inflate it far less than the wall time); off and on give the median and the range over rounds;
overhead = median over rounds of (on / off - 1), each ratio taken within one round (the two runs side by
side), and, more robust to interference, min(on) / min(off) - 1.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from statistics import median

from logitfuse import LogitFuse, SamplingParams

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ["<|user|> what is the capital of {} ? <|assistant|>", "tell me about {} .", "the founder of {} was"]
NAMES = ["bavomir", "kelun", "sodaraz", "timapo", "verunak", "zolipan", "gurasen", "mekovi"]


def prompts(n: int) -> list[str]:
    return [PROMPTS[i % 3].format(NAMES[i % len(NAMES)]) for i in range(n)]


def step_ms(lf: LogitFuse, model: str, n: int, tokens: int, influence: bool) -> tuple[float, float]:
    """Milliseconds per decoding step of n requests generating `tokens` each: (wall, CPU)."""
    sp = SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True)
    t0, c0 = time.perf_counter(), time.process_time()
    outs = lf.generate(model, prompts(n), sp, {"influence": True} if influence else None)
    dt, dc = time.perf_counter() - t0, time.process_time() - c0
    assert all(len(o.token_ids) == tokens for o in outs)
    assert all((o.influence is not None) == influence for o in outs)
    return 1000 * dt / tokens, 1000 * dc / tokens


def measure(lf: LogitFuse, model: str, n: int, tokens: int, rounds: int) -> dict:
    step_ms(lf, model, n, 4, True)  # warm-up: models loaded, both paths run once
    runs: dict[bool, list[tuple[float, float]]] = {False: [], True: []}
    for r in range(rounds):
        for flag in (False, True) if r % 2 == 0 else (True, False):  # alternate which goes first
            runs[flag].append(step_ms(lf, model, n, tokens, flag))
    out = {}
    for k, clock in enumerate(("wall", "cpu")):
        off, on = [x[k] for x in runs[False]], [x[k] for x in runs[True]]
        ratios = [b / a - 1 for a, b in zip(off, on)]
        out[clock] = {"off_ms": off, "on_ms": on, "overhead": ratios, "overhead_median": median(ratios),
                      "overhead_of_min": min(on) / min(off) - 1}
    return out


def table(results: dict) -> str:
    head = (f"{'ensemble':<16} {'clock':<5} {'off ms/step':>22} {'on ms/step':>22} {'overhead':>22}"
            f" {'of min':>7}")
    lines = [head, "-" * len(head)]
    for model, r in results.items():
        for clock, c in r.items():
            span = lambda xs: f"{median(xs):7.2f} [{min(xs):.2f}-{max(xs):.2f}]"  # noqa: E731
            ov = c["overhead"]
            lines.append(f"{model:<16} {clock:<5} {span(c['off_ms']):>22} {span(c['on_ms']):>22} "
                         f"{100 * median(ov):+6.1f}% [{100 * min(ov):+.1f}, {100 * max(ov):+.1f}] "
                         f"{100 * c['overhead_of_min']:+6.1f}%")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default=str(ROOT / "configs/default.yaml"))
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--models", nargs="+", default=["large-qa", "large-eft", "large-dlf", "large-eft-spec"])
    ap.add_argument("--out", default=str(ROOT / "bench/results/influence.json"))
    args = ap.parse_args()
    lf = LogitFuse(args.config)
    results = {m: measure(lf, m, args.concurrency, args.tokens, args.rounds) for m in args.models}
    print(f"{args.concurrency} concurrent requests, {args.tokens} tokens each, {args.rounds} rounds "
          "(off and on side by side in each)")
    print(table(results))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"concurrency": args.concurrency, "tokens": args.tokens, "rounds": args.rounds,
                               "results": results}, indent=2))


if __name__ == "__main__":
    main()

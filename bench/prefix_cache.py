"""The prefix cache on shared-prefix workloads: requests with one long system prompt and a short question each
(a chat's earlier turns, multiple-choice scoring of one context), with the cache on and off, side by side in
one run (alternating rounds), and unique prompts as the control. Prints a table and writes JSON.

    .venv/bin/python bench/prefix_cache.py [--config configs/default.yaml] [--concurrency 1 8 16] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script

from logitfuse import LogitFuse, SamplingParams
from logitfuse.config.registry import Registry

ROOT = Path(__file__).resolve().parent.parent
WORDS = ("the old city of the north had two rivers and a blue king who ruled the east with the queen of "
         "the west , and every capital of that land was founded by a red founder in the first year").split()


def prompts(kind: str, n: int, words: int, round_: int, salt: str = "") -> list[str]:
    """n prompts of `words` words and a question. shared: one system prompt, the same in every round, and
    questions new in each round; unique: every prompt starts differently, in every round (nothing to reuse)."""
    system = " ".join(WORDS[i % len(WORDS)] for i in range(words))
    if kind == "shared":
        return [f"{system} <|user|> question {round_}-{i} : who founded it ? <|assistant|>" for i in range(n)]
    draw = random.Random(f"{salt}-{round_}-{n}")  # words the tokenizer knows, in an order no other prompt has
    return [f"{' '.join(draw.choices(WORDS, k=words))} <|user|> who founded it ? <|assistant|>" for _ in range(n)]


def timed(lf: LogitFuse, model: str, texts: list[str], tokens: int) -> float:
    sp = SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True)
    reqs = [r for t in texts for r in lf.requests(model, t, sp)]
    start = time.perf_counter()
    for _ in lf.stream(reqs):
        pass
    return len(reqs) * tokens / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(ROOT / "configs" / "default.yaml"))
    ap.add_argument("--models", nargs="+", default=["base-large", "large-qa"])
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 16])
    ap.add_argument("--words", type=int, default=200, help="words of the shared system prompt")
    ap.add_argument("--tokens", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "prefix_cache.json"))
    args = ap.parse_args()
    reg = Registry.load(args.config)
    on = LogitFuse(reg)
    off = LogitFuse(reg.model_copy(update={"server": reg.server.model_copy(update={"prefix_cache": False})}))
    rows = []
    print(f"{'model':12s} {'prompts':8s} {'conc':>4s} {'off tok/s':>10s} {'on tok/s':>9s} {'on/off (min-max)':>18s}")
    for model in args.models:
        for kind in ("shared", "unique"):
            for n in args.concurrency:
                warm = prompts(kind, 1, args.words, -n, model)
                timed(on, model, warm, 1), timed(off, model, warm, 1)  # warm-up (for shared: the system prompt)
                pairs = [(timed(off, model, prompts(kind, n, args.words, r, model), args.tokens),
                          timed(on, model, prompts(kind, n, args.words, r, model), args.tokens))
                         for r in range(args.rounds)]
                ratios = [b / a for a, b in pairs]
                row = {"model": model, "prompts": kind, "concurrency": n,
                       "off_tok_s": statistics.median(a for a, _ in pairs),
                       "on_tok_s": statistics.median(b for _, b in pairs),
                       "ratio": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios)}
                rows.append(row)
                print(f"{model:12s} {kind:8s} {n:4d} {row['off_tok_s']:10.1f} {row['on_tok_s']:9.1f} "
                      f"{row['ratio']:8.2f} ({row['ratio_min']:.2f}-{row['ratio_max']:.2f})")
    stats = on.stats()
    print(f"prefix cache: {stats.prefix_hit} of {stats.prefix_queried} prompt tokens reused, "
          f"{stats.prefix_bytes / 2**20:.1f} MiB held")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

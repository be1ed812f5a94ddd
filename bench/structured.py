"""Structured outputs on the embedded family: what the grammar mask costs per fused decoding step, and how
often sampled answers follow the format with and without the constraint.

1. Per-step cost: the same requests (arith prompts, max_tokens fixed, every row running to the end) decoded
   with and without a grammar, at 1 and 16 concurrent requests, measured side by side and interleaved
   (median of --reps runs each); also the grammar engine's own time per row and step (mask + advance).
2. Format share: arith questions answered at temperature 1 by base-large and a fused ensemble; an output is
   valid when it is exactly one number word (the family's answer format). The family's vocabulary has no
   `{` or `"`, so a JSON object cannot be spelt by these models; the answer format is the schema here.

    .venv/bin/python bench/structured.py [--config configs/default.yaml] [--reps 3] [--questions 80]
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import time
from pathlib import Path

from logitfuse import LogitFuse, SamplingParams
from logitfuse.engine import grammar
from logitfuse.engine.request import StructuredSpec

ROOT = Path(__file__).resolve().parent.parent
NUMBERS = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
           "seventeen eighteen nineteen twenty").split()
ANSWER = " ?(" + "|".join(NUMBERS) + ")"  # the answer format: one number word (a leading space is a word start)
LONG = "[^<>|]{400}"  # a grammar no row can finish within max_tokens: every row decodes every step


def questions(limit: int) -> list[dict]:
    rows = [json.loads(line) for line in (ROOT / "models/data/eval_arith.jsonl").read_text().splitlines()]
    return rows[:limit]


def seconds_per_step(lf: LogitFuse, model: str, prompts: list[str], sp: SamplingParams) -> float:
    reqs = [r for p in prompts for r in lf.requests(model, p, sp)]
    for r in reqs:
        lf.submit(r)
    steps, start = 0, time.perf_counter()
    while lf.has_work():
        lf.step()
        steps += 1
    return (time.perf_counter() - start) / max(steps, 1)


def step_cost(lf: LogitFuse, model: str, prompts: list[str], concurrency: int, reps: int, tokens: int) -> dict:
    batch = (prompts * concurrency)[:concurrency]
    plain = SamplingParams(max_tokens=tokens, temperature=1.0, seed=1, ignore_eos=True)
    constrained = SamplingParams(max_tokens=tokens, temperature=1.0, seed=1, structured=StructuredSpec("regex", LONG))
    seconds_per_step(lf, model, batch, constrained)  # compile and warm up once
    times: dict[str, list[float]] = {"plain": [], "grammar": []}
    for _ in range(reps):
        for name, sp in (("plain", plain), ("grammar", constrained)):
            times[name].append(seconds_per_step(lf, model, batch, sp))
    p, g = statistics.median(times["plain"]), statistics.median(times["grammar"])
    return {"model": model, "concurrency": concurrency, "ms_per_step_plain": 1e3 * p,
            "ms_per_step_grammar": 1e3 * g, "ratio": g / p}


def mask_alone(lf: LogitFuse, model: str, steps: int = 60) -> float:
    """Microseconds of the grammar engine per row and step: the next mask, then advancing by one token."""
    tok = lf.model(lf.plan(model).base).tokenizer
    width = lf.alignment(lf.plan(model)).width
    m = grammar.compile_spec(StructuredSpec("regex", LONG), tok, width)
    some = tok.encode(" what is nine plus zero", add_special_tokens=False)
    start = time.perf_counter()
    for i in range(steps):
        mask = grammar.next_mask(m)
        assert mask.any()
        grammar.advance(m, some[i % len(some)])
    return 1e6 * (time.perf_counter() - start) / steps


def format_share(lf: LogitFuse, model: str, rows: list[dict], seed: int) -> dict:
    out = {}
    for name, spec in (("free", None), ("constrained", StructuredSpec("regex", ANSWER))):
        sp = SamplingParams(max_tokens=8, temperature=1.0, seed=seed, structured=spec)
        texts = [o.text for o in lf.generate(model, [r["prompt"] for r in rows], sp)]
        valid = [bool(re.fullmatch(ANSWER, t)) for t in texts]
        right = [t.strip() == r["answer"] for t, r in zip(texts, rows)]
        out[name] = {"valid": sum(valid) / len(rows), "correct": sum(right) / len(rows)}
    return {"model": model, "questions": len(rows), **out}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(ROOT / "configs/default.yaml"))
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=24)
    ap.add_argument("--questions", type=int, default=80)
    ap.add_argument("--models", nargs="+", default=["base-large", "large-mix"])
    ap.add_argument("--out", default=str(ROOT / "bench/results/structured.json"))
    args = ap.parse_args()
    lf = LogitFuse(args.config)
    rows = questions(args.questions)
    prompts = [r["prompt"] for r in rows]
    cost = [step_cost(lf, m, prompts, c, args.reps, args.tokens) for m in args.models for c in (1, 16)]
    alone = {m: mask_alone(lf, m) for m in args.models}
    share = [format_share(lf, m, rows, seed=3) for m in args.models]

    print("\nper-step cost of the grammar mask (median of", args.reps, "interleaved runs)")
    print("| model | concurrent | ms/step plain | ms/step grammar | ratio | grammar engine µs/row/step |")
    print("| --- | --- | --- | --- | --- | --- |")
    for c in cost:
        print(f"| {c['model']} | {c['concurrency']} | {c['ms_per_step_plain']:.2f} | {c['ms_per_step_grammar']:.2f} "
              f"| {c['ratio']:.3f} | {alone[c['model']]:.0f} |")
    print("\nanswer format at temperature 1 (one number word), arith questions")
    print("| model | questions | valid free | valid constrained | correct free | correct constrained |")
    print("| --- | --- | --- | --- | --- | --- |")
    for s in share:
        print(f"| {s['model']} | {s['questions']} | {s['free']['valid']:.3f} | {s['constrained']['valid']:.3f} "
              f"| {s['free']['correct']:.3f} | {s['constrained']['correct']:.3f} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"step_cost": cost, "grammar_engine_us": alone, "format": share}, indent=2))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()

"""Fusion on real checkpoints (configs/real.yaml): quality on held-out questions and speed, from one run.

    .venv/bin/python bench/real.py [--config configs/real.yaml] [--limit N] [--skip quality|speed]

Quality: every held-out question (models/adapters/data/heldout.jsonl, facts never tuned on, half of them in
a phrasing tuning never used), greedy, up to --max-tokens tokens. exact = the answer alone, then a stop;
knows = the answer appears in the output (knowledge whatever the form); gap = (exact - base) / (reference
- base), the share of the tuning gain that fusion recovers (reference: tuned-large over Gemma, the tuned
small model over SmolLM2); knows / base's = a system's knowledge score over its base's. Every figure comes
with its 95% paired bootstrap interval (2,000 resamples of the questions, the same for every system). Then
the loss analysis: the questions whose answer the base's output holds and a fused output does not, sorted
by what the fused model said instead (every output is kept in the JSON, per question).

Speed: generated tokens/s of the fused ensembles and their base alone at 1 and 8 concurrent requests (medians
over rounds, side by side; fixed-length answers, special tokens banned), and one decoding step split into the
models' passes, vocabulary alignment, the fusion function and DLF's weight search at 49,152 and 262,144
tokens; floor = the base's pass over all passes of a step (the fused/base ratio if nothing but the forwards
cost), "of floor" = fused/base over it. Writes bench/results/real.json.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import argparse
import json
import time
from statistics import median

import torch

from logitfuse import LogitFuse, SamplingParams
from logitfuse.methods import dlf
from logitfuse.ops import fusion
from logitfuse.ops.weights import make_grid, solve_dlf
from logitfuse.training.real.qa import exact_match, knows, normalise, read_jsonl
from logitfuse.training.real.stats import gap_closed, mean_of, paired_bootstrap, ratio

ROOT = Path(__file__).resolve().parent.parent
HELD_OUT = ROOT / "models" / "adapters" / "data" / "heldout.jsonl"
# (row label, ensemble or model, setting); "tuned-large" is the adapter trained on the large base itself
SYSTEMS = [("base alone", "smollm2", "smollm2"), ("tuned small", "smollm2-qa", "smollm2"),
           ("DLF (identity)", "smollm2-qa-dlf", "smollm2"),
           ("base alone", "gemma-270m", "gemma"), ("proxy", "gemma-qa-proxy", "gemma"),
           ("EFT", "gemma-qa-eft", "gemma"), ("DLF", "gemma-qa-dlf", "gemma"), ("tuned-large", "gemma-tuned", "gemma")]
BASE = {"smollm2": "smollm2", "gemma": "gemma-270m"}
REFERENCE = {"smollm2": "smollm2-qa", "gemma": "gemma-tuned"}  # tuned small over itself; the adapter on Gemma
PAIR = "smollm2-qa"  # the small pair's own answers (the tuned small model)
SUPPORT = 1024  # DLF's reduced search: the union of each model's top-1024 tokens plus one rest token
SPEED = [("smollm2", "smollm2", "smollm2-qa"), ("gemma", "gemma-270m", "gemma-qa-proxy")]


def messages(qa) -> list[dict]:
    return [{"role": "user", "content": qa.prompt}]


def answers(lf: LogitFuse, model: str, questions: list, max_tokens: int, batch: int = 16) -> list[tuple[str, str]]:
    """(text, finish_reason) per question, greedy, `batch` questions decoded together."""
    sp = SamplingParams(max_tokens=max_tokens, temperature=0)
    out = []
    for i in range(0, len(questions), batch):
        reqs = [lf.requests(model, messages=messages(q), sampling=sp)[0] for q in questions[i:i + batch]]
        text, reason = {r.rid: "" for r in reqs}, {}
        for ev in lf.stream(reqs):
            text[ev.rid] += ev.text
            if ev.finish_reason:
                reason[ev.rid] = ev.finish_reason
        out += [(text[r.rid], reason.get(r.rid, "?")) for r in reqs]
    return out


def quality(lf: LogitFuse, questions: list, max_tokens: int) -> tuple[list[dict], dict]:
    """Per system: exact, knows and exact on unseen phrasings, each with its paired 95% bootstrap interval; the
    gap closed per system and the knowledge ratios (fused over its base, tuned small over untuned small)."""
    rows, scores, outputs = [], {}, {}
    for label, model, setting in SYSTEMS:
        t0 = time.perf_counter()
        got = answers(lf, model, questions, max_tokens)
        outputs[model] = got
        scores[f"{model}:exact"] = [float(exact_match(t, q.answer, r == "stop")) for (t, r), q in zip(got, questions)]
        scores[f"{model}:knows"] = [float(knows(t, q.answer)) for (t, _), q in zip(got, questions)]
        rows.append({"system": label, "model": model, "setting": setting,
                     "seconds": round(time.perf_counter() - t0, 1),
                     "examples": [{"q": q.question, "answer": q.answer, "output": t, "finish": r}
                                  for (t, r), q in list(zip(got, questions))[:6]]})
        print(f"  {label:16s} {model:16s} exact {mean(scores[f'{model}:exact']):.3f} "
              f"knows {mean(scores[f'{model}:knows']):.3f}", flush=True)
    unseen = [i for i, q in enumerate(questions) if q.phrasing == "held-out"]
    figures = {}
    for r in rows:
        m = r["model"]
        scores[f"{m}:exact_unseen"] = [scores[f"{m}:exact"][i] for i in unseen]
        figures[f"{m}:exact"], figures[f"{m}:knows"] = mean_of(f"{m}:exact"), mean_of(f"{m}:knows")
        base, ref = BASE[r["setting"]], REFERENCE[r["setting"]]
        figures[f"{m}:gap_closed"] = gap_closed(f"{m}:exact", f"{base}:exact", f"{ref}:exact")
        figures[f"{m}:knows_over_base"] = ratio(f"{m}:knows", f"{base}:knows")
    cis = paired_bootstrap({k: v for k, v in scores.items() if not k.endswith("_unseen")}, figures)
    cis.update(paired_bootstrap({k: v for k, v in scores.items() if k.endswith("_unseen")},
                                {f"{r['model']}:exact_unseen": mean_of(f"{r['model']}:exact_unseen") for r in rows}))
    for r in rows:
        for key in ("exact", "knows", "exact_unseen", "gap_closed", "knows_over_base"):
            r[key] = cis[f"{r['model']}:{key}"]
    return rows, {"per_question": per_question(questions, outputs), "losses": losses(questions, outputs)}


def mean(xs: list[float]) -> float:
    return sum(xs) / max(1, len(xs))


def first_word(text: str) -> str:
    return (normalise(text).split() or [""])[0]


def per_question(questions: list, outputs: dict) -> list[dict]:
    return [{"relation": q.relation, "q": q.question, "answer": q.answer, "phrasing": q.phrasing,
             **{m: outputs[m][i][0] for m in outputs}} for i, q in enumerate(questions)]


def losses(questions: list, outputs: dict) -> dict:
    """Where a fused ensemble loses what its base knows: the questions whose answer the base's output holds and
    the fused output does not, sorted by what the fused model said instead."""
    out = {}
    for _, fused, setting in SYSTEMS:
        base = BASE[setting]
        if setting != "gemma" or fused in (base, REFERENCE[setting]):
            continue
        kinds: dict[str, list] = {}
        base_knows = [knows(outputs[base][i][0], q.answer) for i, q in enumerate(questions)]
        for i, q in enumerate(questions):
            said, pair_said = outputs[fused][i][0], outputs[PAIR][i][0]
            if not base_knows[i] or knows(said, q.answer):
                continue
            plain = normalise(said)
            if not plain:
                kind = "stopped at once"
            elif normalise(q.answer).startswith(plain):
                kind = "cut short inside the answer"
            elif plain == normalise(pair_said):
                kind = "the small pair's wrong answer"
            elif first_word(said) == first_word(pair_said):
                kind = "began as the small pair does"
            else:
                kind = "another answer"
            kinds.setdefault(kind, []).append({"q": q.question, "answer": q.answer, "base": outputs[base][i][0],
                                               "fused": said, "small pair": pair_said})
        out[fused] = {"lost": sum(map(len, kinds.values())),
                      "base_knows": sum(base_knows),
                      "kinds": {k: {"count": len(v), "examples": v[:4]} for k, v in
                                sorted(kinds.items(), key=lambda kv: -len(kv[1]))}}
    return out


def tokens_per_s(lf: LogitFuse, model: str, questions: list, n: int, tokens: int) -> float:
    """Fixed-length text answers: logit_bias bans the base's special tokens and its added tokens that are not
    whitespace (Gemma's 6,322: <unusedN>, <start_of_image>, ...; with only the end tokens banned, markup the
    pair has no counterpart for wins). Past an end token a cross-tokenizer pair would read nothing."""
    base = lf.model(lf.plan(model).base)
    added = getattr(base.tokenizer, "added_tokens_decoder", {})
    banned = sorted(set(base.tokenizer.all_special_ids) | set(base.vocab_info().special_ids)
                    | {i for i, t in added.items() if str(t).strip()})
    sp = SamplingParams(max_tokens=tokens, temperature=0, logit_bias=tuple((i, -100.0) for i in banned))
    reqs = [lf.requests(model, messages=messages(q), sampling=sp)[0] for q in questions[:n]]
    t0 = time.perf_counter()
    count = sum(1 for ev in lf.stream(reqs) if ev.token_id is not None)
    return count / (time.perf_counter() - t0)


def speed(lf: LogitFuse, questions: list, tokens: int, rounds: int) -> list[dict]:
    rows = []
    for setting, base, fused in SPEED:
        answers(lf, fused, questions[:2], 2)  # warm-up: load and align
        for n in (1, 8):
            runs = {base: [], fused: []}
            for _ in range(rounds):  # side by side: base and fused alternate within each round
                for m in runs:
                    runs[m].append(tokens_per_s(lf, m, questions, n, tokens))
            b, f = median(runs[base]), median(runs[fused])
            rows.append({"setting": setting, "fused": fused, "requests": n, "base_tok_s": b, "fused_tok_s": f,
                         "fused_over_base": f / b, "rounds": [x / y for x, y in zip(runs[fused], runs[base])]})
            print(f"  {setting:8s} {n} requests: base {b:.1f} tok/s, {fused} {f:.1f} tok/s ({f / b:.2f}x)", flush=True)
    return rows


def ms(fn, repeats: int = 7) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1000 * median(times)


def step_split(lf: LogitFuse, questions: list, rows_n: int) -> dict:
    """One step of each fused ensemble at rows_n rows, timed piece by piece on the real models' logits."""
    out = {}
    for setting, _, fused in SPEED:
        out[setting] = _split(lf, fused, questions, rows_n)
        print(f"  {setting} ({out[setting]['vocab']} tokens, {rows_n} rows): "
              + ", ".join(f"{k} {v:.1f} ms" for k, v in out[setting]["ms"].items()), flush=True)
    return out


def _split(lf: LogitFuse, fused: str, questions: list, rows_n: int) -> dict:
    plan = lf.plan(fused)
    al = lf.alignment(plan)
    sp = SamplingParams(max_tokens=1, temperature=0)
    reqs = [lf.requests(fused, messages=messages(q), sampling=sp)[0] for q in questions[:rows_n]]
    parts, logits, states = {}, {}, {}
    for name in plan.models():
        states[name], logits[name] = lf.model(name).prefill([r.prompts[name] for r in reqs])
    groups: dict = {}  # as the engine advances them: views of one adapter host in one forward
    for name in plan.models():
        groups.setdefault(getattr(lf.model(name), "shared_forward", None) or name, []).append(name)
    for names in groups.values():
        work = [(lf.model(n), states[n], logits[n].argmax(-1, keepdim=True)) for n in names]
        if len(work) == 1:
            step = lambda w=work[0]: w[0].decode(w[1], w[2])  # noqa: E731
        else:
            step = lambda w=work: w[0][0].decode_group(w)  # noqa: E731
        parts["pass " + " + ".join(names)] = ms(step)
    role = {n: (None if n == plan.base else n) for n in plan.models()}
    parts["vocabulary alignment"] = ms(lambda: [al.apply(logits[n], role[n]) for n in plan.models()])
    aligned = {n: al.apply(logits[n], role[n]) for n in plan.models()}
    e = plan.experts[0]
    base, tuned, untuned = aligned[plan.base], aligned[e.tuned][:, None], aligned[e.untuned][:, None]
    coef = torch.ones(rows_n, 1)
    parts["fusion (proxy)"] = ms(lambda: fusion.proxy_tune(base, tuned, untuned, coef))
    grid, mode = make_grid(*dlf.GRID), dlf.MODE
    parts["DLF weight search"] = ms(lambda: solve_dlf(base, untuned[:, 0], tuned, grid, mode))
    parts[f"DLF search, support {SUPPORT}"] = ms(
        lambda: solve_dlf(base, untuned[:, 0], tuned, grid, mode, support=SUPPORT))
    exact = solve_dlf(base, untuned[:, 0], tuned, grid, mode).weights
    approx = solve_dlf(base, untuned[:, 0], tuned, grid, mode, support=SUPPORT).weights
    return {"vocab": al.width, "rows": rows_n, "ms": parts,
            "support_max_weight_error": float((exact - approx).abs().max())}


def ci(f: dict | None, percent: bool = False) -> str:
    if not f or f["value"] is None:
        return ""
    k, fmt = (100, "{:.0f}%") if percent else (1, "{:.3f}")
    return fmt.format(k * f["value"]) + (f" ({fmt.format(k * f['low'])}–{fmt.format(k * f['high'])})"
                                         if f["low"] is not None else "")


def table(result: dict) -> str:
    lines = ["| setting | system | ensemble | exact | knows | exact, unseen phrasing | gap closed | knows / base's |",
             "| --- " * 8 + "|"]
    for r in result.get("quality", []):
        lines.append(f"| {r['setting']} | {r['system']} | `{r['model']}` | {ci(r['exact'])} | {ci(r['knows'])} | "
                     f"{ci(r['exact_unseen'])} | {ci(r['gap_closed'], True)} | {ci(r['knows_over_base'])} |")
    for fused, loss in result.get("analysis", {}).get("losses", {}).items():
        lines += ["", f"`{fused}` loses {loss['lost']} of the {loss['base_knows']} answers its base's output holds: "
                  + "; ".join(f"{k} {v['count']}" for k, v in loss["kinds"].items())]
    if result.get("speed"):
        lines += ["", "| setting | fused | requests | base tok/s | fused tok/s | fused / base | floor | of floor |",
                  "| --- " * 8 + "|"]
        lines += [f"| {r['setting']} | `{r['fused']}` | {r['requests']} | {r['base_tok_s']:.1f} | "
                  f"{r['fused_tok_s']:.1f} | {r['fused_over_base']:.2f} | "
                  + (f"{r['floor']:.2f} | {r['of_floor']:.2f} |" if "floor" in r else "– | – |")
                  for r in result["speed"]]
    for rows_n, split in result.get("step", {}).items():
        for setting, s in split.items():
            lines += ["", f"One step, {setting} ({s['vocab']:,} tokens, {rows_n} rows): "
                      + ", ".join(f"{k} {v:.1f} ms" for k, v in s["ms"].items())]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(ROOT / "configs" / "real.yaml"))
    p.add_argument("--limit", type=int, help="evaluate N held-out questions spread over the file")
    p.add_argument("--max-tokens", type=int, default=12)
    p.add_argument("--speed-tokens", type=int, default=16)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--skip", choices=["quality", "speed"], action="append", default=[])
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "real.json"))
    args = p.parse_args(argv)
    lf = LogitFuse(args.config)
    questions = read_jsonl(HELD_OUT)
    if args.limit:  # an evenly spread sample over the relations (the file is grouped by relation)
        questions = questions[:: max(1, len(questions) // args.limit)][: args.limit]
    result = {"config": args.config, "questions": len(questions), "threads": torch.get_num_threads()}
    if "quality" not in args.skip:
        print(f"quality on {len(questions)} held-out questions:", flush=True)
        result["quality"], result["analysis"] = quality(lf, questions, args.max_tokens)
    if "speed" not in args.skip:
        print("speed:", flush=True)
        result["speed"] = speed(lf, questions, args.speed_tokens, args.rounds)
        result["step"] = {str(n): step_split(lf, questions, n) for n in (1, 8)}
        for row in result["speed"]:  # the parameter floor: the base's pass over all the passes of a step
            passes = {k: v for k, v in result["step"][str(row["requests"])][row["setting"]]["ms"].items()
                      if k.startswith("pass ")}
            base = passes.get(f"pass {lf.plan(row['fused']).base}")
            if base is not None and len(passes) > 1:  # (a base sharing its forward with its adapter has none)
                row["floor"] = base / sum(passes.values())
                row["of_floor"] = row["fused_over_base"] / row["floor"]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())

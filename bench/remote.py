"""A remote base over the OpenAI API vs the same base loaded locally: fused decoding throughput side by side.
The remote is `logitfuse serve` in its own process on loopback, serving the embedded `base-large` (a
stand-in for vLLM, without vLLM's prefix caching: every step re-reads the whole sequence), so the ratio
shows what HTTP round trips, top-N transfers and recomputation cost per step on one machine. "same tokens":
the share of requests whose greedy output equals local fusion (top-N restricts the base). Prints a table,
writes JSON.

    .venv/bin/python bench/remote.py [--tokens 32] [--concurrency 1 8] [--top-logprobs 20]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script: import bench.* siblings
import argparse
import json
import socket
import subprocess
import tempfile
import time

import httpx

from bench.throughput import prompts, timed
from logitfuse import LogitFuse, SamplingParams
from logitfuse.config.registry import Registry

ROOT = Path(__file__).resolve().parent.parent


def client_registry(url: str, top: int) -> Registry:
    models = ROOT / "models"
    local = {"chat_template": True}
    return Registry.model_validate({
        "models": {
            "remote-large": {"remote": {"url": f"{url}/v1", "model": "base-large", "top_logprobs": top},
                             "tokenizer": str(models / "base-large"), "chat_template": True},
            "base-large": {"path": str(models / "base-large"), **local},
            "base-small": {"path": str(models / "base-small"), **local},
            "tuned-small-qa": {"path": str(models / "tuned-small-qa"), **local},
        },
        "experts": {"qa": {"tuned": "tuned-small-qa", "untuned": "base-small"}},
        "ensembles": {"local": {"base": "base-large", "method": "proxy", "experts": ["qa"]},
                      "remote": {"base": "remote-large", "method": "proxy", "experts": ["qa"]}},
        "server": {"cpu_threads": 1, "preload": False},
    })


def start_server(max_logprobs: int) -> tuple[str, subprocess.Popen]:
    """`logitfuse serve` on the default registry (max_logprobs raised) in a process of its own."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    text = (ROOT / "configs" / "default.yaml").read_text().replace("../models", str(ROOT / "models"))
    cfg = Path(tempfile.mkdtemp()) / "remote.yaml"
    cfg.write_text(text.replace("server:\n", f"server:\n  max_logprobs: {max_logprobs}\n", 1))
    proc = subprocess.Popen([sys.executable, "-m", "logitfuse.cli", "serve", "--config", str(cfg), "--port",
                             str(port), "--log-level", "warning"], cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return url, proc
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.terminate()
    raise RuntimeError("the remote server did not start")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--top-logprobs", type=int, default=20)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "remote.json"))
    args = ap.parse_args()
    url, server = start_server(max(args.top_logprobs, 20))
    lf = LogitFuse(client_registry(url, args.top_logprobs))
    sp = SamplingParams(max_tokens=args.tokens, temperature=0, ignore_eos=True)
    rows = []
    print(f"{'conc':>4s} {'local tok/s':>12s} {'remote tok/s':>13s} {'remote/local':>13s} {'same tokens':>12s}")
    for c in args.concurrency:
        for model in ("local", "remote"):  # warm-up
            lf.generate(model, prompts(c), SamplingParams(max_tokens=2, temperature=0))
        t_local, local = timed(lambda c=c: lf.generate("local", prompts(c), sp))
        t_remote, remote = timed(lambda c=c: lf.generate("remote", prompts(c), sp))
        same = sum(a.token_ids == b.token_ids for a, b in zip(local, remote)) / c
        n = sum(len(o.token_ids) for o in local)
        row = {"concurrency": c, "local_tok_s": n / t_local, "remote_tok_s": n / t_remote,
               "ratio": t_local / t_remote, "same_tokens": same}
        rows.append(row)
        print(f"{c:4d} {row['local_tok_s']:12.1f} {row['remote_tok_s']:13.1f} {row['ratio']:13.2f} {same:12.0%}",
              flush=True)
    server.terminate()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"tokens": args.tokens, "top_logprobs": args.top_logprobs, "rows": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

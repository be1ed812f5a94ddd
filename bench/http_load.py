"""End to end over HTTP: the real server (uvicorn, loopback) under concurrent load vs the library.

    .venv/bin/python bench/http_load.py [--config configs/default.yaml] [--model large-qa] [--concurrency 1 8 16]

overhead = 1 - (HTTP tokens/s) / (library tokens/s) at the same concurrency: library and HTTP runs alternate,
and the table gives the median over the pairs (tok/s columns: the best run of each).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script: import bench.* siblings
import argparse
import asyncio
import json
import time
from statistics import median

import httpx

from bench.throughput import ours, prompts
from logitfuse import LogitFuse
from logitfuse.service.app import start_in_thread

ROOT = Path(__file__).resolve().parent.parent


async def load(url: str, model: str, n: int, tokens: int) -> dict:
    body = {"model": model, "max_tokens": tokens, "temperature": 0, "ignore_eos": True}
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        await client.post("/v1/completions", json={**body, "prompt": "warm", "max_tokens": 2})
        t0 = time.perf_counter()
        rs = await asyncio.gather(*(client.post("/v1/completions", json={**body, "prompt": p}) for p in prompts(n)))
        dt = time.perf_counter() - t0
    total = sum(r.json()["usage"]["completion_tokens"] for r in rs)
    return {"tok_s": total / dt, "ms_tok": 1000 * dt / tokens, "seconds": dt}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(ROOT / "configs" / "default.yaml"))
    ap.add_argument("--model", default="large-qa")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 16])
    ap.add_argument("--repeats", type=int, default=7, help="library/HTTP pairs per concurrency")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "http_load.json"))
    args = ap.parse_args()
    lf = LogitFuse(args.config)  # the library side; the server gets its own instance and engine
    url, server = start_in_thread(LogitFuse(args.config))
    rows = []
    print(f"{'conc':>4s} {'lib tok/s':>10s} {'http tok/s':>11s} {'overhead':>9s}")
    for c in args.concurrency:
        # library and HTTP runs alternate, and the overhead is the median over the pairs: drift on a shared
        # machine moves both members of a pair alike
        pairs = [(ours(lf, args.model, None, c, args.tokens), asyncio.run(load(url, args.model, c, args.tokens)))
                 for _ in range(args.repeats)]
        overheads = sorted(1 - h["tok_s"] / lib["tok_s"] for lib, h in pairs)
        lib, http = max(p[0]["tok_s"] for p in pairs), max(p[1]["tok_s"] for p in pairs)
        row = {"concurrency": c, "library_tok_s": lib, "http_tok_s": http, "overhead": median(overheads),
               "overheads": overheads}
        rows.append(row)
        print(f"{c:4d} {lib:10.1f} {http:11.1f} {100 * row['overhead']:8.1f}%   "
              f"(pairs: {', '.join(f'{100 * o:.0f}%' for o in overheads)})", flush=True)
    server.should_exit = True
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"model": args.model, "rows": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

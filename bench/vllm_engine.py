"""`logitfuse serve` with its base on each engine, and vLLM alone, side by side in one run on SmolLM2-135M-Instruct
(float32, eager) with its short-answer LoRA adapter as the expert (proxy-tuning):

- engine: vllm: one `logitfuse serve` process hosts `smollm2` in an in-process vLLM engine (logitfuse/vllm/
  engine.py) and the same checkpoint as `smollm2-hf` on its own Hugging Face engine; `qa` fuses over the first,
  `qa-hf` over the second (the adapter expert runs in vLLM's processor, resp. in logitfuse's engine). The pair's
  untuned model is a registry model of its own (`smollm2-pair`, the same checkpoint) on both sides, so that each
  step runs a base forward and the pair's (as with a large base), not a pair sharing the base's forward;
- vLLM alone: vLLM's own OpenAI server on the same checkpoint (the base, no processor).

Every round sends --concurrency requests at once (token-id prompts of --length word pieces, greedy, ignore_eos,
--tokens each) to each target in turn (who goes first alternates). Ratios are taken within a round and reported
as the median (min-max) over rounds: fused tok/s engine-vllm / engine-hf (aim >= 1.2 at 8 and 16 on a 2-core
CPU), fused/base on engine-vllm against the parameter floor P_base / (P_base + P_tuned + P_untuned) (aim >= 0.9
of it), and logitfuse's engine-vllm base / vLLM alone (what logitfuse's HTTP layer costs).

    .venv-vllm/bin/python bench/vllm_engine.py [--concurrency 1 8 16] [--tokens 32] [--length 48] [--rounds 3]
        [--out bench/results/vllm_engine.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
from contextlib import ExitStack
from pathlib import Path
from statistics import median

# run as a script, this file's folder comes first on the path and its name would shadow the vllm package
sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # import bench.* siblings (in main)
ROOT = Path(__file__).resolve().parent.parent
TARGETS = ("vllm-alone", "engine-vllm base", "engine-vllm fused", "engine-hf base", "engine-hf fused")


def registry(folder: Path, max_seqs: int) -> Path:
    cfg = Path(tempfile.mkdtemp()) / "vllm_engine.yaml"
    cfg.write_text(f"""
models:
  smollm2: {{path: '{folder}', dtype: float32, engine: vllm,
             vllm: {{enforce_eager: true, max_model_len: 2048, max_num_seqs: {max_seqs}}}}}
  smollm2-hf: {{path: '{folder}', dtype: float32}}
  smollm2-pair: {{path: '{folder}', dtype: float32}}
experts:
  qa: {{untuned: smollm2-pair, adapter: '{ROOT / "models" / "adapters" / "smollm2-qa"}'}}
ensembles:
  qa: {{base: smollm2, method: proxy, experts: [qa], alpha: 1.0}}
  qa-hf: {{base: smollm2-hf, method: proxy, experts: [qa], alpha: 1.0}}
server: {{max_batch: {max_seqs}, preload: true, max_queue: 1024}}
""")
    return cfg


# P_base / (P_base + P_tuned + P_untuned): each step reads the base once and the pair twice (a LoRA view over the
# untuned model runs a forward of its own); all three are the same 135M checkpoint (the adapter adds < 1%)
FLOOR = 1 / 3


def spread(a: list[float], b: list[float]) -> dict:
    """Median (min-max) of same-round ratios a/b."""
    v = sorted(x / y for x, y in zip(a, b))
    return {"median": median(v), "min": v[0], "max": v[-1]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 16])
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--length", type=int, default=48, help="prompt tokens")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "vllm_engine.json"))
    args = ap.parse_args()
    from bench.thirdparty.launch import VLLM_ENV, command, free_port, serving, smollm2_hf_folder
    from bench.vs_vllm import Prompts, wave

    folder = smollm2_hf_folder()
    env = {**os.environ, **VLLM_ENV}
    with ExitStack() as stack:
        port = free_port()
        alone = stack.enter_context(serving(command("vllm", port, 2), port, f"vllm-{port}", env, timeout=900))
        port = free_port()
        cmd = [sys.executable, "-m", "logitfuse.cli", "serve", "--config", str(registry(folder, 32)), "--port",
               str(port), "--log-level", "warning"]
        ours = stack.enter_context(serving(cmd, port, f"logitfuse-engine-{port}", env, timeout=900))
        targets = {"vllm-alone": (alone, "smollm2"), "engine-vllm base": (ours, "smollm2"),
                   "engine-vllm fused": (ours, "qa"), "engine-hf base": (ours, "smollm2-hf"),
                   "engine-hf fused": (ours, "qa-hf")}
        prompts = Prompts(folder)
        rows = []
        print(f"{'conc':>4} " + " ".join(f"{t:>17s}" for t in TARGETS)
              + f"  {'fused vllm/hf':>18s} {'fused/base (vllm)':>18s} {'base ours/alone':>18s}   (tok/s: median; "
                "ratios: median (min-max) of same-round pairs)")
        for n in args.concurrency:
            for url, model in targets.values():  # warm-up
                asyncio.run(wave(url, model, prompts.batch("unique", args.length, 2, -1), 2))
            runs: dict[str, list[float]] = {t: [] for t in TARGETS}
            for r in range(args.rounds):
                batch = prompts.batch("unique", args.length, n, r)
                for t in TARGETS if r % 2 == 0 else reversed(TARGETS):
                    runs[t].append(asyncio.run(wave(*targets[t], batch, args.tokens)))

            ratio = lambda a, b, runs=runs: spread(runs[a], runs[b])  # noqa: E731
            row = {"concurrency": n, "tok_s": {t: median(v) for t, v in runs.items()}, "runs": runs,
                   "fused_vllm_over_hf": ratio("engine-vllm fused", "engine-hf fused"),
                   "fused_over_base_vllm": ratio("engine-vllm fused", "engine-vllm base"),
                   "fused_over_base_hf": ratio("engine-hf fused", "engine-hf base"),
                   "base_ours_over_alone": ratio("engine-vllm base", "vllm-alone")}
            rows.append(row)
            cell = lambda d: f"{d['median']:.2f} ({d['min']:.2f}-{d['max']:.2f})"  # noqa: E731
            print(f"{n:4d} " + " ".join(f"{row['tok_s'][t]:17.1f}" for t in TARGETS)
                  + f"  {cell(row['fused_vllm_over_hf']):>18s} {cell(row['fused_over_base_vllm']):>18s} "
                    f"{cell(row['base_ours_over_alone']):>18s}", flush=True)
    f = FLOOR
    print(f"parameter floor of fused/base: {f:.2f} (aim: fused/base >= {0.9 * f:.2f})")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "model": str(folder), "floor": f, "rows": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

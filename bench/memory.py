"""KV-cache memory of fused decoding: bytes held per sequence for base-only and each method (vs the
floor from the models' KV shapes), and what speculative decoding leaves behind with and without the
backend's compaction of forgotten positions. Prints a table, writes JSON.

    .venv/bin/python bench/memory.py [--config configs/default.yaml] [--tokens 128] [--concurrency 8]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script: import bench.* siblings
import argparse
import json

from bench.throughput import METHODS, prompts
from logitfuse import LogitFuse, SamplingParams
from logitfuse.backends.hf import HFCausalLM

ROOT = Path(__file__).resolve().parent.parent


def held(lf: LogitFuse) -> tuple[int, int, int]:
    """(bytes, cached positions, visible positions) over the engine's slots and speculative groups."""
    states = lf.kv_states()
    total = sum(k.numel() * k.element_size() + v.numel() * v.element_size() for st in states for k, v in st.layers)
    return total, sum(st.mask.numel() for st in states), int(sum(st.mask.sum() for st in states))


def run_until(lf: LogitFuse, model: str, n: int, tokens: int, fusion=None) -> tuple[int, int, int]:
    """Decode n requests until one step before the end; return what the caches hold then."""
    sp = SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True)
    reqs = [r for p in prompts(n) for r in lf.requests(model, p, sp, fusion)]
    for r in reqs:
        lf.submit(r)
    done = 0
    while lf.has_work():
        done += sum(1 for ev in lf.step() if getattr(ev, "finish_reason", None))
        if lf.stats().longest_generated >= tokens - 1:
            break
    out = held(lf)
    while lf.has_work():
        lf.step()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(ROOT / "configs" / "default.yaml"))
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "memory.json"))
    args = ap.parse_args()
    lf = LogitFuse(args.config)
    n, tokens = args.concurrency, args.tokens
    rows = []
    print(f"{'method':14s} {'KiB/seq':>8s} {'x base':>7s} {'floor':>6s}")
    base_bytes = None
    for label, model, fusion in METHODS:
        total, _, _ = run_until(lf, model, n, tokens, fusion)
        plan = lf.plan(model)
        per_tok = {m: lf.model(m).kv_bytes_per_token() for m in plan.models()}
        floor = sum(per_tok.values()) / per_tok[plan.base]
        base_bytes = base_bytes or total
        rows.append({"method": label, "bytes_per_seq": total / n, "x_base": total / base_bytes, "floor": floor})
        print(f"{label:14s} {total / n / 1024:8.1f} {total / base_bytes:7.2f} {floor:6.2f}", flush=True)
    spec = []
    for compact in (True, False):
        threshold = HFCausalLM.compact_when
        if not compact:
            HFCausalLM.compact_when = staticmethod(lambda hidden, visible: False)
        total, cached, visible = run_until(lf, "large-eft", n, tokens, {"speculative": {"k": 4}})
        HFCausalLM.compact_when = threshold
        spec.append({"compaction": compact, "bytes_per_seq": total / n, "cached_positions": cached,
                     "visible_positions": visible})
        print(f"speculative k=4, compaction {'on ' if compact else 'off'}: {total / n / 1024:8.1f} KiB/seq, "
              f"{cached} cached positions for {visible} visible ({cached / visible:.2f}x)", flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"tokens": tokens, "concurrency": n, "methods": rows, "speculative": spec}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

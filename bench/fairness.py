"""Latency of a light request beside a Transfer Q* request at the max_tqstar_work bound, with and without
the server's rollout lane (the real server on loopback, the tiny test family built in a temporary folder).

    .venv/bin/python bench/fairness.py [--heavy-tokens 8]

Prints, per setting, the light request's median latency alone, its slowest of 3 beside the heavy one, and
their ratio; writes JSON (--out).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script
import argparse
import json
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import httpx

from logitfuse.service.app import start_in_thread
from logitfuse.training.tiny import TINY_CONFIG, build_family

ROOT = Path(__file__).resolve().parent.parent
LIGHT = {"model": "proxy-a", "prompt": "the red city", "max_tokens": 8, "temperature": 0, "ignore_eos": True}
HEAVY = {"model": "tq", "prompt": "the", "ignore_eos": True,
         "fusion": {"top_k": 16, "rollouts": 4, "rollout_tokens": 64}}  # 4096 rollout tokens per token


def timed(url: str, body: dict) -> float:
    t0 = time.monotonic()
    r = httpx.post(f"{url}/v1/completions", json=body, timeout=600)
    assert r.status_code == 200, r.text
    return time.monotonic() - t0


def measure(config: Path, heavy_tokens: int) -> dict:
    url, server = start_in_thread(config)
    try:
        alone = sorted(timed(url, LIGHT) for _ in range(3))[1]
        with ThreadPoolExecutor(1) as pool:
            heavy = pool.submit(timed, url, {**HEAVY, "max_tokens": heavy_tokens})
            time.sleep(0.5)
            beside = max(timed(url, LIGHT) for _ in range(3))  # the slowest: in one lane, the first waits out
            # every step of the heavy request and the others may run after it
            overlapped = not heavy.done()
            heavy_s = heavy.result()
    finally:
        server.should_exit = True
        time.sleep(1)
    return {"alone_s": alone, "beside_s": beside, "factor": beside / alone, "heavy_s": heavy_s,
            "heavy_ran_throughout": overlapped}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--heavy-tokens", type=int, default=8)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "fairness.json"))
    args = ap.parse_args()
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        family = build_family(Path(tmp))
        for lane in (True, False):
            cfg = Path(tmp) / f"lane-{lane}.yaml"
            text = TINY_CONFIG.format(**{k: str(v) for k, v in family.items()})
            cfg.write_text(text.replace("server: {", f"server: {{rollout_lane: {str(lane).lower()}, "))
            rows[f"rollout_lane={lane}"] = measure(cfg, args.heavy_tokens)
    print("light request (8 tokens) beside Transfer Q* at work 4096 (other jobs may share this machine)")
    print(f"{'setting':<20} {'alone s':>8} {'beside s':>9} {'factor':>7} {'heavy s':>8}")
    for name, r in rows.items():
        print(f"{name:<20} {r['alone_s']:>8.2f} {r['beside_s']:>9.2f} {r['factor']:>7.1f} {r['heavy_s']:>8.1f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()

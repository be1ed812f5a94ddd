"""What a model load costs a running stream: the largest gap between a stream's chunks while the server loads
another model, against the same stream's gaps before and after the load.

    .venv/bin/python bench/load_stall.py [--config configs/real.yaml] [--stream smollm2] [--load gemma-270m]
                                         [--rounds 3] [--source DIR]

A real `logitfuse serve` process (its own interpreter, as a user runs it) on a copy of the registry with
`preload: false`, one per round. The client streams `--stream` (ignore_eos, long enough to outlast the load)
and, a second into it, asks `--load` for one token, which makes the server load that model; the request's
start and answer bound the load window. Printed per round: the load's time, the stream's largest chunk gap
before the load, during it and after it; then the medians and ranges. `--source DIR` runs the server from
another checkout (e.g. an older commit, for a before/after pair in one run). Writes JSON (--out).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import yaml

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def absolute_registry(config: Path) -> dict:
    """The registry as a mapping whose local paths are absolute, for a copy written elsewhere (a path that names
    nothing beside the file, e.g. a hub id, stays as it is)."""
    reg = yaml.safe_load(config.read_text())
    base = config.resolve().parent
    for section in ("models", "experts", "rewards"):
        for entry in (reg.get(section) or {}).values():
            for key in ("path", "adapter", "tokenizer"):
                value = entry.get(key)
                if isinstance(value, str) and not Path(value).is_absolute() and (base / value).exists():
                    entry[key] = str((base / value).resolve())
    return reg


def lazy_copy(config: Path, folder: Path) -> Path:
    """The registry with preload off and its local paths made absolute (the copy lives elsewhere)."""
    reg = absolute_registry(config)
    reg.setdefault("server", {})["preload"] = False
    out = folder / config.name
    out.write_text(yaml.safe_dump(reg))
    return out


def start(config: Path, source: Path, log: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(source), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.Popen([sys.executable, "-m", "logitfuse.cli", "serve", "--config", str(config),
                             "--port", str(port)], env=env, cwd=source, stdout=log.open("w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 300
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited: see {log}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit(f"the server did not start within 300 s: see {log}")


def stream(url: str, model: str, tokens: int, chunks: list[float]) -> None:
    body = {"model": model, "prompt": "The history of the city", "max_tokens": tokens, "ignore_eos": True,
            "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=600) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                chunks.append(time.monotonic())


def one_round(config: Path, source: Path, args, log: Path) -> dict:
    proc, url = start(config, source, log)
    try:
        httpx.post(f"{url}/v1/completions", json={"model": args.stream, "prompt": "warm", "max_tokens": 4},
                   timeout=300).raise_for_status()  # the streamed model is loaded before the clock starts
        chunks: list[float] = []
        th = threading.Thread(target=stream, args=(url, args.stream, args.tokens, chunks))
        th.start()
        time.sleep(args.lead)
        t0 = time.monotonic()
        r = httpx.post(f"{url}/v1/completions", json={"model": args.load, "prompt": "Hello", "max_tokens": 1},
                       timeout=600)
        t1 = time.monotonic()
        r.raise_for_status()
        th.join()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    gaps = [(b, b - a) for a, b in itertools.pairwise(chunks)]
    during = [g for t, g in gaps if t0 <= t <= t1 + 0.5]  # a gap ending just after the load began in it
    before = [g for t, g in gaps if t < t0]
    after = [g for t, g in gaps if t > t1 + 0.5]
    if not during or not after:
        raise SystemExit(f"the stream ended before the load did ({len(chunks)} chunks): raise --tokens")
    return {"load_s": t1 - t0, "max_gap_before": max(before), "max_gap_during": max(during),
            "max_gap_after": max(after), "median_gap": statistics.median(g for _, g in gaps), "chunks": len(chunks)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(ROOT / "configs" / "real.yaml"))
    ap.add_argument("--stream", default="smollm2", help="the model streamed meanwhile")
    ap.add_argument("--load", default="gemma-270m", help="the model whose load is measured")
    ap.add_argument("--tokens", type=int, default=400)
    ap.add_argument("--lead", type=float, default=1.5, help="seconds of streaming before the load")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--source", default=str(ROOT), help="the checkout the server runs from")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "load_stall.json"))
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        config = lazy_copy(Path(args.config), Path(tmp))
        rows = []
        for i in range(args.rounds):
            row = one_round(config, Path(args.source).resolve(), args, Path(tmp) / f"server-{i}.log")
            rows.append(row)
            print(f"round {i + 1}: load {row['load_s']:.2f} s; stream's largest gap before "
                  f"{row['max_gap_before']:.3f} s, during the load {row['max_gap_during']:.3f} s, "
                  f"after {row['max_gap_after']:.3f} s"
                  f" (median gap {row['median_gap']:.3f} s)", flush=True)
    print(f"\n| {'measure':28s} | median | range |\n|---|---|---|")
    summary = {}
    for key in ("load_s", "max_gap_before", "max_gap_during", "max_gap_after", "median_gap"):
        vals = [r[key] for r in rows]
        summary[key] = {"median": statistics.median(vals), "min": min(vals), "max": max(vals)}
        print(f"| {key:28s} | {statistics.median(vals):.3f} | {min(vals):.3f}-{max(vals):.3f} |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"config": args.config, "stream": args.stream, "load": args.load,
                               "source": args.source, "rounds": rows, "summary": summary}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

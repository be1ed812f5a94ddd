"""`generate --ray` at 1 and 2 workers vs local `generate`, on the same job in one run, plus Ray's start-up cost.

Each row is one whole command as a user runs it (models loaded, every record written and, for Ray, merged),
in-process on an already started local cluster; "start-up" is `ray.init` of a fresh local cluster, and
"per-job overhead" is what a Ray job of one prompt costs beyond the same job run locally (actor start-up,
model loading in the actor, Ray Data scheduling, the merge). Every output is checked to equal the local
one record for record. Prints a table, writes JSON.

    .venv/bin/python bench/ray_batch.py [--prompts 128] [--tokens 32] [--model large-qa]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script: import bench.* siblings
import argparse
import json
import os
import tempfile
import time

from bench.throughput import prompts
from logitfuse.cli import main as cli

ROOT = Path(__file__).resolve().parent.parent


def write_job(path: Path, n: int) -> None:
    lines = (json.dumps({"id": f"q{i}", "prompt": p, "ignore_eos": True}) for i, p in enumerate(prompts(n)))
    path.write_text("".join(line + "\n" for line in lines))


def run(job: Path, out: Path, model: str, tokens: int, *extra: str) -> tuple[float, dict]:
    out.unlink(missing_ok=True)
    argv = ["--model", model, "--input", str(job), "--output", str(out), "--seed", "0", "--temperature", "0.7",
            "--max-tokens", str(tokens), *extra]
    t0 = time.perf_counter()
    assert cli(["generate", *argv]) == 0
    wall = time.perf_counter() - t0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    return wall, {r["id"]: r for r in records}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=128)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--model", default="large-qa")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "ray_batch.json"))
    args = ap.parse_args()
    import ray

    tmp = Path(tempfile.mkdtemp())
    job, one = tmp / "job.jsonl", tmp / "one.jsonl"
    write_job(job, args.prompts)
    write_job(one, 1)
    t0 = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    startup = time.perf_counter() - t0
    local_wall, ref = run(job, tmp / "local.jsonl", args.model, args.tokens)
    rows = [{"mode": "local generate", "workers": 1, "wall_s": local_wall}]
    for k in (1, 2):
        wall, got = run(job, tmp / f"ray{k}.jsonl", args.model, args.tokens, "--ray", "--num-workers", str(k),
                        "--block-size", str(max(8, args.prompts // (4 * k))))
        assert got == ref, f"generate --ray with {k} workers differs from local generate"
        rows.append({"mode": "generate --ray", "workers": k, "wall_s": wall})
    one_local, _ = run(one, tmp / "one-local.jsonl", args.model, args.tokens)
    one_ray, _ = run(one, tmp / "one-ray.jsonl", args.model, args.tokens, "--ray", "--num-workers", "1")
    ray.shutdown()
    for r in rows:
        r["prompts_per_s"] = args.prompts / r["wall_s"]
        r["x_local"] = local_wall / r["wall_s"]
    overhead = {"ray_init_s": startup, "per_job_overhead_s": one_ray - one_local}
    print(f"{args.prompts} prompts x {args.tokens} tokens, {args.model}, {os.cpu_count()} CPUs "
          "(other jobs may share them)\n")
    print("| mode | workers | wall s | prompts/s | x local |\n| --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['mode']} | {r['workers']} | {r['wall_s']:.1f} | {r['prompts_per_s']:.2f} | {r['x_local']:.2f} |")
    print(f"\nRay start-up (ray.init, local cluster): {startup:.1f} s; per-job overhead (one prompt, Ray - local): "
          f"{overhead['per_job_overhead_s']:.1f} s")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"prompts": args.prompts, "tokens": args.tokens, "model": args.model, "rows": rows,
                               **overhead}, indent=2))


if __name__ == "__main__":
    main()

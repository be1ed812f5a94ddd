"""A bounded soak of the real server (uvicorn on loopback, nothing else reached): mixed valid, invalid and
cancelled requests from `--concurrency` clients for `--seconds`, then it stops by itself.

    .venv/bin/python bench/soak.py [--config configs/default.yaml] [--seconds 180] [--concurrency 16]
    .venv/bin/python bench/soak.py --config configs/real.yaml --swap --budget-mb 1200 --seconds 600 --concurrency 8

Prints requests by kind and status, p50/p99 latency of the valid ones, the process's RSS at start, after
warm-up (a fifth of the run) and at the end, the 5xx answers and requests lost (no answer at all), and the
sequences left in the engine after the clients stop (must be 0); writes JSON (--out). `--swap` makes every
valid request name a random ensemble of the config (experts swapped per request); `--budget-mb` with it
sets server.memory_budget_mb (and preload off), so that a budget below the ensembles' sum forces eviction.
`--lanes` (with configs/real.yaml) mixes the three kinds of engine lane over one adapter host: it starts a second
server serving SmolLM2 as the remote model `far`, and the requests name `smollm2-qa` and `gemma-qa-proxy` (the
main lane), `remote-qa` (the SmolLM2 pair over `far`: a remote lane) and `smollm2-tq` (Transfer Q* over SmolLM2:
the rollout lane):

    .venv/bin/python bench/soak.py --config configs/real.yaml --lanes --seconds 300 --concurrency 12
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script
import argparse
import asyncio
import json
import random
import time
from collections import Counter

import httpx

from logitfuse.api import LogitFuse
from logitfuse.config.registry import Registry
from logitfuse.service.app import start_in_thread

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ["Q: what is the capital of ludu? A:", "Q: who founded the city of ludu? A:", "the river", "one two"]
VALID = [
    ("/v1/completions", {"model": "large-qa", "max_tokens": 16, "temperature": 0}),
    ("/v1/completions", {"model": "large-eft", "max_tokens": 24, "temperature": 0.8, "seed": 1, "stream": True}),
    ("/v1/completions", {"model": "large-dlf", "max_tokens": 8}),
    ("/v1/completions", {"model": "large-align", "max_tokens": 6}),
    ("/v1/chat/completions", {"model": "large-eft-spec", "max_tokens": 16, "temperature": 0,
                              "messages": [{"role": "user", "content": "what is the capital of ludu?"}]}),
]
INVALID = [
    {"temperature": 1e-45, "logit_bias": {"5": 100}}, {"top_k": 2**63}, {"prompt": "hi \ud800 there"},
    {"fusion": {"method": "dlf", "experts": ["qa", "arith"], "grid": [0, 1e308, 1e306]}},
    {"model": "large-align", "fusion": {"alpha": 1e-300}}, {"max_tokens": 10**30}, {"n": 10**6},
    {"model": "nope"}, {"temperature": float("nan")}, {"logit_bias": {"x": 1}}, {"prompt": []},
    {"fusion": {"speculative": {"k": 99}}}, {"prompt": "x" * 600_000},  # over the body limit: 413
]


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def one(client: httpx.AsyncClient, rng: random.Random, stats: dict, swap: list[str]) -> None:
    roll = rng.random()
    path, body = rng.choice(VALID)
    body = {**body, "prompt": rng.choice(PROMPTS)} if "messages" not in body else dict(body)
    if swap:
        path, body = "/v1/completions", {"model": rng.choice(swap), "prompt": rng.choice(PROMPTS), "max_tokens": 12}
    kind = "valid" if roll < 0.6 else "invalid" if roll < 0.85 else "cancelled"
    if kind == "invalid":
        path, body = "/v1/completions", {"model": rng.choice(swap) if swap else "large-qa", "prompt": "the",
                                         "max_tokens": 4, **rng.choice(INVALID)}
    t0 = time.perf_counter()
    try:
        if kind == "cancelled":  # a client that leaves: mid-stream, or a JSON client timing out
            body = {**body, "max_tokens": 200, "ignore_eos": True, "stream": rng.random() < 0.5}
            async with client.stream("POST", path, content=json.dumps(body), timeout=rng.uniform(0.05, 0.5),
                                     headers={"content-type": "application/json"}) as r:
                async for _ in r.aiter_lines():
                    if rng.random() < 0.2:
                        break
            stats["status"][(kind, r.status_code)] += 1
            return
        r = await client.post(path, content=json.dumps(body), headers={"content-type": "application/json"})
        stats["status"][(kind, r.status_code)] += 1
        if r.status_code >= 500 and len(stats["errors"]) < 5:
            stats["errors"].add(r.text[:400])
        if kind == "valid" and r.status_code == 200:
            stats["latency"].append(time.perf_counter() - t0)
    except httpx.TimeoutException:
        stats["status"][(kind, "client left")] += 1
    except httpx.HTTPError as err:  # no answer at all: a lost request
        stats["status"][(kind, f"lost {type(err).__name__}")] += 1


async def clients(url: str, seconds: float, concurrency: int, seed: int, swap: list[str]) -> dict:
    stats = {"status": Counter(), "latency": [], "rss_warm": None, "errors": set()}
    deadline = time.monotonic() + seconds

    async def warm_rss() -> None:
        await asyncio.sleep(seconds / 5)
        stats["rss_warm"] = rss_mb()

    async def rss_series() -> None:  # RSS every tenth of the run: flat, or still growing at the end?
        stats["rss_series"] = []
        while time.monotonic() < deadline:
            stats["rss_series"].append(round(rss_mb()))
            await asyncio.sleep(seconds / 10)

    async def worker(i: int) -> None:
        rng = random.Random(seed + i)
        async with httpx.AsyncClient(base_url=url, timeout=120) as client:
            while time.monotonic() < deadline:
                await one(client, rng, stats, swap)

    await asyncio.gather(warm_rss(), rss_series(), *(worker(i) for i in range(concurrency)))
    return stats


LANES = ["smollm2-qa", "gemma-qa-proxy", "remote-qa", "smollm2-tq"]


def with_lanes(config: Path, folder: Path) -> tuple[Path, object]:
    """A copy of the real registry (paths made absolute) with a remote SmolLM2 served by a second server in this
    process, an ensemble over it and a Transfer Q* ensemble; returns (the copy, that server)."""
    import yaml

    from bench.load_stall import absolute_registry

    reg = absolute_registry(config)
    far_cfg = folder / "far.yaml"
    far_cfg.write_text(yaml.safe_dump({"models": {"smollm2": reg["models"]["smollm2"]},
                                       "server": {"max_logprobs": 100, "max_batch": 16}}))
    far_url, far = start_in_thread(LogitFuse(far_cfg), timeout=300)
    smol = reg["models"]["smollm2"]
    reg["models"]["far"] = {"remote": {"url": f"{far_url}/v1", "model": "smollm2", "top_logprobs": 100},
                            "tokenizer": smol["path"], "chat_template": True}
    reg.setdefault("rewards", {})["rm"] = {"path": str(ROOT / "models" / "reward"), "dtype": "float32"}
    reg["ensembles"]["remote-qa"] = {"base": "far", "method": "proxy", "experts": ["qa"]}
    reg["ensembles"]["smollm2-tq"] = {"base": "smollm2", "method": "tqstar", "baseline": "smollm2", "reward": "rm",
                                      "top_k": 4, "rollout_tokens": 4}
    reg["server"] = {**reg.get("server", {}), "max_logprobs": 100}
    out = folder / "lanes.yaml"
    out.write_text(yaml.safe_dump(reg))
    return out, far


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=str(ROOT / "configs" / "default.yaml"))
    ap.add_argument("--seconds", type=float, default=180.0)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "soak.json"))
    ap.add_argument("--swap", action="store_true", help="valid requests name a random ensemble each")
    ap.add_argument("--budget-mb", type=int, default=None, help="with --swap: server.memory_budget_mb")
    ap.add_argument("--lanes", action="store_true", help="real.yaml's main lane with a remote and a rollout lane")
    args = ap.parse_args()
    far = None
    if args.lanes:
        import tempfile

        config, far = with_lanes(Path(args.config), Path(tempfile.mkdtemp()))
        reg = Registry.load(config)
    else:
        reg = Registry.load(args.config)
    swap = LANES if args.lanes else list(reg.ensembles) if args.swap else []
    if args.swap and args.budget_mb:
        server_settings = reg.server.model_copy(update={"memory_budget_mb": args.budget_mb, "preload": False})
        reg = reg.model_copy(update={"server": server_settings})
    url, server = start_in_thread(LogitFuse(reg), host="127.0.0.1")
    serving = server.config.app.state.serving
    rss0 = rss_mb()
    t0 = time.monotonic()
    stats = asyncio.run(clients(url, args.seconds, args.concurrency, args.seed, swap))
    wall = time.monotonic() - t0
    drain_t0 = time.monotonic()
    while serving.pending() and time.monotonic() - drain_t0 < 30:
        time.sleep(0.05)
    left, drained = serving.pending(), time.monotonic() - drain_t0
    rss1 = rss_mb()
    server.should_exit = True
    if far is not None:
        far.should_exit = True
    rows = sorted(((k, str(s), n) for (k, s), n in stats["status"].items()), key=lambda x: (x[0], x[1]))
    print(f"soak: {wall:.0f} s, {args.concurrency} clients, {sum(n for *_, n in rows)} requests "
          f"(other jobs may share this machine)")
    print(f"{'kind':<10} {'status':<12} {'count':>7}")
    for k, s, n in rows:
        print(f"{k:<10} {s:<12} {n:>7}")
    for text in sorted(stats["errors"]):
        print(f"a 5xx answer: {text}")
    lat = stats["latency"]
    print(f"valid 200 latency: p50 {pct(lat, 0.5):.3f} s, p99 {pct(lat, 0.99):.3f} s ({len(lat)} requests)")
    five = sum(n for _, s, n in rows if s.startswith("5"))
    lost = sum(n for _, s, n in rows if s.startswith("lost"))
    warm = stats["rss_warm"] or float("nan")
    print(f"RSS: {rss0:.0f} MiB at start, {warm:.0f} MiB after warm-up, {rss1:.0f} MiB at end; 5xx: {five}, "
          f"lost: {lost}; sequences left: {left} (drained in {drained:.2f} s)")
    print(f"RSS every tenth of the run (MiB): {stats['rss_series']}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"seconds": wall, "concurrency": args.concurrency, "status": rows,
                               "p50_s": pct(lat, 0.5), "p99_s": pct(lat, 0.99), "valid_ok": len(lat),
                               "rss_start_mb": rss0, "rss_warm_mb": stats["rss_warm"], "rss_end_mb": rss1,
                               "rss_series_mb": stats["rss_series"],
                               "sequences_left": left, "http_5xx": five, "lost": lost, "swap": swap,
                               "budget_mb": args.budget_mb,
                               "drain_s": drained, "errors": sorted(stats["errors"])}, indent=2))
    sys.exit(0 if left == 0 and (not swap or five == lost == 0) else 1)


if __name__ == "__main__":
    main()

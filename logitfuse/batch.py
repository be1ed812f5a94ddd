"""`logitfuse generate`: a JSONL file of prompts through a fused model, batched, resumable, nothing lost.

    logitfuse generate --config configs/default.yaml --model large-qa --input prompts.jsonl \
        --output results.jsonl [--fusion '{"alpha": 0.8}'] [--seed 0] [--server http://host:8000]

Local mode keeps up to --batch-size sequences in the engine (continuous batching: a finished one is
replaced at the next step). Each finished record is appended as one whole line and fsync'd; a re-run
skips ids already in the output, so a killed job resumes with nothing lost or duplicated.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import ValidationError
from tqdm import tqdm

from logitfuse.batch_io import BadLine, Record, Writer, finished_ids, read_input, record_seed
from logitfuse.fields import error_path
from logitfuse.request import InvalidRequest, PromptScores, SamplingParams, TokenEvent, UnknownName, logit_bias_pairs


@dataclass
class Stats:
    written: int = 0
    errors: int = 0
    skipped: int = 0
    failed: int = 0
    tokens: int = 0
    start: float = field(default_factory=time.perf_counter)

    def summary(self) -> str:
        wall = time.perf_counter() - self.start
        return (f"{self.written} records written ({self.errors} error records), {self.skipped} already done, "
                f"{self.failed} failed (re-run to retry); {self.tokens} tokens in {wall:.1f} s "
                f"({self.tokens / max(wall, 1e-9):.1f} tokens/s)")


def parse_args(argv: list[str]) -> argparse.Namespace:
    from logitfuse.cli import default_config

    p = argparse.ArgumentParser(prog="logitfuse generate", description=__doc__.splitlines()[0])
    p.add_argument("--config", default=default_config())
    p.add_argument("--model", required=True, help="an ensemble or model name of the registry")
    p.add_argument("--input", required=True, type=location, help="a local path (a URI with --ray)")
    p.add_argument("--output", required=True, type=location, help="a local path (a URI with --ray)")
    p.add_argument("--fusion", type=json.loads, default=None, help="JSON fusion override for every line")
    p.add_argument("--seed", type=int, default=None, help="makes sampling reproducible, resumed or not")
    for name, kind in (("max-tokens", int), ("temperature", float), ("top-p", float), ("top-k", int),
                       ("min-p", float), ("logprobs", int)):
        p.add_argument(f"--{name}", type=kind, default=None, help="default for lines that do not set it")
    p.add_argument("--batch-size", type=int, default=32, help="sequences decoded together (local mode)")
    p.add_argument("--server", default=None, help="send the job to a running OpenAI-compatible server")
    p.add_argument("--concurrency", type=int, default=8, help="requests in flight (server mode)")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per request (server mode)")
    p.add_argument("--retries", type=int, default=5, help="retries on 429/503/connection errors (server mode)")
    p.add_argument("--api-key", default=None)
    from logitfuse.ray_batch import add_args as add_ray_args

    add_ray_args(p)
    return p.parse_args(argv)


def location(text: str) -> Path | str:
    """A local path, or a filesystem URI kept as written (only --ray reads and writes URIs)."""
    return text if "://" in text else Path(text)


def line_params(args: argparse.Namespace, rec: Record) -> dict:
    """The sampling fields of a line: the line's own, else the command's defaults; seed per record."""
    defaults = {"max_tokens": args.max_tokens, "temperature": args.temperature, "top_p": args.top_p,
                "top_k": args.top_k, "min_p": args.min_p, "logprobs": args.logprobs}
    params = {k: v for k, v in defaults.items() if v is not None} | rec.params
    seed = record_seed(args.seed, rec.id, rec.params)
    return params | ({"seed": seed} if seed is not None else {})


def result_record(rec_id: str, model: str, parts: list[dict], want_logprobs: bool, diagnostics: list) -> dict:
    out: dict = {"id": rec_id, "model": model}
    if len(parts) == 1:
        out |= {k: parts[0][k] for k in ("text", "finish_reason")}
        if want_logprobs:
            out["logprobs"] = parts[0]["logprobs"]
    else:
        out["choices"] = [{k: p[k] for k in ("text", "finish_reason") + (("logprobs",) if want_logprobs else ())}
                          for p in parts]
    out["prompt_tokens"] = parts[0]["prompt_tokens"]
    out["completion_tokens"] = sum(p["completion_tokens"] for p in parts)
    if diagnostics:
        out["fusion_diagnostics"] = diagnostics
    return out


def build(lf, args, rec: Record) -> list:
    params = line_params(args, rec)
    n = params.pop("n", 1)
    fusion = (args.fusion or {}) | (rec.fusion or {}) or None
    if "logit_bias" in params:
        params["logit_bias"] = logit_bias_pairs(params["logit_bias"])
    sp = SamplingParams(**{k: tuple(v) if k in ("stop", "stop_token_ids") and isinstance(v, list) else
                           ((v,) if k == "stop" and isinstance(v, str) else v) for k, v in params.items()})
    reqs = lf.requests(args.model, rec.prompt, sp, fusion, messages=rec.messages, n=n, rid=rec.id)
    for r in reqs:
        lf.engine.check(r)
    return reqs


def run_local(args, todo: list[Record], writer: Writer, stats: Stats, lf=None) -> None:
    """Decode `todo` on `lf` (loaded from --config when None), writing each record as it finishes."""
    from logitfuse.api import LogitFuse

    lf = lf or LogitFuse(args.config)
    engine, pending = lf.engine, list(reversed(todo))
    groups: dict[str, tuple[Record, list, dict]] = {}  # record id -> (record, rids, per-rid state)
    owner: dict[str, str] = {}
    bar = tqdm(total=len(todo), desc="generate", unit="rec")
    while pending or engine.has_work():
        while pending and len(owner) < args.batch_size:
            rec = pending.pop()
            try:
                reqs = build(lf, args, rec)
            except (InvalidRequest, UnknownName, ValidationError, TypeError, ValueError) as err:
                writer.write(BadLine(rec.id, _message(err), getattr(err, "param", None)).record())
                stats.errors += 1
                stats.written += 1
                bar.update(1)
                continue
            groups[rec.id] = (rec, [r.rid for r in reqs], {r.rid: _fresh() for r in reqs})
            for r in reqs:
                owner[r.rid] = rec.id
                engine.add(r)
        for ev in engine.step():
            _account(ev, groups, owner, writer, stats, args, bar)
    bar.close()


def _fresh() -> dict:
    return {"text": "", "finish_reason": None, "prompt_tokens": 0, "completion_tokens": 0,
            "logprobs": {"token_ids": [], "token_logprobs": []}, "diagnostics": []}


def _account(ev, groups, owner, writer: Writer, stats: Stats, args, bar) -> None:
    if isinstance(ev, PromptScores) or ev.rid not in owner:
        return
    rec_id = owner[ev.rid]
    rec, rids, state = groups[rec_id]
    part = state[ev.rid]
    part["text"] += ev.text
    if ev.token_id is not None:
        part["logprobs"]["token_ids"].append(ev.token_id)
        part["logprobs"]["token_logprobs"].append(ev.logprob)
        stats.tokens += 1
        bar.set_postfix(tok_s=f"{stats.tokens / (time.perf_counter() - stats.start):.0f}", refresh=False)
        if ev.diagnostics:
            part["diagnostics"].append(ev.diagnostics)
    part["prompt_tokens"], part["completion_tokens"] = ev.prompt_tokens, ev.completion_tokens
    if not isinstance(ev, TokenEvent) or not ev.finish_reason:
        return
    part["finish_reason"] = ev.finish_reason
    del owner[ev.rid]
    if all(state[r]["finish_reason"] for r in rids):
        want = "logprobs" in line_params(args, rec)
        diags = [d for r in rids for d in state[r]["diagnostics"]]
        writer.write(result_record(rec_id, args.model, [state[r] for r in rids], want, diags))
        stats.written += 1
        del groups[rec_id]
        bar.update(1)


def _message(err: Exception) -> str:
    if isinstance(err, ValidationError):
        first = err.errors()[0]
        return f"{error_path(first)}: {first['msg']}"
    return str(err)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if not args.ray and (isinstance(args.input, str) or isinstance(args.output, str)):
        print("filesystem URIs for --input/--output need --ray", file=sys.stderr)
        return 2
    if args.ray:
        from logitfuse.ray_batch import run_ray

        return run_ray(args)
    try:
        records = read_input(args.input)
    except OSError as err:
        print(f"cannot read input: {err}", file=sys.stderr)
        return 2
    done = finished_ids(args.output)
    stats = Stats(skipped=sum(r.id in done for r in records))
    writer = Writer(args.output)
    try:
        for bad in (r for r in records if isinstance(r, BadLine) and r.id not in done):
            writer.write(bad.record())
            stats.errors += 1
            stats.written += 1
        todo = [r for r in records if isinstance(r, Record) and r.id not in done]
        if args.server:
            from logitfuse.batch_remote import run_remote

            run_remote(args, todo, writer, stats)
        elif todo:
            run_local(args, todo, writer, stats)
    except ValueError as err:  # a bad registry or option: the job itself cannot run
        print(f"cannot run: {err}", file=sys.stderr)
        return 2
    finally:
        writer.close()
    print(stats.summary(), file=sys.stderr)
    return 0

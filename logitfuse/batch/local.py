"""`logitfuse generate`: a JSONL file of prompts through a fused model, batched, resumable, nothing lost.

Local mode keeps up to --batch-size sequences in the engine (continuous batching: a finished one is
replaced at the next step); `--server` sends the same job to a running server (batch_remote.py). Each
finished record is appended as one whole line and fsync'd; a re-run of the same job skips ids already in
the output, so a killed job resumes with nothing lost or duplicated. Everything that can stop a job (the
config, the model name, the input, an output made by another job) is checked before anything is written.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time

from tqdm import tqdm

from logitfuse import methods
from logitfuse.batch import job_file as batch_job
from logitfuse.batch import line_params as batch_lines
from logitfuse.batch.records import BadLine, Record, Stats, Writer, finished_ids, line_params, read_input, result_record
from logitfuse.config.registry import Registry
from logitfuse.engine.output import CompletionOutput
from logitfuse.errors import InvalidRequest, UnknownName
from logitfuse.methods.plan import FusionPlan


def local_source(args: argparse.Namespace) -> tuple[Registry, dict]:
    """The registry, with --model and --fusion checked against it, and what --model means in it."""
    reg = Registry.load(args.config)
    for key in (f"ensembles.{args.model}", f"models.{args.model}"):
        if key in reg.skipped:
            raise ValueError(f"--model {args.model!r} is a bad entry of {args.config}: {reg.skipped[key]}")
    batch_lines.known_model(args.model, reg.names())
    reg.plan(args.model, batch_lines.fusion(args.fusion, Record("", 0)))
    spec = reg.ensembles.get(args.model) or reg.models[args.model]
    return reg, {"registry_entry": spec.model_dump(mode="json")}


# Engine request ids are the job's own, never a line's id: a line "a" with n=2 would otherwise run as a-0 and
# a-1, the id of another line. `line-<k>` and `line-<k>-<i>` (k a counter, i a sample) cannot equal each other.
_engine_ids = itertools.count()


def build(lf, args: argparse.Namespace, rec: Record) -> list:
    params = line_params(batch_lines.sampling_defaults(args), rec, args.seed)
    sp, n = batch_lines.sampling(params, lf.settings.max_logprobs)
    fusion = batch_lines.fusion(args.fusion, rec)
    rid = f"line-{next(_engine_ids)}"
    reqs = lf.requests(args.model, rec.prompt, sp, fusion, messages=rec.messages, n=n, rid=rid)
    for r in reqs:
        lf.check(r)
    return reqs


def open_local(args: argparse.Namespace, reg: Registry, stats: Stats):
    """The library with the job's models loaded and their vocabularies checked, before anything is
    written (a job that cannot run stops instead of writing an error record per line); timed apart."""
    from logitfuse.api import LogitFuse

    t0 = time.perf_counter()
    lf = LogitFuse(reg)
    lf.prepare(args.model, batch_lines.fusion(args.fusion, Record("", 0)))
    stats.load_s = time.perf_counter() - t0
    return lf


def run_local(args: argparse.Namespace, lf, todo: list[Record], writer: Writer, stats: Stats) -> None:
    """Continuous batching over the facade. Each line's models are pinned while its sequences run (never
    evicted under them); a line whose models do not fit beside the running lines' (server.memory_budget_mb)
    waits until those finish, so a budget that holds one ensemble runs one ensemble at a time."""
    stats.started()
    pending = list(reversed(todo))
    groups: dict[str, tuple[Record, list[CompletionOutput], FusionPlan, list[str]]] = {}
    owner: dict[str, tuple[str, CompletionOutput]] = {}  # engine request id -> (record id, its sequence)
    bar = tqdm(total=len(todo), desc="generate", unit="rec")
    try:
        while pending or lf.has_work():
            while pending and len(owner) < args.batch_size:
                rec = pending[-1]
                try:
                    names = models_of(lf, args, rec)
                    if owner and not lf.room_for(names):
                        break  # the running lines hold what this one would evict
                    lf.pin(names)  # loads what is missing, pinned as it loads
                except (InvalidRequest, UnknownName, ValueError) as err:
                    stats.write(writer, batch_lines.bad_line(pending.pop().id, err).record(), bar, error=True)
                    continue
                pending.pop()
                try:
                    reqs = build(lf, args, rec)
                except (InvalidRequest, UnknownName, ValueError) as err:
                    lf.unpin(names)
                    stats.write(writer, batch_lines.bad_line(rec.id, err).record(), bar, error=True)
                    continue
                parts = [CompletionOutput(r.rid) for r in reqs]
                groups[rec.id] = (rec, parts, reqs[0].plan, names)
                for r, part in zip(reqs, parts):
                    owner[r.rid] = (rec.id, part)
                    lf.submit(r)
            for ev in lf.step():
                if ev.rid in owner:
                    _account(lf, ev, groups, owner, writer, stats, args, bar)
    finally:
        for _, _, _, names in groups.values():  # a job stopped midway leaves no pin behind (Ray reuses lf)
            lf.unpin(names)
    bar.close()


def models_of(lf, args: argparse.Namespace, rec: Record) -> list[str]:
    """Every model a line's plan uses (its errors are the line's, as build() would raise them)."""
    plan = lf.plan(args.model, batch_lines.fusion(args.fusion, rec))
    return list(dict.fromkeys(plan.models() + plan.rewards()))


def _account(lf, ev, groups: dict, owner: dict, writer: Writer, stats: Stats, args, bar) -> None:
    rec_id, part = owner[ev.rid]
    before = part.completion_tokens
    part.add(ev)
    stats.tokens += part.completion_tokens - before
    bar.set_postfix(tok_s=f"{stats.rate():.0f}", refresh=False)
    if not part.done:
        return
    del owner[ev.rid]
    rec, parts, plan, names = groups[rec_id]
    if not all(p.done for p in parts):
        return
    del groups[rec_id]
    lf.unpin(names)
    failed = next((p.error for p in parts if p.error), None)
    if failed is not None:  # not written: a re-run retries it, as a server failure would be retried
        tqdm.write(f"record {rec_id!r} failed: {failed}", file=sys.stderr)
        stats.failed += 1
        bar.update(1)
        return
    want = "logprobs" in line_params(batch_lines.sampling_defaults(args), rec, args.seed)
    summary = methods.summarise(plan, [d for p in parts for d in p.diagnostics])
    stats.write(writer, result_record(rec_id, args.model, parts, want, summary), bar)


def run(args: argparse.Namespace) -> int:
    """The whole job; 2 when it cannot start (nothing written then), else 0."""
    stats = Stats()
    try:
        records = read_input(args.input)
        if args.server:
            from logitfuse.batch.server import remote_source

            lf, source = None, remote_source(args)
        else:
            reg, source = local_source(args)
        defaults = batch_lines.sampling_defaults(args)
        job = batch_job.settings(args.model, source, args.fusion, defaults, args.seed, args.input)
        batch_job.check(args.output, job, args.overwrite)
        if not args.server:
            lf = open_local(args, reg, stats)
        batch_job.prepare(args.output, job, args.overwrite)
    except (OSError, ValueError, LookupError) as err:
        print(f"cannot start: {err}", file=sys.stderr)
        return 2
    done = finished_ids(args.output)
    stats.skipped = sum(r.id in done for r in records)
    writer = Writer(args.output)
    try:
        for bad in (r for r in records if isinstance(r, BadLine) and r.id not in done):
            stats.write(writer, bad.record(), tqdm(disable=True), error=True)
        todo = [r for r in records if isinstance(r, Record) and r.id not in done]
        if args.server:
            from logitfuse.batch.server import run_remote

            stats.started()
            run_remote(args, todo, writer, stats)
        elif todo:
            run_local(args, lf, todo, writer, stats)
    finally:
        writer.close()
    print(stats.summary(), file=sys.stderr)
    return 0

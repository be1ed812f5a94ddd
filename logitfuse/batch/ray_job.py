"""`logitfuse generate --ray`: the same job as local `generate`, run by Ray Data over a pool of actors.

    logitfuse generate --ray --num-workers 4 --model large-qa --input s3://bucket/prompts.jsonl \
        --output s3://bucket/results.jsonl --seed 0 [--ray-address auto] [--gpus-per-worker 1]

The driver reads the input, leaves out the ids already done (in the output or in committed parts, see
`logitfuse.batch.ray_files`), writes the bad lines' error records, and hands the rest to `map_batches` over an
actor pool of `--num-workers` actors. Each actor loads one `LogitFuse` once and decodes each batch of
`--block-size` records with the local mode's own loop (continuous batching, the same records, seeds and
error records), then commits the batch's records as one part. An actor that dies is restarted by Ray and its
unfinished task retried; a killed job is resumed by running the same command again.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

import numpy as np
from pyarrow.fs import LocalFileSystem
from tqdm import tqdm

from logitfuse.batch import job_file as batch_job
from logitfuse.batch import line_params as batch_lines
from logitfuse.batch.local import local_source, run_local
from logitfuse.batch.ray_files import JobFiles, read_bytes, resolve
from logitfuse.batch.records import BadLine, Record, Stats, read_input


class Collect:
    """A Writer that keeps the records in memory (the actor commits them as one part)."""

    def __init__(self) -> None:
        self.records: list[dict] = []

    def write(self, obj: dict) -> None:
        self.records.append(obj)


class Worker:
    """One actor of the pool: one LogitFuse, loaded once; each call decodes one batch and commits its part."""

    def __init__(self, args: argparse.Namespace) -> None:
        from logitfuse.api import LogitFuse

        self.args, self.files = args, JobFiles(args.output)
        self.lf = LogitFuse(args.config)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        todo = [Record(**json.loads(text)) for text in batch["record"]]
        sink, stats = Collect(), Stats()
        run_local(self.args, self.lf, todo, sink, stats)
        self.commit(sink.records)
        return {"written": np.array([stats.written]), "errors": np.array([stats.errors]),
                "failed": np.array([stats.failed]), "tokens": np.array([stats.tokens])}

    def commit(self, records: list[dict]) -> None:
        self.files.commit(records)


def load_input(location: str) -> list[Record | BadLine]:
    """The input's records, parsed as local mode parses them (a URI is copied to a temporary file first)."""
    fs, path = resolve(location)
    if isinstance(fs, LocalFileSystem):
        return read_input(Path(path))
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / "input.jsonl"
        local.write_bytes(read_bytes(fs, path))
        return read_input(local)


def connect(address: str | None, num_cpus: int | None = None) -> None:
    import ray

    if not ray.is_initialized():
        address = address or os.environ.get("RAY_ADDRESS")
        ray.init(address=address, num_cpus=None if address else num_cpus, include_dashboard=False)


def dispatch(args, todo: list[Record], stats: Stats, worker_cls: type = Worker) -> None:
    """Run `todo` through the actor pool; the parts are committed by the actors."""
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False  # ours counts records, as local mode
    rows = [{"id": r.id, "record": json.dumps(asdict(r))} for r in todo]
    ds = ray.data.from_items(rows, override_num_blocks=max(1, math.ceil(len(rows) / args.block_size)))
    out = ds.map_batches(worker_cls, fn_constructor_kwargs={"args": args}, batch_size=args.block_size,
                         compute=ray.data.ActorPoolStrategy(size=args.num_workers), num_cpus=args.cpus_per_worker,
                         num_gpus=args.gpus_per_worker or None,
                         runtime_env={"env_vars": {"TQDM_DISABLE": "1"}})
    with tqdm(total=len(todo), desc="generate --ray", unit="rec") as bar:
        for batch in out.iter_batches(batch_size=None, batch_format="numpy"):
            stats.written += int(batch["written"].sum())
            stats.errors += int(batch["errors"].sum())
            stats.failed += int(batch["failed"].sum())  # not written: a re-run retries them, as in local mode
            stats.tokens += int(batch["tokens"].sum())
            bar.update(int(batch["written"].sum() + batch["failed"].sum()))


def run_ray(args, worker_cls: type = Worker) -> int:
    """The whole job: resume, error records, dispatch, merge; the same summary as local mode."""

    args.output, args.input = str(args.output), str(args.input)
    if args.server:
        print("--ray and --server are two ways to run a job: choose one", file=sys.stderr)
        return 2
    try:
        _, source = local_source(args)  # a bad registry, an unknown --model or --fusion stops here
        records = load_input(args.input)
        files = JobFiles(args.output)
        digest = hashlib.sha256(read_bytes(*resolve(args.input))).hexdigest()
        job = batch_job.settings(args.model, source, args.fusion, batch_lines.sampling_defaults(args), args.seed,
                                 None, input_sha256=digest)
        files.prepare_job(job, args.overwrite)  # another job's output is refused, as in local mode
    except (OSError, ValueError, LookupError) as err:
        print(f"cannot start: {err}", file=sys.stderr)
        return 2
    done = files.done_ids()
    stats = Stats(skipped=sum(r.id in done for r in records))
    bad = [r.record() for r in records if isinstance(r, BadLine) and r.id not in done]
    files.commit(bad)
    stats.errors = stats.written = len(bad)
    todo = [r for r in records if isinstance(r, Record) and r.id not in done]
    if todo:
        connect(args.ray_address, num_cpus=max(2, math.ceil(args.num_workers * args.cpus_per_worker)))
        dispatch(args, todo, stats, worker_cls)
    files.merge()
    print(stats.summary(), file=sys.stderr)
    return 0

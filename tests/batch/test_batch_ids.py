"""A job's engine request ids are its own: no user id (with or without n) can collide with another's."""

import json

import pytest

from logitfuse.cli import build_parser
from logitfuse.cli import main as cli

# "a" with n=2 once became engine ids a-0 and a-1, the first of them the id of the next line
LINES = [{"id": "a", "prompt": "the red city", "n": 2}, {"id": "a-0", "prompt": "king queen"},
         {"id": "a-1", "prompt": "one two", "n": 2}]
RENAMED = {"a": "x", "a-0": "y", "a-1": "z"}


def write(path, lines):
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))


def job(config_file, inp, out):
    return ["generate", "--config", str(config_file), "--model", "proxy-a", "--input", str(inp), "--output", str(out),
            "--temperature", "0", "--max-tokens", "6", "--batch-size", "8"]


def records(path):
    return {r["id"]: r for r in map(json.loads, path.read_text().splitlines())}


def reference(config_file, tmp_path):
    """The same lines under ids that cannot be confused, in the same batch: what each record must be."""
    write(tmp_path / "ref.jsonl", [{**line, "id": RENAMED[line["id"]]} for line in LINES])
    assert cli(job(config_file, tmp_path / "ref.jsonl", tmp_path / "ref.out.jsonl")) == 0
    return {k: {**records(tmp_path / "ref.out.jsonl")[v], "id": k} for k, v in RENAMED.items()}


def test_a_line_named_like_another_lines_sample_gets_its_own_record(config_file, tmp_path):
    write(tmp_path / "in.jsonl", LINES)
    assert cli(job(config_file, tmp_path / "in.jsonl", tmp_path / "out.jsonl")) == 0
    got = records(tmp_path / "out.jsonl")
    assert got == reference(config_file, tmp_path)
    assert [len(got[k].get("choices", [None])) for k in ("a", "a-0", "a-1")] == [2, 1, 2]
    assert all("error" not in r for r in got.values())


def ray_worker(config_file, tmp_path):
    """A `generate --ray` actor over LINES, outside a cluster, and the rows Ray Data would hand it."""
    from logitfuse.batch.ray_job import Worker

    write(tmp_path / "in.jsonl", LINES)
    args = build_parser().parse_args(job(config_file, tmp_path / "in.jsonl", tmp_path / "ray.jsonl") + ["--ray"])
    args.output = str(args.output)
    rows = [json.dumps({"id": line["id"], "line": i + 1, "prompt": line["prompt"], "messages": None,
                        "params": {"n": line["n"]} if "n" in line else {}}) for i, line in enumerate(LINES)]
    return Worker(args), rows


def test_a_ray_worker_batch_with_colliding_names_gives_every_record(config_file, tmp_path):
    np = pytest.importorskip("numpy")
    pytest.importorskip("ray")
    worker, rows = ray_worker(config_file, tmp_path)
    worker.files.prepare_job({"job": "ids"}, overwrite=True)
    out = worker({"record": np.array(rows)})
    assert (int(out["written"][0]), int(out["errors"][0])) == (3, 0)
    worker.files.merge()
    assert records(tmp_path / "ray.jsonl") == reference(config_file, tmp_path)


def test_a_ray_worker_reports_the_records_that_failed(config_file, tmp_path):
    np = pytest.importorskip("numpy")
    pytest.importorskip("ray")
    from dataclasses import replace

    worker, rows = ray_worker(config_file, tmp_path)
    real, failed = worker.lf.step, []

    def step():  # the first sequence to finish ends in an engine error instead (as a failed remote row would)
        out = []
        for ev in real():
            if ev.finish_reason and not failed:
                failed.append(ev.rid)
                ev = replace(ev, token_id=None, text="", finish_reason="error", error="boom")
            out.append(ev)
        return out

    worker.lf.step = step
    worker.files.prepare_job({"job": "failed"}, overwrite=True)
    out = worker({"record": np.array(rows)})
    assert (int(out["written"][0]), int(out["failed"][0]), int(out["errors"][0])) == (2, 1, 0)

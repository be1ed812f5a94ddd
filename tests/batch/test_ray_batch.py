"""`generate --ray` on a local Ray cluster: the same records as local mode, and exactly one record per id when
an actor is killed mid-job or the driver is killed and the job re-run."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("ray")

import ray

from logitfuse.batch.ray_files import JobFiles
from logitfuse.batch.ray_job import Worker, run_ray
from logitfuse.cli import build_parser
from logitfuse.cli import main as cli


def main(argv):
    return cli(["generate", *[str(a) for a in argv]])


def parse_args(argv):
    return build_parser().parse_args(["generate", *[str(a) for a in argv]])


WORDS = "the red city king queen river blue green one two three north south".split()
N = 16


def write_prompts(path: Path, n: int = N) -> None:
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"id": f"p{i}", "prompt": " ".join(WORDS[(i + k) % len(WORDS)] for k in range(3))})
                    + "\n")
        f.write(json.dumps({"id": "hot", "prompt": "the king", "temperature": -1}) + "\n")
        f.write("{not json\n")


def args(config_file, inp, out, *extra) -> list[str]:
    return ["--config", str(config_file), "--model", "proxy-a", "--input", str(inp), "--output", str(out),
            "--seed", "7", "--temperature", "0.9", "--max-tokens", "12", "--batch-size", "4", *extra]


def by_id(path: Path) -> dict[str, dict]:
    records = [json.loads(line) for line in path.read_text().splitlines()]
    out = {r["id"]: r for r in records}
    assert len(out) == len(records), "an id was written twice"
    return out


@pytest.fixture(scope="module")
def local(config_file, tmp_path_factory):
    """The job run in local mode: the reference every Ray run must reproduce record for record."""
    root = tmp_path_factory.mktemp("local")
    write_prompts(root / "in.jsonl")
    assert main(args(config_file, root / "in.jsonl", root / "out.jsonl")) == 0
    return root / "in.jsonl", by_id(root / "out.jsonl")


def test_two_workers_give_the_local_records_on_a_uri_output(ray_cluster, config_file, local, tmp_path):
    inp, expected = local
    out = tmp_path / "ray.jsonl"
    rc = main(args(config_file, inp, f"file://{out}", "--ray", "--num-workers", "2", "--block-size", "4"))
    assert rc == 0
    got = by_id(out)
    assert set(got) == {f"p{i}" for i in range(N)} | {"hot", "line-18"}
    assert got == expected  # same seeds per id, same texts, same error records
    assert "temperature" in got["hot"]["error"]["message"]
    assert not (tmp_path / "ray.jsonl.parts").exists(), "the parts are merged and removed"


class KillingWorker(Worker):
    """Kills its own actor (ray.kill) once before and once after committing a part: Ray restarts the actor
    and retries the task, which must neither lose the batch nor write it twice."""

    def commit(self, records: list[dict]) -> None:
        marks = Path(self.args.output).parent
        self._maybe_die(marks / "killed-before")
        super().commit(records)
        self._maybe_die(marks / "killed-after")

    @staticmethod
    def _maybe_die(mark: Path) -> None:
        try:
            os.close(os.open(mark, os.O_CREAT | os.O_EXCL))
        except FileExistsError:
            return
        ray.kill(ray.get_runtime_context().current_actor, no_restart=False)
        time.sleep(60)  # the kill lands while the task is still running


def test_killed_actor_still_gives_one_record_per_id(ray_cluster, config_file, local, tmp_path):
    inp, expected = local
    out = tmp_path / "ray.jsonl"
    ns = parse_args(args(config_file, inp, out, "--ray", "--num-workers", "1", "--block-size", "6"))
    assert run_ray(ns, worker_cls=KillingWorker) == 0
    assert (tmp_path / "killed-before").exists() and (tmp_path / "killed-after").exists()
    assert by_id(out) == expected


def test_killed_driver_rerun_completes_with_nothing_twice(ray_cluster, config_file, local, tmp_path):
    inp, expected = local
    out = tmp_path / "ray.jsonl"
    parts = tmp_path / "ray.jsonl.parts"
    cmd = [sys.executable, "-m", "logitfuse.cli", "generate",
           *args(config_file, inp, out, "--ray", "--num-workers", "1", "--block-size", "2", "--batch-size", "1",
                 "--ray-address", ray_cluster)]
    proc = subprocess.Popen(cmd, env={**os.environ, "PYTHONPATH": os.getcwd()}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 180
    while time.time() < deadline and len(JobFiles(str(out)).part_paths()) < 3:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = JobFiles(str(out)).done_ids()
    assert not out.exists() and 3 <= len(done) < N, "the kill must land mid-job"
    (parts / "part-cut.jsonl.tmp-0123").write_text('{"id": "p0", "text": "half a pa')  # a write cut by the kill
    assert main(args(config_file, inp, out, "--ray", "--num-workers", "2", "--block-size", "4")) == 0
    assert by_id(out) == expected
    assert not parts.exists()
    assert main(args(config_file, inp, out, "--ray")) == 0 and by_id(out) == expected  # nothing left to do


def test_uri_without_ray_and_ray_with_server_are_refused(config_file, tmp_path, capsys):
    inp = tmp_path / "in.jsonl"
    write_prompts(inp, 2)
    assert main(args(config_file, inp, f"file://{tmp_path}/o.jsonl")) == 2
    assert "need --ray" in capsys.readouterr().err
    assert main(args(config_file, inp, tmp_path / "o.jsonl", "--ray", "--server", "http://x:1")) == 2
    assert "choose one" in capsys.readouterr().err


def test_ray_resume_refuses_another_jobs_output_and_overwrite_starts_over(ray_cluster, config_file, tmp_path,
                                                                          capsys):
    """The job file guards --ray outputs as it guards local ones: other settings are refused with the output
    untouched; the same settings resume (here: nothing left, so no cluster starts); --overwrite starts over."""
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_prompts(inp, 3)
    assert main(args(config_file, inp, out)) == 0  # made in local mode: its job file names the settings
    before = out.read_bytes()
    assert main([*args(config_file, inp, out, "--ray"), "--temperature", "0.5"]) == 2
    err = capsys.readouterr().err
    assert "made by another job" in err and "sampling.temperature: 0.9 in the job file, 0.5 now" in err
    assert out.read_bytes() == before
    (tmp_path / "out.jsonl.job.json").unlink()
    assert main(args(config_file, inp, out, "--ray")) == 2
    assert "no job file" in capsys.readouterr().err and out.read_bytes() == before
    assert main([*args(config_file, inp, out, "--ray"), "--overwrite"]) == 0
    assert by_id(out) == {r["id"]: r for r in map(json.loads, before.decode().splitlines())}
    assert (tmp_path / "out.jsonl.job.json").exists()

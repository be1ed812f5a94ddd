"""`logitfuse generate`: resumable after kill -9 with nothing lost or duplicated, error records for bad
lines, and the same results against a running server."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from logitfuse.cli import main as cli
from logitfuse.service.app import start_in_thread

WORDS = "the red city king queen river blue green one two three north south".split()


def write_prompts(path, n):
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"id": f"p{i}", "prompt": " ".join(WORDS[(i + k) % len(WORDS)] for k in range(3))})
                    + "\n")


def read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def main(argv):
    return cli(["generate", *argv])


def args(config_file, inp, out, *extra):
    return ["--config", str(config_file), "--model", "proxy-a", "--input", str(inp), "--output", str(out),
            "--seed", "7", "--temperature", "0.9", "--max-tokens", "24", "--batch-size", "2", *extra]


def test_killed_job_resumes_with_nothing_lost_or_duplicated(config_file, tmp_path):
    inp, full, killed = tmp_path / "in.jsonl", tmp_path / "full.jsonl", tmp_path / "killed.jsonl"
    write_prompts(inp, 40)
    assert main(args(config_file, inp, full, "--batch-size", "8")) == 0
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    proc = subprocess.Popen([sys.executable, "-m", "logitfuse.cli", "generate", *args(config_file, inp, killed)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and (not killed.exists() or len(killed.read_text().splitlines()) < 3):
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = killed.read_text().splitlines()
    assert 3 <= len(partial) < 40, "the kill must land mid-job"
    with open(killed, "a") as f:
        f.write('{"id": "p39", "text": "half a li')  # a line cut by the kill
    assert main(args(config_file, inp, killed)) == 0
    resumed, uninterrupted = read(killed), read(full)
    assert sorted(r["id"] for r in resumed) == sorted(f"p{i}" for i in range(40))
    assert {r["id"]: r for r in resumed} == {r["id"]: r for r in uninterrupted}
    assert resumed[: len(partial)] == [json.loads(x) for x in partial]
    assert main(args(config_file, inp, killed)) == 0 and read(killed) == resumed  # nothing left to do


def test_bad_lines_become_error_records_and_the_job_goes_on(config_file, tmp_path):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    lines = ['{"id": "ok1", "prompt": "the red city"}', "{not json", '{"prompt": "no id"}',
             '{"id": "np"}', '{"id": "t", "prompt": "x", "temperature": -3}',
             '{"id": "e", "prompt": "x", "fusion": {"experts": ["nobody"]}}', '{"id": "ok1", "prompt": "dup"}',
             '{"id": "chat", "messages": [{"role": "user", "content": "king queen"}], "n": 2}',
             '{"id": "lp", "prompt": "one two", "logprobs": 2, "max_tokens": 3}',
             '{"id": "lb", "prompt": "x", "logit_bias": {"7": 100}, "max_tokens": 3, "ignore_eos": true}',
             '{"id": "lbx", "prompt": "x", "logit_bias": {"seven": 100}}']
    inp.write_text("\n".join(lines) + "\n")
    assert main(args(config_file, inp, out)) == 0
    recs = {r["id"]: r for r in read(out)}
    assert set(recs) == {"ok1", "line-2", "line-3", "np", "t", "e", "ok1@line-7", "chat", "lp", "lb", "lbx"}
    assert "malformed JSON" in recs["line-2"]["error"]["message"]
    assert recs["t"]["error"]["param"] == "temperature"
    assert "nobody" in recs["e"]["error"]["message"]
    assert "duplicate id" in recs["ok1@line-7"]["error"]["message"]
    assert len(recs["chat"]["choices"]) == 2 and recs["ok1"]["finish_reason"] in ("stop", "length")
    assert len(recs["lp"]["logprobs"]["token_logprobs"]) == recs["lp"]["completion_tokens"]
    assert recs["lbx"]["error"]["param"] == "logit_bias" and recs["lb"]["completion_tokens"] == 3


@pytest.fixture
def server(config_file):
    url, srv = start_in_thread(config_file)
    yield url
    srv.should_exit = True


def test_server_mode_gives_the_local_results(config_file, tmp_path, server):
    inp, local, remote = tmp_path / "in.jsonl", tmp_path / "local.jsonl", tmp_path / "remote.jsonl"
    write_prompts(inp, 12)
    with open(inp, "a") as f:
        f.write('{"id": "bad", "prompt": "x", "top_p": 7}\n')
        f.write('{"id": "chat", "messages": [{"role": "user", "content": "king"}]}\n')
    assert main(args(config_file, inp, local)) == 0
    assert main(args(config_file, inp, remote, "--server", server, "--concurrency", "4")) == 0
    keys = ("id", "text", "finish_reason", "prompt_tokens", "completion_tokens")
    loc = {r["id"]: {k: r.get(k) for k in keys} for r in read(local) if "error" not in r}
    rem = {r["id"]: {k: r.get(k) for k in keys} for r in read(remote) if "error" not in r}
    assert loc == rem and len(loc) == 13
    assert [r["error"]["param"] for r in read(remote) if "error" in r] == ["top_p"]


def small_job(config_file, inp, out, *extra):
    return ["--config", str(config_file), "--model", "proxy-a", "--input", str(inp), "--output", str(out),
            "--temperature", "0", "--max-tokens", "3", *extra]


def test_an_unknown_model_stops_the_job_before_anything_is_written(config_file, tmp_path, capsys):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_prompts(inp, 3)
    assert main(small_job(config_file, inp, out, "--model", "proxy-aa")) == 2
    err = capsys.readouterr().err
    assert "cannot start: model 'proxy-aa' not found (did you mean 'proxy-a'?); available: proxy-a, eft-ab" in err
    assert sorted(tmp_path.iterdir()) == [inp]  # neither an output nor a job file


def test_a_job_whose_models_do_not_fit_together_stops_before_writing(config_file, tmp_path, capsys):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_prompts(inp, 3)
    assert main(small_job(config_file, inp, out, "--fusion", '{"experts": ["alien"]}')) == 2
    assert "cannot start: vocabulary mismatch between 'base-large' and 'foreign'" in capsys.readouterr().err
    assert sorted(tmp_path.iterdir()) == [inp]


def test_resume_is_refused_for_another_job_and_overwrite_starts_over(config_file, tmp_path, capsys):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_prompts(inp, 2)
    assert main(small_job(config_file, inp, out)) == 0
    first = out.read_text()
    assert len(read(out)) == 2 and (tmp_path / "out.jsonl.job.json").exists()
    capsys.readouterr()
    for extra, named in ((["--temperature", "0.5"], 'sampling.temperature: 0.0 in the job file, 0.5 now'),
                         (["--model", "eft-ab"], 'model: "proxy-a" in the job file, "eft-ab" now'),
                         (["--fusion", '{"alpha": 0.5}'], 'fusion: null in the job file, {"alpha": 0.5} now'),
                         (["--seed", "3"], "seed: null in the job file, 3 now")):
        assert main(small_job(config_file, inp, out, *extra)) == 2
        err = capsys.readouterr().err
        assert f"{out} was made by another job" in err and named in err and "--overwrite" in err
        assert out.read_text() == first
    with open(inp, "a") as f:
        f.write('{"id": "new", "prompt": "king"}\n')
    assert main(small_job(config_file, inp, out)) == 2
    assert "the input file's content differs" in capsys.readouterr().err and out.read_text() == first
    assert main(small_job(config_file, inp, out, "--max-tokens", "1", "--overwrite")) == 0
    recs = read(out)
    assert len(recs) == 3 and all(r["completion_tokens"] == 1 for r in recs)
    (tmp_path / "out.jsonl.job.json").unlink()  # an output no job file vouches for
    assert main(small_job(config_file, inp, out, "--max-tokens", "1")) == 2
    assert "has no job file out.jsonl.job.json" in capsys.readouterr().err and read(out) == recs


def test_the_summary_reports_loading_apart_from_decoding(config_file, tmp_path, capsys):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_prompts(inp, 2)
    assert main(small_job(config_file, inp, out)) == 0
    summary = capsys.readouterr().err.strip().splitlines()[-1]
    assert "2 records written (0 error records)" in summary
    assert "models loaded in " in summary and " tokens generated in " in summary and "tokens/s" in summary
    tokens = int(summary.split("; ")[-1].split(" tokens generated")[0])
    assert tokens == sum(r["completion_tokens"] for r in read(out))


SAME_JOB = [
    '{"id": "plain", "prompt": "the red city"}',
    '{"id": "lp", "prompt": "one two", "logprobs": 3}',
    '{"id": "lp0", "prompt": "king queen", "logprobs": 0, "max_tokens": 2}',
    '{"id": "n2", "prompt": "north south", "n": 2, "logprobs": 1}',
    '{"id": "chat", "messages": [{"role": "user", "content": "king"}], "logprobs": 2}',
    '{"id": "dlf", "prompt": "blue green", "fusion": {"method": "dlf", "experts": ["a", "b"]}}',
    '{"id": "ids", "prompt": [5, 6, 7], "stop_token_ids": [2], "ignore_eos": true}',
    '{"id": "top_p", "prompt": "x", "top_p": 3}',
    '{"id": "expert", "prompt": "x", "fusion": {"experts": ["nobody"]}}',
    '{"id": "alpha", "prompt": "x", "fusion": {"alpha": "big"}}',
    '{"id": "toomany", "prompt": "x", "logprobs": 50}',
    '{"id": "chat-lp", "messages": [{"role": "user", "content": "x"}], "logprobs": 50}',
    '{"id": "type", "prompt": "x", "max_tokens": "four"}',
    '{not json',
]


def test_local_and_server_jobs_write_the_same_records(config_file, tmp_path, server):
    inp, local, remote = tmp_path / "in.jsonl", tmp_path / "local.jsonl", tmp_path / "remote.jsonl"
    inp.write_text("\n".join(SAME_JOB) + "\n")
    job = ["--model", "proxy-a", "--input", str(inp), "--temperature", "0", "--max-tokens", "4"]
    # one prompt at a time in both: float32 scores then come from the same arithmetic, bit for bit
    assert main(["--config", str(config_file), *job, "--output", str(local), "--batch-size", "1"]) == 0
    assert main([*job, "--output", str(remote), "--server", server, "--concurrency", "1"]) == 0
    loc, rem = ({r["id"]: r for r in read(p)} for p in (local, remote))
    assert len(loc) == len(SAME_JOB)
    assert loc == rem  # field for field: texts, logprobs, counts, diagnostics, errors
    assert loc["lp"]["logprobs"]["token_ids"] and all(len(t) == 3 for t in loc["lp"]["logprobs"]["top_logprobs"])
    assert loc["lp0"]["logprobs"]["top_logprobs"] == [[], []]
    assert len(loc["n2"]["choices"]) == 2 and loc["dlf"]["fusion_diagnostics"]["method"] == "dlf"
    assert {k: loc[k]["error"]["status"] for k in ("top_p", "expert", "alpha", "toomany", "chat-lp", "type")} == \
        {"top_p": 400, "expert": 404, "alpha": 400, "toomany": 400, "chat-lp": 400, "type": 400}
    assert loc["top_p"]["error"] == {"message": "top_p must be in (0, 1], got 3.0", "param": "top_p", "status": 400}
    assert loc["chat-lp"]["error"]["param"] == "logprobs"

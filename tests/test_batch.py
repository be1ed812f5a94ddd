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
from service.app import start_in_thread

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

"""Batch lines take the same structured-output, penalty and token-control fields as the server, with the same
results locally and against a server, and the same error records for bad values."""

import json
import re

import pytest

from logitfuse.cli import main as cli
from logitfuse.service.app import start_in_thread

pytest.importorskip("llguidance")

CHOICES = ["red city", "blue king", "the north"]
REGEX = "(red|blue) (city|king)"
LINES = [
    {"id": "choice", "prompt": "the red city", "guided_choice": CHOICES, "n": 3, "temperature": 1.0},
    {"id": "regex", "prompt": "king queen", "structured_outputs": {"regex": REGEX}},
    {"id": "chat", "messages": [{"role": "user", "content": "king"}], "guided_regex": REGEX},
    {"id": "pen", "prompt": "one two", "repetition_penalty": 3.0, "frequency_penalty": 1.0, "presence_penalty": 0.5,
     "min_tokens": 3, "bad_words": ["first"], "ignore_eos": True},
    {"id": "keep", "prompt": "one two", "allowed_token_ids": [10, 20, 30], "max_tokens": 3, "ignore_eos": True,
     "skip_special_tokens": False, "include_stop_str_in_output": True},
    {"id": "badre", "prompt": "x", "guided_regex": "(x"},
    {"id": "badpen", "prompt": "x", "frequency_penalty": 5},
    {"id": "badtype", "prompt": "x", "bad_words": "first"},
]


def read(path):
    return {r["id"]: r for r in map(json.loads, path.read_text().splitlines())}


@pytest.fixture
def server(config_file):
    url, srv = start_in_thread(config_file)
    yield url
    srv.should_exit = True


def test_lines_with_controls_give_the_same_records_locally_and_against_a_server(config_file, tmp_path, server):
    inp, local, remote = tmp_path / "in.jsonl", tmp_path / "local.jsonl", tmp_path / "remote.jsonl"
    inp.write_text("\n".join(json.dumps(x) for x in LINES) + "\n")
    job = ["--model", "proxy-a", "--input", str(inp), "--seed", "3", "--max-tokens", "12", "--temperature", "0.8"]
    assert cli(["generate", "--config", str(config_file), *job, "--output", str(local), "--batch-size", "1"]) == 0
    assert cli(["generate", *job, "--output", str(remote), "--server", server, "--concurrency", "1"]) == 0
    loc, rem = read(local), read(remote)
    assert all(c["text"] in CHOICES for c in loc["choice"]["choices"])
    assert re.fullmatch(REGEX, loc["regex"]["text"]) and re.fullmatch(REGEX, loc["chat"]["text"])
    assert loc["pen"]["completion_tokens"] >= 3 and "first" not in loc["pen"]["text"]
    assert loc["badre"]["error"]["param"] == "guided_regex" and "cannot be compiled" in loc["badre"]["error"]["message"]
    assert loc["badpen"]["error"]["param"] == "frequency_penalty"
    assert loc["badtype"]["error"]["param"] == "bad_words"
    texts = lambda recs: {k: (v.get("text"), v.get("choices"), (v.get("error") or {}).get("param"))  # noqa: E731
                          for k, v in recs.items()}
    assert texts(loc) == texts(rem)

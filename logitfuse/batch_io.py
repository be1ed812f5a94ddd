"""JSONL in and out for `logitfuse generate`: parse input records, resume from an existing output file,
append whole lines durably.

Input line: {"id", "prompt": str | [ids]} or {"id", "messages": [...]}, plus optional sampling fields and
"fusion". Output line: a result {"id", "model", "text" | "choices", "finish_reason", "prompt_tokens",
"completion_tokens", ...} or an error record {"id", "error": {"message", "param"}}.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

SAMPLING_FIELDS = ("max_tokens", "temperature", "top_p", "top_k", "min_p", "stop", "stop_token_ids", "seed",
                   "logprobs", "ignore_eos", "n", "logit_bias")


@dataclass
class Record:
    id: str
    line: int
    prompt: str | list[int] | None = None
    messages: list[dict] | None = None
    params: dict = field(default_factory=dict)  # sampling fields given on the line
    fusion: dict | None = None


@dataclass
class BadLine:
    id: str
    message: str
    param: str | None = None

    def record(self) -> dict:
        return {"id": self.id, "error": {"message": self.message, "param": self.param}}


def parse_line(text: str, line_no: int) -> Record | BadLine:
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as err:
        return BadLine(f"line-{line_no}", f"malformed JSON on line {line_no}: {err.msg}", "line")
    if not isinstance(obj, dict):
        return BadLine(f"line-{line_no}", f"line {line_no} is not a JSON object", "line")
    if "id" not in obj or not isinstance(obj["id"], (str, int)) or isinstance(obj["id"], bool):
        return BadLine(f"line-{line_no}", f"line {line_no} has no string or integer 'id'", "id")
    rid = str(obj["id"])
    has_prompt, has_messages = obj.get("prompt") not in (None, "", []), bool(obj.get("messages"))
    if has_prompt == has_messages:
        return BadLine(rid, "each line needs exactly one of 'prompt' or 'messages'", "prompt")
    if has_messages and not isinstance(obj["messages"], list):
        return BadLine(rid, "'messages' must be a list of {role, content}", "messages")
    if obj.get("fusion") is not None and not isinstance(obj["fusion"], dict):
        return BadLine(rid, "'fusion' must be an object", "fusion")
    params = {k: obj[k] for k in SAMPLING_FIELDS if k in obj}
    return Record(rid, line_no, obj.get("prompt") if has_prompt else None, obj.get("messages"), params,
                  obj.get("fusion"))


def read_input(path: Path) -> list[Record | BadLine]:
    """Every non-blank line; a repeated id is an error record for the later line."""
    out: list[Record | BadLine] = []
    seen: set[str] = set()
    with open(path, encoding="utf-8") as f:
        for n, text in enumerate(f, start=1):
            if not text.strip():
                continue
            rec = parse_line(text, n)
            if isinstance(rec, Record) and rec.id in seen:
                rec = BadLine(f"{rec.id}@line-{n}", f"duplicate id {rec.id!r} on line {n}", "id")
            seen.add(rec.id)
            out.append(rec)
    return out


def finished_ids(path: Path) -> set[str]:
    """Ids with a complete record in an existing output; a trailing partial line (a killed run) is cut off."""
    if not path.exists():
        return set()
    with open(path, "rb+") as f:
        data = f.read()
        end = data.rfind(b"\n") + 1
        if end < len(data):
            f.truncate(end)
    done = set()
    for line in data[:end].decode("utf-8").splitlines():
        try:
            done.add(str(json.loads(line)["id"]))
        except (json.JSONDecodeError, KeyError, TypeError):
            continue
    return done


class Writer:
    """Appends one whole JSON line per record, flushed and fsync'd before the next one."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.f = open(path, "a", encoding="utf-8")

    def write(self, obj: dict) -> None:
        self.f.write(json.dumps(obj, ensure_ascii=False) + "\n")
        self.f.flush()
        os.fsync(self.f.fileno())

    def close(self) -> None:
        self.f.close()


def record_seed(global_seed: int | None, rid: str, params: dict) -> int | None:
    """A line's own seed, else one derived from (--seed, id) so resumed runs reproduce uninterrupted ones."""
    if "seed" in params:
        return params["seed"]
    if global_seed is None:
        return None
    return int.from_bytes(hashlib.sha256(f"{global_seed}:{rid}".encode()).digest()[:4], "big") >> 1

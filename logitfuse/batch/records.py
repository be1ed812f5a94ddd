"""JSONL in and out for `logitfuse generate`: parse input records, resume from an existing output file,
append whole lines durably, and build the output records (one builder for local and `--server` jobs).

Input line: {"id", "prompt": str | [ids]} or {"id", "messages": [...]}, plus optional sampling fields and
"fusion". Output line: a result {"id", "model", "text" | "choices", "finish_reason", "prompt_tokens",
"completion_tokens", ...} (with "influence" per generated token when fusion.influence asks) or an error record
{"id", "error": {"message", "param", "status"}} (docs/batch.md).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from logitfuse.engine.output import CompletionOutput

SAMPLING_FIELDS = ("max_tokens", "temperature", "top_p", "top_k", "min_p", "stop", "stop_token_ids", "seed",
                   "logprobs", "ignore_eos", "n", "logit_bias", "presence_penalty", "frequency_penalty",
                   "repetition_penalty", "min_tokens", "bad_words", "allowed_token_ids", "include_stop_str_in_output",
                   "skip_special_tokens", "response_format", "structured_outputs", "guided_json", "guided_regex",
                   "guided_choice", "guided_grammar")


@dataclass
class Stats:
    """What a job did, for its summary line; `write` appends a record and counts it."""

    written: int = 0
    errors: int = 0
    skipped: int = 0
    failed: int = 0
    tokens: int = 0
    load_s: float | None = None  # loading the models (local mode), apart from decoding
    start: float = field(default_factory=time.perf_counter)  # decoding starts here

    def started(self) -> None:
        self.start = time.perf_counter()

    def rate(self) -> float:
        return self.tokens / max(time.perf_counter() - self.start, 1e-9)

    def write(self, writer: Writer, record: dict, bar, error: bool = False) -> None:
        writer.write(record)
        self.written += 1
        self.errors += error
        bar.update(1)

    def summary(self) -> str:
        wall = time.perf_counter() - self.start
        load = f"models loaded in {self.load_s:.1f} s; " if self.load_s is not None else ""
        return (f"{self.written} records written ({self.errors} error records), {self.skipped} already done, "
                f"{self.failed} failed (re-run to retry); {load}{self.tokens} tokens generated in {wall:.1f} s "
                f"({self.rate():.1f} tokens/s)")


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

    status: int = 400  # the HTTP status the same mistake gets from the server (400 bad input, 404 unknown name)

    def record(self) -> dict:
        return {"id": self.id, "error": {"message": self.message, "param": self.param, "status": self.status}}


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
    prompt = obj.get("prompt")
    if has_prompt and not (isinstance(prompt, str) or (isinstance(prompt, list) and all(
            isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in prompt))):
        return BadLine(rid, "'prompt' must be a string or a list of token ids", "prompt")
    if has_messages and not (isinstance(obj["messages"], list) and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in obj["messages"])):
        return BadLine(rid, "'messages' must be a list of {role, content} with string values", "messages")
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


def line_params(defaults: dict, rec: Record, global_seed: int | None) -> dict:
    """The sampling fields of a line: the line's own, else the command's defaults; seed per record."""
    params = {k: v for k, v in defaults.items() if v is not None} | rec.params
    seed = record_seed(global_seed, rec.id, rec.params)
    return params | ({"seed": seed} if seed is not None else {})


def logprobs_record(c: CompletionOutput) -> dict:
    """The chosen tokens' ids and fused logprobs, and per token the top-N as [token id, logprob] pairs."""
    return {"token_ids": c.token_ids, "token_logprobs": c.logprobs,
            "top_logprobs": [[[t.token_id, t.logprob] for t in (top or [])] for top in c.top_logprobs]}


def result_record(rec_id: str, model: str, parts: list[CompletionOutput], want_logprobs: bool,
                  diagnostics: dict | None = None) -> dict:
    """The output line of a finished prompt: one part flat, several (n > 1) as "choices"; `diagnostics`:
    the method's summary of the per-step diagnostics (methods.summarise), as the server reports it."""
    def choice(c: CompletionOutput) -> dict:
        out = {"text": c.text, "finish_reason": c.reported_finish_reason}
        out |= {"logprobs": logprobs_record(c)} if want_logprobs else {}
        return out | ({"influence": c.influence} if c.influence is not None else {})  # asked: fusion.influence

    out: dict = {"id": rec_id, "model": model}
    out |= choice(parts[0]) if len(parts) == 1 else {"choices": [choice(c) for c in parts]}
    out["prompt_tokens"] = parts[0].prompt_tokens
    out["completion_tokens"] = sum(c.completion_tokens for c in parts)
    if diagnostics is not None:
        out["fusion_diagnostics"] = diagnostics
    return out

"""A batch job's identity: the settings that decide its results, kept beside the output in a job file.

`results.jsonl` gets `results.jsonl.job.json` before its first record. A re-run resumes only when its
settings equal the job file's (model, what the model is, fusion, sampling defaults, seed, the input's
content); otherwise it stops and says what differs, and `--overwrite` starts over.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from logitfuse.errors import JobMismatch

VERSION = 1


def job_file(output: Path) -> Path:
    return output.with_name(output.name + ".job.json")


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def settings(model: str, source: dict, fusion: dict | None, defaults: dict, seed: int | None, inp: Path | None,
             input_sha256: str | None = None) -> dict:
    """The job's settings as JSON data; `source` says what the model name means (registry entry or server).
    The input is named by its content: the file `inp`, or a digest already taken (an input behind a URI)."""
    data = {"version": VERSION, "model": model, "source": source, "fusion": fusion, "seed": seed,
            "sampling": defaults, "input_sha256": input_sha256 or file_sha256(inp)}
    return json.loads(json.dumps(data))  # the form it has once read back (tuples become lists)


def differences(old: dict, new: dict) -> list[str]:
    """One line per setting that differs, saying what it was and what it is now."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if a == b:
            continue
        if key == "input_sha256":
            out.append("the input file's content differs from the job's input")
        elif isinstance(a, dict) and isinstance(b, dict) and key != "fusion":
            out += [f"{key}.{line}" for line in differences(a, b)]
        else:
            out.append(f"{key}: {json.dumps(a)} in the job file, {json.dumps(b)} now")
    return out


def _write_atomically(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def check(output: Path, job: dict, overwrite: bool) -> None:
    """Raise JobMismatch (saying why) unless `output` can take this job's records: nothing there yet,
    --overwrite, or an output made by the same job. Touches nothing."""
    side = job_file(output)
    if overwrite or not (output.exists() and output.stat().st_size > 0):
        return
    try:
        old = side.read_text(encoding="utf-8") if side.exists() else None
    except OSError as err:
        raise JobMismatch(f"cannot read the job file {side}: {err}; use --overwrite to start over") from None
    compare(str(output), side.name, old, job)


def compare(output: str, side: str, old_text: str | None, job: dict) -> None:
    """Raise JobMismatch unless the job file's text (None: there is none) holds `job`'s settings; `output`
    already holds records."""
    if old_text is None:
        raise JobMismatch(f"{output} exists but has no job file {side}, so it cannot be resumed safely; "
                          "use --overwrite to start over, or choose another --output")
    try:
        old = json.loads(old_text)
    except json.JSONDecodeError as err:
        raise JobMismatch(f"cannot read the job file {side}: {err}; use --overwrite to start over") from None
    diff = differences(old, job)
    if diff:
        raise JobMismatch(f"{output} was made by another job; it differs in:\n  " + "\n  ".join(diff)
                          + "\nuse --overwrite to start over, or choose another --output")


def prepare(output: Path, job: dict, overwrite: bool) -> None:
    """Make `output` ready for this job (after `check`): start over, or keep what the same job wrote."""
    check(output, job, overwrite)
    side = job_file(output)
    if overwrite:
        output.unlink(missing_ok=True)
        side.unlink(missing_ok=True)
    if output.exists() and output.stat().st_size > 0:
        return
    output.parent.mkdir(parents=True, exist_ok=True)
    _write_atomically(side, job)

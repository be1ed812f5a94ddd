"""Files of a `generate --ray` job: local paths and filesystem URIs, and the part files that make it exactly-once.

A location is a local path or a URI: pyarrow's own filesystems (`file://`, `s3://`, `gs://`, `hdfs://`, ...)
and, for any other scheme, an fsspec filesystem (`abfs://`, `memory://`, ... whatever fsspec has installed).

Exactly-once: every Ray task writes its records as one part file under `<output>.parts/`, committed
atomically (written under a temporary name, then moved into place; a reader ignores temporary names). A
part's name is a hash of the ids it holds, so a task that Ray retries after its actor died rewrites the same
part rather than adding a second copy. When the job ends, the driver merges the existing output and the
parts, keeping the first record of each id, writes the output atomically and removes the parts. A killed
job leaves its committed parts; the re-run counts their ids as done and merges them with the rest.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid

import pyarrow as pa
import pyarrow.fs as pafs

from logitfuse.batch import job_file as batch_job

TMP = ".tmp-"


def resolve(location: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a local path or a URI."""
    if "://" not in location:
        return pafs.LocalFileSystem(), os.path.abspath(location)
    try:
        return pafs.FileSystem.from_uri(location)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):  # a scheme pyarrow does not know: ask fsspec
        import fsspec

        fs, path = fsspec.core.url_to_fs(location)
        return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path


def exists(fs: pafs.FileSystem, path: str) -> bool:
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def read_bytes(fs: pafs.FileSystem, path: str) -> bytes:
    with fs.open_input_stream(path) as f:
        return f.read()


def write_atomic(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    """Write under a temporary name, then move into place: readers see the whole file or none of it."""
    parent = path.rsplit("/", 1)[0]
    if parent and parent != path:
        fs.create_dir(parent, recursive=True)
    tmp = f"{path}{TMP}{uuid.uuid4().hex}"
    with fs.open_output_stream(tmp) as f:
        f.write(data)
    fs.move(tmp, path)


def jsonl_records(data: bytes) -> list[dict]:
    """The whole records of a JSONL file; a last line cut off by a kill is left out."""
    out = []
    for line in data.decode("utf-8").splitlines():
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(obj, dict) and "id" in obj:
            out.append(obj)
    return out


def dumps(records: list[dict]) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8")


class JobFiles:
    """The output location of one job and its `<output>.parts/` folder."""

    def __init__(self, output: str) -> None:
        self.output = output
        self.fs, self.path = resolve(output)
        self.parts = f"{self.path}.parts"
        self.job = f"{self.path}.job.json"  # the job's settings, as local mode's job file

    def has_results(self) -> bool:
        out = exists(self.fs, self.path) and self.fs.get_file_info(self.path).size > 0
        return out or bool(self.part_paths())

    def check_job(self, job: dict, overwrite: bool) -> None:
        """Raise batch_job.JobMismatch unless this location can take `job`'s records (as local mode)."""
        if overwrite or not self.has_results():
            return
        old = read_bytes(self.fs, self.job).decode("utf-8") if exists(self.fs, self.job) else None
        batch_job.compare(self.output, self.job.rsplit("/", 1)[-1], old, job)

    def prepare_job(self, job: dict, overwrite: bool) -> None:
        """After check_job: start over (--overwrite), or keep what the same job wrote; the job file is written
        before the first record."""
        self.check_job(job, overwrite)
        if overwrite:
            for path in (self.path, self.job):
                if exists(self.fs, path):
                    self.fs.delete_file(path)
            if exists(self.fs, self.parts):
                self.fs.delete_dir(self.parts)
        if not self.has_results():
            write_atomic(self.fs, self.job, json.dumps(job, indent=1, sort_keys=True).encode("utf-8"))

    def commit(self, records: list[dict]) -> str | None:
        """One atomic part holding `records`, named by their ids (the same ids, the same part)."""
        if not records:
            return None
        digest = hashlib.sha256("\n".join(sorted(str(r["id"]) for r in records)).encode()).hexdigest()[:20]
        path = f"{self.parts}/part-{digest}.jsonl"
        write_atomic(self.fs, path, dumps(records))
        return path

    def part_paths(self) -> list[str]:
        if not exists(self.fs, self.parts):
            return []
        infos = self.fs.get_file_info(pafs.FileSelector(self.parts))
        return sorted(i.path for i in infos if i.type == pafs.FileType.File and TMP not in i.base_name)

    def records(self) -> list[dict]:
        """The output's records, then the committed parts' records (duplicates included)."""
        out = jsonl_records(read_bytes(self.fs, self.path)) if exists(self.fs, self.path) else []
        for p in self.part_paths():
            out += jsonl_records(read_bytes(self.fs, p))
        return out

    def done_ids(self) -> set[str]:
        return {str(r["id"]) for r in self.records()}

    def merge(self) -> int:
        """Fold the parts into the output (first record of each id kept); returns the records in the output."""
        seen: set[str] = set()
        merged = []
        for r in self.records():
            if str(r["id"]) not in seen:
                seen.add(str(r["id"]))
                merged.append(r)
        write_atomic(self.fs, self.path, dumps(merged))
        if exists(self.fs, self.parts):
            self.fs.delete_dir(self.parts)
        return len(merged)

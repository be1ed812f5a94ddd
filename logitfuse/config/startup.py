"""Start-up validation of a registry file, entry by entry, before any model loads.

Every entry of models, rewards, experts and ensembles is checked on its own (its fields, that a local
folder exists or a hub id can be had, what it refers to), so that all bad entries are reported at once.
`server.on_bad_entry` decides what happens then: `refuse` (the default) stops with the whole list;
`skip` drops the bad entries (and the entries that need them) and keeps the reasons in
`Registry.skipped`, which the server shows in /health.
"""

from __future__ import annotations

import re
from pathlib import Path

from pydantic import BaseModel, ValidationError

from logitfuse.ops.field_names import error_path

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")  # "gpt2", "org/name"
SECTIONS = ("models", "rewards", "experts", "ensembles")
DTYPES = ("auto", "float32", "float16", "bfloat16")  # as backends/hf.py resolves them
DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


def _placement(key: str, spec) -> list[str]:
    """dtype and device, checked here rather than when the checkpoint loads."""
    out = []
    if spec.dtype not in DTYPES:
        out.append(f"{key}.dtype: must be one of {', '.join(DTYPES)}, got {spec.dtype!r}")
    if not DEVICE.match(spec.device):
        out.append(f"{key}.device: must be auto, cpu, mps, cuda or cuda:N, got {spec.device!r}")
    return out


def errors_of(err: ValidationError, prefix: str) -> list[str]:
    """Every error of a pydantic validation, each as `prefix.field.path: message`."""
    out = []
    for e in err.errors():
        path = error_path(e)
        loc = ".".join(p for p in (prefix, path) if p)
        msg = e["msg"].removeprefix("Value error, ")
        out.append(f"{loc}: {msg}" if loc else msg)
    return out


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _cached(repo: str, filename: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(repo, filename), str)


def source_problem(root: str, key: str, path: str, need: str | None = "config.json",
                   hub_file: str = "config.json") -> str | None:
    """Why `path` (a folder relative to the registry file, or a hub id) cannot be loaded, or None.
    `need`: a file the folder must hold; `hub_file`: one a cached hub repository would hold."""
    given = Path(path).expanduser()
    local = (given if given.is_absolute() else Path(root) / given).resolve()
    if local.is_dir():
        return f"{key}: no such file {local / need}" if need and not (local / need).is_file() else None
    if local.exists():
        return f"{key}: {local} is a file, not a folder"
    if not HUB_ID.match(path) or ".." in path:
        return f"{key}: no such folder {local}"
    if _offline() and not _cached(path, need or hub_file):
        return (f"{key}: no such folder {local}, and {path!r} as a hub id is not in the local cache "
                f"(HF_HUB_OFFLINE is set, so it cannot be downloaded)")
    return None  # a hub id: fetched at load


def _model_sources(root: str, name: str, spec) -> list[str]:
    key = f"models.{name}"
    found = []
    if spec.path is not None:
        found.append(source_problem(root, f"{key}.path", spec.path, spec.gguf_file or "config.json"))
    if spec.tokenizer is not None:
        found.append(source_problem(root, f"{key}.tokenizer", spec.tokenizer, None, "tokenizer_config.json"))
    return [p for p in found if p]


def _entry_problems(root: str, section: str, name: str, spec) -> list[str]:
    if section == "models":
        return _placement(f"models.{name}", spec) + _model_sources(root, name, spec)
    if section == "rewards":
        found = source_problem(root, f"rewards.{name}.path", spec.path)
        return _placement(f"rewards.{name}", spec) + ([found] if found else [])
    return []


def check_entries(data: dict, specs: dict[str, type[BaseModel]], root: str) -> tuple[dict, dict[str, list[str]]]:
    """The entries that pass their own checks, by section, and the problems of the others by entry key."""
    good: dict[str, dict] = {s: {} for s in SECTIONS}
    bad: dict[str, list[str]] = {}
    for section in SECTIONS:
        entries = data.get(section) or {}
        if not isinstance(entries, dict):
            bad[section] = [f"{section}: must be a mapping of names to entries, got {type(entries).__name__}"]
            continue
        for name, entry in entries.items():
            try:
                spec = specs[section].model_validate(entry)
            except ValidationError as err:
                bad[f"{section}.{name}"] = errors_of(err, f"{section}.{name}")
                continue
            problems = _entry_problems(root, section, name, spec)
            if problems:
                bad[f"{section}.{name}"] = problems
            else:
                good[section][name] = entry
    return good, bad


def check_references(good: dict, build, bad: dict[str, list[str]]) -> dict:
    """Drop experts and ensembles whose references fail (bad entries included), recording why. `build`
    makes a Registry from sections (its validators check the references)."""
    for section in ("experts", "ensembles"):
        for name, entry in list(good[section].items()):
            trial = {**{s: good[s] for s in SECTIONS if s != section}, section: {name: entry}}
            if section == "experts":
                trial["ensembles"] = {}
            try:
                build(trial)
            except ValidationError as err:
                del good[section][name]
                bad[f"{section}.{name}"] = [_blame(m, bad) for m in errors_of(err, "")]
    return good


def _blame(message: str, bad: dict[str, list[str]]) -> str:
    """Say so when a reference fails because the entry it names was itself bad."""
    for key in bad:
        if f"{key.split('.', 1)[1]!r}" in message:
            return f"{message} ({key} is a bad entry)"
    return message


def vocab_problems(reg, tokenizers=None) -> dict[str, str]:
    """Ensembles whose models do not share token ids, found from tokenizer and config files alone
    (seconds, before any weights load). Remote, GGUF and cross-tokenizer ensembles are left to the load."""
    from logitfuse.backends.hf import probe_vocab
    from logitfuse.errors import VocabMismatchError
    from logitfuse.ops.vocab import align

    infos: dict = {}
    failed: dict[str, str] = {}
    for name in reg.ensembles:
        plan = reg.plan(name)
        models = [reg.model_spec(m) for m in plan.models()]
        if plan.cross_models() or any(m.path is None or m.gguf_file for m in models):
            continue
        try:
            for m in plan.models():
                if m not in infos:
                    infos[m] = probe_vocab(m, reg.resolve_path(reg.model_spec(m).path), tokenizers)
            align([infos[m] for m in plan.models()])
        except VocabMismatchError as err:
            failed[f"ensembles.{name}"] = f"ensembles.{name}: {err}"
        except (OSError, ValueError, KeyError):
            continue  # files the probe cannot read: the load itself will say more
    return failed


def report(path: Path, bad: dict[str, list[str]]) -> str:
    lines = [line for key in bad for line in bad[key]]
    return (f"invalid registry {path}: {len(bad)} bad entr{'y' if len(bad) == 1 else 'ies'}:\n  "
            + "\n  ".join(lines))

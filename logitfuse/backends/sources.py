"""Model sources: where a registry model's weights come from, and which backend loads them. One table.

A model entry selects its source by the field it sets (`remote`, `gguf_file`, `path`); the first source
in SOURCES whose field is set loads it. A new backend (another runtime, another file format) is one file
under backends/ with a `load` function, and one line here. Backends are imported only when a model of
theirs is loaded, so an optional runtime costs nothing until used.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from logitfuse.backends.base import CausalLM, RewardModel

if TYPE_CHECKING:
    from logitfuse.backends.tokenizers import TokenizerStore
    from logitfuse.config.specs import ModelSpec, RewardSpec

Resolve = Callable[[str], str]  # a path in the registry file -> a path on disk (or a hub id, unchanged)


@dataclass(frozen=True)
class Source:
    name: str
    field: str  # the ModelSpec field whose presence selects this source
    load: Callable[[str, ModelSpec, Resolve, TokenizerStore | None], CausalLM]
    about: str
    value: object = None  # where set: the field must have this value (not merely be present)


def _remote(name: str, spec: ModelSpec, resolve: Resolve, tokenizers: TokenizerStore | None) -> CausalLM:
    from logitfuse.backends.remote.client import RemoteCausalLM

    return RemoteCausalLM.load(name, spec.remote, resolve(spec.tokenizer), spec.chat_template, tokenizers)


def _local(name: str, spec: ModelSpec, resolve: Resolve, tokenizers: TokenizerStore | None) -> CausalLM:
    from logitfuse.backends.hf import HFCausalLM

    return HFCausalLM.load(name, resolve(spec.path), spec.dtype, spec.device, spec.chat_template, spec.gguf_file,
                           compile=spec.compile, tokenizers=tokenizers)


def _hosted(name: str, spec: ModelSpec, resolve: Resolve, tokenizers: TokenizerStore | None) -> CausalLM:
    from logitfuse.backends.shell import ShellLM

    return ShellLM.load(name, resolve(spec.path), spec.chat_template, spec.gguf_file,
                        (spec.vllm or {}).get("max_model_len"), tokenizers)


SOURCES: tuple[Source, ...] = (
    Source("vllm", "engine", _hosted, "a checkpoint that an in-process vLLM engine runs (logitfuse/vllm/engine.py); "
           "here only its tokenizer and config (backends/shell.py)", "vllm"),
    Source("remote", "remote", _remote, "an OpenAI-compatible completions endpoint (backends/remote.py)"),
    Source("gguf", "gguf_file", _local, "a GGUF checkpoint inside `path`, dequantised by transformers (hf.py)"),
    Source("folder", "path", _local, "a transformers checkpoint folder or hub id (backends/hf.py)"),
)


def source_of(spec: ModelSpec) -> Source:
    """The source a model entry selects (the first in SOURCES whose field it sets)."""
    for source in SOURCES:
        value = getattr(spec, source.field, None)
        if value is not None and (source.value is None or value == source.value):
            return source
    raise ValueError(f"a model needs one of {', '.join(repr(s.field) for s in SOURCES)}")


def load_model(name: str, spec: ModelSpec, resolve: Resolve, tokenizers: TokenizerStore | None = None) -> CausalLM:
    return source_of(spec).load(name, spec, resolve, tokenizers)


def load_reward(name: str, spec: RewardSpec, resolve: Resolve) -> RewardModel:
    """Transfer Q*'s reward models: a transformers sequence classifier (backends/hf.py)."""
    from logitfuse.backends.hf import HFReward

    return HFReward.load(name, resolve(spec.path), spec.dtype, spec.device)

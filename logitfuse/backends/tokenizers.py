"""Tokenizers by checkpoint: each read once and kept, so that loading a model while others decode stalls no one.

Reading a tokenizer is the one part of a model load that holds Python's interpreter lock for long stretches:
transformers parses tokenizer.json several times with the json module and `tokenizers` parses it once more,
each a single C call (Gemma-3's 33 MB file, 262,144 tokens: about 0.4 to 1 s per parse on 2 cores, 3 to 6 s in
all). The engine threads cannot run a step meanwhile, so a stream stalls for the whole parse. The weights do not
have this problem (safetensors maps them; the warm-up forward runs in torch with the lock released). So the
server reads every local model's tokenizer before it listens (`TokenizerStore.read_all`), and a model loaded
later, or loaded again after an eviction, takes its tokenizer from here. A tokenizer is read again only when
its files change. The cost is memory: a tokenizer read up front stays while its model is unloaded (Gemma-3's
takes about 320 MB, SmolLM2's about 30 MB). Without that read (the library), a tokenizer is only lent to the
load that read it and leaves with its model.
"""

from __future__ import annotations

import os
import threading
from typing import Any

from logitfuse.backends.base import vocab_of

# the files a tokenizer is read from (a changed one means a new tokenizer); weights are not among them
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                   "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json")


def _signature(path: str, gguf_file: str | None) -> tuple:
    names = (gguf_file,) if gguf_file else TOKENIZER_FILES
    out = []
    for f in names:
        try:
            st = os.stat(os.path.join(path, f))
        except OSError:
            continue
        out.append((f, st.st_size, st.st_mtime_ns))
    return tuple(out)


class TokenizerStore:
    """transformers tokenizers by (folder or hub id, GGUF file), each read once while its files are unchanged."""

    def __init__(self) -> None:
        self._kept: dict[tuple, tuple[tuple, Any]] = {}  # key -> (files' signature, tokenizer)
        self._lock = threading.Lock()  # guards _kept and _reading
        self._reading: dict[tuple, threading.Lock] = {}  # one reader per key; others wait for it

    def get(self, path: str, gguf_file: str | None = None, keep: bool = False) -> Any:
        """The tokenizer of a checkpoint: the one kept, while its files are unchanged; else read, and kept when
        `keep` or when an earlier one was (a library user's model, never read up front, takes its tokenizer
        with it when it is evicted)."""
        key = (path, gguf_file)
        with self._lock:
            reading = self._reading.setdefault(key, threading.Lock())
        with reading:
            signature = _signature(path, gguf_file) if os.path.isdir(path) else ()
            with self._lock:
                kept = self._kept.get(key)
            if kept is not None and kept[0] == signature:
                return kept[1]
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(path, **({"gguf_file": gguf_file} if gguf_file else {}))
            vocab_of(tok)  # built now, not in the first request's admission (another long call under the lock)
            if keep or kept is not None:
                with self._lock:
                    self._kept[key] = (signature, tok)
            return tok

    def read_all(self, places: list[tuple[str, str | None]]) -> dict[str, str]:
        """Read the tokenizers of these local checkpoints (folder, GGUF file); returns those that failed with
        the reason (their model's load reports it in full later)."""
        failed = {}
        for path, gguf_file in places:
            try:
                self.get(path, gguf_file, keep=True)
            except Exception as err:  # a broken checkpoint fails its own load, with its own message
                failed[path] = f"{type(err).__name__}: {err}"
        return failed
